//! `fastserve._core`: the thin PyO3 boundary over `fastserve-core`.

mod control;
mod convert;
mod instance;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fastserve_core::compression::Coding;
use fastserve_core::registry::{ModelVersion, Routing};
use fastserve_core::scheduler::plan::BatchPolicy;
use fastserve_core::scheduler::{
    Instance, InstanceFactory, Scheduler, SchedulerConfig, DEFAULT_MAX_ABANDONED_INSTANCES,
};
use fastserve_core::server::auth::Auth;
use fastserve_core::server::state::Limits;
use fastserve_core::server::tls::{Tls, TlsFiles};
use fastserve_core::server::{Server, ServerConfig};
use fastserve_core::spec::{ModelSpec, TensorSpec};
use fastserve_core::{DataType, ServeError};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::instance::PyInstance;

/// `(name, datatype, dims)` as the Python layer passes tensor specs.
type SpecTuple = (String, String, Vec<i64>);

fn tensor_specs(what: &str, list: Vec<SpecTuple>) -> PyResult<Vec<TensorSpec>> {
    list.into_iter()
        .map(|(name, dt, dims)| {
            let datatype = DataType::parse(&dt)
                .ok_or_else(|| PyValueError::new_err(format!("{what} '{name}': unknown datatype '{dt}'")))?;
            if dims.iter().any(|&d| d < -1) {
                return Err(PyValueError::new_err(format!(
                    "{what} '{name}': dims {dims:?} must be -1 or non-negative"
                )));
            }
            Ok(TensorSpec { name, datatype, dims })
        })
        .collect()
}

/// Replacement instances for hung ones: `factory(seat)` returns a fresh model object. Called on
/// the watchdog thread, never on the request path.
fn replacement_factory(factory: Py<PyAny>, label: String, private: Arc<Vec<String>>) -> InstanceFactory {
    Arc::new(move |seat| {
        Python::attach(|py| {
            let model = factory
                .call1(py, (seat,))
                .map_err(|e| ServeError::Internal(format!("{label}: creating a replacement instance raised {e}")))?;
            PyInstance::new(py, model, label.clone(), private.clone())
                .map(|i| Box::new(i) as Box<dyn Instance>)
                .map_err(|e| ServeError::Internal(format!("{label}: {e}")))
        })
    })
}

/// The serving engine: network front ends, model registry, schedulers.
#[pyclass(module = "fastserve._core", name = "CoreServer", frozen)]
struct CoreServer {
    server: Server,
    /// Directory prefixes scrubbed from model error messages (the model repository).
    private_paths: std::sync::RwLock<Vec<String>>,
}

