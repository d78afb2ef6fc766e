//! The way past the batcher: a request that finds nothing queued and an instance idle (the usual
//! case at low load) goes straight to that instance, one thread hand-off fewer than through the
//! batcher. Only for queues where the batcher would send such a request alone at once anyway (no
//! queue delay, no sequence batching), so batches and their order are what they would have been.

use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::instance::lock;
use super::queue::{Batch, Job};

/// The idle instances' tokens (shared with the batcher, which takes them only while it holds
/// queued requests) and the instances' batch channel.
pub(super) struct Direct(Mutex<Option<(Receiver<usize>, Sender<Batch>)>>);

impl Direct {
    pub(super) fn new(idle: Receiver<usize>, batches: Sender<Batch>) -> Self {
        Self(Mutex::new(Some((idle, batches))))
    }

    /// Hands `job` to an idle instance; gives it back when none is idle (or the version is
    /// closing, or the job already expired): it then goes through the batcher.
    pub(super) fn send(&self, job: Job) -> Option<Job> {
        if job.expires.is_some_and(|(at, _)| at <= Instant::now()) {
            return Some(job);
        }
        let channels = lock(&self.0);
        let Some((idle, batches)) = channels.as_ref() else { return Some(job) };
        if idle.try_recv().is_err() {
            return Some(job);
        }
        // An idle instance waits on the channel, which has room for one batch per instance.
        batches.send(Batch { jobs: vec![job], sequence: None }).err().and_then(|e| e.into_inner().jobs.pop())
    }

    /// Drops the channels at shutdown, so the instance threads see the batches end once the
    /// batcher's are gone too.
    pub(super) fn close(&self) {
        lock(&self.0).take();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::scheduler::queue::Expiry;

    fn job(expires: Option<Instant>) -> Job {
        Job {
            inputs: Vec::new(),
            rows: 1,
            reply: oneshot::channel().0,
            responses: None,
            sequence: None,
            callers: Vec::new(),
            info: None,
            request_id: None,
            enqueued: Instant::now(),
            level: 1,
            expires: expires.map(|at| (at, Expiry::Queue(Duration::ZERO))),
        }
    }

    #[test]
    fn a_job_goes_straight_to_an_idle_instance_and_otherwise_back_to_the_batcher() {
        let (idle_tx, idle_rx) = crossbeam_channel::unbounded();
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(1);
        let direct = Direct::new(idle_rx, batch_tx);
        assert!(direct.send(job(None)).is_some(), "no instance is idle");
        idle_tx.send(0).unwrap();
        assert!(direct.send(job(Some(Instant::now()))).is_some(), "an expired job is the batcher's to answer");
        assert!(direct.send(job(None)).is_none());
        assert_eq!(batch_rx.try_recv().map(|b| b.jobs.len()).ok(), Some(1));
        assert!(direct.send(job(None)).is_some(), "the idle instance was taken");
        idle_tx.send(0).unwrap();
        direct.close();
        assert!(direct.send(job(None)).is_some(), "closed: everything goes through the batcher");
        assert!(batch_rx.try_recv().is_err());
    }
}
