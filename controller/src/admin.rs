//! The `Store` gRPC service (weftctl apply/delete/get), served on a unix socket only.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::v1::{ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, store_server};

use crate::store::{self, Outcome, Store};

pub struct StoreService {
    store: Arc<Store>,
}

impl StoreService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// Runs a blocking store operation (it writes and syncs a file) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, store::Error> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(to_status)
    }
}

/// Requests that do not validate get INVALID_ARGUMENT (or NOT_FOUND) with the whole message; a
/// failure to persist is INTERNAL, with its cause.
fn to_status(e: store::Error) -> Status {
    match &e {
        store::Error::Invalid { .. } | store::Error::UnknownKind { .. } => Status::invalid_argument(e.to_string()),
        store::Error::NotFound { .. } => Status::not_found(e.to_string()),
        _ => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            tracing::error!(error = msg, "store failure");
            Status::internal(msg)
        }
    }
}

fn source_name(source: String) -> String {
    if source.is_empty() { "-".to_owned() } else { source }
}

fn log_outcome(op: &str, source: &str, outcome: &Outcome) {
    tracing::info!(
        op,
        source,
        objects = outcome.results.len(),
        revision = outcome.revision,
        "store request"
    );
}

#[tonic::async_trait]
impl store_server::Store for StoreService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let ApplyRequest { yaml, source } = request.into_inner();
        let source = source_name(source);
        let name = source.clone();
        let outcome = self.blocking(move |s| s.apply(&yaml, &name)).await?;
        log_outcome("apply", &source, &outcome);
        Ok(Response::new(ApplyResponse {
            results: outcome.results,
            revision: outcome.revision,
        }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let DeleteRequest {
            yaml,
            source,
            ignore_not_found,
        } = request.into_inner();
        let source = source_name(source);
        let name = source.clone();
        let outcome = self.blocking(move |s| s.delete(&yaml, &name, ignore_not_found)).await?;
        log_outcome("delete", &source, &outcome);
        Ok(Response::new(DeleteResponse {
            results: outcome.results,
            revision: outcome.revision,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest { kind, namespace } = request.into_inner();
        let kind = (!kind.is_empty()).then_some(kind);
        let namespace = (!namespace.is_empty()).then_some(namespace);
        let yaml = self
            .store
            .get(kind.as_deref(), namespace.as_deref())
            .map_err(to_status)?;
        Ok(Response::new(GetResponse { yaml }))
    }
}
