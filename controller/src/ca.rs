//! The mesh CA: a root generated at first start and kept in `<state-dir>/ca/` (or an operator-supplied
//! CA, possibly an intermediate), issuing short-lived X.509 SVIDs for SPIFFE identities and the
//! controller's own serving certificate. No gRPC here; `ca/service.rs` decides who may ask.

pub mod service;

use std::{
    fs, io,
    net::IpAddr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::{certification_request::X509CertificationRequest, prelude::FromDer as _};

use crate::auth::{SecretFileError, read_secret_file};

/// Where the generated root lives inside the state directory.
pub const ROOT_CERT: &str = "ca/root.pem";
pub const ROOT_KEY: &str = "ca/root.key";
/// The mesh roots published for agents to trust (world-readable), inside the state directory.
pub const PUBLISHED_ROOTS: &str = "root.pem";

/// How long a generated root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the controller's serving certificate is valid.
const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before they are issued, for clocks that are a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Failures setting the CA up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    /// CA material held elsewhere than in a file (a Kubernetes Secret's key) cannot be used.
    #[error("{what}: {problem}")]
    Unusable { what: String, problem: String },
    /// The private key cannot be read, or group or others may access it.
    #[error(transparent)]
    Key(#[from] SecretFileError),
    #[error("cannot generate {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// Why a signing request is refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("identity {identity:?}: {problem}")]
    Identity { identity: String, problem: String },
    #[error("identity {identity}: trust domain {trust_domain:?} is not this mesh's ({ours:?})")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
        ours: String,
    },
    #[error("CSR: {problem}")]
    Csr { problem: String },
    #[error("cannot issue a certificate")]
    Issue {
        #[source]
        source: rcgen::Error,
    },
}

pub use weft_model::identity::{Identity, is_trust_domain};

/// The identity a node asks a certificate for: a SPIFFE id ([`Identity`]) whose namespace and service
/// account are also DNS labels, the only names the store gives pods.
pub fn parse_identity(s: &str) -> Result<Identity, SignError> {
    let bad = |problem: String| SignError::Identity {
        identity: s.to_owned(),
        problem,
    };
    let id: Identity = s.parse().map_err(|e: weft_model::identity::InvalidIdentity| {
        bad(format!(
            "{}: {} (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)",
            e.part, e.reason
        ))
    })?;
    if !weft_model::is_dns_label(id.namespace()) || !weft_model::is_dns_label(id.service_account()) {
        return Err(bad("namespace and service account must be DNS labels".to_owned()));
    }
    Ok(id)
}

/// A certificate issued by the CA.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf first, then the intermediates up to (not including) the root; PEM.
    pub chain_pem: Vec<String>,
    pub not_after: OffsetDateTime,
}

/// The CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between a leaf and the root (the CA cert itself when it is an intermediate).
    intermediates: Vec<String>,
    roots: Vec<String>,
    trust_domain: String,
    lifetime: Duration,
}

// === impl Ca ===

