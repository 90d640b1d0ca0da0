//! The connection to the controller: one TLS gRPC channel (trusting the mesh root the controller
//! published), authenticated as this node with its bearer credential. The channel reconnects by
//! itself; callers see errors while the controller is away.

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

#[derive(Clone)]
pub struct Controller {
    channel: Channel,
    auth: Auth,
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
    pub fn new(url: &str, ca: &Path, server_name: &str, token_file: &Path) -> Result<Self, Error> {
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
                    .domain_name(server_name),
            )
            .map_err(endpoint_error)?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            channel,
            auth: Auth(auth),
        })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn auth(&self) -> Auth {
        self.auth.clone()
    }
}
