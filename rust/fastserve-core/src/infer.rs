//! Decoded inference requests and responses, independent of the wire format.

use serde_json::{Map, Value};

use crate::tensor::Tensor;

/// Free-form V2 `parameters`.
pub type Parameters = Map<String, Value>;

/// An output the client asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// Binary tensor extension: return this output's data after the JSON header.
    pub binary: bool,
}

#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<Tensor>,
    /// Empty means every output, in the model's declared order.
    pub outputs: Vec<RequestedOutput>,
}

impl InferRequest {
    /// Request-level `binary_data_output`: every output comes back binary unless it says otherwise.
    pub fn binary_outputs_by_default(&self) -> bool {
        self.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false)
    }
}

#[derive(Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug)]
pub struct ResponseOutput {
    pub tensor: Tensor,
    pub binary: bool,
}
