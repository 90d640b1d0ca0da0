//! The record layer against rustls's own (tokio-rustls) on the other end of a real TCP connection: the
//! bytes on the wire must be TLS 1.3 as rustls writes and reads it, key updates included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::identity::Identity;
use crate::tls::{Credential, TrustBundle, client_config, client_config_for_suite, server_config};

const DEADLINE: Duration = Duration::from_secs(30);
const TD: &str = "cluster.local";

struct Pki {
    bundle: TrustBundle,
    client: Credential,
    server: Credential,
}

fn pki() -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()).unwrap();
    let issue = |id: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id).unwrap())];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        Credential::from_pem(&[cert.pem()], &key.serialize_pem()).unwrap()
    };
    Pki {
        bundle: TrustBundle::from_pem(TD, &[ca.pem()]).unwrap(),
        client: issue("spiffe://cluster.local/ns/a/sa/client"),
        server: issue("spiffe://cluster.local/ns/b/sa/server"),
    }
}

impl Pki {
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.client, &self.bundle, &self.server.identity).unwrap()
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        server_config(&self.server, &self.bundle).unwrap()
    }

    /// The client configuration with only `suite` offered.
    fn client_config_with(&self, suite: rustls::SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
        client_config_for_suite(&self.client, &self.bundle, &self.server.identity, suite).unwrap()
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("test deadline exceeded")
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), server.unwrap().0)
}

fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Bytes that tell where they were cut or reordered.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

/// Writes `data` in pieces of the given sizes (cycled), then shuts the write half.
async fn send_in_pieces<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8], pieces: &[usize]) {
    let mut at = 0;
    for &n in pieces.iter().cycle() {
        if at == data.len() {
            break;
        }
        let n = n.min(data.len() - at);
        w.write_all(&data[at..at + n]).await.unwrap();
        at += n;
    }
    w.flush().await.unwrap();
}

async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R, chunk: usize) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Our client and rustls's server exchange data both ways (large and tiny writes, small and large reads)
/// and close with close_notify: every byte arrives in order and the ends are clean.
#[tokio::test]
async fn our_client_and_a_rustls_server_exchange_every_byte() {
    within(async {
        let pki = pki();
        let (c, s) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let up = pattern(3 << 20, 1);
        let down = pattern(1 << 20, 2);
        let (expect_up, reply) = (up.clone(), down.clone());
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let got = read_to_end(&mut tls, 7000).await.unwrap();
            assert!(got == expect_up, "server got {} bytes, not what was sent", got.len());
            send_in_pieces(&mut tls, &reply, &[1, 100_000, 5, 16_384]).await;
            tls.shutdown().await.unwrap();
        });
        let (mut tls, negotiated) = connect(pki.client_config(), server_name(), c, 1 << 20).await.unwrap();
        assert_eq!(negotiated.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(negotiated.version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(negotiated.identity, Some(Identity::try_new(TD, "b", "server").unwrap()));
        send_in_pieces(&mut tls, &up, &[300_000, 3, 9, 70_000, 1]).await;
        tls.shutdown().await.unwrap();
        // Small reads take the copy-out path, so read in a size that never matches a record.
        let got = read_to_end(&mut tls, 1000).await.unwrap();
        assert!(got == down, "client got {} bytes, not what was sent", got.len());
        server.await.unwrap();
    })
    .await;
}

/// A rustls client and our server, each asking the other for a key update mid-stream: both sides switch keys
/// in step and no byte is lost.
#[tokio::test]
async fn key_updates_either_way_keep_the_stream_intact() {
    within(async {
        let pki = pki();
        let (c, s) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let first = pattern(200_000, 3);
        let second = pattern(200_000, 4);
        let (f, g) = (first.clone(), second.clone());
        let client = tokio::spawn(async move {
            let mut tls = connector.connect(server_name(), c).await.unwrap();
            tls.write_all(&f).await.unwrap();
            tls.flush().await.unwrap();
            // rustls asks for an update (update_requested): our server must answer with its own.
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(&g).await.unwrap();
            tls.shutdown().await.unwrap();
            read_to_end(&mut tls, 64 * 1024).await.unwrap()
        });
        let (mut tls, _) = accept(pki.server_config(), s, 1 << 20).await.unwrap();
        // Ours updates its send key every 3 records as well.
        tls.set_tx_update_at(3);
        let got = read_to_end(&mut tls, 256 * 1024).await.unwrap();
        let mut expect = first.clone();
        expect.extend_from_slice(&second);
        assert!(got == expect, "server got {} bytes, not what was sent", got.len());
        let reply = pattern(500_000, 5);
        send_in_pieces(&mut tls, &reply, &[50_000]).await;
        assert!(
            tls.tx_seq() <= 3,
            "the send key was never updated (sequence {})",
            tls.tx_seq()
        );
        tls.shutdown().await.unwrap();
        let echoed = client.await.unwrap();
        assert!(echoed == reply, "client got {} bytes, not what was sent", echoed.len());
    })
    .await;
}

