//! Counters of the front ends: open connections and requests per protocol, and requests for models
//! that do not exist (counted without their name, so clients cannot grow label sets).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The front end a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    HttpBinary,
    Grpc,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Http, Protocol::HttpBinary, Protocol::Grpc];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::HttpBinary => "http_binary",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Connection and request counts per protocol, plus failures that belong to no model.
#[derive(Default)]
pub struct TransportMetrics {
    pub(crate) open_http: AtomicI64,
    pub(crate) open_grpc: AtomicI64,
    pub(crate) requests: [AtomicU64; 3],
    pub(crate) unknown_model: AtomicU64,
}

impl TransportMetrics {
    pub fn request(&self, p: Protocol) {
        self.requests[p as usize].fetch_add(1, Relaxed);
    }

    /// An infer request for a model or version that does not exist. Counted without the name, so
    /// clients cannot create unbounded label values.
    pub fn unknown_model(&self) {
        self.unknown_model.fetch_add(1, Relaxed);
    }

    /// Client connections open now, over every listener.
    pub fn open_connections(&self) -> i64 {
        self.open_http.load(Relaxed) + self.open_grpc.load(Relaxed)
    }

    /// Counts a connection as open until the guard drops.
    pub fn connection(self: &Arc<Self>, grpc: bool) -> ConnectionGuard {
        self.gauge(grpc).fetch_add(1, Relaxed);
        ConnectionGuard { metrics: self.clone(), grpc }
    }

    fn gauge(&self, grpc: bool) -> &AtomicI64 {
        if grpc {
            &self.open_grpc
        } else {
            &self.open_http
        }
    }
}

pub struct ConnectionGuard {
    metrics: Arc<TransportMetrics>,
    grpc: bool,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.grpc).fetch_sub(1, Relaxed);
    }
}
