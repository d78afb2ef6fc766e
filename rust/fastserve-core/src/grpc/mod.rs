//! The KServe V2 gRPC front end (`inference.GRPCInferenceService`) on tonic. Requests take the
//! same path as HTTP ones (registry, validation, the model's scheduler), so both protocols share
//! queues and one batch may hold requests from each.

pub(crate) mod codec;
pub mod health;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::compression::Coding;
use crate::error::ServeError;
use crate::grpc::codec::{decode_request, encode_response};
use crate::http::{cuda_shared_memory, ROUTING_KEY};
use crate::observe::logging::request_span;
use crate::observe::stats::{ModelStats, Timed};
use crate::observe::transport::Protocol;
use crate::pipeline::{Call, Target};
use crate::request::{Parameters, MAX_REQUEST_ID_BYTES};
use crate::server::auth::{Auth, Scope};
use crate::server::listener::{admit, Admitted};
use crate::server::repository::RepositoryControl;
use crate::server::state::ServerState;

use crate::proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use crate::proto::*;

/// Responses of one stream that may wait for the client to read them before requests stall.
const STREAM_BUFFER: usize = 64;

#[derive(Clone)]
struct InferenceService {
    state: Arc<ServerState>,
    max_message_bytes: usize,
}

type GrpcResult<T> = Result<Response<T>, Status>;

impl InferenceService {
    /// One inference through the pipeline, from the wire message to the wire message.
    async fn infer(&self, request: ModelInferRequest, transport: Transport) -> Result<ModelInferResponse, ServeError> {
        let target = Target {
            model: request.model_name.clone(),
            version: Some(request.model_version.clone()),
            routing_key: transport.routing_key,
            request_id: None,
            deadline: transport.deadline,
        };
        let mut call = Call::new(&self.state, Protocol::Grpc, target);
        let result = self.infer_on(&mut call, request).await;
        call.finish(result.as_ref().map(|_| ()));
        result
    }

    async fn infer_on(
        &self,
        call: &mut Call<'_>,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse, ServeError> {
        call.resolve()?;
        let request = decode_request(request, &self.state.limits)?;
        self.sized(encode_response(call.run(request).await?))
    }

    /// Checked here so the client gets RESOURCE_EXHAUSTED with a reason, not a broken stream.
    fn sized(&self, encoded: ModelInferResponse) -> Result<ModelInferResponse, ServeError> {
        let size = encoded.encoded_len();
        if size > self.max_message_bytes {
            return Err(ServeError::PayloadTooLarge(format!(
                "the response of {size} bytes exceeds the gRPC message limit of {} bytes",
                self.max_message_bytes
            )));
        }
        Ok(encoded)
    }

    /// One request of a `ModelStreamInfer` stream, answered on `tx` (every response of a
    /// decoupled model, or an error message) and accounted for once. A client that cancels the
    /// stream stops the request.
    /// `queued` is dropped once the request is in its model's queue (or failed before it).
    async fn stream_infer(
        &self,
        request: ModelInferRequest,
        transport: Transport,
        tx: &StreamSender,
        queued: oneshot::Sender<()>,
    ) {
        // An over-long id is refused, never echoed.
        let id = if request.id.len() <= MAX_REQUEST_ID_BYTES { request.id.clone() } else { String::new() };
        let echo = ModelInferResponse {
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
            id,
            ..Default::default()
        };
        let target = Target {
            model: request.model_name.clone(),
            version: Some(request.model_version.clone()),
            routing_key: transport.routing_key,
            request_id: None,
            deadline: transport.deadline,
        };
        let mut call = Call::new(&self.state, Protocol::Grpc, target);
        let mut decoupled = false;
        let outcome = tokio::select! {
            outcome = self.stream_on(&mut call, request, tx, &echo, &mut decoupled, queued) => outcome,
            _ = tx.closed() => Err(cancelled()),
        };
        if let Err(e) = &outcome {
            if !matches!(e, ServeError::Cancelled(_)) {
                let mut echo = echo;
                if decoupled {
                    set_final(&mut echo, true);
                }
                let answer = ModelStreamInferResponse { error_message: e.to_string(), infer_response: Some(echo) };
                let _ = tx.send(Ok(answer)).await;
            }
        }
        call.finish(outcome.as_ref().map(|_| ()));
    }

