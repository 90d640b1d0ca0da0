//! A flood of half-open connections against the HBONE server, alone in its test binary: it counts the
//! process's file descriptors and resident memory, which tests running alongside would disturb.

#[allow(dead_code)]
#[path = "hbone/support.rs"]
mod support;

use std::time::Duration;

use weft_hbone::{
    Pool, PoolConfig,
    server::{Admission, AdmissionLimits, Limits},
};

use crate::support::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 10,000 connections from one source that never start their TLS handshake hold at most that
/// source's share of handshakes (the rest are closed at once), cost a bounded amount of memory, and
/// give every file descriptor back when they go; a client from another address is served meanwhile.
#[tokio::test]
async fn ten_thousand_half_open_handshakes_hold_a_bounded_share_and_others_are_served() {
    const HALF_OPEN: usize = 10_000;
    /// The server's whole cost of the flood, above what the test itself holds.
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    within(async {
        let ca = Ca::new("flood");
        let app = echo_server().await;
        let admission = Admission::new(AdmissionLimits::default());
        let server = TestServer::start_admitting(
            &ca.issue("spiffe://cluster.local/ns/server/sa/api"),
            &ca.bundle(),
            Mode::Forward(app),
            Limits::default(),
            Some(admission.clone()),
        )
        .await;
        let fds_before = open_fds();
        let rss_before = rss_kib();

        let mut flood = Vec::with_capacity(HALF_OPEN);
        for _ in 0..HALF_OPEN {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            flood.push(socket.connect(server.addr).await.unwrap());
        }
        eventually("the server to take every connection", Duration::from_secs(20), || {
            server.accepted() >= HALF_OPEN
        })
        .await;
        let limits = AdmissionLimits::default();
        // The test holds its 10,000 ends; the server, the ends of one source's share only.
        let server_fds = open_fds().saturating_sub(fds_before + HALF_OPEN);
        assert!(
            server_fds <= limits.handshakes_per_source + 8,
            "the server holds {server_fds} descriptors for one source's half-open connections"
        );
        assert!(
            admission.handshakes() <= limits.handshakes_per_source,
            "{} handshakes in flight from one source",
            admission.handshakes()
        );
        let grown = rss_kib().saturating_sub(rss_before);
        assert!(grown < RSS_BOUND_KIB, "the flood cost {grown} KiB");

        // Another client, from another address, is served as usual.
        let client = Client::new(
            ca.issue("spiffe://cluster.local/ns/client/sa/web"),
            ca.bundle(),
            Pool::new(PoolConfig::default()),
        );
        let tunnel = client.connect(&server, any_target()).await.unwrap();
        echoes(tunnel).await;
        drop(client);

        // The flood goes away: every descriptor comes back.
        drop(flood);
        eventually("admission to be empty", Duration::from_secs(10), || {
            admission.connections() <= 1
        })
        .await;
        eventually(
            "file descriptors back to their baseline",
            Duration::from_secs(10),
            || open_fds() <= fds_before + 8,
        )
        .await;
    })
    .await;
}
