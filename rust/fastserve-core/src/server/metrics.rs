//! The Prometheus endpoint. Request-path counting lives in `observe::stats` (per model version)
//! and `observe::transport` (per protocol), all plain atomics; this module only reads them when
//! scraped and encodes with `prometheus-client` (Prometheus text, or OpenMetrics on request).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

use nvml_wrapper::Nvml;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry as MetricRegistry;

use crate::observe::stats::{Histogram, ModelStats};
use crate::observe::transport::Protocol;
use crate::registry::VersionState;
use crate::server::state::ServerState;

/// Encodes everything the server knows at scrape time.
pub struct ServerCollector {
    state: Arc<ServerState>,
    host_cpu: Mutex<Option<(u64, u64)>>,
}

impl fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// The values of `fastserve_model_state`'s `state` label.
const MODEL_STATES: [&str; 4] = ["loading", "ready", "unavailable", "failed"];

const MODEL_STATE_HELP: &str = "1 for the state a model version is in (loading: its load is under way and it does not \
     serve yet; ready: serving; unavailable: registered but its instances stopped; failed: its last load failed), 0 \
     for the others.";

fn model_labels(name: &str, version: u64) -> Labels {
    vec![("model", name.to_string()), ("version", version.to_string())]
}

impl ServerCollector {
    pub fn registry(state: Arc<ServerState>) -> MetricRegistry {
        let mut registry = MetricRegistry::default();
        registry.register_collector(Box::new(ServerCollector { state, host_cpu: Mutex::new(None) }));
        registry
    }

    fn models(&self) -> Vec<(Labels, Arc<ModelStats>, usize)> {
        let mut out = Vec::new();
        for (name, entry) in self.state.registry.models() {
            for v in entry.versions.values() {
                if let VersionState::Ready(s) = &v.state {
                    out.push((model_labels(&name, v.version), s.stats().clone(), s.pending()));
                }
            }
        }
        out
    }

    /// One sample per model version and state: 1 for the state it is in, 0 for the others, so
    /// `fastserve_model_state{state="failed"} == 1` finds every version that failed to load.
    /// A version that serves while its replacement loads stays `ready`.
    fn model_states(&self) -> Vec<(Labels, f64)> {
        let mut current: BTreeMap<(String, u64), &str> =
            self.state.loading().into_iter().map(|key| (key, "loading")).collect();
        for (name, entry) in self.state.registry.models() {
            for v in entry.versions.values() {
                let state = match &v.state {
                    VersionState::Ready(s) if s.unavailable().is_none() => "ready",
                    VersionState::Ready(_) => "unavailable",
                    VersionState::Failed(_) => "failed",
                };
                let key = (name.clone(), v.version);
                if state == "ready" || !current.contains_key(&key) {
                    current.insert(key, state);
                }
            }
        }
        let mut out = Vec::new();
        for ((name, version), now) in current {
            for state in MODEL_STATES {
                let mut labels = model_labels(&name, version);
                labels.push(("state", state.to_string()));
                out.push((labels, f64::from(u8::from(state == now))));
            }
        }
        out
    }

    /// Host CPU utilization since the previous scrape, from /proc/stat (Linux).
    fn host_cpu_utilization(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
        let total: u64 = fields.iter().sum();
        let mut last = self.host_cpu.lock().unwrap_or_else(|p| p.into_inner());
        let previous = last.replace((idle, total));
        let (pidle, ptotal) = previous?;
        let dt = total.checked_sub(ptotal).filter(|d| *d > 0)?;
        Some(1.0 - (idle.saturating_sub(pidle)) as f64 / dt as f64)
    }
}

/// (cpu seconds, resident bytes) of this process, from /proc/self (Linux).
fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may contain spaces, start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    // Linux exposes CPU time in USER_HZ ticks, 100 per second on every architecture.
    Some((ticks as f64 / 100.0, rss_kib * 1024))
}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "NVML unavailable: no GPU metrics");
            None
        }
    })
    .as_ref()
}

