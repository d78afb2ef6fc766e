//! The hot-path cost of statistics and metrics: what one request and one batch of 16 pay to be
//! counted, with the Prometheus histograms on (`/metrics` served) and off (`--no-metrics`). The
//! difference is the per-request price of the metrics endpoint, free of the noise an end-to-end A/B
//! run has on a small machine.

// A benchmark stops at the first surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use fastserve_core::observe::stats::{ModelStats, Phases};

fn bench_metrics(c: &mut Criterion) {
    let phases =
        Phases { input: Duration::from_micros(12), infer: Duration::from_micros(60), output: Duration::from_micros(9) };
    let waits = [Duration::from_micros(30); 16];
    for on in [true, false] {
        let stats = ModelStats::new();
        stats.set_histograms(on);
        let label = if on { "metrics on" } else { "metrics off" };
        c.bench_function(&format!("record 1 request + batch of 1/{label}"), |b| {
            b.iter(|| {
                stats.record_batch(1, &waits[..1], phases);
                stats.record_request(Ok(()), Duration::from_micros(150));
            })
        });
        c.bench_function(&format!("record 16 requests + batch of 16/{label}"), |b| {
            b.iter(|| {
                stats.record_batch(16, &waits, phases);
                for _ in 0..16 {
                    stats.record_request(Ok(()), Duration::from_micros(150));
                }
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench_metrics
}
criterion_main!(benches);
