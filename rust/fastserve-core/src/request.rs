//! Decoded inference requests and responses, independent of the wire format: what the front ends
//! decode into, what the scheduler answers, and what the front ends encode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::error::{Result, ServeError};
use crate::observe::stats::Phases;
use crate::tensor::datatype::DataType;
use crate::tensor::{element_count, Tensor};

/// How a request was served once an instance took it: for its statistics and the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub queue: Duration,
    pub phases: Phases,
    /// Rows in the batch the request ran in.
    pub batch_size: usize,
}

/// A request's answer: the model's outputs for its own rows, and how it was served.
#[derive(Debug)]
pub struct Executed {
    pub outputs: Vec<Tensor>,
    pub served: Served,
}

/// A request's error, with how it was served when it failed after leaving the queue (a failed
/// batch's requests still waited and ran).
#[derive(Debug, Clone)]
pub struct Failed {
    pub error: ServeError,
    pub served: Option<Served>,
}

impl Failed {
    pub fn after(error: ServeError, served: Served) -> Self {
        Self { error, served: Some(served) }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl From<ServeError> for Failed {
    fn from(error: ServeError) -> Self {
        Self { error, served: None }
    }
}

impl From<Failed> for ServeError {
    fn from(failed: Failed) -> Self {
        failed.error
    }
}

pub type Reply = std::result::Result<Executed, Failed>;

/// What a request asks of the queue, from its V2 parameters and its transport.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// `parameters.timeout`: replaces the model's default queue timeout.
    pub timeout: Option<Duration>,
    /// The client's own deadline (gRPC `grpc-timeout`).
    pub deadline: Option<Instant>,
    /// `parameters.priority`: 1 is the highest; None uses the model's default level.
    pub priority: Option<u64>,
    /// The sequence the request belongs to (models with sequence batching only).
    pub sequence: Option<SequenceTag>,
    /// Models whose `execute` waits on this request (an in-process call's chain of callers).
    pub callers: Vec<String>,
    /// The client's request id, named in the log when the request's batch fails.
    pub request_id: Option<String>,
    /// What the model is shown of the request besides its tensors; only set for models whose
    /// instances take requests one by one (Triton Python models).
    pub info: Option<Arc<RequestInfo>>,
}

/// A request as a model that answers requests one by one sees it, besides its tensors (Triton
/// Python models read it through `pb_utils.InferenceRequest`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    pub id: Option<String>,
    pub parameters: Parameters,
    /// The outputs the client asked for, by name (empty: every output).
    pub outputs: Vec<String>,
}

/// Parameters the server acts on itself (queueing, sequences, encodings), never shown to a model
/// as the request's own, as Triton's front ends consume them.
const SERVER_PARAMETERS: [&str; 8] = [
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "binary_data_output",
    "triton_enable_empty_final_response",
    "routing_key",
];

impl RequestInfo {
    /// What a model is shown of `request`: its id, the outputs it asked for, and its parameters
    /// but those the server acts on.
    pub fn of(request: &InferRequest) -> Self {
        let parameters = request
            .parameters
            .iter()
            .filter(|(k, _)| !SERVER_PARAMETERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()));
        Self {
            id: request.id.clone(),
            parameters: parameters.collect(),
            outputs: request.outputs.iter().map(|o| o.name.clone()).collect(),
        }
    }
}

/// A sequence's correlation id: `sequence_id` as an unsigned integer or a string, as Triton's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SequenceId {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "'{s}'"),
        }
    }
}

/// A request's place in its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceTag {
    pub id: SequenceId,
    /// `sequence_start`: the sequence's first request (its state starts afresh).
    pub start: bool,
    /// `sequence_end`: its last request (its slot and state are released after it).
    pub end: bool,
}

/// Free-form V2 `parameters`.
pub type Parameters = Map<String, Value>;

/// Longest request id accepted (`id` in HTTP and gRPC, `X-Request-Id`): ids are echoed in
/// response headers and access logs.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// Refuses an id longer than [`MAX_REQUEST_ID_BYTES`].
pub fn check_request_id(id: &str) -> Result<()> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(ServeError::bad_request(format!(
            "the request id has {} bytes, over the limit of {MAX_REQUEST_ID_BYTES}",
            id.len()
        )));
    }
    Ok(())
}

/// Sequence-batching parameters (Triton's correlation id and its flags).
const SEQUENCE_PARAMETERS: [&str; 3] = ["sequence_id", "sequence_start", "sequence_end"];

