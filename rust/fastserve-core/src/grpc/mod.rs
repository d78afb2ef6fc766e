//! The KServe V2 gRPC front end (`inference.GRPCInferenceService`) on tonic. Requests take the
//! same path as HTTP ones (registry, validation, the model's scheduler), so both protocols share
//! queues and one batch may hold requests from each.

pub(crate) mod codec;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::compression::Coding;
use crate::error::ServeError;
use crate::grpc::codec::{decode_request, encode_response};
use crate::observe::stats::{ModelStats, Timed};
use crate::request::{Parameters, ServedBy, MAX_REQUEST_ID_BYTES};
use crate::scheduler::Scheduler;
use crate::server::auth::{Auth, Scope};
use crate::server::control::RepositoryControl;
use crate::server::metrics::{ConnectionGuard, Protocol};
use crate::server::state::ServerState;

/// Code generated from `protos/grpc_predict_v2.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::*;

/// Responses of one stream that may wait for the client to read them before requests stall.
const STREAM_BUFFER: usize = 64;

#[derive(Clone)]
struct InferenceService {
    state: Arc<ServerState>,
    max_message_bytes: usize,
}

type GrpcResult<T> = Result<Response<T>, Status>;

impl InferenceService {
    /// One inference, from the wire message to the wire message.
    async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, ServeError> {
        let start = Instant::now();
        self.state.transport.request(Protocol::Grpc);
        let model = request.model_name.clone();
        let version = request.model_version.clone();
        let routing_key = match request.parameters.get("routing_key").and_then(|p| p.parameter_choice.as_ref()) {
            Some(infer_parameter::ParameterChoice::StringParam(key)) if version.is_empty() => Some(key.clone()),
            _ => None,
        };
        let mv =
            self.state.registry.resolve_with_key(&model, Some(&version), routing_key.as_deref()).inspect_err(|_| {
                self.state.transport.unknown_model();
            })?;
        let scheduler = mv.scheduler()?.clone();
        let result = self.infer_on(&scheduler, request, deadline).await;
        scheduler.stats().record_request(result.as_ref().map(|_| ()), start.elapsed());
        let (encoded, how) = result?;
        if self.state.access_log {
            tracing::info!(
                target: "fastserve::access",
                request_id = %encoded.id,
                model = %model,
                version = mv.version,
                protocol = Protocol::Grpc.as_str(),
                status = "OK",
                duration_us = start.elapsed().as_micros() as u64,
                queue_us = how.queue.as_micros() as u64,
                compute_us = how.compute.as_micros() as u64,
                batch_size = how.batch_size,
                "request"
            );
        }
        Ok(encoded)
    }

    async fn infer_on(
        &self,
        scheduler: &Scheduler,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<(ModelInferResponse, ServedBy), ServeError> {
        // Checked from the shapes before the tensors are decoded; negative or overflowing shapes
        // are left to the decoder, which names them (INVALID_ARGUMENT).
        let elements = request.inputs.iter().try_fold(0usize, |total, input| {
            let n = input.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))?;
            total.checked_add(n)
        });
        if let Some(total) = elements {
            self.state.limits.admit_elements(total)?;
        }
        let (response, how) = crate::request::run_until(scheduler, decode_request(request)?, deadline).await?;
        let encoded = encode_response(response);
        // Checked here so the client gets RESOURCE_EXHAUSTED with a reason, not a broken stream.
        let size = encoded.encoded_len();
        if size > self.max_message_bytes {
            return Err(ServeError::PayloadTooLarge(format!(
                "the response of {size} bytes exceeds the gRPC message limit of {} bytes",
                self.max_message_bytes
            )));
        }
        Ok((encoded, how))
    }

    /// Runs a repository call on a blocking thread: loading a model can take a long time.
    async fn repository<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn RepositoryControl) -> Result<T, ServeError> + Send + 'static,
    ) -> Result<T, Status> {
        let control = self.state.repository()?;
        tokio::task::spawn_blocking(move || f(control.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("repository operation failed: {e}")))?
            .map_err(Status::from)
    }
}

