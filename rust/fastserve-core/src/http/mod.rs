//! The KServe V2 REST front end on hyper (HTTP/1.1 and h2c).

pub mod generate;
pub mod json;
pub mod tfserving;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::compression::Coding;
use crate::error::{Result, ServeError};
use crate::http::json::{check_json_depth, encode_infer_response, error_body, parse_infer_request};
use crate::observe::logging::request_span;
use crate::observe::transport::Protocol;
use crate::pipeline::{Call, Target};
use crate::request::Parameters;
use crate::server::auth::Scope;
use crate::server::listener::{admit, Activity};
use crate::server::metrics::{self, ServerCollector};
use crate::server::model_config;
use crate::server::state::{Limits, ServerState, MIN_HEADER_BYTES};

pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";
pub const REQUEST_ID: &str = "x-request-id";
/// Requests with the same key reach the same version while routing weights stay unchanged.
pub const ROUTING_KEY: &str = "x-routing-key";

/// The OpenAPI document served at `/v2/openapi.json`: docs/openapi.yaml, converted by build.rs.
static OPENAPI_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.json"));
const OPENAPI_PATH: &str = "/v2/openapi.json";
/// The Swagger UI page (and its assets below it).
const DOCS_PATH: &str = "/v2/docs";

/// A whole body, or Server-Sent Events as they are produced.
type Body = Either<Full<Bytes>, StreamBody<ReceiverStream<std::result::Result<Frame<Bytes>, Infallible>>>>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// Events of one `generate_stream` response produced but not yet written to the client.
const SSE_BUFFERED: usize = 4;

/// Accepts connections until `shutdown` flips, then waits up to `drain` for open requests.
/// With `tls`, every connection is a TLS one (the handshake runs in the connection's own task).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<TlsAcceptor>,
) {
    let handler_state = state.clone();
    serve_with(listener, state, shutdown, drain, tls, move |req| handle(handler_state.clone(), req)).await
}

/// The Prometheus endpoint on its own listener: `GET /metrics` and nothing else.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<ServerState>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<TlsAcceptor>,
) {
    let registry = Arc::new(ServerCollector::registry(state.clone()));
    serve_with(listener, state, shutdown, drain, tls, move |req: Request<Incoming>| {
        let registry = registry.clone();
        async move {
            let resp = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
                let (body, content_type) = metrics::encode(&registry, accept);
                let mut resp = Response::new(full(body));
                resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                resp
            } else {
                error_response(&ServeError::not_found("only GET /metrics is served on this port"))
            };
            Ok::<_, Infallible>(resp)
        }
    })
    .await
}

