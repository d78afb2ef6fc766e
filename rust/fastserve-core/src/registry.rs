//! The models a server knows: name → versions → ready scheduler or failure reason.
//! Reads are lock-free snapshots (request path); writes replace the snapshot.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::error::{Result, ServeError};
use crate::observe::stats::ModelStats;
use crate::scheduler::Scheduler;
use crate::spec::ModelSpec;

pub enum VersionState {
    Ready(Arc<Scheduler>),
    /// Loading failed; the reason is shown in ready/metadata answers.
    Failed(String),
}

pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub state: VersionState,
}

impl ModelVersion {
    pub fn ready(scheduler: Arc<Scheduler>) -> Self {
        let spec = scheduler.spec();
        Self { name: spec.name.clone(), version: spec.version, state: VersionState::Ready(scheduler) }
    }

    pub fn failed(name: impl Into<String>, version: u64, reason: impl Into<String>) -> Self {
        Self { name: name.into(), version, state: VersionState::Failed(reason.into()) }
    }

    /// Loaded and still able to serve (not broken by hung instances).
    pub fn is_ready(&self) -> bool {
        matches!(&self.state, VersionState::Ready(s) if s.unavailable().is_none())
    }

    /// The scheduler, or a 503 that carries the load failure or why the version broke.
    pub fn scheduler(&self) -> Result<&Arc<Scheduler>> {
        let reason = match &self.state {
            VersionState::Ready(s) => match s.unavailable() {
                None => return Ok(s),
                Some(reason) => reason,
            },
            VersionState::Failed(reason) => reason.clone(),
        };
        // Triton's wording, with why after it.
        Err(ServeError::unavailable(format!(
            "Request for unknown model: '{}' version {} is not at ready state: {reason}",
            self.name, self.version
        )))
    }

    /// The statistics of a loaded version (broken or not), None for a failed load.
    pub fn stats(&self) -> Option<&Arc<ModelStats>> {
        match &self.state {
            VersionState::Ready(s) => Some(s.stats()),
            VersionState::Failed(_) => None,
        }
    }

    pub fn spec(&self) -> Result<&Arc<ModelSpec>> {
        self.scheduler().map(|s| s.spec())
    }

    /// Drains the version (see [`Scheduler::shutdown_by`]); returns the threads left running.
    fn shutdown(&self, deadline: Option<Instant>) -> usize {
        match &self.state {
            VersionState::Ready(s) => s.shutdown_by(deadline),
            VersionState::Failed(_) => 0,
        }
    }
}

/// How long a retired version may keep serving requests that found it before it left the registry.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(120);

/// Drains a version that is no longer reachable through the registry. Requests that resolved it
/// just before the swap still hold it and may still submit, so its queue is closed only once they
/// are gone: no request fails because of a swap.
fn retire(version: Arc<ModelVersion>) {
    let deadline = Instant::now() + RETIRE_TIMEOUT;
    if let VersionState::Ready(s) = &version.state {
        while (Arc::strong_count(&version) > 1 || Arc::strong_count(s) > 1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // A stream still running after that long is ended rather than waited for without bound.
        if Arc::strong_count(s) > 1 {
            s.end_streams();
        }
    }
    version.shutdown(None);
}

/// Where requests that name no version (or name a label) go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Label → version, e.g. `stable = 1`, `canary = 2`.
    pub labels: BTreeMap<String, u64>,
    /// Version → relative weight for requests that name no version. Empty: the default version.
    pub weights: Vec<(u64, u32)>,
}

/// All versions of one model.
#[derive(Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
    pub routing: Routing,
}

impl ModelEntry {
    /// The version a request without one goes to: the highest ready version, else the highest.
    pub fn default_version(&self) -> Option<&Arc<ModelVersion>> {
        self.versions.values().rev().find(|v| v.is_ready()).or_else(|| self.versions.values().next_back())
    }