    /// Sends a request's responses as they come. A decoupled model's carry
    /// `triton_final_response`: with `triton_enable_empty_final_response` each is sent at once
    /// and an empty final response ends the request; without it each response is held until the
    /// next one (or the end) shows whether it is the last, which then carries `true`.
    async fn stream_on(
        &self,
        call: &mut Call<'_>,
        request: ModelInferRequest,
        tx: &StreamSender,
        echo: &ModelInferResponse,
        decoupled: &mut bool,
        queued: oneshot::Sender<()>,
    ) -> Result<(), ServeError> {
        call.resolve()?;
        let request = decode_request(request, &self.state.limits)?;
        *decoupled = call.decoupled();
        let empty_final =
            request.parameters.get(EMPTY_FINAL_RESPONSE).and_then(serde_json::Value::as_bool).unwrap_or(false);
        call.start(request)?;
        drop(queued);
        if !*decoupled {
            let response = call.next().await.unwrap_or_else(|| Err(ServeError::Internal("no response".into())))?;
            return send(tx, self.sized(encode_response(response))?).await;
        }
        let mut held: Option<ModelInferResponse> = None;
        while let Some(response) = call.next().await {
            let response = match response {
                Ok(r) => self.sized(encode_response(r)),
                Err(e) => Err(e),
            };
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    if let Some(previous) = held.take() {
                        send(tx, with_final(previous, false)).await?;
                    }
                    return Err(e);
                }
            };
            if empty_final {
                send(tx, with_final(response, false)).await?;
            } else if let Some(previous) = held.replace(response) {
                send(tx, with_final(previous, false)).await?;
            }
        }
        match held {
            Some(last) => send(tx, with_final(last, true)).await,
            None if empty_final => send(tx, with_final(echo.clone(), true)).await,
            None => Ok(()),
        }
    }

    /// Runs a repository call on a blocking thread: loading a model can take a long time.
    /// `changes`: load or unload, refused in control mode `none`; the index is always served.
    async fn repository<T: Send + 'static>(
        &self,
        changes: bool,
        f: impl FnOnce(&dyn RepositoryControl) -> Result<T, ServeError> + Send + 'static,
    ) -> Result<T, Status> {
        let control = if changes { self.state.repository()? } else { self.state.repository_index()? };
        tokio::task::spawn_blocking(move || f(control.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("repository operation failed: {e}")))?
            .map_err(Status::from)
    }
}

/// Where a `ModelStreamInfer` call's responses go.
type StreamSender = mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

/// Request parameter: end each decoupled request with an empty response flagged final.
const EMPTY_FINAL_RESPONSE: &str = "triton_enable_empty_final_response";
/// Response parameter: whether this is the request's last response.
const FINAL_RESPONSE: &str = "triton_final_response";

fn cancelled() -> ServeError {
    ServeError::Cancelled("the client cancelled the stream".into())
}

async fn send(tx: &StreamSender, response: ModelInferResponse) -> Result<(), ServeError> {
    let answer = ModelStreamInferResponse { error_message: String::new(), infer_response: Some(response) };
    tx.send(Ok(answer)).await.map_err(|_| cancelled())
}

fn set_final(response: &mut ModelInferResponse, last: bool) {
    let flag = InferParameter { parameter_choice: Some(infer_parameter::ParameterChoice::BoolParam(last)) };
    response.parameters.insert(FINAL_RESPONSE.to_string(), flag);
}

fn with_final(mut response: ModelInferResponse, last: bool) -> ModelInferResponse {
    set_final(&mut response, last);
    response
}

/// What a call's metadata says: the client's deadline and routing key.
#[derive(Clone)]
struct Transport {
    deadline: Option<Instant>,
    routing_key: Option<String>,
}

