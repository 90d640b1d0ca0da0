//! `weft-cni install` / `weft-cni uninstall`: put the plugin on a node and chain it into the
//! configuration the container runtime uses, or take it out again. Run by the node agent's
//! DaemonSet (an init container, with the host's CNI directories mounted), and safe to repeat.
//!
//! Install copies this binary into the plugin directory first (written to a temporary name and
//! renamed, so the runtime never runs a half-written plugin), then rewrites the active
//! configuration file the same way. Until the agent answers on its socket the plugin fails ADD with
//! "try again later": a pod is not started outside the mesh it belongs to.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde_json::Value;
use weft_model::cni_config;

pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub agent_socket: String,
    /// How long to wait for the cluster's own CNI configuration to appear (install only).
    pub wait: std::time::Duration,
}

/// Parses `--bin-dir DIR --conf-dir DIR --agent-socket PATH --wait-seconds N`.
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: "/opt/cni/bin".into(),
        conf_dir: "/etc/cni/net.d".into(),
        agent_socket: "/run/weft/cni.sock".into(),
        wait: std::time::Duration::from_secs(300),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => o.bin_dir = value()?.into(),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--agent-socket" => o.agent_socket = value()?,
            "--wait-seconds" => {
                let v = value()?;
                o.wait =
                    std::time::Duration::from_secs(v.parse().map_err(|_| format!("--wait-seconds {v}: not a number"))?);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

pub fn install(o: &Options) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let target = o.bin_dir.join(cni_config::PLUGIN_TYPE);
    let tmp = o.bin_dir.join(format!(".{}.tmp", cni_config::PLUGIN_TYPE));
    fs::copy(&me, &tmp).map_err(|e| format!("copying {} to {}: {e}", me.display(), tmp.display()))?;
    fs::rename(&tmp, &target).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), target.display()))?;
    println!("installed {}", target.display());

    // The cluster's own network configuration may be written after this node's agent starts.
    let deadline = std::time::Instant::now() + o.wait;
    let file = loop {
        if let Some(f) = active_file(&o.conf_dir)? {
            break f;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "no CNI network configuration in {} after {:?}: Weft chains after the cluster's own plugin, which must be installed first",
                o.conf_dir.display(),
                o.wait
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let config = read(&file)?;
    let (chained, changed) =
        cni_config::chain(&config, &o.agent_socket).map_err(|e| format!("{}: {e}", file.display()))?;
    if !changed {
        println!("{} already chains weft-cni", file.display());
        return Ok(());
    }
    // A single-plugin .conf becomes a list: written as .conflist under the same stem, and the
    // original removed after, so the runtime always finds one complete configuration.
    let out = if config.get("plugins").is_some() {
        file.clone()
    } else {
        file.with_extension("conflist")
    };
    write_atomic(&out, &chained)?;
    if out != file {
        fs::remove_file(&file).map_err(|e| format!("removing {}: {e}", file.display()))?;
    }
    println!("chained weft-cni into {}", out.display());
    Ok(())
}

pub fn uninstall(o: &Options) -> Result<(), String> {
    if let Some(file) = active_file(&o.conf_dir)? {
        let (config, changed) = cni_config::unchain(&read(&file)?).map_err(|e| format!("{}: {e}", file.display()))?;
        if changed {
            write_atomic(&file, &config)?;
            println!("removed weft-cni from {}", file.display());
        }
    }
    let target = o.bin_dir.join(cni_config::PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Ok(()) => println!("removed {}", target.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", target.display())),
    }
    Ok(())
}

fn active_file(dir: &Path) -> Result<Option<PathBuf>, String> {
    let names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    Ok(cni_config::active_file(names.iter().map(String::as_str)).map(|n| dir.join(n)))
}

fn read(file: &Path) -> Result<Value, String> {
    let bytes = fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not JSON: {e}", file.display()))
}

fn write_atomic(file: &Path, value: &Value) -> Result<(), String> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("weft");
    // A dot-name is not a configuration to the runtime while it is being written.
    let tmp = dir.join(format!(".{name}.weft-tmp"));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    let mut f = fs::File::create(&tmp).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, file).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> Options {
        let o = Options {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            agent_socket: "/run/weft/cni.sock".into(),
            wait: std::time::Duration::from_secs(1),
        };
        fs::create_dir_all(&o.bin_dir).unwrap();
        fs::create_dir_all(&o.conf_dir).unwrap();
        o
    }

    #[test]
    fn install_chains_into_the_active_file_and_uninstall_leaves_it_as_it_was() {
        let dir = std::env::temp_dir().join(format!("weft-cni-install-{}", std::process::id()));
        let o = opts(&dir);
        let original = "{\"cniVersion\":\"0.4.0\",\"name\":\"k\",\"plugins\":[{\"type\":\"bridge\"}]}";
        fs::write(o.conf_dir.join("10-k.conflist"), original).unwrap();
        fs::write(o.conf_dir.join("20-other.conflist"), original).unwrap();
        install(&o).unwrap();
        install(&o).unwrap();
        assert!(o.bin_dir.join("weft-cni").exists());
        let active = read(&o.conf_dir.join("10-k.conflist")).unwrap();
        assert!(cni_config::is_chained(&active));
        assert_eq!(active["plugins"].as_array().unwrap().len(), 2);
        assert!(!cni_config::is_chained(
            &read(&o.conf_dir.join("20-other.conflist")).unwrap()
        ));
        uninstall(&o).unwrap();
        assert_eq!(
            read(&o.conf_dir.join("10-k.conflist")).unwrap(),
            serde_json::from_str::<Value>(original).unwrap()
        );
        assert!(!o.bin_dir.join("weft-cni").exists());
        let leftovers: Vec<_> = fs::read_dir(&o.conf_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_without_the_clusters_own_configuration_fails_naming_the_directory() {
        let dir = std::env::temp_dir().join(format!("weft-cni-empty-{}", std::process::id()));
        let o = opts(&dir);
        let err = install(&o).unwrap_err();
        assert!(err.contains("net.d"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
