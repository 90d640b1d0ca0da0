//! What the state costs: the lookups of a connection allocate nothing, and a workload held costs a
//! few hundred bytes. Counted by this crate's test allocator ([`super::counting`]), per thread.

use weft_api::v1::{self, MtlsMode};
use weft_model::peer_auth::Requirement;

use super::{counting, fixtures::*, *};

/// Runs `f`, and counts what it allocated.
fn allocations_of<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = counting::allocations();
    let r = f();
    (r, counting::allocations() - before)
}

/// shop (meshed): web-1 and web-2 behind shop/web (dual stack, web-2 only with an IPv6 address);
/// an ALLOW policy for authenticated peers, an AUDIT one on 8080, STRICT mTLS but on 9090.
/// legacy: a pod outside the mesh.
fn mesh() -> State {
    let authenticated = v1::PolicySource {
        principals: vec!["*".into()],
        ..v1::PolicySource::default()
    };
    let allow_authenticated = policy(
        "shop",
        "authenticated",
        v1::Action::Allow,
        v1::Scope::Namespace,
        from_source(authenticated),
    );
    let audit_8080 = audit_port("shop", "audit-8080", 8080);
    let strict = peer_auth(
        "shop",
        "strict",
        v1::Scope::Namespace,
        Some(("app", "web")),
        MtlsMode::MtlsStrict,
        &[(9090, MtlsMode::MtlsPermissive)],
    );
    let web_2 = with_ips(
        pod("shop", "web-2", "10.244.2.11", &[("app", "web")]),
        &["10.244.2.11", "fd00::2:11"],
    );
    // Later in a push, the same key replaces: web-2 and shop/web dual stack.
    let mut resources = shop_and_legacy();
    resources.extend([
        member_of(web_2, &["shop/web"]),
        with_vips(service("shop", "web", "10.96.0.10"), &["10.96.0.10", "fd00:96::10"]),
        allow_authenticated,
        audit_8080,
        strict,
    ]);
    state_of(resources)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn the_plan_of_a_connection_allocates_nothing() {
    let state = mesh();
    type Expected = fn(&Plan) -> bool;
    let cases: [(&str, Expected); 6] = [
        ("10.244.2.11:8080", |p| matches!(p, Plan::Hbone { .. })),
        ("10.244.1.12:5432", |p| {
            matches!(p, Plan::Passthrough { workload: Some(_), .. })
        }),
        ("192.0.2.1:443", |p| {
            matches!(p, Plan::Passthrough { workload: None, .. })
        }),
        ("10.96.0.11:80", |p| matches!(p, Plan::NoEndpoint { .. })),
        ("10.96.0.10:81", |p| matches!(p, Plan::NoEndpoint { .. })),
        ("[fd00::2:11]:8080", |p| matches!(p, Plan::Hbone { .. })),
    ];
    for (dst, expected) in cases {
        let (plan, allocated) = allocations_of(|| state.plan(addr(dst), 0));
        assert!(expected(&plan), "{dst}: {plan:?}");
        assert_eq!(allocated, 0, "{dst}: {plan:?}");
    }
    // Through a service, round robin, on either family.
    for pick in 0..4 {
        let (plan, allocated) = allocations_of(|| state.plan(addr("10.96.0.10:80"), pick));
        assert!(matches!(plan, Plan::Hbone { .. }), "{plan:?}");
        assert_eq!(allocated, 0, "{plan:?}");
    }
    let (plan, allocated) = allocations_of(|| state.plan(addr("[fd00:96::10]:80"), 1));
    assert_eq!(
        plan.clone(),
        state.plan(addr("[fd00:96::10]:80"), 0),
        "one IPv6 endpoint"
    );
    assert!(
        matches!(&plan, Plan::Hbone { target, .. } if *target == addr("[fd00::2:11]:8080")),
        "{plan:?}"
    );
    assert_eq!(allocated, 0);
}

#[test]
fn finding_a_peer_and_deciding_a_connection_allocate_nothing() {
    let state = mesh();
    let (w, allocated) = allocations_of(|| state.workload_by_ip("10.244.1.11".parse().unwrap()).cloned());
    assert_eq!(w.map(|w| w.key().clone()).as_deref(), Some("shop/web-1"));
    assert_eq!(allocated, 0);
    let (w, allocated) = allocations_of(|| state.workload_by_ip("192.0.2.1".parse().unwrap()).is_some());
    assert!(!w);
    assert_eq!(allocated, 0);

    let uid = uid("web-2");
    let conn = |principal, port| policy::Connection {
        source_principal: principal,
        source_ip: "10.244.1.11".parse().unwrap(),
        destination_ip: "10.244.2.11".parse().unwrap(),
        destination_port: port,
    };
    let mtls = Some("spiffe://cluster.local/ns/shop/sa/default");
    // A denial naming its DENY policy allocates the name (the model's `Decision` holds a String):
    // the connection is refused then, and its record written.
    let decisions = [
        ("shop/web-2", mtls, 9090, policy::Decision::ALLOW),
        ("shop/web-2", None, 9090, policy::Decision::Deny { policy: None }),
        ("shop/gone", mtls, 9090, policy::Decision::Deny { policy: None }),
        (
            "shop/web-2",
            mtls,
            8080,
            policy::Decision::Allow {
                audit: Some("shop/audit-8080".into()),
            },
        ),
    ];
    for (key, principal, port, expected) in decisions {
        let conn = conn(principal, port);
        let (decision, allocated) = allocations_of(|| authorize(&state, key, &uid, &conn));
        assert_eq!(decision, expected, "{key} {principal:?} {port}");
        assert_eq!(allocated, 0, "{key} {principal:?} {port}");
    }
    for (port, strict) in [(8080, true), (9090, false)] {
        let (requirement, allocated) = allocations_of(|| mtls_requirement(&state, "shop/web-2", &uid, port));
        assert_eq!(requirement.is_strict(), strict, "{port}: {requirement:?}");
        assert_eq!(allocated, 0, "{port}");
    }
    let (requirement, allocated) = allocations_of(|| mtls_requirement(&state, "shop/web-2", "not-a-uid", 8080));
    assert_eq!(requirement, Requirement::Permissive);
    assert_eq!(allocated, 0);
}

/// `n` workloads as the pods of ReplicaSets of 10 (one template and one service each) over 20
/// namespaces and 100 nodes: the bench's shape (`weft-agent-state`), smaller.
fn replica_sets(n: usize) -> Vec<v1::Resource> {
    let sets = n / 10;
    let services = (0..sets).map(|s| service(&format!("ns-{}", s % 20), &format!("svc-{s}"), &vip(s)));
    let pods = (0..n).map(|i| {
        let s = i % sets;
        let ns = format!("ns-{}", s % 20);
        let mut p = member_of(
            pod(&ns, &format!("pod-{i}"), &pod_ip(i), &[("app", &format!("svc-{s}"))]),
            &[&format!("{ns}/svc-{s}")],
        );
        if let Some(v1::resource::Kind::Workload(w)) = &mut p.kind {
            w.uid = format!("0b5e1c2a-7d3f-4a61-9c8e-{i:012}");
            w.node = format!("node-{}", i % 100);
            w.service_account = format!("sa-{s}");
            w.identity = format!("spiffe://cluster.local/ns/{ns}/sa/sa-{s}");
        }
        p
    });
    services.chain(pods).collect()
}

fn vip(s: usize) -> String {
    format!("10.96.{}.{}", s / 256, s % 256)
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)
}

#[test]
fn a_held_workload_costs_a_few_hundred_bytes() {
    let n = 5_000;
    let resources = replica_sets(n);
    let (allocations, bytes) = counting::live();
    let empty = Arc::new(State::default());
    let first = v1::Push {
        more: true,
        ..push(true, vec![], &[])
    };
    let mut staged = empty.stage(&first);
    for chunk in resources.chunks(300) {
        staged.take(&v1::Push {
            more: true,
            ..push(true, chunk.to_vec(), &[])
        });
    }
    let (state, rejected) = staged.finish();
    assert!(rejected.is_empty(), "{rejected:?}");
    drop(empty);
    let (after_allocations, after_bytes) = counting::live();
    let per_workload = (after_bytes - bytes) as f64 / n as f64;
    let allocations_per_workload = (after_allocations - allocations) as f64 / n as f64;
    // Measured: 340 bytes in 3.7 allocations (each pod its own copies: 1,670 in 17.4).
    assert!(per_workload < 400.0, "{per_workload:.0} bytes per workload");
    assert!(
        allocations_per_workload < 4.0,
        "{allocations_per_workload:.1} allocations per workload"
    );
    assert_eq!(state.sizes(), (n, n / 10));
}
