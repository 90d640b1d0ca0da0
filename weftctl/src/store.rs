//! `weftctl apply | delete | get`: the controller's local store, through its admin unix socket.
//!
//! [`apply`] and [`delete`] are also the API `weftctl dev` uses to feed a dev cluster's controller.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use serde::Deserialize as _;
use tonic::transport::{Channel, Endpoint};
use weft_api::v1::{ApplyRequest, DeleteRequest, GetRequest, store_client::StoreClient};

/// The dev cluster `weftctl dev` creates when none is named.
pub const DEFAULT_CLUSTER: &str = "weft";

/// Where a dev cluster's controller serves its admin socket.
pub fn cluster_socket(cluster: &str) -> PathBuf {
    PathBuf::from(format!("/run/weft/dev/{cluster}/controller.sock"))
}

/// Which controller to talk to.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The controller's admin socket [default: $WEFT_CONTROLLER_SOCKET, else the dev cluster "weft"'s].
    #[arg(long, conflicts_with = "cluster")]
    socket: Option<PathBuf>,
    /// Talk to the controller of this dev cluster (/run/weft/dev/NAME/controller.sock).
    #[arg(long)]
    cluster: Option<String>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        if let Some(cluster) = &self.cluster {
            return cluster_socket(cluster);
        }
        self.socket
            .clone()
            .or_else(|| std::env::var_os("WEFT_CONTROLLER_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| cluster_socket(DEFAULT_CLUSTER))
    }
}

/// `weftctl apply -f FILE|-`
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// YAML file with one or more objects ("-": standard input). Applied all or nothing.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: String,
    #[command(flatten)]
    target: Target,
}

/// `weftctl delete -f FILE|- [--ignore-not-found]`
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// YAML file naming the objects to delete ("-": standard input). Deleted all or nothing.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: String,
    /// Objects that do not exist are not an error.
    #[arg(long)]
    ignore_not_found: bool,
    #[command(flatten)]
    target: Target,
}

/// `weftctl get [KIND] [-n NAMESPACE]`
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Pod, Service, ServiceAccount, Namespace, AuthorizationPolicy, PeerAuthentication (or pods, svc, ns,
    /// pa, ...); all when left out.
    kind: Option<String>,
    /// Only the object of this name (with KIND; in every namespace unless -n says which).
    #[arg(requires = "kind")]
    name: Option<String>,
    /// Only this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[command(flatten)]
    target: Target,
}

pub fn run_apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let (yaml, source) = read_input(&args.file)?;
    print_lines(apply(&args.target.socket(), &yaml, &source)?)
}

pub fn run_delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let (yaml, source) = read_input(&args.file)?;
    print_lines(delete(&args.target.socket(), &yaml, &source, args.ignore_not_found)?)
}

