//! A running server: the tokio runtime, the bound listeners, and orderly start/stop.

pub mod auth;
pub mod listener;
pub mod metrics;
pub mod model_config;
pub mod options;
pub mod repository;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use self::options::ServerOptions;
use crate::registry::Registry;
use crate::scheduler::SHUTDOWN_GRACE;
use crate::server::auth::Auth;
use crate::server::state::{Limits, ServerState};
use crate::server::tls::Tls;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks an ephemeral port; `http_addr` tells which.
    pub http_port: u16,
    /// `None`: no gRPC listener. 0 picks an ephemeral port; `grpc_addr` tells which.
    pub grpc_port: Option<u16>,
    /// Largest gRPC message received or sent; larger ones fail with RESOURCE_EXHAUSTED.
    pub grpc_max_message_bytes: usize,
    pub limits: Limits,
    /// Prometheus endpoint port (`None`: no metrics listener); 0 picks an ephemeral port.
    pub metrics_port: Option<u16>,
    /// One access log line per inference request.
    pub access_log: bool,
    /// Tokio worker threads for the network front ends.
    pub worker_threads: usize,
    /// How long `stop` waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Bearer tokens for inference and management (default: none).
    pub auth: Auth,
    /// TLS for the HTTP, gRPC and metrics listeners (`None`: plain TCP).
    pub tls: Option<Tls>,
    /// Compression of gRPC responses (None: never; requests may always come compressed).
    pub grpc_response_compression: Option<crate::compression::Coding>,
    /// Serve the repository API on a non-loopback `host` without an admin token.
    pub allow_remote_repository_api: bool,
    /// Triton's system shared-memory extension (`--no-shared-memory` turns it off).
    pub shared_memory: bool,
    /// Ready only when every model version is (Triton's `--strict-readiness`).
    pub strict_readiness: bool,
    /// The Swagger UI page at `/v2/docs` (`--no-swagger-ui` turns it off).
    pub swagger_ui: bool,
}

impl Default for ServerConfig {
    /// The configuration of the default [`ServerOptions`], where every default is defined.
    fn default() -> Self {
        ServerOptions::default().build().unwrap_or_else(|e| unreachable!("default options: {e}"))
    }
}

struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    http_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
}

