//! Model instances and the threads that drive them: one thread per instance runs the batches the
//! batcher hands out, answers their requests, and can be abandoned (and replaced) when it hangs.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::plan::{concat_inputs, split_outputs};
use super::queue::{Batch, Job, Msg, SequenceBatch};
use super::sequence::assemble::take_states;
use super::watchdog::{self, KillSwitch, Replies, Watch};
use crate::error::{Result, ServeError};
use crate::observe::stats::{ModelStats, Phases, ResponseTiming};
use crate::request::{Executed, Failed, Reply, RequestInfo, SequenceTag, Served};
use crate::spec::ModelSpec;
use crate::tensor::Tensor;

/// One request of a batch, as an instance that answers a batch's requests one by one gets it.
#[derive(Debug, Default, Clone)]
pub struct ModelRequest {
    pub inputs: Vec<Tensor>,
    /// Its rows: the batch dimension of its inputs (1 for a model without batching).
    pub rows: usize,
    /// What else the model is shown of it (set when [`Instance::per_request`] is true).
    pub info: Option<Arc<RequestInfo>>,
    /// Its place in its sequence (models with sequence batching).
    pub sequence: Option<SequenceTag>,
}

/// Each request's own answer within a batch that ran: its outputs, or why it alone failed.
pub type PerRequest = Vec<Result<Vec<Tensor>>>;

/// A loaded copy of a model. Each instance is driven by one thread, so it needs no locking.
pub trait Instance: Send + 'static {
    /// Runs one batch (batch dimension first when the model batches) and returns every output.
    /// Marking `clock` splits the time into input conversion, the model itself, and output reading.
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>>;

    /// True when the instance takes a batch's requests one by one ([`Instance::execute_requests`]
    /// overridden) and wants each request's [`RequestInfo`]; the scheduler then checks each
    /// request's outputs on their own, and one request's failure leaves the others answered.
    fn per_request(&self) -> bool {
        false
    }

    /// Runs a batch of requests and answers each: in order, one answer per request. An `Err`
    /// fails the whole batch. The default concatenates the requests along the batch dimension,
    /// runs [`Instance::execute`] once, checks the outputs against `spec` and splits them back
    /// into each request's rows.
    fn execute_requests(
        &mut self,
        spec: &ModelSpec,
        requests: Vec<ModelRequest>,
        clock: &mut PhaseClock,
    ) -> Result<PerRequest> {
        execute_concatenated(self, spec, requests, clock)
    }

    /// Runs one request of a decoupled model, handing each response to `emit` in order as it is
    /// produced. An error from `emit` (the client went away, or the response is invalid) means
    /// stop: the instance ends the model's work on that request and returns the error.
    fn execute_stream(
        &mut self,
        inputs: Vec<Tensor>,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<()>,
    ) -> Result<()> {
        let outputs = self.execute(inputs, clock)?;
        emit(outputs)
    }

    /// [`Instance::execute_stream`] for an instance that is shown the request's info and
    /// sequence too ([`Instance::per_request`]); the default passes only the inputs on.
    fn execute_stream_request(
        &mut self,
        request: ModelRequest,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<()>,
    ) -> Result<()> {
        self.execute_stream(request.inputs, clock, emit)
    }

    /// How to stop a batch this instance runs from outside it: the watchdog calls it when the
    /// batch runs past `execution_timeout_ms`. An instance that runs its model in a worker process
    /// kills the worker (a process can be killed, a thread cannot); None: the hung call is left to
    /// return on its own.
    fn kill_switch(&self) -> Option<KillSwitch> {
        None
    }

    /// What the instance tells the scheduler about itself after each batch (a process-isolated
    /// instance: its worker's restarts and memory, or that it can serve no more).
    fn report(&mut self) -> InstanceReport {
        InstanceReport::default()
    }
}

/// An instance's account of itself after a batch ([`Instance::report`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    /// Worker process restarts since the last report.
    pub restarts: u64,
    /// The resident memory of the instance's worker process, when it has one.
    pub resident_bytes: Option<u64>,
    /// Set when the instance can serve no more (its worker keeps dying): the version is then
    /// marked unavailable with this reason.
    pub unavailable: Option<String>,
}

