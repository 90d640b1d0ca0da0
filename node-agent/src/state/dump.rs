//! The state as `/config_dump` shows it: every workload, service and policy the agent holds, as
//! the controller sent them.

use serde_json::{Value, json};
use weft_model::policy::Scope;

use super::State;

fn scope(s: Scope) -> &'static str {
    match s {
        Scope::Namespace => "namespace",
        Scope::Mesh => "mesh",
    }
}

impl State {
    /// `workloads`, `services`, `authorization_policies`, `peer_authentications`, each sorted by
    /// name.
    pub fn dump(&self) -> Value {
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|w| {
                let w = &w.0;
                json!({
                    "name": &**w.key(),
                    "uid": w.uid().to_string(),
                    "node": w.node(),
                    "ips": w.ips(),
                    "service_account": w.service_account(),
                    "identity": w.identity().as_str(),
                    "meshed": self.is_meshed(w),
                    "labels": w.labels(),
                    "services": w.services().iter().map(|s| &**s).collect::<Vec<_>>(),
                    "version": w.version(),
                })
            })
            .collect();
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                let s = &s.0;
                // A dual-stack workload is in both families' lists.
                let endpoints = self
                    .members
                    .get(&*s.name)
                    .map_or(0, |e| e.of_family(false).len().max(e.of_family(true).len()));
                json!({
                    "name": &*s.name,
                    "vips": s.vips,
                    "ports": s.ports.iter().map(|(port, target)| json!({ "port": port, "target_port": target })).collect::<Vec<_>>(),
                    "endpoints": endpoints,
                    "version": s.version,
                })
            })
            .collect();
        let policies: Vec<Value> = self
            .policies
            .by_name
            .values()
            .map(|(p, version)| {
                json!({
                    "name": p.name(),
                    "scope": scope(p.scope()),
                    "action": p.action(),
                    "selector": p.selector(),
                    "rules": p.rule_count(),
                    "version": version,
                })
            })
            .collect();
        let peer_auths: Vec<Value> = self
            .peer_auths
            .by_name
            .values()
            .map(|(p, version)| {
                let (mode, ports) = p.modes();
                json!({
                    "name": p.name(),
                    "scope": scope(p.scope()),
                    "selector": p.selector(),
                    "mode": mode,
                    "port_modes": ports,
                    "version": version,
                })
            })
            .collect();
        json!({
            "workloads": workloads,
            "services": services,
            "authorization_policies": policies,
            "peer_authentications": peer_auths,
        })
    }
}
