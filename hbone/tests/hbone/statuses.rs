//! Status codes: handler refusals and invalid requests, through the pooled client and a raw HTTP/2 client.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use weft_hbone::{ConnectError, PoolConfig, Refusal, client_config};

use crate::support::*;

async fn refused_with(refusal: Refusal) -> (ConnectError, usize) {
    let ca = Ca::new("root");
    let (server, client) = pair(&ca, Mode::Refuse(refusal), PoolConfig::default()).await;
    let err = client.connect(&server, any_target()).await.unwrap_err();
    // The refused session is still handed back, with the refusal as the error.
    assert!(server.handler.next_closed().await.is_err());
    (err, server.handler.opened_count())
}

#[tokio::test]
async fn policy_deny_is_401_and_maps_to_denied() {
    let (err, opened) = within(refused_with(Refusal::Denied)).await;
    assert!(matches!(err, ConnectError::Denied), "{err:?}");
    assert_eq!(err.reason(), "denied");
    assert_eq!(opened, 1);
}

#[tokio::test]
async fn unreachable_upstream_is_503_and_maps_to_upstream_refused() {
    let (err, _) = within(refused_with(Refusal::Unreachable)).await;
    assert!(matches!(err, ConnectError::UpstreamRefused), "{err:?}");
    assert_eq!(err.reason(), "upstream_refused");
}

#[tokio::test]
async fn forbidden_is_400_and_maps_to_bad_request() {
    let (err, _) = within(refused_with(Refusal::Forbidden)).await;
    assert!(matches!(err, ConnectError::BadRequest), "{err:?}");
}

#[tokio::test]
async fn application_that_refuses_connections_yields_upstream_refused() {
    within(async {
        let ca = Ca::new("root");
        // A port nobody listens on: bind, learn the port, close.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (server, client) = pair(&ca, Mode::Forward(closed), PoolConfig::default()).await;
        let err = client.connect(&server, any_target()).await.unwrap_err();
        assert!(matches!(err, ConnectError::UpstreamRefused), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn hbone_port_as_target_is_400_without_asking_the_handler() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;
        for port in [15001, 15006, 15008] {
            let target = SocketAddr::from(([10, 1, 2, 3], port));
            let err = client.connect(&server, target).await.unwrap_err();
            assert!(matches!(err, ConnectError::BadRequest), "{err:?}");
        }
        assert_eq!(server.handler.opened_count(), 0);
        // The connection survives bad requests.
        assert!(client.connect(&server, any_target()).await.is_ok());
        assert_eq!(server.accepted(), 1);
    })
    .await;
}

/// A raw HTTP/2 connection to `server` with a valid client certificate.
pub async fn raw_h2(ca: &Ca, server: &TestServer) -> SendRequest<Empty<Bytes>> {
    let cred = ca.issue("spiffe://cluster.local/ns/client/sa/raw");
    let tls = client_config(&cred, &ca.bundle(), &server.identity).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub async fn send_raw(
    sender: &mut SendRequest<Empty<Bytes>>,
    method: Method,
    uri: &str,
) -> Result<StatusCode, hyper::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap();
    Ok(sender.send_request(req).await?.status())
}

#[tokio::test]
async fn non_connect_and_malformed_authorities_are_400() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let server = TestServer::start(
            &ca.issue("spiffe://cluster.local/ns/server/sa/api"),
            &ca.bundle(),
            Mode::Forward(app),
        )
        .await;
        let mut h2 = raw_h2(&ca, &server).await;
        for (method, uri) in [
            (Method::GET, "http://10.1.2.3:80/"),
            (Method::POST, "https://10.1.2.3:80/x"),
            (Method::CONNECT, "example.com:80"),
            (Method::CONNECT, "10.1.2.3"),
            (Method::CONNECT, "10.1.2.3:0"),
            (Method::CONNECT, "user@10.1.2.3:80"),
            (Method::CONNECT, "[::1]"),
            (Method::CONNECT, "0.0.0.0:80"),
        ] {
            let status = send_raw(&mut h2, method.clone(), uri).await.unwrap();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}");
        }
        assert_eq!(server.handler.opened_count(), 0);
        let status = send_raw(&mut h2, Method::CONNECT, "10.1.2.3:80").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(server.handler.opened_count(), 1);
    })
    .await;
}