/// An output the client asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// Binary tensor extension: return this output's data after the JSON header.
    pub binary: bool,
    /// Shared-memory extension: write this output's data into a registered region instead.
    pub shared_memory: Option<SharedMemoryRef>,
}

#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<Tensor>,
    /// Inputs whose data is in a registered shared-memory region: read (copied) into `inputs`
    /// when the request starts, by the request path both protocols share.
    pub shared_memory_inputs: Vec<SharedMemoryInput>,
    /// Empty means every output, in the model's declared order.
    pub outputs: Vec<RequestedOutput>,
}

/// A tensor's name, datatype and concrete shape as a request declares them, checked the same way
/// for every protocol before any of its data is looked at.
#[derive(Debug, Clone, PartialEq)]
pub struct InputHeader {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    /// Elements the shape holds (it did not overflow).
    pub elements: usize,
}

impl InputHeader {
    pub fn parse(name: String, datatype: &str, shape: &[i64]) -> Result<Self> {
        let datatype = DataType::parse(datatype)
            .ok_or_else(|| ServeError::bad_request(format!("input '{name}': unknown datatype '{datatype}'")))?;
        let dims = shape.iter().map(|&d| usize::try_from(d)).collect::<std::result::Result<Vec<usize>, _>>().map_err(
            |_| ServeError::bad_request(format!("input '{name}': shape {shape:?} has a negative dimension")),
        )?;
        let elements = element_count(&dims)
            .ok_or_else(|| ServeError::bad_request(format!("input '{name}': shape {shape:?} is too large")))?;
        Ok(Self { name, datatype, shape: dims, elements })
    }
}

/// Where a tensor's data lies in a registered shared-memory region (Triton's shared-memory
/// extension): the tensor parameters `shared_memory_region`, `shared_memory_offset` (optional,
/// default 0) and `shared_memory_byte_size`. The offset is relative to the region's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedMemoryRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// The tensor parameters of the shared-memory extension.
const SHM_REGION: &str = "shared_memory_region";
const SHM_OFFSET: &str = "shared_memory_offset";
const SHM_BYTE_SIZE: &str = "shared_memory_byte_size";

impl SharedMemoryRef {
    /// Whether a parameter name belongs to this extension (cheap: most tensors have none).
    pub fn is_parameter(name: &str) -> bool {
        name.starts_with("shared_memory_")
    }

    /// The location the parameters of `kind` ("input" or "output") `name` give; None when they
    /// name no region. An offset or size without a region, a region without a size, or a value of
    /// the wrong type is refused rather than ignored.
    pub fn from_parameters(kind: &str, name: &str, parameters: Option<&Parameters>) -> Result<Option<Self>> {
        let Some(p) = parameters.filter(|p| p.keys().any(|k| Self::is_parameter(k))) else { return Ok(None) };
        let what = format!("{kind} '{name}'");
        let number = |key: &str| -> Result<Option<u64>> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    ServeError::bad_request(format!(
                        "{what}: parameter '{key}' must be a non-negative integer, got {v}"
                    ))
                }),
            }
        };
        let (offset, byte_size) = (number(SHM_OFFSET)?, number(SHM_BYTE_SIZE)?);
        let region = match p.get(SHM_REGION) {
            None | Some(Value::Null) => {
                if let Some(key) = [(SHM_OFFSET, offset), (SHM_BYTE_SIZE, byte_size)]
                    .into_iter()
                    .find_map(|(key, v)| v.is_some().then_some(key))
                {
                    return Err(ServeError::bad_request(format!(
                        "{what}: parameter '{key}' needs parameter '{SHM_REGION}'"
                    )));
                }
                return Ok(None);
            }
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(ServeError::bad_request(format!(
                    "{what}: parameter '{SHM_REGION}' must be a string, got {v}"
                )))
            }
        };
        let byte_size = byte_size.ok_or_else(|| {
            ServeError::bad_request(format!("{what}: parameter '{SHM_REGION}' needs parameter '{SHM_BYTE_SIZE}'"))
        })?;
        Ok(Some(Self { region, offset: offset.unwrap_or(0), byte_size }))
    }
}

/// An input whose data is in shared memory, not in the request body.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedMemoryInput {
    pub header: InputHeader,
    pub at: SharedMemoryRef,
}

