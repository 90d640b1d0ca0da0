//! What a client that misbehaves or vanishes can cost the server: bounded, and nothing of it
//! reaches a well-behaved client alongside.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_hbone::{Pool, PoolConfig, PoolKey, server::Limits};

use crate::support::*;

/// A TCP relay that can go silent: after [`Relay::vanish`] it neither forwards nor closes anything,
/// as a peer whose node lost power (no FIN, no RST).
struct Relay {
    addr: SocketAddr,
    vanish: watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (vanish, watched) = watch::channel(false);
        let held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut up = TcpStream::connect(upstream).await.unwrap();
                let (mut watched, held) = (watched.clone(), held.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = watched.wait_for(|v| *v) => held.lock().unwrap().push((down, up)),
                    }
                });
            }
        });
        Self { addr, vanish }
    }

    fn vanish(&self) {
        self.vanish.send_replace(true);
    }
}

/// 1,000 tunnels from a client that then vanishes are closed once its connections leave a keepalive
/// PING unanswered, each one reported closed (the application's side closes with it); a client
/// connecting directly meanwhile is served as usual.
#[tokio::test]
async fn tunnels_of_a_client_that_vanished_are_closed_by_keepalive() {
    const TUNNELS: usize = 1000;
    within(async {
        let ca = Ca::new("vanish");
        let app = echo_server().await;
        let limits = Limits {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let server = TestServer::start_with_limits(
            &ca.issue("spiffe://cluster.local/ns/server/sa/api"),
            &ca.bundle(),
            Mode::Forward(app),
            limits,
        )
        .await;
        let relay = Relay::start(server.addr).await;
        let client = Client::new(
            ca.issue("spiffe://cluster.local/ns/client/sa/web"),
            ca.bundle(),
            Pool::new(PoolConfig::default()),
        );
        let mut tunnels = Vec::with_capacity(TUNNELS);
        for _ in 0..TUNNELS {
            tunnels.push(
                client
                    .connect_expecting(relay.addr, &server.identity, any_target())
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(server.handler.opened_count(), TUNNELS);

        relay.vanish();
        for closed in 0..TUNNELS {
            let result = tokio::time::timeout(Duration::from_secs(10), server.handler.next_closed())
                .await
                .unwrap_or_else(|_| panic!("only {closed} of {TUNNELS} tunnels were closed"));
            assert!(result.is_err(), "a tunnel cut off by keepalive ends with an error");
        }

        // Alongside, a well-behaved client is served.
        let other = Client::new(
            ca.issue("spiffe://cluster.local/ns/client/sa/other"),
            ca.bundle(),
            Pool::new(PoolConfig::default()),
        );
        let key = PoolKey {
            source: "other".into(),
            destination: server.identity.clone(),
            peer: server.addr,
        };
        let (cred, bundle) = (&other.cred, &other.bundle);
        let tunnel = other
            .pool
            .connect(
                key,
                || weft_hbone::client_config(cred, bundle, &server.identity),
                TcpStream::connect,
                any_target(),
            )
            .await
            .unwrap();
        echoes(tunnel).await;
        drop(tunnels);
    })
    .await;
}
