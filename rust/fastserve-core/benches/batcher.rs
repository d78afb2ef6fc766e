//! Queue and batcher micro-benchmarks: planning a batch, concatenating inputs and splitting
//! outputs, and a full round trip of 64 single-row requests through a `Scheduler` (crossbeam
//! queue, batcher thread, instance thread, oneshot replies) with a model that does nothing.

// A benchmark stops at the first surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use fastserve_core::request::InferRequest;
use fastserve_core::scheduler::plan::{concat_inputs, plan_batch, split_outputs, BatchPolicy, Batchable};
use fastserve_core::scheduler::{Instance, PhaseClock, Scheduler, SchedulerConfig};
use fastserve_core::spec::{ModelSpec, TensorSpec};
use fastserve_core::{DataType, Result, Tensor, TensorData};

const FEATURES: usize = 64;

fn row(rows: usize, features: usize) -> Tensor {
    let data = Bytes::from(vec![0u8; rows * features * 4]);
    Tensor::new("INPUT0", DataType::Fp32, vec![rows, features], TensorData::Raw(data)).unwrap()
}

struct Queued(Vec<Tensor>);

impl Batchable for Queued {
    fn rows(&self) -> usize {
        self.0[0].shape[0]
    }
    fn inputs(&self) -> &[Tensor] {
        &self.0
    }
}

fn policy(max: usize) -> BatchPolicy {
    BatchPolicy { max_batch_size: max, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] }
}

/// Answers ten zeros per row: as cheap as a model can be, so the benchmark measures the plumbing.
struct Zeros;

impl Instance for Zeros {
    fn execute(&mut self, inputs: Vec<Tensor>, _clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
        let rows = inputs[0].shape[0];
        let out = Bytes::from(vec![0u8; rows * 10 * 4]);
        Ok(vec![Tensor::new("OUTPUT0", DataType::Fp32, vec![rows, 10], TensorData::Raw(out))?])
    }
}

fn bench_batcher(c: &mut Criterion) {
    let queue: Vec<Queued> = (0..64).map(|_| Queued(vec![row(1, FEATURES)])).collect();
    c.bench_function("plan_batch/64 queued x 1 row", |b| b.iter(|| plan_batch(&queue, &policy(64), false)));

    let inputs: Vec<Vec<Tensor>> = (0..64).map(|_| vec![row(1, FEATURES)]).collect();
    let refs: Vec<&[Tensor]> = inputs.iter().map(Vec::as_slice).collect();
    c.bench_function("concat_inputs/64 x [1,64] fp32", |b| b.iter(|| concat_inputs(&refs).unwrap()));

    let outputs = vec![row(64, 10)];
    let rows = vec![1usize; 64];
    c.bench_function("split_outputs/[64,10] into 64", |b| b.iter(|| split_outputs(&outputs, &rows).unwrap()));
}

fn bench_scheduler(c: &mut Criterion) {
    let spec = Arc::new(ModelSpec {
        name: "zeros".into(),
        version: 1,
        platform: "bench".into(),
        max_batch_size: 64,
        decoupled: false,
        inputs: vec![TensorSpec::new("INPUT0", DataType::Fp32, vec![FEATURES as i64])],
        outputs: vec![TensorSpec::new("OUTPUT0", DataType::Fp32, vec![10])],
    });
    let config = SchedulerConfig::new(policy(64), 4096);
    let scheduler = Scheduler::start(spec, config, vec![Box::new(Zeros)]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for n in [1usize, 64] {
        c.bench_function(&format!("scheduler/round trip {n} x 1-row requests"), |b| {
            b.iter_batched(
                || (0..n).map(|_| InferRequest { inputs: vec![row(1, FEATURES)], ..Default::default() }).collect(),
                |requests: Vec<InferRequest>| {
                    runtime.block_on(async {
                        let replies: Vec<_> = requests
                            .into_iter()
                            .map(|r| {
                                let s = scheduler.clone();
                                tokio::spawn(async move {
                                    let mut r = r;
                                    let validated = s.spec().validate(&mut r)?;
                                    s.submit(validated)?
                                        .await
                                        .map_err(|_| fastserve_core::ServeError::Internal("dropped".into()))?
                                })
                            })
                            .collect();
                        for r in replies {
                            r.await.unwrap().unwrap();
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    scheduler.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench_batcher, bench_scheduler
}
criterion_main!(benches);
