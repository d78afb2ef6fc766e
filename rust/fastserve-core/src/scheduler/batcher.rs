//! The batcher thread: forms batches from the queue whenever an instance is idle, expires queued
//! requests on time even while every instance is busy, and answers the queue at shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::instance::Seats;
use super::plan::{plan_batch, BatchPolicy};
use super::queue::{Backlog, Batch, Job, Msg};
use super::watchdog::Watch;
use crate::error::ServeError;
use crate::observe::stats::ModelStats;

/// Forms batches from the backlog whenever an instance is idle, and expires queued requests
/// on time even while every instance is busy.
pub(super) struct Batcher {
    /// The requests. Heard only while the batcher holds an idle instance or nothing at all:
    /// while every instance is busy, requests wait in the channel without waking the batcher
    /// for each one, and are taken in when an instance is free.
    pub(super) rx: Receiver<Msg>,
    /// Heard at once, always: shutdown, withdrawn requests, requests that can expire, a broken
    /// version.
    pub(super) signals: Receiver<Msg>,
    pub(super) idle_rx: Receiver<usize>,
    pub(super) batch_tx: Sender<Batch>,
    pub(super) policy: BatchPolicy,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) stats: Arc<ModelStats>,
    pub(super) model: String,
    /// Told when no more batches will start.
    pub(super) watch: Option<Sender<Watch>>,
    pub(super) seats: Arc<Seats>,
}

/// The batcher's view of a shutdown: none yet, or closing with an optional deadline.
#[derive(Clone, Copy)]
pub(crate) enum Closing {
    No,
    By(Option<Instant>),
}

impl Batcher {
    /// Moves everything already waiting in the channel into the backlog without blocking.
    pub(super) fn pull_ready(&self, backlog: &mut Backlog, closing: &mut Closing) {
        for msg in self.signals.try_iter().chain(self.rx.try_iter()) {
            take(msg, backlog, closing);
        }
    }

    /// Answers every queued request with `error` (none of them will run).
    pub(super) fn fail_all(&self, backlog: &mut Backlog, error: &ServeError) {
        self.queued.fetch_sub(backlog.0.len(), Ordering::AcqRel);
        for job in backlog.0.drain(..) {
            let _ = job.reply.send(Err(error.clone().into()));
        }
    }

    pub(super) fn run(self) {
        let (no_msgs, no_idle) = (crossbeam_channel::never::<Msg>(), crossbeam_channel::never::<usize>());
        let mut backlog = Backlog::default();
        let mut closing = Closing::No;
        let mut have_instance = false;
        loop {
            self.pull_ready(&mut backlog, &mut closing);
            let now = Instant::now();
            if let Some(e) = self.seats.broken_error() {
                self.fail_all(&mut backlog, &e);
            }
            let next_expiry = backlog.prune(now, &self.model, &self.stats, &self.queued);
            let close_by = match closing {
                Closing::No => None,
                Closing::By(None) if backlog.0.is_empty() => break,
                Closing::By(None) => None,
                Closing::By(Some(at)) if backlog.0.is_empty() || now >= at => break,
                Closing::By(Some(at)) => Some(at),
            };
            let mut wake = match (next_expiry, close_by) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if have_instance && !backlog.0.is_empty() {
                // A delay too large for the clock means "until the batch is full".
                let delay_end = backlog.0[0].enqueued.checked_add(self.policy.max_queue_delay);
                let expired = delay_end.is_some_and(|end| now >= end);
                let closing = matches!(closing, Closing::By(_));
                let plan = plan_batch(backlog.0.make_contiguous(), &self.policy, closing || expired);
                if plan.ready {
                    let mut jobs: Vec<Job> = plan.indices.iter().rev().filter_map(|&i| backlog.0.remove(i)).collect();
                    jobs.reverse();
                    self.queued.fetch_sub(jobs.len(), Ordering::AcqRel);
                    if self.batch_tx.send(Batch { jobs, sequence: None }).is_err() {
                        break;
                    }
                    have_instance = false;
                    continue;
                }
                if let Some(end) = delay_end {
                    wake = Some(wake.map_or(end, |w| w.min(end)));
                }
            }
            // Once closing, only a deadline or an idle instance moves things on; a Wake for a
            // withdrawn request is seen at the next pass.
            let open = matches!(closing, Closing::No);
            let msgs = if open && (have_instance || backlog.0.is_empty()) { &self.rx } else { &no_msgs };
            let signals = if open { &self.signals } else { &no_msgs };
            // With nothing queued the idle instances' tokens stay in their channel, where a new
            // request can take one and go to that instance directly (see `direct`).
            let idle = if have_instance || backlog.0.is_empty() { &no_idle } else { &self.idle_rx };
            let timer = wake.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            crossbeam_channel::select! {
                recv(msgs) -> msg => match msg {
                    Ok(msg) => take(msg, &mut backlog, &mut closing),
                    Err(_) => closing = Closing::By(None),
                },
                recv(signals) -> msg => match msg {
                    Ok(msg) => take(msg, &mut backlog, &mut closing),
                    Err(_) => closing = Closing::By(None),
                },
                recv(idle) -> ready => match ready {
                    Ok(_) => have_instance = true,
                    Err(_) => break,
                },
                recv(timer) -> _ => {}
            }
        }
        let stopped = ServeError::unavailable(format!("model '{}' shut down before this request ran", self.model));
        self.fail_all(&mut backlog, &stopped);
        if let Some(watch) = &self.watch {
            let _ = watch.send(Watch::Stop);
        }
    }
}

fn take(msg: Msg, backlog: &mut Backlog, closing: &mut Closing) {
    match msg {
        Msg::Job(j) => backlog.push(j),
        Msg::Wake => {}
        Msg::Close(deadline) => *closing = Closing::By(deadline),
    }
}
