//! A running server: the tokio runtime, the bound listeners, and orderly start/stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::registry::Registry;
use crate::state::{Limits, ServerState};
use crate::tls::Tls;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            http_port: 8000,
            grpc_port: None,
            grpc_max_message_bytes: 64 * 1024 * 1024,
            limits: Limits::default(),
            metrics_port: None,
            access_log: false,
            worker_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            drain_timeout: Duration::from_secs(30),
            auth: Auth::default(),
            tls: None,
        }
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
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let registry = Arc::new(Registry::new());
        // Latency histograms only feed the metrics endpoint; skip them when it is off.
        registry.set_histograms(config.metrics_port.is_some());
        let state = Arc::new(
            ServerState::new(registry, config.limits.clone(), config.access_log).with_auth(config.auth.clone()),
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
        let bind = |port: u16| -> Result<(TcpListener, SocketAddr), StartError> {
            let addr = format!("{}:{}", self.config.host, port);
            let listener = runtime
                .block_on(TcpListener::bind(&addr))
                .map_err(|source| StartError::Bind { addr: addr.clone(), source })?;
            let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
            Ok((listener, bound))
        };
        let (http_listener, http_addr) = bind(self.config.http_port)?;
        let grpc = self.config.grpc_port.map(bind).transpose()?;
        let metrics = self.config.metrics_port.map(bind).transpose()?;
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
            let max = self.config.grpc_max_message_bytes;
            let tls = self.config.tls.as_ref().map(|t| t.grpc.clone());
            tasks.push(runtime.spawn(crate::grpc::serve(listener, self.state.clone(), max, rx.clone(), drain, tls)));
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

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), then drains and
    /// stops every model. Blocks; safe to call more than once.
    pub fn stop(&self) {
        self.state.set_draining();
        let running = self.lock().take();
        if let Some(r) = running {
            let _ = r.shutdown.send(true);
            // Both front ends drain their open requests before the models are drained.
            for task in r.tasks {
                let _ = r.runtime.block_on(task);
            }
            self.state.registry.shutdown();
            r.runtime.shutdown_timeout(Duration::from_secs(1));
        } else {
            self.state.registry.shutdown();
        }
        self.state.set_serving(false);
        tracing::info!("server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.lock().is_some() {
            self.stop();
        }
    }
}
