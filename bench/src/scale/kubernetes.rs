//! The harness against the Kubernetes source (`weft-scale --source kubernetes`): the same simulated
//! agents and the same changes, with `weft-controller --source kubernetes` reading a real API
//! server (etcd and kube-apiserver 1.20 on loopback, [`weft_test_apiserver`]) that holds the
//! generated cluster as objects only: every pod scheduled (`spec.nodeName`) on one of N node names
//! and given its address through the status subresource, as kubelet would, but no kubelet runs.
//!
//! The agents authenticate as they do in a cluster: each with a token of ServiceAccount
//! `weft-system/weft-node` for audience `weft-controller`, bound to an agent pod on its node
//! (TokenRequest), which the controller checks by TokenReview. A change's time runs from just
//! before its request to the API server to its arrival at an agent.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _, stream};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Namespace, Pod, Service, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use weft_test_apiserver::{ADMIN_TOKEN, ApiServer};

use super::{
    Agents, ChangeReport, ControllerProcess, Launch, Probe, Report, Shape, measure, pod_ip,
    v1_types::{NAMESPACE, POLICY, SERVICE, WORKLOAD},
};

/// The controller's namespace (its Lease, CA Secret and roots; the agents' ServiceAccount).
const SYSTEM: &str = "weft-system";
/// Requests to the API server in flight at once while the cluster is created.
const CONCURRENCY: usize = 32;

/// Runs the harness once against `server` (fresh: the cluster is created in it); `bin_dir` has
/// `weft-controller`; `dir` is scratch (emptied first).
pub async fn run(shape: Shape, bin_dir: &Path, dir: &Path, server: &ApiServer) -> anyhow::Result<Report> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("tokens")).context("scratch dir")?;
    let bin = bin_dir.join("weft-controller");
    let client = admin_client(server).await?;
    let started = Instant::now();
    install_crds(server, &bin)?;
    create_cluster(&client, &shape).await?;
    eprintln!(
        "  cluster created in the API server in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    agent_tokens(&client, shape.nodes, &dir.join("tokens")).await?;
    eprintln!(
        "  {} agent pods and their tokens in {:.1} s",
        shape.nodes,
        started.elapsed().as_secs_f64()
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let state = dir.join("state");
    let launch = Launch {
        args: vec![
            "--source".into(),
            "kubernetes".into(),
            "--namespace".into(),
            SYSTEM.into(),
            "--state-dir".into(),
            state.clone().into(),
        ]
        .into_iter()
        .chain(shape.controller_args())
        .collect(),
        env: vec![
            ("KUBECONFIG".into(), server.kubeconfig.clone().into()),
            ("POD_NAME".into(), "weft-controller-0".into()),
            ("POD_IP".into(), "127.0.0.1".into()),
        ],
        admin_socket: None,
        ready_within: Duration::from_secs(300),
    };
    let started = Instant::now();
    let controller = ControllerProcess::start(&bin, dir, listen, launch)?;
    eprintln!(
        "  controller listed the cluster and serves after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let probe = Probe::new(shape.nodes);
    let agents = Agents::start(&shape, &probe, listen, &state.join("root.pem"), &dir.join("tokens")).await?;

    let changes = changes(&client, &shape);
    let mut reports: Vec<ChangeReport> = Vec::new();
    for change in changes {
        let Change {
            kind,
            key: (ty, name),
            expected,
            request,
        } = change;
        reports.push(measure(&probe, &controller, kind, (ty, &name), &expected, request).await?);
    }
    agents.report(shape, reports, &probe, controller).await
}

async fn admin_client(server: &ApiServer) -> anyhow::Result<Client> {
    // kube's TLS takes the process-wide provider; another may have been installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_for(ADMIN_TOKEN))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Weft's CRDs as the binary prints them, applied and established.
fn install_crds(server: &ApiServer, bin: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin)
        .arg("crds")
        .output()
        .with_context(|| format!("{} crds", bin.display()))?;
    anyhow::ensure!(out.status.success(), "{} crds failed", bin.display());
    server.apply(&String::from_utf8(out.stdout)?);
    server.kubectl(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "authorizationpolicies.security.weft.dev",
            "peerauthentications.security.weft.dev",
        ],
        None,
    );
    Ok(())
}

fn policies(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("security.weft.dev", "v1alpha1", "AuthorizationPolicy");
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies"),
    )
}

