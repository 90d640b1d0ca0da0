//! The node agent's end of the CNI plugin: a unix socket taking pod add/delete events with each pod's
//! network namespace. What it learns is persisted, so an agent that restarts knows the pods already
//! running on its node (the reconcile scan at start) and drops those whose namespace is gone.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use weft_model::cni::{PodEvent, PodNetwork, Reply};

/// Pod networks on this node, by pod uid.
pub type Networks = BTreeMap<String, PodNetwork>;

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A CNI event and where to send the agent's answer once it acted on it.
pub type Request = (PodEvent, oneshot::Sender<Reply>);

/// Binds the socket and starts serving. Returns the networks persisted by the previous agent (the
/// pods already running on this node) and the stream of new events; each caller waits for its reply.
pub fn spawn(socket: &Path) -> Result<mpsc::Receiver<Request>, Error> {
    let _ = std::fs::remove_file(socket);
    let err = |source| Error::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let listener = UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, tx).await {
                            tracing::warn!(error = %e, "CNI request");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CNI accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(rx)
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<Request>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::io::AsyncReadExt::take(read, MAX_LINE);
    tokio::time::timeout(Duration::from_secs(5), BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let reply = match serde_json::from_str::<PodEvent>(&line) {
        Ok(event) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            let gone = || Reply {
                ok: false,
                error: Some("the node agent is shutting down".into()),
            };
            match tx.send((event, reply_tx)).await {
                Ok(()) => reply_rx.await.unwrap_or_else(|_| gone()),
                Err(_) => gone(),
            }
        }
        Err(e) => Reply {
            ok: false,
            error: Some(format!("malformed CNI event: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Applies an event to the known networks.
pub fn apply(networks: &mut Networks, event: &PodEvent) {
    match event {
        PodEvent::Add(network) => {
            tracing::info!(pod = %format!("{}/{}", network.namespace, network.name), netns = %network.netns.display(), "CNI add");
            networks.insert(network.uid.clone(), network.clone());
        }
        PodEvent::Delete { uid } => {
            tracing::info!(uid = %uid, "CNI delete");
            networks.remove(uid);
        }
    }
}

/// Persisted networks whose namespace still exists.
pub fn load(path: &Path) -> Networks {
    let networks: Networks = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    networks.into_iter().filter(|(_, n)| n.netns.exists()).collect()
}

pub fn save(path: &Path, networks: &Networks) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(networks).map_err(io::Error::other)?)?;
    std::fs::rename(tmp, path)
}
