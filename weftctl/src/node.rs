//! `weftctl node ...`: what one node's agent holds and does, read from its admin API
//! (`/config_dump`, `/logging`) or from a saved dump. The agent's admin API listens on the node's
//! loopback (127.0.0.1:15000): run on the node, `--admin ADDR` for another address, `--name CLUSTER
//! --node NODE` for a dev cluster's node (entered through its network namespace).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The agent's admin API on the node it runs on.
const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Subcommand)]
pub enum Command {
    /// The workloads the agent knows (every pod the controller sent), with identity and services.
    Workloads(Shown),
    /// The services and their ports and endpoints.
    Services(Shown),
    /// AuthorizationPolicies and PeerAuthentications.
    Policies(Shown),
    /// The node's workload certificates: identity, serial, validity, renewal, chain (never a key).
    Certs(Shown),
    /// The pods enrolled on this node, and those the agent could not enroll.
    Pods(Shown),
    /// The agent's whole view as JSON (save it for `--file`).
    ConfigDump {
        #[command(flatten)]
        target: Target,
    },
    /// Shows the agent's log filter, or replaces it (a level, or target=level directives).
    LogLevel {
        /// E.g. `debug`, `info,weft::access=off`.
        level: Option<String>,
        #[command(flatten)]
        target: Live,
    },
}

/// Which agent.
#[derive(clap::Args)]
pub struct Live {
    /// The agent's admin API [default: 127.0.0.1:15000, this node's agent].
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["name", "node"])]
    admin: Option<SocketAddr>,
    /// A dev cluster (with `--node`).
    #[arg(long, requires = "node")]
    name: Option<String>,
    /// The node whose agent to ask: with `--name`, a dev cluster's node.
    #[arg(long)]
    node: Option<String>,
}

/// Which agent, or a saved dump.
#[derive(clap::Args)]
pub struct Target {
    #[command(flatten)]
    live: Live,
    /// A saved config dump instead of a live agent.
    #[arg(long, value_name = "DUMP", conflicts_with_all = ["admin", "name", "node"])]
    file: Option<PathBuf>,
}

/// A view: from where, and how to print it.
#[derive(clap::Args)]
pub struct Shown {
    #[command(flatten)]
    target: Target,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

pub fn run(cmd: Command) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        Command::Workloads(s) => show(&s, "workloads", workloads),
        Command::Services(s) => show(&s, "services", services),
        Command::Policies(s) => show(&s, "policies", policies),
        Command::Certs(s) => show(&s, "certificates", certs),
        Command::Pods(s) => show(&s, "pods", pods),
        Command::ConfigDump { target } => {
            let dump = dump(&target)?;
            println!("{}", serde_json::to_string_pretty(&dump)?);
            Ok(())
        }
        Command::LogLevel { level, target } => {
            let (status, body) = match &level {
                None => request(&target, "GET", "/logging")?,
                Some(level) => request(&target, "POST", &format!("/logging?level={}", encode(level)))?,
            };
            if status != 200 {
                bail!("the agent refused: {}", body.trim());
            }
            print!("{body}");
            Ok(())
        }
    }
    .map(|()| std::process::ExitCode::SUCCESS)
}

/// Prints part `key` of the dump: as a table made by `table`, or as JSON or YAML.
fn show(shown: &Shown, key: &str, table: fn(&Value) -> Vec<Vec<String>>) -> anyhow::Result<()> {
    let dump = dump(&shown.target)?;
    let part = match key {
        "policies" => serde_json::json!({
            "authorization_policies": dump["authorization_policies"],
            "peer_authentications": dump["peer_authentications"],
        }),
        "pods" => serde_json::json!({ "pods": dump["pods"], "failures": dump["failures"] }),
        _ => dump
            .get(key)
            .cloned()
            .with_context(|| format!("the dump has no {key:?}: an agent of another version?"))?,
    };
    match shown.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&part)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(&part)?),
        Format::Table => print!("{}", render(&table(&part))),
    }
    Ok(())
}

/// The agent's `/config_dump`, or the saved one.
fn dump(target: &Target) -> anyhow::Result<Value> {
    let (text, from) = match &target.file {
        Some(file) => (
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
            file.display().to_string(),
        ),
        None => {
            let (status, body) = request(&target.live, "GET", "/config_dump")?;
            if status != 200 {
                bail!("the agent answered /config_dump with {status}: {}", body.trim());
            }
            (body, "the agent's /config_dump".to_owned())
        }
    };
    let dump: Value = serde_json::from_str(&text).with_context(|| format!("{from} is not a config dump (JSON)"))?;
    if !dump.get("config").is_some_and(Value::is_object) {
        bail!("{from} is not a Weft agent's config dump (no \"config\")");
    }
    Ok(dump)
}

