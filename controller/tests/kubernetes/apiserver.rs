//! The controller's view of a real API server for tests ([`weft_test_apiserver`]: etcd and
//! kube-apiserver 1.20 on loopback, killed and removed on drop): kube-rs clients, and the CRDs.

use std::ops::Deref;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::PostParams,
    runtime::wait::{await_condition, conditions},
};
use weft_test_apiserver::{ADMIN_TOKEN, READY_TIMEOUT};

pub struct ApiServer(weft_test_apiserver::ApiServer);

impl Deref for ApiServer {
    type Target = weft_test_apiserver::ApiServer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl ApiServer {
    /// Starts etcd and the API server and waits until it is ready; `None` (a note printed) when a
    /// binary is missing outside CI. Blocks the test's own thread while it waits: the processes die
    /// with the thread that started them (`PR_SET_PDEATHSIG`), so never from a pool thread.
    pub async fn start(test: &str) -> Option<ApiServer> {
        weft_test_apiserver::ApiServer::start(test, &[], &[]).map(ApiServer)
    }

    /// A client acting as the administrator.
    pub async fn client(&self) -> kube::Client {
        Self::client_from_yaml(&self.kubeconfig_for(ADMIN_TOKEN)).await
    }

    /// A client authenticating with `token` (a service account's, from the TokenRequest API).
    #[allow(dead_code, reason = "not every test binary acts as a service account")]
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        Self::client_from_yaml(&self.kubeconfig_for(token)).await
    }

    async fn client_from_yaml(yaml: &str) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
        weft_controller::k8s::client_from(config).unwrap()
    }

    /// Installs the CRDs of a YAML stream and waits until the API server serves them.
    pub async fn install_crds(client: &Client, yaml: &str) {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut names = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).unwrap();
            let created = api
                .create(&PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("the API server refused CRD {:?}: {e}", crd.metadata.name));
            names.push(created.metadata.name.unwrap());
        }
        assert_eq!(names.len(), 2, "{names:?}");
        for name in names {
            tokio::time::timeout(
                READY_TIMEOUT,
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within {READY_TIMEOUT:?}"))
            .unwrap();
        }
    }
}