fn policy(p: usize, from: &str) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("pol-{p}")},
        "spec": {
            "selector": {"matchLabels": {"app": format!("svc-{p}")}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": [from]}}]}],
        },
    }))?)
}

/// Creates pod `name` on `node` and sets its phase and address (`None`: on the host's network) as
/// kubelet would.
async fn running_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: Value,
    (node, account): (&str, &str),
    ip: Option<Ipv4Addr>,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node, "serviceAccountName": account, "hostNetwork": ip.is_none(),
            "containers": [{"name": "app", "image": "app"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{name}"))?;
    let status = match ip {
        Some(ip) => {
            json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}})
        }
        None => json!({"status": {"phase": "Running"}}),
    };
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("the status of pod {namespace}/{name}"))?;
    Ok(())
}

/// Pod `i` of the shape (as the local harness makes it).
async fn shape_pod(client: &Client, shape: &Shape, i: usize, node: usize) -> anyhow::Result<()> {
    let (ns, app, _) = shape.pod(i);
    running_pod(
        client,
        &format!("ns-{ns}"),
        &format!("pod-{i}"),
        json!({"app": format!("svc-{app}")}),
        (&format!("node-{node}"), &format!("sa-{app}")),
        Some(pod_ip(i)),
    )
    .await
}

/// Runs `requests` with at most [`CONCURRENCY`] in flight; the first error stops it.
async fn bounded<F>(requests: impl Iterator<Item = F>) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    stream::iter(requests)
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The namespaces, services, policies and pods of `shape`.
async fn create_cluster(client: &Client, shape: &Shape) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut all = vec![(SYSTEM.to_owned(), json!({}))];
    all.extend((0..shape.namespaces).map(|ns| (format!("ns-{ns}"), json!({"weft.dev/dataplane-mode": "ambient"}))));
    for (name, annotations) in all {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))?;
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
    }
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "weft-node"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM)
        .create(&PostParams::default(), &account)
        .await
        .context("creating ServiceAccount weft-node")?;
    bounded((0..shape.services).map(|s| async move {
        let ns = format!("ns-{}", shape.namespace_of_service(s));
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{s}")},
            "spec": {"selector": {"app": format!("svc-{s}")}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))?;
        Api::<Service>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &svc)
            .await
            .with_context(|| format!("creating service {ns}/svc-{s}"))?;
        Ok(())
    }))
    .await?;
    bounded((0..shape.policies).map(|p| async move {
        let ns = format!("ns-{}", shape.namespace_of_service(p % shape.services));
        policies(client, &ns)
            .create(&PostParams::default(), &policy(p, "ns-0")?)
            .await
            .with_context(|| format!("creating AuthorizationPolicy {ns}/pol-{p}"))?;
        Ok(())
    }))
    .await?;
    let started = Instant::now();
    bounded((0..shape.pods).map(|i| async move {
        let done = shape_pod(client, shape, i, shape.pod(i).2).await;
        if (i + 1) % 2000 == 0 {
            eprintln!("  {} pods created ({:.1} s)", i + 1, started.elapsed().as_secs_f64());
        }
        done
    }))
    .await
}

/// An agent pod on each node (`weft-node-N` on `node-N`, ServiceAccount weft-node, on the host's
/// network, Running) and its pod-bound token for the controller, in `tokens/node-N`.
async fn agent_tokens(client: &Client, nodes: usize, tokens: &Path) -> anyhow::Result<()> {
    bounded((0..nodes).map(|n| async move {
        let name = format!("weft-node-{n}");
        running_pod(
            client,
            SYSTEM,
            &name,
            json!({"app": "weft-node"}),
            (&format!("node-{n}"), "weft-node"),
            None,
        )
        .await?;
        let pod = Api::<Pod>::namespaced(client.clone(), SYSTEM).get(&name).await?;
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": {
                "audiences": ["weft-controller"],
                "expirationSeconds": 3600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": pod.metadata.uid},
            },
        }))?;
        let token = Api::<ServiceAccount>::namespaced(client.clone(), SYSTEM)
            .create_token_request("weft-node", &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {name}"))?
            .status
            .context("a TokenRequest without a status")?
            .token;
        std::fs::write(tokens.join(format!("node-{n}")), token)?;
        Ok(())
    }))
    .await
}

