//! What kube-proxy does for a Service, for the scenarios' load: a local port
//! whose every new connection goes to a ready endpoint of the pipeline's API
//! Service, looked up when the connection opens. The control plane here has
//! no kube-proxy, and API pods are replaced during a scenario; a client that
//! loses its connection reconnects through the proxy to a live pod.

use anyhow::{Context, Result};
use kube::Client;
use tokio::net::{TcpListener, TcpStream};

use crate::scenario::PipelineRef;

pub struct ServiceProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceProxy {
    pub async fn start(client: Client, pipeline: PipelineRef) -> Result<ServiceProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Service proxy")?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let (client, pipeline) = (client.clone(), pipeline.clone());
                tokio::spawn(async move {
                    // No ready endpoint: the connection closes, and the
                    // client retries as it would against a Service without one.
                    let Ok(endpoint) = pipeline.api_endpoint(&client).await else {
                        return;
                    };
                    let address = endpoint.trim_start_matches("http://").to_owned();
                    if let Ok(mut upstream) = TcpStream::connect(&address).await {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    }
                });
            }
        });
        Ok(ServiceProxy { port, task })
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