/// Every cipher suite HBONE offers works through the record layer, against rustls.
#[tokio::test]
async fn every_offered_cipher_suite_interoperates() {
    within(async {
        let pki = pki();
        for suite in pki.server_config().crypto_provider().cipher_suites.clone() {
            let (c, s) = pair().await;
            let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
            let server = tokio::spawn(async move {
                let mut tls = acceptor.accept(s).await.unwrap();
                let got = read_to_end(&mut tls, 4096).await.unwrap();
                tls.write_all(&got).await.unwrap();
                tls.shutdown().await.unwrap();
            });
            let (mut tls, _) = connect(pki.client_config_with(suite), server_name(), c, 1 << 20)
                .await
                .unwrap();
            let data = pattern(100_000, 6);
            send_in_pieces(&mut tls, &data, &[40_000, 2]).await;
            tls.shutdown().await.unwrap();
            let got = read_to_end(&mut tls, 32 * 1024).await.unwrap();
            assert!(got == data, "{suite:?}: echo differs");
            server.await.unwrap();
        }
    })
    .await;
}

/// Records that arrive a few bytes at a time (cut anywhere, headers included) are gathered and opened.
#[tokio::test]
async fn records_cut_across_reads_are_reassembled() {
    within(async {
        let pki = pki();
        let (c, s) = pair().await;
        // A relay that forwards the rustls client's bytes in odd small pieces (and the server's as they come).
        let (relay_in, relay_out) = pair().await;
        c.set_nodelay(true).unwrap();
        let (mut to_client, mut from_client) = (relay_out.into_split(), c.into_split());
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_client.0, &mut to_client.1).await;
            let _ = to_client.1.shutdown().await;
        });
        let relay = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let sizes = [1usize, 2, 3, 5, 4096, 7, 1000];
            let mut i = 0;
            loop {
                let want = sizes[i % sizes.len()];
                i += 1;
                let n = to_client.0.read(&mut buf[..want]).await.unwrap();
                if n == 0 {
                    let _ = from_client.1.shutdown().await;
                    break;
                }
                from_client.1.write_all(&buf[..n]).await.unwrap();
            }
        });
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let data = pattern(300_000, 7);
        let sent = data.clone();
        let client = tokio::spawn(async move {
            let mut tls = connector.connect(server_name(), relay_in).await.unwrap();
            tls.write_all(&sent).await.unwrap();
            tls.shutdown().await.unwrap();
            // Wait for the server's close.
            let _ = read_to_end(&mut tls, 1024).await;
        });
        let (mut tls, _) = accept(pki.server_config(), s, 1 << 20).await.unwrap();
        let got = read_to_end(&mut tls, 100_000).await.unwrap();
        assert!(got == data, "server got {} bytes, not what was sent", got.len());
        tls.shutdown().await.unwrap();
        client.await.unwrap();
        relay.await.unwrap();
        back.await.unwrap();
    })
    .await;
}

/// Handshakes with rustls's client, then hands over its raw socket so the test can write what it likes.
async fn accepted_with_raw_peer() -> (TlsStream, TcpStream) {
    let pki = pki();
    let (c, s) = pair().await;
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let client = tokio::spawn(async move {
        let tls = connector.connect(server_name(), c).await.unwrap();
        tls.into_inner().0
    });
    let (tls, _) = accept(pki.server_config(), s, 1 << 20).await.unwrap();
    (tls, client.await.unwrap())
}

/// The rustls error inside a read's failure.
async fn read_error(tls: &mut TlsStream) -> rustls::Error {
    let mut buf = [0u8; 100];
    let e = tls.read(&mut buf).await.expect_err("the read must fail");
    e.into_inner()
        .and_then(|inner| inner.downcast::<rustls::Error>().ok())
        .map(|b| *b)
        .expect("a rustls error")
}

