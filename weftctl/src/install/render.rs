//! The manifests of an install, rendered from its options. `deploy/` holds the rendering of the
//! defaults as a kustomize base (a test keeps them equal), so `kubectl apply -k deploy/` and
//! `weftctl install` install the same thing.
//!
//! Kubernetes compatibility: everything here is served by 1.20 and by current releases (apps/v1,
//! rbac/v1, apiextensions/v1, coordination/v1, projected service-account tokens); nothing needs a
//! feature newer than 1.20 (docs/kubernetes.md, "Versions").

use serde_json::{Value, json};

/// What an install is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub namespace: String,
    /// Image names without tag: `<registry>/weft-node`, `<registry>/weft-controller`.
    pub registry: String,
    pub tag: String,
    pub pull_policy: String,
    pub controller_replicas: u32,
    pub trust_domain: String,
    /// The node's CNI directories (hostPath): where the runtime reads its configuration and plugins.
    pub cni_conf_dir: String,
    pub cni_bin_dir: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "weft-system".into(),
            registry: "weft.dev".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            pull_policy: "IfNotPresent".into(),
            controller_replicas: 2,
            trust_domain: "cluster.local".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
        }
    }
}

/// The label every object of an install carries; uninstall finds them by it.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "weft");
/// The audience of the node agents' tokens towards the controller.
pub const TOKEN_AUDIENCE: &str = "weft-controller";
pub const CONTROLLER: &str = "weft-controller";
pub const NODE: &str = "weft-node";

/// One file of the kustomize base: its name and its objects.
pub struct File {
    pub name: &'static str,
    pub objects: Vec<Value>,
}

/// Every file of an install, in the order they are applied.
pub fn render(o: &Options, crds: Vec<Value>) -> Vec<File> {
    vec![
        File {
            name: "namespace.yaml",
            objects: vec![namespace(o)],
        },
        File {
            name: "crds.yaml",
            objects: crds,
        },
        File {
            name: "rbac.yaml",
            objects: rbac(o),
        },
        File {
            name: "controller.yaml",
            objects: controller(o),
        },
        File {
            name: "node.yaml",
            objects: vec![node(o)],
        },
    ]
}

/// `kustomization.yaml` listing the files.
pub fn kustomization(files: &[File]) -> Value {
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": files.iter().map(|f| f.name).collect::<Vec<_>>(),
    })
}

fn labels(name: &str, o: &Options) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        PART_OF.0: PART_OF.1,
        "app.kubernetes.io/version": o.tag,
    })
}

fn meta(name: &str, component: &str, o: &Options) -> Value {
    json!({ "name": name, "namespace": o.namespace, "labels": labels(component, o) })
}

fn namespace(o: &Options) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": o.namespace, "labels": labels("weft", o) },
    })
}

fn rbac(o: &Options) -> Vec<Value> {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| json!({ "apiGroups": groups, "resources": resources, "verbs": verbs });
    // One object by name: `create` cannot be limited so, and gets a rule of its own.
    let named = |groups: &[&str], resources: &[&str], name: &str, verbs: &[&str]| {
        let mut r = rule(groups, resources, verbs);
        r["resourceNames"] = json!([name]);
        r
    };
    let read = ["get", "list", "watch"];
    let cluster_meta = |name: &str, component: &str| json!({ "name": name, "labels": labels(component, o) });
    let subject = |sa: &str| json!([{ "kind": "ServiceAccount", "name": sa, "namespace": o.namespace }]);
    vec![
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONTROLLER, CONTROLLER, o) }),
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NODE, NODE, o) }),
        // The controller reads what the mesh is made of, writes the policies' status, and checks the
        // agents' tokens.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": cluster_meta(CONTROLLER, CONTROLLER),
            "rules": [
                rule(&[""], &["namespaces", "pods", "services", "serviceaccounts"], &read),
                rule(&["security.weft.dev"], &["authorizationpolicies", "peerauthentications"], &read),
                rule(&["security.weft.dev"], &["authorizationpolicies/status", "peerauthentications/status"], &["patch"]),
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": cluster_meta(CONTROLLER, CONTROLLER),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER },
            "subjects": subject(CONTROLLER),
        }),
        // In its own namespace: the CA root (Secret), its public part for the agents (ConfigMap), the
        // leader's Lease.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(CONTROLLER, CONTROLLER, o),
            "rules": [
                named(&[""], &["secrets"], "weft-ca", &["get"]),
                rule(&[""], &["secrets"], &["create"]),
                named(&[""], &["configmaps"], "weft-root-ca", &["get", "update"]),
                rule(&[""], &["configmaps"], &["create"]),
                named(&["coordination.k8s.io"], &["leases"], CONTROLLER, &["get", "update"]),
                rule(&["coordination.k8s.io"], &["leases"], &["create"]),
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(CONTROLLER, CONTROLLER, o),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER },
            "subjects": subject(CONTROLLER),
        }),
        // The agent learns its pods from the controller; on the API server it only writes their
        // status (whether redirection is active). RBAC cannot limit that to its own node's pods.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": cluster_meta(NODE, NODE),
            "rules": [
                rule(&[""], &["pods/status"], &["patch"]),
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": cluster_meta(NODE, NODE),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NODE },
            "subjects": subject(NODE),
        }),
        // In Weft's namespace: where the controllers are, and whether its own DaemonSet is being
        // removed (an uninstall, not a restart).
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(NODE, NODE, o),
            "rules": [
                rule(&[""], &["endpoints"], &["list", "watch"]),
                rule(&["apps"], &["daemonsets"], &["get"]),
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(NODE, NODE, o),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NODE },
            "subjects": subject(NODE),
        }),
    ]
}