async fn serve_with<F, Fut>(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<TlsAcceptor>,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::result::Result<Response<Body>, Infallible>> + Send + 'static,
{
    let builder = connection_builder(&state.limits);
    let idle_timeout = state.limits.idle_timeout;
    let mut admitted =
        admit(listener, state.connections.clone(), state.transport.clone(), tls, false, shutdown.clone());
    // Every connection task holds a sender; the receiver sees the channel close once all are done.
    let (open_connections, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            next = admitted.recv() => {
                let Some(Ok(stream)) = next else {
                    if next.is_none() { break }
                    continue;
                };
                let (builder, handler) = (builder.clone(), handler.clone());
                let (shutdown, tracker) = (shutdown.clone(), open_connections.clone());
                tokio::spawn(async move {
                    let peer = stream.peer();
                    let conn = Conn { builder: &builder, shutdown, idle_timeout };
                    if let Err(e) = conn.serve(stream, handler).await {
                        tracing::debug!(?peer, error = %e, "connection ended with an error");
                    }
                    drop(tracker);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop((admitted, open_connections));
    if tokio::time::timeout(drain, all_closed.recv()).await.is_err() {
        tracing::warn!(timeout_s = drain.as_secs_f64(), "drain timed out; closing remaining connections");
    }
}

/// HTTP/1 and HTTP/2 settings from the limits: head size and count, header timeout, keepalive.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished while a long request runs with no frames flowing.
        .keep_alive_interval(limits.idle_timeout);
    builder
}

/// How one connection is served: the protocol settings, the server's shutdown signal and the
/// idle timeout.
struct Conn<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
}

impl Conn<'_> {
    /// Serves a (plain or TLS) connection until the client closes it, the server drains, or it has
    /// had no request in flight for the idle timeout; the last two end it gracefully (HTTP/1
    /// finishes the response under way, HTTP/2 sends GOAWAY and finishes open streams).
    async fn serve<IO, F, Fut>(
        mut self,
        io: IO,
        handler: F,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::result::Result<Response<Body>, Infallible>> + Send + 'static,
    {
        let activity = Activity::new();
        let service = {
            let activity = activity.clone();
            service_fn(move |req| {
                let in_flight = activity.begin();
                let response = handler(req);
                async move {
                    let response = response.await;
                    drop(in_flight);
                    response
                }
            })
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            done = conn.as_mut() => return done,
            _ = self.shutdown.wait_for(|&s| s) => {}
            _ = activity.idle(self.idle_timeout) => tracing::debug!("closing an idle connection"),
        }
        conn.as_mut().graceful_shutdown();
        conn.await
    }
}

async fn handle(state: Arc<ServerState>, req: Request<Incoming>) -> std::result::Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut req = Req { parts, body: Some(body) };
    let mut resp = route(&state, &mut req).await.unwrap_or_else(|e| error_response(&e));
    if let Some(body) = req.body.take() {
        keep_alive_after_unread(&req.parts, body, &mut resp, &state.limits).await;
    }
    Ok(resp)
}

/// A request whose body is read only by the handlers that need it.
struct Req {
    parts: http::request::Parts,
    body: Option<Incoming>,
}

impl Req {
    fn header(&self, name: impl http::header::AsHeaderName) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads the whole body within the limits (see [`read_body`]).
    async fn read_body(&mut self, limits: &Limits) -> Result<Bytes> {
        let body = self.take_body()?;
        read_body(declared_length(&self.parts), body, limits).await
    }

    fn take_body(&mut self) -> Result<Incoming> {
        self.body.take().ok_or_else(|| ServeError::Internal("the request body was already read".into()))
    }
}

/// Largest body read and dropped after an answer that did not need it, to keep the connection.
const DISCARD_LIMIT: usize = 1024 * 1024;

/// An HTTP/1 connection can carry the next request only once this one's body was read. After an
/// early answer (unknown model, not ready, auth failure, ...) a small body is read and dropped; a
/// larger or slow one gets `Connection: close`, so the client never writes into a closed socket.
async fn keep_alive_after_unread(
    parts: &http::request::Parts,
    body: Incoming,
    resp: &mut Response<Body>,
    limits: &Limits,
) {
    use hyper::body::Body as _;
    if parts.version >= http::Version::HTTP_2 || body.is_end_stream() {
        return;
    }
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let small = declared.is_none_or(|n| n <= DISCARD_LIMIT as u64);
    let drained = small
        && matches!(
            tokio::time::timeout(limits.body_read_timeout, Limited::new(body, DISCARD_LIMIT).collect()).await,
            Ok(Ok(_))
        );
    if !drained {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok_json(value: &impl serde::Serialize) -> Response<Body> {
    json_response(StatusCode::OK, serde_json::to_vec(value).unwrap_or_default())
}

fn error_response(e: &ServeError) -> Response<Body> {
    let mut resp = json_response(e.http_status(), error_body(&e.to_string()));
    if matches!(e, ServeError::Unauthorized(_)) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// What a path needs: probes and the API's description are open, the repository API is
/// management, the rest inference.
fn scope_of(path: &str) -> Scope {
    if path.starts_with("/v2/health/") || path == OPENAPI_PATH || path == DOCS_PATH || path.starts_with("/v2/docs/") {
        Scope::Open
    } else if path.starts_with("/v2/repository") {
        Scope::Admin
    } else {
        Scope::Inference
    }
}

/// A health answer: 200 when true, 400 otherwise (the V2 spec's "4xx means false", as Triton does).
fn status_only(ok: bool) -> Response<Body> {
    json_response(if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST }, Vec::new())
}

async fn route(state: &Arc<ServerState>, req: &mut Req) -> Result<Response<Body>> {
    let method = req.parts.method.clone();
    let path = req.parts.uri.path().to_string();
    state.auth.check(scope_of(&path), req.parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes))?;
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["v2"] if get => Ok(ok_json(&state.server_metadata())),
        ["v2", "health", "live"] if get => Ok(status_only(state.is_live())),
        ["v2", "health", "ready"] if get => Ok(match state.not_ready_reason() {
            None => status_only(true),
            Some(why) => json_response(StatusCode::BAD_REQUEST, error_body(&format!("not ready: {why}"))),
        }),
        ["v2", "models", "stats"] if get => Ok(ok_json(&state.model_stats(None, None)?)),
        ["v2", "repository", "index"] if post => repository_index(state, req).await,
        ["v2", "repository", "models", model, action @ ("load" | "unload")] if post => {
            repository_change(state, model, action, req).await
        }
        ["v2", "models", model, rest @ ..] => {
            let (version, action) = match rest {
                ["versions" | "labels", v, action @ ..] => (Some(*v), action),
                action => (None, action),
            };
            match action {
                [] if get => model_metadata(state, model, version),
                ["ready"] if get => model_ready(state, model, version),
                ["stats"] if get => Ok(ok_json(&state.model_stats(Some(model), version)?)),
                ["config"] if get => Ok(ok_json(&model_config::to_json(&model_config::build(state, model, version)?))),
                ["infer"] if post => {
                    Ok(infer_endpoint(state, model, version, req).instrument(request_span(model)).await)
                }
                ["generate"] if post => {
                    Ok(generate_endpoint(state, model, version, req).instrument(request_span(model)).await)
                }
                ["generate_stream"] if post => {
                    Ok(generate_stream_endpoint(state, model, version, req).instrument(request_span(model)).await)
                }
                [] | ["ready"] | ["infer"] | ["generate" | "generate_stream"] | ["stats"] | ["config"] => {
                    Err(method_not_allowed(&method, &path))
                }
                _ => Err(ServeError::not_found(format!("no route for {method} {path}"))),
            }
        }
        ["v2", "openapi.json"] if get => {
            let mut resp = Response::new(full(OPENAPI_JSON));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(resp)
        }
        ["v2", "docs", rest @ ..] if get => swagger_ui(state, rest).await,
        ["v2", "openapi.json"] | ["v2", "docs", ..] => Err(method_not_allowed(&method, &path)),
        ["v1", "models", rest @ ..] => tf_serving(state, &method, &path, rest, req).await,
        ["v2", "systemsharedmemory", rest @ ..] => shared_memory(state, &method, &path, rest, req).await,
        ["v2", "cudasharedmemory", ..] => Err(cuda_shared_memory()),
        ["v2"] | ["v2", "health", "live" | "ready"] => Err(method_not_allowed(&method, &path)),
        _ => Err(ServeError::not_found(format!("no route for {method} {path}"))),
    }
}

/// The Swagger UI page at `/v2/docs` and its JS/CSS below it, from the assets the
/// `swagger-ui-dist` crate ships (nothing is fetched from the network); it reads `/v2/openapi.json`.
async fn swagger_ui(state: &ServerState, rest: &[&str]) -> Result<Response<Body>> {
    if !state.swagger_ui {
        return Err(ServeError::not_found("the Swagger UI page is turned off (--no-swagger-ui)"));
    }
    let mut router = swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: DOCS_PATH,
        api_definition: swagger_ui_dist::OpenApiSource::Uri(OPENAPI_PATH),
        title: Some("fastserve API"),
    });
    // The page names its assets after the request's URI: ask with the bare path.
    let path = if rest.is_empty() { DOCS_PATH.to_string() } else { format!("{DOCS_PATH}/{}", rest.join("/")) };
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(Full::<Bytes>::default())
        .map_err(|e| ServeError::bad_request(format!("bad documentation path: {e}")))?;
    let response = match tonic::codegen::Service::call(&mut router, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    if parts.status == StatusCode::NOT_FOUND {
        return Err(ServeError::not_found(format!("no Swagger UI asset {DOCS_PATH}/{}", rest.join("/"))));
    }
    let body = body.collect().await.map_err(|e| ServeError::Internal(format!("Swagger UI asset: {e}")))?.to_bytes();
    Ok(Response::from_parts(parts, full(body)))
}

/// KServe V1 / TensorFlow Serving REST: `/v1/models/{m}[/versions/{v}|/labels/{l}][:predict]`.
async fn tf_serving(
    state: &ServerState,
    method: &Method,
    path: &str,
    rest: &[&str],
    req: &mut Req,
) -> Result<Response<Body>> {
    let no_route = || ServeError::not_found(format!("no route for {method} {path}"));
    let (last, others) = rest.split_last().ok_or_else(no_route)?;
    let (last, verb) = match last.rsplit_once(':') {
        Some((last, verb)) => (last, Some(verb)),
        None => (*last, None),
    };
    let (model, version) = match others {
        [] => (last, None),
        [model, "versions" | "labels"] => (*model, Some(last)),
        _ => return Err(no_route()),
    };
    match verb {
        None if method == Method::GET => {
            let entry = state.registry.model(model)?;
            let mv = version.map(|v| state.registry.resolve(model, Some(v))).transpose()?;
            Ok(ok_json(&tfserving::model_status(&entry, mv.as_deref())))
        }
        Some("predict") if method == Method::POST => {
            Ok(predict_endpoint(state, model, version, req).instrument(request_span(model)).await)
        }
        None | Some("predict") => Err(method_not_allowed(method, path)),
        Some(verb) => Err(ServeError::not_found(format!(
            "':{verb}' is not served on {path}: only ':predict' (classify and regress are TensorFlow-specific)"
        ))),
    }
}

/// `POST /v1/models/{m}[/versions/{v}]:predict`: a TensorFlow Serving body, run as a V2 request.
async fn predict_endpoint(state: &ServerState, model: &str, version: Option<&str>, req: &mut Req) -> Response<Body> {
    let mut call = Call::new(state, Protocol::Http, generate_target(model, version, req));
    let result: Result<Response<Body>> = async {
        call.resolve()?;
        let body = req.read_body(&state.limits).await?;
        let spec = call.spec()?;
        let (request, form) = tfserving::parse_predict_request(&body, &spec, &state.limits)?;
        let response = call.run(request).await?;
        Ok(ok_json(&tfserving::predict_response(&response, form)?))
    }
    .await;
    let id = call.finish(result.as_ref().map(|_| ()));
    with_request_id(result.unwrap_or_else(|e| error_response(&e)), &id)
}

/// Runs a repository operation on a blocking thread: loading a model can take a long time.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Internal(format!("repository operation failed: {e}")))?
}

