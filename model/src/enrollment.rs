//! Which pods the mesh captures.

use std::collections::BTreeMap;

use crate::{
    annotations::{DATAPLANE_MODE, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_NONE},
    workload::{Namespace, Pod, WorkloadSnapshot},
};

/// Whether `pod` is enrolled in the ambient data plane, given its namespace.
///
/// A pod annotation wins over its namespace's: `none` opts out, `ambient` opts in. Otherwise the pod
/// is enrolled when its namespace is annotated `ambient`. The store refuses any other value
/// ([`crate::annotations::validate_value`]); should one arrive anyway, it counts as no annotation on a
/// pod (the namespace decides) and enrolls nothing on a namespace.
pub fn is_enrolled(pod: &Pod, namespace: Option<&Namespace>) -> bool {
    is_enrolled_by_annotations(&pod.annotations, namespace)
}

/// [`is_enrolled`] for a pod known by its annotations, all that the decision reads of it (the node
/// agent holds pods in a compact form of its own).
pub fn is_enrolled_by_annotations(pod_annotations: &BTreeMap<String, String>, namespace: Option<&Namespace>) -> bool {
    match pod_annotations.get(DATAPLANE_MODE).map(String::as_str) {
        Some(DATAPLANE_MODE_NONE) => false,
        Some(DATAPLANE_MODE_AMBIENT) => true,
        _ => namespace
            .and_then(|ns| ns.annotations.get(DATAPLANE_MODE))
            .is_some_and(|mode| mode == DATAPLANE_MODE_AMBIENT),
    }
}

/// The pods on `node` that must be captured, with a known network namespace.
pub fn enrolled_on<'a>(snapshot: &'a WorkloadSnapshot, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
    snapshot
        .pods_on(node)
        .filter(move |p| p.netns.is_some() && is_enrolled(p, snapshot.namespace(&p.namespace)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ns(mode: Option<&str>) -> Namespace {
        Namespace {
            name: "shop".into(),
            annotations: mode
                .map(|m| BTreeMap::from([(DATAPLANE_MODE.to_owned(), m.to_owned())]))
                .unwrap_or_default(),
        }
    }

    fn pod(mode: Option<&str>) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: "cart".into(),
            annotations: mode
                .map(|m| BTreeMap::from([(DATAPLANE_MODE.to_owned(), m.to_owned())]))
                .unwrap_or_default(),
            ..Pod::default()
        }
    }

    #[test]
    fn namespace_annotation_enrolls_its_pods() {
        assert!(is_enrolled(&pod(None), Some(&ns(Some("ambient")))));
        assert!(!is_enrolled(&pod(None), Some(&ns(None))));
        assert!(!is_enrolled(&pod(None), Some(&ns(Some("sidecar")))));
        assert!(!is_enrolled(&pod(None), None));
    }

    #[test]
    fn pod_annotation_overrides_namespace() {
        assert!(!is_enrolled(&pod(Some("none")), Some(&ns(Some("ambient")))));
        assert!(is_enrolled(&pod(Some("ambient")), Some(&ns(None))));
    }

    #[test]
    fn only_pods_on_the_node_with_a_netns_are_captured() {
        let mut a = pod(None);
        a.node = "n1".into();
        a.netns = Some("/var/run/netns/a".into());
        let mut b = a.clone();
        b.node = "n2".into();
        let mut c = a.clone();
        c.netns = None;
        let snap = WorkloadSnapshot {
            namespaces: vec![ns(Some("ambient"))],
            pods: vec![a.clone(), b, c],
        };
        let got: Vec<_> = enrolled_on(&snap, "n1").collect();
        assert_eq!(got, vec![&a]);
    }
}