#[pymethods]
impl CoreServer {
    #[new]
    #[pyo3(signature = (host = "127.0.0.1".to_string(), http_port = 8000, max_body_bytes = 64 * 1024 * 1024, worker_threads = 0, drain_timeout_s = 30.0, grpc_port = None, grpc_max_message_bytes = 64 * 1024 * 1024, metrics_port = None, access_log = false, auth_token = None, admin_token = None, tls_cert = None, tls_key = None, tls_client_ca = None, max_header_bytes = 64 * 1024, max_headers = 100, max_json_depth = 64, max_request_elements = None, max_connections = 16_384, grpc_max_concurrent_streams = 256, header_read_timeout_s = 30.0, body_read_timeout_s = 60.0, idle_timeout_s = 120.0, grpc_response_compression = "none", allow_remote_repository_api = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        http_port: u16,
        max_body_bytes: usize,
        worker_threads: usize,
        drain_timeout_s: f64,
        grpc_port: Option<u16>,
        grpc_max_message_bytes: usize,
        metrics_port: Option<u16>,
        access_log: bool,
        auth_token: Option<String>,
        admin_token: Option<String>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_client_ca: Option<PathBuf>,
        max_header_bytes: usize,
        max_headers: usize,
        max_json_depth: usize,
        max_request_elements: Option<usize>,
        max_connections: usize,
        grpc_max_concurrent_streams: u32,
        header_read_timeout_s: f64,
        body_read_timeout_s: f64,
        idle_timeout_s: f64,
        grpc_response_compression: &str,
        allow_remote_repository_api: bool,
    ) -> PyResult<Self> {
        for (what, token) in [("auth_token", &auth_token), ("admin_token", &admin_token)] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(PyValueError::new_err(format!("{what} must not be empty")));
            }
        }
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(
                Tls::load(&TlsFiles { cert, key, client_ca: tls_client_ca })
                    .map_err(|e| PyOSError::new_err(e.to_string()))?,
            ),
            (None, None) if tls_client_ca.is_none() => None,
            _ => return Err(PyValueError::new_err("TLS needs both tls_cert and tls_key (tls_client_ca is optional)")),
        };
        let seconds = |name: &str, s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| PyValueError::new_err(format!("{name} must be a positive number")))
        };
        let limits = Limits {
            max_body_bytes,
            max_header_bytes,
            max_headers,
            max_json_depth,
            // By default as many as the largest body or gRPC message could hold (one byte each).
            max_request_elements: max_request_elements.unwrap_or(max_body_bytes.max(grpc_max_message_bytes)),
            max_connections,
            grpc_max_concurrent_streams,
            header_read_timeout: seconds("header_read_timeout_s", header_read_timeout_s)?,
            body_read_timeout: seconds("body_read_timeout_s", body_read_timeout_s)?,
            idle_timeout: seconds("idle_timeout_s", idle_timeout_s)?,
        };
        limits.validate().map_err(PyValueError::new_err)?;
        let grpc_response_compression = Coding::parse_setting(grpc_response_compression)
            .map_err(|e| PyValueError::new_err(format!("grpc_response_compression {e}")))?;
        let mut config = ServerConfig {
            grpc_response_compression,
            allow_remote_repository_api,
            host,
            http_port,
            grpc_port,
            grpc_max_message_bytes,
            limits,
            metrics_port,
            access_log,
            auth: Auth::new(auth_token, admin_token),
            tls,
            ..ServerConfig::default()
        };
        if worker_threads > 0 {
            config.worker_threads = worker_threads;
        }
        config.drain_timeout = Duration::try_from_secs_f64(drain_timeout_s)
            .map_err(|_| PyValueError::new_err("drain_timeout_s must be a non-negative number"))?;
        Ok(Self { server: Server::new(config), private_paths: Default::default() })
    }

    /// Registers a loaded model version and starts its scheduler (replacing one of the same version).
    #[pyo3(signature = (name, version, platform, inputs, outputs, instances, max_batch_size = 0, max_queue_delay_us = 0, preferred_batch_sizes = Vec::new(), max_queue_size = 1024, default_queue_timeout_us = 0, priority_levels = 0, default_priority_level = 0, execution_timeout_ms = 0, instance_factory = None, max_abandoned_instances = DEFAULT_MAX_ABANDONED_INSTANCES))]
    #[allow(clippy::too_many_arguments)]
    fn add_model(
        &self,
        py: Python<'_>,
        name: String,
        version: u64,
        platform: String,
        inputs: Vec<SpecTuple>,
        outputs: Vec<SpecTuple>,
        instances: Vec<Py<PyAny>>,
        max_batch_size: usize,
        max_queue_delay_us: u64,
        preferred_batch_sizes: Vec<usize>,
        max_queue_size: usize,
        default_queue_timeout_us: u64,
        priority_levels: u64,
        default_priority_level: u64,
        execution_timeout_ms: u64,
        instance_factory: Option<Py<PyAny>>,
        max_abandoned_instances: usize,
    ) -> PyResult<()> {
        if instances.is_empty() {
            return Err(PyValueError::new_err(format!("model '{name}': at least one instance is required")));
        }
        let spec = Arc::new(ModelSpec {
            name: name.clone(),
            version,
            platform,
            max_batch_size,
            inputs: tensor_specs("input", inputs)?,
            outputs: tensor_specs("output", outputs)?,
        });
        let label = format!("model '{name}' version {version}");
        let private = Arc::new(self.private_paths.read().unwrap_or_else(|p| p.into_inner()).clone());
        let instances = instances
            .into_iter()
            .map(|obj| {
                PyInstance::new(py, obj, label.clone(), private.clone()).map(|i| Box::new(i) as Box<dyn Instance>)
            })
            .collect::<PyResult<Vec<_>>>()?;
        if default_priority_level > priority_levels.max(1) {
            return Err(PyValueError::new_err(format!(
                "model '{name}': default_priority_level {default_priority_level} exceeds priority_levels {priority_levels}"
            )));
        }
        let policy = BatchPolicy {
            max_batch_size,
            max_queue_delay: Duration::from_micros(max_queue_delay_us),
            preferred_batch_sizes,
        };
        let config = SchedulerConfig {
            default_queue_timeout: (default_queue_timeout_us > 0)
                .then(|| Duration::from_micros(default_queue_timeout_us)),
            priority_levels,
            default_priority_level,
            execution_timeout: (execution_timeout_ms > 0).then(|| Duration::from_millis(execution_timeout_ms)),
            max_abandoned_instances,
            ..SchedulerConfig::new(policy, max_queue_size)
        };
        let factory = instance_factory.map(|f| replacement_factory(f, label.clone(), private));
        // Replacing a version drains the old one, whose threads need the GIL.
        py.detach(|| {
            let scheduler = Scheduler::start_with(spec, config, instances, factory)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            self.server.registry().insert(ModelVersion::ready(scheduler));
            Ok(())
        })
    }

    /// Records a version that failed to load, so ready/metadata answers carry the reason.
    fn add_failed_model(&self, py: Python<'_>, name: String, version: u64, reason: String) {
        py.detach(|| self.server.registry().insert(ModelVersion::failed(name, version, reason)));
    }

    /// Counts a failed (re)load in `fastserve_model_load_failure_total`.
    fn record_load_failure(&self, name: &str, version: u64) {
        self.server.registry().record_load_failure(name, version);
    }

    /// Unloads a model (or one version) after draining its queue; returns how many versions went.
    #[pyo3(signature = (name, version = None))]
    fn remove_model(&self, py: Python<'_>, name: String, version: Option<u64>) -> usize {
        py.detach(|| self.server.registry().remove(&name, version))
    }

    /// Routes requests that name no version by `weights` ({version: weight}) and resolves `labels`.
    fn set_routing(&self, name: &str, labels: BTreeMap<String, u64>, weights: BTreeMap<u64, u32>) -> PyResult<()> {
        let routing = Routing { labels, weights: weights.into_iter().collect() };
        self.server.registry().set_routing(name, routing).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Serves the repository API through `manager` (its index/load/unload methods); None disables it.
    /// Raises PermissionError when it would be reachable from the network without an admin token.
    fn set_repository_control(&self, manager: Option<Py<PyAny>>) -> PyResult<()> {
        let control = manager.map(|m| Arc::new(crate::control::PyRepositoryControl::new(m)) as Arc<_>);
        self.server
            .state()
            .set_repository(control)
            .map_err(|e| pyo3::exceptions::PyPermissionError::new_err(e.to_string()))
    }

    /// While true the server is live but not ready: the startup model loads are running.
    fn set_starting(&self, on: bool) {
        self.server.state().set_starting(on);
    }

    /// Names and versions currently registered, with readiness.
    fn models(&self) -> Vec<(String, u64, bool)> {
        self.server
            .registry()
            .models()
            .into_iter()
            .flat_map(|(name, entry)| {
                entry.versions.values().map(move |v| (name.clone(), v.version, v.is_ready())).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Binds and starts serving in background threads; returns the bound HTTP port.
    fn start(&self) -> PyResult<u16> {
        self.server.start().map(|addr| addr.port()).map_err(|e| PyOSError::new_err(e.to_string()))
    }

    /// Stops accepting, drains in-flight requests and every model until the drain timeout, then
    /// returns how many model threads were left running (stuck in a model's code).
    fn stop(&self, py: Python<'_>) -> usize {
        py.detach(|| self.server.stop())
    }

    /// Directory prefixes replaced by `<repository>` in model error messages sent to clients.
    fn set_private_paths(&self, paths: Vec<String>) {
        let mut paths: Vec<String> = paths.into_iter().filter(|p| p.len() > 1).collect();
        // Longest first, so a prefix never leaves part of a longer one behind.
        paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
        *self.private_paths.write().unwrap_or_else(|p| p.into_inner()) = paths;
    }

    #[getter]
    fn http_port(&self) -> Option<u16> {
        self.server.http_addr().map(|a| a.port())
    }

    #[getter]
    fn metrics_port(&self) -> Option<u16> {
        self.server.metrics_addr().map(|a| a.port())
    }

    /// The bound gRPC port while running with a gRPC listener.
    #[getter]
    fn grpc_port(&self) -> Option<u16> {
        self.server.grpc_addr().map(|a| a.port())
    }

    fn is_ready(&self) -> bool {
        self.server.state().is_ready()
    }
}

/// Sets up Rust-side logging to stderr (`text` or `json`), optionally exporting request spans to an
/// OTLP/HTTP endpoint; returns False if logging was already set up.
#[pyfunction]
#[pyo3(signature = (level = "info", json = false, otel_endpoint = None))]
fn init_logging(level: &str, json: bool, otel_endpoint: Option<&str>) -> PyResult<bool> {
    fastserve_core::observe::logging::init(level, json, otel_endpoint).map_err(PyRuntimeError::new_err)
}

/// Sends trace spans still buffered for export.
#[pyfunction]
fn flush_telemetry(py: Python<'_>) {
    py.detach(fastserve_core::observe::logging::flush);
}

/// Writes a log record through the Rust logger, so Python and Rust share one sink and format.
#[pyfunction]
fn log(level: &str, target: &str, message: &str) {
    match level {
        "error" => tracing::error!(logger = target, "{message}"),
        "warning" => tracing::warn!(logger = target, "{message}"),
        "debug" => tracing::debug!(logger = target, "{message}"),
        _ => tracing::info!(logger = target, "{message}"),
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CoreServer>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(log, m)?)?;
    m.add_function(wrap_pyfunction!(flush_telemetry, m)?)?;
    m.add("OTEL_AVAILABLE", fastserve_core::observe::logging::OTEL_AVAILABLE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