async fn repository_index(state: &ServerState, req: &mut Req) -> Result<Response<Body>> {
    let control = state.repository_index()?;
    let body = req.read_body(&state.limits).await?;
    let params: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        check_json_depth(&body, state.limits.max_json_depth)?;
        serde_json::from_slice(&body).map_err(|e| ServeError::bad_request(format!("malformed index request: {e}")))?
    };
    let ready_only = params.get("ready").and_then(serde_json::Value::as_bool).unwrap_or(false);
    let index = blocking(move || control.index(ready_only)).await?;
    Ok(json_response(StatusCode::OK, serde_json::to_vec(&index).unwrap_or_default()))
}

async fn repository_change(state: &ServerState, model: &str, action: &str, req: &mut Req) -> Result<Response<Body>> {
    let control = state.repository()?;
    let body = req.read_body(&state.limits).await?;
    let parameters = if body.is_empty() {
        Parameters::new()
    } else {
        #[derive(serde::Deserialize)]
        struct Change {
            #[serde(default)]
            parameters: Option<Parameters>,
        }
        check_json_depth(&body, state.limits.max_json_depth)?;
        serde_json::from_slice::<Change>(&body)
            .map_err(|e| ServeError::bad_request(format!("malformed {action} request: {e}")))?
            .parameters
            .unwrap_or_default()
    };
    let (model, load) = (model.to_string(), action == "load");
    blocking(move || if load { control.load(&model, &parameters) } else { control.unload(&model, &parameters) })
        .await?;
    Ok(json_response(StatusCode::OK, b"{}".to_vec()))
}