impl InferRequest {
    /// Refuses what the request asks for but the model cannot honor, instead of ignoring it: an
    /// over-long id, a sequence (correlation id, start/end flags) on a model without sequence
    /// batching, whose requests would otherwise be answered as unrelated ones, or a request without
    /// a sequence to a model with it. Returns the request's sequence.
    pub fn check_supported(&self, model: &str, sequence_batching: bool) -> Result<Option<SequenceTag>> {
        if let Some(id) = &self.id {
            check_request_id(id)?;
        }
        if !sequence_batching {
            if let Some(name) = SEQUENCE_PARAMETERS.into_iter().find(|&n| self.flag_set(n)) {
                return Err(ServeError::bad_request(format!(
                    "inference request to model '{model}' sets parameter '{name}', but the model is not \
                     configured for sequence batching"
                )));
            }
            return Ok(None);
        }
        match self.sequence()? {
            Some(tag) => Ok(Some(tag)),
            None => Err(ServeError::bad_request(format!(
                "model '{model}' uses sequence batching: every request needs parameter 'sequence_id' (and \
                 'sequence_start' = true on a sequence's first request)"
            ))),
        }
    }

    fn flag_set(&self, name: &str) -> bool {
        match self.parameters.get(name) {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        }
    }

    /// The request's sequence from `sequence_id` (an unsigned integer or a string; 0 or "" is
    /// none), `sequence_start` and `sequence_end` (booleans).
    pub fn sequence(&self) -> Result<Option<SequenceTag>> {
        let flag = |name: &str| match self.parameters.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ServeError::bad_request(format!("parameter '{name}' must be a boolean, got {v}"))),
        };
        let (start, end) = (flag("sequence_start")?, flag("sequence_end")?);
        let id = match self.parameters.get("sequence_id") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => None,
                Some(n) => Some(SequenceId::Number(n)),
                None => {
                    return Err(ServeError::bad_request(format!(
                        "parameter 'sequence_id' must be an unsigned 64-bit integer or a string, got {n}"
                    )))
                }
            },
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => {
                check_request_id(s).map_err(|_| {
                    ServeError::bad_request(format!(
                        "parameter 'sequence_id' has {} bytes, over the limit of {MAX_REQUEST_ID_BYTES}",
                        s.len()
                    ))
                })?;
                Some(SequenceId::Text(s.clone()))
            }
            Some(v) => {
                return Err(ServeError::bad_request(format!(
                    "parameter 'sequence_id' must be an unsigned 64-bit integer or a string, got {v}"
                )))
            }
        };
        match id {
            Some(id) => Ok(Some(SequenceTag { id, start, end })),
            None if start || end => {
                Err(ServeError::bad_request("parameters 'sequence_start' and 'sequence_end' need a 'sequence_id'"))
            }
            None => Ok(None),
        }
    }

    /// Request-level `binary_data_output`: every output comes back binary unless it says otherwise.
    pub fn binary_outputs_by_default(&self) -> bool {
        self.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The queue options the request asks for: `timeout` (microseconds; 0 means the model's
    /// default) and `priority` (1 is the highest; 0 means the model's default).
    pub fn queue_options(&self, deadline: Option<Instant>) -> Result<QueueOptions> {
        let timeout = self.unsigned_parameter("timeout")?.filter(|&us| us > 0).map(Duration::from_micros);
        let priority = self.unsigned_parameter("priority")?;
        Ok(QueueOptions { timeout, deadline, priority, request_id: self.id.clone(), ..Default::default() })
    }

    fn unsigned_parameter(&self, name: &str) -> Result<Option<u64>> {
        match self.parameters.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ServeError::bad_request(format!("parameter '{name}' must be a non-negative integer, got {v}"))
            }),
        }
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
    pub delivery: Delivery,
}

/// How an output's data reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// In the JSON body (HTTP), in `raw_output_contents` (gRPC).
    Json,
    /// Binary tensor extension: after the JSON header (HTTP), in `raw_output_contents` (gRPC).
    Binary,
    /// Already written into the client's shared-memory region: the response only describes it.
    SharedMemory,
}

impl Delivery {
    /// Binary or JSON, as the binary tensor extension's `binary_data` says.
    pub fn binary(binary: bool) -> Self {
        if binary {
            Self::Binary
        } else {
            Self::Json
        }
    }
}

/// How a request was served, for access logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServedBy {
    pub queue: Duration,
    pub compute: Duration,
    /// Rows in the batch the request ran in.
    pub batch_size: usize,
}
