//! Every server option, defined once: name, type, default, help and range. The `fastserve` flags,
//! their `FASTSERVE_*` variables and the embedding API's keywords are generated from this table
//! ([`ServerOptions::describe`]); [`ServerOptions::build`] checks the values and turns them into the
//! running [`ServerConfig`](super::ServerConfig).

use std::path::PathBuf;
use std::time::Duration;

use super::auth::Auth;
use super::tls::{Tls, TlsFiles};
use super::ServerConfig;
use crate::compression::Coding;
use crate::error::{Result as ServeResult, ServeError};
use crate::options::options;

options! {
    /// The settings of a server, as `fastserve serve` flags and `fastserve.Server` keywords.
    pub struct ServerOptions {
        /// address to listen on
        host: String = "127.0.0.1".into();
        /// HTTP port; 0 picks a free one
        http_port: u32 = 8000, range = 0..=65535;
        /// gRPC port; 0 picks a free one (embedded: None serves HTTP only)
        grpc_port: Option<u32> = None, cli = Some(8001), range = 0..=65535;
        /// Prometheus /metrics port; 0 picks a free one (embedded: None serves no metrics)
        metrics_port: Option<u32> = None, cli = Some(8002), range = 0..=65535;
        /// log one line per inference request
        access_log: bool = false;
        /// ready only when every model version loaded (false: ready once the server is up and the startup loads finished, even if some model failed)
        strict_readiness: bool = true;
        /// network threads (0: half the cores, at least 1; the model instances run on the other half)
        worker_threads: usize = 0;
        /// how long shutdown waits for requests in flight before stopping the models
        drain_timeout_s: f64 = 30.0;
        /// largest gRPC message received or sent, in bytes
        grpc_max_message_bytes: usize = 64 * 1024 * 1024;
        /// compress gRPC responses for clients that accept it (none, as Triton); compressed requests are always accepted
        grpc_response_compression: String = "none".into(), choices = &["none", "gzip", "deflate"];
        /// do not serve the Swagger UI page at /v2/docs (the OpenAPI document at /v2/openapi.json stays)
        no_swagger_ui: bool = false;
        /// largest request body in bytes, also once chunked or compressed bodies are read (413)
        max_body_bytes: usize = 64 * 1024 * 1024, group = "limits";
        /// largest request head in bytes, at least 8192 (431)
        max_header_bytes: usize = 64 * 1024, group = "limits", range = 8192..=4294967295;
        /// most header fields in an HTTP/1 request (431)
        max_headers: usize = 100, group = "limits";
        /// deepest JSON nesting accepted, 1-127 (400)
        max_json_depth: usize = 64, group = "limits", range = 1..=127;
        /// most tensor elements over a request's inputs (413; default: what the largest body or message holds)
        max_request_elements: Option<usize> = None, group = "limits";
        /// open connections over all listeners; more are closed as soon as accepted
        max_connections: usize = 16_384, group = "limits";
        /// concurrent calls per gRPC connection
        grpc_max_concurrent_streams: u32 = 256, group = "limits";
        /// seconds to send an HTTP/1 request head (408)
        header_read_timeout_s: f64 = 30.0, group = "limits";
        /// seconds to send a request body (408)
        body_read_timeout_s: f64 = 60.0, group = "limits";
        /// close connections that go this many seconds without a request
        idle_timeout_s: f64 = 120.0, group = "limits";
        /// bearer token required for inference, metadata and statistics
        auth_token: Option<String> = None, group = "hidden";
        /// bearer token of the repository API (without it, the repository API takes auth_token)
        admin_token: Option<String> = None, group = "hidden";
        /// serve HTTP and gRPC over TLS with this PEM certificate chain
        tls_cert: Option<PathBuf> = None, group = "security";
        /// private key (PEM) of tls_cert
        tls_key: Option<PathBuf> = None, group = "security";
        /// require client certificates issued by this CA (PEM; mTLS)
        tls_client_ca: Option<PathBuf> = None, group = "security";
        /// serve the repository API on a non-loopback host without an admin token (refused by default)
        allow_remote_repository_api: bool = false, group = "security";
        /// refuse Triton's system shared-memory extension (registering regions, tensors in shared memory)
        no_shared_memory: bool = false, group = "security";
    }
}

