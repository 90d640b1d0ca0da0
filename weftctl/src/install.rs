//! `weftctl install | uninstall | check`: Weft on a Kubernetes cluster.
//!
//! Install renders the manifests ([`render`]) and applies them with server-side apply (field
//! manager `weftctl`), then waits until the controller Deployment and the node-agent DaemonSet are
//! ready. `--dry-run` prints them instead, or with `--output-dir` writes the kustomize base that
//! `deploy/` holds. Uninstall removes the node agents first (each one, seeing its DaemonSet gone,
//! releases its node's pods, removes its eBPF pins and its CNI entry), then everything else.

pub mod check;
pub mod render;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
};
use serde_json::Value;

pub use render::Options;

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Print the manifests (or write them to --output-dir) instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: write the kustomize base (one file per part, kustomization.yaml) here.
    #[arg(long, requires = "dry_run")]
    output_dir: Option<PathBuf>,
    /// Namespace of the controller and the node agents.
    #[arg(long, default_value = "weft-system")]
    namespace: String,
    /// Registry (and path) of Weft's images: `<registry>/weft-node:<tag>`, `<registry>/weft-controller:<tag>`.
    #[arg(long, default_value = "weft.dev")]
    registry: String,
    /// Image tag.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    #[arg(long, default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// Controller replicas (one leads: status and CA root; all serve the agents).
    #[arg(long, default_value_t = 2)]
    controller_replicas: u32,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The nodes' CNI configuration directory (where the container runtime reads it).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: String,
    /// The nodes' CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: String,
    /// How long to wait for the controller and every node's agent to be ready (0: do not wait).
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = "weft-system")]
    namespace: String,
    /// How long to wait for everything to be gone.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

impl InstallArgs {
    fn options(&self) -> anyhow::Result<Options> {
        if !weft_model::is_dns_label(&self.namespace) {
            bail!("--namespace {:?} is not a valid namespace name", self.namespace);
        }
        if self.controller_replicas == 0 {
            bail!("--controller-replicas must be at least 1");
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            bail!(
                "--image-pull-policy {:?}: one of Always, IfNotPresent, Never",
                self.image_pull_policy
            );
        }
        Ok(Options {
            namespace: self.namespace.clone(),
            registry: self.registry.trim_end_matches('/').to_owned(),
            tag: self.tag.clone(),
            pull_policy: self.image_pull_policy.clone(),
            controller_replicas: self.controller_replicas,
            trust_domain: self.trust_domain.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            cni_bin_dir: self.cni_bin_dir.clone(),
        })
    }
}

/// The CRDs, as the controller generates them from its types.
fn crds() -> anyhow::Result<Vec<Value>> {
    weft_controller::k8s::crd::crds()
        .into_iter()
        .map(|c| serde_json::to_value(c).context("rendering a CRD"))
        .collect()
}

/// The files of the kustomize base for `o`: name and content.
pub fn base(o: &Options) -> anyhow::Result<Vec<(String, String)>> {
    let files = render::render(o, crds()?);
    let mut out = Vec::new();
    for f in &files {
        let content = if f.name == "crds.yaml" {
            // The file `cargo xtask crds` keeps, byte for byte.
            weft_controller::k8s::crd::crds_yaml()?
        } else {
            render::yaml(&f.objects)?
        };
        out.push((f.name.to_owned(), content));
    }
    out.push((
        "kustomization.yaml".into(),
        serde_yaml_ng::to_string(&render::kustomization(&files))?,
    ));
    Ok(out)
}

