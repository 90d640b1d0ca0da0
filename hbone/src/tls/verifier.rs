//! rustls certificate verifiers for SPIFFE peers: webpki chain verification against the trust bundle's roots,
//! then the single URI SAN must be a workload id in the bundle's trust domain (and, for servers, the expected
//! one).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use super::{TlsError, TrustBundle, leaf_identity};
use crate::identity::Identity;

/// Why a chain-valid peer certificate was still refused. Carried inside
/// `rustls::CertificateError::Other` so the handshake error says why. rustls displays that variant with
/// `Debug`, so `Debug` is the readable message.
#[derive(thiserror::Error)]
pub(crate) enum PeerIdentityError {
    /// The leaf carries no usable SPIFFE id.
    #[error("peer certificate has no usable SPIFFE identity")]
    NoIdentity {
        /// What is wrong with it.
        #[source]
        source: TlsError,
    },
    /// The peer's id is in another trust domain.
    #[error("peer identity {actual} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The peer's id.
        actual: Identity,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// The server is not the workload the client expected.
    #[error("peer identity {actual} is not the expected {expected}")]
    Mismatch {
        /// The id the client expected.
        expected: Identity,
        /// The id the server presented.
        actual: Identity,
    },
}

impl std::fmt::Debug for PeerIdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)?;
        if let PeerIdentityError::NoIdentity { source } = self {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

/// What both verifiers share: roots, trust domain, signature algorithms.
#[derive(Debug)]
struct SpiffeVerifier {
    trust_domain: String,
    anchors: Arc<[TrustAnchor<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Client-side verifier of the server: chain, trust domain, and equality with the expected identity.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    inner: SpiffeVerifier,
    expected: Identity,
}

/// Server-side verifier of clients: chain and trust domain; any identity in the trust domain is accepted.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    inner: SpiffeVerifier,
    root_subjects: Vec<DistinguishedName>,
}

// === impl SpiffeVerifier ===

impl SpiffeVerifier {
    fn new(provider: Arc<CryptoProvider>, bundle: &TrustBundle) -> Self {
        Self {
            trust_domain: bundle.trust_domain.clone(),
            anchors: bundle.anchors.clone(),
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Verifies the chain for `usage` at `now` and returns the leaf's SPIFFE id, which is in the trust domain.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let actual = leaf_identity(end_entity).map_err(|source| other(PeerIdentityError::NoIdentity { source }))?;
        if actual.trust_domain() != self.trust_domain {
            return Err(other(PeerIdentityError::ForeignTrustDomain {
                actual,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(actual)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    pub(crate) fn new(provider: Arc<CryptoProvider>, bundle: &TrustBundle, expected: Identity) -> Self {
        Self {
            inner: SpiffeVerifier::new(provider, bundle),
            expected,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = self
            .inner
            .verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        if actual != self.expected {
            return Err(other(PeerIdentityError::Mismatch {
                expected: self.expected.clone(),
                actual,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    pub(crate) fn new(provider: Arc<CryptoProvider>, bundle: &TrustBundle) -> Self {
        let root_subjects = bundle
            .anchors
            .iter()
            .map(|a| DistinguishedName::from(a.subject.as_ref().to_vec()))
            .collect();
        Self {
            inner: SpiffeVerifier::new(provider, bundle),
            root_subjects,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === helpers ===

fn other(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// webpki's verdict as the rustls certificate error rustls itself would report.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext { time, not_before },
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::UnsupportedSignatureAlgorithmContext(cx) => CertificateError::UnsupportedSignatureAlgorithmContext {
            signature_algorithm_id: cx.signature_algorithm_id,
            supported_algorithms: cx.supported_algorithms,
        },
        E::UnsupportedSignatureAlgorithmForPublicKeyContext(cx) => {
            CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                public_key_algorithm_id: cx.public_key_algorithm_id,
            }
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}
