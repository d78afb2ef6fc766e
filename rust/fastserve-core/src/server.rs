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
            worker_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<()>,
    http_addr: SocketAddr,
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
        let state = Arc::new(ServerState::new(Arc::new(Registry::new()), config.limits.clone()));
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
        let addr = format!("{}:{}", self.config.host, self.config.http_port);
        let listener = runtime
            .block_on(TcpListener::bind(&addr))
            .map_err(|source| StartError::Bind { addr: addr.clone(), source })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        let (shutdown, rx) = watch::channel(false);
        let http_task = runtime.spawn(crate::http::serve(listener, self.state.clone(), rx, self.config.drain_timeout));
        self.state.set_serving(true);
        tracing::info!(address = %crate::http::describe(http_addr), "HTTP listening");
        *running = Some(Running { runtime, shutdown, http_task, http_addr });
        Ok(http_addr)
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().map(|r| r.http_addr)
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), then drains and
    /// stops every model. Blocks; safe to call more than once.
    pub fn stop(&self) {
        self.state.set_draining();
        let running = self.lock().take();
        if let Some(r) = running {
            let _ = r.shutdown.send(true);
            let _ = r.runtime.block_on(r.http_task);
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
