//! Connection-level limits shared by the listeners: the cap on open connections, and the idle
//! timer that closes a connection once it has gone without a request for a while.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// At most `max` connections open at once over every listener that shares it.
#[derive(Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))), max }
    }

    /// A slot for a connection just accepted, held while it stays open; `None` when every slot is
    /// taken, and the caller then closes the connection at once (the client sees it closed rather
    /// than waiting in the kernel's backlog).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            tracing::debug!(max_connections = self.max, "connection refused: too many open connections");
        }
        slot
    }
}

/// What the idle timer of one connection watches: requests in flight and when the last one ended.
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds after `opened` when the connection last became idle.
    idle_since_ns: AtomicU64,
}

/// One request in flight on a connection; dropping it marks the request done.
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { opened: Instant::now(), in_flight: AtomicUsize::new(0), idle_since_ns: AtomicU64::new(0) })
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `timeout`. Sleeps at most a
    /// `timeout` at a time, so a busy connection costs one timer, no polling loop.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let wait = if self.in_flight.load(Ordering::Acquire) > 0 {
                timeout
            } else {
                let since = Duration::from_nanos(self.idle_since_ns.load(Ordering::Acquire));
                let idle_for = self.opened.elapsed().saturating_sub(since);
                if idle_for >= timeout {
                    return;
                }
                timeout - idle_for
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Recorded before the count drops, so a timer that sees zero also sees the new time.
        self.0.idle_since_ns.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_returned_when_connections_close() {
        let limit = ConnectionLimit::new(2);
        let (a, b) = (limit.admit(), limit.admit());
        assert!(a.is_some() && b.is_some());
        assert!(limit.admit().is_none());
        drop(a);
        assert!(limit.admit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_in_flight() {
        let activity = Activity::new();
        let request = activity.begin();
        let timeout = Duration::from_secs(10);
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!idle.is_finished(), "a connection with a request in flight is not idle");
        drop(request);
        let ended = tokio::time::Instant::now();
        idle.await.unwrap();
        assert!(ended.elapsed() >= timeout);
    }
}
