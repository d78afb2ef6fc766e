//! Process-wide log setup: `tracing` to stderr as text or JSON lines, and, with the `otel` cargo
//! feature, spans exported to an OpenTelemetry collector over OTLP/HTTP.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

static TRACING_SPANS: AtomicBool = AtomicBool::new(false);

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Whether this build can export traces (`otel` cargo feature).
pub const OTEL_AVAILABLE: bool = cfg!(feature = "otel");

/// Installs the global subscriber once; later calls return `Ok(false)` so embedding apps stay in
/// charge. `otel_endpoint` (an OTLP/HTTP traces URL) needs the `otel` feature.
pub fn init(level: &str, json: bool, otel_endpoint: Option<&str>) -> Result<bool, String> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let fmt: BoxedLayer =
        if json { fmt.json().flatten_event(true).with_filter(filter).boxed() } else { fmt.with_filter(filter).boxed() };
    let mut layers = vec![fmt];
    if let Some(endpoint) = otel_endpoint {
        layers.push(otel::layer(endpoint)?);
        TRACING_SPANS.store(true, Ordering::Relaxed);
    }
    Ok(tracing_subscriber::registry().with(layers).try_init().is_ok())
}

/// Request spans cost an allocation each, so front ends create them only when exported.
pub fn spans_enabled() -> bool {
    TRACING_SPANS.load(Ordering::Relaxed)
}

/// The trace span of one request, created only when spans are exported.
pub fn request_span(model: &str) -> tracing::Span {
    if spans_enabled() {
        tracing::info_span!("infer", model)
    } else {
        tracing::Span::none()
    }
}

/// Sends the spans still buffered; call before the process exits.
pub fn flush() {
    otel::flush();
}

#[cfg(feature = "otel")]
mod otel {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::Layer;

    use super::BoxedLayer;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    pub fn layer(endpoint: &str) -> Result<BoxedLayer, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("cannot set up OpenTelemetry export to {endpoint}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("fastserve").build())
            .build();
        let tracer = provider.tracer("fastserve");
        let _ = PROVIDER.set(provider);
        Ok(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(LevelFilter::INFO).boxed())
    }

    pub fn flush() {
        if let Some(p) = PROVIDER.get() {
            let _ = p.force_flush();
        }
    }
}

#[cfg(not(feature = "otel"))]
mod otel {
    use super::BoxedLayer;

    pub fn layer(_endpoint: &str) -> Result<BoxedLayer, String> {
        Err("this build of fastserve has no OpenTelemetry support; rebuild with the `otel` cargo feature".into())
    }

    pub fn flush() {}
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Spans reach a real OTLP/HTTP endpoint (a one-shot listener here) as protobuf.
    #[test]
    fn otel_exports_request_spans() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let receiver = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = conn.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if request.len() >= head_end + 4 + length {
                        break;
                    }
                }
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
            request
        });
        super::init("info", true, Some(&url)).unwrap();
        assert!(super::spans_enabled());
        tracing::info_span!("infer", model = "otel-probe-model").in_scope(|| tracing::info!("inside"));
        super::flush();
        let request = receiver.join().unwrap();
        let text = String::from_utf8_lossy(&request);
        assert!(text.starts_with("POST /v1/traces"), "{text}");
        assert!(text.contains("application/x-protobuf"));
        assert!(text.contains("otel-probe-model") && text.contains("infer"));
    }
}
