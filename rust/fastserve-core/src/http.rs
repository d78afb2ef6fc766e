//! The KServe V2 REST front end on hyper (HTTP/1.1 and h2c).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::compression::Coding;
use crate::error::{Result, ServeError};
use crate::json_codec::{encode_infer_response, error_body, parse_infer_request};
use crate::registry::ModelVersion;
use crate::state::ServerState;

pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

type Body = Full<Bytes>;

/// Accepts connections until `shutdown` flips, then waits up to `drain` for open requests.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = service_fn(move |req| handle(state.clone(), req));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout_s = drain.as_secs_f64(), "drain timed out; closing remaining connections");
    }
}

async fn handle(state: Arc<ServerState>, req: Request<Incoming>) -> std::result::Result<Response<Body>, Infallible> {
    Ok(route(&state, req).await.unwrap_or_else(|e| error_response(&e)))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok_json(value: &impl serde::Serialize) -> Response<Body> {
    json_response(StatusCode::OK, serde_json::to_vec(value).unwrap_or_default())
}

fn error_response(e: &ServeError) -> Response<Body> {
    json_response(e.http_status(), error_body(&e.to_string()))
}

/// A health answer: 200 when true, 400 otherwise (the V2 spec's "4xx means false", as Triton does).
fn status_only(ok: bool) -> Response<Body> {
    json_response(if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST }, Vec::new())
}

async fn route(state: &ServerState, req: Request<Incoming>) -> Result<Response<Body>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    match segments.as_slice() {
        ["v2"] if get => Ok(ok_json(&state.server_metadata())),
        ["v2", "health", "live"] if get => Ok(status_only(state.is_live())),
        ["v2", "health", "ready"] if get => Ok(status_only(state.is_ready())),
        ["v2", "models", model, rest @ ..] => {
            let (version, action) = match rest {
                ["versions", v, action @ ..] => (Some(*v), action),
                action => (None, action),
            };
            match action {
                [] if get => model_metadata(state, model, version),
                ["ready"] if get => model_ready(state, model, version),
                ["infer"] if post => infer(state, model, version, req).await,
                [] | ["ready"] | ["infer"] => Err(method_not_allowed(&method, &path)),
                _ => Err(ServeError::not_found(format!("no route for {method} {path}"))),
            }
        }
        ["v2"] | ["v2", "health", "live" | "ready"] => Err(method_not_allowed(&method, &path)),
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

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<(http::request::Parts, Bytes)> {
    let (parts, body) = req.into_parts();
    let too_large = || ServeError::PayloadTooLarge(format!("request body exceeds the limit of {limit} bytes"));
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collected = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<LengthLimitError>() {
            too_large()
        } else {
            ServeError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    Ok((parts, collected.to_bytes()))
}

async fn infer(
    state: &ServerState,
    model: &str,
    version: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    // Resolve first so an unknown model is a 404 without reading the body.
    let mv: Arc<ModelVersion> = state.registry.resolve(model, version)?;
    let scheduler = mv.scheduler()?.clone();
    let limit = state.limits.max_body_bytes;
    let (parts, body) = read_body(req, limit).await?;
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
    let request = parse_infer_request(&body, header_len)?;
    let response = crate::infer::run(&scheduler, request).await?;
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

/// Bound address, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}")
}
