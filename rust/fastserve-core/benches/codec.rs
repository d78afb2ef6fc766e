//! JSON and binary codec micro-benchmarks: decoding V2 infer requests (JSON data and the binary
//! tensor extension) and encoding responses, for 1 and 64 rows of the example MLP's shapes.

// A benchmark stops at the first surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use fastserve_core::http::json::{encode_infer_response, parse_infer_request};
use fastserve_core::request::{Delivery, InferResponse, ResponseOutput};
use fastserve_core::server::state::Limits;
use fastserve_core::{DataType, Tensor, TensorData};

const FEATURES: usize = 64;

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 17) as f32 * 0.125 - 1.0).collect()
}

fn json_body(rows: usize) -> Bytes {
    let body = serde_json::json!({
        "inputs": [{"name": "INPUT0", "shape": [rows, FEATURES], "datatype": "FP32", "data": values(rows * FEATURES)}],
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn binary_body(rows: usize) -> (Bytes, usize) {
    let raw: Vec<u8> = values(rows * FEATURES).iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = serde_json::json!({
        "inputs": [{"name": "INPUT0", "shape": [rows, FEATURES], "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
    });
    let mut body = serde_json::to_vec(&header).unwrap();
    let n = body.len();
    body.extend_from_slice(&raw);
    (Bytes::from(body), n)
}

fn response(rows: usize, binary: bool) -> InferResponse {
    let raw: Vec<u8> = values(rows * 10).iter().flat_map(|v| v.to_le_bytes()).collect();
    let t = Tensor::new("OUTPUT0", DataType::Fp32, vec![rows, 10], TensorData::Raw(Bytes::from(raw))).unwrap();
    InferResponse {
        model_name: "mlp".into(),
        model_version: "1".into(),
        id: None,
        outputs: vec![ResponseOutput { tensor: t, delivery: Delivery::binary(binary) }],
    }
}

fn bench_codec(c: &mut Criterion) {
    let limits = Limits::default();
    for rows in [1usize, 64] {
        let body = json_body(rows);
        c.bench_function(&format!("decode json/{rows} rows"), |b| {
            b.iter(|| parse_infer_request(&body, None, &limits).unwrap())
        });
        let (body, n) = binary_body(rows);
        c.bench_function(&format!("decode binary/{rows} rows"), |b| {
            b.iter(|| parse_infer_request(&body, Some(n), &limits).unwrap())
        });
        let json = response(rows, false);
        c.bench_function(&format!("encode json/{rows} rows"), |b| b.iter(|| encode_infer_response(&json)));
        let binary = response(rows, true);
        c.bench_function(&format!("encode binary/{rows} rows"), |b| b.iter(|| encode_infer_response(&binary)));
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench_codec
}
criterion_main!(benches);
