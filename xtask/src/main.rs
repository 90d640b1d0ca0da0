//! `cargo xtask`: Weft's developer entry point. `demo` and `test` are the README's quick start; both
//! install what is missing first (idempotently) and say what they do.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;

mod bench;
mod images;
mod kube;

/// bpf-linker that links LLVM 22 bitcode (the pinned nightly's); newer ones need a newer LLVM.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The eBPF toolchain. Pinned by name: the machine's nightly carries LLVM 22.
const EBPF_TOOLCHAIN: &str = "nightly";
/// Debian packages the dev cluster and the tests use.
// protobuf-compiler: protoc for api/build.rs. tcpdump: the e2e test that inspects what crosses the wire.
// iperf3: the bench's bulk throughput.
const DEBIAN_PACKAGES: &[&str] = &["iproute2", "curl", "bpftool", "protobuf-compiler", "tcpdump", "iperf3"];

#[derive(Parser)]
#[command(name = "cargo xtask")]
enum Cli {
    /// Install what is missing: Debian packages, the nightly's rust-src, bpf-linker, bpffs.
    Setup,
    /// Setup, then build every binary.
    Build,
    /// Build, bring up a 2-node dev cluster, show capture working, tear it down.
    Demo,
    /// Every test: formatting, clippy, unit, integration and end-to-end (root, real eBPF).
    Test,
    /// Formatting and clippy only.
    Lint,
    /// Release build, then OCI image archives of Weft's binaries (what the Kubernetes cluster runs).
    Images,
    /// Writes Weft's CustomResourceDefinitions, generated from the Rust types, into deploy/.
    Crds,
    /// Writes deploy/, the default install as a kustomize base (`weftctl install --dry-run`).
    Manifests,
    /// The local Kubernetes cluster (2 nodes, each in its own network namespace): up, down, status.
    Kube {
        #[command(subcommand)]
        cmd: kube::Cmd,
    },
    /// Release build, then what the mesh costs: each scenario direct and through the mesh, side by side.
    Bench {
        /// Every scenario briefly, once: proves the harness works (CI runs it), not the numbers.
        #[arg(long)]
        quick: bool,
        /// Where bench.json and bench.md go.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Release build, then the control-plane scale harness: the controller and N simulated node
    /// agents, each change kind's delivery time, bytes, controller CPU and memory, and the resync after
    /// a controller restart, per N (target/scale/scale.md).
    Scale {
        /// Simulated nodes, one run each (comma-separated).
        #[arg(long, default_value = "10,100,1000,3000")]
        nodes: String,
        /// More weft-scale options (--pods, --services, --policies, --namespaces, --check).
        #[arg(last = true)]
        rest: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Setup => setup(),
        Cli::Build => setup().and_then(|()| build()),
        Cli::Demo => setup().and_then(|()| build()).and_then(|()| demo()),
        Cli::Test => setup()
            .and_then(|()| lint())
            .and_then(|()| build())
            .and_then(|()| test())
            .and_then(|mut tally| {
                match quick_bench() {
                    Ok(()) => tally.passed += 1,
                    Err(e) => {
                        println!("the quick bench: {e:#}");
                        tally.failed += 1;
                    }
                }
                tally.verdict()
            }),
        Cli::Lint => setup().and_then(|()| lint()),
        Cli::Images => setup()
            .and_then(|()| build_release())
            .and_then(|()| images::build(&root()).map(drop)),
        Cli::Crds => build().and_then(|()| crds()),
        Cli::Manifests => build().and_then(|()| manifests()),
        Cli::Kube { cmd } => setup().and_then(|()| kube::main(cmd)),
        Cli::Bench { quick, out } => setup()
            .and_then(|()| build_release())
            .and_then(|()| bench::bench(&release_dir(), quick, &root().join(out))),
        Cli::Scale { nodes, rest } => setup()
            .and_then(|()| {
                // Against the Kubernetes source it starts a real API server: the binaries first.
                if rest.iter().any(|a| a == "kubernetes" || a == "--source=kubernetes") {
                    kube::install()?;
                }
                build_release()
            })
            .and_then(|()| scale(&nodes, &rest, "target/scale")),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where installed tools are cached, outside the clone so fresh clones reuse them.
fn cache_dir() -> PathBuf {
    std::env::var_os("WEFT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache")
                .join("weft")
        })
}

fn step(msg: &str) {
    println!("\x1b[1m==> {msg}\x1b[0m");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

// === setup ===

fn setup() -> anyhow::Result<()> {
    install_packages(DEBIAN_PACKAGES)?;

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        step(&format!("installing the {EBPF_TOOLCHAIN} toolchain for eBPF"));
        run(Command::new("rustup").args(["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!("rust-src for {EBPF_TOOLCHAIN}: present"));
    } else {
        step(&format!("installing rust-src for {EBPF_TOOLCHAIN}"));
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]))?;
    }

    let linker = cache_dir().join("bin").join("bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if have.as_deref().is_ok_and(|v| v.contains(BPF_LINKER_VERSION)) {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: present ({})",
            linker.display()
        ));
    } else {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} into {} (about 2 minutes)",
            cache_dir().display()
        ));
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--root",
            ])
            .arg(cache_dir()))?;
    }

    if is_root() && !output(Command::new("stat").args(["-fc", "%T", "/sys/fs/bpf"])).is_ok_and(|t| t.trim() == "bpf_fs")
    {
        step("mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing (idempotent).
fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!("Debian packages: all present ({})", packages.join(" ")));
        return Ok(());
    }
    ensure!(
        is_root(),
        "Debian packages {} are missing and installing them needs root",
        missing.join(", ")
    );
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `cargo` with the eBPF toolchain environment.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cache_dir().join("bin")];
    paths.extend(std::env::split_paths(&path));
    cmd.current_dir(root())
        .env("PATH", std::env::join_paths(paths).expect("valid PATH"))
        .env("WEFT_EBPF_TOOLCHAIN", EBPF_TOOLCHAIN);
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        // A CI run builds once from a fresh clone: incremental state (3+ GiB) is never reused, and
        // line tables (file and line in backtraces) are all a failure report needs. Together they
        // halve the target directory, on machines whose disk has run out before.
        cmd.env("CARGO_INCREMENTAL", "0")
            .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only");
    }
    cmd
}