/// [`Instance::execute_requests`]'s default, for an instance that overrides it but still runs
/// some batches whole: the requests concatenated along the batch dimension, one
/// [`Instance::execute`], the outputs checked against `spec` and split back into each request's
/// rows.
pub fn execute_concatenated<I: Instance + ?Sized>(
    instance: &mut I,
    spec: &ModelSpec,
    mut requests: Vec<ModelRequest>,
    clock: &mut PhaseClock,
) -> Result<PerRequest> {
    let rows: Vec<usize> = requests.iter().map(|r| r.rows).collect();
    let total = rows.iter().sum();
    let inputs = match requests.len() {
        1 => requests.pop().map(|r| r.inputs).unwrap_or_default(),
        _ => {
            let refs: Vec<&[Tensor]> = requests.iter().map(|r| r.inputs.as_slice()).collect();
            concat_inputs(&refs)?
        }
    };
    let outputs = instance.execute(inputs, clock)?;
    spec.check_outputs(&outputs, total)?;
    let split = if rows.len() == 1 { vec![outputs] } else { split_outputs(&outputs, &rows)? };
    Ok(split.into_iter().map(Ok).collect())
}

/// Creates a fresh instance for a seat (the index among the version's instances), to replace
/// one abandoned after `execution_timeout`.
pub type InstanceFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Instance>> + Send + Sync>;

/// Timestamps an instance sets around the model call; unmarked time counts as inference.
pub struct PhaseClock {
    pub(super) start: Instant,
    pub(super) infer_start: Option<Instant>,
    pub(super) infer_end: Option<Instant>,
}

impl PhaseClock {
    /// A clock started now (the scheduler makes one per batch).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self { start: Instant::now(), infer_start: None, infer_end: None }
    }

    pub fn infer_started(&mut self) {
        self.infer_start = Some(Instant::now());
    }

    pub fn infer_finished(&mut self) {
        self.infer_end = Some(Instant::now());
    }

    pub(super) fn phases(&self, end: Instant) -> Phases {
        let infer_start = self.infer_start.unwrap_or(self.start);
        let infer_end = self.infer_end.unwrap_or(end).max(infer_start);
        Phases {
            input: infer_start - self.start,
            infer: infer_end - infer_start,
            output: end.saturating_duration_since(infer_end),
        }
    }
}

/// Live instance threads by id; an abandoned one leaves the list and is never joined.
pub(super) type InstanceThreads = Arc<Mutex<Vec<(u64, Worker)>>>;

/// A model thread that can be joined with a deadline: it holds a channel's only sender, which
/// disconnects when the thread's work (and the instance's `finalize`) is done.
pub(super) struct Worker {
    pub(super) handle: JoinHandle<()>,
    pub(super) done: Receiver<()>,
}

impl Worker {
    /// Waits until the thread finished or `at`, without joining it; true if it finished.
    pub(super) fn finished_by(&self, at: Instant) -> bool {
        matches!(self.done.recv_deadline(at), Err(RecvTimeoutError::Disconnected))
    }

