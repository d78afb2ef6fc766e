//! The model repository API (load, unload, index), implemented by whoever owns the repository
//! (the Python layer) and exposed by the front ends. Calls may block for a long time (loading a
//! model), so front ends run them on a blocking thread.

use serde::Serialize;

use crate::error::Result;
use crate::request::Parameters;

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexEntry {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// READY, UNAVAILABLE, LOADING or UNLOADING.
    pub state: String,
    pub reason: String,
}

pub trait RepositoryControl: Send + Sync {
    /// Every model of the repository, loaded or not (only ready versions with `ready_only`).
    fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>>;
    /// Loads or reloads a model; `parameters` may carry a config override. Returns once it serves.
    fn load(&self, name: &str, parameters: &Parameters) -> Result<()>;
    /// Drains and removes a model.
    fn unload(&self, name: &str, parameters: &Parameters) -> Result<()>;
}
