//! What one `weftctl apply` costs the local store at a scale, without the gRPC hop or any agent:
//! a store in a temporary directory is filled with the weft-scale cluster shape (10 namespaces, 100
//! services, 100 policies, N pods on 100 nodes, applied in batches of 2,000 objects), then a one-pod
//! label change, a pod add and a pod delete are timed, and the store is reopened.
//!
//! `cargo run --release -p weft-controller --example store_apply -- 10000 100000`

use std::{net::Ipv4Addr, time::Instant};

use anyhow::Context as _;
use weft_controller::store::Store;

const NAMESPACES: usize = 10;
const SERVICES: usize = 100;
const POLICIES: usize = 100;
const NODES: usize = 100;
/// Label changes timed per scale.
const ROUNDS: usize = 20;

fn main() -> anyhow::Result<()> {
    let scales: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().with_context(|| format!("{a:?}: a number of pods")))
        .collect::<Result<_, _>>()?;
    let scales = if scales.is_empty() { vec![10_000] } else { scales };
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    for pods in scales {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let t = Instant::now();
        for batch in cluster(pods).chunks(2000) {
            store.apply(&batch.concat(), "cluster.yaml")?;
        }
        let fill_s = t.elapsed().as_secs_f64();

        let mut label_ms = Vec::new();
        for round in 0..ROUNDS {
            let yaml = pod_yaml(5, &format!(", version: v{round}"));
            let t = Instant::now();
            let out = store.apply(&yaml, "label.yaml")?;
            label_ms.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(out.results == ["pod ns-5/pod-5 configured"], "{:?}", out.results);
        }
        label_ms.sort_by(f64::total_cmp);

        let t = Instant::now();
        store.apply(&pod_yaml(pods + 1, ""), "add.yaml")?;
        let add_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        store.delete(&pod_yaml(pods + 1, ""), "delete.yaml", false)?;
        let delete_ms = t.elapsed().as_secs_f64() * 1e3;

        let files: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| {
                let e = e?;
                Ok(format!(
                    "{} {} KiB",
                    e.file_name().to_string_lossy(),
                    e.metadata()?.len() / 1024
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let revision = store.snapshot().revision;
        drop(store);
        let t = Instant::now();
        let reopened = Store::open(dir.path())?;
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(reopened.snapshot().revision == revision, "reopened at another revision");

        println!(
            "{profile}, {pods} pods: filled in {fill_s:.1} s; label change p50 {:.1} ms, max {:.1} ms ({ROUNDS} rounds); pod add {add_ms:.1} ms, pod delete {delete_ms:.1} ms; reopen {open_ms:.0} ms; files: {}",
            label_ms[ROUNDS / 2],
            label_ms[ROUNDS - 1],
            files.join(", ")
        );
    }
    Ok(())
}

/// The cluster as YAML documents, namespaces first (the weft-scale shape: pod `i` is selected by
/// service `i % 100`, in that service's namespace).
fn cluster(pods: usize) -> Vec<String> {
    let mut docs = Vec::new();
    for ns in 0..NAMESPACES {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, annotations: {{weft.dev/dataplane-mode: ambient}}}}\n---\n"
        ));
    }
    for s in 0..SERVICES {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{}}}\nspec: {{selector: {{app: svc-{s}}}, clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n",
            s % NAMESPACES,
            s / 256,
            s % 256
        ));
    }
    docs.extend((0..pods).map(|i| pod_yaml(i, "")));
    for p in 0..POLICIES {
        docs.push(format!(
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{p}, namespace: ns-{}}}\nspec: {{selector: {{matchLabels: {{app: svc-{p}}}}}, action: ALLOW, rules: [{{from: [{{source: {{namespaces: [ns-0]}}}}]}}]}}\n---\n",
            p % NAMESPACES
        ));
    }
    docs
}

fn pod_yaml(i: usize, extra_label: &str) -> String {
    let app = i % SERVICES;
    let ip = Ipv4Addr::from((10u32 << 24) + (1 << 16) + u32::try_from(i).unwrap_or(u32::MAX));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, uid: 0b5e1c2a-7d3f-4a61-9c8e-{i:012}, labels: {{app: svc-{app}{extra_label}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{app}}}\nstatus: {{podIP: {ip}}}\n---\n",
        app % NAMESPACES,
        i % NODES
    )
}
