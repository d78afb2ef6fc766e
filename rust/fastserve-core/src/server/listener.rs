//! Connection admission, the one path every listener (HTTP, gRPC, metrics; plain or TLS) takes:
//! the cap on open connections, the open-connection gauge, the TLS handshake in a task of its own,
//! and the idle timer that closes a connection once it has gone without a request for a while.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::observe::transport::{ConnectionGuard, TransportMetrics};
use crate::server::tls::handshake;

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

/// An accepted connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A client connection admitted under `max_connections`: holds its slot and counts as open (by
/// protocol) for as long as it lives.
pub struct Admitted {
    stream: Stream,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
    _open: ConnectionGuard,
}

impl Admitted {
    pub fn peer(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }
}

/// Accepts on `listener` until `shutdown` flips: every connection takes a slot under
/// `max_connections` at once (one over it is closed as soon as accepted) and counts as open; a TLS
/// handshake then runs in the connection's own task (bounded by the handshake timeout), so a slow
/// client delays no one else. Yields the connections ready to serve.
pub fn admit(
    listener: TcpListener,
    limit: Arc<ConnectionLimit>,
    transport: Arc<TransportMetrics>,
    tls: Option<TlsAcceptor>,
    grpc: bool,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<io::Result<Admitted>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = async { shutdown.wait_for(|&s| s).await.map(|_| ()) } => break,
                _ = tx.closed() => break,
            };
            let Some(slot) = limit.admit() else { continue };
            let _ = stream.set_nodelay(true);
            let info = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: Some(peer) };
            let open = transport.connection(grpc);
            let admitted = |stream| Admitted { stream, info, _slot: slot, _open: open };
            match &tls {
                None => {
                    if tx.send(Ok(admitted(Stream::Plain(stream)))).await.is_err() {
                        break;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        match handshake(&acceptor, stream).await {
                            Ok(tls) => {
                                let _ = tx.send(Ok(admitted(Stream::Tls(Box::new(tls))))).await;
                            }
                            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        }
                    });
                }
            }
        }
    });
    rx
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

macro_rules! on_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($s) => $e,
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Admitted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_stream!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => Pin::new(s).poll_shutdown(cx))
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
