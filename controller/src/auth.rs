//! Node authentication for the agent-facing services: gRPC metadata `authorization: Bearer <token>`
//! maps to a node name, through the `--node-tokens` file (local source) or a TokenReview of the
//! agent's service-account token (Kubernetes source, [`crate::k8s::token_review`]).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, Read as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tonic::{Status, metadata::MetadataMap};

use crate::k8s::TokenReviewer;

/// How the agent-facing services learn which node calls them.
pub enum NodeAuth {
    /// `--node-tokens`: a static token per node.
    Tokens(NodeTokens),
    /// The agent's projected service-account token, checked by the API server (TokenReview) and
    /// tied to the agent's pod, whose node is the caller's.
    Kubernetes(Box<TokenReviewer>),
}

impl NodeAuth {
    /// The node the request's bearer token belongs to: UNAUTHENTICATED naming why not, or
    /// UNAVAILABLE when it cannot be decided now (the API server cannot be asked).
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        match self {
            NodeAuth::Tokens(tokens) => tokens.authenticate(metadata),
            NodeAuth::Kubernetes(reviewer) => reviewer.authenticate(metadata).await,
        }
    }

    /// What a start-up log line says about it.
    pub fn describe(&self) -> String {
        match self {
            NodeAuth::Tokens(tokens) => format!("{} node tokens", tokens.len()),
            NodeAuth::Kubernetes(reviewer) => format!("TokenReview of {}", reviewer.username()),
        }
    }
}

/// The token of `authorization: Bearer <token>`, or UNAUTHENTICATED; `what` names the token the
/// caller should have sent.
pub fn bearer<'m>(metadata: &'m MetadataMap, what: &str) -> Result<&'m str, Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated(format!("missing authorization metadata (Bearer <{what}>)")))?;
    header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated(format!("authorization metadata is not \"Bearer <{what}>\"")))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unreadable, or open to group or others.
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("{path} is not a JSON object of node name to token (like {{\"node1\": \"secret\"}})")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: node {node:?}: {problem}")]
    Invalid {
        path: PathBuf,
        node: String,
        problem: String,
    },
}

/// A file holding a secret (node tokens, the CA's private key) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is {access} by group or others (mode {mode:04o}): it holds {holds}; make it private with `chmod 600 {path}`"
    )]
    Exposed {
        path: PathBuf,
        mode: u32,
        /// `readable`, `writable` or `executable`, the first that applies.
        access: &'static str,
        /// What the file holds: `node credentials`, `the CA's private key`.
        holds: &'static str,
    },
}

/// Reads a file holding a secret (`holds` says which, for the error), refusing one whose mode gives
/// group or others any access: a secret that others can read is no longer one, and one that others
/// can write is not ours. The mode is taken from the opened file, so the file checked is the file
/// read.
pub fn read_secret_file(path: &Path, holds: &'static str) -> Result<Vec<u8>, SecretFileError> {
    let read = |source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let access = if mode & 0o044 != 0 {
            "readable"
        } else if mode & 0o022 != 0 {
            "writable"
        } else {
            "executable"
        };
        return Err(SecretFileError::Exposed {
            path: path.to_owned(),
            mode,
            access,
            holds,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read)?;
    Ok(bytes)
}

/// Which token belongs to which node. Tokens are kept only as SHA-256 digests, so that looking one
/// up does not compare secrets byte by byte.
#[derive(Clone, Debug, Default)]
pub struct NodeTokens {
    by_digest: HashMap<Vec<u8>, String>,
}

impl NodeTokens {
    /// No node can authenticate.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads `{"<node>": "<token>", ...}` from `path`, refusing a file that group or others can
    /// access ([`read_secret_file`]), an empty token, or one token for two nodes.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = read_secret_file(path, "node credentials")?;
        let map: BTreeMap<String, String> = serde_json::from_slice(&bytes).map_err(|source| Error::Malformed {
            path: path.to_owned(),
            source,
        })?;
        Self::from_map(map).map_err(|(node, problem)| Error::Invalid {
            path: path.to_owned(),
            node,
            problem,
        })
    }

    /// Builds the table from node name to token; the error names the node and the problem.
    pub fn from_map(map: BTreeMap<String, String>) -> Result<Self, (String, String)> {
        let mut by_digest = HashMap::new();
        for (node, token) in map {
            if node.is_empty() {
                return Err((node, "empty node name".into()));
            }
            if token.trim().is_empty() {
                return Err((node, "empty token".into()));
            }
            if let Some(other) = by_digest.insert(digest(&token), node.clone()) {
                return Err((node, format!("same token as node {other:?}")));
            }
        }
        Ok(Self { by_digest })
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The node the request's bearer token belongs to, or UNAUTHENTICATED.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let token = bearer(metadata, "node token")?;
        self.by_digest
            .get(&digest(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown node token"))
    }
}

/// SHA-256 of a token: what tables and caches of tokens hold instead of the token.
pub fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};

    use super::*;

    fn write(dir: &Path, mode: u32, text: &str) -> PathBuf {
        let path = dir.join("tokens.json");
        let _ = fs::remove_file(&path);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        // Exactly `mode`, whatever the umask.
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn token_maps_to_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = NodeTokens::load(&write(dir.path(), 0o600, r#"{"node1": "s1", "node2": "s2"}"#)).unwrap();
        assert_eq!(tokens.authenticate(&bearer("s2")).unwrap(), "node2");
        assert_eq!(
            tokens.authenticate(&bearer("nope")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tokens.authenticate(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn refuses_readable_malformed_or_ambiguous_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeTokens::load(&write(dir.path(), 0o640, "{}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("readable by group or others (mode 0640)"), "{err}");
        assert!(
            err.contains("holds node credentials") && err.contains("chmod 600"),
            "{err}"
        );
        let err = NodeTokens::load(&write(dir.path(), 0o620, "{}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by group or others (mode 0620)"), "{err}");
        let err = NodeTokens::load(&write(dir.path(), 0o600, "[1]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a JSON object"), "{err}");
        let err = NodeTokens::load(&write(dir.path(), 0o600, r#"{"a": "x", "b": "x"}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"node "b": same token as node "a""#), "{err}");
        let err = NodeTokens::load(&write(dir.path(), 0o600, r#"{"a": " "}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty token"), "{err}");
    }
}