/// One HTTP/1.1 request to the agent's admin API: status and body.
fn request(live: &Live, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let (addr, via) = match (&live.admin, &live.name, &live.node) {
        (Some(addr), _, _) => (*addr, String::new()),
        (None, Some(cluster), Some(node)) => (
            DEFAULT_ADMIN.parse()?,
            format!(" in dev cluster {cluster:?}'s node {node:?}"),
        ),
        (None, None, Some(node)) => bail!(
            "reaching node {node:?}'s agent through the Kubernetes API is not built yet: run weftctl on the node, or give --admin ADDR"
        ),
        (None, _, None) => (DEFAULT_ADMIN.parse()?, String::new()),
    };
    let connect = || TcpStream::connect_timeout(&addr, TIMEOUT);
    let stream = match (&live.name, &live.node) {
        (Some(cluster), Some(node)) => {
            let netns = crate::dev::node_netns(cluster, node)?;
            netns
                .run(connect)
                .with_context(|| format!("entering node {node:?}'s network namespace"))?
        }
        _ => connect(),
    };
    let mut stream = stream.with_context(|| {
        format!("the agent's admin API is not reachable at {addr}{via}: is weft-node running there?")
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the agent's answer from {addr}{via}"))?;
    parse_response(&raw).with_context(|| format!("the answer from {addr}{via}"))
}

/// Status and body of an HTTP/1.1 response read to its end (the server closes: `Connection: close`).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_owned()))
}

/// `%`-escapes what a query value may not hold as is.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// === tables ===

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn workloads(v: &Value) -> Vec<Vec<String>> {
    let mut t = vec![header(&[
        "NAMESPACE/NAME",
        "NODE",
        "IPS",
        "MESHED",
        "IDENTITY",
        "SERVICES",
    ])];
    t.extend(rows(v).iter().map(|w| {
        vec![
            s(&w["name"]),
            s(&w["node"]),
            s(&w["ips"]),
            if w["meshed"] == true { "yes" } else { "no" }.into(),
            s(&w["identity"]),
            s(&w["services"]),
        ]
    }));
    t
}

fn services(v: &Value) -> Vec<Vec<String>> {
    let mut t = vec![header(&["NAMESPACE/NAME", "VIPS", "PORTS", "ENDPOINTS"])];
    t.extend(rows(v).iter().map(|sv| {
        let ports: Vec<String> = rows(&sv["ports"])
            .iter()
            .map(|p| format!("{}->{}", p["port"], p["target_port"]))
            .collect();
        vec![s(&sv["name"]), s(&sv["vips"]), ports.join(","), s(&sv["endpoints"])]
    }));
    t
}

fn policies(v: &Value) -> Vec<Vec<String>> {
    let mut t = vec![header(&[
        "KIND",
        "NAMESPACE/NAME",
        "SCOPE",
        "SELECTOR",
        "ACTION/MODE",
        "RULES/PORTS",
    ])];
    t.extend(rows(&v["authorization_policies"]).iter().map(|p| {
        vec![
            "AuthorizationPolicy".into(),
            s(&p["name"]),
            s(&p["scope"]),
            s(&p["selector"]),
            s(&p["action"]),
            s(&p["rules"]),
        ]
    }));
    t.extend(rows(&v["peer_authentications"]).iter().map(|p| {
        vec![
            "PeerAuthentication".into(),
            s(&p["name"]),
            s(&p["scope"]),
            s(&p["selector"]),
            s(&p["mode"]),
            s(&p["port_modes"]),
        ]
    }));
    t
}

fn certs(v: &Value) -> Vec<Vec<String>> {
    let mut t = vec![header(&[
        "IDENTITY",
        "STATE",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "RENEWS IN",
        "CHAIN",
    ])];
    t.extend(rows(v).iter().map(|c| {
        let chain: Vec<String> = rows(&c["chain"]).iter().map(|l| s(&l["issuer"])).collect();
        vec![
            s(&c["identity"]),
            s(&c["state"]),
            s(&c["serial"]),
            s(&c["not_before"]),
            s(&c["not_after"]),
            c["renews_in_s"].as_i64().map_or("-".into(), duration),
            if chain.is_empty() {
                "-".into()
            } else {
                format!("{} (issued by {})", chain.len(), chain.join(" < "))
            },
        ]
    }));
    t
}

fn pods(v: &Value) -> Vec<Vec<String>> {
    let mut t = vec![header(&["NAMESPACE/NAME", "UID", "IPS", "IDENTITY", "STATE"])];
    t.extend(rows(&v["pods"]).iter().map(|p| {
        vec![
            s(&p["name"]),
            s(&p["uid"]),
            s(&p["ips"]),
            s(&p["identity"]),
            "enrolled".into(),
        ]
    }));
    if let Some(failures) = v["failures"].as_object() {
        t.extend(failures.iter().map(|(uid, error)| {
            vec![
                "-".into(),
                uid.clone(),
                "-".into(),
                "-".into(),
                format!("not enrolled: {}", s(error)),
            ]
        }));
    }
    t
}

fn header(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| (*c).to_owned()).collect()
}

