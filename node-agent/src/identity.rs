//! Workload certificates: one per identity (service account) of the pods enrolled on this node.
//! Keys are generated here and never leave the node; the controller's CA signs CSRs. A certificate
//! is fetched as soon as a pod with its identity is enrolled, renewed at half its lifetime, and kept
//! while any enrolled pod has the identity.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tokio::{sync::watch, task::JoinHandle};
use weft_api::v1::{SignRequest, ca_client::CaClient};
use weft_hbone::{
    identity::Identity,
    tls::{self, Credential, TrustBundle},
};

use crate::controller::Controller;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {identity} yet (the controller's CA has not answered)")]
    NotReady { identity: Identity },
    #[error("{identity} is not an identity of a pod enrolled on this node")]
    NotWanted { identity: Identity },
    #[error("creating a key and CSR for {identity}")]
    Csr {
        identity: Identity,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA refused to sign {identity}: {status}")]
    Refused { identity: Identity, status: tonic::Status },
    #[error("the CA's answer for {identity}")]
    BadAnswer {
        identity: Identity,
        #[source]
        source: Box<tls::TlsError>,
    },
    #[error("the CA did not answer for {identity} within {after:?}")]
    Timeout { identity: Identity, after: Duration },
    #[error("the CA issued a certificate for {got} when {identity} was asked for: not used")]
    WrongIdentity { identity: Identity, got: Box<Identity> },
}

/// Longest wait for the CA's answer to one CSR; the renewal loop retries with backoff after it.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate is used only for exactly the identity it was asked for (its key is checked against
/// ours when the credential is built): the error names the identity it carries instead.
fn check_issued(asked: &Identity, credential: &Credential) -> Result<(), Error> {
    if credential.identity == *asked {
        return Ok(());
    }
    Err(Error::WrongIdentity {
        identity: asked.clone(),
        got: Box::new(credential.identity.clone()),
    })
}

/// A certificate with everything derived from it that a connection needs.
pub struct Certified {
    pub credential: Credential,
    pub bundle: TrustBundle,
    /// Server side of HBONE for pods with this identity.
    pub server: Arc<rustls::ServerConfig>,
}

impl Certified {
    fn renew_at(&self) -> SystemTime {
        let c = &self.credential;
        let life = c.not_after.duration_since(c.not_before).unwrap_or_default();
        c.not_before + life / 2
    }

    fn is_valid(&self) -> bool {
        self.credential.not_after > SystemTime::now()
    }
}

struct Slot {
    current: watch::Receiver<Option<Arc<Certified>>>,
    task: JoinHandle<()>,
}

/// The node's identity manager.
#[derive(Clone)]
pub struct Identities {
    controller: Controller,
    trust_domain: String,
    slots: Arc<Mutex<HashMap<Identity, Slot>>>,
}

/// How long a connection waits for a certificate that is being fetched.
const WAIT: Duration = Duration::from_secs(5);

impl Identities {
    pub fn new(controller: Controller, trust_domain: String) -> Self {
        Self {
            controller,
            trust_domain,
            slots: Arc::default(),
        }
    }

    /// Keeps certificates for exactly `wanted`: starts fetching new ones, drops the rest.
    /// Connections already established keep the certificate they were made with.
    pub fn want(&self, wanted: &BTreeSet<Identity>) {
        let mut slots = self.lock();
        slots.retain(|id, slot| {
            let keep = wanted.contains(id);
            if !keep {
                slot.task.abort();
                tracing::info!(identity = %id, "certificate no longer needed");
            }
            keep
        });
        for id in wanted {
            if !slots.contains_key(id) {
                let (tx, rx) = watch::channel(None);
                let task = tokio::spawn(maintain(self.clone(), id.clone(), tx));
                slots.insert(id.clone(), Slot { current: rx, task });
            }
        }
    }

    /// Every identity the node holds a certificate for (or is fetching one for), with its chain's
    /// serials, subjects and validity: `/config_dump`'s `certificates`. Never a key.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let now = SystemTime::now();
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let secs = |from: SystemTime, to: SystemTime| match to.duration_since(from) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        let slots: Vec<(Identity, Option<Arc<Certified>>)> = self
            .lock()
            .iter()
            .map(|(id, slot)| (id.clone(), slot.current.borrow().clone()))
            .collect();
        let mut out: Vec<serde_json::Value> = slots
            .into_iter()
            .map(|(id, cert)| match cert {
                None => serde_json::json!({ "identity": id.as_str(), "state": "fetching" }),
                Some(cert) => {
                    let c = &cert.credential;
                    let chain: Vec<serde_json::Value> = c
                        .chain
                        .iter()
                        .filter_map(tls::summarize)
                        .map(|s| {
                            serde_json::json!({
                                "serial": s.serial,
                                "subject": s.subject,
                                "issuer": s.issuer,
                                "not_before": time(s.not_before),
                                "not_after": time(s.not_after),
                                "uris": s.uris,
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "identity": id.as_str(),
                        "state": if cert.is_valid() { "valid" } else { "expired" },
                        "serial": chain.first().map(|l| l["serial"].clone()),
                        "not_before": time(c.not_before),
                        "not_after": time(c.not_after),
                        "expires_in_s": secs(now, c.not_after),
                        "renews_at": time(cert.renew_at()),
                        "renews_in_s": secs(now, cert.renew_at()),
                        "chain": chain,
                    })
                }
            })
            .collect();
        out.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        out
    }

    /// The current certificate for `identity`, waiting briefly if the first one is on its way.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Certified>, Error> {
        let rx = self.lock().get(identity).map(|s| s.current.clone());
        let Some(mut rx) = rx else {
            return Err(Error::NotWanted {
                identity: identity.clone(),
            });
        };
        let ready = tokio::time::timeout(WAIT, rx.wait_for(|c| c.as_ref().is_some_and(|c| c.is_valid()))).await;
        match ready {
            Ok(Ok(c)) => c.clone().ok_or_else(|| Error::NotReady {
                identity: identity.clone(),
            }),
            _ => Err(Error::NotReady {
                identity: identity.clone(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Slot>> {
        // A panic while holding this lock leaves the map consistent (every mutation is one call).
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fetch(&self, identity: &Identity) -> Result<Certified, Error> {
        let (csr, key) = csr(identity).map_err(|source| Error::Csr {
            identity: identity.clone(),
            source,
        })?;
        let mut client = CaClient::with_interceptor(self.controller.channel(), self.controller.auth());
        let request = SignRequest {
            csr_pem: csr,
            identity: identity.to_string(),
        };
        let answer = tokio::time::timeout(SIGN_TIMEOUT, client.sign(request))
            .await
            .map_err(|_| Error::Timeout {
                identity: identity.clone(),
                after: SIGN_TIMEOUT,
            })?
            .map_err(|status| Error::Refused {
                identity: identity.clone(),
                status,
            })?
            .into_inner();
        let bad = |source| Error::BadAnswer {
            identity: identity.clone(),
            source: Box::new(source),
        };
        let credential = Credential::from_pem(&answer.chain_pem, &key).map_err(bad)?;
        check_issued(identity, &credential)?;
        let bundle = TrustBundle::from_pem(&self.trust_domain, &answer.roots_pem).map_err(bad)?;
        let server = tls::server_config(&credential, &bundle).map_err(bad)?;
        Ok(Certified {
            credential,
            bundle,
            server,
        })
    }
}

/// Fetches the first certificate, then renews at half life; retries with backoff on failure and
/// keeps the old certificate until it expires.
async fn maintain(ids: Identities, identity: Identity, tx: watch::Sender<Option<Arc<Certified>>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match ids.fetch(&identity).await {
            Ok(cert) => {
                backoff = Duration::from_millis(200);
                let renew_at = cert.renew_at();
                tracing::info!(
                    identity = %identity,
                    expires_in_s = cert.credential.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "certificate issued"
                );
                tx.send_replace(Some(Arc::new(cert)));
                let wait = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                tracing::warn!(identity = %identity, error = %crate::errors::display_chain(&e), retry_in_ms = backoff.as_millis() as u64, "certificate");
                if tx.borrow().as_ref().is_some_and(|c| !c.is_valid()) {
                    tx.send_replace(None);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A fresh P-256 key and a CSR for `identity`; the key stays here (PEM).
fn csr(identity: &Identity) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertifiedIssuer, IsCa};

    use super::*;

    /// A certificate for `id` over the key of a CSR made for `asked`, as a CA that ignores the
    /// request's identity would issue it.
    fn issued(asked: &Identity, id: &str) -> Credential {
        let (_, key_pem) = csr(asked).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let cert = leaf.signed_by(&key, &ca).unwrap();
        Credential::from_pem(&[cert.pem()], &key_pem).unwrap()
    }

    #[test]
    fn a_certificate_for_another_identity_than_asked_is_not_used() {
        let asked: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert!(check_issued(&asked, &issued(&asked, "spiffe://cluster.local/ns/shop/sa/web")).is_ok());
        let err = check_issued(
            &asked,
            &issued(&asked, "spiffe://cluster.local/ns/kube-system/sa/admin"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ns/kube-system/sa/admin") && err.to_string().contains("not used"),
            "{err}"
        );
    }
}
