//! In-process calls from a model to another (Triton's BLS, `fastserve.infer`): the request takes
//! the same path as a network one (routing, validation, the target's queue, batching and
//! statistics) without a socket or serialization. The caller's thread blocks until the answer;
//! a call back into a model already waiting in the chain is refused, since it could wait forever
//! for an instance its own caller holds.

use std::time::{Duration, Instant};

use crate::error::{Result, ServeError};
use crate::registry::Registry;
use crate::request::{InferRequest, Parameters, RequestInfo};
use crate::scheduler::calls::{self, CallContext};
use crate::scheduler::QueueOptions;
use crate::tensor::Tensor;

/// Runs `inputs` on `model` (`version`: a number or label; None lets routing pick) and returns
/// every output. `context` is the calling batch's (None: this thread's own, if it runs one).
pub fn infer(
    registry: &Registry,
    model: &str,
    version: Option<&str>,
    inputs: Vec<Tensor>,
    parameters: Parameters,
    context: Option<CallContext>,
) -> Result<Vec<Tensor>> {
    let context = context.or_else(calls::current).unwrap_or_default();
    if context.chain.iter().any(|m| m == model) {
        let path: Vec<&str> = context.chain.iter().rev().map(String::as_str).chain([model]).collect();
        return Err(ServeError::bad_request(format!(
            "in-process call to model '{model}' refused: {} would wait on a model that is waiting for it",
            path.join(" -> ")
        )));
    }
    let mv = registry.resolve(model, version)?;
    let scheduler = mv.scheduler()?;
    let mut request = InferRequest { inputs, parameters, ..Default::default() };
    let sequence = request.check_supported(model, scheduler.config().sequence.is_some())?;
    let options = QueueOptions {
        sequence,
        callers: context.chain.clone(),
        deadline: context.deadline,
        info: scheduler.wants_request_info().then(|| std::sync::Arc::new(RequestInfo::of(&request))),
        ..request.queue_options(None)?
    };
    let validated = scheduler.spec().validate(&mut request)?;
    let (start, reply) = (Instant::now(), scheduler.submit_with(validated, options)?);
    let waited = match context.deadline {
        None => reply.blocking_recv().map_err(|_| stopped(model)),
        Some(at) => wait_until(reply, at, model),
    };
    // Counted as the model's requests, as network ones are.
    let answer = waited.and_then(|reply| reply.map_err(ServeError::from));
    scheduler.stats().record_request(answer.as_ref().map(|_| ()), start.elapsed());
    Ok(answer?.outputs)
}

fn stopped(model: &str) -> ServeError {
    ServeError::unavailable(format!("model '{model}' stopped before answering"))
}

/// Waits for the answer until the caller's execution deadline.
fn wait_until(
    reply: tokio::sync::oneshot::Receiver<crate::request::Reply>,
    at: Instant,
    model: &str,
) -> Result<crate::request::Reply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| ServeError::Internal(format!("cannot wait for model '{model}': {e}")))?;
    let left = at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    // The timer is made inside the runtime, which drives it.
    match runtime.block_on(async { tokio::time::timeout(left, reply).await }) {
        Ok(answer) => answer.map_err(|_| stopped(model)),
        Err(_) => Err(ServeError::ExecutionTimeout(format!(
            "in-process call to model '{model}' did not answer within the caller's execution_timeout_ms"
        ))),
    }
}
