//! `fastserve._core`: the thin PyO3 boundary over `fastserve-core`.

mod call;
mod convert;
mod instance;
mod repository;
mod thread_state;

use std::collections::BTreeMap;
use std::sync::Arc;

use fastserve_core::ensemble::{EnsembleConfig, EnsembleInstance, EnsemblePlan};
use fastserve_core::registry::{ModelVersion, Routing};
use fastserve_core::scheduler::{Instance, InstanceFactory, ModelOptions, Scheduler};
use fastserve_core::server::options::{BuildError, ServerOptions};
use fastserve_core::server::Server;
use fastserve_core::spec::{ModelSpec, TensorSpec};
use fastserve_core::{DataType, ServeError};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::instance::{Label, PyInstance};

/// `(name, datatype, dims, reshape, optional)` as the Python layer passes tensor specs
/// (`fastserve.Tensor.as_tuple`).
type SpecTuple = (String, String, Vec<i64>, Option<Vec<i64>>, bool);

fn tensor_specs(what: &str, list: Vec<SpecTuple>) -> PyResult<Vec<TensorSpec>> {
    list.into_iter()
        .map(|(name, dt, dims, reshape, optional)| {
            let datatype = DataType::parse(&dt)
                .ok_or_else(|| PyValueError::new_err(format!("{what} '{name}': unknown datatype '{dt}'")))?;
            if dims.iter().chain(reshape.iter().flatten()).any(|&d| d < -1) {
                return Err(PyValueError::new_err(format!(
                    "{what} '{name}': dims {dims:?} must be -1 or non-negative"
                )));
            }
            Ok(TensorSpec { name, datatype, dims, reshape, optional })
        })
        .collect()
}

