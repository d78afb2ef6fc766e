//! State shared by every front end: the registry, limits, and the server's lifecycle flags.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::error::Result;
use crate::registry::{ModelVersion, Registry};

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
pub const EXTENSIONS: &[&str] = &["binary_tensor_data"];

/// V2 server metadata, the same over HTTP and gRPC.
#[derive(Debug, Serialize)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: &'static [&'static str],
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
    serving: AtomicBool,
    draining: AtomicBool,
}

impl ServerState {
    pub fn new(registry: Arc<Registry>, limits: Limits) -> Self {
        Self { registry, limits, serving: AtomicBool::new(false), draining: AtomicBool::new(false) }
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

    pub fn server_metadata(&self) -> ServerMetadata {
        ServerMetadata { name: "fastserve", version: env!("CARGO_PKG_VERSION"), extensions: EXTENSIONS }
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
}
