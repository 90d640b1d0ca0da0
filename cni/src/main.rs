//! `weft-cni`: a chained CNI plugin (CNI spec 1.0 calling convention). It runs after the primary
//! plugin, reports the pod and its network namespace to the node agent over a unix socket, and passes
//! the previous result through. If the agent cannot take the pod, pod creation fails (CNI error 11,
//! "try again later") rather than a pod starting outside the mesh it was meant to be in.
//!
//! Network configuration (stdin): `{"cniVersion", "name", "type": "weft-cni", "agentSocket"?,
//! "prevResult"}`; environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`), `CNI_PATH`.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use weft_model::cni::{PodEvent, PodNetwork, Reply};

const DEFAULT_SOCKET: &str = "/run/weft/cni.sock";
const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec 1.0, "Error").
const ERR_INCOMPATIBLE_VERSION: u32 = 1;
const ERR_INVALID_ENV: u32 = 4;
const ERR_INVALID_CONFIG: u32 = 7;
const ERR_TRY_AGAIN_LATER: u32 = 11;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    prev_result: Option<Value>,
}

struct Failure {
    code: u32,
    msg: String,
}

fn fail(code: u32, msg: impl Into<String>) -> Failure {
    Failure { code, msg: msg.into() }
}

mod install;

fn main() -> ExitCode {
    // Not called by a runtime: the DaemonSet installs or removes the plugin on its node.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(verb @ ("install" | "uninstall")) = argv.first().map(String::as_str) {
        let result = install::parse(&argv[1..]).and_then(|o| {
            if verb == "install" {
                install::install(&o)
            } else {
                install::uninstall(&o)
            }
        });
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-cni {verb}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".into());
    let mut out = std::io::stdout().lock();
    match run(&stdin) {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failure { code, msg }) => {
            let _ = writeln!(out, "{}", json!({ "cniVersion": version, "code": code, "msg": msg }));
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| fail(ERR_INVALID_ENV, format!("{name} is not set")))
}

fn run(stdin: &str) -> Result<Option<Value>, Failure> {
    let command = env("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED })));
    }
    let conf: NetConf =
        serde_json::from_str(stdin).map_err(|e| fail(ERR_INVALID_CONFIG, format!("network configuration: {e}")))?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(fail(
            ERR_INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let args = parse_args(&std::env::var("CNI_ARGS").unwrap_or_default());
    let uid = args
        .get("K8S_POD_UID")
        .cloned()
        .map_or_else(|| env("CNI_CONTAINERID"), Ok)?;
    match command.as_str() {
        "ADD" => {
            let prev = conf.prev_result.ok_or_else(|| {
                fail(
                    ERR_INVALID_CONFIG,
                    "weft-cni is a chained plugin: it needs a prevResult from the primary plugin",
                )
            })?;
            let network = PodNetwork {
                uid,
                namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
                name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
                netns: PathBuf::from(env("CNI_NETNS")?),
                ips: prev_ips(&prev),
            };
            send(&socket, &PodEvent::Add(network))?;
            Ok(Some(prev))
        }
        "DEL" => {
            // DEL must succeed when the agent is gone: it forgets the pod at its next start anyway.
            let _ = send(&socket, &PodEvent::Delete { uid });
            Ok(None)
        }
        "CHECK" | "GC" | "STATUS" => Ok(None),
        other => Err(fail(ERR_INVALID_ENV, format!("CNI_COMMAND {other} is not supported"))),
    }
}

/// `K=V;K=V` as in `CNI_ARGS`.
fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Addresses of a CNI result's `ips[].address` (`ADDR/PREFIX`).
fn prev_ips(prev: &Value) -> Vec<IpAddr> {
    prev["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .filter_map(|a| a.split('/').next())
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn send(socket: &PathBuf, event: &PodEvent) -> Result<(), Failure> {
    let unreachable = |e: std::io::Error| {
        fail(
            ERR_TRY_AGAIN_LATER,
            format!("the Weft node agent at {} is not reachable: {e}", socket.display()),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    let line = serde_json::to_string(event).map_err(|e| fail(ERR_INVALID_CONFIG, e.to_string()))?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(unreachable)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
        fail(
            ERR_TRY_AGAIN_LATER,
            format!("the node agent answered something unexpected: {e}"),
        )
    })?;
    if reply.ok {
        Ok(())
    } else {
        Err(fail(
            ERR_TRY_AGAIN_LATER,
            reply.error.unwrap_or_else(|| "the node agent refused the pod".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pod_identity_and_addresses_the_cni_way() {
        let args = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=abc");
        assert_eq!(args["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(args["K8S_POD_UID"], "abc");
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}, {"address": "fd00::5/64"}]});
        assert_eq!(
            prev_ips(&prev),
            vec!["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]
        );
    }
}