struct GpuSample {
    uuid: String,
    utilization: Option<f64>,
    memory: Option<(u64, u64)>,
    power_watts: Option<f64>,
}

fn gpu_samples() -> Vec<GpuSample> {
    let Some(nvml) = nvml() else { return Vec::new() };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .filter_map(|d| {
            Some(GpuSample {
                uuid: d.uuid().ok()?,
                utilization: d.utilization_rates().ok().map(|u| u.gpu as f64 / 100.0),
                memory: d.memory_info().ok().map(|m| (m.used, m.total)),
                power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
            })
        })
        .collect()
}

fn histogram<'a>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    models: &[(Labels, Arc<ModelStats>, usize)],
    pick: impl Fn(&ModelStats) -> &Histogram,
) -> fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, stats, _) in models {
        let (sum, count, buckets) = pick(stats).snapshot();
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn counter<'a>(encoder: &mut DescriptorEncoder<'a>, name: &str, help: &str, samples: &[(Labels, u64)]) -> fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(labels)?.encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge<'a>(encoder: &mut DescriptorEncoder<'a>, name: &str, help: &str, samples: &[(Labels, f64)]) -> fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let models = self.models();
        let e = &mut encoder;
        let each = |f: &dyn Fn(&ModelStats) -> u64| -> Vec<(Labels, u64)> {
            models.iter().map(|(l, s, _)| (l.clone(), f(s))).collect()
        };
        counter(e, "fastserve_request_success", "Inference requests that succeeded.", &each(&|s| s.success.count()))?;
        let mut failures: Vec<(Labels, u64)> = Vec::new();
        for (labels, stats, _) in &models {
            for (reason, n) in stats.failures() {
                let mut l = labels.clone();
                l.push(("reason", reason.to_string()));
                failures.push((l, n));
            }
        }
        let unknown = self.state.transport.unknown_model.load(Relaxed);
        failures.push((
            vec![("model", String::new()), ("version", String::new()), ("reason", "not_found".into())],
            unknown,
        ));
        counter(e, "fastserve_request_failure", "Inference requests that failed, by reason.", &failures)?;
        counter(
            e,
            "fastserve_inference_count",
            "Rows inferred (a request may carry several).",
            &each(&|s| s.inference_count()),
        )?;
        counter(e, "fastserve_execution_count", "Batches executed by the model.", &each(&|s| s.execution_count()))?;
        counter(
            e,
            "fastserve_request_cancelled",
            "Requests whose client disconnected or cancelled: dropped unrun from the queue, or streams stopped early.",
            &each(&|s| s.cancelled()),
        )?;
        counter(
            e,
            "fastserve_responses",
            "Responses sent (one per ordinary request; any number per request of a decoupled model).",
            &each(&|s| s.responses()),
        )?;
        counter(
            e,
            "fastserve_instance_replaced",
            "Model instances abandoned after execution_timeout_ms and replaced.",
            &each(&|s| s.instances_replaced()),
        )?;
        counter(
            e,
            "fastserve_batch_split",
            "Failed batches of several requests run again one request at a time (isolate_batch_failures).",
            &each(&|s| s.batches_split()),
        )?;
        counter(
            e,
            "fastserve_instance_restarts",
            "Worker processes of process-isolated instances restarted after they exited (a crash, a kill).",
            &each(&|s| s.instance_restarts()),
        )?;
        let resident: Vec<(Labels, f64)> = models
            .iter()
            .flat_map(|(l, s, _)| {
                s.instance_resident_bytes().into_iter().map(move |(seat, bytes)| {
                    let mut labels = l.clone();
                    labels.push(("instance", seat.to_string()));
                    (labels, bytes as f64)
                })
            })
            .collect();
        gauge(
            e,
            "fastserve_instance_process_resident_bytes",
            "Resident memory of each process-isolated instance's worker process, as of its last batch.",
            &resident,
        )?;
        let load_failures: Vec<(Labels, u64)> = self
            .state
            .registry
            .load_failures()
            .into_iter()
            .map(|((name, version), n)| (model_labels(&name, version), n))
            .collect();
        counter(
            e,
            "fastserve_model_load_failure",
            "Model version loads that failed (a failed reload leaves the serving version in place).",
            &load_failures,
        )?;
        gauge(e, "fastserve_model_state", MODEL_STATE_HELP, &self.model_states())?;
        let build = vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("os", std::env::consts::OS.to_string()),
            ("arch", std::env::consts::ARCH.to_string()),
        ];
        gauge(e, "fastserve_build_info", "Always 1; the labels tell which build runs.", &[(build, 1.0)])?;
        let pending: Vec<(Labels, f64)> = models.iter().map(|(l, _, p)| (l.clone(), *p as f64)).collect();
        gauge(e, "fastserve_pending_requests", "Requests queued, waiting for an instance.", &pending)?;
        let sequences: Vec<(Labels, f64)> =
            models.iter().map(|(l, s, _)| (l.clone(), s.active_sequences() as f64)).collect();
        gauge(e, "fastserve_sequences_active", "Live sequences of sequence-batching models.", &sequences)?;
        counter(
            e,
            "fastserve_sequence_idle_released",
            "Sequences released after max_sequence_idle_microseconds without a request.",
            &each(&|s| s.sequences_idle_released()),
        )?;
        histogram(e, "fastserve_request_duration_seconds", "End-to-end inference request time.", &models, |s| {
            &s.request_hist
        })?;
        histogram(e, "fastserve_queue_duration_seconds", "Time requests waited in the queue.", &models, |s| {
            &s.queue_hist
        })?;
        histogram(
            e,
            "fastserve_compute_input_duration_seconds",
            "Batch assembly and input conversion time.",
            &models,
            |s| &s.compute_input_hist,
        )?;
        histogram(e, "fastserve_compute_infer_duration_seconds", "Model execution time.", &models, |s| {
            &s.compute_infer_hist
        })?;
        histogram(e, "fastserve_compute_output_duration_seconds", "Output conversion and split time.", &models, |s| {
            &s.compute_output_hist
        })?;
        histogram(
            e,
            "fastserve_first_response_duration_seconds",
            "Decoupled models: time from a request's arrival in the queue to its first response.",
            &models,
            |s| &s.first_response_hist,
        )?;
        histogram(
            e,
            "fastserve_inter_response_duration_seconds",
            "Decoupled models: time between consecutive responses of a request.",
            &models,
            |s| &s.inter_response_hist,
        )?;
        let mut m =
            e.encode_descriptor("fastserve_batch_size", "Rows per executed batch.", None, MetricType::Histogram)?;
        for (labels, stats, _) in &models {
            let mut bounds: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2)).take(16).collect();
            let sizes = stats.batch_sizes();
            let max = sizes.last().map_or(1, |(n, _)| *n);
            bounds.retain(|&b| b < max);
            bounds.push(max);
            let mut buckets: Vec<(f64, u64)> = bounds.iter().map(|&b| (b as f64, 0)).collect();
            buckets.push((f64::INFINITY, 0));
            let (mut sum, mut count) = (0.0, 0);
            for (size, slot) in &sizes {
                let size = *size;
                let n = slot.compute_infer.count();
                let i = bounds.partition_point(|&b| b < size);
                buckets[i].1 += n;
                sum += (size as u64 * n) as f64;
                count += n;
            }
            m.encode_family(labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let t = &self.state.transport;
        let open = vec![
            (vec![("protocol", "http".to_string())], t.open_http.load(Relaxed) as f64),
            (vec![("protocol", "grpc".to_string())], t.open_grpc.load(Relaxed) as f64),
        ];
        gauge(e, "fastserve_open_connections", "Open client connections.", &open)?;
        let by_protocol: Vec<(Labels, u64)> = Protocol::ALL
            .iter()
            .map(|p| (vec![("protocol", p.as_str().to_string())], t.requests[*p as usize].load(Relaxed)))
            .collect();
        counter(e, "fastserve_protocol_requests", "Inference requests by protocol.", &by_protocol)?;
        if let Some((cpu, rss)) = process_usage() {
            let mut m = e.encode_descriptor(
                "fastserve_process_cpu_seconds",
                "CPU time used by the server process.",
                None,
                MetricType::Counter,
            )?;
            m.encode_counter::<NoLabelSet, _, u64>(&cpu, None)?;
            gauge(
                e,
                "fastserve_process_resident_memory_bytes",
                "Resident memory of the server process.",
                &[(vec![], rss as f64)],
            )?;
        }
        if let Some(u) = self.host_cpu_utilization() {
            gauge(e, "fastserve_cpu_utilization_ratio", "Host CPU utilization since the last scrape.", &[(vec![], u)])?;
        }
        let gpus = gpu_samples();
        if !gpus.is_empty() {
            let by = |f: &dyn Fn(&GpuSample) -> Option<f64>| -> Vec<(Labels, f64)> {
                gpus.iter().filter_map(|g| Some((vec![("gpu_uuid", g.uuid.clone())], f(g)?))).collect()
            };
            gauge(e, "fastserve_gpu_utilization_ratio", "GPU utilization (0-1).", &by(&|g| g.utilization))?;
            gauge(e, "fastserve_gpu_memory_used_bytes", "GPU memory in use.", &by(&|g| g.memory.map(|m| m.0 as f64)))?;
            gauge(
                e,
                "fastserve_gpu_memory_total_bytes",
                "GPU memory in total.",
                &by(&|g| g.memory.map(|m| m.1 as f64)),
            )?;
            gauge(e, "fastserve_gpu_power_watts", "GPU power draw.", &by(&|g| g.power_watts))?;
        }
        Ok(())
    }
}

