//! One model version's execution engine: a bounded request queue, a batcher thread that forms
//! batches when an instance is free, and one thread per model instance.
//!
//! Requests arrive from async handlers through a lock-free channel and get their answer through a
//! oneshot, so no tokio worker ever waits on a model. Batches are formed only when an instance is
//! idle, so under load requests pile up and batches grow without an artificial delay.

mod batcher;
pub mod calls;
mod direct;
mod instance;
pub mod options;
#[cfg(test)]
mod per_request_tests;
pub mod plan;
mod queue;
mod reshape;
pub mod sequence;
#[cfg(test)]
mod sequence_tests;
#[cfg(test)]
mod stream_tests;
pub mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

use self::batcher::Batcher;
use self::direct::Direct;
pub use self::instance::{
    execute_concatenated, Instance, InstanceFactory, InstanceReport, ModelRequest, PerRequest, PhaseClock,
};
use self::instance::{lock, spawn, InstanceThreads, Replacer, Seats, Worker};
pub use self::options::ModelOptions;
use self::plan::BatchPolicy;
pub use self::queue::QueueOptions;
use self::queue::{Expiry, Job, Msg, ResponseSender};
use self::sequence::batcher::SequenceBatcher;
pub use self::sequence::config::SequenceConfig;
pub use self::watchdog::KillSwitch;
use crate::error::{Result, ServeError};
use crate::observe::stats::ModelStats;
use crate::spec::{ModelSpec, ValidatedRequest};

pub use crate::request::{Executed, Reply};

/// Responses of one decoupled request produced but not yet read by its client; beyond this the
/// model waits at its next `yield`.
pub const STREAM_RESPONSES_BUFFERED: usize = 16;

/// What a decoupled request's caller holds: its responses as they come, then its final answer.
pub struct StreamReceiver {
    pub responses: tokio::sync::mpsc::Receiver<Vec<crate::tensor::Tensor>>,
    pub done: oneshot::Receiver<Reply>,
}

/// Queue settings beyond batching.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub policy: BatchPolicy,
    /// Requests waiting beyond this are refused at once with `QueueFull`.
    pub max_queue_size: usize,
    /// How long a request may wait for an instance before it is dropped unrun (None: forever).
    pub default_queue_timeout: Option<Duration>,
    /// Priority levels, 1 the highest (0 or 1: every request is alike).
    pub priority_levels: u64,
    /// The level of requests that name none (0: the lowest level).
    pub default_priority_level: u64,
    /// A batch whose `execute` runs longer fails and its instance is replaced (None: no limit).
    pub execution_timeout: Option<Duration>,
    /// Hung instances that may be left running (a thread cannot be killed) before the version is
    /// marked unavailable instead of replacing another one.
    pub max_abandoned_instances: usize,
    /// A failed batch of several requests runs again one request at a time.
    pub isolate_batch_failures: bool,
    /// What `execution_timeout` is measured against (the real clock outside tests).
    pub clock: watchdog::Clock,
    /// `[sequence_batching]`: requests carry sequence ids and run through the sequence batcher.
    pub sequence: Option<SequenceConfig>,
    /// The steps of an ensemble (its instances run them), for the configuration endpoints.
    pub ensemble: Option<crate::ensemble::config::EnsembleConfig>,
}

impl SchedulerConfig {
    /// `policy` and `max_queue_size` with every other setting at its [`ModelOptions`] default.
    pub fn new(policy: BatchPolicy, max_queue_size: usize) -> Self {
        let defaults = ModelOptions::default().build().unwrap_or_else(|e| unreachable!("default model options: {e}"));
        Self { policy, max_queue_size, ..defaults }
    }

    fn levels(&self) -> u64 {
        self.priority_levels.max(1)
    }

    fn default_level(&self) -> u64 {
        match self.default_priority_level {
            0 => self.levels(),
            level => level.min(self.levels()),
        }
    }
}

pub struct Scheduler {
    spec: Arc<ModelSpec>,
    stats: Arc<ModelStats>,
    tx: Sender<Msg>,
    /// Wakes the batcher (see `Batcher::signals`).
    signal: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    config: SchedulerConfig,
    closing: AtomicBool,
    /// The batcher and the watchdog: joined first, so no instance starts or is abandoned after.
    supervisors: Mutex<Vec<Worker>>,
    seats: Arc<Seats>,
    /// Says why the version cannot serve right now (an ensemble whose step is unavailable).
    readiness: OnceLock<Readiness>,
    /// Its instances take a batch's requests one by one and are shown each request's
    /// [`crate::request::RequestInfo`].
    per_request: bool,
    /// The way past the batcher when nothing is queued and an instance is idle (None: every
    /// request goes through the batcher).
    direct: Option<Direct>,
}

