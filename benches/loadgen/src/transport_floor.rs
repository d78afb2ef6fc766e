//! `fastserve-transport-floor`: the HTTP libraries fastserve is built on, answering a fixed mlp
//! reply with nothing behind them: HTTP/1.1 JSON (hyper http1) and gRPC `ModelInfer` over h2c.
//! Driven by the same client as fastserve, it shows what each protocol costs before any model,
//! batching or tensor work, so a gRPC/HTTP ratio can be read against what the libraries allow.
//!
//! `--grpc-server hyper` (default): hyper's http2 server and a prebuilt reply (one task per stream,
//! as under tonic). `--grpc-server tonic`: tonic's server and prost codec with the generated
//! service, as fastserve serves gRPC. Binds 127.0.0.1 on two ephemeral ports, prints
//! `http=PORT grpc=PORT` on stdout and serves until killed. `--threads N` sets the tokio workers
//! (1: fastserve's default on 2 cores).

mod proto;

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The mlp's JSON answer for one row: 10 FP32 outputs.
const JSON_REPLY: &str = r#"{"model_name":"mlp","model_version":"1","outputs":[{"name":"OUTPUT0","datatype":"FP32","shape":[1,10],"data":[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0]}]}"#;

/// A gRPC reply: one length-prefixed message, then the `grpc-status: 0` trailers.
struct GrpcReply {
    message: Option<Bytes>,
    done: bool,
}

impl Body for GrpcReply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The mlp's gRPC answer for one row.
fn mlp_reply() -> proto::ModelInferResponse {
    proto::ModelInferResponse {
        model_name: "mlp".into(),
        model_version: "1".into(),
        outputs: vec![proto::model_infer_response::InferOutputTensor {
            name: "OUTPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 10],
            ..Default::default()
        }],
        raw_output_contents: vec![Bytes::from(vec![0u8; 40])],
        ..Default::default()
    }
}

/// [`mlp_reply`] as one length-prefixed gRPC message, framed once at start.
fn grpc_message() -> Bytes {
    let encoded = mlp_reply().encode_to_vec();
    let mut framed = Vec::with_capacity(5 + encoded.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(encoded.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&encoded);
    Bytes::from(framed)
}

/// ModelInfer through tonic: the request is decoded and the reply encoded per call.
struct Tonic;

#[tonic::async_trait]
impl GrpcInferenceService for Tonic {
    async fn model_infer(
        &self,
        request: tonic::Request<proto::ModelInferRequest>,
    ) -> Result<tonic::Response<proto::ModelInferResponse>, tonic::Status> {
        drop(request.into_inner());
        Ok(tonic::Response::new(mlp_reply()))
    }
}

fn typed<B>(body: B, content_type: &'static str) -> Response<B> {
    let mut response = Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

async fn serve(listener: TcpListener, h2: bool, grpc_reply: Bytes) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let reply = grpc_reply.clone();
        tokio::spawn(async move {
            if h2 {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let reply = reply.clone();
                    async move {
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(typed(GrpcReply { message: Some(reply), done: false }, "application/grpc"))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
            } else {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let body = http_body_util::Full::new(Bytes::from_static(JSON_REPLY.as_bytes()));
                    Ok::<_, Infallible>(typed(body, "application/json"))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            }
        });
    }
}

fn main() -> std::io::Result<()> {
    let (mut threads, mut tonic) = (1usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match (arg.as_str(), value.as_str()) {
            ("--threads", n) if n.parse::<usize>().is_ok_and(|n| n > 0) => threads = n.parse().unwrap_or(1),
            ("--grpc-server", "hyper" | "tonic") => tonic = value == "tonic",
            _ => {
                eprintln!("usage: fastserve-transport-floor [--threads N] [--grpc-server hyper|tonic]");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(async {
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let mut out = std::io::stdout();
        writeln!(out, "http={} grpc={}", http.local_addr()?.port(), grpc.local_addr()?.port())?;
        out.flush()?;
        let reply = grpc_message();
        tokio::spawn(serve(http, false, reply.clone()));
        if tonic {
            let service = GrpcInferenceServiceServer::new(Tonic);
            // As fastserve's listener (and tonic's own by default): no Nagle delay on replies.
            let incoming = TcpListenerStream::new(grpc).map(|stream| {
                if let Ok(stream) = &stream {
                    let _ = stream.set_nodelay(true);
                }
                stream
            });
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .map_err(std::io::Error::other)?;
        } else {
            serve(grpc, true, reply).await;
        }
        Ok(())
    })
}