/// What one client may ask of the server: sizes, counts and timeouts. Every limit answers with
/// the protocol's error before the oversized amount is read or allocated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, also once chunked or compressed bodies are read and inflated (413).
    pub max_body_bytes: usize,
    /// Largest request head: HTTP/1 header buffer and HTTP/2 header list (431).
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request (431).
    pub max_headers: usize,
    /// Deepest nesting of arrays and objects in a JSON body (400).
    pub max_json_depth: usize,
    /// Most tensor elements, summed over a request's inputs, checked from the shapes (413).
    pub max_request_elements: usize,
    /// Most open client connections over all listeners; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Most concurrent gRPC streams (calls) per HTTP/2 connection.
    pub grpc_max_concurrent_streams: u32,
    /// How long a client may take to send a request's head (HTTP/1; 408, then closed).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body (408).
    pub body_read_timeout: Duration,
    /// How long a connection may sit without a request before it is closed.
    pub idle_timeout: Duration,
}

/// The smallest request head buffer hyper's HTTP/1 accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The deepest JSON nesting `max_json_depth` may allow: serde_json's parser stops at 128 levels.
pub const JSON_DEPTH_CEILING: usize = 127;

impl Default for Limits {
    /// The limits of the default [`ServerOptions`], where they are defined.
    fn default() -> Self {
        ServerOptions::default().limits().unwrap_or_else(|e| unreachable!("default limits: {e}"))
    }
}

impl Limits {
    /// Refuses a request whose input shapes (all of them, before any data is decoded) hold more
    /// than `max_request_elements` elements in all. Negative or overflowing shapes are left to the
    /// decoders, which name them.
    pub fn admit_shapes<'a>(&self, shapes: impl IntoIterator<Item = &'a [i64]>) -> ServeResult<()> {
        let total = shapes.into_iter().try_fold(0usize, |total, shape| {
            let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))?;
            total.checked_add(n)
        });
        total.map_or(Ok(()), |total| self.admit_elements(total))
    }

    /// Refuses a request whose input shapes hold more than `max_request_elements` elements in all.
    pub fn admit_elements(&self, total: usize) -> ServeResult<()> {
        if total > self.max_request_elements {
            return Err(ServeError::PayloadTooLarge(format!(
                "the request's inputs hold {total} tensor elements, over the limit of {}",
                self.max_request_elements
            )));
        }
        Ok(())
    }
}

fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{name} must be a positive number of seconds, got {s}")),
    }
}

