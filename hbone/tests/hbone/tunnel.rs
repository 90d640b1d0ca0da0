//! The 200 path: bytes both ways, half close, and what the handler is told.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_hbone::{PoolConfig, Transferred};

use crate::support::*;

/// 3 MiB: more than one HTTP/2 stream window's worth, so flow control must work both ways.
fn big_payload() -> Vec<u8> {
    (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect()
}

/// Writes `payload` and then EOF to `wr` while reading `rd` to its end; returns what was read.
async fn send_and_read_back(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    payload: &[u8],
) -> Vec<u8> {
    let writer = async {
        wr.write_all(payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.unwrap();
        back
    };
    tokio::join!(writer, reader).1
}

/// `len` bytes each way, as the server's handler is told when the tunnel closes.
async fn assert_closed_after_moving(server: &TestServer, len: usize) {
    let len = len as u64;
    assert_eq!(
        server.handler.next_closed().await,
        Ok(Transferred {
            sent: len,
            received: len
        })
    );
}

#[tokio::test]
async fn tunnel_round_trips_data_both_ways_through_the_handler() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;

        let target = any_target();
        let mut tunnel = client.connect(&server, target).await.unwrap();
        let payload = big_payload();
        let (rd, wr) = tokio::io::split(&mut tunnel);
        let back = send_and_read_back(rd, wr, &payload).await;
        assert!(back == payload, "echoed bytes differ");

        let opened = server.handler.opened.lock().unwrap().clone();
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].target, target);
        assert_eq!(opened[0].identity, client.cred.identity);
        assert_eq!(opened[0].peer.ip(), std::net::Ipv4Addr::LOCALHOST);
        assert_closed_after_moving(&server, payload.len()).await;
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

/// The agent's path: a TCP connection spliced into the tunnel (no byte stream in between). 3 MiB each
/// way, more than a stream window, with the application on the far side echoing; EOF from the TCP side
/// ends the stream and the echo's end comes back as EOF; both ends count every byte.
#[tokio::test]
async fn a_tcp_connection_spliced_into_a_tunnel_round_trips_every_byte() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;
        let mut tunnel = client.connect(&server, any_target()).await.unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = big_payload();
        let sent = payload.clone();
        let downstream = tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (rd, wr) = stream.into_split();
            send_and_read_back(rd, wr, &sent).await
        });
        let (mut accepted, _) = listener.accept().await.unwrap();
        let moved = tunnel.splice(&mut accepted).await.unwrap();
        let back = downstream.await.unwrap();
        assert!(back == payload, "echoed bytes differ");
        let len = payload.len() as u64;
        assert_eq!(
            moved,
            Transferred {
                sent: len,
                received: len
            }
        );
        assert_closed_after_moving(&server, payload.len()).await;
    })
    .await;
}

/// A tunnel waits for room in its HTTP/2 stream before it reads from the application, and gives that
/// room back when the application goes quiet. 70 idle tunnels each keeping a 256 KiB reservation
/// would hold more than the connection's 16 MiB window, and a new tunnel on the same connection
/// would have nothing to send with.
#[tokio::test]
async fn idle_tunnels_leave_the_connection_window_to_the_others() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A tunnel spliced to a TCP connection, as the agent has it; returns the application's end.
        let open = || async {
            let mut tunnel = client.connect(&server, any_target()).await.unwrap();
            let app_end = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut accepted, _) = listener.accept().await.unwrap();
            tokio::spawn(async move { tunnel.splice(&mut accepted).await });
            app_end
        };
        let mut quiet = Vec::new();
        for _ in 0..70 {
            let mut app_end = open().await;
            let chunk = vec![7u8; 300 * 1024];
            app_end.write_all(&chunk).await.unwrap();
            let mut back = vec![0u8; chunk.len()];
            app_end.read_exact(&mut back).await.unwrap();
            quiet.push(app_end);
        }
        assert_eq!(server.handler.opened.lock().unwrap().len(), 70);

        let (rd, wr) = open().await.into_split();
        let payload = big_payload();
        let back = send_and_read_back(rd, wr, &payload).await;
        assert!(back == payload, "echoed bytes differ");
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_no_longer_allowed_is_closed_and_reported_once_while_its_neighbours_carry_on() {
    within(async {
        let ca = Ca::new("root");
        let app = echo_server().await;
        let (server, client) = pair(&ca, Mode::Forward(app), PoolConfig::default()).await;
        let revoked: std::net::SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let kept: std::net::SocketAddr = "10.1.2.3:9090".parse().unwrap();
        let mut doomed = client.connect(&server, revoked).await.unwrap();
        let mut neighbour = client.connect(&server, kept).await.unwrap();
        for tunnel in [&mut doomed, &mut neighbour] {
            tunnel.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            tunnel.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(
            server.accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one pooled connection"
        );

        server.handler.deny(revoked);
        assert_eq!(
            server.handler.next_closed().await,
            Err(std::io::ErrorKind::PermissionDenied),
            "the revoked tunnel is reported closed as denied"
        );
        // Its stream is reset: the client sees the end, not a hang.
        let mut rest = Vec::new();
        let _ = doomed.read_to_end(&mut rest).await;
        assert!(rest.is_empty());

        // The neighbour on the same connection still moves bytes, and is the next (and only) report.
        let (rd, wr) = tokio::io::split(&mut neighbour);
        assert_eq!(send_and_read_back(rd, wr, b"still here").await, b"still here");
        assert_closed_after_moving(&server, 4 + b"still here".len()).await;
    })
    .await;
}
