//! The queue of one model version: requests ordered by priority level and arrival, expired on
//! time, withdrawn when their client goes away.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::plan::Batchable;
use crate::error::ServeError;
use crate::observe::stats::ModelStats;
pub use crate::request::QueueOptions;
use crate::request::{Failed, Reply, RequestInfo, SequenceTag, Served};
use crate::tensor::Tensor;

/// Why a queued request may expire.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expiry {
    /// Its queue timeout (the model's default or the request's own).
    Queue(Duration),
    /// Its client's deadline.
    Deadline,
}

/// Where a decoupled model's responses go, one message per response; bounded, so a slow reader
/// makes the model wait instead of the server buffering.
pub type ResponseSender = tokio::sync::mpsc::Sender<Vec<Tensor>>;

pub(super) struct Job {
    pub(super) inputs: Vec<Tensor>,
    pub(super) rows: usize,
    /// The final answer: the outputs (none for a decoupled model, whose responses went to
    /// `responses`) and how the request was served, or its error.
    pub(super) reply: oneshot::Sender<Reply>,
    pub(super) responses: Option<ResponseSender>,
    /// Its sequence (models with sequence batching).
    pub(super) sequence: Option<SequenceTag>,
    /// Models whose `execute` waits on this request (in-process calls).
    pub(super) callers: Vec<String>,
    /// What the model is shown of the request (models that take requests one by one).
    pub(super) info: Option<std::sync::Arc<RequestInfo>>,
    /// The client's request id, for the log of a failed batch.
    pub(super) request_id: Option<String>,
    pub(super) enqueued: Instant,
    /// 1 is served first.
    pub(super) level: u64,
    pub(super) expires: Option<(Instant, Expiry)>,
}

impl Batchable for Job {
    fn rows(&self) -> usize {
        self.rows
    }
    fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }
}

/// Queued jobs, highest priority level first and in arrival order within a level.
#[derive(Default)]
pub(super) struct Backlog(pub(super) VecDeque<Job>);

impl Backlog {
    pub(super) fn push(&mut self, job: Job) {
        // Usually the job goes last: one level only, or it is of the lowest level queued.
        if self.0.back().is_none_or(|last| last.level <= job.level) {
            self.0.push_back(job);
        } else {
            let at = self.0.partition_point(|j| j.level <= job.level);
            self.0.insert(at, job);
        }
    }

    /// Removes jobs whose client went away (counted) and answers those past their expiry, so
    /// neither ever reaches the model. Returns the next expiry among the jobs left.
    pub(super) fn prune(
        &mut self,
        now: Instant,
        model: &str,
        stats: &ModelStats,
        queued: &AtomicUsize,
    ) -> Option<Instant> {
        let needed = self.0.iter().any(|j| j.reply.is_closed() || j.expires.is_some_and(|(at, _)| at <= now));
        if needed {
            let mut cancelled = 0;
            let mut expired = Vec::new();
            let mut kept = VecDeque::with_capacity(self.0.len());
            for job in self.0.drain(..) {
                match job.expires {
                    _ if job.reply.is_closed() => cancelled += 1,
                    Some((at, why)) if at <= now => expired.push((job, why)),
                    _ => kept.push_back(job),
                }
            }
            self.0 = kept;
            queued.fetch_sub(cancelled + expired.len(), Ordering::AcqRel);
            if cancelled > 0 {
                stats.record_cancelled(cancelled);
                tracing::debug!(model, cancelled, "dropped queued requests whose client went away");
            }
            for (job, why) in expired {
                let served = Served { queue: now.saturating_duration_since(job.enqueued), ..Served::default() };
                let _ = job.reply.send(Err(Failed::after(expiry_error(why, model), served)));
            }
        }
        self.0.iter().filter_map(|j| j.expires.map(|(at, _)| at)).min()
    }
}

pub(super) fn expiry_error(why: Expiry, model: &str) -> ServeError {
    match why {
        Expiry::Queue(t) => ServeError::QueueTimeout(format!(
            "the request timed out in the queue of model '{model}' after {} us without running",
            t.as_micros()
        )),
        Expiry::Deadline => ServeError::DeadlineExceeded(format!(
            "the request's deadline passed while it waited in the queue of model '{model}'"
        )),
    }
}

/// What an instance is handed: the requests of one batch and, for a sequence model, the batch's
/// assembled inputs.
pub(super) struct Batch {
    pub(super) jobs: Vec<Job>,
    pub(super) sequence: Option<SequenceBatch>,
}

/// A sequence batch, assembled by the sequence batcher: the model's inputs (requests, control and
/// state inputs), which job each row holds (None: an empty slot), and where new states go.
pub(super) struct SequenceBatch {
    pub(super) inputs: Vec<Tensor>,
    pub(super) rows: Vec<Option<usize>>,
    pub(super) plan: std::sync::Arc<super::sequence::config::SequencePlan>,
    pub(super) states: std::sync::Arc<super::sequence::StateStore>,
}

/// What the batcher's inbox carries.
pub(super) enum Msg {
    Job(Job),
    /// A queued request's client went away, or the version broke: look at the backlog now
    /// rather than at the next batch.
    Wake,
    /// Stop admitting; run what is queued until the deadline (None: all of it), then exit.
    Close(Option<Instant>),
}
