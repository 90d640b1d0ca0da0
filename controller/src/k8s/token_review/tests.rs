use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::UserInfo;
use serde_json::json;

use super::*;

const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

/// A JWT-shaped token with `claims` (not signed: only ever prechecked here).
fn jwt(claims: Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.c2lnbmF0dXJl", b64(&json!({"alg": "RS256"})), b64(&claims))
}

fn bound_claims() -> Value {
    json!({
        "aud": ["weft-controller"],
        "exp": NOW + 600,
        "kubernetes.io": {"namespace": "weft-system", "pod": {"name": "agent-a", "uid": "u1"}},
    })
}

#[test]
fn precheck_refuses_what_no_review_would_accept() {
    assert_eq!(
        precheck(&jwt(bound_claims()), now()),
        Ok(Claims {
            exp: Some(NOW as i64 + 600)
        })
    );
    assert!(matches!(precheck("secret", now()), Err(Refusal::NotJwt(_))));
    assert!(matches!(precheck("a.!!!.c", now()), Err(Refusal::NotJwt(_))));
    assert!(matches!(precheck("a.b.c.d", now()), Err(Refusal::NotJwt(_))));
    let mut c = bound_claims();
    c["exp"] = json!(NOW - 30);
    assert_eq!(precheck(&jwt(c), now()), Err(Refusal::Expired { seconds_ago: 30 }));
    let mut c = bound_claims();
    c["aud"] = json!("https://kubernetes.default.svc.cluster.local");
    let refusal = precheck(&jwt(c), now()).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "the token is for audiences [\"https://kubernetes.default.svc.cluster.local\"], not \"weft-controller\""
    );
    let mut c = bound_claims();
    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    assert_eq!(precheck(&jwt(c), now()), Err(Refusal::NotPodBound));
    // A single audience as a string is fine too.
    let mut c = bound_claims();
    c["aud"] = json!("weft-controller");
    assert!(precheck(&jwt(c), now()).is_ok());
}

fn status(authenticated: bool, username: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(authenticated),
        user: Some(UserInfo {
            username: Some(username.into()),
            extra: Some(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..UserInfo::default()
        }),
        ..TokenReviewStatus::default()
    }
}

const USER: &str = "system:serviceaccount:weft-system:weft-node";

#[test]
fn the_review_must_name_the_node_account_and_a_pod() {
    let pod = [(EXTRA_POD_NAME, "agent-a"), (EXTRA_POD_UID, "u1")];
    assert_eq!(
        bound_pod(&status(true, USER, &pod), USER),
        Ok(BoundPod {
            name: "agent-a".into(),
            uid: "u1".into(),
            node: None
        })
    );
    let mut refused = status(false, "", &[]);
    refused.error = Some("[invalid bearer token, Token has expired.]".into());
    assert_eq!(
        bound_pod(&refused, USER).unwrap_err().to_string(),
        "the API server does not authenticate the token: [invalid bearer token, Token has expired.]"
    );
    assert!(matches!(
        bound_pod(&status(true, "system:serviceaccount:shop:api", &pod), USER),
        Err(Refusal::WrongAccount { .. })
    ));
    assert_eq!(
        bound_pod(&status(true, USER, &[(EXTRA_POD_NAME, "agent-a")]), USER),
        Err(Refusal::NotPodBound)
    );
    let with_node = [pod[0], pod[1], (EXTRA_NODE_NAME, "node-a")];
    assert_eq!(
        bound_pod(&status(true, USER, &with_node), USER)
            .unwrap()
            .node
            .as_deref(),
        Some("node-a")
    );
}

fn pod(uid: &str, service_account: &str, phase: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "agent-a", "namespace": "weft-system", "uid": uid},
        "spec": {"serviceAccountName": service_account, "nodeName": node, "containers": []},
        "status": {"phase": phase},
    }))
    .unwrap()
}

#[test]
fn the_node_is_the_running_bound_pods() {
    let bound = BoundPod {
        name: "agent-a".into(),
        uid: "u1".into(),
        node: None,
    };
    let name = "weft-system/agent-a";
    let node = |p: Option<&Pod>, b: &BoundPod| node_of(p, b, name);
    assert_eq!(
        node(Some(&pod("u1", "weft-node", "Running", "node-a")), &bound),
        Ok("node-a".into())
    );
    assert!(matches!(node(None, &bound), Err(Refusal::PodGone { .. })));
    assert_eq!(
        node(Some(&pod("u2", "weft-node", "Running", "node-a")), &bound)
            .unwrap_err()
            .to_string(),
        "the token's pod weft-system/agent-a is another pod now (uid u2, the token's u1)"
    );
    assert!(matches!(
        node(Some(&pod("u1", "default", "Running", "node-a")), &bound),
        Err(Refusal::PodAccount { .. })
    ));
    assert!(matches!(
        node(Some(&pod("u1", "weft-node", "Pending", "node-a")), &bound),
        Err(Refusal::PodNotRunning { .. })
    ));
    assert!(matches!(
        node(Some(&pod("u1", "weft-node", "Running", "")), &bound),
        Err(Refusal::PodNotScheduled { .. })
    ));
    let on_b = BoundPod {
        node: Some("node-b".into()),
        ..bound.clone()
    };
    assert!(matches!(
        node(Some(&pod("u1", "weft-node", "Running", "node-a")), &on_b),
        Err(Refusal::NodeMismatch { .. })
    ));
    let on_a = BoundPod {
        node: Some("node-a".into()),
        ..bound
    };
    assert_eq!(
        node(Some(&pod("u1", "weft-node", "Running", "node-a")), &on_a),
        Ok("node-a".into())
    );
}

#[test]
fn an_accepted_token_is_trusted_a_minute_at_most_and_never_past_its_expiry() {
    let t = Instant::now();
    assert_eq!(accepted_until(t, None, now()), t + ACCEPTED_TTL);
    assert_eq!(accepted_until(t, Some(NOW as i64 + 3600), now()), t + ACCEPTED_TTL);
    assert_eq!(
        accepted_until(t, Some(NOW as i64 + 20), now()),
        t + Duration::from_secs(20)
    );
    assert_eq!(accepted_until(t, Some(NOW as i64 - 5), now()), t);
}

#[test]
fn the_cache_forgets_at_the_deadline_and_stays_bounded() {
    let t = Instant::now();
    let mut cache = Cache::default();
    cache.insert(b"a".to_vec(), "node-a".into(), t + Duration::from_secs(5), t);
    assert_eq!(cache.get(b"a", t), Some("node-a"));
    assert_eq!(cache.get(b"a", t + Duration::from_secs(5)), None);
    for i in 0..MAX_CACHED {
        cache.insert(i.to_be_bytes().to_vec(), "n".into(), t + Duration::from_secs(5), t);
    }
    assert_eq!(cache.entries.len(), MAX_CACHED);
    cache.insert(b"late".to_vec(), "n".into(), t + Duration::from_secs(5), t);
    assert_eq!(cache.get(b"late", t), None, "full: not remembered");
    // Once entries expire, a new one makes room for itself.
    let later = t + Duration::from_secs(6);
    cache.insert(b"late".to_vec(), "n".into(), later + Duration::from_secs(5), later);
    assert_eq!(cache.get(b"late", later), Some("n"));
    assert_eq!(cache.entries.len(), 1);
}
