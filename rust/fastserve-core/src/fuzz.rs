//! Property-based fuzzing of the request decoders (stable Rust, part of `cargo test`).
//!
//! Every decoder must, for any input: not panic, fail only with `BadRequest`, and on success hand
//! out tensors whose data agrees with their shape and datatype. The default case count keeps
//! `cargo test` quick; a long run:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release -p fastserve-core fuzz
//! ```

use bytes::{BufMut, Bytes};
use proptest::prelude::*;
use proptest::test_runner::Config;
use prost::Message;
use serde_json::{json, Value};

use crate::error::{Result, ServeError};
use crate::grpc::codec::decode_request;
use crate::http::json::{decode_binary, decode_length_prefixed, parse_infer_request};
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::{InferParameter, InferTensorContents, ModelInferRequest};
use crate::request::InferRequest;
use crate::server::state::Limits;
use crate::tensor::datatype::DataType;
use crate::tensor::{element_count, TensorData};

/// `PROPTEST_CASES` when set, else a count that keeps `cargo test` fast.
fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// The contract every decoder result must meet.
fn check(result: Result<InferRequest>) -> std::result::Result<(), TestCaseError> {
    match result {
        Ok(request) => {
            for t in &request.inputs {
                prop_assert!(t.check_consistent().is_ok(), "inconsistent tensor {t:?}");
                prop_assert_eq!(Some(t.data_elements()), element_count(&t.shape));
                if let TensorData::Raw(b) = &t.data {
                    prop_assert_eq!(Some(b.len()), t.datatype.size().map(|s| s * t.data_elements()));
                }
            }
        }
        // PayloadTooLarge: shapes asking for more elements than `max_request_elements`.
        Err(ServeError::BadRequest(message) | ServeError::PayloadTooLarge(message)) => {
            prop_assert!(!message.is_empty())
        }
        Err(other) => prop_assert!(false, "expected BadRequest or PayloadTooLarge, got {other:?}"),
    }
    Ok(())
}

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(DataType::ALL.to_vec()).prop_map(|d| d.as_str().to_string()),
        1 => "[A-Za-z0-9]{0,6}",
    ]
}

/// Shapes of small and hostile dimensions (negative, huge, overflowing products).
fn shape() -> impl Strategy<Value = Vec<i64>> {
    let dim = prop_oneof![
        10 => 0i64..4,
        1 => Just(-1i64),
        1 => Just(i64::MAX),
        1 => Just(1i64 << 32),
        1 => any::<i64>(),
    ];
    proptest::collection::vec(dim, 0..4)
}

/// A JSON tensor element of any kind, including ones no datatype accepts.
fn element() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u8..4).prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z\u{e9}]{0,4}".prop_map(Value::from),
        Just(Value::Null),
        Just(json!({})),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| proptest::collection::vec(inner, 0..3).prop_map(Value::Array))
}

/// An input that takes its data from JSON or from the binary section.
#[derive(Debug, Clone)]
enum Data {
    Json(Vec<Value>),
    Binary(Vec<u8>),
    /// A BYTES-style length-prefixed payload (valid or not for the datatype).
    Prefixed(Vec<Vec<u8>>),
    Missing,
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        4 => proptest::collection::vec(element(), 0..6).prop_map(Data::Json),
        2 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Data::Binary),
        2 => proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..5).prop_map(Data::Prefixed),
        1 => Just(Data::Missing),
    ]
}

/// A V2 JSON request (as bytes) with its binary section and `Inference-Header-Content-Length`.
fn json_request() -> impl Strategy<Value = (Bytes, Option<usize>)> {
    let input = ("[a-z]{1,3}", datatype(), shape(), data(), any::<bool>());
    (proptest::collection::vec(input, 0..4), any::<bool>(), 0usize..3, any::<i8>()).prop_map(
        |(inputs, binary_flag, outputs, header_skew)| {
            let mut binary = Vec::new();
            let mut wire = Vec::new();
            for (name, datatype, shape, data, lie) in inputs {
                let mut input = json!({ "name": name, "datatype": datatype, "shape": shape });
                let section = match data {
                    Data::Json(values) => {
                        input["data"] = Value::Array(values);
                        None
                    }
                    Data::Binary(bytes) => Some(bytes),
                    Data::Prefixed(items) => {
                        let mut bytes = Vec::new();
                        for item in items {
                            bytes.put_u32_le(item.len() as u32);
                            bytes.extend_from_slice(&item);
                        }
                        Some(bytes)
                    }
                    Data::Missing => None,
                };
                if let Some(bytes) = section {
                    // Sometimes claim one byte more than is sent.
                    input["parameters"] = json!({ "binary_data_size": bytes.len() + usize::from(lie) });
                    binary.extend_from_slice(&bytes);
                }
                wire.push(input);
            }
            let outputs: Vec<Value> = (0..outputs)
                .map(|i| json!({ "name": format!("o{i}"), "parameters": { "binary_data": binary_flag } }))
                .collect();
            let header =
                serde_json::to_vec(&json!({ "id": "x", "inputs": wire, "outputs": outputs })).unwrap_or_default();
            let header_len = if binary.is_empty() && header_skew % 2 == 0 {
                None
            } else {
                // Mostly the true length; sometimes off by a little either way.
                let skew = if header_skew % 5 == 0 { isize::from(header_skew) / 16 } else { 0 };
                Some(header.len().saturating_add_signed(skew))
            };
            let mut body = header;
            body.extend_from_slice(&binary);
            (Bytes::from(body), header_len)
        },
    )
}

