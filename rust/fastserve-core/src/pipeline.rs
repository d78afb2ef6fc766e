//! The one request path of every front end. HTTP and gRPC only decode and encode; everything in
//! between happens here, once: resolve the model version (number, label, or weighted routing with a
//! sticky key), admit the request (id, unsupported parameters), queue it with its options
//! (timeout, priority, deadline), await its answer, pick the requested outputs, and account for it
//! (statistics of the version that ran it, protocol counters, the access log line).
//!
//! A call's reply side is a stream of [`Responses`]: exactly one response for an ordinary model,
//! so models that answer several times plug into the same path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{Result, ServeError};
use crate::observe::transport::Protocol;
use crate::registry::ModelVersion;
use crate::request::{
    check_request_id, Delivery, InferRequest, InferResponse, Reply, RequestInfo, ResponseOutput, Served,
    MAX_REQUEST_ID_BYTES,
};
use crate::scheduler::{QueueOptions, Scheduler, StreamReceiver};
use crate::server::state::ServerState;
use crate::shm::placement::{self, OutputSlots};

/// What a front end knows of a call before its request is decoded: where it goes and what its
/// transport says (headers or gRPC metadata).
#[derive(Debug, Default)]
pub struct Target {
    pub model: String,
    /// A version number or label; None (or empty) lets routing pick.
    pub version: Option<String>,
    /// `X-Routing-Key` (HTTP header or gRPC metadata): the same key reaches the same version while
    /// weights stay. A `routing_key` request parameter counts too when this is absent.
    pub routing_key: Option<String>,
    /// `X-Request-Id` from the transport, used when the request carries no `id`.
    pub request_id: Option<String>,
    /// The client's own deadline (gRPC `grpc-timeout`).
    pub deadline: Option<Instant>,
}

/// One inference call from the moment its target is known until its last response was sent.
/// [`Call::finish`] accounts for it exactly once, whatever happened.
pub struct Call<'a> {
    state: &'a ServerState,
    protocol: Protocol,
    start: Instant,
    target: Target,
    version: Option<Arc<ModelVersion>>,
    id: Option<String>,
    served: Served,
    /// Set once the request was queued: its responses and how to shape them.
    running: Option<Running>,
}

/// A queued request's responses, and what each response echoes and selects.
struct Running {
    responses: Responses,
    request: InferRequest,
    spec: Arc<crate::spec::ModelSpec>,
    /// Outputs the request placed in shared memory.
    slots: OutputSlots,
    /// Responses handed out so far.
    sent: usize,
}

/// The responses to one request, in order: one for an ordinary model, any number for a decoupled
/// one. Dropping them before the end cancels the request (unrun if still queued; a running
/// decoupled model is stopped at its next response).
enum Responses {
    /// An ordinary request: its one answer, awaited by the first `next`.
    One(Option<Pending>),
    Stream(Stream),
}

/// A decoupled request's responses as they come, then its final answer.
struct Stream {
    rx: StreamReceiver,
    /// The model produces no more responses; only the final answer is left.
    produced_all: bool,
    /// Told when the stream is dropped while its request may still be queued.
    scheduler: Arc<Scheduler>,
    answered: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.answered {
            self.rx.done.close();
            self.scheduler.withdrawn();
        }
    }
}

/// What the next response of a stream is.
enum Next {
    Response(Vec<crate::tensor::Tensor>),
    End(Reply),
}

impl Stream {
    async fn next(&mut self) -> Next {
        loop {
            if self.produced_all {
                let answer = (&mut self.rx.done).await;
                return self.end(answer);
            }
            // Responses already produced are always read before the final answer.
            tokio::select! {
                biased;
                item = self.rx.responses.recv() => match item {
                    Some(outputs) => return Next::Response(outputs),
                    None => self.produced_all = true,
                },
                answer = &mut self.rx.done => return self.end(answer),
            }
        }
    }

    fn end(&mut self, answer: std::result::Result<Reply, oneshot::error::RecvError>) -> Next {
        self.answered = true;
        let name = &self.scheduler.spec().name;
        Next::End(answer.unwrap_or_else(|_| {
            Err(ServeError::unavailable(format!("model '{name}' stopped before answering")).into())
        }))
    }
}

impl<'a> Call<'a> {
    /// Starts a call on `protocol`; the request counts in the protocol counters from here.
    pub fn new(state: &'a ServerState, protocol: Protocol, target: Target) -> Self {
        state.transport.request(protocol);
        Self {
            state,
            protocol,
            start: Instant::now(),
            target,
            version: None,
            id: None,
            served: Served::default(),
            running: None,
        }
    }