pub struct Server {
    config: ServerConfig,
    state: Arc<ServerState>,
    running: Mutex<Option<Running>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the server is already running")]
    AlreadyRunning,
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    /// `listener` names the option that chose the port (`http_port`, `grpc_port`, `metrics_port`).
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind { addr: String, listener: &'static str, source: std::io::Error },
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let registry = Arc::new(Registry::new());
        // Latency histograms only feed the metrics endpoint; skip them when it is off.
        registry.set_histograms(config.metrics_port.is_some());
        let state = Arc::new(
            ServerState::new(registry, config.limits.clone(), config.access_log)
                .with_auth(config.auth.clone())
                .with_shared_memory(config.shared_memory)
                .with_strict_readiness(config.strict_readiness)
                .with_swagger_ui(config.swagger_ui)
                .guard_repository(&config.host, config.allow_remote_repository_api),
        );
        Self { config, state, running: Mutex::new(None) }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.state.registry
    }

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the listeners and starts serving in background threads; returns the HTTP address.
    pub fn start(&self) -> Result<SocketAddr, StartError> {
        let mut running = self.lock();
        if running.is_some() {
            return Err(StartError::AlreadyRunning);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.config.worker_threads.max(1))
            .thread_name("fastserve-net")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let bind = |port: u16, listener: &'static str| -> Result<(TcpListener, SocketAddr), StartError> {
            let addr = format!("{}:{}", self.config.host, port);
            let socket = runtime.block_on(TcpListener::bind(&addr)).map_err(|source| StartError::Bind {
                addr: addr.clone(),
                listener,
                source,
            })?;
            let bound = socket.local_addr().map_err(|source| StartError::Bind { addr, listener, source })?;
            Ok((socket, bound))
        };
        let (http_listener, http_addr) = bind(self.config.http_port, "http_port")?;
        let grpc = self.config.grpc_port.map(|p| bind(p, "grpc_port")).transpose()?;
        let metrics = self.config.metrics_port.map(|p| bind(p, "metrics_port")).transpose()?;
        let (shutdown, rx) = watch::channel(false);
        let drain = self.config.drain_timeout;
        let mut tasks = Vec::new();
        let metrics_addr = metrics.map(|(listener, addr)| {
            // Plain HTTP, like the probes: scrapers rarely hold client certificates.
            tasks.push(runtime.spawn(crate::http::serve_metrics(
                listener,
                self.state.clone(),
                rx.clone(),
                drain,
                None,
            )));
            addr
        });
        let grpc_addr = grpc.map(|(listener, addr)| {
            let options = crate::grpc::Options {
                max_message_bytes: self.config.grpc_max_message_bytes,
                response_compression: self.config.grpc_response_compression,
            };
            let tls = self.config.tls.as_ref().map(|t| t.grpc.clone());
            tasks.push(runtime.spawn(crate::grpc::serve(
                listener,
                self.state.clone(),
                options,
                rx.clone(),
                drain,
                tls,
            )));
            addr
        });
        let tls = self.config.tls.as_ref().map(|t| t.http.clone());
        tasks.push(runtime.spawn(crate::http::serve(http_listener, self.state.clone(), rx, drain, tls)));
        self.state.set_serving(true);
        if let Some(addr) = metrics_addr {
            tracing::info!(address = %format!("http://{addr}/metrics"), "metrics listening");
        }
        if let Some(addr) = grpc_addr {
            tracing::info!(address = %addr, tls = self.config.tls.is_some(), "gRPC listening");
        }
        // Logged last: tools watching the log take this line to mean "serving".
        tracing::info!(address = %crate::http::describe(http_addr, self.config.tls.is_some()), "HTTP listening");
        *running = Some(Running { runtime, shutdown, tasks, http_addr, grpc_addr, metrics_addr });
        Ok(http_addr)
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().map(|r| r.http_addr)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().and_then(|r| r.metrics_addr)
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().and_then(|r| r.grpc_addr)
    }

    /// Stops accepting and lets in-flight requests finish until the drain timeout, then stops
    /// every model: requests still queued are answered 503 and threads stuck in a model past
    /// [`SHUTDOWN_GRACE`] are abandoned. Returns how many model threads were left running. Blocks
    /// for at most the drain timeout plus a few seconds; safe to call more than once.
    pub fn stop(&self) -> usize {
        self.state.set_draining();
        let deadline = Instant::now() + self.config.drain_timeout;
        let running = self.lock().take();
        let abandoned = match running {
            Some(r) => {
                let _ = r.shutdown.send(true);
                // Streams still running at the deadline end then, so their connections can close.
                let state = self.state.clone();
                r.runtime.spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
                    state.registry.end_streams();
                });
                // Both front ends drain their open requests before the models are stopped.
                let until = tokio::time::Instant::from_std(deadline + SHUTDOWN_GRACE);
                for task in r.tasks {
                    let _ = r.runtime.block_on(async move { tokio::time::timeout_at(until, task).await });
                }
                let abandoned = self.state.registry.shutdown(Some(deadline));
                // Connections still open may be writing the 503s just answered.
                let transport = self.state.transport.clone();
                r.runtime.block_on(async move {
                    let flushed = async {
                        while transport.open_connections() > 0 {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, flushed).await;
                });
                r.runtime.shutdown_timeout(Duration::from_millis(500));
                abandoned
            }
            None => self.state.registry.shutdown(Some(deadline)),
        };
        self.state.set_serving(false);
        if abandoned > 0 {
            tracing::warn!(threads = abandoned, "server stopped; model threads still running were abandoned");
        } else {
            tracing::info!("server stopped");
        }
        abandoned
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.lock().is_some() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Coding;
    use crate::proto::{model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse};
    use crate::registry::ModelVersion;
    use crate::scheduler::plan::BatchPolicy;
    use crate::scheduler::{Instance, PhaseClock, Scheduler, SchedulerConfig};
    use crate::spec::{ModelSpec, TensorSpec};
    use crate::tensor::datatype::DataType;
    use crate::tensor::Tensor;
    use tonic::codec::CompressionEncoding;

    struct Echo;
    impl Instance for Echo {
        fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> crate::Result<Vec<Tensor>> {
            Ok(inputs)
        }
    }

    /// A server on ephemeral ports with model `echo` (X → X, FP32 [4]).
    fn echo_server(config: ServerConfig) -> Server {
        let server = Server::new(ServerConfig { http_port: 0, grpc_port: Some(0), ..config });
        let spec = ModelSpec {
            name: "echo".into(),
            version: 1,
            platform: "test".into(),
            max_batch_size: 0,
            decoupled: false,
            inputs: vec![TensorSpec::new("X", DataType::Fp32, vec![4])],
            outputs: vec![TensorSpec::new("X", DataType::Fp32, vec![4])],
        };
        let policy = BatchPolicy { max_batch_size: 0, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] };
        let scheduler =
            Scheduler::start(Arc::new(spec), SchedulerConfig::new(policy, 8), vec![Box::new(Echo)]).unwrap();
        server.registry().insert(ModelVersion::ready(scheduler));
        server.start().unwrap();
        server
    }

    /// The `grpc-encoding` of a ModelInfer answer to a client that accepts gzip.
    async fn response_encoding(addr: SocketAddr) -> Option<String> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = tonic::client::Grpc::new(channel).accept_compressed(CompressionEncoding::Gzip);
        client.ready().await.unwrap();
        let request = ModelInferRequest {
            model_name: "echo".into(),
            inputs: vec![InferInputTensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 16].into()],
            ..Default::default()
        };
        let path = http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
        let codec = tonic_prost::ProstCodec::<ModelInferRequest, ModelInferResponse>::default();
        let response = client.unary(tonic::Request::new(request), path, codec).await.unwrap();
        response.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn grpc_responses_are_compressed_only_when_configured() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let plain = echo_server(ServerConfig::default());
        let addr = plain.grpc_addr().unwrap();
        assert_eq!(runtime.block_on(response_encoding(addr)), None, "a client accepting gzip gets it uncompressed");
        plain.stop();
        let gzip = echo_server(ServerConfig { grpc_response_compression: Some(Coding::Gzip), ..Default::default() });
        let addr = gzip.grpc_addr().unwrap();
        assert_eq!(runtime.block_on(response_encoding(addr)).as_deref(), Some("gzip"));
        gzip.stop();
    }
}