/// A forged or damaged record fails the connection with a decrypt error (and a bad_record_mac alert to the
/// peer); so do an oversized record and a record of a type TLS 1.3 never sends after the handshake.
#[tokio::test]
async fn forged_oversized_and_misplaced_records_fail_the_connection() {
    within(async {
        let (mut tls, mut raw) = accepted_with_raw_peer().await;
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend_from_slice(&[0xAB; 40]);
        raw.write_all(&forged).await.unwrap();
        assert_eq!(read_error(&mut tls).await, rustls::Error::DecryptError);
        // The peer is told why: an alert record follows on the wire.
        let mut hdr = [0u8; 5];
        raw.read_exact(&mut hdr).await.unwrap();
        assert_eq!(hdr[0], 23, "an encrypted alert");
        // The failure sticks.
        assert_eq!(read_error(&mut tls).await, rustls::Error::DecryptError);

        let (mut tls, mut raw) = accepted_with_raw_peer().await;
        raw.write_all(&[23, 3, 3, 0x50, 0x00]).await.unwrap();
        assert_eq!(read_error(&mut tls).await, rustls::Error::PeerSentOversizedRecord);

        let (mut tls, mut raw) = accepted_with_raw_peer().await;
        raw.write_all(&[22, 3, 3, 0, 4, 1, 0, 0, 0]).await.unwrap();
        assert!(matches!(
            read_error(&mut tls).await,
            rustls::Error::InappropriateMessage { .. }
        ));
    })
    .await;
}

/// A peer that drops the TCP connection without close_notify is an unexpected end, not a clean one: a
/// truncated stream must not look complete.
#[tokio::test]
async fn end_without_close_notify_is_an_error() {
    within(async {
        let (mut tls, raw) = accepted_with_raw_peer().await;
        drop(raw);
        let mut buf = [0u8; 100];
        let e = tls
            .read(&mut buf)
            .await
            .expect_err("a truncated stream must not read as complete");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    })
    .await;
}

/// Nothing can be written after close_notify.
#[tokio::test]
async fn writes_after_shutdown_fail() {
    within(async {
        let (mut tls, _raw) = accepted_with_raw_peer().await;
        tls.shutdown().await.unwrap();
        let e = tls.write_all(b"late").await.expect_err("written after close_notify");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    })
    .await;
}

/// A peer that asks for a key update a million times and never reads costs the server a bounded queue:
/// answers that cannot be queued share one (RFC 8446 4.6.3) instead of piling up without limit.
#[tokio::test]
async fn a_key_update_flood_from_a_peer_that_never_reads_leaves_a_bounded_queue() {
    const UPDATES: usize = 1_000_000;
    const OUT_LIMIT: usize = 64 * 1024;
    tokio::time::timeout(Duration::from_secs(300), async {
        let pki = pki();
        let (c, s) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(pki.client_config());
        let flood = tokio::spawn(async move {
            let mut tls = connector.connect(server_name(), c).await.unwrap();
            // The server has finished its handshake; from here on nothing is read.
            let mut go = [0u8; 2];
            tls.read_exact(&mut go).await.unwrap();
            for _ in 0..UPDATES / 1000 {
                for _ in 0..1000 {
                    tls.get_mut().1.refresh_traffic_keys().unwrap();
                }
                tls.flush().await.unwrap();
            }
            tls.write_all(b"done").await.unwrap();
            tls.flush().await.unwrap();
            // Held open, never read: everything the server sends piles up on its side.
            tls
        });
        let (mut tls, _) = accept(pki.server_config(), s, OUT_LIMIT).await.unwrap();
        tls.write_all(b"go").await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"done");
        let limit = tls.out_limit;
        assert!(
            tls.out.queued() <= limit + 64,
            "{} bytes queued for a peer that does not read (limit {limit})",
            tls.out.queued()
        );
        assert!(
            tls.out.buf.capacity() <= 2 * limit,
            "the queue's buffer grew to {} bytes",
            tls.out.buf.capacity()
        );
        // Still a working connection: the owed update goes out before the next data.
        let _peer = flood.await.unwrap();
    })
    .await
    .expect("test deadline exceeded");
}
