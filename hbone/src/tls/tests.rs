use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use super::*;

/// A self-signed leaf with the given URI SANs: (certificate PEM, key PEM).
fn leaf(uris: &[&str]) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
        .collect();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn credential_takes_identity_from_the_single_uri_san() {
    let (cert, key) = leaf(&["spiffe://td/ns/a/sa/b"]);
    let cred = Credential::from_pem(&[cert], &key).unwrap();
    assert_eq!(cred.identity, Identity::try_new("td", "a", "b").unwrap());
    assert!(cred.not_before < cred.not_after);
}

#[test]
fn credential_rejects_leaves_without_exactly_one_spiffe_id() {
    let (cert, key) = leaf(&[]);
    assert!(matches!(
        Credential::from_pem(&[cert], &key),
        Err(TlsError::UriSanCount { count: 0 })
    ));
    let (cert, key) = leaf(&["spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c"]);
    assert!(matches!(
        Credential::from_pem(&[cert], &key),
        Err(TlsError::UriSanCount { count: 2 })
    ));
    let (cert, key) = leaf(&["https://example.com/"]);
    assert!(matches!(
        Credential::from_pem(&[cert], &key),
        Err(TlsError::Identity { .. })
    ));
}

#[test]
fn credential_rejects_a_key_that_does_not_match_the_leaf() {
    let (cert, _) = leaf(&["spiffe://td/ns/a/sa/b"]);
    let (_, other_key) = leaf(&["spiffe://td/ns/a/sa/b"]);
    assert!(matches!(
        Credential::from_pem(&[cert], &other_key),
        Err(TlsError::Rustls { .. })
    ));
}

#[test]
fn credential_rejects_empty_or_garbled_pem() {
    let (_, key) = leaf(&["spiffe://td/ns/a/sa/b"]);
    assert!(matches!(Credential::from_pem(&[], &key), Err(TlsError::EmptyChain)));
    let (cert, _) = leaf(&["spiffe://td/ns/a/sa/b"]);
    assert!(Credential::from_pem(&[cert], "not a key").is_err());
}

#[test]
fn trust_bundle_needs_roots_and_a_valid_trust_domain() {
    let (cert, _) = leaf(&["spiffe://td/ns/a/sa/b"]);
    assert!(matches!(
        TrustBundle::from_pem("td", &[]),
        Err(TlsError::EmptyBundle { .. })
    ));
    assert!(matches!(
        TrustBundle::from_pem("Bad/TD", std::slice::from_ref(&cert)),
        Err(TlsError::TrustDomain { .. })
    ));
    let bundle = TrustBundle::from_pem("td", &[cert]).unwrap();
    assert_eq!(bundle.trust_domain(), "td");
    assert_eq!(bundle.roots().len(), 1);
}

#[test]
fn configs_speak_only_tls13_h2_without_resumption() {
    let (cert, key) = leaf(&["spiffe://td/ns/a/sa/b"]);
    let cred = Credential::from_pem(std::slice::from_ref(&cert), &key).unwrap();
    let bundle = TrustBundle::from_pem("td", &[cert]).unwrap();
    let client = client_config(&cred, &bundle, &cred.identity).unwrap();
    assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
    assert!(!client.enable_early_data);
    let server = server_config(&cred, &bundle).unwrap();
    assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(server.send_tls13_tickets, 0);
}