impl Ca {
    /// Loads the root from `<state_dir>/ca/`, generating it (ECDSA P-256, 10 years) at first start.
    /// The key file is created with mode 0600, and refused if group or others may access it when
    /// loaded ([`read_secret_file`]). A restart gets the same root.
    pub fn load_or_generate(state_dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Ca, Error> {
        let cert_path = state_dir.join(ROOT_CERT);
        let key_path = state_dir.join(ROOT_KEY);
        if !cert_path.exists() {
            // Without the certificate a key on disk was never used for anything published.
            generate_root(&cert_path, &key_path, trust_domain)?;
            tracing::info!(cert = %cert_path.display(), "generated the mesh root");
        }
        let cert_pem = read(&cert_path)?;
        let key_pem = read_key(&key_path)?;
        let ca = Self::from_pem(
            &cert_pem,
            Origin::File(&cert_path),
            &key_pem,
            Origin::File(&key_path),
            trust_domain,
            lifetime,
        )?;
        Ok(ca)
    }

    /// A CA from PEM held elsewhere than in files (a Kubernetes Secret): the same rules as
    /// [`Ca::from_files`]; `cert_name` and `key_name` say where each came from, for errors.
    pub fn from_pem_named(
        cert_pem: &str,
        cert_name: &str,
        key_pem: &str,
        key_name: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Ca, Error> {
        Self::from_pem(
            cert_pem,
            Origin::Named(cert_name),
            key_pem,
            Origin::Named(key_name),
            trust_domain,
            lifetime,
        )
    }

    /// An operator-supplied CA: `cert_path` holds the CA certificate first, optionally followed by
    /// its issuers up to the root; `key_path` the CA's private key (PKCS#8 PEM). With one
    /// certificate it must be self-signed and is the root; with more, the last one is the root
    /// handed to agents and the others travel in every chain. A key file that group or others may
    /// access is refused ([`read_secret_file`]).
    pub fn from_files(cert_path: &Path, key_path: &Path, trust_domain: &str, lifetime: Duration) -> Result<Ca, Error> {
        let cert_pem = read(cert_path)?;
        let key_pem = read_key(key_path)?;
        Self::from_pem(
            &cert_pem,
            Origin::File(cert_path),
            &key_pem,
            Origin::File(key_path),
            trust_domain,
            lifetime,
        )
    }

    fn from_pem(
        cert_pem: &str,
        cert_origin: Origin<'_>,
        key_pem: &str,
        key_origin: Origin<'_>,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Ca, Error> {
        let bad = |origin: Origin<'_>, problem: String| match origin {
            Origin::File(path) => Error::BadFile {
                path: path.to_owned(),
                problem,
            },
            Origin::Named(what) => Error::Unusable {
                what: what.to_owned(),
                problem,
            },
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(key_origin, format!("not a usable private key: {e}")))?;
        let mut certs = Vec::new();
        for pem in x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()) {
            let pem = pem.map_err(|e| bad(cert_origin, format!("not PEM: {e}")))?;
            if pem.label == "CERTIFICATE" {
                certs.push(pem);
            }
        }
        let Some(first) = certs.first() else {
            return Err(bad(cert_origin, "no CERTIFICATE in it".into()));
        };
        let ca_cert = first
            .parse_x509()
            .map_err(|e| bad(cert_origin, format!("first certificate does not parse: {e}")))?;
        if ca_cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(
                key_origin,
                format!("does not match the certificate in {cert_origin}"),
            ));
        }
        if !ca_cert.is_ca() {
            return Err(bad(
                cert_origin,
                "first certificate is not a CA (basicConstraints CA:TRUE)".into(),
            ));
        }
        let mut pems: Vec<String> = certs.iter().map(|p| to_pem(&p.contents)).collect();
        let issuer = Issuer::from_ca_cert_pem(&pems[0], key)
            .map_err(|e| bad(cert_origin, format!("cannot use the CA certificate: {e}")))?;
        let (intermediates, roots) = if pems.len() == 1 {
            if ca_cert.subject() != ca_cert.issuer() || ca_cert.verify_signature(None).is_err() {
                return Err(bad(
                    cert_origin,
                    "the CA is not self-signed: append its issuers up to the root after it".into(),
                ));
            }
            (Vec::new(), pems)
        } else {
            let roots = pems.split_off(pems.len() - 1);
            (pems, roots)
        };
        Ok(Ca {
            issuer,
            intermediates,
            roots,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    /// The mesh roots (PEM) callers should trust.
    pub fn roots_pem(&self) -> &[String] {
        &self.roots
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Writes the roots to `<state_dir>/root.pem`, world-readable, atomically.
    pub fn publish_roots(&self, state_dir: &Path) -> Result<PathBuf, Error> {
        let path = state_dir.join(PUBLISHED_ROOTS);
        write_atomic(&path, self.roots.concat().as_bytes(), 0o644)?;
        Ok(path)
    }

    /// Issues an SVID for `identity` to the key of `csr_pem` (PKCS#10, PEM, ECDSA P-256, signature
    /// checked). Only the public key of the CSR is used: the certificate has exactly one SAN, the
    /// identity URI, whatever the CSR asks for.
    pub fn sign(&self, csr_pem: &str, identity: &Identity) -> Result<Issued, SignError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: identity.trust_domain().to_owned(),
                ours: self.trust_domain.clone(),
            });
        }
        let public_key = verified_csr_key(csr_pem)?;
        let uri = identity
            .as_str()
            .try_into()
            .map_err(|source| SignError::Issue { source })?;
        let mut params = leaf_params(self.lifetime).map_err(|source| SignError::Issue { source })?;
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let not_after = params.not_after;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|source| SignError::Issue { source })?;
        let mut chain_pem = vec![cert.pem()];
        chain_pem.extend(self.intermediates.iter().cloned());
        Ok(Issued { chain_pem, not_after })
    }

    /// The controller's serving certificate: a fresh P-256 key, DNS SAN `server_name`, plus `ip` as
    /// an IP SAN unless it is unspecified; valid one year. Returns (certificate chain PEM, key PEM).
    pub fn serving_cert(&self, server_name: &str, ip: IpAddr) -> Result<(String, String), Error> {
        self.serving_cert_for(server_name, &[ip])
    }

    /// [`Ca::serving_cert`] with an IP SAN for each of `ips` that is specified (a replica's
    /// `--listen` address and its pod's address), each once.
    pub fn serving_cert_for(&self, server_name: &str, ips: &[IpAddr]) -> Result<(String, String), Error> {
        let generate = |source| Error::Generate {
            what: "the serving certificate",
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = leaf_params(SERVING_LIFETIME).map_err(generate)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, server_name);
        params.subject_alt_names = vec![SanType::DnsName(server_name.try_into().map_err(generate)?)];
        for ip in ips.iter().filter(|ip| !ip.is_unspecified()) {
            let san = SanType::IpAddress(*ip);
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        let mut chain = cert.pem();
        for pem in &self.intermediates {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

/// Parameters shared by every leaf: not a CA, serverAuth + clientAuth, valid from a minute ago for
/// `lifetime`, a random serial.
fn leaf_params(lifetime: Duration) -> Result<CertificateParams, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Parses `pem` as a PKCS#10 CSR, checks its signature and that its key is ECDSA P-256.
fn verified_csr_key(pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, SignError> {
    let bad = |problem: String| SignError::Csr { problem };
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(format!("not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!("PEM block is {:?}, not CERTIFICATE REQUEST", pem.label)));
    }
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a PKCS#10 certification request: {e}")))?;
    csr.verify_signature()
        .map_err(|_| bad("signature does not verify".into()))?;
    let spki = &csr.certification_request_info.subject_pki;
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| bad("unsupported key type (want ECDSA P-256)".into()))?;
    if rcgen::PublicKeyData::algorithm(&key) != &PKCS_ECDSA_P256_SHA256 {
        return Err(bad("unsupported key type (want ECDSA P-256)".into()));
    }
    Ok(key)
}

/// A new mesh root, ECDSA P-256, self-signed, valid 10 years: (certificate PEM, PKCS#8 key PEM).
pub fn generate_root_pem(trust_domain: &str) -> Result<(String, String), Error> {
    let generate = |source| Error::Generate {
        what: "the mesh root",
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Weft mesh root ({trust_domain})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial().map_err(generate)?);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn generate_root(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<(), Error> {
    let (cert_pem, key_pem) = generate_root_pem(trust_domain)?;
    if let Some(dir) = cert_path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Write {
                path: dir.to_owned(),
                source,
            })?;
    }
    // The key first: a crash between the two leaves no certificate, and the next start begins over.
    write_atomic(key_path, key_pem.as_bytes(), 0o600)?;
    write_atomic(cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Where CA material came from, for errors.
#[derive(Clone, Copy)]
enum Origin<'a> {
    File(&'a Path),
    Named(&'a str),
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Named(what) => f.write_str(what),
        }
    }
}

/// 16 random bytes, positive and without a leading zero byte.
fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the CA's private key, refusing a file that group or others may access.
fn read_key(path: &Path) -> Result<String, Error> {
    let bytes = read_secret_file(path, "the CA's private key")?;
    String::from_utf8(bytes).map_err(|_| Error::BadFile {
        path: path.to_owned(),
        problem: "not a usable private key: not UTF-8 PEM".into(),
    })
}

/// Replaces `path` with `bytes` durably, created with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    weft_api::durable::write(path, bytes, mode).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
