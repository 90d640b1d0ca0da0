//! Namespaces and pods, as the node agent needs to know them.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// A Kubernetes namespace: its name and annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A pod, with what the data plane needs: where it runs, who it is, its addresses and its network
/// namespace (reported by the CNI plugin on the pod's node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Pod addresses, one per family (dual stack).
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace on its node (`/proc/<pid>/ns/net` or a bind mount).
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Pod {
    /// `namespace/name`, the form used in logs and on the command line.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Checks that `uid` is a UID the way Kubernetes writes one: an RFC 4122 UUID in its canonical
/// lowercase form, 8-4-4-4-12 hex digits (any version). The node agent names paths after pod uids
/// (`<pin dir>/pods/<uid>`), so nothing else (empty, `..`, `/`, upper case) may pass. The error is the
/// problem alone, for the caller to prefix with the object and field.
pub fn validate_uid(uid: &str) -> Result<(), String> {
    let b = uid.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{uid:?} is not a UID (8-4-4-4-12 lowercase hex)"))
    }
}

/// A random (version 4) UUID from 16 random bytes, in the form [`validate_uid`] accepts. The bytes
/// come from the caller (the model does no I/O): they must come from the OS's random source.
pub fn uuid_v4(mut random: [u8; 16]) -> String {
    random[6] = (random[6] & 0x0f) | 0x40;
    random[8] = (random[8] & 0x3f) | 0x80;
    let hex: String = random.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Everything a node agent is told about workloads: one consistent snapshot. Sources (the dev
/// cluster's store today, the controller next) publish whole snapshots; the agent reconciles to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSnapshot {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

impl WorkloadSnapshot {
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    /// Pods scheduled on `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_must_be_a_lowercase_uuid() {
        validate_uid("0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03").unwrap();
        validate_uid("00000000-0000-0000-0000-000000000000").unwrap();
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "u1",
            "0B5E1C2A-7D3F-4A61-9C8E-2F4B6D8A1E03",
            "0b5e1c2a7d3f4a619c8e2f4b6d8a1e03",
            "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e0/",
            "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e033",
            "0b5e1c2a-7d3f-4a61-9c8e_2f4b6d8a1e03",
            "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e0\u{e9}",
        ] {
            let err = validate_uid(bad).expect_err(bad);
            assert_eq!(err, format!("{bad:?} is not a UID (8-4-4-4-12 lowercase hex)"));
        }
    }

    #[test]
    fn uuid_v4_is_a_valid_uid_with_version_and_variant() {
        for random in [[0u8; 16], [0xff; 16], *b"0123456789abcdef"] {
            let uid = uuid_v4(random);
            validate_uid(&uid).unwrap();
            assert_eq!(&uid[14..15], "4", "{uid}");
            assert!(matches!(&uid[19..20], "8" | "9" | "a" | "b"), "{uid}");
        }
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }
}