/// When the client's `grpc-timeout` (if any) runs out, counted from now.
fn client_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    Instant::now().checked_add(parse_grpc_timeout(value)?)
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Triton's backend name for a platform string.
/// tonic reports a message over the size limit as OUT_OF_RANGE; the V2 protocol (and gRPC's own
/// convention) says RESOURCE_EXHAUSTED. Nothing else in this service answers OUT_OF_RANGE.
fn size_limit_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

fn unimplemented<T>(what: &str) -> GrpcResult<T> {
    Err(Status::unimplemented(format!("{what} is not supported by this server")))
}

/// Repository API parameters as the JSON map the repository owner receives.
fn repository_parameters(params: std::collections::HashMap<String, ModelRepositoryParameter>) -> Parameters {
    use model_repository_parameter::ParameterChoice;
    params
        .into_iter()
        .filter_map(|(k, p)| {
            let v = match p.parameter_choice? {
                ParameterChoice::BoolParam(b) => serde_json::Value::Bool(b),
                ParameterChoice::Int64Param(i) => serde_json::Value::from(i),
                ParameterChoice::StringParam(s) => serde_json::Value::String(s),
                ParameterChoice::BytesParam(b) => serde_json::Value::String(String::from_utf8_lossy(&b).into_owned()),
            };
            Some((k, v))
        })
        .collect()
}

fn duration(t: &Timed) -> Option<StatisticDuration> {
    Some(StatisticDuration { count: t.count(), ns: t.ns() })
}

