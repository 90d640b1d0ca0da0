//! What Weft's chained CNI plugin reports to the node agent: a pod's network, as the container runtime
//! created it. One JSON object per line over the agent's unix socket, answered by one [`Reply`].

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// A pod's network on its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetwork {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses from the previous plugin's result.
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum PodEvent {
    /// `CNI_COMMAND=ADD`.
    Add(PodNetwork),
    /// `CNI_COMMAND=DEL`.
    Delete { uid: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_wire_form() {
        let add = PodEvent::Add(PodNetwork {
            uid: "u1".into(),
            namespace: "shop".into(),
            name: "cart".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
        });
        let wire = serde_json::to_string(&add).unwrap();
        assert_eq!(
            wire,
            r#"{"event":"add","uid":"u1","namespace":"shop","name":"cart","netns":"/var/run/netns/x","ips":["10.244.1.5"]}"#
        );
        assert_eq!(serde_json::from_str::<PodEvent>(&wire).unwrap(), add);
        let del: PodEvent = serde_json::from_str(r#"{"event":"delete","uid":"u1"}"#).unwrap();
        assert_eq!(del, PodEvent::Delete { uid: "u1".into() });
    }
}