    /// Finds the version the call goes to. Done before a request body is read, so an unknown model
    /// or an over-long transport id costs nothing.
    pub fn resolve(&mut self) -> Result<()> {
        if let Some(id) = &self.target.request_id {
            check_request_id(id)?;
        }
        let t = &self.target;
        let version = t.version.as_deref().filter(|v| !v.is_empty());
        let found = self.state.registry.resolve_with_key(&t.model, version, t.routing_key.as_deref());
        let mv = found.inspect_err(|_| self.state.transport.unknown_model())?;
        mv.scheduler()?;
        self.version = Some(mv);
        Ok(())
    }

    /// The interface of the resolved version.
    pub fn spec(&self) -> Result<Arc<crate::spec::ModelSpec>> {
        match &self.version {
            Some(mv) => Ok(mv.scheduler()?.spec().clone()),
            None => Err(ServeError::Internal("a call was used before it was resolved".into())),
        }
    }

    /// Whether the resolved version is decoupled (answers a request any number of times).
    pub fn decoupled(&self) -> bool {
        self.version.as_ref().and_then(|mv| mv.scheduler().ok()).is_some_and(|s| s.spec().decoupled)
    }

    /// Runs a decoded request whose call is answered once (HTTP infer, gRPC ModelInfer) and
    /// returns that answer. A decoupled model must produce exactly one response here.
    pub async fn run(&mut self, request: InferRequest) -> Result<InferResponse> {
        self.start(request)?;
        let first = self.next().await;
        if !self.decoupled() {
            return first.unwrap_or_else(|| Err(ServeError::Internal("the model produced no response".into())));
        }
        let name = self.target.model.clone();
        let stream_needed = |what: &str| {
            ServeError::bad_request(format!(
                "model '{name}' is decoupled and {what}; read its responses with gRPC ModelStreamInfer or \
                 POST /v2/models/{name}/generate_stream"
            ))
        };
        let first = first.unwrap_or_else(|| Err(stream_needed("sent no response to this request")))?;
        match self.next().await {
            None => Ok(first),
            Some(Ok(_)) => Err(stream_needed("sent more than one response to this request")),
            Some(Err(e)) => Err(e),
        }
    }

    /// Queues a decoded request on the resolved version (at once: requests queued one after the
    /// other keep their order); its responses come from [`Call::next`]. Dropping the call (a
    /// client that went away) withdraws the request from the queue, or stops a decoupled model at
    /// its next response.
    pub fn start(&mut self, mut request: InferRequest) -> Result<()> {
        self.id = request.id.clone();
        let mut mv = match &self.version {
            Some(mv) => mv.clone(),
            None => return Err(ServeError::Internal("a call ran before it was resolved".into())),
        };
        // Picked by weight without a key: a routing_key parameter may still make it sticky.
        let by_weight = self.target.version.as_deref().is_none_or(str::is_empty) && self.target.routing_key.is_none();
        if let (true, Some(key)) = (by_weight, request.parameters.get("routing_key").and_then(|v| v.as_str())) {
            mv = self.state.registry.resolve_with_key(&self.target.model, None, Some(key))?;
            self.version = Some(mv.clone());
        }
        let scheduler = mv.scheduler()?;
        let spec = scheduler.spec().clone();
        let sequence = request.check_supported(&spec.name, scheduler.config().sequence.is_some())?;
        let info = scheduler.wants_request_info().then(|| Arc::new(RequestInfo::of(&request)));
        let options = QueueOptions { sequence, info, ..request.queue_options(self.target.deadline)? };
        // Inputs in shared memory become ordinary tensors (copied) before anything checks them.
        let slots = placement::place(&self.state.shared_memory, &mut request, self.state.limits.max_body_bytes)?;
        let validated = spec.validate(&mut request)?;
        let responses = if spec.decoupled {
            let rx = scheduler.submit_stream(validated, options)?;
            Responses::Stream(Stream { rx, produced_all: false, scheduler: scheduler.clone(), answered: false })
        } else {
            let reply = scheduler.submit_with(validated, options)?;
            Responses::One(Some(Pending { scheduler: scheduler.clone(), reply, answered: false }))
        };
        self.running = Some(Running { responses, request, spec, slots, sent: 0 });
        Ok(())
    }