    /// Joins the thread if it finishes by `deadline` (None: however long it takes); else leaves it
    /// running and returns false.
    pub(super) fn join_by(self, deadline: Option<Instant>) -> bool {
        let finished = match deadline {
            None => true,
            Some(at) => matches!(self.done.recv_deadline(at), Err(RecvTimeoutError::Disconnected)),
        };
        if finished {
            let _ = self.handle.join();
        }
        finished
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What an instance thread needs, shared by the instances of a version and the watchdog.
pub(super) struct Seats {
    pub(super) spec: Arc<ModelSpec>,
    pub(super) stats: Arc<ModelStats>,
    /// Tells the batcher which instance (seat) is idle.
    pub(super) idle_tx: Sender<usize>,
    /// Each seat's batches (one shared channel unless the sequence batcher targets instances).
    pub(super) batch_rx: Vec<Receiver<Batch>>,
    pub(super) watch: Option<Sender<Watch>>,
    pub(super) threads: InstanceThreads,
    pub(super) next_id: AtomicU64,
    pub(super) label: String,
    /// The reply slots of the batches running now, by instance thread id, so a shutdown that
    /// gives up on a stuck batch can still answer its requests.
    pub(super) running: Mutex<HashMap<u64, Replies>>,
    /// Abandoned instance threads that have not returned yet.
    pub(super) abandoned: AtomicUsize,
    pub(super) max_abandoned: usize,
    /// Set once the version can no longer serve (too many hung instances); the reason.
    pub(super) broken: OnceLock<String>,
    /// Wakes the batcher, which then answers the queue with `broken`.
    pub(super) wake: Sender<Msg>,
    /// What the watchdog measures execution time against.
    pub(super) clock: watchdog::Clock,
    /// Set when running streams must end (a shutdown reached its deadline): each stops at its
    /// next response, even one waiting for a slow reader.
    pub(super) ending: tokio::sync::watch::Sender<bool>,
    /// A batch's `execution_timeout_ms`, which in-process calls from it count against.
    pub(super) execution_timeout: Option<Duration>,
    /// `isolate_batch_failures`: a failed batch of several requests runs again one at a time.
    pub(super) isolate_failures: bool,
}

impl Seats {
    /// Starts a thread driving `instance` in `seat`.
    pub(super) fn spawn(self: &Arc<Self>, seat: usize, instance: Box<dyn Instance>) -> Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let seats = self.clone();
        let worker =
            spawn(format!("fs-inst-{}-{seat}", self.label), move || instance_loop(instance, &seats, id, seat))?;
        lock(&self.threads).push((id, worker));
        Ok(())
    }

    /// Forgets a hung instance thread: never joined, never handed work again. True while fewer
    /// than `max_abandoned` are still running, i.e. a replacement may be started.
    pub(super) fn abandon(&self, id: u64) -> bool {
        lock(&self.threads).retain(|(i, _)| *i != id);
        self.abandoned.fetch_add(1, Ordering::AcqRel) < self.max_abandoned
    }

    /// Marks the version unavailable for good; queued and future requests get `reason`.
    pub(super) fn break_with(&self, reason: String) {
        tracing::error!(model = %self.spec.name, version = self.spec.version, reason = %reason, "model version unavailable");
        let _ = self.broken.set(reason);
        let _ = self.wake.send(Msg::Wake);
    }

    pub(super) fn broken_error(&self) -> Option<ServeError> {
        self.broken.get().map(|reason| {
            ServeError::unavailable(format!(
                "model '{}' version {} is unavailable: {reason}",
                self.spec.name, self.spec.version
            ))
        })
    }

    /// Takes in what an instance said about itself after a batch.
    pub(super) fn take_report(&self, seat: usize, report: InstanceReport) {
        if report.restarts > 0 {
            self.stats.record_instance_restarts(report.restarts);
        }
        if let Some(bytes) = report.resident_bytes {
            self.stats.set_instance_resident_bytes(seat, bytes);
        }
        if let Some(reason) = report.unavailable {
            if self.broken.get().is_none() {
                self.break_with(reason);
            }
        }
    }

    /// Answers the batches still running with `error` (the caller gives up on them).
    pub(super) fn fail_running(&self, error: &ServeError) {
        let running: Vec<Replies> = lock(&self.running).drain().map(|(_, r)| r).collect();
        for replies in running {
            for reply in watchdog::take(&replies).into_iter().flatten() {
                let _ = reply.send(Err(error.clone().into()));
            }
        }
    }
}

pub(super) fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<Worker> {
    let (alive, done) = crossbeam_channel::bounded::<()>(0);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _alive = alive;
            f()
        })
        .map_err(|e| ServeError::Internal(format!("cannot start a model thread: {e}")))?;
    Ok(Worker { handle, done })
}

/// Abandons hung instance threads and starts fresh instances in their seats.
pub(super) struct Replacer<'a> {
    pub(super) seats: &'a Arc<Seats>,
    pub(super) factory: &'a Option<InstanceFactory>,
}

