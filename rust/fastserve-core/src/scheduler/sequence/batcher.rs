//! The sequence batcher thread: keeps each sequence's requests in arrival order, one in flight at
//! a time, gives sequences their batch slot (direct) or candidacy (oldest), forms batches with
//! their control and state inputs when an instance is idle, and releases sequences that end or
//! go idle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::assemble::{assemble, Row};
use super::config::{SequencePlan, Strategy};
use super::StateStore;
use crate::error::ServeError;
use crate::observe::stats::ModelStats;
use crate::request::SequenceId;
use crate::scheduler::batcher::Closing;
use crate::scheduler::instance::{lock, Seats};
use crate::scheduler::plan::compatible;
use crate::scheduler::queue::{expiry_error, Batch, Job, Msg, SequenceBatch};
use crate::scheduler::watchdog::Watch;

pub(in crate::scheduler) struct SequenceBatcher {
    pub(in crate::scheduler) rx: Receiver<Msg>,
    pub(in crate::scheduler) idle_rx: Receiver<usize>,
    /// One channel per instance: in direct mode a sequence's batches go to its slot's instance.
    pub(in crate::scheduler) seat_tx: Vec<Sender<Batch>>,
    pub(in crate::scheduler) plan: Arc<SequencePlan>,
    pub(in crate::scheduler) batching: bool,
    pub(in crate::scheduler) queued: Arc<AtomicUsize>,
    pub(in crate::scheduler) stats: Arc<ModelStats>,
    pub(in crate::scheduler) model: String,
    pub(in crate::scheduler) watch: Option<Sender<Watch>>,
    pub(in crate::scheduler) seats: Arc<Seats>,
    pub(in crate::scheduler) states: Arc<StateStore>,
}

/// One live sequence.
struct Sequence {
    pending: VecDeque<Job>,
    /// Direct: the (instance, slot) it owns. Oldest: whether it is a candidate.
    slot: Option<(usize, usize)>,
    candidate: bool,
    last_active: Instant,
    in_flight: bool,
    /// Its last request (END) is queued or running.
    ending: bool,
}

/// What the batcher tracks across its loop.
struct Books {
    sequences: HashMap<SequenceId, Sequence>,
    /// Started sequences waiting for a slot (direct) or candidacy (oldest), oldest first.
    waiting: VecDeque<SequenceId>,
    /// Direct: per instance, the sequence in each slot.
    slots: Vec<Vec<Option<SequenceId>>>,
    candidates: usize,
    idle: Vec<bool>,
    /// Per instance, the sequences of the batch it runs.
    running: Vec<Vec<SequenceId>>,
}

impl SequenceBatcher {
    fn slots_per_instance(&self) -> usize {
        if self.batching {
            self.seats.spec.max_batch_size.max(1)
        } else {
            1
        }
    }

