//! Weft's place in a node's CNI configuration: chained after the cluster's own plugins in the
//! configuration the container runtime uses, and taken out again. Pure JSON editing; the caller
//! reads and writes the files (atomically).
//!
//! The runtime (containerd, CRI-O, via libcni) uses the first file of its configuration directory in
//! lexical order whose extension is `.conflist`, `.conf` or `.json`; Weft edits exactly that one. A
//! single-plugin `.conf` becomes a list (written back as `.conflist` by the caller), because only a
//! list can chain.

use serde_json::{Value, json};

/// The plugin type Weft's chained plugin registers as.
pub const PLUGIN_TYPE: &str = "weft-cni";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the CNI configuration is not a JSON object")]
    NotAnObject,
    #[error("the CNI configuration has no \"plugins\" list and no \"type\": not a network configuration")]
    NoPlugins,
}

/// The file the runtime uses among `names` (file names in one directory), if any.
pub fn active_file<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut candidates: Vec<&str> = names
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        .collect();
    candidates.sort_unstable();
    candidates.first().copied()
}

/// `config` with Weft's plugin as the last of its plugins (replacing an earlier Weft entry, so
/// running it twice changes nothing), and whether it changed.
pub fn chain(config: &Value, agent_socket: &str) -> Result<(Value, bool), Error> {
    let mut list = as_list(config)?;
    let entry = json!({ "type": PLUGIN_TYPE, "agentSocket": agent_socket });
    let plugins = list["plugins"].as_array_mut().ok_or(Error::NoPlugins)?;
    let before = plugins.clone();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(entry);
    let changed = *plugins != before || config.get("plugins").is_none();
    Ok((list, changed))
}

/// `config` without Weft's plugin, and whether it changed.
pub fn unchain(config: &Value) -> Result<(Value, bool), Error> {
    let Some(obj) = config.as_object() else {
        return Err(Error::NotAnObject);
    };
    if obj.get("plugins").is_none() {
        // A single-plugin configuration never held Weft.
        return Ok((config.clone(), false));
    }
    let mut list = config.clone();
    let plugins = list["plugins"].as_array_mut().ok_or(Error::NoPlugins)?;
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    let changed = plugins.len() != before;
    Ok((list, changed))
}

/// Whether `config` chains Weft's plugin.
pub fn is_chained(config: &Value) -> bool {
    config["plugins"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["type"] == PLUGIN_TYPE))
}

/// A configuration list: `config` itself, or a single-plugin configuration wrapped in one.
fn as_list(config: &Value) -> Result<Value, Error> {
    let obj = config.as_object().ok_or(Error::NotAnObject)?;
    if obj.get("plugins").is_some_and(Value::is_array) {
        return Ok(config.clone());
    }
    if obj.get("type").is_none() {
        return Err(Error::NoPlugins);
    }
    let mut plugin = obj.clone();
    let name = plugin.remove("name").unwrap_or(json!("k8s-pod-network"));
    let version = plugin.remove("cniVersion").unwrap_or(json!("0.4.0"));
    Ok(json!({ "cniVersion": version, "name": name, "plugins": [Value::Object(plugin)] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_list() -> Value {
        json!({"cniVersion": "0.4.0", "name": "k", "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]})
    }

    #[test]
    fn the_runtime_file_is_the_first_configuration_in_lexical_order() {
        assert_eq!(active_file(["99-b.conflist", "10-a.conf", "README"]), Some("10-a.conf"));
        assert_eq!(active_file(["05-x.json", "10-a.conflist"]), Some("05-x.json"));
        assert_eq!(
            active_file([".10-tmp.conflist", "20-b.conflist"]),
            Some("20-b.conflist")
        );
        assert_eq!(active_file(["README", "x.yaml"]), None);
    }

    #[test]
    fn chaining_appends_weft_last_once_and_unchaining_restores_the_original() {
        let original = bridge_list();
        let (chained, changed) = chain(&original, "/run/weft/cni.sock").unwrap();
        assert!(changed);
        let types: Vec<&str> = chained["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "weft-cni"]);
        assert_eq!(chained["plugins"][2]["agentSocket"], "/run/weft/cni.sock");
        assert!(is_chained(&chained));

        let (again, changed) = chain(&chained, "/run/weft/cni.sock").unwrap();
        assert!(!changed, "chaining twice changes nothing");
        assert_eq!(again, chained);

        let (back, changed) = unchain(&chained).unwrap();
        assert!(changed);
        assert_eq!(back, original);
        assert!(!unchain(&back).unwrap().1);
    }

    #[test]
    fn an_earlier_entry_in_the_middle_moves_to_the_end_with_the_new_socket() {
        let config = json!({"cniVersion": "1.0.0", "name": "k", "plugins": [
            {"type": "bridge"}, {"type": "weft-cni", "agentSocket": "/old"}, {"type": "portmap"}]});
        let (chained, changed) = chain(&config, "/run/weft/cni.sock").unwrap();
        assert!(changed);
        assert_eq!(chained["plugins"][1]["type"], "portmap");
        assert_eq!(chained["plugins"][2]["agentSocket"], "/run/weft/cni.sock");
    }

    #[test]
    fn a_single_plugin_configuration_becomes_a_list() {
        let conf = json!({"cniVersion": "0.3.1", "name": "net", "type": "bridge", "bridge": "cni0"});
        let (list, changed) = chain(&conf, "/s").unwrap();
        assert!(changed);
        assert_eq!(list["name"], "net");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(list["plugins"][1]["type"], "weft-cni");
    }

    #[test]
    fn what_is_not_a_network_configuration_is_refused() {
        assert_eq!(chain(&json!([1]), "/s"), Err(Error::NotAnObject));
        assert_eq!(chain(&json!({"name": "x"}), "/s"), Err(Error::NoPlugins));
        assert_eq!(unchain(&json!("x")), Err(Error::NotAnObject));
    }
}