/// Triton's CUDA shared-memory extension: answered, not left to a 404, so a client learns why.
pub fn cuda_shared_memory() -> ServeError {
    ServeError::Unsupported(
        "CUDA shared memory is not supported: this build has no CUDA IPC; use system shared memory \
         (/v2/systemsharedmemory, the SystemSharedMemory* RPCs)"
            .into(),
    )
}

/// `/v2/systemsharedmemory[/region/{name}]/status|register|unregister` (Triton's system
/// shared-memory extension). Region names come percent-decoded, as clients encode them.
async fn shared_memory(
    state: &ServerState,
    method: &Method,
    path: &str,
    rest: &[&str],
    req: &mut Req,
) -> Result<Response<Body>> {
    let shm = &state.shared_memory;
    let (region, action) = match rest {
        [action] => (None, *action),
        ["region", name, action] => {
            let name = percent_encoding::percent_decode_str(name)
                .decode_utf8()
                .map_err(|_| ServeError::bad_request("the region name in the path is not UTF-8"))?;
            (Some(name.into_owned()), *action)
        }
        _ => return Err(ServeError::not_found(format!("no route for {method} {path}"))),
    };
    match (action, region) {
        ("status", region) if method == Method::GET => Ok(ok_json(&shm.status(region.as_deref())?)),
        ("unregister", region) if method == Method::POST => {
            shm.unregister(region.as_deref())?;
            Ok(status_only(true))
        }
        ("register", Some(region)) if method == Method::POST => {
            #[derive(serde::Deserialize)]
            struct Register {
                key: String,
                #[serde(default)]
                offset: u64,
                byte_size: u64,
            }
            // Refused before the body is read when the extension is off.
            shm.check_enabled()?;
            let body = req.read_body(&state.limits).await?;
            check_json_depth(&body, state.limits.max_json_depth)?;
            let r: Register = serde_json::from_slice(&body)
                .map_err(|e| ServeError::bad_request(format!("malformed shared memory register request: {e}")))?;
            shm.register(&region, &r.key, r.offset, r.byte_size)?;
            Ok(status_only(true))
        }
        ("status" | "unregister", _) | ("register", Some(_)) => Err(method_not_allowed(method, path)),
        _ => Err(ServeError::not_found(format!("no route for {method} {path}"))),
    }
}