fn build() -> anyhow::Result<()> {
    step("building Weft (userspace with stable, eBPF with the pinned nightly)");
    run(cargo().args(["build", "--bins"]))
}

/// The triple release builds name (`--target`, this machine's own). Named, the target's flags
/// reach Weft's binaries only: without `--target` they would also reach build scripts and
/// proc-macros, which cannot be linked statically.
pub fn release_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Where [`build_release`] puts the binaries: `target/<triple>/release`.
pub fn release_dir() -> PathBuf {
    root().join("target").join(release_target()).join("release")
}

/// The release build: what the images ship, the bench measures and the scale harness runs. Its
/// binaries are linked statically (glibc included): the linker then keeps only the libc code
/// Weft calls, next to its own, instead of mapping all of libc, libm and the loader into each
/// process. An idle agent touched 1.7 MiB of those shared libraries' pages; statically it is
/// a few hundred KiB (docs/performance.md). Lookups (users, hosts) still work: glibc 2.34 and
/// later build `files` and `dns` into libc itself. Relative relocations are packed (`DT_RELR`,
/// glibc 2.36): a position-independent binary keeps its address randomization, and the table its
/// start reads whole shrinks from 278 KiB to 4 KiB.
fn build_release() -> anyhow::Result<()> {
    step("building Weft in release mode, statically linked (what the images ship and the bench measures)");
    let target = release_target();
    let flags = format!("CARGO_TARGET_{}_RUSTFLAGS", target.to_uppercase().replace('-', "_"));
    run(cargo().args(["build", "--release", "--bins", "--target", &target]).env(
        flags,
        "-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs",
    ))
}

fn lint() -> anyhow::Result<()> {
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy --all-targets -- -D warnings");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}

/// What the test command counted.
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// The run's last line, and its outcome.
    fn verdict(self) -> anyhow::Result<()> {
        // One closing line for the whole run (cargo's last line is often an empty doc-test run).
        if self.failed == 0 {
            println!("tests: {} passed, 0 failed: OK", self.passed);
            Ok(())
        } else {
            println!("tests: {} passed, {} failed: FAILED", self.passed, self.failed);
            anyhow::bail!("{} failed", self.failed)
        }
    }
}