    /// The next response of the started request, in order; None after the last. An error ends
    /// the responses.
    pub async fn next(&mut self) -> Option<Result<InferResponse>> {
        let running = self.running.as_mut()?;
        let (outputs, executed) = match &mut running.responses {
            Responses::One(pending) => {
                let pending = pending.take()?;
                (None, Some(pending.answer().await))
            }
            Responses::Stream(stream) => match stream.next().await {
                Next::Response(outputs) => (Some(outputs), None),
                Next::End(reply) => (None, Some(reply)),
            },
        };
        let outputs = match (outputs, executed) {
            (Some(outputs), _) => outputs,
            (None, Some(Ok(executed))) => {
                self.served = executed.served;
                if matches!(running.responses, Responses::Stream(_)) {
                    self.running = None;
                    return None;
                }
                executed.outputs
            }
            (None, Some(Err(failed))) => {
                self.served = failed.served.unwrap_or_default();
                self.running = None;
                return Some(Err(failed.error));
            }
            (None, None) => return None,
        };
        running.sent += 1;
        let request = &running.request;
        let mut outputs = select_outputs(request, outputs);
        if let Err(e) = running.slots.deliver(&mut outputs) {
            self.running = None;
            return Some(Err(e));
        }
        Some(Ok(InferResponse {
            model_name: running.spec.name.clone(),
            model_version: running.spec.version.to_string(),
            id: request.id.clone(),
            outputs,
        }))
    }

    /// Accounts for the call once its answer (or error) is sent: statistics of the version that
    /// ran it, the access log line. Returns the request id to echo (never an over-long one).
    pub fn finish(self, outcome: std::result::Result<(), &ServeError>) -> String {
        let elapsed = self.start.elapsed();
        if let Some(stats) = self.version.as_ref().and_then(|mv| mv.stats()) {
            stats.record_request(outcome, elapsed);
        }
        let id = self
            .id
            .or(self.target.request_id)
            .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES)
            .unwrap_or_else(generate_request_id);
        if self.state.access_log {
            // The HTTP status for both protocols (one field to filter on), and the gRPC code too.
            let status = outcome.map_or_else(|e| e.http_status().as_u16(), |()| 200);
            let grpc_code = match (self.protocol, outcome) {
                (Protocol::Grpc, Ok(())) => "Ok".to_string(),
                (Protocol::Grpc, Err(e)) => format!("{:?}", e.grpc_code()),
                _ => String::new(),
            };
            tracing::info!(
                target: "fastserve::access",
                request_id = %id,
                model = %self.target.model,
                version = self.version.as_ref().map_or(0, |mv| mv.version),
                protocol = self.protocol.as_str(),
                status,
                grpc_code = %grpc_code,
                duration_us = elapsed.as_micros() as u64,
                queue_us = self.served.queue.as_micros() as u64,
                compute_us = self.served.phases.total().as_micros() as u64,
                batch_size = self.served.batch_size,
                "request"
            );
        }
        id
    }
}

/// The outputs a request asked for, in its order (all of them, in the model's order, if it named
/// none), each marked binary or JSON as asked.
fn select_outputs(request: &InferRequest, outputs: Vec<crate::tensor::Tensor>) -> Vec<ResponseOutput> {
    let default_binary = request.binary_outputs_by_default();
    if request.outputs.is_empty() {
        return outputs
            .into_iter()
            .map(|tensor| ResponseOutput { tensor, delivery: Delivery::binary(default_binary) })
            .collect();
    }
    let mut all: Vec<Option<_>> = outputs.into_iter().map(Some).collect();
    request
        .outputs
        .iter()
        .filter_map(|o| {
            let slot = all.iter_mut().find(|t| t.as_ref().is_some_and(|t| t.name == o.name))?;
            slot.take().map(|tensor| ResponseOutput { tensor, delivery: Delivery::binary(o.binary) })
        })
        .collect()
}

/// An ordinary request's answer to come. Dropped unanswered (the client went away), it tells the
/// scheduler at once, so the request leaves the queue and its slot frees without waiting for the
/// next batch.
struct Pending {
    scheduler: Arc<Scheduler>,
    reply: oneshot::Receiver<Reply>,
    answered: bool,
}

impl Pending {
    async fn answer(mut self) -> Reply {
        let answer = (&mut self.reply).await;
        self.answered = true;
        let name = &self.scheduler.spec().name;
        answer
            .unwrap_or_else(|_| Err(ServeError::unavailable(format!("model '{name}' stopped before answering")).into()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.reply.close();
            self.scheduler.withdrawn();
        }
    }
}

/// A process-unique id for requests that bring none.
fn generate_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
    });
    format!("{:016x}", seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)))
}
