//! Pooling: shared connections, the per-connection stream cap, idle close, eviction of broken connections.

use std::time::Duration;

use weft_hbone::{Pool, PoolConfig};

use crate::support::*;

async fn setup(config: PoolConfig) -> (TestServer, Client) {
    let ca = Ca::new("root");
    let app = echo_server().await;
    pair(&ca, Mode::Forward(app), config).await
}

async fn open_concurrently(client: &Client, server: &TestServer, n: usize) -> Vec<weft_hbone::Tunnel> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, addr, identity) = (client.clone(), server.addr, server.identity.clone());
        tasks.spawn(async move { client.connect_expecting(addr, &identity, any_target()).await });
    }
    let mut tunnels = Vec::new();
    while let Some(result) = tasks.join_next().await {
        tunnels.push(result.unwrap().unwrap());
    }
    tunnels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tunnels_to_one_destination_share_one_handshake() {
    within(async {
        let (server, client) = setup(PoolConfig::default()).await;
        let tunnels = open_concurrently(&client, &server, 100).await;
        assert_eq!(tunnels.len(), 100);
        let conns = client.pool.connection_count();
        assert!(conns <= 2, "{conns} connections for 100 tunnels");
        assert_eq!(
            server.accepted(),
            conns,
            "one TCP accept (one handshake) per pooled connection"
        );
        assert_eq!(server.handler.opened_count(), 100);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_cap_spreads_tunnels_over_exactly_enough_connections() {
    within(async {
        let config = PoolConfig {
            max_streams_per_connection: 10,
            ..PoolConfig::default()
        };
        let (server, client) = setup(config).await;
        let tunnels = open_concurrently(&client, &server, 25).await;
        assert_eq!(tunnels.len(), 25);
        assert_eq!(client.pool.connection_count(), 3);
        assert_eq!(server.accepted(), 3);

        // Freed slots are reused before a new connection is dialed.
        drop(tunnels);
        let again = open_concurrently(&client, &server, 5).await;
        assert_eq!(again.len(), 5);
        assert_eq!(server.accepted(), 3);
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    within(async {
        let config = PoolConfig {
            idle_timeout: Duration::from_millis(200),
            ..PoolConfig::default()
        };
        let (server, client) = setup(config).await;
        let tunnels = open_concurrently(&client, &server, 3).await;
        assert_eq!(client.pool.connection_count(), 1);
        drop(tunnels);
        eventually("the idle connection to close", Duration::from_secs(5), || {
            client.pool.connection_count() == 0
        })
        .await;
        // The server sees a clean end of the connection.
        assert!(server.next_result().await.is_ok());

        // A new tunnel dials a new connection.
        let _tunnel = client.connect(&server, any_target()).await.unwrap();
        assert_eq!(server.accepted(), 2);
    })
    .await;
}

#[tokio::test]
async fn busy_connections_outlive_the_idle_timeout() {
    within(async {
        let config = PoolConfig {
            idle_timeout: Duration::from_millis(100),
            ..PoolConfig::default()
        };
        let (server, client) = setup(config).await;
        let _tunnel = client.connect(&server, any_target()).await.unwrap();
        // Wait for something observable that takes longer than the idle timeout: another connection
        // closing idle. A second pool shares nothing with the first.
        let other = Client::new(
            client.cred.clone(),
            client.bundle.clone(),
            Pool::new(PoolConfig {
                idle_timeout: Duration::from_millis(300),
                ..PoolConfig::default()
            }),
        );
        drop(other.connect(&server, any_target()).await.unwrap());
        eventually(
            "the second pool's idle connection to close",
            Duration::from_secs(5),
            || other.pool.connection_count() == 0,
        )
        .await;
        assert_eq!(client.pool.connection_count(), 1);
        // And the busy connection still carries new tunnels.
        let _second = client.connect(&server, any_target()).await.unwrap();
        assert_eq!(server.accepted(), 2);
    })
    .await;
}

#[tokio::test]
async fn broken_connection_is_evicted_and_not_reused() {
    within(async {
        let (server, client) = setup(PoolConfig::default()).await;
        drop(client.connect(&server, any_target()).await.unwrap());
        assert_eq!(client.pool.connection_count(), 1);
        server.kill_connections();
        eventually("the broken connection to be evicted", Duration::from_secs(5), || {
            client.pool.connection_count() == 0
        })
        .await;
        let _tunnel = client.connect(&server, any_target()).await.unwrap();
        assert_eq!(server.accepted(), 2);
        assert_eq!(client.pool.connection_count(), 1);
    })
    .await;
}

#[tokio::test]
async fn unresponsive_peer_times_out() {
    within(async {
        let config = PoolConfig {
            connect_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        };
        let (server, client) = setup(config).await;
        // A peer that accepts TCP but never answers the TLS handshake.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let err = client
            .connect_expecting(silent_addr, &server.identity, any_target())
            .await
            .unwrap_err();
        assert!(matches!(err, weft_hbone::ConnectError::Timeout), "{err:?}");
        assert_eq!(err.reason(), "timeout");
        assert_eq!(client.pool.connection_count(), 0);
        holder.abort();
    })
    .await;
}

#[tokio::test]
async fn dial_failure_is_a_connect_error_and_leaves_no_connection() {
    within(async {
        let (server, client) = setup(PoolConfig::default()).await;
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let err = client
            .connect_expecting(closed, &server.identity, any_target())
            .await
            .unwrap_err();
        assert!(matches!(err, weft_hbone::ConnectError::Connect(_)), "{err:?}");
        assert_eq!(err.reason(), "connect");
        assert_eq!(client.pool.connection_count(), 0);
    })
    .await;
}