fn method_not_allowed(method: &Method, path: &str) -> ServeError {
    ServeError::not_found(format!("{method} is not supported on {path}"))
}

fn model_metadata(state: &ServerState, model: &str, version: Option<&str>) -> Result<Response<Body>> {
    let mv = state.registry.resolve(model, version)?;
    Ok(ok_json(&state.model_metadata(&mv, version.is_none())?))
}

fn model_ready(state: &ServerState, model: &str, version: Option<&str>) -> Result<Response<Body>> {
    let mv = state.registry.resolve(model, version)?;
    match mv.scheduler() {
        Ok(_) if !state.is_draining() => Ok(status_only(true)),
        Ok(_) => Ok(json_response(StatusCode::BAD_REQUEST, error_body("the server is shutting down"))),
        Err(e) => Ok(json_response(StatusCode::BAD_REQUEST, error_body(&e.to_string()))),
    }
}

/// Reads a whole body within the limits: a declared length over `max_body_bytes` is refused before
/// reading, a chunked one as soon as it passes it, and a body still arriving after
/// `body_read_timeout` gets 408.
async fn read_body(declared: Option<u64>, body: Incoming, limits: &Limits) -> Result<Bytes> {
    let limit = limits.max_body_bytes;
    let too_large = || ServeError::PayloadTooLarge(format!("request body exceeds the limit of {limit} bytes"));
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = limits.body_read_timeout;
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ServeError::RequestTimeout(format!("the request body did not arrive within {} s", timeout.as_secs_f64()))
        })?
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                too_large()
            } else {
                ServeError::bad_request(format!("could not read the request body: {e}"))
            }
        })?;
    Ok(collected.to_bytes())
}

