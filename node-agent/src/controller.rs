//! The connection to the controller: one TLS gRPC channel (trusting the mesh root the controller
//! published), authenticated as this node with its bearer credential, read again whenever its file
//! changes. The channel reconnects by itself; callers see errors while the controller is away.
//!
//! The controller is one URL (`--controller`), or in Kubernetes the ready replicas behind its
//! Service (`--controller-endpoints`, [`endpoints`]): a balanced channel whose set follows the
//! Service's `Endpoints`, so that a config stream that ended because its replica died reconnects to
//! another one.
//!
//! Nothing waits on the controller without a deadline ([`Deadlines`]): the TCP connect and the TLS
//! handshake are bounded, an HTTP/2 PING unanswered in time closes the connection (ending the config
//! stream with an error, after which discovery reconnects with backoff), the config stream must
//! deliver its first push in time (`discovery`), and a CSR its answer (`identity::SIGN_TIMEOUT`).

mod endpoints;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{config::ObjectName, errors::display_chain, kube};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node token in {path} is empty or not printable ASCII")]
    BadToken { path: String },
    #[error("the controller at {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How long each step of talking to the controller may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The TCP connect.
    pub connect: Duration,
    /// The TLS handshake, after the connect. A controller that accepts and never answers (hung, or
    /// refusing handshakes under a flood) fails the call instead of holding it forever.
    pub handshake: Duration,
    /// A PING after this much silence on the connection, also while no call is open...
    pub keepalive_interval: Duration,
    /// ...unanswered for this long closes it: a controller that vanished without FIN or RST (its
    /// node died, a partition) ends the config stream, which then reconnects.
    pub keepalive_timeout: Duration,
    /// From opening the config stream until its first push (the resync) is complete, the longest
    /// the controller may stay silent: every chunk, and every notice that the resync waits for its
    /// turn (a loaded controller sends a bounded number at a time), starts it again.
    pub first_push: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            handshake: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            first_push: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct Controller {
    channel: Channel,
    auth: Auth,
    deadlines: Deadlines,
}

/// Adds `authorization: Bearer <node token>` to every call, with the token file's content as it is
/// now: a projected service-account token is replaced by kubelet before it expires, so it is read
/// again whenever the file changed (another inode, size or modification time). A call fails, and
/// sends nothing, when the token cannot be read or is empty.
#[derive(Clone)]
pub struct Auth(Arc<TokenFile>);

struct TokenFile {
    path: PathBuf,
    read: Mutex<Option<(Stamp, MetadataValue<Ascii>)>>,
}

/// What tells a changed token file: kubelet's atomic writer swaps in a new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl TokenFile {
    fn bearer(&self) -> Result<MetadataValue<Ascii>, Error> {
        let path = || self.path.display().to_string();
        let read_err = |source| Error::Read {
            what: "the node token",
            path: path(),
            source,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_err)?;
        let stamp = Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        // A poisoned lock only means a panic elsewhere while replacing the pair: it is whole.
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, value)) = read.as_ref()
            && *seen == stamp
        {
            return Ok(value.clone());
        }
        let token = std::fs::read(&self.path).map_err(read_err)?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .ok()
            .filter(|_| !token.is_empty())
            .ok_or_else(|| Error::BadToken { path: path() })?;
        *read = Some((stamp, value.clone()));
        Ok(value)
    }
}

impl Auth {
    /// Reads the token once, so that a wrong path fails the agent's start rather than every call.
    fn new(path: &Path) -> Result<Self, Error> {
        let auth = Self(Arc::new(TokenFile {
            path: path.to_path_buf(),
            read: Mutex::new(None),
        }));
        auth.0.bearer()?;
        Ok(auth)
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let bearer = self
            .0
            .bearer()
            .map_err(|e| tonic::Status::unauthenticated(display_chain(&e)))?;
        req.metadata_mut().insert("authorization", bearer);
        Ok(req)
    }
}

impl Controller {
    /// The controller at `url`, whose certificate for `server_name` chains to the root in `ca`,
    /// with the default [`Deadlines`]. Nothing connects yet; the first call does.
    pub fn new(url: &str, ca: &Path, server_name: &str, token_file: &Path) -> Result<Self, Error> {
        Self::with_deadlines(url, ca, server_name, token_file, Deadlines::default())
    }

    /// As [`Controller::new`], with `deadlines`.
    pub fn with_deadlines(
        url: &str,
        ca: &Path,
        server_name: &str,
        token_file: &Path,
        deadlines: Deadlines,
    ) -> Result<Self, Error> {
        Self::with_local_address(url, ca, server_name, token_file, deadlines, None)
    }

