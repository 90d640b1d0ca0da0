//! The pod networks on this node, as the CNI plugin reported them, persisted so that a restarted
//! agent knows the pods already running (the reconcile scan at start).
//!
//! Each entry also remembers the network-namespace cookie the pod was captured under, so that the
//! agent can tell which captured namespace belongs to which pod without the pod's cooperation. The
//! file is written durably (a crash leaves the old file or the new one). A file that cannot be read
//! is a loud error and is set aside for an operator, never taken as "no pods": capture of pods the
//! agent cannot account for stays on (their connections are refused) rather than being dropped.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use weft_model::cni::{PodEvent, PodNetwork};

/// One pod's network, and the namespace cookie capture knows it by once it was enrolled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Known {
    #[serde(flatten)]
    pub network: PodNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
}

/// Pod networks on this node, by pod uid.
#[derive(Debug, Default)]
pub struct Networks {
    by_uid: BTreeMap<String, Known>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod-network state {path} is unreadable (set aside as {aside})")]
    Unreadable {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing pod-network state {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`Networks::load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// The file as the previous agent left it.
    Read(Networks),
    /// No file: a first start on this node, or state lost.
    Missing,
}

impl Networks {
    /// Reads the file the previous agent wrote. A missing file is [`Loaded::Missing`]; one that
    /// cannot be read or parsed is an error, and is renamed aside (`<file>.unreadable`) so that the
    /// next save does not destroy what an operator may want to look at.
    pub fn load(path: &Path) -> Result<Loaded, Error> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(source) => return Err(Self::set_aside(path, source)),
        };
        match serde_json::from_slice::<BTreeMap<String, Known>>(&bytes) {
            Ok(mut by_uid) => {
                for known in by_uid.values_mut() {
                    known.network.netns = reachable(&known.network.netns, Path::exists);
                }
                Ok(Loaded::Read(Self { by_uid }))
            }
            Err(e) => Err(Self::set_aside(path, io::Error::new(io::ErrorKind::InvalidData, e))),
        }
    }

    fn set_aside(path: &Path, source: io::Error) -> Error {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".unreadable");
        let aside = PathBuf::from(aside);
        let _ = std::fs::rename(path, &aside);
        Error::Unreadable {
            path: path.to_path_buf(),
            aside,
            source,
        }
    }

    /// Writes the file durably (write, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let err = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        let bytes = serde_json::to_vec(&self.by_uid).map_err(|e| err(io::Error::other(e)))?;
        weft_api::durable::write(path, &bytes, 0o600).map_err(err)
    }

    /// Applies a CNI event. A pod added again (its sandbox re-created) forgets its old cookie.
    pub fn apply(&mut self, event: &PodEvent) {
        match event {
            PodEvent::Add(network) => {
                tracing::info!(pod = %format!("{}/{}", network.namespace, network.name), netns = %network.netns.display(), "CNI add");
                let mut network = network.clone();
                network.netns = reachable(&network.netns, Path::exists);
                self.by_uid.insert(
                    network.uid.clone(),
                    Known {
                        network,
                        netns_cookie: None,
                    },
                );
            }
            PodEvent::Delete { uid } => {
                tracing::info!(uid = %uid, "CNI delete");
                self.by_uid.remove(uid);
            }
        }
    }

    pub fn get(&self, uid: &str) -> Option<&Known> {
        self.by_uid.get(uid)
    }

    /// Every known pod network, by pod uid.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Known)> {
        self.by_uid.iter().map(|(uid, k)| (uid.as_str(), k))
    }

    /// Records the cookie a pod was captured under; returns whether that changed anything.
    pub fn set_cookie(&mut self, uid: &str, cookie: u64) -> bool {
        match self.by_uid.get_mut(uid) {
            Some(k) if k.netns_cookie != Some(cookie) => {
                k.netns_cookie = Some(cookie);
                true
            }
            _ => false,
        }
    }

    /// The pod captured under `cookie`, if the agent knows it.
    pub fn uid_of_cookie(&self, cookie: u64) -> Option<&str> {
        self.by_uid
            .iter()
            .find(|(_, k)| k.netns_cookie == Some(cookie))
            .map(|(uid, _)| uid.as_str())
    }

    /// Forgets pods whose network namespace no longer exists; returns their capture cookies, which
    /// nothing can use any more.
    pub fn drop_vanished(&mut self) -> Vec<u64> {
        let gone: Vec<String> = self
            .by_uid
            .iter()
            .filter(|(_, k)| !k.network.netns.exists())
            .map(|(uid, _)| uid.clone())
            .collect();
        gone.iter()
            .filter_map(|uid| self.by_uid.remove(uid))
            .filter_map(|k| k.netns_cookie)
            .collect()
    }
}

/// The path under which the agent can open a network namespace the runtime named. containerd
/// reports `/var/run/netns/cni-<uuid>`; on the host `/var/run` is a link to `/run`, but the agent's
/// container has no `/var/run`, and mounts the host's `/run/netns` at `/run/netns`. So a `/var/run/`
/// path that does not `exist` is taken as the `/run/` one.
pub fn reachable(path: &Path, exists: impl Fn(&Path) -> bool) -> PathBuf {
    match path.strip_prefix("/var/run") {
        Ok(rest) if !exists(path) => Path::new("/run").join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(uid: &str, netns: &str) -> PodEvent {
        PodEvent::Add(PodNetwork {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("pod-{uid}"),
            netns: netns.into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
        })
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-networks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_networks_and_cookies_load_back() {
        let dir = scratch("roundtrip");
        let path = dir.join("pod-networks.json");
        let mut n = Networks::default();
        n.apply(&add("u1", "/proc/self/ns/net"));
        assert!(n.set_cookie("u1", 42));
        assert!(!n.set_cookie("u1", 42), "unchanged");
        assert!(!n.set_cookie("nobody", 7), "unknown pod");
        n.save(&path).unwrap();
        let Loaded::Read(back) = Networks::load(&path).unwrap() else {
            panic!("the file was written")
        };
        assert_eq!(back.get("u1"), n.get("u1"));
        assert_eq!(back.uid_of_cookie(42), Some("u1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_file_is_missing_and_a_corrupt_one_is_an_error_set_aside() {
        let dir = scratch("corrupt");
        let path = dir.join("pod-networks.json");
        assert!(matches!(Networks::load(&path), Ok(Loaded::Missing)));
        std::fs::write(&path, b"{\"u1\": {\"uid\": tru").unwrap();
        let err = Networks::load(&path).unwrap_err();
        assert!(err.to_string().contains("unreadable"), "{err}");
        assert!(!path.exists(), "set aside, so the next save keeps it");
        assert_eq!(
            std::fs::read(dir.join("pod-networks.json.unreadable")).unwrap(),
            b"{\"u1\": {\"uid\": tru"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_var_run_path_the_agent_cannot_see_is_read_under_run() {
        let none = |_: &Path| false;
        let all = |_: &Path| true;
        let var_run = Path::new("/var/run/netns/cni-1");
        assert_eq!(reachable(var_run, none), Path::new("/run/netns/cni-1"));
        assert_eq!(reachable(var_run, all), var_run, "the host's own link");
        let other = Path::new("/proc/42/ns/net");
        assert_eq!(reachable(other, none), other);
    }

    #[test]
    fn vanished_namespaces_are_forgotten_with_their_cookies() {
        let mut n = Networks::default();
        n.apply(&add("here", "/proc/self/ns/net"));
        n.apply(&add("gone", "/nonexistent/netns"));
        n.set_cookie("here", 1);
        n.set_cookie("gone", 2);
        assert_eq!(n.drop_vanished(), [2]);
        assert!(n.get("gone").is_none());
        assert!(n.get("here").is_some());
        n.apply(&PodEvent::Delete { uid: "here".into() });
        assert!(n.get("here").is_none());
    }
}
