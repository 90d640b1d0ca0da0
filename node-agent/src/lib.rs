//! The node agent: captures enrolled pods' traffic with eBPF and proxies it.

pub mod access;
pub mod adopt;
pub mod app;
pub mod capture;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod controller;
pub mod discovery;
pub mod endpoints;
pub mod errors;
pub mod identity;
pub mod inpod;
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod networks;
pub mod pod;
pub mod proxy;
pub mod redirection;
pub mod state;
pub mod telemetry;
pub mod uninstall;