    pub(in crate::scheduler) fn run(self) {
        let seats = self.seat_tx.len();
        let mut books = Books {
            sequences: HashMap::new(),
            waiting: VecDeque::new(),
            slots: vec![vec![None; self.slots_per_instance()]; seats],
            candidates: 0,
            idle: vec![false; seats],
            running: vec![Vec::new(); seats],
        };
        let mut closing = Closing::No;
        let no_msgs = crossbeam_channel::never::<Msg>();
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                self.receive(msg, &mut books, &mut closing);
            }
            while let Ok(seat) = self.idle_rx.try_recv() {
                self.instance_idle(seat, &mut books);
            }
            let now = Instant::now();
            if let Some(e) = self.seats.broken_error() {
                self.fail_all(&mut books, &e);
            }
            let mut wake = self.expire(now, &mut books);
            self.admit_waiting(&mut books);
            let queued_any = books.sequences.values().any(|s| !s.pending.is_empty());
            let close_by = match closing {
                Closing::No => None,
                Closing::By(None) if !queued_any => break,
                Closing::By(None) => None,
                Closing::By(Some(at)) if !queued_any || now >= at => break,
                Closing::By(Some(at)) => Some(at),
            };
            if let Some(delay_end) = self.dispatch(now, &mut books, matches!(closing, Closing::By(_))) {
                wake = Some(wake.map_or(delay_end, |w| w.min(delay_end)));
            }
            if let Some(at) = close_by {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            self.stats.set_active_sequences(books.sequences.len());
            let msgs = if matches!(closing, Closing::By(_)) { &no_msgs } else { &self.rx };
            let timer = wake.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            crossbeam_channel::select! {
                recv(msgs) -> msg => match msg {
                    Ok(msg) => self.receive(msg, &mut books, &mut closing),
                    Err(_) => closing = Closing::By(None),
                },
                recv(self.idle_rx) -> seat => match seat {
                    Ok(seat) => self.instance_idle(seat, &mut books),
                    Err(_) => break,
                },
                recv(timer) -> _ => {}
            }
        }
        let stopped = ServeError::unavailable(format!("model '{}' shut down before this request ran", self.model));
        self.fail_all(&mut books, &stopped);
        self.stats.set_active_sequences(0);
        if let Some(watch) = &self.watch {
            let _ = watch.send(Watch::Stop);
        }
    }

    fn receive(&self, msg: Msg, books: &mut Books, closing: &mut Closing) {
        match msg {
            Msg::Job(job) => self.admit(job, books),
            Msg::Wake => {}
            Msg::Close(deadline) => *closing = Closing::By(deadline),
        }
    }

    fn reject(&self, job: Job, error: ServeError) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        let _ = job.reply.send(Err(error.into()));
    }

    /// Files a request under its sequence, in arrival order; a request for a sequence that is not
    /// live (never started, ended, released) is refused.
    fn admit(&self, job: Job, books: &mut Books) {
        let Some(tag) = job.sequence.clone() else {
            let e = ServeError::Internal(format!("a request to sequence model '{}' has no sequence", self.model));
            return self.reject(job, e);
        };
        let now = Instant::now();
        match books.sequences.get_mut(&tag.id) {
            Some(seq) if tag.start || !seq.ending => {
                seq.ending = tag.end;
                seq.last_active = now;
                seq.pending.push_back(job);
            }
            Some(_) => {
                let e = ServeError::bad_request(format!(
                    "sequence {} of model '{}' already ended (its request with sequence_end was sent); start a \
                     new one with sequence_start",
                    tag.id, self.model
                ));
                self.reject(job, e);
            }
            None if tag.start => {
                let mut pending = VecDeque::new();
                pending.push_back(job);
                let seq = Sequence {
                    pending,
                    slot: None,
                    candidate: false,
                    last_active: now,
                    in_flight: false,
                    ending: tag.end,
                };
                books.sequences.insert(tag.id.clone(), seq);
                books.waiting.push_back(tag.id);
            }
            None => {
                let e = ServeError::bad_request(format!(
                    "sequence {} of model '{}' is not active: its first request needs sequence_start, or it \
                     already ended or was released after {} us without a request (max_sequence_idle_microseconds)",
                    tag.id,
                    self.model,
                    self.plan.idle.as_micros()
                ));
                self.reject(job, e);
            }
        }
    }

    /// An instance finished its batch: its sequences may run their next request, and those that
    /// ended are released.
    fn instance_idle(&self, seat: usize, books: &mut Books) {
        let Some(idle) = books.idle.get_mut(seat) else { return };
        *idle = true;
        let now = Instant::now();
        for id in std::mem::take(&mut books.running[seat]) {
            let done = match books.sequences.get_mut(&id) {
                Some(seq) => {
                    seq.in_flight = false;
                    seq.last_active = now;
                    seq.ending && seq.pending.is_empty()
                }
                None => false,
            };
            if done {
                self.release(&id, books);
            }
        }
    }

    fn release(&self, id: &SequenceId, books: &mut Books) {
        if let Some(seq) = books.sequences.remove(id) {
            if let Some((seat, slot)) = seq.slot {
                books.slots[seat][slot] = None;
            }
            if seq.candidate {
                books.candidates -= 1;
            }
            books.waiting.retain(|w| w != id);
            lock(&self.states).remove(id);
        }
    }

    /// Drops requests whose client went away, answers expired ones, releases sequences idle for
    /// too long; returns when to look again.
    fn expire(&self, now: Instant, books: &mut Books) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut idle_out = Vec::new();
        for (id, seq) in &mut books.sequences {
            let before = seq.pending.len();
            let mut kept = VecDeque::with_capacity(before);
            for job in seq.pending.drain(..) {
                match job.expires {
                    _ if job.reply.is_closed() => self.stats.record_cancelled(1),
                    Some((at, why)) if at <= now => {
                        let _ = job.reply.send(Err(expiry_error(why, &self.model).into()));
                    }
                    Some((at, _)) => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        kept.push_back(job);
                    }
                    None => kept.push_back(job),
                }
            }
            self.queued.fetch_sub(before - kept.len(), Ordering::AcqRel);
            seq.pending = kept;
            if seq.pending.is_empty() && !seq.in_flight {
                let at = seq.last_active.checked_add(self.plan.idle);
                match at {
                    Some(at) if at <= now => idle_out.push(id.clone()),
                    Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                    None => {}
                }
            }
        }
        for id in idle_out {
            let ended = books.sequences.get(&id).is_some_and(|s| s.ending);
            self.release(&id, books);
            if !ended {
                self.stats.record_sequence_idle();
                tracing::debug!(model = %self.model, sequence = %id, "sequence released after its idle time");
            }
        }
        next
    }

    /// Gives waiting sequences a free slot (direct) or candidacy (oldest), in order.
    fn admit_waiting(&self, books: &mut Books) {
        while let Some(id) = books.waiting.front().cloned() {
            let placed = match self.plan.strategy {
                Strategy::Direct => {
                    // The instance with the most free slots, its lowest free slot.
                    let free = books
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(seat, slots)| {
                            let n = slots.iter().filter(|s| s.is_none()).count();
                            slots.iter().position(Option::is_none).map(|slot| (n, std::cmp::Reverse(seat), slot))
                        })
                        .max();
                    free.map(|(_, std::cmp::Reverse(seat), slot)| {
                        books.slots[seat][slot] = Some(id.clone());
                        if let Some(seq) = books.sequences.get_mut(&id) {
                            seq.slot = Some((seat, slot));
                        }
                    })
                }
                Strategy::Oldest => (books.candidates < self.plan.max_candidates).then(|| {
                    books.candidates += 1;
                    if let Some(seq) = books.sequences.get_mut(&id) {
                        seq.candidate = true;
                    }
                }),
            };
            if placed.is_none() {
                break;
            }
            books.waiting.pop_front();
        }
    }

    /// Sends a batch to every idle instance that has work; returns when a batch held back for
    /// `max_queue_delay_microseconds` (oldest) is due.
    fn dispatch(&self, now: Instant, books: &mut Books, closing: bool) -> Option<Instant> {
        let mut due = None;
        for seat in 0..books.idle.len() {
            if !books.idle[seat] {
                continue;
            }
            let chosen = match self.plan.strategy {
                Strategy::Direct => match self.direct_rows(now, seat, books, closing) {
                    Ok(rows) => rows,
                    Err(at) => {
                        due = Some(due.map_or(at, |d: Instant| d.min(at)));
                        continue;
                    }
                },
                Strategy::Oldest => match self.oldest_rows(now, books, closing) {
                    Ok(rows) => rows,
                    Err(at) => {
                        due = Some(at);
                        break;
                    }
                },
            };
            if chosen.iter().all(Option::is_none) {
                continue;
            }
            self.send(seat, chosen, books);
        }
        due
    }

    /// Direct: one row per slot of the instance, up to its last slot with a request ready;
    /// Err(when) while fewer than `minimum_slot_utilization` of the slots are ready and the
    /// oldest ready request may still wait.
    fn direct_rows(
        &self,
        now: Instant,
        seat: usize,
        books: &Books,
        closing: bool,
    ) -> Result<Vec<Option<SequenceId>>, Instant> {
        let mut template: Option<&Job> = None;
        let mut rows: Vec<Option<SequenceId>> = books.slots[seat]
            .iter()
            .map(|slot| {
                let id = slot.as_ref()?;
                let seq = books.sequences.get(id)?;
                let job = seq.pending.front().filter(|_| !seq.in_flight)?;
                match template {
                    Some(t) if !compatible(&t.inputs, &job.inputs) => None,
                    _ => {
                        template = Some(job);
                        Some(id.clone())
                    }
                }
            })
            .collect();
        while rows.last().is_some_and(Option::is_none) {
            rows.pop();
        }
        let ready = rows.iter().flatten().filter_map(|id| books.sequences.get(id)?.pending.front());
        let oldest = ready.map(|job| job.enqueued).min();
        let share = rows.iter().flatten().count() as f32 / books.slots[seat].len().max(1) as f32;
        match oldest.and_then(|at| at.checked_add(self.plan.direct_delay)) {
            Some(end) if !closing && share < self.plan.min_slot_utilization && now < end => Err(end),
            _ => Ok(rows),
        }
    }

    /// Oldest: the candidates' oldest ready requests, one per sequence, oldest first, up to the
    /// batch size; Err(when) if the batch should wait for more.
    fn oldest_rows(&self, now: Instant, books: &Books, closing: bool) -> Result<Vec<Option<SequenceId>>, Instant> {
        let mut ready: Vec<(&SequenceId, &Job)> = books
            .sequences
            .iter()
            .filter(|(_, s)| s.candidate && !s.in_flight)
            .filter_map(|(id, s)| s.pending.front().map(|j| (id, j)))
            .collect();
        ready.sort_by_key(|(_, j)| j.enqueued);
        let Some(&(_, first)) = ready.first() else { return Ok(Vec::new()) };
        let max = self.slots_per_instance();
        let rows: Vec<Option<SequenceId>> = ready
            .iter()
            .filter(|(_, j)| compatible(&first.inputs, &j.inputs))
            .take(max)
            .map(|(id, _)| Some((*id).clone()))
            .collect();
        let preferred = self.plan.preferred.iter().copied().filter(|&p| p <= max).max();
        let delay_end = first.enqueued.checked_add(self.plan.max_queue_delay);
        let full = rows.len() >= max || preferred.is_some_and(|p| rows.len() >= p);
        let expired = self.plan.max_queue_delay.is_zero() || delay_end.is_none_or(|end| now >= end);
        match (full || expired || closing, delay_end) {
            (false, Some(end)) => Err(end),
            _ => Ok(rows),
        }
    }

    /// Takes each chosen sequence's next request, assembles the batch and hands it to `seat`.
    fn send(&self, seat: usize, chosen: Vec<Option<SequenceId>>, books: &mut Books) {
        let mut jobs = Vec::new();
        let mut rows = Vec::with_capacity(chosen.len());
        let mut ids = Vec::new();
        for id in &chosen {
            let job = id.as_ref().and_then(|id| books.sequences.get_mut(id)?.pending.pop_front());
            match (id, job) {
                (Some(id), Some(job)) => {
                    rows.push(Some(jobs.len()));
                    jobs.push(job);
                    ids.push(id.clone());
                }
                _ => rows.push(None),
            }
        }
        self.queued.fetch_sub(jobs.len(), Ordering::AcqRel);
        let assembled = {
            let states = lock(&self.states);
            let row_views: Vec<Row<'_>> = rows
                .iter()
                .map(|r| match r.and_then(|j| jobs.get(j)) {
                    Some(job) => match &job.sequence {
                        Some(tag) => {
                            Row::Request { inputs: &job.inputs, tag, state: states.get(&tag.id).map(Vec::as_slice) }
                        }
                        None => Row::Empty,
                    },
                    None => Row::Empty,
                })
                .collect();
            assemble(&self.plan, self.batching, &row_views)
        };
        let inputs = match assembled {
            Ok(inputs) => inputs,
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone().into()));
                }
                return;
            }
        };
        for id in &ids {
            if let Some(seq) = books.sequences.get_mut(id) {
                seq.in_flight = true;
            }
        }
        books.running[seat] = ids;
        books.idle[seat] = false;
        let sequence = SequenceBatch { inputs, rows, plan: self.plan.clone(), states: self.states.clone() };
        let batch = Batch { jobs, sequence: Some(sequence) };
        if self.seat_tx[seat].send(batch).is_err() {
            tracing::warn!(model = %self.model, instance = seat, "an instance is gone; its batch is dropped");
        }
    }

    fn fail_all(&self, books: &mut Books, error: &ServeError) {
        for seq in books.sequences.values_mut() {
            self.queued.fetch_sub(seq.pending.len(), Ordering::AcqRel);
            for job in seq.pending.drain(..) {
                let _ = job.reply.send(Err(error.clone().into()));
            }
        }
    }
}