    /// Picks a version for a request that names none: by weight among ready versions (the same
    /// `routing_key` always lands on the same version while weights stay), else the default.
    pub fn route(&self, routing_key: Option<&str>) -> Option<&Arc<ModelVersion>> {
        let candidates: Vec<(&Arc<ModelVersion>, u64)> = self
            .routing
            .weights
            .iter()
            .filter(|(_, w)| *w > 0)
            .filter_map(|(v, w)| self.versions.get(v).filter(|mv| mv.is_ready()).map(|mv| (mv, u64::from(*w))))
            .collect();
        let total: u64 = candidates.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return self.default_version();
        }
        let mut point = match routing_key {
            Some(key) => {
                let mut h = DefaultHasher::new();
                key.hash(&mut h);
                h.finish() % total
            }
            None => fastrand::u64(0..total),
        };
        for (mv, w) in candidates {
            if point < w {
                return Some(mv);
            }
            point -= w;
        }
        self.default_version()
    }

    /// A version by number or label.
    pub fn named(&self, version: &str) -> Option<&Arc<ModelVersion>> {
        match version.parse::<u64>() {
            Ok(n) => self.versions.get(&n),
            Err(_) => self.routing.labels.get(version).and_then(|n| self.versions.get(n)),
        }
    }
}

pub struct Registry {
    models: ArcSwap<HashMap<String, Arc<ModelEntry>>>,
    write: Mutex<()>,
    histograms: AtomicBool,
    /// Failed loads per (model, version), whether or not an older version kept serving.
    load_failures: Mutex<BTreeMap<(String, u64), u64>>,
    /// Bumped on every change of the models or the server's lifecycle, for watchers such as
    /// the gRPC health service.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            models: ArcSwap::default(),
            write: Mutex::new(()),
            histograms: AtomicBool::new(true),
            load_failures: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether versions registered from now on record latency histograms.
    pub fn set_histograms(&self, on: bool) {
        self.histograms.store(on, Ordering::Relaxed);
    }

    fn update<R>(&self, f: impl FnOnce(&mut HashMap<String, Arc<ModelEntry>>) -> R) -> R {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::clone(&self.models.load());
        let out = f(&mut next);
        self.models.store(Arc::new(next));
        self.notify_changed();
        out
    }

    /// Tells the watchers that a model or the server's lifecycle changed.
    pub fn notify_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes on every change (see [`Registry::notify_changed`]).
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Adds or replaces a version; the replaced one is drained before this returns.
    pub fn insert(&self, version: ModelVersion) {
        if let VersionState::Ready(s) = &version.state {
            s.stats().set_histograms(self.histograms.load(Ordering::Relaxed));
        }
        let version = Arc::new(version);
        let replaced = self.update(|models| {
            let mut entry = models.get(&version.name).map(|e| ModelEntry::clone(e)).unwrap_or_default();
            let old = entry.versions.insert(version.version, version.clone());
            models.insert(version.name.clone(), Arc::new(entry));
            old
        });
        if let Some(old) = replaced {
            retire(old);
        }
    }

    /// Removes a model (all versions, or one) and drains what was removed.
    pub fn remove(&self, name: &str, version: Option<u64>) -> usize {
        let removed: Vec<Arc<ModelVersion>> = self.update(|models| {
            let Some(entry) = models.get(name) else { return Vec::new() };
            let mut entry = ModelEntry::clone(entry);
            let removed = match version {
                Some(v) => entry.versions.remove(&v).into_iter().collect(),
                None => std::mem::take(&mut entry.versions).into_values().collect(),
            };
            if entry.versions.is_empty() {
                models.remove(name);
            } else {
                models.insert(name.to_string(), Arc::new(entry));
            }
            removed
        });
        let count = removed.len();
        for v in removed {
            retire(v);
        }
        count
    }

    pub fn model(&self, name: &str) -> Result<Arc<ModelEntry>> {
        self.models.load().get(name).cloned().ok_or_else(|| unknown_model(name))
    }

