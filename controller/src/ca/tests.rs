use std::os::unix::fs::PermissionsExt as _;

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn identity() -> Identity {
    parse_identity("spiffe://cluster.local/ns/shop/sa/cart").unwrap()
}

fn csr(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<String>) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    CertificateParams::new(sans)
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn der_of(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().into_contents()
}

#[test]
fn root_is_generated_once_with_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let mode = fs::metadata(dir.path().join(ROOT_KEY)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let root = fs::read(dir.path().join(ROOT_CERT)).unwrap();
    let again = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    assert_eq!(fs::read(dir.path().join(ROOT_CERT)).unwrap(), root);
    assert_eq!(again.roots_pem(), ca.roots_pem());

    let der = der_of(&ca.roots_pem()[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.is_ca());
    assert_eq!(cert.subject().to_string(), "CN=Weft mesh root (cluster.local)");
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / (365 * 24 * 3600);
    assert_eq!(years, 10);

    let published = ca.publish_roots(dir.path()).unwrap();
    let mode = fs::metadata(&published).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert_eq!(fs::read(&published).unwrap(), root);
}

#[test]
fn leaf_has_only_the_identity_san_and_the_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let issued = ca
        .sign(
            &csr(&PKCS_ECDSA_P256_SHA256, vec!["evil.example.com".into()]),
            &identity(),
        )
        .unwrap();
    assert_eq!(issued.chain_pem.len(), 1);
    let der = der_of(&issued.chain_pem[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")]
    );
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 24 * 3600 + 60, "lifetime plus the minute of clock skew");
    let root_der = der_of(&ca.roots_pem()[0]);
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    cert.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn refuses_bad_csrs_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let problem = |pem: &str| match ca.sign(pem, &identity()) {
        Err(SignError::Csr { problem }) => problem,
        other => panic!("expected a CSR error, got {other:?}"),
    };
    assert!(problem("hello").contains("not PEM"));
    assert!(problem(&csr(&rcgen::PKCS_ECDSA_P384_SHA384, vec![])).contains("want ECDSA P-256"));
    assert!(problem(&csr(&rcgen::PKCS_ED25519, vec![])).contains("want ECDSA P-256"));
    assert!(problem(&ca.roots_pem()[0]).contains("not CERTIFICATE REQUEST"));
    // Flip a bit inside the signed part: the signature no longer verifies.
    let good = csr(&PKCS_ECDSA_P256_SHA256, vec!["a.example".into()]);
    let mut der = der_of(&good);
    let at = der.len() / 3;
    der[at] ^= 0x01;
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    let p = problem(&tampered);
    assert!(
        p.contains("signature does not verify") || p.contains("not a PKCS#10"),
        "{p}"
    );
}

#[test]
fn identity_must_have_weft_shape_and_our_trust_domain() {
    for bad in [
        "spiffe://cluster.local/ns/shop",
        "https://cluster.local/ns/shop/sa/cart",
        "spiffe://cluster.local/ns/Shop/sa/cart",
        "spiffe://cluster.local/ns/shop/sa/cart/x",
    ] {
        assert!(matches!(parse_identity(bad), Err(SignError::Identity { .. })), "{bad}");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let other = parse_identity("spiffe://other.td/ns/shop/sa/cart").unwrap();
    let err = ca.sign(&csr(&PKCS_ECDSA_P256_SHA256, vec![]), &other).unwrap_err();
    assert!(matches!(err, SignError::ForeignTrustDomain { .. }), "{err}");
}

#[test]
fn operator_intermediate_travels_in_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root_cert = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = CertificateParams::default();
    int_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    int_params.distinguished_name.push(DnType::CommonName, "intermediate");
    let int_cert = int_params.signed_by(&int_key, &root_issuer).unwrap();

    let cert_path = dir.path().join("ca.pem");
    let key_path = dir.path().join("ca.key");
    fs::write(&cert_path, format!("{}{}", int_cert.pem(), root_cert.pem())).unwrap();
    fs::write(&key_path, int_key.serialize_pem()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    let ca = Ca::from_files(&cert_path, &key_path, "cluster.local", DAY).unwrap();
    assert_eq!(der_of(&ca.roots_pem()[0]), root_cert.der().to_vec());
    let issued = ca.sign(&csr(&PKCS_ECDSA_P256_SHA256, vec![]), &identity()).unwrap();
    assert_eq!(issued.chain_pem.len(), 2);
    assert_eq!(der_of(&issued.chain_pem[1]), int_cert.der().to_vec());

    // The intermediate alone is refused: nothing to trust.
    fs::write(&cert_path, int_cert.pem()).unwrap();
    let err = Ca::from_files(&cert_path, &key_path, "cluster.local", DAY)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not self-signed"), "{err}");
    // A key that does not belong to the certificate is refused.
    fs::write(&cert_path, root_cert.pem()).unwrap();
    let err = Ca::from_files(&cert_path, &key_path, "cluster.local", DAY)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn serving_cert_names_server_and_listen_ip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let (chain, _key) = ca.serving_cert("weft-controller", "10.0.0.1".parse().unwrap()).unwrap();
    let der = der_of(&chain);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert!(names.contains(&GeneralName::DNSName("weft-controller")));
    assert!(names.contains(&GeneralName::IPAddress(&[10, 0, 0, 1])));
    let (chain, _key) = ca.serving_cert("weft-controller", "0.0.0.0".parse().unwrap()).unwrap();
    let der = der_of(&chain);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1
    );
}

#[test]
fn generated_ca_key_open_to_group_or_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
    let key = dir.path().join(ROOT_KEY);
    for mode in [0o640, 0o604, 0o620] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
        let err = Ca::load_or_generate(dir.path(), "cluster.local", DAY)
            .err()
            .expect("a key open to others must be refused")
            .to_string();
        assert!(
            err.contains(&key.display().to_string())
                && err.contains(&format!("(mode {mode:04o})"))
                && err.contains("chmod 600"),
            "{err}"
        );
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    Ca::load_or_generate(dir.path(), "cluster.local", DAY).unwrap();
}

#[test]
fn operator_ca_key_open_to_group_or_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.path().join("ca.pem");
    let key_path = dir.path().join("ca.key");
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::from_files(&cert_path, &key_path, "cluster.local", DAY)
        .err()
        .expect("a key open to others must be refused")
        .to_string();
    assert!(
        err.contains(&key_path.display().to_string()) && err.contains("(mode 0644)") && err.contains("chmod 600"),
        "{err}"
    );
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    Ca::from_files(&cert_path, &key_path, "cluster.local", DAY).unwrap();
}