proptest! {
    #![proptest_config(config(1000))]

    /// Arbitrary bytes as a JSON request, with and without a binary section.
    #[test]
    fn fuzz_json_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..256), header in proptest::option::of(0usize..300)) {
        check(parse_infer_request(&Bytes::from(body), header, &Limits::default()))?;
    }

    /// Structurally plausible requests: mismatched shapes, datatypes, sizes and header lengths.
    #[test]
    fn fuzz_json_structured((body, header) in json_request()) {
        check(parse_infer_request(&body, header, &Limits::default()))?;
    }

    /// The BYTES length-prefix decoder on arbitrary data: on success it returns exactly
    /// `elements` items that re-encode to the input.
    #[test]
    fn fuzz_length_prefixed(chunk in proptest::collection::vec(any::<u8>(), 0..128), elements in 0usize..8) {
        match decode_length_prefixed("x", elements, Bytes::from(chunk.clone())) {
            Ok(items) => {
                prop_assert_eq!(items.len(), elements);
                let mut again = Vec::new();
                for item in &items {
                    again.put_u32_le(item.len() as u32);
                    again.extend_from_slice(item);
                }
                prop_assert_eq!(again, chunk);
            }
            Err(e) => prop_assert!(matches!(e, ServeError::BadRequest(_)), "{e:?}"),
        }
    }

    /// Well-formed length-prefixed strings always decode to themselves.
    #[test]
    fn fuzz_length_prefixed_roundtrip(items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..8)) {
        let mut chunk = Vec::new();
        for item in &items {
            chunk.put_u32_le(item.len() as u32);
            chunk.extend_from_slice(item);
        }
        let decoded = decode_binary("x", DataType::Bytes, items.len(), Bytes::from(chunk));
        prop_assert_eq!(decoded, Ok(TensorData::Strings(items.into_iter().map(Bytes::from).collect())));
    }

    /// Arbitrary bytes as a protobuf message, then the gRPC tensor codec.
    #[test]
    fn fuzz_grpc_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(message) = ModelInferRequest::decode(bytes.as_slice()) {
            check(decode_request(message, &Limits::default()))?;
        }
    }

    /// Structured gRPC requests: typed contents of every field, raw contents, hostile shapes.
    #[test]
    fn fuzz_grpc_structured(request in grpc_request()) {
        check(decode_request(request, &Limits::default()))?;
    }
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    use proptest::collection::vec;
    let c = (
        vec(any::<bool>(), 0..4),
        vec(any::<i32>(), 0..4),
        vec(any::<i64>(), 0..4),
        vec(prop_oneof![0u32..300, any::<u32>()], 0..4),
        vec(any::<u64>(), 0..4),
        vec(any::<f32>(), 0..4),
        vec(any::<f64>(), 0..4),
        vec(vec(any::<u8>(), 0..4), 0..4),
    )
        .prop_map(|(b, i, i64s, u, u64s, f, d, s)| InferTensorContents {
            bool_contents: b,
            int_contents: i,
            int64_contents: i64s,
            uint_contents: u,
            uint64_contents: u64s,
            fp32_contents: f,
            fp64_contents: d,
            bytes_contents: s.into_iter().map(Bytes::from).collect(),
        });
    proptest::option::of(c)
}

fn grpc_request() -> impl Strategy<Value = ModelInferRequest> {
    let input = ("[a-z]{1,3}", datatype(), shape(), contents(), any::<bool>()).prop_map(
        |(name, datatype, shape, contents, shm)| {
            let mut parameters = std::collections::HashMap::new();
            if shm {
                parameters.insert(
                    "shared_memory_region".to_string(),
                    InferParameter { parameter_choice: Some(ParameterChoice::StringParam("r".into())) },
                );
            }
            InferInputTensor { name, datatype, shape, parameters, contents }
        },
    );
    (
        proptest::collection::vec(input, 0..4),
        proptest::option::of(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..5)),
        "[a-z]{0,3}",
    )
        .prop_map(|(inputs, raw, id)| ModelInferRequest {
            model_name: "m".into(),
            id,
            outputs: vec![InferRequestedOutputTensor { name: "o".into(), ..Default::default() }],
            raw_input_contents: raw.unwrap_or_default().into_iter().map(Bytes::from).collect(),
            inputs,
            ..Default::default()
        })
}
