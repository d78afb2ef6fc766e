//! Ensembles (Triton's `ensemble_scheduling`): a dataflow graph of other models run by the core.
//! Each step is submitted to its model's own scheduler as soon as its inputs exist, so branches
//! run in parallel and every step is batched with that model's other traffic; tensors move
//! between steps as shared buffers, without serialization or the GIL.

pub mod config;
mod instance;
pub mod plan;

pub use self::config::{EnsembleConfig, Step};
pub use self::instance::EnsembleInstance;
pub use self::plan::EnsemblePlan;
