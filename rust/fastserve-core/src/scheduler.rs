//! One model version's execution engine: a bounded request queue, a batcher thread that forms
//! batches when an instance is free, and one thread per model instance.
//!
//! Requests arrive from async handlers through a lock-free channel and get their answer through a
//! oneshot, so no tokio worker ever waits on a model. Batches are formed only when an instance is
//! idle, so under load requests pile up and batches grow without an artificial delay.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use crate::batcher::{concat_inputs, plan_batch, split_outputs, BatchPolicy, Batchable};
use crate::error::{Result, ServeError};
use crate::spec::{ModelSpec, ValidatedRequest};
use crate::stats::{ModelStats, Phases};
use crate::tensor::Tensor;

/// A loaded copy of a model. Each instance is driven by one thread, so it needs no locking.
pub trait Instance: Send + 'static {
    /// Runs one batch (batch dimension first when the model batches) and returns every output.
    /// Marking `clock` splits the time into input conversion, the model itself, and output reading.
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>>;
}

/// Timestamps an instance sets around the model call; unmarked time counts as inference.
pub struct PhaseClock {
    start: Instant,
    infer_start: Option<Instant>,
    infer_end: Option<Instant>,
}

impl PhaseClock {
    fn new() -> Self {
        Self { start: Instant::now(), infer_start: None, infer_end: None }
    }

    pub fn infer_started(&mut self) {
        self.infer_start = Some(Instant::now());
    }

    pub fn infer_finished(&mut self) {
        self.infer_end = Some(Instant::now());
    }

    fn phases(&self, end: Instant) -> Phases {
        let infer_start = self.infer_start.unwrap_or(self.start);
        let infer_end = self.infer_end.unwrap_or(end).max(infer_start);
        Phases {
            input: infer_start - self.start,
            infer: infer_end - infer_start,
            output: end.saturating_duration_since(infer_end),
        }
    }
}

/// A request's answer: the model's outputs for its own rows, and how it was served.
#[derive(Debug)]
pub struct Executed {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    pub phases: Phases,
    /// Rows in the batch the request ran in.
    pub batch_size: usize,
}

pub type Reply = Result<Executed>;

/// Queue settings beyond batching.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub policy: BatchPolicy,
    /// Requests waiting beyond this are refused at once with `QueueFull`.
    pub max_queue_size: usize,
}

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    reply: oneshot::Sender<Reply>,
    enqueued: Instant,
}

impl Batchable for Job {
    fn rows(&self) -> usize {
        self.rows
    }
    fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }
}

enum Msg {
    Job(Job),
    /// Stop admitting; finish what is queued, then exit.
    Close,
}

pub struct Scheduler {
    spec: Arc<ModelSpec>,
    stats: Arc<ModelStats>,
    tx: Sender<Msg>,
    queued: Arc<AtomicUsize>,
    config: SchedulerConfig,
    closing: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the batcher and one thread per instance.
    pub fn start(
        spec: Arc<ModelSpec>,
        config: SchedulerConfig,
        instances: Vec<Box<dyn Instance>>,
    ) -> Result<Arc<Self>> {
        if instances.is_empty() {
            return Err(ServeError::Internal(format!("model '{}' has no instances", spec.name)));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let (idle_tx, idle_rx) = crossbeam_channel::unbounded();
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(instances.len());
        let queued = Arc::new(AtomicUsize::new(0));
        let label = format!("{}-v{}", spec.name, spec.version);
        let stats = Arc::new(ModelStats::new(spec.max_batch_size));
        let mut threads = Vec::with_capacity(instances.len() + 1);
        for (i, instance) in instances.into_iter().enumerate() {
            let (spec, stats, idle_tx, batch_rx) = (spec.clone(), stats.clone(), idle_tx.clone(), batch_rx.clone());
            threads.push(spawn(format!("fs-inst-{label}-{i}"), move || {
                instance_loop(instance, &spec, &stats, idle_tx, batch_rx)
            })?);
        }
        drop((idle_tx, batch_rx));
        let (policy, q) = (config.policy.clone(), queued.clone());
        threads.push(spawn(format!("fs-batch-{label}"), move || batcher_loop(rx, idle_rx, batch_tx, policy, q))?);
        Ok(Arc::new(Scheduler {
            spec,
            stats,
            tx,
            queued,
            config,
            closing: AtomicBool::new(false),
            threads: Mutex::new(threads),
        }))
    }

    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.spec
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

    /// Queues a validated request; refuses at once when the queue is full or the version is closing.
    pub fn submit(&self, request: ValidatedRequest) -> Result<oneshot::Receiver<Reply>> {
        if self.closing.load(Ordering::Acquire) {
            return Err(self.closing_error());
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.max_queue_size {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ServeError::QueueFull(format!(
                "model '{}' version {} has {} requests queued, its max_queue_size",
                self.spec.name, self.spec.version, self.config.max_queue_size
            )));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs: request.inputs, rows: request.rows, reply, enqueued: Instant::now() };
        if self.tx.send(Msg::Job(job)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.closing_error());
        }
        Ok(rx)
    }

    fn closing_error(&self) -> ServeError {
        ServeError::unavailable(format!("model '{}' version {} is unloading", self.spec.name, self.spec.version))
    }