impl watchdog::OnHung for Replacer<'_> {
    fn abandon(&self, id: u64) -> bool {
        self.seats.abandon(id)
    }

    fn replace(&self, seat: usize) {
        let model = &self.seats.spec.name;
        let Some(factory) = self.factory else {
            tracing::error!(model = %model, instance = seat, "no way to create a replacement instance; serving with fewer");
            return;
        };
        match factory(seat).and_then(|instance| self.seats.spawn(seat, instance)) {
            Ok(()) => {
                self.seats.stats.record_instance_replaced();
                tracing::info!(model = %model, instance = seat, "replacement instance started");
            }
            Err(e) => {
                tracing::error!(model = %model, instance = seat, error = %e, "replacing the hung instance failed")
            }
        }
    }

    fn give_up(&self, reason: String) {
        self.seats.break_with(reason);
    }
}

pub(super) fn instance_loop(mut instance: Box<dyn Instance>, seats: &Seats, id: u64, seat: usize) {
    let Some(batches) = seats.batch_rx.get(seat) else { return };
    loop {
        if seats.idle_tx.send(seat).is_err() {
            break;
        }
        let Ok(batch) = batches.recv() else { break };
        if !run_batch(instance.as_mut(), seats, id, seat, batch) {
            tracing::info!(model = %seats.spec.name, instance = seat, "an abandoned instance returned; it is dropped");
            seats.abandoned.fetch_sub(1, Ordering::AcqRel);
            break;
        }
        seats.take_report(seat, instance.report());
    }
}

/// Runs one batch and answers its requests; false when the watchdog answered them first (the
/// instance was abandoned as hung).
pub(super) fn run_batch(instance: &mut dyn Instance, seats: &Seats, id: u64, seat: usize, batch: Batch) -> bool {
    let Batch { mut jobs, sequence } = batch;
    if seats.spec.decoupled {
        return match jobs.pop() {
            Some(job) => run_stream(instance, seats, id, seat, job),
            None => true,
        };
    }
    let (spec, stats) = (&*seats.spec, &*seats.stats);
    let mut clock = PhaseClock::new();
    let waits: Vec<Duration> = jobs.iter().map(|j| clock.start.saturating_duration_since(j.enqueued)).collect();
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let total: usize = rows.iter().sum();
    // Set when the batch failed and its requests ran one at a time: each then ran in a batch of its own rows.
    let mut split = false;
    let callers: Vec<Vec<String>> = jobs.iter_mut().map(|j| std::mem::take(&mut j.callers)).collect();
    let ids: Vec<Option<String>> = jobs.iter_mut().map(|j| j.request_id.take()).collect();
    // The failed batch's request ids, for its log line (the model's traceback is logged once, by it).
    let named = || ids.iter().flatten().map(String::as_str).collect::<Vec<_>>().join(",");
    let (requests, replies): (Vec<ModelRequest>, Vec<_>) = jobs
        .into_iter()
        .map(|j| (ModelRequest { inputs: j.inputs, rows: j.rows, info: j.info, sequence: j.sequence }, j.reply))
        .unzip();
    let replies = started(seats, id, seat, replies, instance.kill_switch());
    let deadline = seats.execution_timeout.and_then(|t| Instant::now().checked_add(t));
    let _calls = super::calls::enter(&spec.name, callers.iter().flatten(), deadline);
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<PerRequest> {
        if let Some(batch) = sequence {
            return run_sequence(instance, spec, batch, requests, &mut clock);
        }
        // Kept to run each request alone should the batch fail (tensors share their buffers).
        let alone = (seats.isolate_failures && requests.len() > 1).then(|| requests.clone());
        match (run_requests(instance, spec, requests, &mut clock), alone) {
            (Err(e @ ServeError::ModelError(_)), Some(alone)) => {
                tracing::warn!(model = %spec.name, version = spec.version, batch = alone.len(), request_ids = %named(),
                    error = %e, "batch failed; running its requests one at a time");
                stats.record_batch_split();
                split = true;
                let each = alone.into_iter().map(|r| {
                    run_requests(instance, spec, vec![r], &mut clock)
                        .and_then(|mut answers| answers.pop().unwrap_or_else(|| Err(e.clone())))
                });
                Ok(each.collect())
            }
            (result, _) => result,
        }
    }))
    .unwrap_or_else(|_| Err(panicked(spec)));
    let Some(replies) = finished(seats, id, &replies) else { return false };
    let phases = clock.phases(Instant::now());
    match result {
        Ok(results) => {
            stats.record_batch(total, &waits, phases);
            stats.record_responses(results.iter().filter(|r| r.is_ok()).count());
            let replies = replies.into_iter().zip(results).zip(waits).zip(&ids).zip(rows);
            for ((((reply, result), queue), request_id), rows) in replies {
                let served = Served { queue, phases, batch_size: if split { rows } else { total } };
                if let Err(e) = &result {
                    let request_id = request_id.as_deref().unwrap_or("");
                    tracing::debug!(model = %spec.name, version = spec.version, request_id, error = %e, "request failed");
                }
                let _ = reply.send(match result {
                    Ok(outputs) => Ok(Executed { outputs, served }),
                    Err(error) => Err(Failed::after(error, served)),
                });
            }
        }
        Err(e) => {
            tracing::warn!(model = %spec.name, version = spec.version, batch_size = total, request_ids = %named(),
                error = %e, "batch failed");
            for (reply, queue) in replies.into_iter().zip(waits) {
                let _ = reply.send(Err(Failed::after(e.clone(), Served { queue, phases, batch_size: total })));
            }
        }
    }
    true
}