/// A check of whether a version can serve now: None when it can, else why not.
pub type Readiness = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl Scheduler {
    /// Starts the batcher and one thread per instance.
    pub fn start(
        spec: Arc<ModelSpec>,
        config: SchedulerConfig,
        instances: Vec<Box<dyn Instance>>,
    ) -> Result<Arc<Self>> {
        Self::start_with(spec, config, instances, None)
    }

    /// As [`Scheduler::start`]; with `execution_timeout`, `factory` replaces hung instances.
    pub fn start_with(
        spec: Arc<ModelSpec>,
        config: SchedulerConfig,
        instances: Vec<Box<dyn Instance>>,
        factory: Option<InstanceFactory>,
    ) -> Result<Arc<Self>> {
        if instances.is_empty() {
            return Err(ServeError::Internal(format!("model '{}' has no instances", spec.name)));
        }
        check_tensors(&spec, &config)?;
        let instances: Vec<_> = instances.into_iter().map(|i| reshape::Reshaped::wrap(i, &spec)).collect();
        let factory = factory.map(|make| {
            let spec = spec.clone();
            Arc::new(move |seat| make(seat).map(|i| reshape::Reshaped::wrap(i, &spec))) as InstanceFactory
        });
        let per_request = instances.iter().any(|i| i.per_request());
        let sequence_plan = match &config.sequence {
            Some(s) => Some(Arc::new(s.plan(&spec).map_err(ServeError::bad_request)?)),
            None => None,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        // What the dynamic batcher must hear at once even while no instance is free (shutdown, a
        // withdrawn or expiring request, a broken version); the sequence batcher hears everything
        // on one channel.
        let (signal, signals) =
            if sequence_plan.is_some() { (tx.clone(), rx.clone()) } else { crossbeam_channel::unbounded() };
        let (idle_tx, idle_rx) = crossbeam_channel::unbounded();
        // The sequence batcher sends each instance its own batches; the dynamic batcher shares one
        // channel among them.
        let (seat_tx, batch_rx): (Vec<_>, Vec<_>) = if sequence_plan.is_some() {
            (0..instances.len()).map(|_| crossbeam_channel::bounded(1)).unzip()
        } else {
            let (batch_tx, batch_rx) = crossbeam_channel::bounded(instances.len());
            (vec![batch_tx], vec![batch_rx; instances.len()])
        };
        let (watch_tx, watch_rx) = crossbeam_channel::unbounded();
        let watch = config.execution_timeout.map(|timeout| (timeout, watch_tx, watch_rx));
        let queued = Arc::new(AtomicUsize::new(0));
        let label = format!("{}-v{}", spec.name, spec.version);
        let stats = Arc::new(ModelStats::new());
        let threads: InstanceThreads = Arc::new(Mutex::new(Vec::with_capacity(instances.len())));
        let seats = Arc::new(Seats {
            spec: spec.clone(),
            stats: stats.clone(),
            idle_tx,
            batch_rx,
            watch: watch.as_ref().map(|(_, tx, _)| tx.clone()),
            threads: threads.clone(),
            next_id: AtomicU64::new(0),
            label: label.clone(),
            running: Mutex::default(),
            abandoned: AtomicUsize::new(0),
            max_abandoned: config.max_abandoned_instances,
            broken: OnceLock::new(),
            wake: signal.clone(),
            clock: config.clock.clone(),
            ending: tokio::sync::watch::channel(false).0,
            execution_timeout: config.execution_timeout,
            isolate_failures: config.isolate_batch_failures,
        });
        for (seat, instance) in instances.into_iter().enumerate() {
            seats.spawn(seat, instance)?;
        }
        let mut supervisors = Vec::with_capacity(2);
        let watch_tx = watch.as_ref().map(|(_, tx, _)| tx.clone());
        let mut direct = None;
        if let Some(plan) = sequence_plan {
            let batcher = SequenceBatcher {
                rx,
                idle_rx,
                seat_tx,
                plan,
                batching: spec.batching(),
                queued: queued.clone(),
                stats: stats.clone(),
                model: spec.name.clone(),
                watch: watch_tx,
                seats: seats.clone(),
                states: Arc::default(),
            };
            supervisors.push(spawn(format!("fs-seq-{label}"), move || batcher.run())?);
        } else {
            let batch_tx = seat_tx.into_iter().next().ok_or_else(|| ServeError::Internal("no batch channel".into()))?;
            // A decoupled model runs one request per execute(), whatever its max_batch_size.
            let policy = if spec.decoupled {
                BatchPolicy { max_batch_size: 0, ..config.policy.clone() }
            } else {
                config.policy.clone()
            };
            if policy.sends_a_lone_request_at_once() {
                direct = Some(Direct::new(idle_rx.clone(), batch_tx.clone()));
            }
            let batcher = Batcher {
                rx,
                signals,
                idle_rx,
                batch_tx,
                policy,
                queued: queued.clone(),
                stats: stats.clone(),
                model: spec.name.clone(),
                watch: watch_tx,
                seats: seats.clone(),
            };
            supervisors.push(spawn(format!("fs-batch-{label}"), move || batcher.run())?);
        }
        let clock = config.clock.clone();
        if let Some((timeout, _, watch_rx)) = watch {
            let seats = seats.clone();
            supervisors.push(spawn(format!("fs-watch-{label}"), move || {
                let model = seats.spec.name.clone();
                watchdog::run(watch_rx, timeout, &clock, &model, &Replacer { seats: &seats, factory: &factory })
            })?);
        }
        Ok(Arc::new(Scheduler {
            spec,
            stats,
            tx,
            signal,
            queued,
            config,
            closing: AtomicBool::new(false),
            supervisors: Mutex::new(supervisors),
            seats,
            readiness: OnceLock::new(),
            per_request,
            direct,
        }))
    }

    /// Why the version cannot serve any more (too many hung instances), if it cannot.
    pub fn broken(&self) -> Option<&str> {
        self.seats.broken.get().map(String::as_str)
    }

    /// Adds a check of whether the version can serve now (set once).
    pub fn set_readiness(&self, check: Readiness) {
        let _ = self.readiness.set(check);
    }

    /// Why the version cannot serve now: broken for good, or its readiness check says so.
    pub fn unavailable(&self) -> Option<String> {
        match self.broken() {
            Some(reason) => Some(reason.to_string()),
            None => self.readiness.get().and_then(|check| check()),
        }
    }

    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
    }

    /// Whether requests should carry their [`crate::request::RequestInfo`] (the instances take
    /// them one by one and show it to the model); building it costs a copy of the parameters.
    pub fn wants_request_info(&self) -> bool {
        self.per_request
    }

    pub fn stats(&self) -> &Arc<ModelStats> {
        &self.stats
    }

    /// The queue and batching settings this version runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Requests waiting for an instance.
    pub fn pending(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues a validated request with the model's default timeout and priority.
    pub fn submit(&self, request: ValidatedRequest) -> Result<oneshot::Receiver<Reply>> {
        self.submit_with(request, QueueOptions::default())
    }

    /// Queues a validated request; refuses at once when the queue is full, the version is
    /// closing, or the priority is out of range.
    pub fn submit_with(&self, request: ValidatedRequest, options: QueueOptions) -> Result<oneshot::Receiver<Reply>> {
        self.enqueue(request, options, None)
    }

    /// Queues a request of a decoupled model: its responses arrive one by one on the returned
    /// stream, at most [`STREAM_RESPONSES_BUFFERED`] ahead of the reader. Dropping the receiver
    /// cancels the request (unrun if still queued; stopped at its next response if running).
    pub fn submit_stream(&self, request: ValidatedRequest, options: QueueOptions) -> Result<StreamReceiver> {
        let (tx, responses) = tokio::sync::mpsc::channel(STREAM_RESPONSES_BUFFERED);
        let done = self.enqueue(request, options, Some(tx))?;
        Ok(StreamReceiver { responses, done })
    }

    fn enqueue(
        &self,
        request: ValidatedRequest,
        options: QueueOptions,
        responses: Option<ResponseSender>,
    ) -> Result<oneshot::Receiver<Reply>> {
        let level = self.level(options.priority)?;
        if options.sequence.is_some() && request.rows != 1 {
            return Err(ServeError::bad_request(format!(
                "a request of a sequence to model '{}' must have batch size 1, got {}",
                self.spec.name, request.rows
            )));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(self.closing_error());
        }
        if let Some(e) = self.seats.broken_error() {
            return Err(e);
        }
        let queued_before = self.queued.fetch_add(1, Ordering::AcqRel);
        if queued_before >= self.config.max_queue_size {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ServeError::QueueFull(format!(
                "model '{}' version {} has {} requests queued, its max_queue_size",
                self.spec.name, self.spec.version, self.config.max_queue_size
            )));
        }
        let enqueued = Instant::now();
        let timeout = options.timeout.or(self.config.default_queue_timeout);
        let by_timeout = timeout.and_then(|t| Some((enqueued.checked_add(t)?, Expiry::Queue(t))));
        let by_deadline = options.deadline.map(|d| (d, Expiry::Deadline));
        let expires = match (by_timeout, by_deadline) {
            (Some(t), Some(d)) => Some(if d.0 < t.0 { d } else { t }),
            (t, d) => t.or(d),
        };
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs: request.inputs,
            rows: request.rows,
            reply,
            responses,
            sequence: options.sequence,
            callers: options.callers,
            info: options.info,
            request_id: options.request_id,
            enqueued,
            level,
            expires,
        };
        // Nothing queued before it: it overtakes no one by skipping the batcher.
        let job = match (&self.direct, queued_before) {
            (Some(direct), 0) => match direct.send(job) {
                None => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    return Ok(rx);
                }
                Some(job) => job,
            },
            _ => job,
        };
        let expires = job.expires.is_some();
        if self.tx.send(Msg::Job(job)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.closing_error());
        }
        if expires {
            // Its expiry is timed even while every instance is busy.
            let _ = self.signal.send(Msg::Wake);
        }
        Ok(rx)
    }

    /// The queue level of a request's `priority` (0 or none: the model's default).
    fn level(&self, priority: Option<u64>) -> Result<u64> {
        let levels = self.config.levels();
        match priority {
            None | Some(0) => Ok(self.config.default_level()),
            Some(p) if p <= levels => Ok(p),
            Some(p) => Err(ServeError::bad_request(format!(
                "priority {p} is out of range: model '{}' has {levels} priority level(s), 1 the highest",
                self.spec.name
            ))),
        }
    }

    /// Tells the batcher that a queued request's client went away (its reply receiver is gone).
    pub fn withdrawn(&self) {
        let _ = self.signal.send(Msg::Wake);
    }

    /// Ends the streams of a decoupled model running now or later: each stops at its next
    /// response with an error (the model's generator is closed). Ordinary batches are not affected.
    pub fn end_streams(&self) {
        self.seats.ending.send_replace(true);
    }

    fn closing_error(&self) -> ServeError {
        ServeError::unavailable(format!("model '{}' version {} is unloading", self.spec.name, self.spec.version))
    }

    /// Stops admitting, runs everything already queued, and joins the threads. Idempotent.
    pub fn shutdown(&self) {
        self.shutdown_by(None);
    }

    /// As [`Scheduler::shutdown`], bounded by `deadline`: requests still queued then are answered
    /// 503 unrun, streams still running are ended at their next response, and threads still running [`SHUTDOWN_GRACE`] after it (a stuck `execute` or
    /// `finalize`) are abandoned, their requests answered 503. Returns how many model threads
    /// are left running, including instances abandoned earlier as hung.
    pub fn shutdown_by(&self, deadline: Option<Instant>) -> usize {
        if !self.closing.swap(true, Ordering::AcqRel) {
            if let Some(direct) = &self.direct {
                direct.close();
            }
            let _ = self.signal.send(Msg::Close(deadline));
        }
        let give_up = deadline.map(|d| d.max(Instant::now()) + SHUTDOWN_GRACE);
        let mut left = Vec::new();
        let supervisors = std::mem::take(&mut *lock(&self.supervisors));
        for worker in supervisors {
            if !worker.join_by(give_up) {
                left.push("batcher/watchdog".to_string());
            }
        }
        let instances = std::mem::take(&mut *lock(&self.seats.threads));
        // Streams still running at the deadline are ended, so their threads can return.
        if let Some(at) = deadline {
            if !instances.iter().all(|(_, worker)| worker.finished_by(at)) {
                self.end_streams();
            }
        }
        for (id, worker) in instances {
            if !worker.join_by(give_up) {
                self.seats.abandoned.fetch_add(1, Ordering::AcqRel);
                left.push(format!("instance thread {id}"));
            }
        }
        if !left.is_empty() {
            self.seats.fail_running(&ServeError::unavailable(format!(
                "the server shut down while model '{}' was still executing this request",
                self.spec.name
            )));
            tracing::warn!(
                model = %self.spec.name,
                version = self.spec.version,
                abandoned = ?left,
                "threads still running at the shutdown deadline are abandoned"
            );
        }
        self.seats.abandoned.load(Ordering::Acquire)
    }
}