/// One model version's statistics in Triton's message shape.
fn statistics(name: &str, version: u64, s: &ModelStats) -> ModelStatistics {
    ModelStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: s.last_inference_ms(),
        inference_count: s.inference_count(),
        execution_count: s.execution_count(),
        inference_stats: Some(InferStatistics {
            success: duration(&s.success),
            fail: duration(&s.fail),
            queue: duration(&s.queue),
            compute_input: duration(&s.compute_input),
            compute_infer: duration(&s.compute_infer),
            compute_output: duration(&s.compute_output),
        }),
        batch_stats: s
            .batch_sizes()
            .into_iter()
            .map(|(size, b)| InferBatchStatistics {
                batch_size: size as u64,
                compute_input: duration(&b.compute_input),
                compute_infer: duration(&b.compute_infer),
                compute_output: duration(&b.compute_output),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> GrpcResult<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse { live: self.state.is_live() }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> GrpcResult<ServerReadyResponse> {
        Ok(Response::new(ServerReadyResponse { ready: self.state.is_ready() }))
    }

    /// As in Triton, an unknown model or version is simply not ready.
    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> GrpcResult<ModelReadyResponse> {
        let r = request.into_inner();
        let ready = self.state.registry.resolve(&r.name, Some(&r.version)).is_ok_and(|mv| mv.is_ready())
            && !self.state.is_draining();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(&self, _: Request<ServerMetadataRequest>) -> GrpcResult<ServerMetadataResponse> {
        let m = self.state.server_metadata();
        Ok(Response::new(ServerMetadataResponse {
            name: m.name.to_string(),
            version: m.version.to_string(),
            extensions: m.extensions.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(&self, request: Request<ModelMetadataRequest>) -> GrpcResult<ModelMetadataResponse> {
        let r = request.into_inner();
        let mv = self.state.registry.resolve(&r.name, Some(&r.version))?;
        let m = self.state.model_metadata(&mv, r.version.is_empty())?;
        let io = |list: Vec<crate::server::state::TensorMetadata>| {
            list.into_iter()
                .map(|t| model_metadata_response::TensorMetadata {
                    name: t.name,
                    datatype: t.datatype.to_string(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform,
            inputs: io(m.inputs),
            outputs: io(m.outputs),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> GrpcResult<ModelInferResponse> {
        let deadline = client_deadline(&request);
        let request = request.into_inner();
        let span = crate::http::request_span(&request.model_name);
        Ok(Response::new(self.infer(request, deadline).instrument(span).await?))
    }

    type ModelStreamInferStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

    /// Requests of a stream run concurrently (so they can share batches) and are answered as they
    /// finish, each response carrying its request's id. A failed request is answered with
    /// `error_message` and the stream goes on.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> GrpcResult<Self::ModelStreamInferStream> {
        let deadline = client_deadline(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = tx.closed() => break,
                };
                match next {
                    Ok(Some(request)) => {
                        let (service, tx) = (service.clone(), tx.clone());
                        tokio::spawn(async move {
                            // An over-long id is refused, never echoed.
                            let id = if request.id.len() <= MAX_REQUEST_ID_BYTES {
                                request.id.clone()
                            } else {
                                String::new()
                            };
                            let echo = ModelInferResponse {
                                model_name: request.model_name.clone(),
                                model_version: request.model_version.clone(),
                                id,
                                ..Default::default()
                            };
                            // A cancelled stream withdraws its requests that have not run yet.
                            let result = tokio::select! {
                                result = service.infer(request, deadline) => result,
                                _ = tx.closed() => return,
                            };
                            let answer = match result {
                                Ok(r) => {
                                    ModelStreamInferResponse { error_message: String::new(), infer_response: Some(r) }
                                }
                                Err(e) => ModelStreamInferResponse {
                                    error_message: e.to_string(),
                                    infer_response: Some(echo),
                                },
                            };
                            let _ = tx.send(Ok(answer)).await;
                        });
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(size_limit_status(status))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(&self, request: Request<ModelConfigRequest>) -> GrpcResult<ModelConfigResponse> {
        let r = request.into_inner();
        Ok(Response::new(ModelConfigResponse {
            config: Some(crate::server::model_config::build(&self.state, &r.name, Some(&r.version))?),
        }))
    }

    async fn model_statistics(&self, request: Request<ModelStatisticsRequest>) -> GrpcResult<ModelStatisticsResponse> {
        let r = request.into_inner();
        let model = (!r.name.is_empty()).then_some(r.name.as_str());
        let version = (!r.version.is_empty()).then_some(r.version.as_str());
        let model_stats = self.state.stats_of(model, version)?.iter().map(|(n, v, s)| statistics(n, *v, s)).collect();
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(&self, request: Request<RepositoryIndexRequest>) -> GrpcResult<RepositoryIndexResponse> {
        let ready = request.into_inner().ready;
        let models = self
            .repository(move |c| c.index(ready))
            .await?
            .into_iter()
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.unwrap_or_default(),
                state: e.state,
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> GrpcResult<RepositoryModelLoadResponse> {
        let r = request.into_inner();
        let parameters = repository_parameters(r.parameters);
        self.repository(move |c| c.load(&r.model_name, &parameters)).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> GrpcResult<RepositoryModelUnloadResponse> {
        let r = request.into_inner();
        let parameters = repository_parameters(r.parameters);
        self.repository(move |c| c.unload(&r.model_name, &parameters)).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> GrpcResult<SystemSharedMemoryStatusResponse> {
        unimplemented("system shared memory")
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryRegisterResponse> {
        unimplemented("system shared memory")
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryUnregisterResponse> {
        unimplemented("system shared memory")
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> GrpcResult<CudaSharedMemoryStatusResponse> {
        unimplemented("CUDA shared memory")
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryRegisterResponse> {
        unimplemented("CUDA shared memory")
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryUnregisterResponse> {
        unimplemented("CUDA shared memory")
    }

    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> GrpcResult<TraceSettingResponse> {
        unimplemented("trace settings")
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> GrpcResult<LogSettingsResponse> {
        unimplemented("log settings")
    }
}

/// Checks bearer tokens before any handler runs, and rewrites tonic's size-limit status on unary
/// calls, which tonic answers before our handler runs.
#[derive(Clone)]
struct Guard<S> {
    inner: S,
    auth: Auth,
}

/// What an RPC needs: the probes are open, the Repository* RPCs are management, the rest inference.
fn scope_of(path: &str) -> Scope {
    match path.rsplit('/').next().unwrap_or_default() {
        "ServerLive" | "ServerReady" => Scope::Open,
        rpc if rpc.starts_with("Repository") => Scope::Admin,
        _ => Scope::Inference,
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        if let Err(e) = self.auth.check(scope_of(request.uri().path()), authorization) {
            let status = Status::from(e);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match response.extensions().get::<Status>() {
                Some(status) if status.code() == Code::OutOfRange => size_limit_status(status.clone()).into_http(),
                _ => response,
            })
        })
    }
}

/// Message settings of the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Largest message received or sent.
    pub max_message_bytes: usize,
    /// Compression of responses for clients that accept it (None: never, as Triton's default).
    pub response_compression: Option<Coding>,
}

/// Serves gRPC on `listener` until `shutdown` flips, then lets open calls finish for up to `drain`.
/// With `tls`, every connection is a TLS one (handshakes run in their own tasks).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    options: Options,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<TlsAcceptor>,
) {
    let auth = state.auth.clone();
    let admitting = state.clone();
    match tls {
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true)).filter_map(move |conn| match conn {
                Ok(stream) => {
                    let info = stream.connect_info();
                    CountedStream::admit(&admitting, stream, info).map(Ok)
                }
                Err(e) => Some(Err(e)),
            });
            serve_incoming(incoming, state, auth, options, shutdown, drain).await
        }
        Some(acceptor) => {
            let accepted = crate::server::tls::incoming(listener, acceptor, shutdown.clone());
            let incoming = ReceiverStream::new(accepted).filter_map(move |conn| match conn {
                Ok(stream) => {
                    let info = stream.get_ref().0.connect_info();
                    CountedStream::admit(&admitting, stream, info).map(Ok)
                }
                Err(e) => Some(Err(e)),
            });
            serve_incoming(incoming, state, auth, options, shutdown, drain).await
        }
    }
}

async fn serve_incoming<IO>(
    incoming: impl Stream<Item = std::io::Result<CountedStream<IO>>> + Send + 'static,
    state: Arc<ServerState>,
    auth: Auth,
    options: Options,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = state.limits.clone();
    let max_message_bytes = options.max_message_bytes;
    let mut service = GrpcInferenceServiceServer::new(InferenceService { state, max_message_bytes })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    match options.response_compression {
        Some(Coding::Gzip) => service = service.send_compressed(CompressionEncoding::Gzip),
        Some(Coding::Deflate) => service = service.send_compressed(CompressionEncoding::Deflate),
        None => {}
    }
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|&s| s).await;
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .http2_max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished; gRPC channels are long-lived, so idle ones stay open.
        .http2_keepalive_interval(Some(limits.idle_timeout))
        .add_service(Guard { inner: service, auth })
        .serve_with_incoming_shutdown(incoming, stopped);
    let drain_deadline = async move {
        let _ = shutdown.wait_for(|&s| s).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = server => if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        },
        _ = drain_deadline => {
            tracing::warn!(timeout_s = drain.as_secs_f64(), "gRPC drain timed out; closing remaining streams");
        }
    }
}

/// A client connection (plain or TLS), counted in `fastserve_open_connections{protocol="grpc"}`
/// while open.
struct CountedStream<S> {
    stream: S,
    info: <TcpStream as Connected>::ConnectInfo,
    _open: ConnectionGuard,
    /// Its slot under `max_connections`.
    _slot: OwnedSemaphorePermit,
}

impl<S> CountedStream<S> {
    /// Counts a connection just accepted, or `None` (it is closed at once) over `max_connections`.
    fn admit(state: &ServerState, stream: S, info: <TcpStream as Connected>::ConnectInfo) -> Option<Self> {
        let slot = state.connections.admit()?;
        Some(Self { stream, info, _open: state.transport.connection(true), _slot: slot })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connected for CountedStream<S> {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "１S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
