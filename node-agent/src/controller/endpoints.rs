//! The controller's replicas in Kubernetes: the ready addresses of its Service's `Endpoints` (v1,
//! core: Kubernetes 1.20 does not serve `EndpointSlice` v1) on the port named `grpc`, or the only
//! port. The set feeds a balanced gRPC channel (`Change::Insert`/`Remove`); a replica that stops
//! being ready or goes away is removed, so calls after that go to the others.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use tokio::sync::mpsc::Sender;
use tonic::transport::{Endpoint, channel::Change};

use super::Error;
use crate::{
    config::ObjectName,
    errors::display_chain,
    kube::{self, EndpointPort, Endpoints, Event},
};

/// The name of the controller Service's gRPC port.
pub const PORT_NAME: &str = "grpc";

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The addresses to call: every ready address of each subset, on that subset's `grpc` port (or its
/// only port). Not-ready addresses and subsets without such a port are left out.
pub fn targets(endpoints: &Endpoints) -> BTreeSet<SocketAddr> {
    endpoints
        .subsets
        .iter()
        .filter_map(|subset| port(&subset.ports).map(|port| (subset, port)))
        .flat_map(|(subset, port)| {
            subset
                .addresses
                .iter()
                .filter_map(move |a| a.ip.parse().ok().map(|ip| SocketAddr::new(ip, port)))
        })
        .collect()
}

fn port(ports: &[EndpointPort]) -> Option<u16> {
    match ports {
        [only] => Some(only.port),
        _ => ports.iter().find(|p| p.name == PORT_NAME).map(|p| p.port),
    }
}

/// Follows `service`'s Endpoints forever, sending each change of its [`targets`] to `changes`
/// (additions first, so that a replaced replica leaves no moment without one). Errors are logged and
/// retried with backoff; returns when the channel is gone.
pub async fn follow(
    kube: kube::Client,
    service: ObjectName,
    make: impl Fn(SocketAddr) -> Result<Endpoint, Error>,
    changes: Sender<Change<SocketAddr, Endpoint>>,
) {
    let path = format!("/api/v1/namespaces/{}/endpoints", service.namespace);
    let selector = format!(
        "fieldSelector={}",
        kube::query_value(&format!("metadata.name={}", service.name))
    );
    let mut watcher = kube.watch::<Endpoints>(&path, &selector);
    let mut current = BTreeSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        let next = match watcher.next().await {
            Ok(Event::Restarted(items)) => items
                .iter()
                .find(|e| e.metadata.name == service.name)
                .map(targets)
                .unwrap_or_default(),
            Ok(Event::Applied(e)) if e.metadata.name == service.name => targets(&e),
            Ok(Event::Deleted(e)) if e.metadata.name == service.name => BTreeSet::new(),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(service = %service, error = %display_chain(&e), "watching the controller's endpoints; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if next == current {
            continue;
        }
        let shown: Vec<String> = next.iter().map(ToString::to_string).collect();
        if next.is_empty() {
            tracing::warn!(service = %service, "no ready controller replica; calls wait for one");
        } else {
            tracing::info!(service = %service, replicas = ?shown, "controller replicas");
        }
        for addr in next.difference(&current) {
            match make(*addr) {
                Ok(endpoint) => {
                    if changes.send(Change::Insert(*addr, endpoint)).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(error = %display_chain(&e), "controller replica left out"),
            }
        }
        for addr in current.difference(&next) {
            if changes.send(Change::Remove(*addr)).await.is_err() {
                return;
            }
        }
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::{EndpointAddress, EndpointSubset};

    fn subset(ready: &[&str], not_ready: &[&str], ports: &[(&str, u16)]) -> EndpointSubset {
        let addresses = |ips: &[&str]| ips.iter().map(|ip| EndpointAddress { ip: (*ip).to_owned() }).collect();
        EndpointSubset {
            addresses: addresses(ready),
            not_ready_addresses: addresses(not_ready),
            ports: ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: (*name).to_owned(),
                    port: *port,
                    protocol: "TCP".into(),
                })
                .collect(),
        }
    }

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().expect("socket address")).collect()
    }

    #[test]
    fn ready_addresses_on_the_grpc_port_or_the_only_port_are_the_targets() {
        let cases: Vec<(Vec<EndpointSubset>, BTreeSet<SocketAddr>)> = vec![
            // Named among others: only grpc.
            (
                vec![subset(
                    &["10.244.1.5", "10.244.2.7"],
                    &["10.244.1.9"],
                    &[("metrics", 15014), ("grpc", 15012)],
                )],
                addrs(&["10.244.1.5:15012", "10.244.2.7:15012"]),
            ),
            // The only port, whatever its name (or none).
            (
                vec![subset(&["10.244.1.5"], &[], &[("", 15012)])],
                addrs(&["10.244.1.5:15012"]),
            ),
            // Several ports, none named grpc: nothing to call.
            (vec![subset(&["10.244.1.5"], &[], &[("a", 1), ("b", 2)])], addrs(&[])),
            // Nothing ready.
            (vec![subset(&[], &["10.244.1.5"], &[("grpc", 15012)])], addrs(&[])),
            // Subsets with their own ports; IPv6; an address that is not one is left out.
            (
                vec![
                    subset(&["10.244.1.5"], &[], &[("grpc", 15012)]),
                    subset(&["fd00:10:244:2::7", "bogus"], &[], &[("grpc", 16012)]),
                ],
                addrs(&["10.244.1.5:15012", "[fd00:10:244:2::7]:16012"]),
            ),
            (vec![], addrs(&[])),
        ];
        for (i, (subsets, want)) in cases.into_iter().enumerate() {
            let e = Endpoints {
                subsets,
                ..Endpoints::default()
            };
            assert_eq!(targets(&e), want, "case {i}");
        }
    }
}
