//! `fastserve-loadgen`: a load generator for KServe V2 servers on the loopback interface.
//!
//! Closed loop (default): `--concurrency` workers, each with its own keep-alive connection, send
//! the next request as soon as the previous one is answered. Open loop (`--rate R`): the same
//! workers share a fixed schedule of R requests/s, and a request's latency counts from the moment
//! it was scheduled, so a server that falls behind shows its queueing (no coordinated omission).
//!
//! Every run is bounded by `--duration-s` (plus `--warmup-s`) and by `--max-requests`; only
//! 127.0.0.1 is accepted as a target.

mod args;
mod idle;
mod proto;
mod target;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::{Args, Mode};
use crate::target::Client;

/// What one worker measured after the warmup.
struct WorkerReport {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 120 s at 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

struct Shared {
    args: Args,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Requests started, all workers together: bounds the run by count.
    started: AtomicU64,
    /// Open loop: the next slot in the global schedule.
    next_slot: AtomicU64,
}

async fn worker(shared: Arc<Shared>, id: usize) -> WorkerReport {
    let args = &shared.args;
    let mut report = WorkerReport { histogram: new_histogram(), ok: 0, errors: 0, error_samples: Vec::new() };
    let mut client: Option<Client> = None;
    let mut connect_failures = 0u32;
    loop {
        // Bounded by count, then by time.
        if shared.started.fetch_add(1, Ordering::Relaxed) >= args.max_requests {
            break;
        }
        let scheduled = match args.mode {
            Mode::Closed => Instant::now(),
            Mode::Open { rate } => {
                let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed);
                let at = shared.start + Duration::from_secs_f64(slot as f64 / rate);
                if at >= shared.end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
        };
        if scheduled >= shared.end {
            break;
        }
        if client.is_none() {
            match Client::connect(args).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    connect_failures += 1;
                    record_error(&mut report, scheduled, &shared, format!("worker {id} connect: {e}"));
                    if connect_failures > 20 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        let timeout = Duration::from_secs_f64(args.timeout_s);
        let result = match tokio::time::timeout(timeout, c.infer()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:.1} s", args.timeout_s)),
        };
        let done = Instant::now();
        match result {
            Ok(()) => {
                if scheduled >= shared.measure_from {
                    report.ok += 1;
                    let us = done.duration_since(scheduled).as_micros().max(1) as u64;
                    report.histogram.saturating_record(us);
                }
            }
            Err(e) => {
                record_error(&mut report, scheduled, &shared, e);
                // The connection may be broken: start a fresh one.
                client = None;
            }
        }
    }
    report
}

fn record_error(report: &mut WorkerReport, at: Instant, shared: &Shared, message: String) {
    if at >= shared.measure_from {
        report.errors += 1;
        if report.error_samples.len() < 3 {
            report.error_samples.push(message);
        }
    }
}

async fn run_load(args: Args) -> Result<serde_json::Value, String> {
    // Fail fast (and once) if the target is not there, with a useful message.
    Client::connect(&args).await.map_err(|e| format!("cannot reach {}: {e}", args.url))?.infer().await?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup_s);
    let end = measure_from + Duration::from_secs_f64(args.duration_s);
    let shared = Arc::new(Shared {
        args: args.clone(),
        start,
        measure_from,
        end,
        started: AtomicU64::new(0),
        next_slot: AtomicU64::new(0),
    });
    let handles: Vec<_> = (0..args.concurrency).map(|id| tokio::spawn(worker(Arc::clone(&shared), id))).collect();
    let mut histogram = new_histogram();
    let (mut ok, mut errors, mut samples) = (0u64, 0u64, Vec::new());
    for h in handles {
        let r = h.await.map_err(|e| format!("worker panicked: {e}"))?;
        histogram.add(&r.histogram).map_err(|e| e.to_string())?;
        ok += r.ok;
        errors += r.errors;
        samples.extend(r.error_samples);
    }
    // Measured window: from the end of the warmup to when the last worker finished (at most a
    // request's latency past `end`), or less when the count bound stopped the run early.
    let elapsed = Instant::now().saturating_duration_since(measure_from).as_secs_f64().max(1e-9);
    samples.truncate(5);
    let q = |p: f64| if histogram.is_empty() { 0 } else { histogram.value_at_quantile(p) };
    Ok(serde_json::json!({
        "protocol": args.protocol.name(),
        "url": args.url,
        "model": args.model,
        "mode": match args.mode { Mode::Closed => "closed", Mode::Open { .. } => "open" },
        "rate": match args.mode { Mode::Closed => None, Mode::Open { rate } => Some(rate) },
        "concurrency": args.concurrency,
        "rows": args.rows,
        "warmup_s": args.warmup_s,
        "duration_s": elapsed,
        "requests": ok,
        "errors": errors,
        "error_samples": samples,
        "requests_per_s": ok as f64 / elapsed,
        "rows_per_s": (ok * args.rows as u64) as f64 / elapsed,
        "latency_us": {
            "mean": if histogram.is_empty() { 0.0 } else { histogram.mean() },
            "p50": q(0.50),
            "p90": q(0.90),
            "p99": q(0.99),
            "max": histogram.max(),
        },
    }))
}

fn print_report(v: &serde_json::Value, json: bool) {
    if json || v.get("latency_us").is_none() {
        println!("{v}");
        return;
    }
    let l = &v["latency_us"];
    println!(
        "{} c={} rows={}: {:.1} req/s, {:.1} rows/s, latency p50 {} µs p90 {} µs p99 {} µs max {} µs, {} errors",
        v["protocol"].as_str().unwrap_or("?"),
        v["concurrency"],
        v["rows"],
        v["requests_per_s"].as_f64().unwrap_or(0.0),
        v["rows_per_s"].as_f64().unwrap_or(0.0),
        l["p50"],
        l["p90"],
        l["p99"],
        l["max"],
        v["errors"],
    );
    if let Some(samples) = v["error_samples"].as_array() {
        for s in samples {
            println!("  error: {}", s.as_str().unwrap_or("?"));
        }
    }
}

fn main() {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fastserve-loadgen: {e}\n\n{}", args::USAGE);
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        if let Some(n) = args.idle_connections {
            idle::hold(&args, n).await
        } else {
            run_load(args.clone()).await
        }
    });
    match result {
        Ok(v) => print_report(&v, args.json),
        Err(e) => {
            eprintln!("fastserve-loadgen: {e}");
            std::process::exit(1);
        }
    }
    // Do not wait for idle connections' tasks: the process is done.
    runtime.shutdown_timeout(Duration::from_millis(100));
}
