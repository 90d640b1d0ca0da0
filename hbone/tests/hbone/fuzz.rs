//! Arbitrary method/authority/path combinations against a running server through a raw HTTP/2 client:
//! 200 exactly for valid CONNECT targets (valid by the rules in `reference.rs`, not by asking the
//! server's own parser), the handler only asked for those, and the server keeps serving.

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::reference;
use crate::statuses::raw_h2;
use crate::support::*;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::CONNECT),
        1 => Just(Method::GET),
        1 => Just(Method::POST),
        1 => Just(Method::OPTIONS),
        1 => "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        // Valid-looking targets, allowed or forbidden ports included.
        (
            any::<[u8; 4]>(),
            prop_oneof![any::<u16>(), Just(15001u16), Just(15006), Just(15008), Just(0)]
        )
            .prop_map(|(ip, port)| format!("{}:{port}", std::net::Ipv4Addr::from(ip))),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| format!("[{}]:{port}", std::net::Ipv6Addr::from(ip))),
        "[a-z0-9.-]{1,20}(:[0-9]{1,6})?",
        "[a-z]{1,5}@[0-9.]{1,15}:[0-9]{1,5}",
        "\\[[0-9a-f:%]{0,20}\\](:[0-9]{0,6})?",
        "[ -~]{0,30}",
        // Near the rules: every way a target can be refused, and valid ones of every form.
        reference::authority_like(),
    ]
}

fn path() -> impl Strategy<Value = Option<String>> {
    prop::option::of("/[a-z0-9/?=&]{0,12}")
}

/// Sends one request; `Ok(None)` when the client library refuses to send it at all.
async fn send(
    h2: &mut SendRequest<Empty<Bytes>>,
    method: &Method,
    uri: &Uri,
) -> Result<Option<http::Response<hyper::body::Incoming>>, hyper::Error> {
    let Ok(req) = http::Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .body(Empty::<Bytes>::new())
    else {
        return Ok(None);
    };
    match h2.send_request(req).await {
        Ok(rsp) => Ok(Some(rsp)),
        // The client refused to serialize it (e.g. CONNECT with a path): nothing reached the server.
        Err(e) if e.is_user() => Ok(None),
        Err(e) => Err(e),
    }
}

#[test]
fn server_answers_200_only_for_valid_connect_targets() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = Ca::new("root");
    let (server, h2) = rt.block_on(async {
        let app = echo_server().await;
        let server = TestServer::start(
            &ca.issue("spiffe://cluster.local/ns/server/sa/api"),
            &ca.bundle(),
            Mode::Forward(app),
        )
        .await;
        let h2 = raw_h2(&ca, &server).await;
        (server, h2)
    });

    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let h2 = std::cell::RefCell::new(h2.clone());
    let valid_seen = std::cell::Cell::new(0usize);
    let strategy = (method(), authority(), path());
    runner
        .run(&strategy, |(method, authority, path)| {
            let uri_text = match &path {
                Some(p) => format!("http://{authority}{p}"),
                None => authority.clone(),
            };
            let Ok(uri) = uri_text.parse::<Uri>() else {
                return Ok(());
            };
            // What reaches the server: for CONNECT the HTTP/2 client sends only :authority.
            let wire = match (&method, uri.authority()) {
                (&Method::CONNECT, Some(a)) => Uri::try_from(a.as_str()).unwrap_or_else(|_| uri.clone()),
                _ => uri.clone(),
            };
            let valid = method == Method::CONNECT
                && wire.scheme().is_none()
                && wire.path_and_query().is_none()
                && wire.authority().is_some_and(|a| reference::target(a.as_str()).is_ok());
            let opened_before = server.handler.opened_count();
            let mut sender = h2.borrow().clone();
            let outcome = rt.block_on(within(async {
                if sender.is_closed() {
                    sender = raw_h2(&ca, &server).await;
                }
                send(&mut sender, &method, &uri).await
            }));
            *h2.borrow_mut() = sender;
            match outcome {
                Ok(Some(rsp)) => {
                    let status = rsp.status();
                    prop_assert_eq!(status == StatusCode::OK, valid, "{} {} -> {}", method, uri_text, status);
                    if !valid {
                        prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{} {}", method, uri_text);
                    }
                }
                Ok(None) => prop_assert!(!valid, "client refused to send a valid request {} {}", method, uri_text),
                // A stream reset by the server's HTTP/2 layer (malformed request): never a valid one.
                Err(e) => prop_assert!(!valid, "valid request {} {} failed: {}", method, uri_text, e),
            }
            let opens = server.handler.opened_count() - opened_before;
            if opens != usize::from(valid) {
                return Err(TestCaseError::fail(format!(
                    "handler opened {opens} times for {method} {uri_text} (valid: {valid})"
                )));
            }
            valid_seen.set(valid_seen.get() + usize::from(valid));
            Ok(())
        })
        .unwrap();
    assert!(valid_seen.get() > 0, "the strategy never produced a valid request");

    // The server is still healthy: a fresh client still gets a working tunnel.
    rt.block_on(within(async {
        let mut h2 = raw_h2(&ca, &server).await;
        let status = crate::statuses::send_raw(&mut h2, Method::CONNECT, "10.9.8.7:80")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }));
}
