//! The node agent's end of the CNI plugin: a unix socket taking pod add/delete events with each pod's
//! network namespace. What the agent learns is kept in [`crate::networks`].

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use weft_model::cni::{PodEvent, Reply};

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI socket")]
    Bind {
        #[source]
        source: weft_api::unix::Error,
    },
}

/// A CNI event and where to send the agent's answer once it acted on it.
pub type Request = (PodEvent, oneshot::Sender<Reply>);

/// Binds the socket and starts serving. Returns the networks persisted by the previous agent (the
/// pods already running on this node) and the stream of new events; each caller waits for its reply.
/// The socket replaces whatever a previous agent left at `socket`, and has mode 0600 from the moment
/// it exists there ([`weft_api::unix::bind_private`]): only the agent's user and root (as whom the
/// runtime runs the CNI plugin) can ever connect.
pub fn spawn(socket: &Path) -> Result<mpsc::Receiver<Request>, Error> {
    let err = |source| Error::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let listener = weft_api::unix::bind_private(socket).map_err(|source| Error::Bind { source })?;
    let listener = UnixListener::from_std(listener).map_err(err)?;
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
