//! Mutual TLS 1.3 between SPIFFE identities: workload credentials, trust bundles, and the rustls
//! configurations HBONE clients and servers use.
//!
//! Only TLS 1.3 is offered, ALPN is `h2`, and session resumption is disabled on both sides so that every
//! connection goes through the full certificate checks. Key exchange, signatures and randomness are ring's;
//! the record cipher is aws-lc's (see [`provider`]). After the handshake HBONE seals and opens
//! the records itself (`crate::record`), so both configurations allow rustls to hand over the traffic secrets.
//! Peer names are never checked as DNS names: the verifiers in this module check the chain against the
//! trust bundle's roots and then the peer's single `spiffe://` URI SAN.

#[cfg(test)]
mod tests;
mod verifier;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{Identity, InvalidIdentity};
use verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The one ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto of both configurations: ring's provider with aws-lc's TLS 1.3 cipher suites, AES-128-GCM
/// first. Every tunnelled byte is encrypted once and decrypted once, and that was a sixth of both agents'
/// CPU in a bulk flow: aws-lc's AES-GCM uses 512-bit vector AES where the CPU has it (1.6x ring's on the
/// bench machine), and AES-128 runs 10 rounds to AES-256's 14.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Errors building credentials, trust bundles and TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block could not be decoded.
    #[error("cannot decode PEM {what}")]
    Pem {
        /// What was being decoded ("certificate chain", "private key", "trust roots").
        what: &'static str,
        /// The decoder's complaint.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The chain PEM held no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The trust bundle PEM held no certificate.
    #[error("the trust bundle for {trust_domain:?} holds no root certificate")]
    EmptyBundle {
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// The trust domain of a bundle is not a valid SPIFFE trust domain.
    #[error("invalid trust domain")]
    TrustDomain {
        /// Why it is invalid.
        #[source]
        source: InvalidIdentity,
    },
    /// A certificate is not valid DER X.509.
    #[error("cannot parse certificate: {reason}")]
    Certificate {
        /// The parser's complaint (x509-parser's error is not `'static`).
        reason: String,
    },
    /// A root certificate cannot be used as a trust anchor.
    #[error("root certificate is not a usable trust anchor")]
    TrustAnchor {
        /// The webpki error.
        #[source]
        source: webpki::Error,
    },
    /// The leaf certificate does not carry exactly one SPIFFE URI SAN.
    #[error("the leaf certificate must carry exactly one URI SAN, found {count}")]
    UriSanCount {
        /// How many URI SANs there were.
        count: usize,
    },
    /// The leaf's URI SAN is not a SPIFFE workload id.
    #[error("the leaf certificate's URI SAN is not a workload identity")]
    Identity {
        /// Why it is not.
        #[source]
        source: InvalidIdentity,
    },
    /// rustls refused the key or the configuration (unsupported key type, key not matching the leaf, ...).
    #[error("rustls rejected the credential or configuration")]
    Rustls {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
}

/// What an operator reads off a certificate: never its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The serial number in hex.
    pub serial: String,
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// URI SANs (the SPIFFE id of a workload certificate).
    pub uris: Vec<String>,
}

/// The summary of a DER certificate; `None` if it does not parse.
pub fn summarize(der: &CertificateDer<'_>) -> Option<CertificateSummary> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertificateSummary {
        serial: cert.raw_serial_as_string().replace(':', ""),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
        uris,
    })
}

/// A workload's certificate chain (leaf first) and private key, with the identity and validity read from the
/// leaf. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Credential {
    /// The identity in the leaf's URI SAN.
    pub identity: Identity,
    /// Leaf first, then intermediates (the root is not needed).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// The roots of one trust domain: the certificates peers must chain to, and the trust domain their SPIFFE ids
/// must be in.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    /// The roots parsed once for webpki.
    anchors: Arc<[TrustAnchor<'static>]>,
}

