//! The mesh CA on Kubernetes: its root (certificate and key) in Secret [`CA_SECRET`], and the
//! public part in ConfigMap [`ROOTS_CONFIG_MAP`] (key [`ROOTS_KEY`]) for node agents to mount as
//! their `--controller-ca`; both in the controller's namespace.
//!
//! - **One root for every replica.** Every replica loads the CA from the Secret. When there is none,
//!   the leader generates a root (as the local controller does at its first start) and creates the
//!   Secret; a create is refused if the Secret exists, so it happens once. The other replicas wait
//!   for it. An operator's CA (`--ca-cert/--ca-key`) bypasses all of this: no Secret is written.
//! - **Secret formats.** `ca.crt` + `ca.key` (any type, `Opaque` in practice), or a
//!   `kubernetes.io/tls` Secret's `tls.crt` + `tls.key` (as cert-manager writes a CA; its
//!   `ca.crt`, when it is not already in `tls.crt`, is appended as the issuer chain). The
//!   certificate is the CA first, then its issuers up to the root, as with `--ca-cert`. A generated
//!   root is written as `kubernetes.io/tls`.
//! - **Published roots.** While leading, the replica keeps the ConfigMap's `root.pem` equal to the
//!   CA's roots: created or updated (guarded by `resourceVersion`) when it differs, checked when
//!   leadership is gained and every [`ROOTS_RECHECK`].

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

use crate::ca::{self, Ca};

/// The Secret holding the CA.
pub const CA_SECRET: &str = "weft-ca";
/// The ConfigMap publishing the roots.
pub const ROOTS_CONFIG_MAP: &str = "weft-root-ca";
/// Its key.
pub const ROOTS_KEY: &str = "root.pem";
/// Between two attempts while the Secret cannot be read or is not there yet.
pub const RETRY: Duration = Duration::from_secs(2);
/// Between two checks of the published roots while leading.
pub const ROOTS_RECHECK: Duration = Duration::from_secs(30);
/// The longest one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Secret that exists but cannot be used: the controller does not start on it (replacing it would
/// change the mesh's root under every workload).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {secret} has neither ca.crt and ca.key nor tls.crt and tls.key")]
    NoKeys { secret: String },
    #[error("Secret {secret}: {key} is not UTF-8 PEM")]
    NotText { secret: String, key: &'static str },
    #[error(transparent)]
    Ca(#[from] ca::Error),
}

/// The CA from Secret `namespace`/[`CA_SECRET`], created by this replica if it does not exist while
/// it leads (`is_leader`). Waits, retrying every [`RETRY`], while the Secret is missing and another
/// replica leads, or the API server cannot be asked; fails only on a Secret that cannot be used.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    trust_domain: &str,
    lifetime: Duration,
    mut is_leader: watch::Receiver<bool>,
) -> Result<Ca, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let name = format!("{namespace}/{CA_SECRET}");
    let mut waiting_logged = false;
    loop {
        match tokio::time::timeout(REQUEST_TIMEOUT, api.get_opt(CA_SECRET)).await {
            Ok(Ok(Some(secret))) => {
                let ca = from_secret(&secret, &name, trust_domain, lifetime)?;
                tracing::info!(secret = name, "loaded the mesh CA");
                return Ok(ca);
            }
            Ok(Ok(None)) if *is_leader.borrow_and_update() => {
                let (cert, key) = ca::generate_root_pem(trust_domain)?;
                let secret = new_secret(&cert, &key);
                match tokio::time::timeout(REQUEST_TIMEOUT, api.create(&PostParams::default(), &secret)).await {
                    Ok(Ok(_)) => {
                        tracing::info!(secret = name, "generated the mesh root and stored it");
                        return from_secret(&secret, &name, trust_domain, lifetime);
                    }
                    // Created meanwhile (by a previous leader): read it at once.
                    Ok(Err(kube::Error::Api(s))) if s.code == 409 => continue,
                    Ok(Err(e)) => log_api_error(&name, "create", &e),
                    Err(_) => tracing::warn!(secret = name, "creating the CA Secret timed out; retrying"),
                }
            }
            Ok(Ok(None)) => {
                if !waiting_logged {
                    tracing::info!(secret = name, "no CA Secret yet: waiting for the leader to create it");
                    waiting_logged = true;
                }
                // Becoming the leader ends the wait early.
                let _ = tokio::time::timeout(RETRY, is_leader.wait_for(|l| *l)).await;
                continue;
            }
            Ok(Err(e)) => log_api_error(&name, "get", &e),
            Err(_) => tracing::warn!(secret = name, "reading the CA Secret timed out; retrying"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn log_api_error(name: &str, verb: &str, e: &kube::Error) {
    if matches!(e, kube::Error::Api(s) if s.code == 403) {
        tracing::error!(secret = name, error = %e, "forbidden to {verb} the CA Secret: grant the controller's service account {verb} on secrets in its namespace; retrying");
    } else {
        tracing::warn!(secret = name, error = %e, "cannot {verb} the CA Secret; retrying");
    }
}

/// The CA in `secret` (named `name` in errors): see the module documentation for the keys.
pub fn from_secret(secret: &Secret, name: &str, trust_domain: &str, lifetime: Duration) -> Result<Ca, Error> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = |key: &'static str| -> Result<Option<&str>, Error> {
        data.get(key)
            .map(|b| {
                std::str::from_utf8(&b.0).map_err(|_| Error::NotText {
                    secret: name.to_owned(),
                    key,
                })
            })
            .transpose()
    };
    let (cert, cert_key, key, key_key) = match (text("ca.crt")?, text("ca.key")?, text("tls.crt")?, text("tls.key")?) {
        (Some(cert), Some(key), _, _) => (cert.to_owned(), "ca.crt", key, "ca.key"),
        (issuer, _, Some(cert), Some(key)) => {
            let mut chain = cert.to_owned();
            if let Some(issuer) = issuer.filter(|i| !cert.contains(i.trim())) {
                if !chain.ends_with('\n') {
                    chain.push('\n');
                }
                chain.push_str(issuer);
            }
            (chain, "tls.crt", key, "tls.key")
        }
        _ => {
            return Err(Error::NoKeys {
                secret: name.to_owned(),
            });
        }
    };
    Ok(Ca::from_pem_named(
        &cert,
        &format!("Secret {name} key {cert_key}"),
        key,
        &format!("Secret {name} key {key_key}"),
        trust_domain,
        lifetime,
    )?)
}

fn new_secret(cert: &str, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "weft".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "weft-controller".to_owned()),
    ])
}

