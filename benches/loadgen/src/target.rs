//! One connection to the server and the prepared request it sends over and over.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::args::{Args, Protocol};
use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::model_infer_request::InferInputTensor;
use crate::proto::ModelInferRequest;

/// The request tensor: `rows x features` FP32 values, deterministic.
pub fn input_values(rows: usize, features: usize) -> Vec<f32> {
    (0..rows * features).map(|i| (i % 17) as f32 * 0.125 - 1.0).collect()
}

/// A V2 JSON infer body.
pub fn json_body(args: &Args) -> Bytes {
    let data = input_values(args.rows, args.features);
    let body = serde_json::json!({
        "inputs": [{"name": args.input, "shape": [args.rows, args.features], "datatype": "FP32", "data": data}],
    });
    Bytes::from(serde_json::to_vec(&body).expect("serializable"))
}

/// A binary-extension infer body and the length of its JSON header.
pub fn binary_body(args: &Args) -> (Bytes, usize) {
    let data = input_values(args.rows, args.features);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = serde_json::json!({
        "inputs": [{"name": args.input, "shape": [args.rows, args.features], "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    });
    let mut body = serde_json::to_vec(&header).expect("serializable");
    let header_len = body.len();
    body.extend_from_slice(&raw);
    (Bytes::from(body), header_len)
}

pub fn grpc_request(args: &Args) -> ModelInferRequest {
    let data = input_values(args.rows, args.features);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: args.model.clone(),
        inputs: vec![InferInputTensor {
            name: args.input.clone(),
            datatype: "FP32".into(),
            shape: vec![args.rows as i64, args.features as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

pub enum Client {
    Http {
        sender: SendRequest<Full<Bytes>>,
        path: String,
        host: String,
        body: Bytes,
        /// Binary extension: the JSON header length.
        header_len: Option<usize>,
        validated: bool,
    },
    Grpc {
        client: GrpcInferenceServiceClient<tonic::transport::Channel>,
        request: Box<ModelInferRequest>,
    },
}

pub async fn http_connection(args: &Args) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(args.addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

impl Client {
    pub async fn connect(args: &Args) -> Result<Client, String> {
        match args.protocol {
            Protocol::Http | Protocol::Binary => {
                let sender = http_connection(args).await?;
                let (body, header_len) = if args.protocol == Protocol::Http {
                    (json_body(args), None)
                } else {
                    let (b, n) = binary_body(args);
                    (b, Some(n))
                };
                Ok(Client::Http {
                    sender,
                    path: format!("/v2/models/{}/infer", args.model),
                    host: args.addr.to_string(),
                    body,
                    header_len,
                    validated: false,
                })
            }
            Protocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))
                    .map_err(|e| e.to_string())?
                    .tcp_nodelay(true);
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                Ok(Client::Grpc {
                    client: GrpcInferenceServiceClient::new(channel),
                    request: Box::new(grpc_request(args)),
                })
            }
        }
    }

    /// Sends one request and checks the answer: status always, the body's shape on the first
    /// answer of each connection (so checking costs the client almost nothing).
    pub async fn infer(&mut self) -> Result<(), String> {
        match self {
            Client::Http { sender, path, host, body, header_len, validated } => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let mut req = http::Request::post(path.as_str()).header(http::header::HOST, host.as_str());
                req = match header_len {
                    Some(n) => req
                        .header(http::header::CONTENT_TYPE, "application/octet-stream")
                        .header("Inference-Header-Content-Length", n.to_string()),
                    None => req.header(http::header::CONTENT_TYPE, "application/json"),
                };
                let req = req.body(Full::new(body.clone())).map_err(|e| e.to_string())?;
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let binary_header = resp.headers().get("inference-header-content-length").cloned();
                let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                if status != http::StatusCode::OK {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                    return Err(format!("HTTP {status}: {text}"));
                }
                if !*validated {
                    let json_len = match (&header_len, binary_header) {
                        (Some(_), Some(h)) => h.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX),
                        (Some(_), None) => return Err("binary request answered without a binary header".into()),
                        (None, _) => bytes.len(),
                    };
                    let head = bytes.get(..json_len).ok_or("bad Inference-Header-Content-Length")?;
                    let v: serde_json::Value = serde_json::from_slice(head).map_err(|e| format!("bad JSON: {e}"))?;
                    if v["outputs"].as_array().is_none_or(|o| o.is_empty()) {
                        return Err(format!("answer without outputs: {v}"));
                    }
                    *validated = true;
                }
                Ok(())
            }
            Client::Grpc { client, request } => {
                let resp = client.model_infer((**request).clone()).await.map_err(|s| format!("gRPC {s}"))?;
                let resp = resp.into_inner();
                if resp.outputs.is_empty() || resp.raw_output_contents.is_empty() {
                    return Err("gRPC answer without outputs".into());
                }
                Ok(())
            }
        }
    }
}
