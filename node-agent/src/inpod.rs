//! One enrolled pod: the agent's listeners inside its network namespace, its capture registration,
//! and the routing that returns the application's replies to the agent.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
};

use tokio::task::JoinHandle;
use weft_dataplane::{
    netlink::{self, Family},
    netns::NetNs,
    socket,
};
use weft_model::{Pod, marks, ports};

use weft_hbone::identity::Identity;

use crate::{
    capture::Capture,
    mesh::Mesh,
    pod::{Current, PodContext},
    proxy,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod}: no network namespace")]
    NoNetns { pod: String },
    #[error("pod {pod}: opening network namespace {path}")]
    OpenNetns {
        pod: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: {step}")]
    Setup {
        pod: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: capture")]
    Capture {
        pod: String,
        #[source]
        source: Box<crate::capture::Error>,
    },
}

/// An enrolled pod. Dropping it stops its listeners; [`InPod::unenroll`] also removes its capture.
pub struct InPod {
    pub ctx: Arc<PodContext>,
    netns_cookie: u64,
    /// The inbound plaintext listeners (IPv6 or not), shared with their accept loops: a new address
    /// of the pod is steered to them.
    listeners: Vec<(bool, OwnedFd)>,
    tasks: Vec<JoinHandle<()>>,
}

impl InPod {
    /// Enrolls `pod`: listeners first, then inbound steering, then outbound capture, so that no
    /// captured connection ever finds no listener while the agent runs.
    pub fn enroll(pod: &Pod, identity: &Identity, mesh: &Arc<Mesh>, capture: &mut Capture) -> Result<Self, Error> {
        let name = pod.qualified_name();
        let path = pod.netns.as_ref().ok_or_else(|| Error::NoNetns { pod: name.clone() })?;
        let netns = NetNs::open(path).map_err(|source| Error::OpenNetns {
            pod: name.clone(),
            path: path.display().to_string(),
            source,
        })?;
        let setup = |step| {
            let pod = name.clone();
            move |source| Error::Setup { pod, step, source }
        };
        install_reply_routing(&netns).map_err(setup("installing reply routing"))?;

        let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);
        let mut outbound = vec![(
            socket::listen_in(&netns, SocketAddr::from((Ipv4Addr::LOCALHOST, ports::OUTBOUND)), 1024)
                .map_err(setup("binding outbound listener 127.0.0.1:15001"))?,
            false,
        )];
        let inbound4 = socket::listen_in(
            &netns,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::INBOUND_PLAINTEXT)),
            1024,
        )
        .map_err(setup("binding inbound listener 0.0.0.0:15006"))?;
        let mut hbone = vec![
            socket::listen_in(&netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::HBONE)), 1024)
                .map_err(setup("binding HBONE listener 0.0.0.0:15008"))?,
        ];
        let mut inbound6 = None;
        if has_v6 {
            hbone.push(
                socket::listen_in(&netns, SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports::HBONE)), 1024)
                    .map_err(setup("binding HBONE listener [::]:15008"))?,
            );
            outbound.push((
                socket::listen_in(&netns, SocketAddr::from((Ipv6Addr::LOCALHOST, ports::OUTBOUND)), 1024)
                    .map_err(setup("binding outbound listener [::1]:15001"))?,
                true,
            ));
            inbound6 = Some(
                socket::listen_in(
                    &netns,
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports::INBOUND_PLAINTEXT)),
                    1024,
                )
                .map_err(setup("binding inbound listener [::]:15006"))?,
            );
        }
        if let Some(cc) = &mesh.tunnel_congestion {
            for listener in &hbone {
                // Accepted connections inherit it. Checked at start, so a failure is unexpected; the
                // tunnels still work with the pod's default.
                if let Err(e) = cc.apply(listener) {
                    tracing::warn!(pod = %name, congestion_control = cc.name(), error = %e, "HBONE listener keeps the pod's congestion control");
                }
            }
        }
        let netns_cookie = socket::netns_cookie(&inbound4).map_err(setup("reading the network namespace cookie"))?;
        let cap = |source: crate::capture::Error| Error::Capture {
            pod: name.clone(),
            source: Box::new(source),
        };
        for ip in &pod.ips {
            match (ip, &inbound6) {
                (IpAddr::V4(_), _) => capture.set_listener(*ip, &inbound4).map_err(cap)?,
                (IpAddr::V6(_), Some(l6)) => capture.set_listener(*ip, l6).map_err(cap)?,
                (IpAddr::V6(_), None) => {}
            }
        }
        capture.attach_pod(&pod.uid, &netns).map_err(cap)?;
        capture.enroll(netns_cookie).map_err(cap)?;

        let ctx = Arc::new(PodContext::new(pod.clone(), identity.clone(), netns, mesh.clone()));
        let mut listeners = Vec::new();
        for (listener, v6) in std::iter::once((&inbound4, false)).chain(inbound6.as_ref().map(|l| (l, true))) {
            let fd = listener
                .as_fd()
                .try_clone_to_owned()
                .map_err(setup("sharing the inbound listener"))?;
            listeners.push((v6, fd));
        }
        let mut tasks = Vec::new();
        for (listener, v6) in outbound {
            let handle = move |ctx, stream, _| proxy::outbound(ctx, stream, v6);
            tasks.push(tokio::spawn(proxy::accept_loop(ctx.clone(), listener, handle)));
        }
        for listener in std::iter::once(inbound4).chain(inbound6) {
            tasks.push(tokio::spawn(proxy::accept_loop(
                ctx.clone(),
                listener,
                proxy::inbound_plaintext,
            )));
        }
        for listener in hbone {
            tasks.push(tokio::spawn(proxy::inbound_hbone(ctx.clone(), listener)));
        }
        tracing::info!(pod = %name, netns_cookie, "enrolled");
        Ok(Self {
            ctx,
            netns_cookie,
            listeners,
            tasks,
        })
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The pod as last enrolled or updated.
    pub fn current(&self) -> Arc<Current> {
        self.ctx.current()
    }

    /// Whether `pod` can replace this one's description in place: the same network namespace, and no
    /// address family the listeners were not opened for.
    pub fn can_update_to(&self, pod: &Pod) -> bool {
        let current = self.ctx.current();
        let has_v6 = |p: &Pod| p.ips.iter().any(IpAddr::is_ipv6);
        pod.netns == current.pod.netns && (has_v6(pod) == has_v6(&current.pod) || !has_v6(pod))
    }

    /// Applies a change to the pod (labels, service account, addresses) without unbinding anything:
    /// inbound steering for new addresses is registered before that of old ones is removed, and new
    /// connections see the new description at once. Callers check [`InPod::can_update_to`] first.
    pub fn update(&self, pod: &Pod, identity: &Identity, capture: &mut Capture) -> Result<(), Error> {
        let old = self.ctx.current();
        for ip in pod.ips.iter().filter(|ip| !old.pod.ips.contains(ip)) {
            let listener = self.listeners.iter().find(|(v6, _)| *v6 == ip.is_ipv6());
            if let Some((_, fd)) = listener {
                capture.set_listener(*ip, fd).map_err(|source| Error::Capture {
                    pod: self.ctx.name.to_string(),
                    source: Box::new(source),
                })?;
            }
        }
        for ip in old.pod.ips.iter().filter(|ip| !pod.ips.contains(ip)) {
            capture.remove_listener(*ip);
        }
        self.ctx.update(Current::new(pod.clone(), identity.clone()));
        tracing::info!(pod = %self.ctx.name, "updated in place");
        Ok(())
    }

    /// Stops capturing the pod's new connections; connections already proxied run to completion.
    pub fn unenroll(self, capture: &mut Capture) {
        capture.unenroll(self.netns_cookie);
        capture.detach_pod(&self.ctx.uid);
        for ip in &self.ctx.current().pod.ips {
            capture.remove_listener(*ip);
        }
        tracing::info!(pod = %self.ctx.name, "unenrolled");
    }
}