fn image(o: &Options, name: &str) -> String {
    format!("{}/{name}:{}", o.registry, o.tag)
}

fn field_env(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

fn controller(o: &Options) -> Vec<Value> {
    let selector = json!({ "app.kubernetes.io/name": CONTROLLER });
    vec![
        // Headless: the agents connect to the replicas' own addresses (from the Endpoints) and fail
        // over between them; there is no virtual IP to lose.
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(CONTROLLER, CONTROLLER, o),
            "spec": {
                "clusterIP": "None",
                "selector": selector,
                "ports": [{ "name": "grpc", "port": 15012, "targetPort": 15012, "protocol": "TCP" }],
            },
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(CONTROLLER, CONTROLLER, o),
            "spec": {
                "replicas": o.controller_replicas,
                "selector": { "matchLabels": selector },
                "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
                "template": {
                    "metadata": { "labels": labels(CONTROLLER, o) },
                    "spec": {
                        "serviceAccountName": CONTROLLER,
                        "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
                        // Replicas on different nodes where there are several.
                        "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": { "matchLabels": selector },
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }] } },
                        "containers": [{
                            "name": "controller",
                            "image": image(o, "weft-controller"),
                            "imagePullPolicy": o.pull_policy,
                            "args": [
                                "--source", "kubernetes",
                                "--namespace", o.namespace,
                                "--listen", "0.0.0.0:15012",
                                "--trust-domain", o.trust_domain,
                                "--state-dir", "/var/lib/weft",
                                "--log-format", "json",
                            ],
                            "env": [
                                field_env("POD_NAME", "metadata.name"),
                                field_env("POD_NAMESPACE", "metadata.namespace"),
                                field_env("POD_IP", "status.podIP"),
                            ],
                            "ports": [{ "name": "grpc", "containerPort": 15012, "protocol": "TCP" }],
                            // Listening means serving: the controller binds only after its first
                            // complete view of the cluster.
                            "readinessProbe": { "tcpSocket": { "port": 15012 }, "periodSeconds": 2 },
                            "resources": { "requests": { "cpu": "50m", "memory": "64Mi" } },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": { "drop": ["ALL"] },
                            },
                            "volumeMounts": [{ "name": "state", "mountPath": "/var/lib/weft" }],
                        }],
                        "volumes": [{ "name": "state", "emptyDir": {} }],
                    },
                },
            },
        }),
    ]
}