/// The body length a request declares (`Content-Length`).
fn declared_length(parts: &http::request::Parts) -> Option<u64> {
    parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// Runs an infer request through the pipeline: resolved before the body is read (an unknown model
/// is a 404 without reading it), decoded, run, encoded; accounted for once.
async fn infer_endpoint(state: &ServerState, model: &str, version: Option<&str>, req: &mut Req) -> Response<Body> {
    let protocol =
        if req.parts.headers.contains_key(HEADER_CONTENT_LENGTH) { Protocol::HttpBinary } else { Protocol::Http };
    let target = Target {
        model: model.to_string(),
        version: version.map(str::to_string),
        routing_key: req.header(ROUTING_KEY).map(str::to_string),
        request_id: req.header(REQUEST_ID).map(str::to_string),
        deadline: None,
    };
    let mut call = Call::new(state, protocol, target);
    let result = infer(state, &mut call, req).await;
    let id = call.finish(result.as_ref().map(|_| ()));
    with_request_id(result.unwrap_or_else(|e| error_response(&e)), &id)
}

/// Decodes the body (compressed, JSON or binary extension), runs it, encodes the answer.
async fn infer(state: &ServerState, call: &mut Call<'_>, req: &mut Req) -> Result<Response<Body>> {
    call.resolve()?;
    let limit = state.limits.max_body_bytes;
    let body = req.read_body(&state.limits).await?;
    let parts = &req.parts;
    let header = |name| parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let body = match Coding::from_content_encoding(header(CONTENT_ENCODING))? {
        Some(coding) => coding.decompress(&body, limit)?,
        None => body,
    };
    // With a compressed body this is the length of the JSON header once decompressed.
    let header_len = match parts.headers.get(HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
            ServeError::bad_request("Inference-Header-Content-Length must be a non-negative integer")
        })?),
    };
    let request = parse_infer_request(&body, header_len, &state.limits)?;
    let response = call.run(request).await?;
    let (body, header_len) = encode_infer_response(&response);
    let coding = Coding::negotiate(header(ACCEPT_ENCODING));
    let body = match coding {
        Some(c) => c.compress(&body),
        None => body,
    };
    let mut resp = json_response(StatusCode::OK, body);
    if let Some(n) = header_len {
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        resp.headers_mut().insert(HEADER_CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(c) = coding {
        resp.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static(c.as_str()));
    }
    Ok(resp)
}

/// Where a generate call goes, from its path and headers.
fn generate_target(model: &str, version: Option<&str>, req: &Req) -> Target {
    Target {
        model: model.to_string(),
        version: version.map(str::to_string),
        routing_key: req.header(ROUTING_KEY).map(str::to_string),
        request_id: req.header(REQUEST_ID).map(str::to_string),
        deadline: None,
    }
}

/// `POST .../generate`: one flat JSON request, one flat JSON response (a decoupled model must
/// answer exactly once here, as on `infer`).
async fn generate_endpoint(state: &ServerState, model: &str, version: Option<&str>, req: &mut Req) -> Response<Body> {
    let mut call = Call::new(state, Protocol::Http, generate_target(model, version, req));
    let result: Result<Response<Body>> = async {
        call.resolve()?;
        let body = req.read_body(&state.limits).await?;
        let spec = call.spec()?;
        let request = generate::parse_generate_request(&body, &spec, &state.limits)?;
        let response = call.run(request).await?;
        Ok(ok_json(&generate::generate_response(&response)))
    }
    .await;
    let id = call.finish(result.as_ref().map(|_| ()));
    with_request_id(result.unwrap_or_else(|e| error_response(&e)), &id)
}

