//! The client's wire format against a scripted HTTP/2 server on loopback ([`super::testing`]). The
//! real API server's side of it is proven in `tests/kubernetes.rs`.

use std::time::Duration;

use http::StatusCode;
use tokio::sync::mpsc;

use super::{testing::Server, *};

const DAEMONSET: &str = r#"{"kind":"DaemonSet","apiVersion":"apps/v1","metadata":{"name":"weft-node","namespace":"weft-system","uid":"u-1","resourceVersion":"7","annotations":null},"spec":{"x":1}}"#;

#[tokio::test]
async fn get_reads_the_token_for_every_request_and_decodes_the_object() {
    let mut server = Server::start("get").await;
    let client = server.client();
    let path = "/apis/apps/v1/namespaces/weft-system/daemonsets/weft-node";
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.get::<Object>(path).await }
    });
    let seen = server.next().await;
    assert_eq!((seen.method.as_str(), seen.uri.as_str()), ("GET", path));
    assert_eq!(seen.auth, "Bearer token-1");
    seen.answer(StatusCode::OK, DAEMONSET);
    let ds = call.await.unwrap().expect("decoded");
    assert_eq!(ds.metadata.name, "weft-node");
    assert_eq!(ds.metadata.resource_version, "7");
    assert!(ds.metadata.annotations.is_empty() && ds.metadata.deletion_timestamp.is_none());

    // kubelet rotated the token: the next request carries the new one.
    std::fs::write(server.dir.join("token"), "token-2").unwrap();
    let call = tokio::spawn(async move { client.get::<Object>(path).await });
    let seen = server.next().await;
    assert_eq!(seen.auth, "Bearer token-2");
    seen.answer(StatusCode::OK, DAEMONSET);
    call.await.unwrap().expect("decoded");
}

#[tokio::test]
async fn an_empty_or_missing_token_fails_the_call_without_sending_it() {
    let mut server = Server::start("token").await;
    let client = server.client();
    std::fs::write(server.dir.join("token"), "\n").unwrap();
    let err = client.get::<Object>("/api/v1/pods").await.expect_err("empty token");
    assert!(matches!(err, Error::BadToken { .. }), "{err}");
    assert!(
        err.to_string().contains("/api/v1/pods") && err.to_string().contains("empty"),
        "{err}"
    );
    std::fs::remove_file(server.dir.join("token")).unwrap();
    let err = client.get::<Object>("/api/v1/pods").await.expect_err("no token");
    assert!(matches!(err, Error::Token { .. }), "{err}");
    assert!(server.requests.try_recv().is_err(), "nothing was sent");
}

#[tokio::test]
async fn an_error_names_the_url_the_status_and_the_api_servers_message() {
    let mut server = Server::start("status").await;
    let client = server.client();
    let call = tokio::spawn(async move {
        client
            .get::<Object>("/apis/apps/v1/namespaces/weft-system/daemonsets/gone")
            .await
    });
    server.next().await.answer(
        StatusCode::NOT_FOUND,
        r#"{"kind":"Status","status":"Failure","message":"daemonsets.apps \"gone\" not found","reason":"NotFound","code":404}"#,
    );
    let err = call.await.unwrap().expect_err("404");
    assert!(err.is_not_found());
    assert_eq!(
        err.to_string(),
        format!(
            "GET https://{}/apis/apps/v1/namespaces/weft-system/daemonsets/gone: 404 Not Found (NotFound): daemonsets.apps \"gone\" not found",
            server.addr
        )
    );
}

#[tokio::test]
async fn a_merge_patch_sends_its_content_type_and_body() {
    let mut server = Server::start("patch").await;
    let client = server.client();
    let patch = serde_json::json!({"metadata": {"annotations": {"weft.dev/redirection": null}}});
    let call = tokio::spawn(async move {
        client
            .merge_patch::<Object>("/api/v1/namespaces/shop/pods/cart/status", &patch)
            .await
    });
    let seen = server.next().await;
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.content_type, "application/merge-patch+json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&seen.body).unwrap(),
        serde_json::json!({"metadata": {"annotations": {"weft.dev/redirection": null}}})
    );
    seen.answer(StatusCode::OK, r#"{"metadata":{"name":"cart"}}"#);
    assert_eq!(call.await.unwrap().unwrap().metadata.name, "cart");
}