/// Runs a batch's requests on `instance`: concatenated, or one by one for a per-request instance.
fn run_requests(
    instance: &mut dyn Instance,
    spec: &ModelSpec,
    requests: Vec<ModelRequest>,
    clock: &mut PhaseClock,
) -> Result<PerRequest> {
    if !instance.per_request() {
        return instance.execute_requests(spec, requests, clock);
    }
    let rows: Vec<usize> = requests.iter().map(|r| r.rows).collect();
    let results = instance.execute_requests(spec, requests, clock)?;
    answered_each(spec, results, &rows)
}

/// Checks a per-request instance's answers: one per request, each request's outputs against the
/// model's declared outputs for its own rows (a bad one fails only its request).
fn answered_each(spec: &ModelSpec, results: PerRequest, rows: &[usize]) -> Result<PerRequest> {
    if results.len() != rows.len() {
        return Err(ServeError::ModelError(format!(
            "model '{}' answered {} of a batch's {} requests",
            spec.name,
            results.len(),
            rows.len()
        )));
    }
    Ok(results
        .into_iter()
        .zip(rows)
        .map(|(result, &rows)| result.and_then(|outputs| spec.check_outputs(&outputs, rows).map(|()| outputs)))
        .collect())
}

/// Registers a batch as running (for the watchdog and a bounded shutdown); returns its reply slots.
fn started(
    seats: &Seats,
    id: u64,
    seat: usize,
    replies: Vec<oneshot::Sender<Reply>>,
    kill: Option<KillSwitch>,
) -> Replies {
    let replies: Replies = Arc::new(Mutex::new(Some(replies)));
    lock(&seats.running).insert(id, replies.clone());
    if let Some(watch) = &seats.watch {
        let started = seats.clock.now();
        let _ = watch.send(Watch::Started { id, seat, started, replies: replies.clone(), kill });
    }
    replies
}

/// Unregisters a batch; its replies, unless the watchdog or a shutdown answered them first.
fn finished(seats: &Seats, id: u64, replies: &Replies) -> Option<Vec<oneshot::Sender<Reply>>> {
    if let Some(watch) = &seats.watch {
        let _ = watch.send(Watch::Finished { id });
    }
    lock(&seats.running).remove(&id);
    watchdog::take(replies)
}

fn panicked(spec: &ModelSpec) -> ServeError {
    ServeError::Internal(format!("model '{}' panicked while executing", spec.name))
}