fn test() -> anyhow::Result<Tally> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !is_root() {
        ensure!(!ci, "CI=true: the end-to-end tests need root and must run; run as root");
        println!("note: not root; the end-to-end tests will be skipped (they need network namespaces and eBPF)");
    }
    if is_root() {
        // Tests of the main run start a real API server too (the controller's Kubernetes source):
        // its binaries must be there first, on a fresh machine as on one that has them cached.
        step("Kubernetes binaries and packages (built once, cached outside the clone)");
        kube::install()?;
    }
    step("running every test (unit, integration, end-to-end)");
    // The cluster tests run after, against a cluster brought up for them.
    let (mut passed, mut failed, mut ok) = cargo_test(&["test"], &[("WEFT_KUBE_TESTS", "deferred")])?;
    if is_root() {
        step("the Kubernetes tests: a real local cluster (cargo xtask kube up) running Weft from its images");
        let cluster = kube::Cluster::new();
        ensure!(
            !cluster.is_up(),
            "a local Kubernetes cluster is already up; the tests bring up their own (cargo xtask kube down first)"
        );
        build_release()?;
        let images = images::build(&root())?;
        let guard = kube::Guard::up(cluster, &images)?;
        let (p, f, k) = cargo_test(&["test", "-p", "weft-e2e", "--test", "kubernetes"], &[])?;
        passed += p;
        failed += f;
        ok &= k;
        // Leaving anything of the cluster behind fails the run.
        if let Err(e) = guard.down() {
            println!("{e:#}");
            failed += 1;
            ok = false;
        }
        let short_forms: [(&str, &[&str], &str); 2] = [
            (
                "the control-plane scale harness, short form (N = 100: every agent gets every change, no stream drops; no timing asserted)",
                &["--check"],
                "target/scale-ci",
            ),
            (
                "the scale harness against the Kubernetes source, short form (a real API server holding 2,000 pods on 100 node names; no timing asserted)",
                &["--source", "kubernetes", "--pods", "2000", "--check"],
                "target/scale-ci-kubernetes",
            ),
        ];
        for (what, args, out) in short_forms {
            step(what);
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            match scale("100", &args, out) {
                Ok(()) => passed += 1,
                Err(e) => {
                    println!("scale harness ({out}): {e:#}");
                    failed += 1;
                    ok = false;
                }
            }
        }
    }
    if !ok && failed == 0 {
        // cargo test failed without a failing test (a build error): still a failure.
        failed += 1;
    }
    Ok(Tally { passed, failed })
}

/// Runs the release build's weft-scale with `--nodes nodes`, writing to `out`.
fn scale(nodes: &str, rest: &[String], out: &str) -> anyhow::Result<()> {
    let release = release_dir();
    run(Command::new(release.join("weft-scale"))
        .arg("--nodes")
        .arg(nodes)
        .arg("--bin-dir")
        .arg(&release)
        .arg("--out")
        .arg(root().join(out))
        .args(rest))
}

