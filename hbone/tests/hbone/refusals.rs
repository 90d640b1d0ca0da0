//! Certificate refusals on both sides: another CA, another trust domain, an expired certificate, and
//! (client side) a server that is not the expected workload. The handler never sees a refused client.

use weft_hbone::{ConnectError, Credential, Pool, PoolConfig, ServeError, TrustBundle};

use crate::support::*;

const SERVER_ID: &str = "spiffe://cluster.local/ns/server/sa/api";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/client/sa/web";

/// Client with `client_cred` connects to a server presenting `server_cred` and trusting `server_bundle`.
/// Returns what the client got, what the server's `serve` returned, and how often the handler was asked.
async fn attempt(
    client_cred: Credential,
    client_bundle: TrustBundle,
    server_cred: Credential,
    server_bundle: TrustBundle,
) -> (ConnectError, ServeError, usize) {
    let app = echo_server().await;
    let server = TestServer::start(&server_cred, &server_bundle, Mode::Forward(app)).await;
    let client = Client::new(client_cred, client_bundle, Pool::new(PoolConfig::default()));
    let expected = id("server", "api");
    let err = client
        .connect_expecting(server.addr, &expected, any_target())
        .await
        .expect_err("the handshake must fail");
    let serve_err = server.next_result().await.expect_err("serve must fail");
    (err, serve_err, server.handler.opened_count())
}

fn assert_tls(err: &ConnectError, needle: &str) {
    assert!(matches!(err, ConnectError::Tls(_)), "expected a TLS error, got {err:?}");
    assert_eq!(err.reason(), "tls");
    let chain = format!("{:?}", err);
    assert!(chain.contains(needle), "{needle:?} not in {chain}");
}

fn assert_handshake_failed(err: &ServeError) {
    assert!(
        matches!(err, ServeError::Handshake { .. }),
        "expected a handshake error, got {err:?}"
    );
}

// === server refuses the client ===

#[tokio::test]
async fn server_refuses_client_certificate_from_another_ca() {
    within(async {
        let (ca, rogue) = (Ca::new("root"), Ca::new("rogue"));
        let (err, serve_err, opened) =
            attempt(rogue.issue(CLIENT_ID), ca.bundle(), ca.issue(SERVER_ID), ca.bundle()).await;
        assert_tls(&err, "AlertReceived");
        assert_handshake_failed(&serve_err);
        assert!(format!("{serve_err:?}").contains("UnknownIssuer"), "{serve_err:?}");
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    within(async {
        let ca = Ca::new("root");
        let foreign = ca.issue("spiffe://other.domain/ns/client/sa/web");
        let (err, serve_err, opened) = attempt(foreign, ca.bundle(), ca.issue(SERVER_ID), ca.bundle()).await;
        assert_tls(&err, "AlertReceived");
        assert_handshake_failed(&serve_err);
        assert!(
            format!("{serve_err}: {:?}", serve_err).contains("other.domain"),
            "{serve_err:?}"
        );
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn server_refuses_expired_client_certificate() {
    within(async {
        let ca = Ca::new("root");
        let (err, serve_err, opened) = attempt(
            ca.issue_expired(CLIENT_ID),
            ca.bundle(),
            ca.issue(SERVER_ID),
            ca.bundle(),
        )
        .await;
        assert_tls(&err, "AlertReceived");
        assert_handshake_failed(&serve_err);
        assert!(format!("{serve_err:?}").contains("Expired"), "{serve_err:?}");
        assert_eq!(opened, 0);
    })
    .await;
}

// === client refuses the server ===

#[tokio::test]
async fn client_refuses_server_certificate_from_another_ca() {
    within(async {
        let (ca, rogue) = (Ca::new("root"), Ca::new("rogue"));
        let (err, serve_err, opened) =
            attempt(ca.issue(CLIENT_ID), ca.bundle(), rogue.issue(SERVER_ID), rogue.bundle()).await;
        assert_tls(&err, "UnknownIssuer");
        assert_handshake_failed(&serve_err);
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_from_another_trust_domain() {
    within(async {
        let ca = Ca::new("root");
        let foreign = ca.issue("spiffe://other.domain/ns/server/sa/api");
        let (err, _, opened) = attempt(ca.issue(CLIENT_ID), ca.bundle(), foreign, ca.bundle_for("other.domain")).await;
        assert_tls(&err, "other.domain");
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    within(async {
        let ca = Ca::new("root");
        let (err, _, opened) = attempt(
            ca.issue(CLIENT_ID),
            ca.bundle(),
            ca.issue_expired(SERVER_ID),
            ca.bundle(),
        )
        .await;
        assert_tls(&err, "Expired");
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_with_another_identity() {
    within(async {
        let ca = Ca::new("root");
        let impostor = ca.issue("spiffe://cluster.local/ns/server/sa/impostor");
        let (err, _, opened) = attempt(ca.issue(CLIENT_ID), ca.bundle(), impostor, ca.bundle()).await;
        assert_tls(&err, "impostor");
        assert!(err.to_string().contains("TLS"), "{err}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            source.contains("is not the expected spiffe://cluster.local/ns/server/sa/api"),
            "{source}"
        );
        assert_eq!(opened, 0);
    })
    .await;
}

#[tokio::test]
async fn server_refuses_clients_that_do_not_negotiate_h2() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let server = TestServer::start(&ca.issue(SERVER_ID), &ca.bundle(), Mode::Forward(app)).await;
        let cred = ca.issue(CLIENT_ID);
        let mut config = (*weft_hbone::client_config(&cred, &ca.bundle(), &server.identity).unwrap()).clone();
        config.alpn_protocols.clear();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(server.addr.ip().into());
        // The handshake itself may complete; the server then hangs up.
        let _ = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await;
        let err = server.next_result().await.unwrap_err();
        assert!(matches!(err, ServeError::Alpn { negotiated: None }), "{err:?}");
        assert_eq!(server.handler.opened_count(), 0);
    })
    .await;
}