/// Encodes a scrape: OpenMetrics when the client asks for it, else Prometheus text 0.0.4.
pub fn encode(registry: &MetricRegistry, accept: &str) -> (String, &'static str) {
    let mut out = String::with_capacity(16 * 1024);
    if accept.contains("application/openmetrics-text") {
        let _ = prometheus_client::encoding::text::encode(&mut out, registry);
        (out, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
        (out, "text/plain; version=0.0.4; charset=utf-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ModelVersion, Registry};
    use crate::server::options::Limits;

    fn states(collector: &ServerCollector) -> Vec<(String, u64, String)> {
        let mut now: Vec<_> = collector
            .model_states()
            .into_iter()
            .filter(|(_, value)| *value == 1.0)
            .map(|(labels, _)| (labels[0].1.clone(), labels[1].1.parse().unwrap_or(0), labels[2].1.clone()))
            .collect();
        now.sort();
        now
    }

    #[test]
    fn a_version_whose_load_is_under_way_is_loading_until_it_serves_or_fails() {
        let registry = Arc::new(Registry::new());
        registry.insert(ModelVersion::failed("bad", 1, "bad file"));
        let state = Arc::new(ServerState::new(registry, Limits::default(), false));
        let collector = ServerCollector { state: state.clone(), host_cpu: Mutex::new(None) };
        state.set_loading(vec![("new".into(), 2)]);
        assert_eq!(states(&collector), [("bad".into(), 1, "failed".into()), ("new".into(), 2, "loading".into())]);
        // A failed version loaded again is loading, not failed.
        state.set_loading(vec![("bad".into(), 1)]);
        assert_eq!(states(&collector), [("bad".into(), 1, "loading".into())]);
        state.set_loading(Vec::new());
        assert_eq!(states(&collector), [("bad".into(), 1, "failed".into())]);
    }
}