impl Drop for InPod {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where the host's `/proc/sys` is mounted in the agent's container (a DaemonSet pod that is not
/// privileged has its own `/proc/sys` read-only).
const HOST_PROC_SYS: &str = "/host/proc/sys";

/// Writes the sysctl at `rel` (under `/proc/sys`) for the calling thread's network namespace: in
/// `/proc/sys`, or where that is read-only in [`HOST_PROC_SYS`]. Either shows the namespace of the
/// thread that opens the file, not the one of the process that mounted it.
fn write_sysctl(rel: &str, value: &str) -> std::io::Result<()> {
    match std::fs::write(std::path::Path::new("/proc/sys").join(rel), value) {
        Err(e)
            if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem && std::path::Path::new(HOST_PROC_SYS).is_dir() =>
        {
            std::fs::write(std::path::Path::new(HOST_PROC_SYS).join(rel), value)
        }
        r => r,
    }
}

/// Inside the pod: accepted sockets inherit the SYN's mark (`tcp_fwmark_accept`), the kernel's own
/// replies to a packet that found no socket (the reset answering a SYN to a closed port) carry that
/// packet's mark (`fwmark_reflect`), and packets marked `LOCAL_REPLY` are delivered locally. The
/// application's replies to a client address the agent connected from (transparently) thus return to
/// the agent instead of leaving the pod, and so does the refusal of a port nobody listens on: the
/// agent learns at once, as the client would without the mesh. Idempotent.
fn install_reply_routing(netns: &NetNs) -> std::io::Result<()> {
    netns.run(|| -> std::io::Result<()> {
        write_sysctl("net/ipv4/tcp_fwmark_accept", "1")?;
        write_sysctl("net/ipv4/fwmark_reflect", "1")?;
        match write_sysctl("net/ipv6/fwmark_reflect", "1") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // IPv6 disabled in the pod
            r => r?,
        }
        let mut route = netlink::Route::open()?;
        for family in [Family::V4, Family::V6] {
            route.replace_local_default(family, marks::LOCAL_REPLY_TABLE)?;
            route.add_fwmark_rule(
                family,
                marks::LOCAL_REPLY_TABLE,
                marks::LOCAL_REPLY,
                marks::LOCAL_REPLY,
                marks::LOCAL_REPLY_TABLE,
            )?;
        }
        Ok(())
    })?
}