pub fn run_install(args: InstallArgs) -> anyhow::Result<std::process::ExitCode> {
    let o = args.options()?;
    if args.dry_run {
        match &args.output_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                for (name, content) in base(&o)? {
                    let path = dir.join(&name);
                    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
            }
            None => {
                for f in render::render(&o, crds()?) {
                    print!("{}", render::yaml(&f.objects)?);
                }
            }
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    runtime()?.block_on(install(&o, args.wait))?;
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<std::process::ExitCode> {
    if !weft_model::is_dns_label(&args.namespace) {
        bail!("--namespace {:?} is not a valid namespace name", args.namespace);
    }
    runtime()?.block_on(uninstall(&args.namespace, args.wait))?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn client() -> anyhow::Result<Client> {
    weft_controller::k8s::client()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster configuration)")
}

/// The API resource of an object this install renders (a fixed set: no discovery needed).
fn resource(obj: &Value) -> anyhow::Result<(ApiResource, bool)> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "Service" => ("services", true),
        "Deployment" => ("deployments", true),
        "DaemonSet" => ("daemonsets", true),
        other => bail!("weftctl does not know how to apply a {other}"),
    };
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Ok((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

fn api_for(client: &Client, obj: &Value) -> anyhow::Result<Api<DynamicObject>> {
    let (ar, namespaced) = resource(obj)?;
    Ok(if namespaced {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

async fn install(o: &Options, wait: Duration) -> anyhow::Result<()> {
    let client = client().await?;
    let params = PatchParams::apply("weftctl").force();
    for file in render::render(o, crds()?) {
        for obj in &file.objects {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let kind = obj["kind"].as_str().unwrap_or_default();
            api_for(&client, obj)?
                .patch(name, &params, &Patch::Apply(obj))
                .await
                .with_context(|| format!("applying {kind} {name}"))?;
            println!("{} {name} applied", kind.to_lowercase());
        }
    }
    if wait.is_zero() {
        return Ok(());
    }
    let deadline = Instant::now() + wait;
    let ns = &o.namespace;
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("apps", "v1", "Deployment"), "deployments"),
    );
    let daemonsets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("apps", "v1", "DaemonSet"), "daemonsets"),
    );
    println!("waiting up to {wait:?} for the controller and every node's agent to be ready");
    loop {
        let d = deployments.get(render::CONTROLLER).await?;
        let ds = daemonsets.get(render::NODE).await?;
        let ready = d.data["status"]["readyReplicas"].as_u64().unwrap_or(0);
        let desired_nodes = ds.data["status"]["desiredNumberScheduled"].as_u64().unwrap_or(0);
        let ready_nodes = ds.data["status"]["numberReady"].as_u64().unwrap_or(0);
        let updated_nodes = ds.data["status"]["updatedNumberScheduled"].as_u64().unwrap_or(0);
        if ready >= u64::from(o.controller_replicas)
            && desired_nodes > 0
            && ready_nodes == desired_nodes
            && updated_nodes == desired_nodes
        {
            println!(
                "ready: controller {ready}/{} replicas, node agents {ready_nodes}/{desired_nodes} nodes",
                o.controller_replicas
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not ready after {wait:?}: controller {ready}/{} replicas, node agents {ready_nodes}/{desired_nodes} nodes (kubectl -n {ns} get pods; kubectl -n {ns} logs ...)",
                o.controller_replicas
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn uninstall(ns: &str, wait: Duration) -> anyhow::Result<()> {
    let client = client().await?;
    let deadline = Instant::now() + wait;
    let o = Options {
        namespace: ns.to_owned(),
        ..Options::default()
    };
    let rendered = render::render(&o, crds()?);
    let objects: Vec<&Value> = rendered.iter().flat_map(|f| f.objects.iter()).collect();
    let delete = |obj: &Value| {
        let client = client.clone();
        let obj = obj.clone();
        async move {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
            match api_for(&client, &obj)?.delete(&name, &DeleteParams::background()).await {
                Ok(_) => println!("{} {name} deleted", kind.to_lowercase()),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("deleting {kind} {name}"))),
            }
            anyhow::Ok(())
        }
    };
    // 1. The node agents, while their permissions and the controller still exist: each one sees
    //    its DaemonSet gone and cleans its node up before it exits.
    for obj in objects.iter().filter(|o| o["kind"] == "DaemonSet") {
        delete(obj).await?;
    }
    let pods: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods"),
    );
    let agents = ListParams::default().labels(&format!("app.kubernetes.io/name={}", render::NODE));
    loop {
        match pods.list(&agents).await {
            Ok(list) if list.items.is_empty() => break,
            Err(kube::Error::Api(e)) if e.code == 404 => break,
            Ok(list) => {
                if Instant::now() > deadline {
                    bail!("{} node agent pods still terminating after {wait:?}", list.items.len());
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("node agents gone (each released its node)");
    // 2. Everything else, in reverse order of install; the namespace last (it takes the CA Secret,
    //    the root ConfigMap and the Lease the controller made with it).
    for obj in objects.iter().rev().filter(|o| o["kind"] != "DaemonSet") {
        delete(obj).await?;
    }
    let namespaces: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Namespace"), "namespaces"),
    );
    loop {
        match namespaces.get_opt(ns).await? {
            None => break,
            Some(_) if Instant::now() > deadline => bail!("namespace {ns} still terminating after {wait:?}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    println!("weft uninstalled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/ is the default rendering: `kubectl apply -k deploy/` installs what `weftctl install` does.
    #[test]
    fn deploy_holds_the_default_rendering() {
        let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for (name, content) in base(&Options::default()).unwrap() {
            let on_disk = std::fs::read_to_string(deploy.join(&name)).unwrap_or_default();
            assert!(
                on_disk == content,
                "deploy/{name} differs from `weftctl install --dry-run`: run `cargo xtask manifests`"
            );
        }
    }

    #[test]
    fn every_rendered_object_is_one_weftctl_can_apply_and_carries_the_install_label() {
        for f in render::render(&Options::default(), crds().unwrap()) {
            for obj in &f.objects {
                resource(obj).unwrap();
                if obj["kind"] == "CustomResourceDefinition" {
                    // As the controller generates them (deploy/crds.yaml); uninstall finds them by name.
                    continue;
                }
                assert_eq!(
                    obj["metadata"]["labels"][render::PART_OF.0],
                    render::PART_OF.1,
                    "{} {}",
                    obj["kind"],
                    obj["metadata"]["name"]
                );
            }
        }
    }

    #[test]
    fn options_are_checked_before_anything_is_rendered() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: InstallArgs,
        }
        let parse = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(a.iter().copied()))
                .unwrap()
                .args
        };
        assert!(
            parse(&["--namespace", "Bad_NS"])
                .options()
                .unwrap_err()
                .to_string()
                .contains("--namespace")
        );
        assert!(parse(&["--controller-replicas", "0"]).options().is_err());
        assert!(parse(&["--image-pull-policy", "Sometimes"]).options().is_err());
        let o = parse(&["--registry", "registry.example/weft/", "--tag", "1.2.3"])
            .options()
            .unwrap();
        let files = render::render(&o, Vec::new());
        let ds = &files.iter().find(|f| f.name == "node.yaml").unwrap().objects[0];
        assert_eq!(
            ds["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/weft/weft-node:1.2.3"
        );
    }
}
