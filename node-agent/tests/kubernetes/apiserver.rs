//! The agent's view of a real API server for tests ([`weft_test_apiserver`]: etcd and
//! kube-apiserver 1.20 on loopback, killed and removed on drop): an administrator (through
//! `kubectl`, to set the scene) and the agent's own service account
//! (`system:serviceaccount:weft-system:weft-node`) with only the RBAC the agent needs,
//! [`AGENT_RBAC`], through the agent's own client.

use std::{fs, ops::Deref};

use weft_node::kube;
use weft_test_apiserver::{ADMIN_TOKEN, User};

const AGENT_TOKEN: &str = "weft-test-agent-token";

/// What the agent's service account may do: the least the agent needs (the manifests may grant
/// more), so that the tests fail if the agent needs anything else.
pub const AGENT_RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: weft-node}
rules:
- {apiGroups: [""], resources: [pods/status], verbs: [patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: weft-node}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: weft-node}
subjects: [{kind: ServiceAccount, name: weft-node, namespace: weft-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: weft-node, namespace: weft-system}
rules:
- {apiGroups: [""], resources: [endpoints], verbs: [list, watch]}
- {apiGroups: [apps], resources: [daemonsets], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: weft-node, namespace: weft-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: weft-node}
subjects: [{kind: ServiceAccount, name: weft-node, namespace: weft-system}]
"#;

pub struct ApiServer(weft_test_apiserver::ApiServer);

impl Deref for ApiServer {
    type Target = weft_test_apiserver::ApiServer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl ApiServer {
    /// Starts etcd and the API server (with `extra` flags), waits until it is ready and applies
    /// [`AGENT_RBAC`]; `None` (a note printed) when a binary is missing outside CI.
    pub fn start(test: &str, extra: &[&str]) -> Option<ApiServer> {
        let agent = User {
            token: AGENT_TOKEN,
            name: "system:serviceaccount:weft-system:weft-node",
            groups: "system:serviceaccounts,system:serviceaccounts:weft-system",
        };
        let server = weft_test_apiserver::ApiServer::start(test, extra, &[agent])?;
        for (file, token) in [("admin-token", ADMIN_TOKEN), ("agent-token", AGENT_TOKEN)] {
            fs::write(server.dir().join(file), token).unwrap();
        }
        server.apply(AGENT_RBAC);
        Some(ApiServer(server))
    }

    /// A client of the agent's kind, with the agent's credentials and `deadlines`.
    pub fn agent(&self, deadlines: kube::Deadlines) -> kube::Client {
        self.client("agent-token", deadlines)
    }

    /// A client with the administrator's credentials.
    pub fn admin(&self) -> kube::Client {
        self.client("admin-token", kube::Deadlines::default())
    }

    fn client(&self, token: &str, deadlines: kube::Deadlines) -> kube::Client {
        kube::Client::new(kube::Config {
            url: self.url.clone(),
            ca_file: self.ca_file.clone(),
            token_file: self.dir().join(token),
            deadlines,
        })
        .unwrap()
    }
}