/// Replacement instances for hung ones: `factory(seat)` returns a fresh model object. Called on
/// the watchdog thread, never on the request path.
fn replacement_factory(factory: Py<PyAny>, label: Label, private: Arc<Vec<String>>) -> InstanceFactory {
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

/// A server dropped by Python's garbage collector (never started, or not stopped) still stops its
/// model threads: with the GIL released, since they take it to finalize their instances.
impl Drop for CoreServer {
    fn drop(&mut self) {
        let server = &self.server;
        Python::attach(|py| py.detach(|| server.stop()));
    }
}

#[pymethods]
impl CoreServer {
    /// `options`: the [`ServerOptions`] keys (`server_options()` lists them); unknown keys and bad
    /// values raise ValueError, unreadable TLS files OSError.
    #[new]
    #[pyo3(signature = (options = None))]
    fn new(options: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let options: ServerOptions = match options {
            Some(o) => pythonize::depythonize(o).map_err(|e| PyValueError::new_err(e.to_string()))?,
            None => ServerOptions::default(),
        };
        let config = options.build().map_err(|e| match e {
            BuildError::Invalid(m) => PyValueError::new_err(m),
            BuildError::Files(m) => PyOSError::new_err(m),
        })?;
        let server = Server::new(config);
        call::set_current(server.registry());
        Ok(Self { server, private_paths: Default::default() })
    }

    /// Registers a loaded model version and starts its scheduler (replacing one of the same
    /// version). `options`: the [`ModelOptions`] keys (`model_options()` lists them).
    #[pyo3(signature = (name, version, platform, inputs, outputs, instances, options = None, instance_factory = None))]
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
        options: Option<&Bound<'_, PyAny>>,
        instance_factory: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        if instances.is_empty() {
            return Err(PyValueError::new_err(format!("model '{name}': at least one instance is required")));
        }
        let options: ModelOptions = match options {
            Some(o) => pythonize::depythonize(o).map_err(|e| PyValueError::new_err(format!("model '{name}': {e}")))?,
            None => ModelOptions::default(),
        };
        let config = options.build().map_err(|e| PyValueError::new_err(format!("model '{name}': {e}")))?;
        let spec = Arc::new(ModelSpec {
            name: name.clone(),
            version,
            platform,
            max_batch_size: options.max_batch_size,
            decoupled: options.decoupled,
            inputs: tensor_specs("input", inputs)?,
            outputs: tensor_specs("output", outputs)?,
        });
        let label = Label { name: name.clone(), version };
        let private = Arc::new(self.private_paths.read().unwrap_or_else(|p| p.into_inner()).clone());
        let instances = instances
            .into_iter()
            .map(|obj| {
                PyInstance::new(py, obj, label.clone(), private.clone()).map(|i| Box::new(i) as Box<dyn Instance>)
            })
            .collect::<PyResult<Vec<_>>>()?;
        let factory = instance_factory.map(|f| replacement_factory(f, label.clone(), private));
        // Replacing a version drains the old one, whose threads need the GIL.
        py.detach(|| {
            let scheduler = Scheduler::start_with(spec, config, instances, factory)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            self.server.registry().insert(ModelVersion::ready(scheduler));
            Ok(())
        })
    }

    /// Registers an ensemble version (Triton's `ensemble_scheduling`): `ensemble` is the
    /// `[ensemble]` table (`step` list), checked against the composing models loaded now;
    /// `instances` ensemble requests (or batches) run at once.
    #[pyo3(signature = (name, version, inputs, outputs, ensemble, instances, options = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_ensemble(
        &self,
        py: Python<'_>,
        name: String,
        version: u64,
        inputs: Vec<SpecTuple>,
        outputs: Vec<SpecTuple>,
        ensemble: &Bound<'_, PyAny>,
        instances: usize,
        options: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let steps: EnsembleConfig =
            pythonize::depythonize(ensemble).map_err(|e| PyValueError::new_err(format!("[ensemble] {e}")))?;
        let options: ModelOptions = match options {
            Some(o) => pythonize::depythonize(o).map_err(|e| PyValueError::new_err(format!("model '{name}': {e}")))?,
            None => ModelOptions::default(),
        };
        let mut config = options.build().map_err(|e| PyValueError::new_err(format!("model '{name}': {e}")))?;
        let spec = Arc::new(ModelSpec {
            name: name.clone(),
            version,
            platform: "ensemble".into(),
            max_batch_size: options.max_batch_size,
            decoupled: false,
            inputs: tensor_specs("input", inputs)?,
            outputs: tensor_specs("output", outputs)?,
        });
        let registry = self.server.registry().clone();
        let plan = Arc::new(EnsemblePlan::check(&spec, &steps, &registry).map_err(PyValueError::new_err)?);
        config.ensemble = Some(steps);
        let instances: Vec<Box<dyn Instance>> = (0..instances.max(1))
            .map(|_| {
                Box::new(EnsembleInstance::new(Arc::downgrade(&registry), plan.clone(), spec.clone()))
                    as Box<dyn Instance>
            })
            .collect();
        py.detach(|| {
            let scheduler =
                Scheduler::start(spec, config, instances).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            let weak = Arc::downgrade(&registry);
            scheduler.set_readiness(Box::new(move || weak.upgrade().and_then(|r| plan.unavailable(&r))));
            registry.insert(ModelVersion::ready(scheduler));
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
    /// The index is served in every control mode; load and unload only when `writable`. Raises
    /// PermissionError when management would be reachable from the network without an admin token.
    #[pyo3(signature = (manager, writable = true))]
    fn set_repository_control(&self, manager: Option<Py<PyAny>>, writable: bool) -> PyResult<()> {
        let control = manager.map(|m| Arc::new(crate::repository::PyRepositoryControl::new(m)) as Arc<_>);
        self.server
            .state()
            .set_repository(control, writable)
            .map_err(|e| pyo3::exceptions::PyPermissionError::new_err(e.to_string()))
    }

    /// While true the server is live but not ready: the startup model loads are running.
    fn set_starting(&self, on: bool) {
        self.server.state().set_starting(on);
    }

    /// The model versions whose load is under way (name, version): named by the readiness answer,
    /// `loading` in `fastserve_model_state`.
    fn set_loading(&self, versions: Vec<(String, u64)>) {
        self.server.state().set_loading(versions);
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
/// `model` and `version` become fields of their own (JSON logs), as on the core's records.
#[pyfunction]
#[pyo3(signature = (level, target, message, model = None, version = None))]
fn log(level: &str, target: &str, message: &str, model: Option<&str>, version: Option<u64>) {
    match level {
        "error" => tracing::error!(logger = target, model, version, "{message}"),
        "warning" => tracing::warn!(logger = target, model, version, "{message}"),
        "debug" => tracing::debug!(logger = target, model, version, "{message}"),
        _ => tracing::info!(logger = target, model, version, "{message}"),
    }
}

/// Every server option: name, help, kind, defaults (`default`, and `cli_default` where the command
/// differs), group, choices and bounds. The command's flags and `Server`'s keywords come from it.
#[pyfunction]
fn server_options(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    pythonize::pythonize(py, &ServerOptions::describe()).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Every model option (`config.toml` batching/queue keys, `add_model` keywords), as `server_options`.
#[pyfunction]
fn model_options(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    pythonize::pythonize(py, &ModelOptions::describe()).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Checks model options as `add_model` would (bounds and how they relate); ValueError names the
/// option. `config.toml` parsing uses it, so the rules live in the core only.
#[pyfunction]
fn check_model_options(options: &Bound<'_, PyAny>) -> PyResult<()> {
    let options: ModelOptions = pythonize::depythonize(options).map_err(|e| PyValueError::new_err(e.to_string()))?;
    options.build().map(|_| ()).map_err(PyValueError::new_err)
}

/// The serialized `FileDescriptorSet` of Triton's `model_config.proto`: protobuf's Python
/// implementation parses `config.pbtxt` against it.
#[pyfunction]
fn model_config_descriptors(py: Python<'_>) -> Bound<'_, pyo3::types::PyBytes> {
    pyo3::types::PyBytes::new(py, fastserve_core::pbtxt::descriptors())
}

/// An encoded Triton `ModelConfig` (a parsed `config.pbtxt`) as `config.toml` says it: the table as
/// JSON, the same as TOML text, and the performance-only fields that have no effect. ValueError
/// names every field fastserve does not honor.
#[pyfunction]
fn convert_triton_config(encoded: &[u8], model: &str) -> PyResult<(String, String, Vec<String>)> {
    let converted = fastserve_core::pbtxt::convert(encoded, model).map_err(PyValueError::new_err)?;
    let toml = converted.to_toml().map_err(PyValueError::new_err)?;
    let json = serde_json::Value::Object(converted.table).to_string();
    Ok((json, toml, converted.warnings))
}

/// A JSON object (a model configuration table) written as TOML, by the same writer as
/// `convert_triton_config`'s; ValueError for anything that is not a table TOML can hold (nulls).
#[pyfunction]
fn table_to_toml(table_json: &str) -> PyResult<String> {
    let table: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(table_json).map_err(|e| PyValueError::new_err(format!("not a JSON object: {e}")))?;
    fastserve_core::pbtxt::to_toml(&table).map_err(PyValueError::new_err)
}

/// Every V2 datatype with its NumPy dtype name, from the core's one datatype table.
#[pyfunction]
fn datatypes() -> Vec<(&'static str, &'static str)> {
    DataType::ALL.iter().map(|d| (d.as_str(), d.numpy_name())).collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(datatypes, m)?)?;
    m.add_function(wrap_pyfunction!(call::infer, m)?)?;
    m.add_function(wrap_pyfunction!(call::call_context, m)?)?;
    m.add_function(wrap_pyfunction!(check_model_options, m)?)?;
    m.add_function(wrap_pyfunction!(model_config_descriptors, m)?)?;
    m.add_function(wrap_pyfunction!(convert_triton_config, m)?)?;
    m.add_function(wrap_pyfunction!(table_to_toml, m)?)?;
    m.add_class::<CoreServer>()?;
    m.add_function(wrap_pyfunction!(server_options, m)?)?;
    m.add_function(wrap_pyfunction!(model_options, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(log, m)?)?;
    m.add_function(wrap_pyfunction!(flush_telemetry, m)?)?;
    m.add("OTEL_AVAILABLE", fastserve_core::observe::logging::OTEL_AVAILABLE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
