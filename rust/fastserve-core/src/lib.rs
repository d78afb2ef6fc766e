//! fastserve core: the KServe V2 protocol, per-model request queues and dynamic batching, and the
//! network front ends. Plain Rust, usable and tested without Python; models plug in through
//! [`scheduler::Instance`]. `docs/architecture.md` maps the modules and the request flow.

pub mod call;
pub mod compression;
pub mod ensemble;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod http;
pub mod observe;
pub mod options;
pub mod pbtxt;
pub mod pipeline;
pub mod proto;
pub mod registry;
pub mod request;
pub mod scheduler;
pub mod server;
pub mod shm;
pub mod spec;
pub mod tensor;

pub use error::{Result, ServeError};
pub use tensor::datatype::DataType;
pub use tensor::{Tensor, TensorData};