impl ServerOptions {
    /// The request limits these options set.
    pub fn limits(&self) -> Result<Limits, String> {
        let limits = Limits {
            max_body_bytes: self.max_body_bytes,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            max_json_depth: self.max_json_depth,
            // By default as many as the largest body or gRPC message could hold (one byte each).
            max_request_elements: self
                .max_request_elements
                .unwrap_or(self.max_body_bytes.max(self.grpc_max_message_bytes)),
            max_connections: self.max_connections,
            grpc_max_concurrent_streams: self.grpc_max_concurrent_streams,
            header_read_timeout: seconds("header_read_timeout_s", self.header_read_timeout_s)?,
            body_read_timeout: seconds("body_read_timeout_s", self.body_read_timeout_s)?,
            idle_timeout: seconds("idle_timeout_s", self.idle_timeout_s)?,
        };
        let positive = [
            ("max_body_bytes", limits.max_body_bytes),
            ("max_headers", limits.max_headers),
            ("max_request_elements", limits.max_request_elements),
            ("max_connections", limits.max_connections),
            ("grpc_max_concurrent_streams", limits.grpc_max_concurrent_streams as usize),
            ("grpc_max_message_bytes", self.grpc_max_message_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !(MIN_HEADER_BYTES..=u32::MAX as usize).contains(&limits.max_header_bytes) {
            return Err(format!("max_header_bytes must be between {MIN_HEADER_BYTES} and {}", u32::MAX));
        }
        if !(1..=JSON_DEPTH_CEILING).contains(&limits.max_json_depth) {
            return Err(format!("max_json_depth must be between 1 and {JSON_DEPTH_CEILING}"));
        }
        Ok(limits)
    }

    /// Checks every value and builds the running configuration; the message names the setting.
    /// TLS files are read here, so a bad file is reported before anything listens.
    pub fn build(self) -> Result<ServerConfig, BuildError> {
        self.check_ranges().map_err(BuildError::Invalid)?;
        let limits = self.limits().map_err(BuildError::Invalid)?;
        for (what, token) in [("auth_token", &self.auth_token), ("admin_token", &self.admin_token)] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(BuildError::Invalid(format!("{what} must not be empty")));
            }
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(
                Tls::load(&TlsFiles { cert, key, client_ca: self.tls_client_ca })
                    .map_err(|e| BuildError::Files(e.to_string()))?,
            ),
            (None, None) if self.tls_client_ca.is_none() => None,
            _ => {
                return Err(BuildError::Invalid(
                    "TLS needs both tls_cert and tls_key (tls_client_ca is optional)".into(),
                ))
            }
        };
        let drain_timeout = Duration::try_from_secs_f64(self.drain_timeout_s).map_err(|_| {
            BuildError::Invalid(format!("drain_timeout_s must be a non-negative number, got {}", self.drain_timeout_s))
        })?;
        let grpc_response_compression = Coding::parse_setting(&self.grpc_response_compression)
            .map_err(|e| BuildError::Invalid(format!("grpc_response_compression {e}")))?;
        let worker_threads = match self.worker_threads {
            // Network threads that outnumber the cores left to them wake each other for every
            // request (on 2 cores, 2 threads served 10-25% fewer requests than 1, at a higher p99:
            // benches/RESULTS.md).
            0 => default_worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get())),
            n => n,
        };
        // In range (checked above), so the narrowing cannot fail.
        let port = |p: u32| u16::try_from(p).unwrap_or(u16::MAX);
        Ok(ServerConfig {
            host: self.host,
            http_port: port(self.http_port),
            grpc_port: self.grpc_port.map(port),
            grpc_max_message_bytes: self.grpc_max_message_bytes,
            limits,
            metrics_port: self.metrics_port.map(port),
            access_log: self.access_log,
            worker_threads,
            drain_timeout,
            auth: Auth::new(self.auth_token, self.admin_token),
            tls,
            grpc_response_compression,
            allow_remote_repository_api: self.allow_remote_repository_api,
            shared_memory: !self.no_shared_memory,
            strict_readiness: self.strict_readiness,
            swagger_ui: !self.no_swagger_ui,
        })
    }
}

/// Why options could not become a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A value out of range or contradicting another (a usage error).
    #[error("{0}")]
    Invalid(String),
    /// A file named by an option cannot be read or used (TLS).
    #[error("{0}")]
    Files(String),
}

/// The network threads for `cores` cores: half of them, at least one.
fn default_worker_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_network_takes_half_the_cores_and_at_least_one() {
        assert_eq!([1, 2, 3, 4, 16].map(default_worker_threads), [1, 1, 1, 2, 8]);
    }

    #[test]
    fn every_option_is_described_with_its_default() {
        let all = ServerOptions::describe();
        let grpc = all.iter().find(|o| o.name == "grpc_port").unwrap();
        assert_eq!((grpc.kind, grpc.optional, &grpc.default), ("int", true, &Value::Null));
        assert_eq!(grpc.cli_default, Some(Value::from(8001)));
        let body = all.iter().find(|o| o.name == "max_body_bytes").unwrap();
        assert_eq!((body.group, &body.default), ("limits", &Value::from(64 * 1024 * 1024)));
        let compression = all.iter().find(|o| o.name == "grpc_response_compression").unwrap();
        assert_eq!(compression.choices, &["none", "gzip", "deflate"]);
        assert!(all.iter().all(|o| !o.help.is_empty()));
    }

    #[test]
    fn bad_values_name_the_option() {
        let cases = [
            (ServerOptions { max_json_depth: 500, ..Default::default() }, "max_json_depth"),
            (ServerOptions { idle_timeout_s: 0.0, ..Default::default() }, "idle_timeout_s"),
            (
                ServerOptions { grpc_response_compression: "zstd".into(), ..Default::default() },
                "grpc_response_compression",
            ),
            (ServerOptions { auth_token: Some(" ".into()), ..Default::default() }, "auth_token"),
            (ServerOptions { tls_key: Some("k.pem".into()), ..Default::default() }, "TLS needs both"),
        ];
        for (options, name) in cases {
            let err = options.build().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let unknown = serde_json::from_str::<ServerOptions>(r#"{"max_body_byte": 1}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown field `max_body_byte`"), "{unknown}");
    }
}