/// Runs one request of a decoupled model: each response is checked and handed to the request's
/// bounded response channel as it is produced (waiting while the reader is behind), and the final
/// answer says how it ended. A reader that went away stops the model at its next response.
fn run_stream(instance: &mut dyn Instance, seats: &Seats, id: u64, seat: usize, job: Job) -> bool {
    let (spec, stats) = (&*seats.spec, &*seats.stats);
    let mut clock = PhaseClock::new();
    let wait = clock.start.saturating_duration_since(job.enqueued);
    let (rows, enqueued) = (job.rows, job.enqueued);
    let replies = started(seats, id, seat, vec![job.reply], instance.kill_switch());
    let deadline = seats.execution_timeout.and_then(|t| Instant::now().checked_add(t));
    let _calls = super::calls::enter(&spec.name, job.callers.iter(), deadline);
    let mut sent = 0usize;
    let result = match job.responses {
        None => {
            Err(ServeError::Internal(format!("a request to decoupled model '{}' has no response stream", spec.name)))
        }
        Some(tx) => {
            // `last`: when the previous response was handed over (or execution started);
            // `produced`: when it was produced (or the request was queued).
            let (mut last, mut produced) = (clock.start, enqueued);
            let mut sender = StreamSender { tx, ending: seats.ending.subscribe(), waiter: None };
            let mut emit = |outputs: Vec<Tensor>| -> Result<()> {
                let now = Instant::now();
                spec.check_response(&outputs, rows)?;
                sender.send(outputs, spec)?;
                let sent_at = Instant::now();
                stats.record_response(ResponseTiming {
                    index: sent,
                    compute: now.saturating_duration_since(last),
                    total: sent_at.saturating_duration_since(last),
                    since: now.saturating_duration_since(produced),
                });
                (last, produced) = (sent_at, now);
                sent += 1;
                Ok(())
            };
            let request = ModelRequest { inputs: job.inputs, rows, info: job.info, sequence: job.sequence };
            catch_unwind(AssertUnwindSafe(|| instance.execute_stream_request(request, &mut clock, &mut emit)))
                .unwrap_or_else(|_| Err(panicked(spec)))
        }
    };
    let Some(replies) = finished(seats, id, &replies) else { return false };
    let end = Instant::now();
    let phases = clock.phases(end);
    stats.record_batch(rows, &[wait], phases);
    stats.record_stream_end(sent, result.as_ref().map(|_| ()), end.saturating_duration_since(clock.start));
    match &result {
        Err(ServeError::Cancelled(_)) => stats.record_cancelled(1),
        Err(e) => {
            tracing::warn!(model = %spec.name, version = spec.version, responses = sent, error = %e, "stream failed")
        }
        Ok(()) => {}
    }
    for reply in replies {
        let served = Served { queue: wait, phases, batch_size: rows };
        let _ = reply.send(match &result {
            Ok(()) => Ok(Executed { outputs: Vec::new(), served }),
            Err(error) => Err(Failed::after(error.clone(), served)),
        });
    }
    true
}

/// Hands a stream's responses to its reader from a model thread: at once while the bounded
/// channel has room, else waiting for the reader, for the reader to go away, or for the version to
/// end its streams, whichever comes first.
struct StreamSender {
    tx: super::queue::ResponseSender,
    ending: tokio::sync::watch::Receiver<bool>,
    /// Runs the wait for a slow reader; made the first time one is needed.
    waiter: Option<tokio::runtime::Runtime>,
}

impl StreamSender {
    fn send(&mut self, outputs: Vec<Tensor>, spec: &ModelSpec) -> Result<()> {
        use tokio::sync::mpsc::error::TrySendError;
        let gone = || ServeError::Cancelled(format!("the client of model '{}' went away mid-stream", spec.name));
        let ended = || {
            ServeError::unavailable(format!(
                "model '{}' version {} stopped while streaming: the server is shutting down or the \
                 version was unloaded",
                spec.name, spec.version
            ))
        };
        if *self.ending.borrow() {
            return Err(ended());
        }
        let outputs = match self.tx.try_send(outputs) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(gone()),
            Err(TrySendError::Full(outputs)) => outputs,
        };
        if self.waiter.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| ServeError::Internal(format!("cannot wait for a stream's reader: {e}")))?;
            self.waiter = Some(runtime);
        }
        let Some(waiter) = &self.waiter else { return Err(ServeError::Internal("no stream waiter".into())) };
        let (tx, ending) = (&self.tx, &mut self.ending);
        waiter.block_on(async {
            tokio::select! {
                sent = tx.send(outputs) => sent.map_err(|_| gone()),
                _ = ending.wait_for(|&e| e) => Err(ended()),
            }
        })
    }
}