/// `POST .../generate_stream`: the responses as Server-Sent Events, each written as soon as the
/// model produces it. An error before the first event is an ordinary HTTP error; a later one is a
/// last `data: {"error": ...}` event. A client that disconnects stops the model at its next
/// response.
async fn generate_stream_endpoint(
    state: &Arc<ServerState>,
    model: &str,
    version: Option<&str>,
    req: &mut Req,
) -> Response<Body> {
    let target = generate_target(model, version, req);
    let request_id = target.request_id.clone();
    let body = match req.take_body() {
        Ok(body) => body,
        Err(e) => return error_response(&e),
    };
    let (head_tx, head_rx) = oneshot::channel();
    let (events_tx, events_rx) = mpsc::channel(SSE_BUFFERED);
    let stream = EventStream { state: state.clone(), target, declared: declared_length(&req.parts), body };
    tokio::spawn(stream.run(head_tx, events_tx).in_current_span());
    let mut resp = match head_rx.await {
        Ok(Ok(())) => {
            let mut resp = Response::new(Either::Right(StreamBody::new(ReceiverStream::new(events_rx))));
            let headers = resp.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Proxies such as nginx would otherwise hold events back.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            resp
        }
        Ok(Err(e)) => error_response(&e),
        Err(_) => error_response(&ServeError::Internal("the stream ended before it started".into())),
    };
    if let Some(id) = request_id {
        resp = with_request_id(resp, &id);
    }
    resp
}

fn with_request_id(mut resp: Response<Body>, id: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

type EventSender = mpsc::Sender<std::result::Result<Frame<Bytes>, Infallible>>;

/// One `generate_stream` call, run in its own task so its events outlive the handler.
struct EventStream {
    state: Arc<ServerState>,
    target: Target,
    declared: Option<u64>,
    body: Incoming,
}

impl EventStream {
    /// Starts the request and answers `head` with how it started (the first event, if any, is
    /// already queued), then sends the rest of the events until the last, an error, or the client
    /// going away; accounts for the call once.
    async fn run(self, head: oneshot::Sender<Result<()>>, events: EventSender) {
        let EventStream { state, target, declared, body } = self;
        let mut call = Call::new(&state, Protocol::Http, target);
        let started: Result<Option<crate::request::InferResponse>> = async {
            call.resolve()?;
            let body = read_body(declared, body, &state.limits).await?;
            let spec = call.spec()?;
            let request = generate::parse_generate_request(&body, &spec, &state.limits)?;
            call.start(request)?;
            // The first response decides between an HTTP error and an event stream.
            match call.next().await {
                Some(Ok(first)) => Ok(Some(first)),
                Some(Err(e)) => Err(e),
                None => Ok(None),
            }
        }
        .await;
        let first = match started {
            Ok(first) => first,
            Err(e) => {
                call.finish(Err(&e));
                let _ = head.send(Err(e));
                return;
            }
        };
        let gone = || ServeError::Cancelled("the client closed the event stream".into());
        if let Some(first) = first {
            // The channel is empty and the handler holds its receiver until `head` is answered.
            let _ = events.try_send(Ok(Frame::data(generate::sse_event(&generate::generate_response(&first)))));
        }
        if head.send(Ok(())).is_err() {
            call.finish(Err(&gone()));
            return;
        }
        let outcome = loop {
            let next = tokio::select! {
                next = call.next() => next,
                _ = events.closed() => break Err(gone()),
            };
            let event = match next {
                None => break Ok(()),
                Some(Ok(response)) => generate::sse_event(&generate::generate_response(&response)),
                Some(Err(e)) => {
                    let _ = events
                        .send(Ok(Frame::data(generate::sse_event(&serde_json::json!({ "error": e.to_string() })))))
                        .await;
                    break Err(e);
                }
            };
            if events.send(Ok(Frame::data(event))).await.is_err() {
                break Err(gone());
            }
        };
        drop(events);
        call.finish(outcome.as_ref().map(|_| ()));
    }
}

/// Bound address, for logs.
pub fn describe(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}
