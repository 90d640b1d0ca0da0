//! Following a collection: a list, then a watch from the list's resource version. A stream that
//! ends (the API server ends every watch after `timeoutSeconds`; a connection drops) is resumed from
//! the last resource version seen (events and bookmarks); one the API server can no longer resume
//! (410 Gone, as the answer or as an `ERROR` event) is replaced by a new list.

use std::{marker::PhantomData, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde::{Deserialize, de::DeserializeOwned};
use tokio::time::Instant;

use super::{Client, Error, List, Status};

/// One event (newline-delimited JSON) may be at most this large.
const MAX_EVENT: usize = 16 << 20;
/// Watches are opened at most this often, so that an API server ending each stream at once does
/// not make the agent spin.
const MIN_REOPEN: Duration = Duration::from_secs(1);

/// What changed in the collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<T> {
    /// The whole collection as it is now (the first list, and every list after a 410 Gone): it
    /// replaces whatever the caller held.
    Restarted(Vec<T>),
    /// Added or modified.
    Applied(T),
    Deleted(T),
}

/// A watch of one collection. [`Watcher::next`] returns the next event; after an error the caller
/// backs off and calls it again, and the watcher resumes where it was.
pub struct Watcher<T> {
    client: Client,
    path: String,
    selector: String,
    resource_version: Option<String>,
    stream: Option<Stream>,
    last_open: Option<Instant>,
    _t: PhantomData<fn() -> T>,
}

struct Stream {
    url: String,
    body: Incoming,
    buf: BytesMut,
    /// The API server was asked to end the stream before this; past it the agent ends it.
    until: Instant,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

impl<T: DeserializeOwned> Watcher<T> {
    pub(super) fn new(client: Client, path: &str, selector: &str) -> Self {
        Self {
            client,
            path: path.to_owned(),
            selector: selector.to_owned(),
            resource_version: None,
            stream: None,
            last_open: None,
            _t: PhantomData,
        }
    }

    /// Starts by watching from `resource_version` instead of listing.
    pub fn from_version(mut self, resource_version: &str) -> Self {
        self.resource_version = Some(resource_version.to_owned());
        self
    }

    /// The resource version the watcher resumes from.
    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// The next event. Lists when there is nothing to resume from, opens a watch when none is open.
    pub async fn next(&mut self) -> Result<Event<T>, Error> {
        loop {
            let Some(version) = self.resource_version.clone() else {
                self.stream = None;
                let path = match self.selector.as_str() {
                    "" => self.path.clone(),
                    s => format!("{}?{s}", self.path),
                };
                let list: List<T> = self.client.get(&path).await?;
                self.resource_version = Some(list.metadata.resource_version);
                return Ok(Event::Restarted(list.items));
            };
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    if let Some(last) = self.last_open {
                        tokio::time::sleep_until(last + MIN_REOPEN).await;
                    }
                    self.last_open = Some(Instant::now());
                    match self.open(&version).await {
                        Ok(stream) => self.stream.insert(stream),
                        Err(e) if e.status() == Some(StatusCode::GONE) => {
                            tracing::info!(error = %e, "watch expired; listing again");
                            self.resource_version = None;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let url = stream.url.clone();
            let line = match stream.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    // Ended: resumed from the last version seen.
                    self.stream = None;
                    continue;
                }
                Err(e) => {
                    self.stream = None;
                    return Err(e);
                }
            };
            if let Some(event) = self.event(&line, &url)? {
                return Ok(event);
            }
        }
    }

    async fn open(&self, version: &str) -> Result<Stream, Error> {
        let d = self.client.deadlines();
        let mut path = format!(
            "{}?watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={}",
            self.path,
            super::query_value(version),
            d.watch.as_secs()
        );
        if !self.selector.is_empty() {
            path.push('&');
            path.push_str(&self.selector);
        }
        let opened = Instant::now();
        let response = self.client.send(Method::GET, &path, None, opened + d.request).await?;
        Ok(Stream {
            url: self.client.url(&path),
            body: response.into_body(),
            buf: BytesMut::new(),
            until: opened + d.watch + d.watch_slack,
        })
    }

    /// Decodes one event line. `None` for what is not the caller's business: a bookmark (its
    /// version is kept), an event type this client does not know, and a 410 Gone, after which the
    /// next call lists again.
    fn event(&mut self, line: &[u8], url: &str) -> Result<Option<Event<T>>, Error> {
        let decode = |source| Error::Decode {
            method: Method::GET,
            url: url.to_owned(),
            source,
        };
        let raw: RawEvent = serde_json::from_slice(line).map_err(decode)?;
        if raw.kind == "ERROR" {
            self.stream = None;
            let status: Status = serde_json::from_value(raw.object).unwrap_or_default();
            if status.code == StatusCode::GONE.as_u16() {
                tracing::info!(url, message = %status.message, "watch expired; listing again");
                self.resource_version = None;
                return Ok(None);
            }
            return Err(Error::Status {
                method: Method::GET,
                url: url.to_owned(),
                status: StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                reason: status.reason,
                message: status.message,
            });
        }
        // Taken before decoding: an object this client cannot read is not read again on resume.
        if let Some(version) = raw
            .object
            .pointer("/metadata/resourceVersion")
            .and_then(serde_json::Value::as_str)
        {
            self.resource_version = Some(version.to_owned());
        }
        let object = |value| serde_json::from_value::<T>(value).map_err(decode);
        Ok(match raw.kind.as_str() {
            "ADDED" | "MODIFIED" => Some(Event::Applied(object(raw.object)?)),
            "DELETED" => Some(Event::Deleted(object(raw.object)?)),
            _ => None,
        })
    }
}

impl Stream {
    /// The next non-empty line; `None` when the stream ended or reached its deadline.
    async fn next_line(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(end + 1).freeze();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_EVENT {
                return Err(Error::TooLarge {
                    method: Method::GET,
                    url: self.url.clone(),
                    limit: MAX_EVENT,
                });
            }
            let frame = match tokio::time::timeout_at(self.until, self.body.frame()).await {
                Err(_) | Ok(None) => return Ok(None),
                Ok(Some(frame)) => frame,
            };
            let frame = frame.map_err(|source| Error::Http {
                method: Method::GET,
                url: self.url.clone(),
                source,
            })?;
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}
