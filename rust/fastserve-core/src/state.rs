//! State shared by every front end: the registry, limits, and the server's lifecycle flags.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

use crate::control::RepositoryControl;
use crate::error::{Result, ServeError};
use crate::http::tensor_metadata;
use crate::metrics::TransportMetrics;
use crate::registry::{ModelVersion, Registry, VersionState};

/// Request size limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 64 * 1024 * 1024 }
    }
}

/// Protocol extensions this server implements, as advertised in server metadata.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository", "statistics"];

pub struct ServerState {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub transport: Arc<TransportMetrics>,
    /// One `fastserve::access` log line per inference request.
    pub access_log: bool,
    serving: AtomicBool,
    draining: AtomicBool,
    repository: RwLock<Option<Arc<dyn RepositoryControl>>>,
}

impl ServerState {
    pub fn new(registry: Arc<Registry>, limits: Limits, access_log: bool) -> Self {
        Self {
            registry,
            limits,
            transport: Arc::default(),
            access_log,
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            repository: RwLock::new(None),
        }
    }

    /// Enables the repository API (control modes `explicit` and `poll`).
    pub fn set_repository(&self, control: Option<Arc<dyn RepositoryControl>>) {
        *self.repository.write().unwrap_or_else(|p| p.into_inner()) = control;
    }

    /// The repository API, or 403 when the control mode does not allow it.
    pub fn repository(&self) -> Result<Arc<dyn RepositoryControl>> {
        self.repository.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            ServeError::Forbidden(
                "the repository API is disabled: start the server with --model-control-mode explicit or poll".into(),
            )
        })
    }

    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_live(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Ready: serving, not draining, and every known model version loaded.
    pub fn is_ready(&self) -> bool {
        self.is_live() && !self.is_draining() && self.registry.all_ready()
    }

    pub fn server_metadata(&self) -> Value {
        json!({ "name": "fastserve", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS })
    }

    /// V2 model metadata. `all_versions` lists every version of the model (a request without one).
    pub fn model_metadata(&self, mv: &ModelVersion, all_versions: bool) -> Result<Value> {
        let spec = mv.spec()?;
        let versions: Vec<String> = if all_versions {
            self.registry
                .model(&mv.name)?
                .versions
                .values()
                .filter(|v| v.is_ready())
                .map(|v| v.version.to_string())
                .collect()
        } else {
            vec![mv.version.to_string()]
        };
        let io = |list: &[crate::spec::TensorSpec]| -> Vec<Value> {
            list.iter().map(|t| tensor_metadata(&t.name, t.datatype.as_str(), &spec.full_dims(t))).collect()
        };
        Ok(json!({
            "name": spec.name,
            "versions": versions,
            "platform": spec.platform,
            "inputs": io(&spec.inputs),
            "outputs": io(&spec.outputs),
        }))
    }

    /// The statistics API in Triton's shape: every ready version, or one model's, or one version's.
    pub fn model_stats(&self, model: Option<&str>, version: Option<&str>) -> Result<Value> {
        let versions: Vec<Arc<ModelVersion>> = match (model, version) {
            (None, _) => self
                .registry
                .models()
                .into_iter()
                .flat_map(|(_, e)| e.versions.values().cloned().collect::<Vec<_>>())
                .collect(),
            (Some(name), None) => self.registry.model(name)?.versions.values().cloned().collect(),
            (Some(name), Some(v)) => vec![self.registry.resolve(name, Some(v))?],
        };
        let mut entries = Vec::with_capacity(versions.len());
        for v in versions {
            match &v.state {
                VersionState::Ready(s) => entries.push(s.stats().to_json(&v.name, v.version)),
                VersionState::Failed(reason) if version.is_some() => {
                    return Err(ServeError::unavailable(format!(
                        "model '{}' version {} is not ready: {reason}",
                        v.name, v.version
                    )))
                }
                VersionState::Failed(_) => {}
            }
        }
        Ok(json!({ "model_stats": entries }))
    }
}
