//! A running server: the tokio runtime, the bound listeners, and orderly start/stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::registry::Registry;
use crate::state::{Limits, ServerState};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks an ephemeral port; `http_addr` tells which.
    pub http_port: u16,
    pub limits: Limits,
    /// Prometheus endpoint port (`None`: no metrics listener); 0 picks an ephemeral port.
    pub metrics_port: Option<u16>,
    /// One access log line per inference request.
    pub access_log: bool,
    /// Tokio worker threads for the network front ends.
    pub worker_threads: usize,
    /// How long `stop` waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            http_port: 8000,
            limits: Limits::default(),
            metrics_port: None,
            access_log: false,
            worker_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    http_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
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
        let state = Arc::new(ServerState::new(registry, config.limits.clone(), config.access_log));
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

    /// Binds the listeners and starts serving in background threads.
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
        let bind = |port: u16| -> Result<TcpListener, StartError> {
            let addr = format!("{}:{}", self.config.host, port);
            runtime.block_on(TcpListener::bind(&addr)).map_err(|source| StartError::Bind { addr, source })
        };
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| StartError::Bind { addr: self.config.host.clone(), source })
        };
        let http = bind(self.config.http_port)?;
        let http_addr = local(&http)?;
        let metrics = self.config.metrics_port.map(bind).transpose()?;
        let metrics_addr = metrics.as_ref().map(local).transpose()?;
        let (shutdown, rx) = watch::channel(false);
        let drain = self.config.drain_timeout;
        let mut tasks = Vec::new();
        if let (Some(listener), Some(addr)) = (metrics, metrics_addr) {
            tasks.push(runtime.spawn(crate::http::serve_metrics(listener, self.state.clone(), rx.clone(), drain)));
            tracing::info!(address = %format!("http://{addr}/metrics"), "metrics listening");
        }
        // Logged last: tools watching the log take this line to mean "serving".
        tasks.push(runtime.spawn(crate::http::serve(http, self.state.clone(), rx, drain)));
        tracing::info!(address = %crate::http::describe(http_addr), "HTTP listening");
        self.state.set_serving(true);
        *running = Some(Running { runtime, shutdown, tasks, http_addr, metrics_addr });
        Ok(http_addr)
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().map(|r| r.http_addr)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().and_then(|r| r.metrics_addr)
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), then drains and
    /// stops every model. Blocks; safe to call more than once.
    pub fn stop(&self) {
        self.state.set_draining();
        let running = self.lock().take();
        if let Some(r) = running {
            let _ = r.shutdown.send(true);
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