/// Client configuration presenting `cred`, accepting only a server that chains to `bundle`'s roots and whose
/// SPIFFE id equals `expected`.
///
/// The server name passed to the handshake is not checked (use the peer's IP address); expired or not yet
/// valid certificates fail at handshake time, with the rustls error saying why.
pub fn client_config(
    cred: &Credential,
    bundle: &TrustBundle,
    expected: &Identity,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(cred, bundle, expected, provider())
}

/// [`client_config`] offering only `suite`: tests reach every suite the record layer supports.
#[cfg(test)]
pub(crate) fn client_config_for_suite(
    cred: &Credential,
    bundle: &TrustBundle,
    expected: &Identity,
    suite: rustls::SupportedCipherSuite,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut provider = (*provider()).clone();
    provider.cipher_suites = vec![suite];
    client_config_with(cred, bundle, expected, Arc::new(provider))
}

fn client_config_with(
    cred: &Credential,
    bundle: &TrustBundle,
    expected: &Identity,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(provider.clone(), bundle, expected.clone());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cred.chain.clone(), cred.key.clone_key())
        .map_err(|source| TlsError::Rustls { source })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    // The record layer after the handshake is HBONE's own (see `crate::record`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Server configuration presenting `cred` and requiring a client certificate that chains to `bundle`'s roots
/// and carries a SPIFFE id in the bundle's trust domain (any workload: authorization comes later).
pub fn server_config(cred: &Credential, bundle: &TrustBundle) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeClientVerifier::new(provider.clone(), bundle);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { source })?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cred.chain.clone(), cred.key.clone_key())
        .map_err(|source| TlsError::Rustls { source })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The SPIFFE id of the peer of an established connection, as checked by this module's verifiers.
///
/// `None` before the handshake completed, or when the peer presented no certificate with one SPIFFE URI SAN
/// (which configurations from this module never accept).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    leaf_identity(leaf).ok()
}

// === impl Credential ===

impl Credential {
    /// A credential from PEM: `chain_pem` holds the leaf first, then intermediates (each string may hold one or
    /// more certificates); `key_pem` holds the leaf's private key (PKCS#8, SEC1 or PKCS#1).
    ///
    /// Fails when the chain is empty, the leaf does not carry exactly one SPIFFE URI SAN, or the key is not
    /// usable with the ring provider or does not match the leaf.
    pub fn from_pem(chain_pem: &[String], key_pem: &str) -> Result<Self, TlsError> {
        let chain = parse_certs(chain_pem, "certificate chain")?;
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|source| TlsError::Rustls { source })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|source| TlsError::Rustls { source })?;

        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| TlsError::Certificate { reason: e.to_string() })?;
        let identity = cert_identity(&cert)?;
        let validity = cert.validity();
        Ok(Self {
            identity,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            chain,
            key: Arc::new(key),
        })
    }
}

// === impl TrustBundle ===

impl TrustBundle {
    /// A bundle for `trust_domain` from PEM root certificates (each string may hold one or more).
    pub fn from_pem(trust_domain: impl Into<String>, roots_pem: &[String]) -> Result<Self, TlsError> {
        let trust_domain = trust_domain.into();
        crate::identity::check_trust_domain(&trust_domain).map_err(|source| TlsError::TrustDomain { source })?;
        let roots = parse_certs(roots_pem, "trust roots")?;
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle { trust_domain });
        }
        let anchors = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|source| TlsError::TrustAnchor { source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            roots,
            anchors: anchors.into(),
        })
    }

    /// The trust domain peers' identities must be in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

// === helpers ===

fn parse_certs(pems: &[String], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut certs = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|source| TlsError::Pem { what, source })?);
        }
    }
    Ok(certs)
}

/// The SPIFFE id in a DER certificate's single URI SAN.
fn leaf_identity(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Certificate { reason: e.to_string() })?;
    cert_identity(&cert)
}

fn cert_identity(cert: &X509Certificate<'_>) -> Result<Identity, TlsError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate { reason: e.to_string() })?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(|source| TlsError::Identity { source }),
        (None, _) => Err(TlsError::UriSanCount { count: 0 }),
        (Some(_), Some(_)) => Err(TlsError::UriSanCount {
            count: 2 + uris.count(),
        }),
    }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}