/// Keeps ConfigMap `namespace`/[`ROOTS_CONFIG_MAP`]'s [`ROOTS_KEY`] equal to `roots` while
/// `is_leader` says this replica leads; runs until `is_leader` is closed. Failures are logged and
/// retried after [`RETRY`].
pub async fn publish_roots(client: Client, namespace: String, roots: String, mut is_leader: watch::Receiver<bool>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let name = format!("{namespace}/{ROOTS_CONFIG_MAP}");
    loop {
        if *is_leader.borrow_and_update() {
            let wait = match tokio::time::timeout(REQUEST_TIMEOUT, ensure_roots(&api, &roots)).await {
                Ok(Ok(Published::Unchanged)) => ROOTS_RECHECK,
                Ok(Ok(published)) => {
                    tracing::info!(config_map = name, action = ?published, "published the roots");
                    ROOTS_RECHECK
                }
                // Changed meanwhile: look again at once.
                Ok(Err(kube::Error::Api(s))) if s.code == 409 => Duration::ZERO,
                Ok(Err(e)) => {
                    tracing::warn!(config_map = name, error = %e, "cannot publish the roots; retrying");
                    RETRY
                }
                Err(_) => {
                    tracing::warn!(config_map = name, "publishing the roots timed out; retrying");
                    RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = is_leader.changed() => if changed.is_err() { return },
            }
        } else if is_leader.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Published {
    Created,
    Updated,
    Unchanged,
}

async fn ensure_roots(api: &Api<ConfigMap>, roots: &str) -> Result<Published, kube::Error> {
    match api.get_opt(ROOTS_CONFIG_MAP).await? {
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOTS_CONFIG_MAP.to_owned()),
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(ROOTS_KEY.to_owned(), roots.to_owned())])),
                ..ConfigMap::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            Ok(Published::Created)
        }
        Some(cm) if cm.data.as_ref().and_then(|d| d.get(ROOTS_KEY)).map(String::as_str) == Some(roots) => {
            Ok(Published::Unchanged)
        }
        Some(mut cm) => {
            // The other keys stay; the read resourceVersion guards the update.
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(ROOTS_KEY.to_owned(), roots.to_owned());
            api.replace(ROOTS_CONFIG_MAP, &PostParams::default(), &cm).await?;
            Ok(Published::Updated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(type_: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn a_secret_holds_the_ca_in_either_format() {
        let (cert, key) = ca::generate_root_pem("cluster.local").unwrap();
        let name = "weft-system/weft-ca";
        let generated = from_secret(&new_secret(&cert, &key), name, "cluster.local", DAY).unwrap();
        assert_eq!(generated.roots_pem(), std::slice::from_ref(&cert));
        let opaque = secret("Opaque", &[("ca.crt", &cert), ("ca.key", &key)]);
        assert_eq!(
            from_secret(&opaque, name, "cluster.local", DAY).unwrap().roots_pem(),
            std::slice::from_ref(&cert)
        );
        // cert-manager's self-signed CA: ca.crt repeats tls.crt, and is not appended twice.
        let tls = secret(
            "kubernetes.io/tls",
            &[("tls.crt", &cert), ("tls.key", &key), ("ca.crt", &cert)],
        );
        assert_eq!(
            from_secret(&tls, name, "cluster.local", DAY).unwrap().roots_pem(),
            std::slice::from_ref(&cert)
        );

        let err = from_secret(&secret("Opaque", &[("ca.crt", &cert)]), name, "cluster.local", DAY)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "Secret weft-system/weft-ca has neither ca.crt and ca.key nor tls.crt and tls.key"
        );
        let (_, other_key) = ca::generate_root_pem("cluster.local").unwrap();
        let err = from_secret(
            &secret("Opaque", &[("ca.crt", &cert), ("ca.key", &other_key)]),
            name,
            "cluster.local",
            DAY,
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "Secret weft-system/weft-ca key ca.key: does not match the certificate in Secret weft-system/weft-ca key ca.crt"
        );
    }
}