#[tokio::test]
async fn a_request_that_gets_no_answer_fails_at_its_deadline() {
    let mut server = Server::start("deadline").await;
    let client = server.client_with(Deadlines {
        request: Duration::from_millis(300),
        ..Deadlines::default()
    });
    let started = std::time::Instant::now();
    let call = tokio::spawn(async move { client.get::<Object>("/api/v1/namespaces/x").await });
    let seen = server.next().await;
    let err = call.await.unwrap().expect_err("no answer");
    drop(seen);
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("/api/v1/namespaces/x"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

fn endpoints(rv: &str, ip: &str) -> String {
    format!(
        r#"{{"metadata":{{"name":"weft-controller","resourceVersion":"{rv}"}},"subsets":[{{"addresses":[{{"ip":"{ip}"}}],"ports":[{{"name":"grpc","port":15012,"protocol":"TCP"}}]}}]}}"#
    )
}

fn event(kind: &str, object: &str) -> String {
    format!(r#"{{"type":"{kind}","object":{object}}}"#)
}

#[tokio::test]
async fn a_watch_lists_resumes_where_a_stream_ended_and_lists_again_when_gone() {
    let mut server = Server::start("watch").await;
    let client = server.client();
    let (events_tx, mut events) = mpsc::channel(16);
    let selector = format!("fieldSelector={}", query_value("metadata.name=weft-controller"));
    let watcher = tokio::spawn(async move {
        let mut w = client.watch::<Endpoints>("/api/v1/namespaces/weft-system/endpoints", &selector);
        loop {
            let e = w.next().await;
            let (event, version) = (e.map_err(|e| e.to_string()), w.resource_version().map(str::to_owned));
            if events_tx.send((event, version)).await.is_err() {
                return;
            }
        }
    });
    let mut next_event = async || {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the watcher runs")
    };
    let ip = |e: &Endpoints| e.subsets[0].addresses[0].ip.clone();

    // The list.
    let list = server.next().await;
    assert_eq!(
        list.uri,
        "/api/v1/namespaces/weft-system/endpoints?fieldSelector=metadata.name%3Dweft-controller"
    );
    list.answer(
        StatusCode::OK,
        &format!(
            r#"{{"kind":"EndpointsList","metadata":{{"resourceVersion":"10"}},"items":[{}]}}"#,
            endpoints("9", "10.244.1.5")
        ),
    );
    let (Ok(Event::Restarted(items)), _) = next_event().await else {
        panic!("the list first")
    };
    assert_eq!(items.iter().map(ip).collect::<Vec<_>>(), ["10.244.1.5"]);

    // The watch from the list's version; an event, a bookmark, then the stream ends.
    let watch = server.next().await;
    assert_eq!(watch.query("watch").as_deref(), Some("1"));
    assert_eq!(watch.query("resourceVersion").as_deref(), Some("10"));
    assert_eq!(watch.query("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(
        watch.query("fieldSelector").as_deref(),
        Some("metadata.name%3Dweft-controller")
    );
    let lines = watch.stream();
    lines
        .send(event("MODIFIED", &endpoints("11", "10.244.2.7")))
        .await
        .unwrap();
    let (Ok(Event::Applied(e)), Some(version)) = next_event().await else {
        panic!("an update")
    };
    assert_eq!((ip(&e), version.as_str()), ("10.244.2.7".to_owned(), "11"));
    lines
        .send(event("BOOKMARK", r#"{"metadata":{"resourceVersion":"15"}}"#))
        .await
        .unwrap();
    drop(lines);

    // Resumed from the bookmark's version; the API server says that is too old, in the stream.
    let watch = server.next().await;
    assert_eq!(watch.query("resourceVersion").as_deref(), Some("15"));
    let lines = watch.stream();
    lines
        .send(event(
            "ERROR",
            r#"{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version: 15 (40)"}"#,
        ))
        .await
        .unwrap();
    let relist = server.next().await;
    assert!(relist.query("watch").is_none(), "{}", relist.uri);
    relist.answer(StatusCode::OK, r#"{"metadata":{"resourceVersion":"41"},"items":null}"#);
    let (Ok(Event::Restarted(items)), _) = next_event().await else {
        panic!("a new list")
    };
    assert!(items.is_empty());

    // Gone as the answer to the watch itself: listed again too.
    let watch = server.next().await;
    assert_eq!(watch.query("resourceVersion").as_deref(), Some("41"));
    watch.answer(StatusCode::GONE, r#"{"kind":"Status","code":410,"reason":"Gone"}"#);
    server
        .next()
        .await
        .answer(StatusCode::OK, r#"{"metadata":{"resourceVersion":"50"},"items":[]}"#);
    let (Ok(Event::Restarted(_)), _) = next_event().await else {
        panic!("a new list")
    };

    // Another error is the caller's, naming the URL; the watcher resumes after it.
    let watch = server.next().await;
    watch.answer(
        StatusCode::FORBIDDEN,
        r#"{"kind":"Status","code":403,"reason":"Forbidden","message":"no"}"#,
    );
    let (Err(e), _) = next_event().await else {
        panic!("an error")
    };
    assert!(
        e.contains("403 Forbidden (Forbidden): no") && e.contains("watch=1"),
        "{e}"
    );
    let watch = server.next().await;
    assert_eq!(watch.query("resourceVersion").as_deref(), Some("50"));
    let lines = watch.stream();
    lines
        .send(event("DELETED", &endpoints("51", "10.244.2.7")))
        .await
        .unwrap();
    let (Ok(Event::Deleted(_)), Some(version)) = next_event().await else {
        panic!("a deletion")
    };
    assert_eq!(version, "51");
    watcher.abort();
}

#[test]
fn query_values_are_percent_encoded() {
    assert_eq!(
        query_value("spec.nodeName=node-1,a b/c"),
        "spec.nodeName%3Dnode-1%2Ca%20b%2Fc"
    );
}
