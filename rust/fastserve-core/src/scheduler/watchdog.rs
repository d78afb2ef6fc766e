//! Hung-model recovery: one thread per model version (only with `execution_timeout_ms`) that
//! fails a batch whose `execute` runs too long and has its instance replaced.
//!
//! A batch's reply senders sit in a shared slot: whichever side takes them first answers the
//! batch, the instance when `execute` returns or the watchdog when time is up. An instance that
//! finds its slot empty was abandoned and stops; a hung call cannot be interrupted, so its thread
//! is left to return on its own and never gets work again, unless the instance has a kill switch
//! (a worker process, `Instance::kill_switch`): then it is killed, so its thread returns
//! at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::request::Reply;

/// The watchdog's time: the real clock, or one a test moves by hand (so execution timeouts are
/// tested without waiting for them).
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    Real,
    Manual(Arc<ManualClock>),
}

/// A clock that only moves when told; each move wakes the watchdogs that use it.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Instant>,
    ticks: (Sender<()>, Receiver<()>),
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { now: Mutex::new(Instant::now()), ticks: crossbeam_channel::unbounded() })
    }

    /// Moves the clock on by `by` and wakes the watchdog to look at it.
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) += by;
        let _ = self.ticks.0.send(());
    }
}

impl Clock {
    pub fn now(&self) -> Instant {
        match self {
            Self::Real => Instant::now(),
            Self::Manual(c) => *c.now.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The next message, or `Timeout` once `deadline` passed (a manual clock: once it moved).
    fn wait(&self, rx: &Receiver<Watch>, deadline: Option<Instant>) -> Result<Watch, RecvTimeoutError> {
        match (self, deadline) {
            (Self::Real, Some(at)) => rx.recv_deadline(at),
            (Self::Real, None) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Self::Manual(c), _) => crossbeam_channel::select! {
                recv(rx) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected),
                recv(c.ticks.1) -> _ => Err(RecvTimeoutError::Timeout),
            },
        }
    }
}

/// Stops the batch an instance runs now (a worker process is killed); see
/// `Instance::kill_switch`.
pub type KillSwitch = Arc<dyn Fn() + Send + Sync>;

/// The reply senders of the batch an instance runs, until one side takes them.
pub type Replies = Arc<Mutex<Option<Vec<oneshot::Sender<Reply>>>>>;

/// Takes the replies out of the slot; `None` when the other side already did.
pub fn take(replies: &Replies) -> Option<Vec<oneshot::Sender<Reply>>> {
    match replies.lock() {
        Ok(mut r) => r.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    }
}

pub enum Watch {
    /// Instance thread `id` (in seat `seat`) started a batch.
    Started { id: u64, seat: usize, started: Instant, replies: Replies, kill: Option<KillSwitch> },
    /// Instance thread `id` finished its batch.
    Finished { id: u64 },
    /// No more batches will start: leave once the running ones are over.
    Stop,
}

/// What the watchdog asks of the scheduler about a hung instance.
pub trait OnHung {
    /// Forgets hung instance thread `id`; true when a replacement may be started.
    fn abandon(&self, id: u64) -> bool;
    /// Starts a fresh instance in `seat` (may be slow: a model load).
    fn replace(&self, seat: usize);
    /// Marks the version unavailable: too many hung instances are still running.
    fn give_up(&self, reason: String);
}

/// Watches running batches until stopped, failing a batch that runs past `timeout` and having its
/// instance abandoned and replaced (unless the version is stopping or has too many hung ones).
pub fn run(rx: Receiver<Watch>, timeout: Duration, clock: &Clock, model: &str, hung: &impl OnHung) {
    let mut running: HashMap<u64, (usize, Instant, Replies, Option<KillSwitch>)> = HashMap::new();
    let mut stopping = false;
    loop {
        let next = running.values().map(|(_, started, _, _)| *started + timeout).min();
        let msg = clock.wait(&rx, next);
        match msg {
            Ok(Watch::Started { id, seat, started, replies, kill }) => {
                running.insert(id, (seat, started, replies, kill));
            }
            Ok(Watch::Finished { id }) => {
                running.remove(&id);
            }
            Ok(Watch::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = clock.now();
        let expired: Vec<u64> =
            running.iter().filter(|(_, (_, s, _, _))| now >= *s + timeout).map(|(id, _)| *id).collect();
        for id in expired {
            let Some((seat, _, replies, kill)) = running.remove(&id) else { continue };
            // The instance may have answered just now; then nothing hung.
            let Some(replies) = take(&replies) else { continue };
            // A worker process is killed: its thread returns now instead of staying hung.
            if let Some(kill) = &kill {
                kill();
            }
            let ms = timeout.as_millis();
            let may_replace = hung.abandon(id);
            let outcome = match (stopping, may_replace) {
                (true, _) if kill.is_some() => "instance process killed",
                (true, _) => "instance abandoned",
                (false, true) if kill.is_some() => "instance process killed and replaced",
                (false, true) => "instance replaced",
                (false, false) => "too many hung instances; the model version is now unavailable",
            };
            tracing::warn!(model, instance = seat, timeout_ms = ms as u64, outcome, "model execution timed out");
            let error =
                ServeError::ExecutionTimeout(format!("model '{model}' execution timed out after {ms} ms; {outcome}"));
            for reply in replies {
                let _ = reply.send(Err(error.clone().into()));
            }
            match (stopping, may_replace) {
                (true, _) => {}
                (false, true) => hung.replace(seat),
                (false, false) => hung.give_up(format!(
                    "its instances hung past execution_timeout_ms ({ms} ms) more often than \
                     max_abandoned_instances allows; reload it to recover"
                )),
            }
        }
        if stopping && running.is_empty() {
            break;
        }
    }
}