/// Seconds as `3h12m`, `45s`; negative: `overdue 10s`.
fn duration(secs: i64) -> String {
    let shown = |s: u64| match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    };
    if secs < 0 {
        format!("overdue {}", shown(secs.unsigned_abs()))
    } else {
        shown(secs as u64)
    }
}

/// Columns aligned, two spaces apart.
fn render(table: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..table.first().map_or(0, Vec::len))
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        serde_json::json!({
            "config": { "node": "node1" },
            "workloads": [{ "name": "shop/web-1", "node": "node1", "ips": ["10.0.0.5"], "meshed": true,
                "identity": "spiffe://cluster.local/ns/shop/sa/web", "services": ["shop/web"] }],
            "services": [{ "name": "shop/web", "vips": ["10.96.0.10"], "ports": [{ "port": 80, "target_port": 8080 }], "endpoints": 1 }],
            "authorization_policies": [{ "name": "shop/deny", "scope": "namespace", "selector": { "app": "web" }, "action": "DENY", "rules": 2 }],
            "peer_authentications": [{ "name": "weft-system/default", "scope": "mesh", "selector": null, "mode": "STRICT", "port_modes": {} }],
            "certificates": [{ "identity": "spiffe://cluster.local/ns/shop/sa/web", "state": "valid", "serial": "0a1b",
                "not_before": "2026-12-03T10:00:00Z", "not_after": "2026-12-04T10:00:00Z", "renews_in_s": 3725,
                "chain": [{ "issuer": "CN=weft-ca" }] }],
            "pods": [], "failures": { "uid-1": "no network namespace" },
        })
    }

    #[test]
    fn each_view_is_a_table_of_what_the_dump_holds() {
        let d = dump();
        assert_eq!(
            render(&workloads(&d["workloads"])),
            "NAMESPACE/NAME  NODE   IPS       MESHED  IDENTITY                               SERVICES\n\
             shop/web-1      node1  10.0.0.5  yes     spiffe://cluster.local/ns/shop/sa/web  shop/web\n"
        );
        assert!(render(&services(&d["services"])).contains("shop/web        10.96.0.10  80->8080  1"));
        let p = render(&policies(&serde_json::json!({
            "authorization_policies": d["authorization_policies"],
            "peer_authentications": d["peer_authentications"],
        })));
        assert!(
            p.contains("AuthorizationPolicy  shop/deny            namespace  app=web   DENY"),
            "{p}"
        );
        assert!(
            p.contains("PeerAuthentication   weft-system/default  mesh       -         STRICT"),
            "{p}"
        );
        let c = render(&certs(&d["certificates"]));
        assert!(
            c.contains("valid  0a1b") && c.contains("1h02m") && c.contains("1 (issued by CN=weft-ca)"),
            "{c}"
        );
        let p = render(&pods(
            &serde_json::json!({ "pods": d["pods"], "failures": d["failures"] }),
        ));
        assert!(
            p.contains("uid-1") && p.contains("not enrolled: no network namespace"),
            "{p}"
        );
    }

    #[test]
    fn responses_levels_and_durations() {
        assert_eq!(
            parse_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nbad\n").unwrap(),
            (400, "bad\n".to_owned())
        );
        assert!(parse_response(b"garbage").is_err());
        assert_eq!(encode("info,weft::access=off"), "info%2Cweft%3A%3Aaccess%3Doff");
        assert_eq!(duration(-12), "overdue 12s");
        assert_eq!(duration(86_400), "24h00m");
    }

    #[test]
    fn a_file_that_is_not_a_dump_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("weftctl-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("dump.json");
        std::fs::write(&file, "{\"workloads\": []}").unwrap();
        let target = Target {
            live: Live {
                admin: None,
                name: None,
                node: None,
            },
            file: Some(file.clone()),
        };
        let err = super::dump(&target).unwrap_err().to_string();
        assert!(err.contains("is not a Weft agent's config dump"), "{err}");
        std::fs::write(&file, "not json").unwrap();
        let err = super::dump(&target).unwrap_err().to_string();
        assert!(err.contains("is not a config dump (JSON)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