/// Executes a sequence batch: the assembled inputs go to the model, each row's new state is
/// stored for its sequence, and each request gets its row's outputs (empty slots are dropped).
/// An instance that takes requests one by one gets each filled row as its own request instead.
fn run_sequence(
    instance: &mut dyn Instance,
    spec: &ModelSpec,
    batch: SequenceBatch,
    requests: Vec<ModelRequest>,
    clock: &mut PhaseClock,
) -> Result<PerRequest> {
    if instance.per_request() {
        return run_sequence_per_request(instance, spec, batch, requests, clock);
    }
    let rows = batch.rows.len();
    let mut outputs = instance.execute(batch.inputs, clock)?;
    let states = take_states(&batch.plan, spec.batching(), rows, &mut outputs, &spec.name)?;
    spec.check_outputs(&outputs, rows)?;
    let per_row = if spec.batching() { split_outputs(&outputs, &vec![1; rows])? } else { vec![outputs] };
    let mut per_job: PerRequest = (0..requests.len()).map(|_| Ok(Vec::new())).collect();
    let mut store = lock(&batch.states);
    for ((row, outputs), state) in batch.rows.iter().zip(per_row).zip(states) {
        let Some(job) = *row else { continue };
        if let Some(Some(tag)) = requests.get(job).map(|r| &r.sequence) {
            store.insert(tag.id.clone(), state);
        }
        if let Some(slot) = per_job.get_mut(job) {
            *slot = Ok(outputs);
        }
    }
    Ok(per_job)
}

/// A sequence batch for an instance that takes requests one by one: each filled row (its control
/// and state inputs included) is one request; each answer's state outputs are stored for its
/// sequence and the rest checked as that request's outputs. A request that failed keeps its
/// sequence's previous state.
fn run_sequence_per_request(
    instance: &mut dyn Instance,
    spec: &ModelSpec,
    batch: SequenceBatch,
    mut requests: Vec<ModelRequest>,
    clock: &mut PhaseClock,
) -> Result<PerRequest> {
    let rows = batch.rows.len();
    let per_row = if spec.batching() { split_outputs(&batch.inputs, &vec![1; rows])? } else { vec![batch.inputs] };
    let mut order = Vec::with_capacity(requests.len());
    let mut run = Vec::with_capacity(requests.len());
    for (row, inputs) in batch.rows.iter().zip(per_row) {
        let Some(job) = *row else { continue };
        let Some(request) = requests.get_mut(job) else { continue };
        order.push(job);
        run.push(ModelRequest { inputs, rows: 1, info: request.info.take(), sequence: request.sequence.clone() });
    }
    let tags: Vec<Option<SequenceTag>> = run.iter().map(|r| r.sequence.clone()).collect();
    let results = instance.execute_requests(spec, run, clock)?;
    if results.len() != order.len() {
        return Err(ServeError::ModelError(format!(
            "model '{}' answered {} of a batch's {} requests",
            spec.name,
            results.len(),
            order.len()
        )));
    }
    let mut per_job: PerRequest = (0..requests.len()).map(|_| Ok(Vec::new())).collect();
    let mut store = lock(&batch.states);
    for ((job, result), tag) in order.into_iter().zip(results).zip(tags) {
        let answer = result.and_then(|mut outputs| {
            let state = take_states(&batch.plan, spec.batching(), 1, &mut outputs, &spec.name)?;
            spec.check_outputs(&outputs, 1)?;
            if let (Some(tag), Some(state)) = (tag, state.into_iter().next()) {
                store.insert(tag.id, state);
            }
            Ok(outputs)
        });
        if let Some(slot) = per_job.get_mut(job) {
            *slot = answer;
        }
    }
    Ok(per_job)
}