pub fn run_get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let kind = args.kind.as_deref().unwrap_or("");
    let yaml = get(&args.target.socket(), kind, args.namespace.as_deref().unwrap_or(""))?;
    match &args.name {
        None => print!("{yaml}"),
        Some(name) => match named(&yaml, name)? {
            Some(found) => print!("{found}"),
            None => {
                let scope = args
                    .namespace
                    .as_deref()
                    .map(|n| format!(" in namespace {n:?}"))
                    .unwrap_or_default();
                anyhow::bail!("{kind} {name:?} not found{scope}");
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// The documents of `yaml` whose `metadata.name` is `name`, as YAML; `None` if there is none.
fn named(yaml: &str, name: &str) -> anyhow::Result<Option<String>> {
    let mut found = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(doc).context("the store's answer is not YAML")?;
        if value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            == Some(name)
        {
            found.push(serde_yaml_ng::to_string(&value)?);
        }
    }
    Ok((!found.is_empty()).then(|| found.join("---\n")))
}

/// Applies every object in `yaml` (all or nothing); `source` names it in error messages. Returns
/// one line per object (`pod default/web created`). Blocking: runs its own current-thread runtime,
/// so it must not be called from inside an async runtime. An error carries the controller's message
/// (`deploy.yaml: document 2: Pod default/web: spec.nodeName: required`).
pub fn apply(socket: &Path, yaml: &str, source: &str) -> anyhow::Result<Vec<String>> {
    let request = ApplyRequest {
        yaml: yaml.to_owned(),
        source: source.to_owned(),
    };
    block_on(socket, |mut client| async move {
        client.apply(request).await.map(|r| r.into_inner().results)
    })
}

/// Deletes every object named in `yaml` (all or nothing; a Namespace takes what is in it along).
/// Missing objects are an error unless `ignore_not_found`. Blocking, like [`apply`].
pub fn delete(socket: &Path, yaml: &str, source: &str, ignore_not_found: bool) -> anyhow::Result<Vec<String>> {
    let request = DeleteRequest {
        yaml: yaml.to_owned(),
        source: source.to_owned(),
        ignore_not_found,
    };
    block_on(socket, |mut client| async move {
        client.delete(request).await.map(|r| r.into_inner().results)
    })
}

/// The store's objects as YAML; empty `kind` / `namespace` mean all. Blocking, like [`apply`].
pub fn get(socket: &Path, kind: &str, namespace: &str) -> anyhow::Result<String> {
    let request = GetRequest {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
    };
    block_on(socket, |mut client| async move {
        client.get(request).await.map(|r| r.into_inner().yaml)
    })
}

fn block_on<T, F>(socket: &Path, call: impl FnOnce(StoreClient<Channel>) -> F) -> anyhow::Result<T>
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    rt.block_on(async {
        let client = connect(socket).await?;
        // The server's message says it all (file, document, object, field).
        call(client)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
    })
}

async fn connect(socket: &Path) -> anyhow::Result<StoreClient<Channel>> {
    let not_running = || {
        format!(
            "the controller is not running at {} (pass --socket or --cluster, or set WEFT_CONTROLLER_SOCKET)",
            socket.display()
        )
    };
    if !socket.exists() {
        anyhow::bail!("{}", not_running());
    }
    let endpoint = Endpoint::from_shared(format!("unix:{}", socket.display()))
        .with_context(|| format!("bad socket path {}", socket.display()))?;
    let channel = endpoint.connect().await.with_context(not_running)?;
    Ok(StoreClient::new(channel))
}

/// Reads FILE, or standard input for "-"; returns the text and the name to report it by.
fn read_input(file: &str) -> anyhow::Result<(String, String)> {
    if file == "-" {
        let mut yaml = String::new();
        std::io::stdin()
            .read_to_string(&mut yaml)
            .context("cannot read standard input")?;
        Ok((yaml, "-".to_owned()))
    } else {
        let yaml = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        Ok((yaml, file.to_owned()))
    }
}

fn print_lines(lines: Vec<String>) -> anyhow::Result<ExitCode> {
    for line in lines {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_by_name_from_the_stores_answer() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2\n  namespace: shop\n";
        let one = super::named(yaml, "web-2").unwrap().unwrap();
        assert!(one.contains("name: web-2") && !one.contains("web-1"), "{one}");
        assert_eq!(super::named(yaml, "web-3").unwrap(), None);
        assert_eq!(super::named("", "web-1").unwrap(), None);
    }

    #[test]
    fn missing_socket_says_the_controller_is_not_running() {
        let dir = std::env::temp_dir().join("weftctl-no-such-dir/controller.sock");
        let err = apply(&dir, "", "-").unwrap_err().to_string();
        assert!(err.contains("the controller is not running at"), "{err}");
        assert!(err.contains("weftctl-no-such-dir/controller.sock"), "{err}");
    }

    #[test]
    fn cluster_names_its_socket() {
        let t = Target {
            socket: None,
            cluster: Some("demo".into()),
        };
        assert_eq!(t.socket(), Path::new("/run/weft/dev/demo/controller.sock"));
        let t = Target {
            socket: Some("/tmp/x.sock".into()),
            cluster: None,
        };
        assert_eq!(t.socket(), Path::new("/tmp/x.sock"));
    }
}