/// Runs `cargo args` (a test run), echoing its output; the passed and failed counts of its
/// `test result:` lines, and whether it succeeded.
fn cargo_test(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(u64, u64, bool)> {
    // Every test binary runs even after one fails: one failure must not hide the others.
    let mut child = cargo()
        .args(args)
        .arg("--no-fail-fast")
        .env("WEFT_BIN_DIR", root().join("target").join("debug"))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test output")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}

/// `cargo xtask bench --quick`: proves the benchmark harness runs end to end; asserts no number.
fn quick_bench() -> anyhow::Result<()> {
    if !is_root() {
        println!("note: not root; skipping the quick bench (it needs network namespaces and eBPF)");
        return Ok(());
    }
    step("the benchmark harness, briefly (cargo xtask bench --quick; no number is asserted)");
    build_release()?;
    bench::bench(&release_dir(), true, &root().join("target").join("bench-quick"))
}

/// `weft-controller crds` renders the CRDs from the Rust types; they are kept in deploy/.
fn crds() -> anyhow::Result<()> {
    let yaml = output(Command::new(root().join("target/debug/weft-controller")).arg("crds"))?;
    let path = root().join("deploy").join("crds.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    step(&format!("wrote {}", path.display()));
    Ok(())
}

/// deploy/ is what `weftctl install --dry-run` renders with the default options.
fn manifests() -> anyhow::Result<()> {
    run(Command::new(root().join("target/debug/weftctl"))
        .args(["install", "--dry-run", "--output-dir"])
        .arg(root().join("deploy")))
}

// === demo ===

fn demo() -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the demo builds network namespaces and loads eBPF: run it as root"
    );
    let bin = root().join("target").join("debug");
    let weftctl = bin.join("weftctl");
    let probe = bin.join("weft-probe");
    let name = "demo";

    step("bringing up a dev cluster: 2 nodes x 2 pods, namespace `default` enrolled (weft.dev/dataplane-mode=ambient)");
    let _ = Command::new(&weftctl).args(["dev", "down", "--name", name]).output();
    run(Command::new(&weftctl).args([
        "dev",
        "up",
        "--name",
        name,
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
        "--ambient",
        "default",
    ]))?;
    let cluster = Teardown {
        weftctl: weftctl.clone(),
        name,
    };
    run(Command::new(&weftctl).args(["dev", "status", "--name", name]))?;
    let status: serde_json::Value = serde_json::from_str(&output(
        Command::new(&weftctl).args(["dev", "status", "--name", name, "-o", "json"]),
    )?)?;
    let ip = |pod: &str, v6: bool| -> anyhow::Result<String> {
        status["pods"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == pod))
            .and_then(|p| p["ips"].as_array())
            .and_then(|ips| ips.iter().filter_map(|i| i.as_str()).find(|i| i.contains(':') == v6))
            .map(str::to_owned)
            .with_context(|| format!("no address for {pod}"))
    };
    let log = |node: &str| -> anyhow::Result<PathBuf> {
        status["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .and_then(|n| n["agent"]["log"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("no agent log for {node}"))
    };

    step("starting an HTTP server in pod app-2-1 (node2) that answers with the client address it sees");
    let server = Background(
        Command::new(&weftctl)
            .args(["dev", "exec", "--name", name, "app-2-1", "--"])
            .arg(&probe)
            .args(["serve", "--ports", "8080"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    wait_for_port(&weftctl, name, &ip("app-2-1", false)?)?;

    for v6 in [false, true] {
        let server_ip = ip("app-2-1", v6)?;
        let url = if v6 {
            format!("http://[{server_ip}]:8080/")
        } else {
            format!("http://{server_ip}:8080/")
        };
        step(&format!("curl {url} from pod app-1-1 (node1), an unmodified curl"));
        let body = output(Command::new(&weftctl).args([
            "dev", "exec", "--name", name, "app-1-1", "--", "curl", "-sS", "-m", "5", &url,
        ]))?;
        println!("    server says: {}", body.trim());
        ensure!(
            body.contains(&ip("app-1-1", v6)?),
            "the server did not see the client pod's address"
        );
    }

    step("what the agents recorded (one access record per connection)");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (out, inb) = loop {
        let out = records(&log("node1")?, "outbound");
        let inb = records(&log("node2")?, "inbound");
        if (out.len() >= 2 && inb.len() >= 2) || Instant::now() > deadline {
            break (out, inb);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        out.len() >= 2 && inb.len() >= 2,
        "the agents did not record the connections"
    );
    for r in out.iter().chain(&inb) {
        println!(
            "    {:<8} {:<5} {:>24} -> {:<26} {} -> {} bytes={}/{}",
            r["direction"].as_str().unwrap_or_default(),
            r["mode"].as_str().unwrap_or_default(),
            r["src.addr"].as_str().unwrap_or_default(),
            r["dst.addr"].as_str().unwrap_or_default(),
            r["src.identity"].as_str().unwrap_or_default(),
            r["dst.identity"].as_str().unwrap_or_default(),
            r["bytes_sent"],
            r["bytes_received"],
        );
    }
    println!(
        "    mode=hbone: the bytes crossed between the nodes in mutual TLS 1.3, each side proving its SPIFFE identity"
    );

    step("applying an AuthorizationPolicy that denies app-1-1's identity on app-2-1 (weftctl apply -f -)");
    let policy = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: demo-deny\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: app-2-1\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/default\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n";
    println!(
        "{}",
        policy
            .lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    store(&weftctl, "apply", name, policy)?;
    let url = format!("http://{}:8080/", ip("app-2-1", false)?);
    let curl = |what: &str| -> anyhow::Result<bool> {
        let ok = Command::new(&weftctl)
            .args([
                "dev", "exec", "--name", name, "app-1-1", "--", "curl", "-sS", "-m", "5", &url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        println!(
            "    curl {url} from app-1-1 {what}: {}",
            if ok { "answered" } else { "refused" }
        );
        Ok(ok)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while curl("under the policy")? {
        ensure!(Instant::now() < deadline, "the policy was not enforced within 5 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(r) = records(&log("node2")?, "inbound")
        .iter()
        .rev()
        .find(|r| r["reason"] == "denied")
    {
        println!(
            "    node2 recorded: reason={} policy={} src.identity={}",
            r["reason"].as_str().unwrap_or_default(),
            r["policy"].as_str().unwrap_or_default(),
            r["src.identity"].as_str().unwrap_or_default()
        );
    }
    step("deleting the policy (weftctl delete -f -): access is back without restarting anything");
    store(&weftctl, "delete", name, policy)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !curl("after the delete")? {
        ensure!(Instant::now() < deadline, "access did not come back within 5 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    step("opting pod app-1-2 out (weft.dev/dataplane-mode=none): its connections are no longer captured");
    run(Command::new(&weftctl).args([
        "dev",
        "annotate",
        "--name",
        name,
        "pod",
        "app-1-2",
        "weft.dev/dataplane-mode=none",
    ]))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !std::fs::read_to_string(log("node1")?)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("\"unenrolled\"") && l.contains("default/app-1-2"))
    {
        ensure!(
            Instant::now() < deadline,
            "the agent did not un-enroll app-1-2 within 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Uncaptured, the connection reaches node2 from curl's own socket: node2's inbound record then
    // carries curl's source port. Captured, it would carry the node1 agent's port instead.
    let url = format!("http://{}:8080/", ip("app-2-1", false)?);
    let out = output(Command::new(&weftctl).args([
        "dev",
        "exec",
        "--name",
        name,
        "app-1-2",
        "--",
        "curl",
        "-sS",
        "-m",
        "5",
        "-w",
        "\n%{local_port}",
        &url,
    ]))?;
    let (body, port) = out.rsplit_once('\n').context("curl printed no local port")?;
    println!("    server says: {}", body.trim());
    let direct = format!("{}:{}", ip("app-1-2", false)?, port.trim());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !records(&log("node2")?, "inbound")
        .iter()
        .any(|r| r["src.addr"] == direct.as_str())
    {
        ensure!(
            Instant::now() < deadline,
            "the opted-out pod was still captured: node2 never saw {direct}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("    node2 saw curl's own connection ({direct}): node1's agent no longer captures app-1-2");

    println!();
    step("what to look at");
    println!(
        "    agent logs (JSON, one access record per connection): {} and {}",
        log("node1")?.display(),
        log("node2")?.display()
    );
    println!("    the cluster:     weftctl dev status --name {name}   (while it runs; the demo removes it now)");
    println!("    the store:       weftctl get --cluster {name}   (namespaces, pods, services, policies)");
    println!("    the controller:  /var/log/weft/dev/{name}/controller.log (pushes, ACKs, certificates signed)");
    println!("    the attachments: bpftool cgroup show <node cgroup>  /  bpftool link show");
    drop(server);
    drop(cluster);
    step("demo finished; cluster removed");
    Ok(())
}

/// `weftctl apply|delete --cluster NAME -f -` with `yaml` on stdin.
fn store(weftctl: &Path, verb: &str, name: &str, yaml: &str) -> anyhow::Result<()> {
    let mut child = Command::new(weftctl)
        .args([verb, "--cluster", name, "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("running weftctl {verb}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, yaml.as_bytes())?;
    }
    ensure!(child.wait()?.success(), "weftctl {verb} failed");
    Ok(())
}

fn wait_for_port(weftctl: &Path, name: &str, ip: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = Command::new(weftctl)
            .args([
                "dev",
                "exec",
                "--name",
                name,
                "app-2-2",
                "--",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "1",
            ])
            .arg(format!("http://{ip}:8080/"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the server in app-2-1 did not start listening")
}

fn records(log: &Path, direction: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "weft::access" && v["direction"] == direction)
        .collect()
}

/// Removes the demo cluster however the demo ends.
struct Teardown<'a> {
    weftctl: PathBuf,
    name: &'a str,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = Command::new(&self.weftctl)
            .args(["dev", "down", "--name", self.name])
            .status();
    }
}

struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
