//! The models a server knows: name → versions → ready scheduler or failure reason.
//! Reads are lock-free snapshots (request path); writes replace the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::error::{Result, ServeError};
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

    pub fn is_ready(&self) -> bool {
        matches!(self.state, VersionState::Ready(_))
    }

    /// The scheduler, or a 503 that carries the load failure.
    pub fn scheduler(&self) -> Result<&Arc<Scheduler>> {
        match &self.state {
            VersionState::Ready(s) => Ok(s),
            VersionState::Failed(reason) => Err(ServeError::unavailable(format!(
                "model '{}' version {} is not ready: {}",
                self.name, self.version, reason
            ))),
        }
    }

    pub fn spec(&self) -> Result<&Arc<ModelSpec>> {
        self.scheduler().map(|s| s.spec())
    }

    fn shutdown(&self) {
        if let VersionState::Ready(s) = &self.state {
            s.shutdown();
        }
    }
}

/// All versions of one model.
#[derive(Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
}

impl ModelEntry {
    /// The version a request without one goes to: the highest ready version, else the highest.
    pub fn default_version(&self) -> Option<&Arc<ModelVersion>> {
        self.versions.values().rev().find(|v| v.is_ready()).or_else(|| self.versions.values().next_back())
    }
}

pub struct Registry {
    models: ArcSwap<HashMap<String, Arc<ModelEntry>>>,
    write: Mutex<()>,
    histograms: AtomicBool,
}

impl Default for Registry {
    fn default() -> Self {
        Self { models: ArcSwap::default(), write: Mutex::new(()), histograms: AtomicBool::new(true) }
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
        out
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
            old.shutdown();
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
        for v in &removed {
            v.shutdown();
        }
        removed.len()
    }

    pub fn model(&self, name: &str) -> Result<Arc<ModelEntry>> {
        self.models.load().get(name).cloned().ok_or_else(|| ServeError::not_found(format!("unknown model '{name}'")))
    }

    /// Finds the version a request names (`None`: the default version).
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelVersion>> {
        let entry = self.model(name)?;
        let found = match version {
            None | Some("") => entry.default_version(),
            Some(v) => v.parse::<u64>().ok().and_then(|n| entry.versions.get(&n)),
        };
        found.cloned().ok_or_else(|| match version {
            Some(v) if !v.is_empty() => ServeError::not_found(format!("model '{name}' has no version '{v}'")),
            _ => ServeError::not_found(format!("model '{name}' has no versions")),
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

    /// Removes every model, draining each.
    pub fn shutdown(&self) {
        let all = self.update(std::mem::take);
        for entry in all.values() {
            for v in entry.versions.values() {
                v.shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(err.to_string(), "model 'm' version 3 is not ready: bad config");
        assert!(!r.all_ready());
        assert_eq!(r.remove("m", Some(3)), 1);
        assert_eq!(r.resolve("m", None).unwrap().version, 1);
        assert_eq!(r.remove("m", None), 1);
        assert!(r.models().is_empty());
    }
}