    /// Stops admitting, runs everything already queued, and joins the threads. Idempotent.
    pub fn shutdown(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Msg::Close);
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| ServeError::Internal(format!("cannot start a model thread: {e}")))
}

/// Moves everything already waiting in the channel into the backlog without blocking.
fn pull_ready(rx: &Receiver<Msg>, backlog: &mut VecDeque<Job>, closing: &mut bool) {
    while let Ok(msg) = rx.try_recv() {
        match msg {
            Msg::Job(j) => backlog.push_back(j),
            Msg::Close => *closing = true,
        }
    }
}

fn batcher_loop(
    rx: Receiver<Msg>,
    idle_rx: Receiver<()>,
    batch_tx: Sender<Vec<Job>>,
    policy: BatchPolicy,
    queued: Arc<AtomicUsize>,
) {
    let mut backlog: VecDeque<Job> = VecDeque::new();
    let mut closing = false;
    let mut have_instance = false;
    loop {
        if backlog.is_empty() {
            let msg = if closing { rx.try_recv().ok() } else { rx.recv().ok() };
            match msg {
                Some(Msg::Job(j)) => backlog.push_back(j),
                Some(Msg::Close) => {
                    closing = true;
                    continue;
                }
                None => break,
            }
        }
        if !have_instance {
            if idle_rx.recv().is_err() {
                break;
            }
            have_instance = true;
        }
        pull_ready(&rx, &mut backlog, &mut closing);
        let plan = loop {
            let expired = closing || backlog[0].enqueued.elapsed() >= policy.max_queue_delay;
            let plan = plan_batch(backlog.make_contiguous(), &policy, expired);
            if plan.ready {
                break plan;
            }
            match rx.recv_deadline(backlog[0].enqueued + policy.max_queue_delay) {
                Ok(Msg::Job(j)) => {
                    backlog.push_back(j);
                    pull_ready(&rx, &mut backlog, &mut closing);
                }
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => closing = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
        };
        let mut jobs: Vec<Job> = plan.indices.iter().rev().filter_map(|&i| backlog.remove(i)).collect();
        jobs.reverse();
        queued.fetch_sub(jobs.len(), Ordering::AcqRel);
        // A client that went away gets nothing executed on its behalf.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        if batch_tx.send(jobs).is_err() {
            break;
        }
        have_instance = false;
    }
    for job in backlog {
        let _ = job.reply.send(Err(ServeError::unavailable("the model stopped before this request ran")));
    }
}

fn instance_loop(
    mut instance: Box<dyn Instance>,
    spec: &ModelSpec,
    stats: &ModelStats,
    idle_tx: Sender<()>,
    batch_rx: Receiver<Vec<Job>>,
) {
    loop {
        if idle_tx.send(()).is_err() {
            break;
        }
        let Ok(jobs) = batch_rx.recv() else { break };
        run_batch(instance.as_mut(), spec, stats, jobs);
    }
}

fn run_batch(instance: &mut dyn Instance, spec: &ModelSpec, stats: &ModelStats, mut jobs: Vec<Job>) {
    let mut clock = PhaseClock::new();
    let waits: Vec<Duration> = jobs.iter().map(|j| clock.start.saturating_duration_since(j.enqueued)).collect();
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let total: usize = rows.iter().sum();
    let mut per_job: Vec<Vec<Tensor>> = jobs.iter_mut().map(|j| std::mem::take(&mut j.inputs)).collect();
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Vec<Tensor>>> {
        let inputs = if per_job.len() == 1 {
            per_job.pop().unwrap_or_default()
        } else {
            let refs: Vec<&[Tensor]> = per_job.iter().map(Vec::as_slice).collect();
            concat_inputs(&refs)?
        };
        let outputs = instance.execute(inputs, &mut clock)?;
        spec.check_outputs(&outputs, total)?;
        if rows.len() == 1 {
            Ok(vec![outputs])
        } else {
            split_outputs(&outputs, &rows)
        }
    }))
    .unwrap_or_else(|_| Err(ServeError::Internal(format!("model '{}' panicked while executing", spec.name))));
    let phases = clock.phases(Instant::now());
    match result {
        Ok(outputs) => {
            stats.record_batch(total, &waits, phases);
            for ((job, outputs), queue) in jobs.into_iter().zip(outputs).zip(waits) {
                let _ = job.reply.send(Ok(Executed { outputs, queue, phases, batch_size: total }));
            }
        }
        Err(e) => {
            tracing::warn!(model = %spec.name, version = spec.version, batch_size = total, error = %e, "batch failed");
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datatype::DataType;
    use crate::spec::TensorSpec;
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

    fn spec(max_batch_size: usize) -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            name: "double".into(),
            version: 1,
            platform: "test".into(),
            max_batch_size,
            inputs: vec![TensorSpec::new("X", DataType::Fp32, vec![-1])],
            outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![-1])],
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
        SchedulerConfig {
            policy: BatchPolicy { max_batch_size: max, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] },
            max_queue_size,
        }
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
            s.stats().batch_sizes().map(|(n, b)| (n, b.compute_infer.count())).collect();
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
        assert_eq!(bad.await.unwrap().unwrap_err(), ServeError::ModelError("boom".into()));
        assert_eq!(values(good.await.unwrap()), vec![6.0]);
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
    }
}
