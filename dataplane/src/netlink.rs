//! The two routing changes the agent makes in a pod's network namespace, over rtnetlink (no `ip`
//! process per change): a `local` default route in a table of its own, and a policy rule sending
//! packets with a given mark to that table.
//!
//! A netlink socket belongs to the network namespace it was created in, so callers open the
//! [`Route`] socket inside the pod's namespace ([`crate::netns::NetNs::run`]) and may use it after.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
/// The loopback device's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Address family of a route or rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

/// A NETLINK_ROUTE socket in the namespace it was opened in.
#[derive(Debug)]
pub struct Route {
    fd: OwnedFd,
    seq: u32,
}

impl Route {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    /// `ip route replace local <default> dev lo table <table>`: every destination is delivered
    /// locally for packets that look this table up. Idempotent.
    pub fn replace_local_default(&mut self, family: Family, table: u32) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
        msg.push(&[family.af(), 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(RTA_TABLE, &table.to_ne_bytes());
        msg.attr(RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
        self.call(msg)
    }

    /// `ip rule add pref <pref> fwmark <mark>/<mask> lookup <table>`, unless that rule exists.
    pub fn add_fwmark_rule(&mut self, family: Family, pref: u32, mark: u32, mask: u32, table: u32) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
        msg.push(&[family.af(), 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(FRA_PRIORITY, &pref.to_ne_bytes());
        msg.attr(FRA_FWMARK, &mark.to_ne_bytes());
        msg.attr(FRA_FWMASK, &mask.to_ne_bytes());
        msg.attr(FRA_TABLE, &table.to_ne_bytes());
        match self.call(msg) {
            // The kernel refuses an identical rule under NLM_F_EXCL: it is already there.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    /// Sends one request and waits for its acknowledgement (or error).
    fn call(&mut self, mut msg: Message) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: a valid buffer of the given length; the kernel is the destination (nladdr zeroed).
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer we own, of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(result) = ack(&buf[..n as usize], seq)? {
                return result;
            }
        }
    }
}

/// The answer to request `seq` in a batch of netlink messages, if the batch has it.
fn ack(mut batch: &[u8], seq: u32) -> io::Result<Option<io::Result<()>>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
    while batch.len() >= 16 {
        let word = |at: usize| u32::from_ne_bytes([batch[at], batch[at + 1], batch[at + 2], batch[at + 3]]);
        let len = word(0) as usize;
        let kind = u16::from_ne_bytes([batch[4], batch[5]]);
        if len < 16 || len > batch.len() {
            return Err(bad());
        }
        if kind == NLMSG_ERROR && word(8) == seq {
            if len < 20 {
                return Err(bad());
            }
            let code = i32::from_ne_bytes([batch[16], batch[17], batch[18], batch[19]]);
            return Ok(Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            }));
        }
        batch = &batch[align(len).min(batch.len())..];
    }
    Ok(None)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink request being built: header, fixed part, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        Self { buf }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align(self.buf.len()), 0);
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_request_has_the_kernels_layout() {
        let mut msg = Message::new(RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK);
        msg.push(&[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(FRA_PRIORITY, &15006u32.to_ne_bytes());
        let bytes = msg.finish(7).to_vec();
        assert_eq!(bytes.len(), 16 + 12 + 8);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 36);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        assert_eq!(
            u16::from_ne_bytes(bytes[28..30].try_into().unwrap()),
            8,
            "attribute length"
        );
        assert_eq!(u16::from_ne_bytes(bytes[30..32].try_into().unwrap()), FRA_PRIORITY);
    }

    #[test]
    fn acks_are_found_by_sequence_and_errors_carry_errno() {
        let reply = |seq: u32, code: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&code.to_ne_bytes());
            b.extend_from_slice(&[0u8; 16]); // the request's header, echoed
            b
        };
        assert!(matches!(ack(&reply(3, 0), 3), Ok(Some(Ok(())))));
        assert!(matches!(ack(&reply(2, 0), 3), Ok(None)), "another request's answer");
        let Ok(Some(Err(e))) = ack(&reply(3, -libc::EEXIST), 3) else {
            panic!("an error reply")
        };
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(ack(&[0u8; 20], 3).is_err(), "a zero length is malformed");
    }

    /// In a network namespace of the test's own: the route and the rule land, twice without error.
    #[test]
    fn installs_the_local_route_and_the_mark_rule_idempotently() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (a network namespace); under CI=true it must run"
            );
            return;
        }
        let out = std::thread::spawn(|| -> io::Result<String> {
            // SAFETY: unshares this thread only (a fresh thread, ended right after).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // As in a pod: loopback up.
            std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()?;
            let mut route = Route::open()?;
            for _ in 0..2 {
                for family in [Family::V4, Family::V6] {
                    route.replace_local_default(family, 15006)?;
                    route.add_fwmark_rule(family, 15006, 0x1000, 0x1000, 15006)?;
                }
            }
            let show = |args: &[&str]| -> io::Result<String> {
                let o = std::process::Command::new("ip").args(args).output()?;
                Ok(String::from_utf8_lossy(&o.stdout).into_owned())
            };
            Ok([
                show(&["-4", "rule", "show", "pref", "15006"])?,
                show(&["-6", "rule", "show", "pref", "15006"])?,
                show(&["-4", "route", "show", "table", "15006"])?,
                show(&["-6", "route", "show", "table", "15006"])?,
            ]
            .join(""))
        })
        .join()
        .unwrap()
        .unwrap();
        assert_eq!(
            out.matches("fwmark 0x1000/0x1000 lookup 15006").count(),
            2,
            "one rule per family:\n{out}"
        );
        assert!(out.contains("local default dev lo"), "{out}");
        assert_eq!(out.matches("local default dev lo").count(), 2, "{out}");
    }
}
