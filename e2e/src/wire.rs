//! What crossed the wire: a packet capture (tcpdump, pcap of Ethernet frames) read into TCP flows,
//! and the TLS records in them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// tcpdump on one interface, writing a pcap file; stopped (and the file removed) on drop.
pub struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` (inside network namespace `netns`, if given) with `filter`, and
    /// waits until it captures. `name` names the file (a test's own, so runs do not share it).
    pub fn start(netns: Option<&str>, iface: &str, name: &str, filter: &[&str]) -> Capture {
        let path = std::env::temp_dir().join(format!("weft-e2e-{name}.pcap"));
        let _ = std::fs::remove_file(&path);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let mut child = cmd
            .args(["-i", iface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&path)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        // tcpdump says "listening on <iface>" once the capture runs.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).expect("reading tcpdump");
        assert!(line.contains("listening on"), "tcpdump did not start: {line:?}");
        Capture { child, path }
    }

    /// What the capture holds so far.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.path).ok()
    }

    /// Stops the capture (tcpdump flushes on SIGINT); its bytes.
    pub fn stop(mut self) -> Vec<u8> {
        // SAFETY: signalling the tcpdump this capture started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read(&self.path).expect("reading the capture")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One direction of a TCP connection, payload reassembled by sequence number.
#[derive(Debug, Default)]
pub struct Flow {
    pub bytes: Vec<u8>,
    segments: BTreeMap<u32, Vec<u8>>,
}

/// TCP payload per (source, destination), from a pcap file's bytes.
pub fn tcp_flows(pcap: &[u8]) -> Result<BTreeMap<(SocketAddr, SocketAddr), Flow>, String> {
    let header = pcap.get(..24).ok_or("pcap: no global header")?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    ensure(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        format!("pcap: unexpected magic {magic:#x}"),
    )?;
    let linktype = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
    ensure(linktype == 1, format!("pcap: link type {linktype}, want Ethernet"))?;
    let mut flows: BTreeMap<(SocketAddr, SocketAddr), Flow> = BTreeMap::new();
    let mut rest = &pcap[24..];
    while rest.len() >= 16 {
        let caplen = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        let Some(frame) = rest.get(16..16 + caplen) else {
            break; // a truncated last record (tcpdump stopped mid-write)
        };
        rest = &rest[16 + caplen..];
        if let Some((src, dst, seq, payload)) = tcp_segment(frame)
            && !payload.is_empty()
        {
            flows
                .entry((src, dst))
                .or_default()
                .segments
                .insert(seq, payload.to_vec());
        }
    }
    for flow in flows.values_mut() {
        // Sequence numbers of one short capture do not wrap in practice; retransmissions overlap.
        let mut next: Option<u32> = None;
        for (seq, data) in &flow.segments {
            let skip = next.map_or(0, |n| n.saturating_sub(*seq) as usize);
            if skip < data.len() {
                flow.bytes.extend_from_slice(&data[skip..]);
            }
            next = Some(next.map_or(seq + data.len() as u32, |n| n.max(seq + data.len() as u32)));
        }
    }
    Ok(flows)
}

fn ensure(ok: bool, msg: String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(msg) }
}

fn tcp_segment(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, u32, &[u8])> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (src, dst, ip.get(ihl..total.min(ip.len()))?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(a)),
                IpAddr::V6(Ipv6Addr::from(b)),
                ip.get(40..(40 + len).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        seq,
        tcp.get(offset..)?,
    ))
}

/// One TLS record.
#[derive(Debug, PartialEq, Eq)]
pub struct TlsRecord<'a> {
    /// 20 ChangeCipherSpec, 21 alert, 22 handshake, 23 application data.
    pub kind: u8,
    pub version: u16,
    pub body: &'a [u8],
}

/// Splits a byte stream into TLS records; anything that is not one is an error naming it.
pub fn tls_records(mut bytes: &[u8]) -> Result<Vec<TlsRecord<'_>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 5 {
            return Err(format!("{} trailing bytes are not a TLS record", bytes.len()));
        }
        let (kind, version) = (bytes[0], u16::from_be_bytes([bytes[1], bytes[2]]));
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        if !(20..=23).contains(&kind) || !(0x0301..=0x0303).contains(&version) || len > (1 << 14) + 256 {
            return Err(format!(
                "not a TLS record: type {kind}, version {version:#06x}, length {len}"
            ));
        }
        let body = bytes.get(5..5 + len).ok_or("a TLS record cut short")?;
        out.push(TlsRecord { kind, version, body });
        bytes = &bytes[5 + len..];
    }
    Ok(out)
}

/// Whether a ServerHello handshake message selects TLS 1.3 (supported_versions = 0x0304).
pub fn server_hello_is_tls13(handshake: &[u8]) -> bool {
    // type(1)=2, len(3), legacy_version(2), random(32), session id, cipher(2), compression(1), exts
    if handshake.first() != Some(&2) {
        return false;
    }
    let Some(&sid_len) = handshake.get(38) else {
        return false;
    };
    let mut i = 39 + usize::from(sid_len) + 3;
    let Some(ext_len) = handshake
        .get(i..i + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return false;
    };
    i += 2;
    let end = (i + ext_len).min(handshake.len());
    while i + 4 <= end {
        let kind = u16::from_be_bytes([handshake[i], handshake[i + 1]]);
        let len = usize::from(u16::from_be_bytes([handshake[i + 2], handshake[i + 3]]));
        if kind == 0x002b {
            return handshake.get(i + 4..i + 6) == Some(&[0x03, 0x04]);
        }
        i += 4 + len;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_garbage_is_named() {
        let bytes = [23u8, 3, 3, 0, 2, 0xaa, 0xbb, 23, 3, 3, 0, 0];
        let r = tls_records(&bytes).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            TlsRecord {
                kind: 23,
                version: 0x0303,
                body: &[0xaa, 0xbb]
            }
        );
        assert!(
            tls_records(b"GET / HTTP/1.1\r\n")
                .unwrap_err()
                .contains("not a TLS record")
        );
    }
}
