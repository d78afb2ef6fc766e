//! fastserve core: the KServe V2 protocol, per-model request queues and dynamic batching, and the
//! network front ends. Plain Rust, usable and tested without Python; models plug in through
//! [`scheduler::Instance`].

pub mod auth;
pub mod batcher;
pub mod compression;
pub mod connections;
pub mod control;
pub mod datatype;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod grpc;
mod grpc_codec;
pub mod http;
pub mod infer;
pub mod json_codec;
pub mod logging;
pub mod metrics;
pub mod model_config;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod spec;
pub mod state;
pub mod stats;
pub mod tensor;
pub mod tls;
pub mod watchdog;

pub use datatype::DataType;
pub use error::{Result, ServeError};
pub use tensor::{Tensor, TensorData};
