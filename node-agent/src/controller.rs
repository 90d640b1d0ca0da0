//! The connection to the controller: one TLS gRPC channel (trusting the mesh root the controller
//! published), authenticated as this node with its bearer credential. The channel reconnects by
//! itself; callers see errors while the controller is away.
//!
//! Nothing waits on the controller without a deadline ([`Deadlines`]): the TCP connect and the TLS
//! handshake are bounded, an HTTP/2 PING unanswered in time closes the connection (ending the config
//! stream with an error, after which discovery reconnects with backoff), the config stream must
//! deliver its first push in time (`discovery`), and a CSR its answer (`identity::SIGN_TIMEOUT`).

use std::{path::Path, time::Duration};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node token in {path} is empty or not printable ASCII")]
    BadToken { path: String },
    #[error("--controller {url}: {source}")]
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
    /// From opening the config stream to its first push, the full resync.
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

/// Adds `authorization: Bearer <node token>` to every call.
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
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
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| Error::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let root = read("the controller's CA certificate", ca)?;
        let token = read("the node token", token_file)?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let auth = MetadataValue::try_from(format!("Bearer {token}"))
            .ok()
            .filter(|_| !token.is_empty())
            .ok_or_else(|| Error::BadToken {
                path: token_file.display().to_string(),
            })?;
        let endpoint_error = |source| Error::Endpoint {
            url: url.to_owned(),
            source,
        };
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(endpoint_error)?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root))
                    .domain_name(server_name)
                    .timeout(deadlines.handshake),
            )
            .map_err(endpoint_error)?
            .connect_timeout(deadlines.connect)
            .http2_keep_alive_interval(deadlines.keepalive_interval)
            .keep_alive_timeout(deadlines.keepalive_timeout)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            channel,
            auth: Auth(auth),
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
