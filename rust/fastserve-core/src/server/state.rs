//! State shared by every front end: the registry, limits, and the server's lifecycle flags.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::error::{Result, ServeError};
use crate::observe::stats::ModelStats;
use crate::observe::transport::TransportMetrics;
use crate::registry::{ModelVersion, Registry, VersionState};
use crate::server::auth::Auth;
use crate::server::listener::ConnectionLimit;
pub use crate::server::options::{Limits, JSON_DEPTH_CEILING, MIN_HEADER_BYTES};
use crate::server::repository::RepositoryControl;
use crate::shm::SharedMemory;

/// Whether `host` names only the local machine (an IP loopback address or `localhost`).
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Protocol extensions this server implements, as advertised in server metadata.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository", "statistics", "generate"];
/// Advertised too unless the server runs with `--no-shared-memory`.
pub const SHARED_MEMORY_EXTENSION: &str = "system_shared_memory";

/// V2 server metadata, the same over HTTP and gRPC.
#[derive(Debug, Serialize)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

/// V2 model metadata, the same over HTTP and gRPC.
#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

#[derive(Debug, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    /// -1 marks a variable dimension, the batch dimension first when the model batches.
    pub shape: Vec<i64>,
}

pub struct ServerState {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub transport: Arc<TransportMetrics>,
    /// One `fastserve::access` log line per inference request.
    pub access_log: bool,
    /// Bearer tokens (none: no authentication).
    pub auth: Auth,
    /// Open client connections over every listener, at most `limits.max_connections`.
    pub connections: Arc<ConnectionLimit>,
    /// Registered system shared-memory regions.
    pub shared_memory: SharedMemory,
    serving: AtomicBool,
    draining: AtomicBool,
    /// Set while the models given at startup load: live, not yet ready.
    starting: AtomicBool,
    /// The model versions whose load is under way (`'m' version 1`), for the readiness answer.
    loading: RwLock<Vec<(String, u64)>>,
    /// Ready only when every model version is (false: a failed model does not make it unready).
    strict_readiness: bool,
    repository: RwLock<Option<Arc<dyn RepositoryControl>>>,
    /// Load and unload are served (control modes `explicit` and `poll`); the index always is.
    repository_writable: AtomicBool,
    /// The Swagger UI page at `/v2/docs` (`--no-swagger-ui` turns it off).
    pub swagger_ui: bool,
    /// The repository API may be served on a non-loopback address without an admin token.
    remote_repository_ok: bool,
}

impl ServerState {
    pub fn new(registry: Arc<Registry>, limits: Limits, access_log: bool) -> Self {
        Self {
            registry,
            connections: Arc::new(ConnectionLimit::new(limits.max_connections)),
            limits,
            transport: Arc::default(),
            access_log,
            auth: Auth::default(),
            shared_memory: SharedMemory::new(true),
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            starting: AtomicBool::new(false),
            loading: RwLock::new(Vec::new()),
            strict_readiness: true,
            repository: RwLock::new(None),
            repository_writable: AtomicBool::new(false),
            swagger_ui: true,
            remote_repository_ok: true,
        }
    }

    /// Refuses to serve the repository API on `host` without an admin token when `host` is not a
    /// loopback address, unless `allow_remote` (`--allow-remote-repository-api`).
    pub fn guard_repository(mut self, host: &str, allow_remote: bool) -> Self {
        self.remote_repository_ok = allow_remote || is_loopback(host);
        self
    }

    /// Serves the system shared-memory extension, or refuses it (`--no-shared-memory`).
    pub fn with_shared_memory(mut self, enabled: bool) -> Self {
        self.shared_memory = SharedMemory::new(enabled);
        self
    }

    /// Whether a model version that is not ready makes the server unready (Triton's `--strict-readiness`).
    pub fn with_strict_readiness(mut self, strict: bool) -> Self {
        self.strict_readiness = strict;
        self
    }

    /// Serves the Swagger UI page at `/v2/docs`, or not.
    pub fn with_swagger_ui(mut self, enabled: bool) -> Self {
        self.swagger_ui = enabled;
        self
    }

    /// Requires bearer tokens as `auth` says.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Serves the repository API through `control`: its index in every control mode, load and
    /// unload only when `writable` (control modes `explicit` and `poll`). Model management must
    /// not be reachable from the network by accident: on a non-loopback address it needs an
    /// admin token or an explicit opt-in. The read-only index needs neither.
    pub fn set_repository(&self, control: Option<Arc<dyn RepositoryControl>>, writable: bool) -> Result<()> {
        let writable = writable && control.is_some();
        if writable && !self.remote_repository_ok && !self.auth.has_admin_token() {
            return Err(ServeError::Forbidden(
                "the repository API would be reachable from the network without an admin token: set \
                 --admin-token-file (or FASTSERVE_ADMIN_TOKEN), listen on 127.0.0.1, or pass \
                 --allow-remote-repository-api"
                    .into(),
            ));
        }
        *self.repository.write().unwrap_or_else(|p| p.into_inner()) = control;
        self.repository_writable.store(writable, Ordering::Release);
        Ok(())
    }

    /// Marks the initial model loads as running (not ready) or finished.
    pub fn set_starting(&self, on: bool) {
        self.starting.store(on, Ordering::Release);
        self.registry.notify_changed();
    }

    /// The model versions whose load is under way, as the repository reports them.
    pub fn set_loading(&self, versions: Vec<(String, u64)>) {
        *self.loading.write().unwrap_or_else(|p| p.into_inner()) = versions;
    }

