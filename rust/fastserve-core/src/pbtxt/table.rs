//! A message of a parsed `config.pbtxt` as a table the conversion takes fields out of: whatever
//! is left when a message has been converted is a field fastserve does not honor, reported by
//! its path (`input[0].reshape`) so no setting is ever silently dropped.

use serde_json::{Map, Value};

/// Fields that only tune performance: left over, they are warnings instead of errors. Patterns
/// name repeated fields with `[]`; a pattern covers everything below it.
const TUNING_ONLY: [&str; 9] = [
    "optimization",
    "response_cache",
    "model_metrics",
    "instance_group[].rate_limiter",
    "instance_group[].host_policy",
    "dynamic_batching.preserve_ordering",
    "sequence_batching.state[].use_same_buffer_for_input_output",
    "sequence_batching.state[].use_growable_memory",
    "ensemble_scheduling.max_inflight_requests",
];

/// What a conversion found besides its result.
#[derive(Debug, Default)]
pub struct Report {
    /// Fields fastserve does not honor (a load error).
    pub unsupported: Vec<String>,
    /// Values fastserve cannot take, with why (a load error).
    pub invalid: Vec<String>,
    /// Performance-only fields that have no effect here (a warning).
    pub tuning: Vec<String>,
}

impl Report {
    pub fn invalid(&mut self, path: &Path, key: &str, why: impl std::fmt::Display) {
        self.invalid.push(format!("{}: {why}", path.join(key).concrete));
    }
}

/// Where a table sits: `input[1].dims` to tell users, `input[].dims` to match [`TUNING_ONLY`].
#[derive(Debug, Clone, Default)]
pub struct Path {
    pub concrete: String,
    pattern: String,
}

impl Path {
    pub fn join(&self, key: &str) -> Path {
        let sep = if self.concrete.is_empty() { "" } else { "." };
        Path { concrete: format!("{}{sep}{key}", self.concrete), pattern: format!("{}{sep}{key}", self.pattern) }
    }

    fn index(&self, i: usize) -> Path {
        Path { concrete: format!("{}[{i}]", self.concrete), pattern: format!("{}[]", self.pattern) }
    }

    fn tuning_only(&self) -> bool {
        TUNING_ONLY.iter().any(|p| self.pattern == *p || self.pattern.starts_with(&format!("{p}.")))
    }
}

/// One message, as protobuf's JSON mapping writes it with proto field names and without fields at
/// their default values (so every key present was set in the file).
#[derive(Debug)]
pub struct Table {
    map: Map<String, Value>,
    pub path: Path,
}

impl Table {
    pub fn new(map: Map<String, Value>, path: Path) -> Self {
        Self { map, path }
    }

    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn take_str(&mut self, key: &str) -> Option<String> {
        match self.map.remove(key) {
            Some(Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
            None => None,
        }
    }

    pub fn take_bool(&mut self, key: &str) -> bool {
        matches!(self.map.remove(key), Some(Value::Bool(true)))
    }

    /// A nested message.
    pub fn take_table(&mut self, key: &str) -> Option<Table> {
        match self.map.remove(key) {
            Some(Value::Object(map)) => Some(Table::new(map, self.path.join(key))),
            _ => None,
        }
    }

    /// A repeated message field, each with its index in the path.
    pub fn take_tables(&mut self, key: &str) -> Vec<Table> {
        let path = self.path.join(key);
        match self.map.remove(key) {
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Object(map) => Some(Table::new(map, path.index(i))),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Reports every field nobody took.
    pub fn finish(self, report: &mut Report) {
        for key in self.map.keys() {
            let path = self.path.join(key);
            if path.tuning_only() {
                report.tuning.push(path.concrete);
            } else {
                report.unsupported.push(path.concrete);
            }
        }
    }
}
