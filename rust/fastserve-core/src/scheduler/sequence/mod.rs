//! Triton's sequence batcher: requests that carry a sequence id run in order, one at a time per
//! sequence, with START/END/READY/CORRID control inputs and implicit state carried between them.

pub(super) mod assemble;
pub(super) mod batcher;
pub mod config;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::request::SequenceId;
use crate::tensor::Tensor;

/// Each live sequence's implicit state (one tensor per `[[sequence_batching.state]]`, without the
/// batch dimension), written by the instance that ran its last request.
pub(super) type StateStore = Mutex<HashMap<SequenceId, Vec<Tensor>>>;