impl Transport {
    fn of<T>(request: &Request<T>) -> Self {
        let metadata = request.metadata();
        let deadline = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .and_then(|t| Instant::now().checked_add(t));
        let routing_key = metadata.get(ROUTING_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self { deadline, routing_key }
    }
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
        response_stats: s
            .response_indexes()
            .into_iter()
            .map(|(index, r)| {
                let entry = InferResponseStatistics {
                    compute_infer: duration(&r.compute_infer),
                    success: duration(&r.success),
                    fail: duration(&r.fail),
                    cancel: duration(&r.cancel),
                };
                (index.to_string(), entry)
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
        let transport = Transport::of(&request);
        let request = request.into_inner();
        let span = request_span(&request.model_name);
        Ok(Response::new(self.infer(request, transport).instrument(span).await?))
    }

    type ModelStreamInferStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

    /// Requests of a stream run concurrently (so they can share batches) and are answered as they
    /// finish, each response carrying its request's id. A failed request is answered with
    /// `error_message` and the stream goes on.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> GrpcResult<Self::ModelStreamInferStream> {
        let transport = Transport::of(&request);
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
                        let (service, tx, transport) = (service.clone(), tx.clone(), transport.clone());
                        // Requests of a sequence must reach their queue in the order they came.
                        let ordered = request.parameters.contains_key("sequence_id");
                        let (queued, in_queue) = oneshot::channel();
                        tokio::spawn(async move { service.stream_infer(request, transport, &tx, queued).await });
                        if ordered {
                            let _ = in_queue.await;
                        }
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
            .repository(false, move |c| c.index(ready))
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
        self.repository(true, move |c| c.load(&r.model_name, &parameters)).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> GrpcResult<RepositoryModelUnloadResponse> {
        let r = request.into_inner();
        let parameters = repository_parameters(r.parameters);
        self.repository(true, move |c| c.unload(&r.model_name, &parameters)).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> GrpcResult<SystemSharedMemoryStatusResponse> {
        let name = request.into_inner().name;
        let regions = self
            .state
            .shared_memory
            .status((!name.is_empty()).then_some(name.as_str()))?
            .into_iter()
            .map(|r| {
                let status = system_shared_memory_status_response::RegionStatus {
                    name: r.name.clone(),
                    key: r.key,
                    offset: r.offset,
                    byte_size: r.byte_size,
                };
                (r.name, status)
            })
            .collect();
        Ok(Response::new(SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryRegisterResponse> {
        let r = request.into_inner();
        self.state.shared_memory.register(&r.name, &r.key, r.offset, r.byte_size)?;
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<SystemSharedMemoryUnregisterResponse> {
        let name = request.into_inner().name;
        self.state.shared_memory.unregister((!name.is_empty()).then_some(name.as_str()))?;
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> GrpcResult<CudaSharedMemoryStatusResponse> {
        Err(cuda_shared_memory().into())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryRegisterResponse> {
        Err(cuda_shared_memory().into())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<CudaSharedMemoryUnregisterResponse> {
        Err(cuda_shared_memory().into())
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
/// The path prefix of the standard health service's RPCs.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
struct Guard<S> {
    inner: S,
    auth: Auth,
}

/// What an RPC needs: the probes (and `grpc.health.v1.Health`) are open, the Repository* RPCs
/// are management, the rest (reflection too) inference.
fn scope_of(path: &str) -> Scope {
    if path.starts_with(HEALTH_PATH) {
        return Scope::Open;
    }
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
    let admitted = admit(listener, state.connections.clone(), state.transport.clone(), tls, true, shutdown.clone());
    let incoming = ReceiverStream::new(admitted);
    serve_incoming(incoming, state, auth, options, shutdown, drain).await
}

async fn serve_incoming(
    incoming: impl Stream<Item = std::io::Result<Admitted>> + Send + 'static,
    state: Arc<ServerState>,
    auth: Auth,
    options: Options,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let limits = state.limits.clone();
    let max_message_bytes = options.max_message_bytes;
    let mut service = GrpcInferenceServiceServer::new(InferenceService { state: state.clone(), max_message_bytes })
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
    let health = health::service(state, shutdown.clone()).await;
    let mut router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .http2_max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished; gRPC channels are long-lived, so idle ones stay open.
        .http2_keepalive_interval(Some(limits.idle_timeout))
        .add_service(Guard { inner: service, auth: auth.clone() })
        .add_service(Guard { inner: health, auth: auth.clone() });
    // Server reflection (v1 and v1alpha) describes the inference and health services, so
    // grpcurl-style tools need no .proto files.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pbtxt::descriptors())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => {
            router =
                router.add_service(Guard { inner: v1, auth: auth.clone() }).add_service(Guard { inner: v1alpha, auth });
        }
        (Err(e), _) | (_, Err(e)) => tracing::error!(error = %e, "gRPC server reflection is off: bad descriptors"),
    }
    let server = router.serve_with_incoming_shutdown(incoming, stopped);
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
