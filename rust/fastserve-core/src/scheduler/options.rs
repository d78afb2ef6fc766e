//! A model version's batching and queue options, defined once: their names are `config.toml` keys
//! (top level and `[dynamic_batching]`) and `Server.add_model` keywords; their defaults and bounds
//! are read from here by the Python layer ([`ModelOptions::describe`]).

use std::time::Duration;

use super::plan::BatchPolicy;
use super::SchedulerConfig;
use crate::options::options;

options! {
    /// How one model version batches, queues and guards its executions.
    pub struct ModelOptions {
        /// rows per batch; 0: no batching (tensors carry no batch dimension)
        max_batch_size: usize = 0, range = 0..=1048576;
        /// microseconds the oldest request may wait for a fuller batch
        max_queue_delay_us: u64 = 0, range = 0..=3600000000;
        /// batch sizes sent as soon as the queue reaches one (each also <= max_batch_size)
        preferred_batch_sizes: Vec<usize> = Vec::new(), range = 1..=1048576;
        /// queued requests per version; beyond it requests are refused at once (503)
        max_queue_size: usize = 1024, range = 1..=10000000;
        /// microseconds a request may wait in the queue before it is dropped unrun (503; 0: no limit)
        default_queue_timeout_us: u64 = 0, range = 0..=3600000000;
        /// priority levels: 0 or 1 none, N: parameters.priority 1 (highest) to N
        priority_levels: u64 = 0, range = 0..=1024;
        /// level of requests that name none (0: the lowest)
        default_priority_level: u64 = 0, range = 0..=1024;
        /// milliseconds a batch may execute before it fails (503) and its instance is replaced (0: no limit)
        execution_timeout_ms: u64 = 0, range = 0..=86400000;
        /// hung instances left running (a thread cannot be killed) before the version is marked unavailable
        max_abandoned_instances: usize = 4, range = 0..=1024;
        /// a failed batch of several requests runs again one request at a time, so only requests that fail on their own fail (false: for models whose execute must not run twice)
        isolate_batch_failures: bool = true;
        /// where each instance runs: "thread" (in the server's process: zero-copy, shares the GIL) or "process" (a worker process each: parallel, crash-isolated)
        isolation: String = ISOLATION_THREAD.to_string(), choices = ISOLATIONS;
        /// consecutive exits of an instance's worker process (isolation = "process") before the version is marked unavailable
        max_instance_failures: usize = 5, range = 1..=1000;
        /// Triton's decoupled transaction policy: execute() is a generator and each yield is one response
        decoupled: bool = false;
        /// Triton's sequence batcher ([sequence_batching]): stateful models, requests with sequence ids
        sequence_batching: Option<super::SequenceConfig> = None;
    }
}

/// In-process instances: the default.
pub const ISOLATION_THREAD: &str = "thread";
/// Each instance in a worker process of its own.
pub const ISOLATION_PROCESS: &str = "process";
const ISOLATIONS: &[&str] = &[ISOLATION_THREAD, ISOLATION_PROCESS];

fn micros(us: u64) -> Option<Duration> {
    (us > 0).then(|| Duration::from_micros(us))
}

impl ModelOptions {
    /// Checks every value (bounds and how they relate) and builds the scheduler's configuration;
    /// the message names the option.
    pub fn build(&self) -> Result<SchedulerConfig, String> {
        self.check_ranges()?;
        if !ISOLATIONS.contains(&self.isolation.as_str()) {
            return Err(format!("isolation must be one of {}, got '{}'", ISOLATIONS.join(", "), self.isolation));
        }
        if let Some(&p) = self.preferred_batch_sizes.iter().find(|&&p| p > self.max_batch_size) {
            return Err(format!("preferred_batch_sizes: {p} exceeds max_batch_size {}", self.max_batch_size));
        }
        if self.default_priority_level > self.priority_levels.max(1) {
            return Err(format!(
                "default_priority_level {} exceeds priority_levels {}",
                self.default_priority_level, self.priority_levels
            ));
        }
        Ok(SchedulerConfig {
            policy: BatchPolicy {
                max_batch_size: self.max_batch_size,
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                preferred_batch_sizes: self.preferred_batch_sizes.clone(),
            },
            max_queue_size: self.max_queue_size,
            default_queue_timeout: micros(self.default_queue_timeout_us),
            priority_levels: self.priority_levels,
            default_priority_level: self.default_priority_level,
            execution_timeout: (self.execution_timeout_ms > 0)
                .then(|| Duration::from_millis(self.execution_timeout_ms)),
            max_abandoned_instances: self.max_abandoned_instances,
            isolate_batch_failures: self.isolate_batch_failures,
            clock: Default::default(),
            sequence: self.sequence_batching.clone(),
            ensemble: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_against_their_bounds_and_each_other() {
        let cases = [
            (
                ModelOptions { max_batch_size: 1 << 30, ..Default::default() },
                "max_batch_size must be between 0 and 1048576",
            ),
            (ModelOptions { preferred_batch_sizes: vec![0], ..Default::default() }, "preferred_batch_sizes"),
            (
                ModelOptions { max_batch_size: 4, preferred_batch_sizes: vec![8], ..Default::default() },
                "exceeds max_batch_size 4",
            ),
            (
                ModelOptions { priority_levels: 2, default_priority_level: 3, ..Default::default() },
                "exceeds priority_levels",
            ),
        ];
        for (options, message) in cases {
            assert!(options.build().unwrap_err().contains(message), "{message}");
        }
        let config = ModelOptions { max_batch_size: 8, execution_timeout_ms: 5, ..Default::default() }.build().unwrap();
        assert_eq!((config.policy.max_batch_size, config.execution_timeout), (8, Some(Duration::from_millis(5))));
    }
}