    /// As [`Controller::with_deadlines`], connecting from `local` (the scale harness gives each
    /// simulated node an address of its own, as real nodes have).
    pub fn with_local_address(
        url: &str,
        ca: &Path,
        server_name: &str,
        token_file: &Path,
        deadlines: Deadlines,
        local: Option<std::net::IpAddr>,
    ) -> Result<Self, Error> {
        let tls = tls(ca, server_name, deadlines)?;
        let auth = Auth::new(token_file)?;
        let channel = endpoint(url, &tls, deadlines)?.local_address(local).connect_lazy();
        Ok(Self {
            channel,
            auth,
            deadlines,
        })
    }

    /// The ready replicas behind the Kubernetes Service `service`, followed in its `Endpoints`
    /// (see [`endpoints`]): each call goes to one of them, and a call after a replica went away
    /// to another. The certificate checked is `server_name`'s, whichever replica answers. Calls
    /// wait (within their deadlines) while no replica is ready. Spawns the watch: call it on the
    /// runtime.
    pub fn from_endpoints(
        kube: kube::Client,
        service: ObjectName,
        ca: &Path,
        server_name: &str,
        token_file: &Path,
        deadlines: Deadlines,
    ) -> Result<Self, Error> {
        let tls = tls(ca, server_name, deadlines)?;
        let auth = Auth::new(token_file)?;
        let (channel, changes) = Channel::balance_channel(16);
        let make = move |addr: std::net::SocketAddr| endpoint(&format!("https://{addr}"), &tls, deadlines);
        tokio::spawn(endpoints::follow(kube, service, make, changes));
        Ok(Self {
            channel,
            auth,
            deadlines,
        })
    }

    pub fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn auth(&self) -> Auth {
        self.auth.clone()
    }
}

fn tls(ca: &Path, server_name: &str, deadlines: Deadlines) -> Result<ClientTlsConfig, Error> {
    let root = std::fs::read(ca).map_err(|source| Error::Read {
        what: "the controller's CA certificate",
        path: ca.display().to_string(),
        source,
    })?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name(server_name)
        .timeout(deadlines.handshake))
}

/// One controller address with the TLS configuration and deadlines every call to it has.
fn endpoint(url: &str, tls: &ClientTlsConfig, deadlines: Deadlines) -> Result<Endpoint, Error> {
    let endpoint_error = |source| Error::Endpoint {
        url: url.to_owned(),
        source,
    };
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(endpoint_error)?
        .tls_config(tls.clone())
        .map_err(endpoint_error)?
        .connect_timeout(deadlines.connect)
        .http2_keep_alive_interval(deadlines.keepalive_interval)
        .keep_alive_timeout(deadlines.keepalive_timeout)
        .keep_alive_while_idle(true))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// The value the interceptor puts in `authorization`, or its error.
    fn bearer(auth: &mut Auth) -> Result<String, tonic::Status> {
        let req = auth.call(tonic::Request::new(()))?;
        let value = req.metadata().get("authorization").expect("set");
        Ok(value.to_str().expect("ascii").to_owned())
    }

    #[test]
    fn a_rotated_token_is_sent_from_the_next_call_and_an_empty_one_fails_it() {
        let dir = std::env::temp_dir().join(format!("weft-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        // A projected volume as kubelet writes it: `token` -> `..data/token`, `..data` -> a
        // timestamped directory, swapped by renaming a new link over it.
        let publish = |version: &str, token: &str| {
            let data = dir.join(version);
            std::fs::create_dir_all(&data).expect("data dir");
            std::fs::write(data.join("token"), token).expect("token");
            symlink(version, dir.join("..data_tmp")).expect("link");
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        };
        publish("..2024_05_01_10_00_00.1", "token-1\n");
        symlink("..data/token", dir.join("token")).expect("link");
        let mut auth = Auth::new(&dir.join("token")).expect("readable");
        assert_eq!(bearer(&mut auth).expect("sent"), "Bearer token-1");
        publish("..2024_05_01_10_48_00.2", "token-2\n");
        assert_eq!(bearer(&mut auth).expect("sent"), "Bearer token-2");
        assert_eq!(
            bearer(&mut auth.clone()).expect("sent"),
            "Bearer token-2",
            "clones share it"
        );

        publish("..2024_05_01_11_36_00.3", "  \n");
        let status = bearer(&mut auth).expect_err("empty");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("token") && status.message().contains("is empty"),
            "{status:?}"
        );
        std::fs::remove_file(dir.join("token")).expect("remove");
        let status = bearer(&mut auth).expect_err("missing");
        assert!(status.message().starts_with("reading the node token"), "{status:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