/// One change: its kind, the resource it changes, the agents that need it, and its request(s).
struct Change<'a> {
    kind: &'static str,
    key: (&'static str, String),
    expected: BTreeSet<usize>,
    request: futures::future::BoxFuture<'a, anyhow::Result<()>>,
}

/// The local harness's changes, as requests to the API server.
fn changes<'a>(client: &'a Client, shape: &'a Shape) -> Vec<Change<'a>> {
    let all: BTreeSet<usize> = (0..shape.nodes).collect();
    let policy_ns = format!("ns-{}", shape.namespace_of_service(3 % shape.services));
    let new_pod = shape.pods + 1;
    let new_ns = format!("ns-{}", shape.pod(new_pod).0);
    let labelled_ns = format!("ns-{}", shape.pod(5).0);
    let svc = 7 % shape.services;
    let svc_ns = format!("ns-{}", shape.namespace_of_service(svc));
    vec![
        Change {
            kind: "policy",
            key: (POLICY, format!("{policy_ns}/pol-3")),
            expected: shape.nodes_of_namespace(shape.namespace_of_service(3 % shape.services)),
            request: merge_patch(
                policies(client, &policy_ns),
                "pol-3",
                json!({"spec": {"rules": [{"from": [{"source": {"namespaces": ["ns-1"]}}]}]}}),
            ),
        },
        Change {
            kind: "pod-add",
            key: (WORKLOAD, format!("{new_ns}/pod-{new_pod}")),
            expected: all.clone(),
            request: Box::pin(shape_pod(client, shape, new_pod, 0)),
        },
        Change {
            kind: "pod-label",
            key: (WORKLOAD, format!("{labelled_ns}/pod-5")),
            expected: all.clone(),
            request: merge_patch(
                Api::<Pod>::namespaced(client.clone(), &labelled_ns),
                "pod-5",
                json!({"metadata": {"labels": {"version": "v2"}}}),
            ),
        },
        Change {
            kind: "pod-delete",
            key: (WORKLOAD, format!("{new_ns}/pod-{new_pod}")),
            expected: all.clone(),
            request: Box::pin(async move {
                // No kubelet confirms a graceful deletion here: the pod goes at once.
                Api::<Pod>::namespaced(client.clone(), &new_ns)
                    .delete(&format!("pod-{new_pod}"), &DeleteParams::default().grace_period(0))
                    .await?;
                Ok(())
            }),
        },
        Change {
            kind: "service",
            key: (SERVICE, format!("{svc_ns}/svc-{svc}")),
            expected: all.clone(),
            request: merge_patch(
                Api::<Service>::namespaced(client.clone(), &svc_ns),
                &format!("svc-{svc}"),
                json!({"spec": {"ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "alt", "port": 81, "targetPort": 8081},
                ]}}),
            ),
        },
        Change {
            kind: "namespace",
            key: (NAMESPACE, "ns-0".to_owned()),
            expected: all.clone(),
            request: merge_patch(
                Api::<Namespace>::all(client.clone()),
                "ns-0",
                json!({"metadata": {"labels": {"tier": "gold"}}}),
            ),
        },
        Change {
            kind: "root-policy",
            key: (POLICY, format!("{SYSTEM}/pol-0")),
            expected: all,
            request: Box::pin(async move {
                policies(client, SYSTEM)
                    .create(&PostParams::default(), &policy(0, "ns-2")?)
                    .await?;
                Ok(())
            }),
        },
    ]
}

/// A change's request: a merge patch of object `name` through `api`.
fn merge_patch<'a, K>(api: Api<K>, name: &str, patch: Value) -> futures::future::BoxFuture<'a, anyhow::Result<()>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let name = name.to_owned();
    Box::pin(async move {
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await?;
        Ok(())
    })
}
