//! The 200 path: bytes both ways, half close, and what the handler is told.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_hbone::{PoolConfig, Transferred};

use crate::support::*;

#[tokio::test]
async fn tunnel_round_trips_data_both_ways_through_the_handler() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;

        let target = any_target();
        let mut tunnel = client.connect(&server, target).await.unwrap();
        // 3 MiB: more than one HTTP/2 stream window's worth, so flow control must work both ways.
        let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = tokio::io::split(&mut tunnel);
        let writer = async {
            wr.write_all(&payload).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let reader = async {
            let mut back = Vec::new();
            rd.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(writer, reader);
        assert!(back == payload, "echoed bytes differ");

        let opened = server.handler.opened.lock().unwrap().clone();
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].target, target);
        assert_eq!(opened[0].identity, client.cred.identity);
        assert_eq!(opened[0].peer.ip(), std::net::Ipv4Addr::LOCALHOST);
        let len = payload.len() as u64;
        assert_eq!(
            server.handler.next_closed().await,
            Ok(Transferred {
                sent: len,
                received: len
            })
        );
    })
    .await;
}

#[tokio::test]
async fn half_close_from_the_client_reaches_the_application_which_can_still_answer() {
    within(async {
        let ca = Ca::new("root");
        let app = counting_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;

        let mut tunnel = client.connect(&server, any_target()).await.unwrap();
        tunnel.write_all(&[7u8; 1000]).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut answer = String::new();
        tunnel.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 1000");
        assert_eq!(
            server.handler.next_closed().await,
            Ok(Transferred {
                sent: 1000,
                received: 8
            })
        );
    })
    .await;
}

#[tokio::test]
async fn credential_reads_identity_and_validity_from_the_leaf() {
    let ca = Ca::new("root");
    let cred = ca.issue_expired("spiffe://cluster.local/ns/a/sa/b");
    assert_eq!(cred.identity, id("a", "b"));
    assert!(cred.not_after < std::time::SystemTime::now());
    assert!(cred.not_before < cred.not_after);
    assert_eq!(cred.chain.len(), 1);
}

#[tokio::test]
async fn ipv6_targets_travel_as_bracketed_authorities() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;
        let target: std::net::SocketAddr = "[fd00::17]:9090".parse().unwrap();
        let _tunnel = client.connect(&server, target).await.unwrap();
        assert_eq!(server.handler.opened.lock().unwrap()[0].target, target);
    })
    .await;
}
