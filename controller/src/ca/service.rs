//! The `Ca` gRPC service: who may have which certificate. A node gets an identity only while a pod
//! with that namespace and service account is scheduled on it in the current state (of the local
//! store or the Kubernetes source).

use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use weft_api::v1::{SignRequest, SignResponse, ca_server};

use super::{Ca, SignError, parse_identity};
use crate::{auth::NodeAuth, store::State};

pub struct CaService {
    ca: Arc<Ca>,
    states: watch::Receiver<Arc<State>>,
    auth: Arc<NodeAuth>,
}

impl CaService {
    /// Decides every request on the latest state `states` holds, for the node `auth` says calls.
    pub fn new(ca: Arc<Ca>, states: watch::Receiver<Arc<State>>, auth: Arc<NodeAuth>) -> Self {
        Self { ca, states, auth }
    }

    fn sign_for(&self, node: &str, req: &SignRequest) -> Result<SignResponse, Status> {
        let identity = parse_identity(&req.identity).map_err(to_status)?;
        if identity.trust_domain() != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "node {node} may not have identity {identity}: the trust domain is {}",
                self.ca.trust_domain()
            )));
        }
        let state = self.states.borrow().clone();
        let scheduled = state.pods().any(|p| {
            p.node == node && p.namespace == identity.namespace() && p.service_account == identity.service_account()
        });
        if !scheduled {
            return Err(Status::permission_denied(format!(
                "node {node} may not have identity {identity}: no pod with service account {}/{} is scheduled on it",
                identity.namespace(),
                identity.service_account()
            )));
        }
        let issued = self.ca.sign(&req.csr_pem, &identity).map_err(to_status)?;
        tracing::info!(node, identity = %identity, not_after = %issued.not_after, "signed a workload certificate");
        Ok(SignResponse {
            chain_pem: issued.chain_pem,
            roots_pem: self.ca.roots_pem().to_vec(),
        })
    }
}

fn to_status(e: SignError) -> Status {
    match &e {
        SignError::Identity { .. } | SignError::Csr { .. } => Status::invalid_argument(e.to_string()),
        SignError::ForeignTrustDomain { .. } => Status::permission_denied(e.to_string()),
        SignError::Issue { source } => {
            tracing::error!(error = %source, "cannot issue a certificate");
            Status::internal(e.to_string())
        }
    }
}

#[tonic::async_trait]
impl ca_server::Ca for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let node = self.auth.authenticate(request.metadata()).await?;
        let result = self.sign_for(&node, request.get_ref());
        if let Err(status) = &result {
            tracing::warn!(
                node,
                identity = request.get_ref().identity,
                error = status.message(),
                "refused a certificate"
            );
        }
        result.map(Response::new)
    }
}