fn node(o: &Options) -> Value {
    let selector = json!({ "app.kubernetes.io/name": NODE });
    let host = |name: &str, path: &str, kind: &str| json!({ "name": name, "hostPath": { "path": path, "type": kind } });
    let mount = |name: &str, path: &str| json!({ "name": name, "mountPath": path });
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(NODE, NODE, o),
        "spec": {
            "selector": { "matchLabels": selector },
            // One node at a time. While a node's agent restarts its pods stay captured and their
            // connections are refused (never sent around the mesh); the new agent takes them over.
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1 } },
            "template": {
                "metadata": {
                    "labels": labels(NODE, o),
                    // Prometheus's Kubernetes pod discovery, as its example configuration reads them.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": "15020",
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": NODE,
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "tolerations": [{ "operator": "Exists" }],
                    "terminationGracePeriodSeconds": 30,
                    "initContainers": [{
                        "name": "install-cni",
                        "image": image(o, "weft-node"),
                        "imagePullPolicy": o.pull_policy,
                        "command": [
                            "/usr/bin/weft-cni", "install",
                            "--bin-dir", "/host/opt/cni/bin",
                            "--conf-dir", "/host/etc/cni/net.d",
                            "--agent-socket", "/run/weft/cni.sock",
                        ],
                        "securityContext": { "runAsUser": 0, "capabilities": { "drop": ["ALL"], "add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"] } },
                        "volumeMounts": [mount("cni-bin", "/host/opt/cni/bin"), mount("cni-conf", "/host/etc/cni/net.d")],
                    }],
                    "containers": [{
                        "name": "agent",
                        "image": image(o, "weft-node"),
                        "imagePullPolicy": o.pull_policy,
                        "args": [
                            "--kubernetes",
                            "--controller-endpoints", format!("{}/{CONTROLLER}", o.namespace),
                            "--controller-ca", "/etc/weft/ca/root.pem",
                            "--node-token-file", "/var/run/secrets/weft/token",
                            "--trust-domain", o.trust_domain,
                            "--cgroup", "auto",
                            "--state-dir", "/var/lib/weft/node",
                            "--bpf-pin-dir", "/sys/fs/bpf/weft",
                            "--cni-socket", "/run/weft/cni.sock",
                            "--cni-conf-dir", "/host/etc/cni/net.d",
                            "--cni-bin-dir", "/host/opt/cni/bin",
                            "--log-format", "json",
                        ],
                        "env": [
                            field_env("WEFT_NODE_NAME", "spec.nodeName"),
                            { "name": "WEFT_DAEMONSET", "value": format!("{}/{NODE}", o.namespace) },
                        ],
                        "resources": { "requests": { "cpu": "50m", "memory": "32Mi" } },
                        // On the node's addresses (hostNetwork); the admin API stays on loopback.
                        "ports": [
                            { "name": "http-metrics", "containerPort": 15020, "protocol": "TCP" },
                            { "name": "http-health", "containerPort": 15021, "protocol": "TCP" },
                        ],
                        // Ready once the controller's config is in and every enrolled pod is served;
                        // not ready while it stops.
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": 15021 },
                            "periodSeconds": 2,
                        },
                        // What the agent does, not blanket privilege: load and attach eBPF (BPF,
                        // PERFMON, NET_ADMIN), enter pods' network namespaces and set their sysctls
                        // (SYS_ADMIN), transparent sockets from a client's address (NET_ADMIN, NET_RAW).
                        "securityContext": {
                            "privileged": false,
                            "runAsUser": 0,
                            "capabilities": { "drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"] },
                            "seccompProfile": { "type": "Unconfined" },
                        },
                        "volumeMounts": [
                            mount("bpf", "/sys/fs/bpf"),
                            mount("cgroup", "/sys/fs/cgroup"),
                            { "name": "netns", "mountPath": "/run/netns", "mountPropagation": "HostToContainer" },
                            mount("proc-sys", "/host/proc/sys"),
                            mount("run-weft", "/run/weft"),
                            mount("state", "/var/lib/weft"),
                            mount("cni-bin", "/host/opt/cni/bin"),
                            mount("cni-conf", "/host/etc/cni/net.d"),
                            { "name": "ca", "mountPath": "/etc/weft/ca", "readOnly": true },
                            { "name": "token", "mountPath": "/var/run/secrets/weft", "readOnly": true },
                        ],
                    }],
                    "volumes": [
                        host("bpf", "/sys/fs/bpf", "Directory"),
                        host("cgroup", "/sys/fs/cgroup", "Directory"),
                        host("netns", "/run/netns", "DirectoryOrCreate"),
                        host("proc-sys", "/proc/sys", "Directory"),
                        host("run-weft", "/run/weft", "DirectoryOrCreate"),
                        host("state", "/var/lib/weft", "DirectoryOrCreate"),
                        host("cni-bin", &o.cni_bin_dir, "DirectoryOrCreate"),
                        host("cni-conf", &o.cni_conf_dir, "DirectoryOrCreate"),
                        { "name": "ca", "configMap": { "name": "weft-root-ca" } },
                        { "name": "token", "projected": { "sources": [{ "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": 3600,
                            "path": "token",
                        } }] } },
                    ],
                },
            },
        },
    })
}

/// Multi-document YAML of `objects`.
pub fn yaml(objects: &[Value]) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(out)
}