    /// Replaces a model's labels and weights; takes effect for the next request.
    pub fn set_routing(&self, name: &str, routing: Routing) -> Result<()> {
        self.update(|models| {
            let mut entry = models.get(name).map(|e| ModelEntry::clone(e)).ok_or_else(|| unknown_model(name))?;
            entry.routing = routing;
            models.insert(name.to_string(), Arc::new(entry));
            Ok(())
        })
    }

    /// Finds the version a request names by number or label (`None`: routed by weight or default).
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelVersion>> {
        self.resolve_with_key(name, version, None)
    }

    /// As [`Registry::resolve`], with a sticky routing key for requests that name no version.
    pub fn resolve_with_key(&self, name: &str, version: Option<&str>, key: Option<&str>) -> Result<Arc<ModelVersion>> {
        let entry = self.model(name)?;
        let found = match version {
            None | Some("") => entry.route(key),
            Some(v) => entry.named(v),
        };
        found.cloned().ok_or_else(|| match version {
            Some(v) if !v.is_empty() => {
                ServeError::not_found(format!("Request for unknown model: '{name}' version {v} is not found"))
            }
            _ => ServeError::not_found(format!("Request for unknown model: '{name}' has no available versions")),
        })
    }

    /// Snapshot of every model, sorted by name.
    pub fn models(&self) -> Vec<(String, Arc<ModelEntry>)> {
        let mut all: Vec<_> = self.models.load().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// True when every known version is ready (Triton's strict readiness).
    pub fn all_ready(&self) -> bool {
        self.models.load().values().all(|e| e.versions.values().all(|v| v.is_ready()))
    }

    /// Every version that is not ready, with why (sorted by name and version).
    pub fn not_ready(&self) -> Vec<String> {
        self.models()
            .iter()
            .flat_map(|(_, e)| e.versions.values())
            .filter_map(|v| v.scheduler().err().map(|e| e.to_string()))
            .collect()
    }

    /// Counts a failed (re)load of a model version, for `fastserve_model_load_failure_total`.
    pub fn record_load_failure(&self, name: &str, version: u64) {
        let mut failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        *failures.entry((name.to_string(), version)).or_default() += 1;
    }

    /// `((model, version), failed loads)` for every version that ever failed to load.
    pub fn load_failures(&self) -> Vec<((String, u64), u64)> {
        let failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Removes every model, draining each until `deadline` (None: until every queued request
    /// ran); returns how many model threads were left running (stuck in a model). Called after
    /// the front ends stopped.
    /// Ends the running streams of every version (see [`Scheduler::end_streams`]).
    pub fn end_streams(&self) {
        for entry in self.models.load().values() {
            for v in entry.versions.values() {
                if let VersionState::Ready(s) = &v.state {
                    s.end_streams();
                }
            }
        }
    }

    pub fn shutdown(&self, deadline: Option<Instant>) -> usize {
        let all = self.update(std::mem::take);
        all.values().flat_map(|entry| entry.versions.values()).map(|v| v.shutdown(deadline)).sum()
    }
}

/// Triton's wording: clients and scripts match on it.
fn unknown_model(name: &str) -> ServeError {
    ServeError::not_found(format!("Request for unknown model: '{name}' is not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(name: &str, version: u64) -> ModelVersion {
        use crate::scheduler::plan::BatchPolicy;
        use crate::scheduler::{Instance, PhaseClock, Scheduler, SchedulerConfig};
        use crate::spec::{ModelSpec, TensorSpec};
        use crate::tensor::datatype::DataType;
        use crate::tensor::Tensor;

        struct Echo;
        impl Instance for Echo {
            fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
                Ok(inputs)
            }
        }
        let spec = ModelSpec {
            name: name.into(),
            version,
            platform: "test".into(),
            max_batch_size: 0,
            decoupled: false,
            inputs: vec![TensorSpec::new("X", DataType::Fp32, vec![1])],
            outputs: vec![TensorSpec::new("X", DataType::Fp32, vec![1])],
        };
        let config = SchedulerConfig::new(
            BatchPolicy { max_batch_size: 0, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] },
            4,
        );
        ModelVersion::ready(Scheduler::start(Arc::new(spec), config, vec![Box::new(Echo)]).unwrap())
    }

    #[test]
    fn labels_and_weights_route_requests() {
        let r = Registry::new();
        r.insert(ready("m", 1));
        r.insert(ready("m", 2));
        let routing = Routing {
            labels: [("stable".to_string(), 1), ("canary".to_string(), 2)].into(),
            weights: vec![(1, 3), (2, 1)],
        };
        r.set_routing("m", routing).unwrap();
        assert_eq!(r.resolve("m", Some("stable")).unwrap().version, 1);
        assert_eq!(r.resolve("m", Some("canary")).unwrap().version, 2);
        assert!(matches!(r.resolve("m", Some("beta")), Err(ServeError::NotFound(_))));
        let picks: Vec<u64> = (0..4000).map(|_| r.resolve("m", None).unwrap().version).collect();
        let ones = picks.iter().filter(|&&v| v == 1).count() as f64;
        // 3:1 weights; 4000 draws have a standard deviation of ~27, so ±6σ never trips by chance.
        assert!((ones - 3000.0).abs() < 165.0, "{ones}");
        for key in ["alice", "bob", "carol"] {
            let first = r.resolve_with_key("m", None, Some(key)).unwrap().version;
            assert!((0..50).all(|_| r.resolve_with_key("m", None, Some(key)).unwrap().version == first));
        }
        r.set_routing("m", Routing { labels: Default::default(), weights: vec![(1, 0), (2, 5)] }).unwrap();
        assert!((0..100).all(|_| r.resolve("m", None).unwrap().version == 2));
        assert!(r.set_routing("nope", Routing::default()).is_err());
    }

    #[tokio::test]
    async fn a_swap_waits_for_requests_holding_the_old_version() {
        use crate::spec::ValidatedRequest;
        use crate::tensor::{Tensor, TensorData};
        let r = Arc::new(Registry::new());
        r.insert(ready("m", 1));
        let held = r.resolve("m", None).unwrap();
        let r2 = r.clone();
        let swap = std::thread::spawn(move || r2.insert(ready("m", 1)));
        // The swap is waiting for `held`; the old version still accepts work meanwhile.
        let t = Tensor::new("X", crate::DataType::Fp32, vec![1], TensorData::Raw(vec![0u8; 4].into())).unwrap();
        let reply = held.scheduler().unwrap().submit(ValidatedRequest { inputs: vec![t], rows: 1 }).unwrap();
        assert!(reply.await.unwrap().is_ok());
        drop(held);
        swap.join().unwrap();
    }

    #[test]
    fn resolves_versions_and_reports_unknowns() {
        let r = Registry::new();
        r.insert(ModelVersion::failed("m", 1, "bad file"));
        r.insert(ModelVersion::failed("m", 3, "bad config"));
        assert_eq!(r.resolve("m", None).unwrap().version, 3);
        assert_eq!(r.resolve("m", Some("1")).unwrap().version, 1);
        assert!(matches!(r.resolve("m", Some("2")), Err(ServeError::NotFound(_))));
        assert!(matches!(r.resolve("m", Some("x")), Err(ServeError::NotFound(_))));
        assert!(matches!(r.resolve("nope", None), Err(ServeError::NotFound(_))));
        let err = r.resolve("m", None).unwrap().scheduler().err().unwrap();
        assert_eq!(err.to_string(), "Request for unknown model: 'm' version 3 is not at ready state: bad config");
        assert!(!r.all_ready());
        assert_eq!(r.remove("m", Some(3)), 1);
        assert_eq!(r.resolve("m", None).unwrap().version, 1);
        assert_eq!(r.remove("m", None), 1);
        assert!(r.models().is_empty());
    }
}