    /// The model versions whose load is under way (name, version).
    pub fn loading(&self) -> Vec<(String, u64)> {
        self.loading.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The repository whose index is served (every control mode), or 403 when the server has
    /// no repository (models added through the embedding API).
    pub fn repository_index(&self) -> Result<Arc<dyn RepositoryControl>> {
        self.repository.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            ServeError::Forbidden("the repository API is disabled: the server serves no model repository".into())
        })
    }

    /// The repository for load and unload, or 403 when the control mode does not allow them.
    pub fn repository(&self) -> Result<Arc<dyn RepositoryControl>> {
        let control = self.repository_index()?;
        if !self.repository_writable.load(Ordering::Acquire) {
            return Err(ServeError::Forbidden(
                "explicit model load / unload is not allowed in model control mode 'none': start the \
                 server with --model-control-mode explicit or poll (the index is readable in every mode)"
                    .into(),
            ));
        }
        Ok(control)
    }

    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
        self.registry.notify_changed();
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.registry.notify_changed();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_live(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Ready: serving, not draining, done with the startup loads, and (with strict readiness)
    /// every known model version loaded.
    pub fn is_ready(&self) -> bool {
        self.is_live()
            && !self.is_draining()
            && !self.starting.load(Ordering::Acquire)
            && (!self.strict_readiness || self.registry.all_ready())
    }

    /// Why the server is not ready (None when it is): what an operator needs to see in a probe.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        let mut reasons = Vec::new();
        if !self.is_live() {
            reasons.push("the server is not serving".to_string());
        }
        if self.is_draining() {
            reasons.push("the server is shutting down".to_string());
        }
        if self.starting.load(Ordering::Acquire) {
            let loading: Vec<String> = self.loading().iter().map(|(m, v)| format!("'{m}' version {v}")).collect();
            let loading = loading.join(", ");
            reasons.push(if loading.is_empty() {
                "the startup models are still loading".to_string()
            } else {
                format!("the startup models are still loading (now: {loading})")
            });
        }
        if self.strict_readiness {
            reasons.extend(self.registry.not_ready());
        }
        Some(reasons.join("; "))
    }

    pub fn server_metadata(&self) -> ServerMetadata {
        let mut extensions = EXTENSIONS.to_vec();
        if self.shared_memory.enabled() {
            extensions.push(SHARED_MEMORY_EXTENSION);
        }
        ServerMetadata { name: "fastserve", version: env!("CARGO_PKG_VERSION"), extensions }
    }

    /// V2 model metadata. `all_versions` lists every version of the model (a request without one).
    pub fn model_metadata(&self, mv: &ModelVersion, all_versions: bool) -> Result<ModelMetadata> {
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
        let io = |list: &[crate::spec::TensorSpec]| -> Vec<TensorMetadata> {
            list.iter()
                .map(|t| TensorMetadata {
                    name: t.name.clone(),
                    datatype: t.datatype.as_str(),
                    shape: spec.full_dims(t),
                })
                .collect()
        };
        Ok(ModelMetadata {
            name: spec.name.clone(),
            versions,
            platform: spec.platform.clone(),
            inputs: io(&spec.inputs),
            outputs: io(&spec.outputs),
        })
    }

    /// The ready versions the statistics API reports: every model's, one model's, or one version's.
    pub fn stats_of(&self, model: Option<&str>, version: Option<&str>) -> Result<Vec<(String, u64, Arc<ModelStats>)>> {
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
                VersionState::Ready(s) => entries.push((v.name.clone(), v.version, s.stats().clone())),
                // The 503 an inference request would get.
                VersionState::Failed(_) if version.is_some() => {
                    v.scheduler()?;
                }
                VersionState::Failed(_) => {}
            }
        }
        Ok(entries)
    }

    /// The statistics API's JSON (Triton's shape).
    pub fn model_stats(&self, model: Option<&str>, version: Option<&str>) -> Result<serde_json::Value> {
        let entries: Vec<serde_json::Value> =
            self.stats_of(model, version)?.iter().map(|(name, v, s)| s.to_json(name, *v)).collect();
        Ok(serde_json::json!({ "model_stats": entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving_with_a_failed_model(strict: bool) -> ServerState {
        let registry = Arc::new(Registry::new());
        registry.insert(ModelVersion::failed("m", 1, "bad file"));
        let state = ServerState::new(registry, Limits::default(), false).with_strict_readiness(strict);
        state.set_serving(true);
        state
    }

    #[test]
    fn strict_readiness_needs_every_model_version() {
        let state = serving_with_a_failed_model(true);
        assert!(!state.is_ready());
        let why = state.not_ready_reason().unwrap();
        assert!(why.contains("'m' version 1") && why.contains("bad file"), "{why}");
    }

    #[test]
    fn relaxed_readiness_ignores_failed_models_but_not_startup_or_draining() {
        let state = serving_with_a_failed_model(false);
        assert!(state.is_ready());
        assert_eq!(state.not_ready_reason(), None);
        state.set_starting(true);
        assert_eq!(state.not_ready_reason().as_deref(), Some("the startup models are still loading"));
        state.set_loading(vec![("slow".into(), 1)]);
        assert_eq!(
            state.not_ready_reason().as_deref(),
            Some("the startup models are still loading (now: 'slow' version 1)")
        );
        state.set_starting(false);
        state.set_draining();
        assert!(!state.is_ready());
    }
}