/// How long past the shutdown deadline a running batch may take to finish before its thread is
/// abandoned.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Refuses reshapes no tensor could satisfy and optional tensors where they cannot be honored.
fn check_tensors(spec: &ModelSpec, config: &SchedulerConfig) -> Result<()> {
    for t in spec.inputs.iter().chain(&spec.outputs) {
        t.check_reshape().map_err(|e| ServeError::bad_request(format!("model '{}': {e}", spec.name)))?;
    }
    if let Some(t) = spec.outputs.iter().find(|t| t.optional) {
        return Err(ServeError::bad_request(format!("model '{}': output '{}' cannot be optional", spec.name, t.name)));
    }
    if let (Some(t), true) = (spec.inputs.iter().find(|t| t.optional), config.sequence.is_some()) {
        return Err(ServeError::bad_request(format!(
            "model '{}': input '{}' cannot be optional with sequence batching (every batch slot needs every input)",
            spec.name, t.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TensorSpec;
    use crate::tensor::datatype::DataType;
    use crate::tensor::Tensor;
    use crate::tensor::TensorData;
    use std::time::Duration;

    /// Doubles X into Y and reports every batch size it sees; can hold the first batch on a gate.
    struct Doubler {
        seen: crossbeam_channel::Sender<usize>,
        gate: Option<crossbeam_channel::Receiver<()>>,
        fail_on: Option<f32>,
    }

    impl Instance for Doubler {
        fn execute(&mut self, inputs: Vec<Tensor>, _clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
            let x = &inputs[0];
            let _ = self.seen.send(x.shape[0]);
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            let TensorData::Raw(b) = &x.data else { unreachable!() };
            let vals: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            if self.fail_on.is_some_and(|f| vals.contains(&f)) {
                return Err(ServeError::ModelError("boom".into()));
            }
            let out: Vec<u8> = vals.iter().flat_map(|v| (v * 2.0).to_le_bytes()).collect();
            Ok(vec![Tensor::new("Y", DataType::Fp32, x.shape.clone(), TensorData::Raw(out.into()))?])
        }
    }

    /// Requests are `[rows, 1]`: the batch dimension plus one, or two dims without batching.
    fn spec(max_batch_size: usize) -> Arc<ModelSpec> {
        let dims = if max_batch_size > 0 { vec![1] } else { vec![-1, 1] };
        Arc::new(ModelSpec {
            name: "double".into(),
            version: 1,
            platform: "test".into(),
            max_batch_size,
            decoupled: false,
            inputs: vec![TensorSpec::new("X", DataType::Fp32, dims.clone())],
            outputs: vec![TensorSpec::new("Y", DataType::Fp32, dims)],
        })
    }

    fn request(values: &[f32]) -> ValidatedRequest {
        let b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new("X", DataType::Fp32, vec![values.len(), 1], TensorData::Raw(b.into())).unwrap();
        ValidatedRequest { inputs: vec![t], rows: values.len() }
    }

    fn values(reply: Reply) -> Vec<f32> {
        let out = reply.unwrap().outputs;
        let TensorData::Raw(b) = &out[0].data else { unreachable!() };
        b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn config(max: usize, max_queue_size: usize) -> SchedulerConfig {
        SchedulerConfig::new(
            BatchPolicy { max_batch_size: max, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] },
            max_queue_size,
        )
    }

    /// A queue whose batches time out after `ms` of a clock the test moves by hand.
    fn timed(ms: u64) -> (SchedulerConfig, Arc<watchdog::ManualClock>) {
        let clock = watchdog::ManualClock::new();
        let mut cfg = config(0, 10);
        cfg.execution_timeout = Some(Duration::from_millis(ms));
        cfg.clock = watchdog::Clock::Manual(clock.clone());
        (cfg, clock)
    }

    /// Starts a scheduler whose first batch blocks until the returned gate is released.
    fn gated(
        max: usize,
        queue: usize,
    ) -> (Arc<Scheduler>, crossbeam_channel::Receiver<usize>, crossbeam_channel::Sender<()>) {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let inst = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: None };
        let s = Scheduler::start(spec(max), config(max, queue), vec![Box::new(inst)]).unwrap();
        (s, seen, gate_tx)
    }

    #[tokio::test]
    async fn queued_requests_form_batches_up_to_the_limit_and_get_their_own_rows() {
        let (s, seen, gate) = gated(4, 100);
        let first = s.submit(request(&[0.0])).unwrap();
        assert_eq!(seen.recv().unwrap(), 1, "the first request runs alone and holds the instance");
        let rxs: Vec<_> = (1..=10).map(|i| s.submit(request(&[i as f32])).unwrap()).collect();
        gate.send(()).unwrap();
        assert_eq!(values(first.await.unwrap()), vec![0.0]);
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(values(rx.await.unwrap()), vec![2.0 * (i + 1) as f32]);
        }
        let sizes: Vec<usize> = seen.try_iter().collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        assert_eq!(s.stats().execution_count(), 4);
        assert_eq!(s.stats().inference_count(), 11);
        let batch_sizes: Vec<(usize, u64)> =
            s.stats().batch_sizes().into_iter().map(|(n, b)| (n, b.compute_infer.count())).collect();
        assert_eq!(batch_sizes, vec![(1, 1), (2, 1), (4, 2)]);
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once() {
        let (s, seen, gate) = gated(1, 2);
        let running = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        let a = s.submit(request(&[2.0])).unwrap();
        let b = s.submit(request(&[3.0])).unwrap();
        let err = s.submit(request(&[4.0])).unwrap_err();
        assert!(matches!(err, ServeError::QueueFull(_)), "{err}");
        gate.send(()).unwrap();
        for rx in [running, a, b] {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(s.pending(), 0);
        s.submit(request(&[5.0])).unwrap().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn delay_expiry_sends_a_partial_batch() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let mut cfg = config(8, 10);
        cfg.policy.max_queue_delay = Duration::from_millis(5);
        let s = Scheduler::start(spec(8), cfg, vec![Box::new(Doubler { seen: seen_tx, gate: None, fail_on: None })])
            .unwrap();
        assert_eq!(values(s.submit(request(&[1.0, 2.0])).unwrap().await.unwrap()), vec![2.0, 4.0]);
        assert_eq!(seen.recv().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_failing_batch_fails_only_its_requests() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let inst = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: Some(13.0) };
        let s = Scheduler::start(spec(0), config(0, 10), vec![Box::new(inst)]).unwrap();
        let first = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        let bad = s.submit(request(&[13.0])).unwrap();
        let good = s.submit(request(&[3.0])).unwrap();
        gate_tx.send(()).unwrap();
        assert_eq!(values(first.await.unwrap()), vec![2.0]);
        assert_eq!(bad.await.unwrap().unwrap_err().error, ServeError::ModelError("boom".into()));
        assert_eq!(values(good.await.unwrap()), vec![6.0]);
    }

    /// Two requests batched together behind a held first batch; one makes the model fail.
    async fn batch_with_a_bad_request(isolate: bool) -> (Reply, Reply, u64, Vec<usize>) {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let inst = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: Some(13.0) };
        let mut cfg = config(8, 10);
        cfg.isolate_batch_failures = isolate;
        let s = Scheduler::start(spec(8), cfg, vec![Box::new(inst)]).unwrap();
        let first = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        let bad = s.submit(request(&[13.0])).unwrap();
        let good = s.submit(request(&[3.0])).unwrap();
        gate_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (bad, good) = (bad.await.unwrap(), good.await.unwrap());
        (bad, good, s.stats().batches_split(), seen.try_iter().collect())
    }

    #[tokio::test]
    async fn a_failed_batch_runs_its_requests_alone_so_only_the_bad_one_fails() {
        let (bad, good, splits, batches) = batch_with_a_bad_request(true).await;
        let bad = bad.unwrap_err();
        assert_eq!(bad.error, ServeError::ModelError("boom".into()));
        assert_eq!(bad.served.map(|s| s.batch_size), Some(1), "a failure says how it ran, for the access log");
        assert_eq!(values(good), vec![6.0]);
        assert_eq!((splits, batches), (1, vec![2, 1, 1]), "the batch of 2, then each request alone");
        // Off (models whose execute must not run twice): the whole batch fails, once.
        let (bad, good, splits, batches) = batch_with_a_bad_request(false).await;
        let (bad, good) = (bad.unwrap_err(), good.unwrap_err());
        assert_eq!(bad.served.map(|s| s.batch_size), Some(2));
        assert_eq!(good.served.map(|s| s.batch_size), Some(2));
        assert_eq!((splits, batches), (0, vec![2]));
    }

    #[tokio::test]
    async fn shutdown_drains_queued_requests_then_refuses() {
        let (s, seen, gate) = gated(2, 10);
        let rxs: Vec<_> = (0..5).map(|i| s.submit(request(&[i as f32])).unwrap()).collect();
        seen.recv().unwrap();
        let s2 = s.clone();
        let stopper = std::thread::spawn(move || s2.shutdown());
        gate.send(()).unwrap();
        stopper.join().unwrap();
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(values(rx.await.unwrap()), vec![2.0 * i as f32]);
        }
        assert!(matches!(s.submit(request(&[1.0])), Err(ServeError::Unavailable(_))));
    }

    #[tokio::test]
    async fn abandoned_requests_are_not_executed() {
        let (s, seen, gate) = gated(4, 10);
        let first = s.submit(request(&[0.0])).unwrap();
        seen.recv().unwrap();
        drop(s.submit(request(&[1.0])).unwrap());
        let kept = s.submit(request(&[2.0])).unwrap();
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(values(kept.await.unwrap()), vec![4.0]);
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), vec![1], "only the live request ran");
        assert_eq!(s.stats().cancelled(), 1);
    }

    fn with_priorities(
        max: usize,
        levels: u64,
        default: u64,
    ) -> (Arc<Scheduler>, Order, crossbeam_channel::Sender<()>) {
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let order = Order::default();
        let inst = Recorder { order: order.clone(), gate: Some(gate_rx) };
        let mut cfg = config(max, 100);
        cfg.priority_levels = levels;
        cfg.default_priority_level = default;
        (Scheduler::start(spec(max), cfg, vec![Box::new(inst)]).unwrap(), order, gate_tx)
    }

    type Order = Arc<Mutex<Vec<Vec<f32>>>>;

    /// Records the values of every batch it runs; holds its first batch on a gate.
    struct Recorder {
        order: Order,
        gate: Option<crossbeam_channel::Receiver<()>>,
    }

    impl Instance for Recorder {
        fn execute(&mut self, inputs: Vec<Tensor>, _clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
            let TensorData::Raw(b) = &inputs[0].data else { unreachable!() };
            let vals: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            self.order.lock().unwrap().push(vals);
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            Ok(vec![Tensor { name: "Y".into(), ..inputs[0].clone() }])
        }
    }

    fn started(order: &Order) {
        while order.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
    }

    fn at(priority: u64) -> QueueOptions {
        QueueOptions { priority: Some(priority), ..Default::default() }
    }

    #[tokio::test]
    async fn higher_priority_levels_run_first_fifo_within_a_level() {
        let (s, order, gate) = with_priorities(0, 3, 2);
        let first = s.submit(request(&[0.0])).unwrap();
        started(&order);
        let queued: Vec<_> = [(3, 1.0), (2, 2.0), (0, 3.0), (1, 4.0), (3, 5.0), (1, 6.0)]
            .into_iter()
            .map(|(p, v)| s.submit_with(request(&[v]), at(p)).unwrap())
            .collect();
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        for rx in queued {
            rx.await.unwrap().unwrap();
        }
        // Priority 0 means the default level (2); level 1 first, then 2, then 3, FIFO within each.
        let ran: Vec<f32> = order.lock().unwrap().iter().map(|b| b[0]).collect();
        assert_eq!(ran, vec![0.0, 4.0, 6.0, 2.0, 3.0, 1.0, 5.0]);
    }

    #[tokio::test]
    async fn a_batch_fills_from_the_highest_level_down() {
        let (s, order, gate) = with_priorities(3, 2, 0);
        let first = s.submit(request(&[0.0])).unwrap();
        started(&order);
        let low: Vec<_> = (1..=3).map(|v| s.submit(request(&[v as f32])).unwrap()).collect();
        let high = s.submit_with(request(&[9.0]), at(1)).unwrap();
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        high.await.unwrap().unwrap();
        for rx in low {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![vec![0.0], vec![9.0, 1.0, 2.0], vec![3.0]]);
    }

    #[tokio::test]
    async fn out_of_range_priorities_are_refused() {
        let (s, _order, gate) = with_priorities(0, 2, 1);
        let err = s.submit_with(request(&[1.0]), at(3)).unwrap_err();
        assert!(matches!(err, ServeError::BadRequest(_)), "{err}");
        assert_eq!(s.pending(), 0);
        gate.send(()).unwrap();
        // Without priority levels, priority 1 is the only (default) level.
        let (plain, _, gate) = gated(0, 10);
        assert!(matches!(plain.submit_with(request(&[1.0]), at(2)), Err(ServeError::BadRequest(_))));
        gate.send(()).unwrap();
        plain.submit_with(request(&[1.0]), at(1)).unwrap().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn requests_expire_in_the_queue_without_running() {
        let (s, seen, gate) = gated(4, 10);
        let first = s.submit(request(&[0.0])).unwrap();
        seen.recv().unwrap();
        let timeout = QueueOptions { timeout: Some(Duration::from_millis(1)), ..Default::default() };
        let short = s.submit_with(request(&[1.0]), timeout).unwrap();
        let deadline = QueueOptions { deadline: Some(Instant::now()), ..Default::default() };
        let late = s.submit_with(request(&[2.0]), deadline).unwrap();
        let patient = s.submit(request(&[3.0])).unwrap();
        // Both expire while the only instance is still held, so they are answered before it frees.
        let err = short.await.unwrap().unwrap_err();
        assert!(matches!(err.error, ServeError::QueueTimeout(_)) && err.to_string().contains("timed out in the queue"));
        assert!(matches!(late.await.unwrap().unwrap_err().error, ServeError::DeadlineExceeded(_)));
        assert_eq!(s.pending(), 1);
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(values(patient.await.unwrap()), vec![6.0]);
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), vec![1], "expired requests never ran");
    }

    #[tokio::test]
    async fn the_default_queue_timeout_applies_unless_a_request_sets_its_own() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let mut cfg = config(0, 10);
        cfg.default_queue_timeout = Some(Duration::from_millis(1));
        let inst = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: None };
        let s = Scheduler::start(spec(0), cfg, vec![Box::new(inst)]).unwrap();
        let own = QueueOptions { timeout: Some(Duration::from_secs(3600)), ..Default::default() };
        // The first request sets its own timeout too: on a loaded machine 1 ms may pass before
        // it reaches the instance, and it must run to hold the instance.
        let first = s.submit_with(request(&[0.0]), own.clone()).unwrap();
        seen.recv().unwrap();
        let defaulted = s.submit(request(&[1.0])).unwrap();
        let overridden = s.submit_with(request(&[2.0]), own).unwrap();
        assert!(matches!(defaulted.await.unwrap().unwrap_err().error, ServeError::QueueTimeout(_)));
        gate_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(values(overridden.await.unwrap()), vec![4.0]);
    }

    #[tokio::test]
    async fn a_hung_batch_fails_and_its_instance_is_replaced() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let hung = Doubler { seen: seen_tx.clone(), gate: Some(gate_rx), fail_on: None };
        let (cfg, clock) = timed(300);
        let seats = Arc::new(Mutex::new(Vec::new()));
        let made = seats.clone();
        let factory: InstanceFactory = Arc::new(move |seat| {
            made.lock().unwrap().push(seat);
            Ok(Box::new(Doubler { seen: seen_tx.clone(), gate: None, fail_on: None }) as Box<dyn Instance>)
        });
        let s = Scheduler::start_with(spec(0), cfg, vec![Box::new(hung)], Some(factory)).unwrap();
        let hung = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        clock.advance(Duration::from_millis(300));
        let err = hung.await.unwrap().unwrap_err();
        assert!(matches!(err.error, ServeError::ExecutionTimeout(_)), "{err}");
        assert!(err.to_string().contains("timed out after 300 ms; instance replaced"), "{err}");
        assert_eq!(values(s.submit(request(&[2.0])).unwrap().await.unwrap()), vec![4.0]);
        assert_eq!(*seats.lock().unwrap(), vec![0], "one replacement, in the hung instance's seat");
        assert_eq!(s.stats().instances_replaced(), 1);
        // The hung call returns late: its answer is dropped and the old instance never runs again.
        gate_tx.send(()).unwrap();
        for v in 3..6 {
            assert_eq!(values(s.submit(request(&[v as f32])).unwrap().await.unwrap()), vec![2.0 * v as f32]);
        }
        assert_eq!(s.stats().instances_replaced(), 1);
        assert_eq!(seen.try_iter().count(), 4);
        s.shutdown();
    }

    #[tokio::test]
    async fn too_many_hung_instances_make_the_version_unavailable() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let gates: Vec<_> = (0..3).map(|_| crossbeam_channel::unbounded::<()>()).collect();
        let hung = |i: usize| Doubler { seen: seen_tx.clone(), gate: Some(gates[i].1.clone()), fail_on: None };
        let first = hung(0);
        let made = Arc::new(Mutex::new(1..3));
        let replacements: Vec<Doubler> = (1..3).map(hung).collect();
        let replacements = Arc::new(Mutex::new(replacements.into_iter()));
        let factory: InstanceFactory = Arc::new(move |_| {
            made.lock().unwrap().next();
            let next = replacements.lock().unwrap().next().expect("at most two replacements");
            Ok(Box::new(next) as Box<dyn Instance>)
        });
        let (mut cfg, clock) = timed(100);
        cfg.max_abandoned_instances = 2;
        let s = Scheduler::start_with(spec(0), cfg, vec![Box::new(first)], Some(factory)).unwrap();
        let hang = |s: &Arc<Scheduler>| {
            let reply = s.submit(request(&[1.0])).unwrap();
            seen.recv().unwrap();
            clock.advance(Duration::from_millis(100));
            reply
        };
        for _ in 0..2 {
            let err = hang(&s).await.unwrap().unwrap_err();
            assert!(err.to_string().contains("instance replaced"), "{err}");
        }
        assert!(s.broken().is_none());
        let err = hang(&s).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("the model version is now unavailable"), "{err}");
        // The version refuses from now on, naming the reason; nothing else runs.
        let refused = loop {
            match s.submit(request(&[2.0])) {
                Err(e) => break e,
                Ok(rx) => {
                    assert!(matches!(rx.await.unwrap().map_err(ServeError::from), Err(ServeError::Unavailable(_))))
                }
            }
        };
        assert!(matches!(refused, ServeError::Unavailable(_)), "{refused}");
        assert!(refused.to_string().contains("max_abandoned_instances"), "{refused}");
        assert_eq!(s.stats().instances_replaced(), 2);
        assert_eq!(seen.try_iter().count(), 0, "three batches ran (seen above), each on a fresh instance");
        for (tx, _) in &gates {
            tx.send(()).unwrap();
        }
        s.shutdown();
    }

    /// Hangs in its first batch until its kill switch is pulled (as a worker process is killed),
    /// then fails that batch and says so on `returned`.
    struct Killable {
        killed: crossbeam_channel::Receiver<()>,
        kill: KillSwitch,
        returned: crossbeam_channel::Sender<()>,
    }

    impl Instance for Killable {
        fn execute(&mut self, _inputs: Vec<Tensor>, _clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
            let _ = self.killed.recv();
            let _ = self.returned.send(());
            Err(ServeError::ModelError("model instance process exited with signal 9".into()))
        }

        fn kill_switch(&self) -> Option<KillSwitch> {
            Some(self.kill.clone())
        }
    }

    #[tokio::test]
    async fn a_hung_instance_with_a_kill_switch_is_killed_and_nothing_is_left_running() {
        let (kill_tx, killed) = crossbeam_channel::unbounded();
        let (returned, returns) = crossbeam_channel::unbounded();
        let kill: KillSwitch = Arc::new(move || {
            let _ = kill_tx.send(());
        });
        let hung = Killable { killed, kill, returned };
        let (seen_tx, _seen) = crossbeam_channel::unbounded();
        let factory: InstanceFactory = Arc::new(move |_| {
            Ok(Box::new(Doubler { seen: seen_tx.clone(), gate: None, fail_on: None }) as Box<dyn Instance>)
        });
        let (cfg, clock) = timed(300);
        let s = Scheduler::start_with(spec(0), cfg, vec![Box::new(hung)], Some(factory)).unwrap();
        let reply = s.submit(request(&[1.0])).unwrap();
        // The batch is running once the watchdog has it: advancing earlier would expire nothing.
        while lock(&s.seats.running).is_empty() {
            std::thread::yield_now();
        }
        clock.advance(Duration::from_millis(300));
        let err = reply.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("timed out after 300 ms; instance process killed and replaced"), "{err}");
        returns.recv().unwrap();
        assert_eq!(values(s.submit(request(&[2.0])).unwrap().await.unwrap()), vec![4.0]);
        // The killed instance's thread returns, so it no longer counts against max_abandoned_instances
        // (bounded only as a guard against a hang).
        let guard = Instant::now() + Duration::from_secs(60);
        while s.seats.abandoned.load(Ordering::Acquire) != 0 && Instant::now() < guard {
            std::thread::yield_now();
        }
        assert_eq!(s.seats.abandoned.load(Ordering::Acquire), 0);
        assert_eq!(s.stats().instances_replaced(), 1);
        s.shutdown();
    }

    /// Answers every batch and reports a worker that keeps dying.
    struct Reporting(Doubler);

    impl Instance for Reporting {
        fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
            self.0.execute(inputs, clock)
        }

        fn report(&mut self) -> InstanceReport {
            InstanceReport {
                restarts: 2,
                resident_bytes: Some(4096),
                unavailable: Some("its worker kept dying".into()),
            }
        }
    }

    #[tokio::test]
    async fn an_instance_report_feeds_the_metrics_and_can_mark_the_version_unavailable() {
        let (seen_tx, _seen) = crossbeam_channel::unbounded();
        let inst = Reporting(Doubler { seen: seen_tx, gate: None, fail_on: None });
        let s = Scheduler::start(spec(0), config(0, 10), vec![Box::new(inst)]).unwrap();
        assert_eq!(values(s.submit(request(&[1.0])).unwrap().await.unwrap()), vec![2.0]);
        let refused = loop {
            match s.submit(request(&[2.0])) {
                Err(e) => break e,
                Ok(rx) => assert!(matches!(
                    rx.await.unwrap().map_err(ServeError::from),
                    Err(ServeError::Unavailable(_)) | Ok(_)
                )),
            }
        };
        assert!(refused.to_string().contains("is unavailable: its worker kept dying"), "{refused}");
        assert_eq!(s.broken(), Some("its worker kept dying"));
        assert!(s.stats().instance_restarts() >= 2);
        assert_eq!(s.stats().instance_resident_bytes(), vec![(0, 4096)]);
        s.shutdown();
    }

    #[tokio::test]
    async fn a_bounded_shutdown_abandons_a_stuck_instance_and_answers_everything() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded::<()>();
        let stuck = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: None };
        let s = Scheduler::start(spec(0), config(0, 10), vec![Box::new(stuck)]).unwrap();
        let running = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        let queued: Vec<_> = (0..3).map(|i| s.submit(request(&[i as f32])).unwrap()).collect();
        // The deadline has passed: the queue is answered at once and the stuck thread is left.
        assert_eq!(s.shutdown_by(Some(Instant::now())), 1);
        for rx in queued {
            let err = rx.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("shut down before this request ran"), "{err}");
        }
        let err = running.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("still executing"), "{err}");
        drop(gate_tx);
    }

    #[tokio::test]
    async fn a_huge_queue_delay_waits_for_a_full_batch_instead_of_overflowing_the_clock() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let mut cfg = config(2, 10);
        cfg.policy.max_queue_delay = Duration::MAX;
        let s = Scheduler::start(spec(2), cfg, vec![Box::new(Doubler { seen: seen_tx, gate: None, fail_on: None })])
            .unwrap();
        let a = s.submit(request(&[1.0])).unwrap();
        let b = s.submit(request(&[2.0])).unwrap();
        assert_eq!(values(a.await.unwrap()), vec![2.0]);
        assert_eq!(values(b.await.unwrap()), vec![4.0]);
        assert_eq!(seen.recv().unwrap(), 2);
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_hung_instance() {
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (_gate_tx, gate_rx) = crossbeam_channel::unbounded::<()>();
        let hung = Doubler { seen: seen_tx, gate: Some(gate_rx), fail_on: None };
        let (cfg, clock) = timed(300);
        let s = Scheduler::start_with(spec(0), cfg, vec![Box::new(hung)], None).unwrap();
        let reply = s.submit(request(&[1.0])).unwrap();
        seen.recv().unwrap();
        // Never released: shutdown waits for the watchdog to fail the batch, not for the model.
        let stopper = std::thread::spawn({
            let s = s.clone();
            move || s.shutdown()
        });
        clock.advance(Duration::from_millis(300));
        stopper.join().unwrap();
        assert!(matches!(reply.await.unwrap().map_err(ServeError::from), Err(ServeError::ExecutionTimeout(_))));
    }
}
