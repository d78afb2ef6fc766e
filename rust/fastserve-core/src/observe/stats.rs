//! Per model version statistics, recorded on the request path with relaxed atomics only (no locks,
//! no Python). The Prometheus endpoint and the statistics API both read these at request time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::error::ServeError;

/// Upper bounds (seconds) of the latency histograms.
pub const DURATION_BUCKETS_S: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Failure reasons, the `reason` label of `fastserve_request_failure_total`.
pub const FAILURE_REASONS: [&str; 10] = [
    "bad_request",
    "not_found",
    "unavailable",
    "queue_full",
    "model_error",
    "timeout",
    "execution_timeout",
    "forbidden",
    "cancelled",
    "internal",
];

pub fn failure_reason_index(e: &ServeError) -> usize {
    FAILURE_REASONS.iter().position(|r| *r == e.reason()).unwrap_or(FAILURE_REASONS.len() - 1)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A count and a total duration, as Triton's statistics report them.
#[derive(Default)]
pub struct Timed {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Timed {
    pub fn add(&self, count: u64, d: Duration) {
        self.count.fetch_add(count, Relaxed);
        self.ns.fetch_add(nanos(d), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn ns(&self) -> u64 {
        self.ns.load(Relaxed)
    }

    fn json(&self) -> Value {
        json!({ "count": self.count(), "ns": self.ns() })
    }
}

/// A fixed-bucket latency histogram: one atomic per bucket.
pub struct Histogram {
    bounds_ns: Vec<u64>,
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds_ns: Vec<u64> = DURATION_BUCKETS_S.iter().map(|s| (s * 1e9) as u64).collect();
        let counts = (0..=bounds_ns.len()).map(|_| AtomicU64::new(0)).collect();
        Self { bounds_ns, counts, sum_ns: AtomicU64::new(0) }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = nanos(d);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// `(sum in seconds, count, per-bucket counts with upper bounds)`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS_S.iter().copied().zip(counts.iter().copied()).collect();
        buckets.push((f64::INFINITY, counts[counts.len() - 1]));
        (self.sum_ns.load(Relaxed) as f64 / 1e9, counts.iter().sum(), buckets)
    }
}

/// Per batch size: how many batches and how long their phases took.
#[derive(Default)]
pub struct BatchSlot {
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
}

/// Response indexes of a decoupled model's streams with their own `response_stats` entry; later
/// responses count in the totals and histograms only, so a long stream cannot grow the map.
pub const MAX_RESPONSE_INDEXES: usize = 1024;

/// The responses at one index of decoupled streams (Triton's `InferResponseStatistics`).
#[derive(Default)]
pub struct ResponseSlot {
    /// The model's time to produce the response, from the previous one sent (or the start of
    /// execution), not counting waits for the reader.
    pub compute_infer: Timed,
    /// Responses sent, with the time from the previous one sent (or the start of execution).
    pub success: Timed,
    /// Streams that ended with an error at this index.
    pub fail: Timed,
    /// Streams whose client went away after this many responses.
    pub cancel: Timed,
}

/// How one response of a stream went, for [`ModelStats::record_response`].
#[derive(Debug, Clone, Copy)]
pub struct ResponseTiming {
    /// Its position in the stream (0: the first).
    pub index: usize,
    /// Producing it, from the previous response sent (or the start of execution).
    pub compute: Duration,
    /// Producing and handing it over, waits for a slow reader included.
    pub total: Duration,
    /// Since the request was queued (first response) or since the previous response was produced.
    pub since: Duration,
}

/// How one batch spent in each compute phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

impl Phases {
    pub fn total(&self) -> Duration {
        self.input + self.infer + self.output
    }
}

pub struct ModelStats {
    pub success: Timed,
    pub fail: Timed,
    pub queue: Timed,
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
    failures: [AtomicU64; FAILURE_REASONS.len()],
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    cancelled: AtomicU64,
    responses: AtomicU64,
    active_sequences: AtomicU64,
    sequences_idle_released: AtomicU64,
    instances_replaced: AtomicU64,
    batches_split: AtomicU64,
    instance_restarts: AtomicU64,
    /// Resident memory of each instance's worker process (process isolation), by instance.
    instance_resident: RwLock<BTreeMap<usize, u64>>,
    last_inference_ms: AtomicU64,
    /// Decoupled streams by response index (sparse, at most [`MAX_RESPONSE_INDEXES`]).
    response_slots: RwLock<BTreeMap<usize, Arc<ResponseSlot>>>,
    /// Batch size → its slot, for the sizes seen so far: never sized by `max_batch_size`, so a
    /// large configured limit costs nothing until batches that large run.
    batches: RwLock<BTreeMap<usize, Arc<BatchSlot>>>,
    histograms_on: AtomicBool,
    pub request_hist: Histogram,
    pub queue_hist: Histogram,
    pub compute_input_hist: Histogram,
    pub compute_infer_hist: Histogram,
    pub compute_output_hist: Histogram,
    pub first_response_hist: Histogram,
    pub inter_response_hist: Histogram,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelStats {
    pub fn new() -> Self {
        Self {
            success: Timed::default(),
            fail: Timed::default(),
            queue: Timed::default(),
            compute_input: Timed::default(),
            compute_infer: Timed::default(),
            compute_output: Timed::default(),
            failures: Default::default(),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            sequences_idle_released: AtomicU64::new(0),
            instances_replaced: AtomicU64::new(0),
            batches_split: AtomicU64::new(0),
            instance_restarts: AtomicU64::new(0),
            instance_resident: RwLock::default(),
            last_inference_ms: AtomicU64::new(0),
            response_slots: RwLock::default(),
            batches: RwLock::default(),
            histograms_on: AtomicBool::new(true),
            request_hist: Histogram::default(),
            queue_hist: Histogram::default(),
            compute_input_hist: Histogram::default(),
            compute_infer_hist: Histogram::default(),
            compute_output_hist: Histogram::default(),
            first_response_hist: Histogram::default(),
            inter_response_hist: Histogram::default(),
        }
    }

    /// Histograms only feed `/metrics`; without that endpoint they are skipped.
    pub fn set_histograms(&self, on: bool) {
        self.histograms_on.store(on, Relaxed);
    }

    fn histograms(&self) -> bool {
        self.histograms_on.load(Relaxed)
    }

    /// One executed batch of `rows` rows made of requests that waited `queue_waits`.
    pub fn record_batch(&self, rows: usize, queue_waits: &[Duration], phases: Phases) {
        let requests = queue_waits.len() as u64;
        self.execution_count.fetch_add(1, Relaxed);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_inference_ms.store(now_ms, Relaxed);
        let histograms = self.histograms();
        for &wait in queue_waits {
            self.queue.add(1, wait);
            if histograms {
                self.queue_hist.observe(wait);
            }
        }
        // Like Triton, each request in the batch is charged the batch's compute time.
        self.compute_input.add(requests, phases.input * requests as u32);
        self.compute_infer.add(requests, phases.infer * requests as u32);
        self.compute_output.add(requests, phases.output * requests as u32);
        if histograms {
            for _ in 0..requests {
                self.compute_input_hist.observe(phases.input);
                self.compute_infer_hist.observe(phases.infer);
                self.compute_output_hist.observe(phases.output);
            }
        }
        let slot = self.batch_slot(rows);
        slot.compute_input.add(1, phases.input);
        slot.compute_infer.add(1, phases.infer);
        slot.compute_output.add(1, phases.output);
    }

    fn batch_slot(&self, rows: usize) -> Arc<BatchSlot> {
        let seen = self.batches.read().unwrap_or_else(|p| p.into_inner()).get(&rows).cloned();
        seen.unwrap_or_else(|| self.batches.write().unwrap_or_else(|p| p.into_inner()).entry(rows).or_default().clone())
    }

    /// The end of one request, as its front end saw it.
    pub fn record_request(&self, outcome: Result<(), &ServeError>, elapsed: Duration) {
        match outcome {
            Ok(()) => self.success.add(1, elapsed),
            Err(e) => {
                self.fail.add(1, elapsed);
                self.failures[failure_reason_index(e)].fetch_add(1, Relaxed);
            }
        }
        if self.histograms() {
            self.request_hist.observe(elapsed);
        }
    }

    /// Requests whose client went away: dropped unrun from the queue, or streams stopped early.
    pub fn record_cancelled(&self, n: usize) {
        self.cancelled.fetch_add(n as u64, Relaxed);
    }

    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Relaxed)
    }

    /// Sequences live now (sequence batching).
    pub fn set_active_sequences(&self, n: usize) {
        self.active_sequences.store(n as u64, Relaxed);
    }

    pub fn active_sequences(&self) -> u64 {
        self.active_sequences.load(Relaxed)
    }

    /// A sequence released after `max_sequence_idle_microseconds` without a request.
    pub fn record_sequence_idle(&self) {
        self.sequences_idle_released.fetch_add(1, Relaxed);
    }

    pub fn sequences_idle_released(&self) -> u64 {
        self.sequences_idle_released.load(Relaxed)
    }

    /// Answers of ordinary requests (one each).
    pub fn record_responses(&self, n: usize) {
        self.responses.fetch_add(n as u64, Relaxed);
    }

    /// One response of a decoupled stream, handed to its front end.
    pub fn record_response(&self, t: ResponseTiming) {
        self.responses.fetch_add(1, Relaxed);
        if self.histograms() {
            let hist = if t.index == 0 { &self.first_response_hist } else { &self.inter_response_hist };
            hist.observe(t.since);
        }
        if let Some(slot) = self.response_slot(t.index) {
            slot.compute_infer.add(1, t.compute);
            slot.success.add(1, t.total);
        }
    }

    /// A decoupled stream that ended after `sent` responses: with an error, or cancelled.
    pub fn record_stream_end(&self, sent: usize, outcome: Result<(), &ServeError>, elapsed: Duration) {
        let Err(e) = outcome else { return };
        if let Some(slot) = self.response_slot(sent) {
            match e {
                ServeError::Cancelled(_) => slot.cancel.add(1, elapsed),
                _ => slot.fail.add(1, elapsed),
            }
        }
    }

    /// Responses sent, all models (ordinary requests count one each).
    pub fn responses(&self) -> u64 {
        self.responses.load(Relaxed)
    }

    fn response_slot(&self, index: usize) -> Option<Arc<ResponseSlot>> {
        if index >= MAX_RESPONSE_INDEXES {
            return None;
        }
        let seen = self.response_slots.read().unwrap_or_else(|p| p.into_inner()).get(&index).cloned();
        Some(seen.unwrap_or_else(|| {
            self.response_slots.write().unwrap_or_else(|p| p.into_inner()).entry(index).or_default().clone()
        }))
    }

    /// `(response index, its statistics)` of decoupled streams so far, first response first.
    pub fn response_indexes(&self) -> Vec<(usize, Arc<ResponseSlot>)> {
        let slots = self.response_slots.read().unwrap_or_else(|p| p.into_inner());
        slots.iter().map(|(&i, slot)| (i, slot.clone())).collect()
    }

    /// An instance abandoned after `execution_timeout_ms` and started afresh.
    pub fn record_instance_replaced(&self) {
        self.instances_replaced.fetch_add(1, Relaxed);
    }

    pub fn instances_replaced(&self) -> u64 {
        self.instances_replaced.load(Relaxed)
    }

    /// A failed batch of several requests run again one request at a time.
    pub fn record_batch_split(&self) {
        self.batches_split.fetch_add(1, Relaxed);
    }

    pub fn batches_split(&self) -> u64 {
        self.batches_split.load(Relaxed)
    }

    /// Worker processes of process-isolated instances started again after one exited.
    pub fn record_instance_restarts(&self, n: u64) {
        self.instance_restarts.fetch_add(n, Relaxed);
    }

    pub fn instance_restarts(&self) -> u64 {
        self.instance_restarts.load(Relaxed)
    }

    /// The resident memory of instance `seat`'s worker process, as it last reported it.
    pub fn set_instance_resident_bytes(&self, seat: usize, bytes: u64) {
        self.instance_resident.write().unwrap_or_else(|p| p.into_inner()).insert(seat, bytes);
    }

    /// Each worker process's resident memory, by instance.
    pub fn instance_resident_bytes(&self) -> Vec<(usize, u64)> {
        self.instance_resident.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(s, b)| (*s, *b)).collect()
    }

    pub fn failures(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FAILURE_REASONS.iter().zip(&self.failures).map(|(r, c)| (*r, c.load(Relaxed)))
    }

    /// Milliseconds since the epoch of the last executed batch (0: none yet).
    pub fn last_inference_ms(&self) -> u64 {
        self.last_inference_ms.load(Relaxed)
    }

    pub fn inference_count(&self) -> u64 {
        self.inference_count.load(Relaxed)
    }

    pub fn execution_count(&self) -> u64 {
        self.execution_count.load(Relaxed)
    }

    /// `(batch size, its statistics)` for every size executed so far, smallest first.
    pub fn batch_sizes(&self) -> Vec<(usize, Arc<BatchSlot>)> {
        let batches = self.batches.read().unwrap_or_else(|p| p.into_inner());
        batches.iter().map(|(&n, slot)| (n, slot.clone())).collect()
    }

    /// One entry of the statistics API's `model_stats`, in Triton's shape.
    pub fn to_json(&self, name: &str, version: u64) -> Value {
        let batch_stats: Vec<Value> = self
            .batch_sizes()
            .into_iter()
            .map(|(size, s)| {
                json!({
                    "batch_size": size,
                    "compute_input": s.compute_input.json(),
                    "compute_infer": s.compute_infer.json(),
                    "compute_output": s.compute_output.json(),
                })
            })
            .collect();
        let zero = json!({ "count": 0, "ns": 0 });
        let response_stats: serde_json::Map<String, Value> = self
            .response_indexes()
            .into_iter()
            .map(|(i, s)| {
                let entry = json!({
                    "compute_infer": s.compute_infer.json(),
                    "success": s.success.json(),
                    "fail": s.fail.json(),
                    "cancel": s.cancel.json(),
                });
                (i.to_string(), entry)
            })
            .collect();
        json!({
            "name": name,
            "version": version.to_string(),
            "last_inference": self.last_inference_ms(),
            "inference_count": self.inference_count(),
            "execution_count": self.execution_count(),
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": batch_stats,
            "response_stats": response_stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(60));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.00011).abs() < 1e-9);
        assert_eq!(buckets[0], (0.00005, 1), "50µs is inside the first bucket (le=5e-5)");
        assert_eq!(buckets[1], (0.0001, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
    }

    #[test]
    fn batches_and_requests_are_counted_like_triton() {
        let s = ModelStats::new();
        let phases =
            Phases { input: Duration::from_micros(1), infer: Duration::from_micros(10), output: Duration::ZERO };
        s.record_batch(3, &[Duration::from_micros(5), Duration::from_micros(7)], phases);
        s.record_request(Ok(()), Duration::from_micros(30));
        s.record_request(Err(&ServeError::QueueFull("x".into())), Duration::from_micros(1));
        let v = s.to_json("m", 2);
        assert_eq!(v["version"], "2");
        assert_eq!(v["inference_count"], 3);
        assert_eq!(v["execution_count"], 1);
        assert_eq!(v["inference_stats"]["queue"], json!({"count": 2, "ns": 12_000}));
        assert_eq!(v["inference_stats"]["compute_infer"], json!({"count": 2, "ns": 20_000}));
        assert_eq!(v["inference_stats"]["success"]["count"], 1);
        assert_eq!(v["inference_stats"]["fail"]["count"], 1);
        assert_eq!(v["batch_stats"][0]["batch_size"], 3);
        assert_eq!(v["batch_stats"][0]["compute_infer"], json!({"count": 1, "ns": 10_000}));
        let failures: Vec<_> = s.failures().filter(|(_, c)| *c > 0).collect();
        assert_eq!(failures, vec![("queue_full", 1)]);
    }
}
