//! Hung-model recovery: one thread per model version (only with `execution_timeout_ms`) that
//! fails a batch whose `execute` runs too long and has its instance replaced.
//!
//! A batch's reply senders sit in a shared slot: whichever side takes them first answers the
//! batch, the instance when `execute` returns or the watchdog when time is up. An instance that
//! finds its slot empty was abandoned and stops; a hung call cannot be interrupted, so its thread
//! is left to return on its own and never gets work again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::scheduler::Reply;

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
    Started { id: u64, seat: usize, started: Instant, replies: Replies },
    /// Instance thread `id` finished its batch.
    Finished { id: u64 },
    /// No more batches will start: leave once the running ones are over.
    Stop,
}

/// Watches running batches until stopped. `on_hung(id, seat, replace)` abandons a hung instance
/// thread and, unless the version is stopping, starts a replacement in its seat.
pub fn run(rx: Receiver<Watch>, timeout: Duration, model: &str, mut on_hung: impl FnMut(u64, usize, bool)) {
    let mut running: HashMap<u64, (usize, Instant, Replies)> = HashMap::new();
    let mut stopping = false;
    loop {
        let next = running.values().map(|(_, started, _)| *started + timeout).min();
        let msg = match next {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Watch::Started { id, seat, started, replies }) => {
                running.insert(id, (seat, started, replies));
            }
            Ok(Watch::Finished { id }) => {
                running.remove(&id);
            }
            Ok(Watch::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        let hung: Vec<u64> = running.iter().filter(|(_, (_, s, _))| now >= *s + timeout).map(|(id, _)| *id).collect();
        for id in hung {
            let Some((seat, _, replies)) = running.remove(&id) else { continue };
            // The instance may have answered just now; then nothing hung.
            let Some(replies) = take(&replies) else { continue };
            let ms = timeout.as_millis();
            tracing::warn!(
                model,
                instance = seat,
                timeout_ms = ms as u64,
                "model execution timed out; replacing the instance"
            );
            let error = ServeError::ExecutionTimeout(format!(
                "model '{model}' execution timed out after {ms} ms; instance replaced"
            ));
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
            on_hung(id, seat, !stopping);
        }
        if stopping && running.is_empty() {
            break;
        }
    }
}
