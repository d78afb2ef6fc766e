//! V2 gRPC tensors to and from the serving path's tensors. Inputs come either as typed
//! `contents` or as `raw_input_contents` (the binary layout of the HTTP extension); outputs are
//! always answered in `raw_output_contents`, which is what tritonclient reads.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{Result, ServeError};
use crate::http::json::{binary_size, decode_binary, put_binary};
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::InferInputTensor;
use crate::proto::model_infer_response::InferOutputTensor;
use crate::proto::{InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse};
use crate::request::{
    Delivery, InferRequest, InferResponse, InputHeader, Parameters, RequestedOutput, SharedMemoryInput, SharedMemoryRef,
};
use crate::server::state::Limits;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

/// Decodes a `ModelInferRequest`, checking every count and size against the shapes. Inputs in
/// shared memory take no `raw_input_contents` entry (as tritonclient sends them): the entries
/// belong, in order, to the other inputs.
pub fn decode_request(request: ModelInferRequest, limits: &Limits) -> Result<InferRequest> {
    let ModelInferRequest { id, parameters, inputs, outputs, raw_input_contents, .. } = request;
    limits.admit_shapes(inputs.iter().map(|i| i.shape.as_slice()))?;
    let mut placed = Vec::with_capacity(inputs.len());
    for input in inputs {
        let at = SharedMemoryRef::from_parameters("input", &input.name, shm_parameters(&input.parameters).as_ref())?;
        placed.push((input, at));
    }
    let in_body = placed.iter().filter(|(_, at)| at.is_none()).count();
    if !raw_input_contents.is_empty() && raw_input_contents.len() != in_body {
        let shm = placed.len() - in_body;
        return Err(ServeError::bad_request(format!(
            "raw_input_contents has {} entries for {in_body} inputs; send one per input, in input order{}",
            raw_input_contents.len(),
            if shm > 0 { format!(" ({shm} inputs in shared memory take none)") } else { String::new() }
        )));
    }
    let mut raw = raw_input_contents.into_iter();
    let (mut tensors, mut shared_memory_inputs) = (Vec::with_capacity(in_body), Vec::new());
    for (input, at) in placed {
        match at {
            Some(at) => shared_memory_inputs.push(shared_memory_input(input, at)?),
            None => tensors.push(decode_input(input, raw.next())?),
        }
    }
    let outputs = outputs
        .into_iter()
        .map(|o| {
            let shared_memory =
                SharedMemoryRef::from_parameters("output", &o.name, shm_parameters(&o.parameters).as_ref())?;
            Ok(RequestedOutput { name: o.name, binary: false, shared_memory })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(InferRequest {
        id: (!id.is_empty()).then_some(id),
        parameters: to_json(&parameters),
        inputs: tensors,
        shared_memory_inputs,
        outputs,
    })
}

/// An input in shared memory: its data must not be in `contents` too.
fn shared_memory_input(input: InferInputTensor, at: SharedMemoryRef) -> Result<SharedMemoryInput> {
    let InferInputTensor { name, datatype, shape, contents, .. } = input;
    if contents.is_some_and(|c| c != InferTensorContents::default()) {
        return Err(ServeError::bad_request(format!(
            "input '{name}': data given both in contents and in shared memory"
        )));
    }
    Ok(SharedMemoryInput { header: InputHeader::parse(name, &datatype, &shape)?, at })
}

fn decode_input(input: InferInputTensor, raw: Option<bytes::Bytes>) -> Result<Tensor> {
    let InferInputTensor { name, datatype, shape, contents, .. } = input;
    let InputHeader { name, datatype, shape: dims, elements } = InputHeader::parse(name, &datatype, &shape)?;
    let data = match (raw, contents) {
        (Some(_), Some(c)) if c != InferTensorContents::default() => {
            return Err(ServeError::bad_request(format!(
                "input '{name}': data given both in contents and in raw_input_contents"
            )))
        }
        (Some(chunk), _) => decode_binary(&name, datatype, elements, chunk)?,
        (None, contents) => decode_contents(&name, datatype, elements, contents.unwrap_or_default())?,
    };
    Tensor::new(name, datatype, dims, data)
}

/// Typed contents: the field the datatype travels in must hold exactly `elements` values, each in
/// range for the datatype.
fn decode_contents(name: &str, datatype: DataType, elements: usize, c: InferTensorContents) -> Result<TensorData> {
    let count = |field: &str, got: usize| -> Result<()> {
        if got != elements {
            return Err(ServeError::bad_request(format!(
                "input '{name}': shape needs {elements} {datatype} elements, {field} has {got}"
            )));
        }
        Ok(())
    };
    macro_rules! pack {
        ($values:expr, $field:literal, $t:ty) => {{
            let values = $values;
            count($field, values.len())?;
            let mut out = Vec::with_capacity(values.len() * std::mem::size_of::<$t>());
            for v in values {
                let v = <$t>::try_from(v).map_err(|_| {
                    ServeError::bad_request(format!("input '{name}': value {v} is out of range for {datatype}"))
                })?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            TensorData::Raw(out.into())
        }};
    }
    Ok(match datatype {
        DataType::Bool => {
            count("bool_contents", c.bool_contents.len())?;
            TensorData::Raw(c.bool_contents.into_iter().map(u8::from).collect::<Vec<u8>>().into())
        }
        DataType::Uint8 => pack!(c.uint_contents, "uint_contents", u8),
        DataType::Uint16 => pack!(c.uint_contents, "uint_contents", u16),
        DataType::Uint32 => pack!(c.uint_contents, "uint_contents", u32),
        DataType::Uint64 => pack!(c.uint64_contents, "uint64_contents", u64),
        DataType::Int8 => pack!(c.int_contents, "int_contents", i8),
        DataType::Int16 => pack!(c.int_contents, "int_contents", i16),
        DataType::Int32 => pack!(c.int_contents, "int_contents", i32),
        DataType::Int64 => pack!(c.int64_contents, "int64_contents", i64),
        DataType::Fp32 => pack!(c.fp32_contents, "fp32_contents", f32),
        DataType::Fp64 => pack!(c.fp64_contents, "fp64_contents", f64),
        DataType::Fp16 => {
            return Err(ServeError::bad_request(format!(
                "input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
            )))
        }
        DataType::Bytes => {
            count("bytes_contents", c.bytes_contents.len())?;
            TensorData::Strings(c.bytes_contents)
        }
    })
}

/// Encodes a response with every output's data in `raw_output_contents`, in output order.
/// Fixed-size data is handed over without a copy.
pub fn encode_response(response: InferResponse) -> ModelInferResponse {
    let InferResponse { model_name, model_version, id, outputs } = response;
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for o in outputs {
        let t = o.tensor;
        raw.push(match &t.data {
            // Every output has its entry, so tritonclient's index into the list stays right; one
            // written into shared memory has an empty one, as Triton answers.
            _ if o.delivery == Delivery::SharedMemory => bytes::Bytes::new(),
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(_) => {
                let mut buf = Vec::with_capacity(binary_size(&t));
                put_binary(&mut buf, &t);
                buf.into()
            }
        });
        tensors.push(InferOutputTensor {
            datatype: t.datatype.as_str().to_string(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            name: t.name,
            ..Default::default()
        });
    }
    ModelInferResponse {
        model_name,
        model_version,
        id: id.unwrap_or_default(),
        outputs: tensors,
        raw_output_contents: raw,
        ..Default::default()
    }
}

/// A tensor's parameters as the JSON path carries them, only when it has shared-memory ones (the
/// common tensor has none, and costs no conversion).
fn shm_parameters(parameters: &HashMap<String, InferParameter>) -> Option<Parameters> {
    parameters.keys().any(|k| SharedMemoryRef::is_parameter(k)).then(|| to_json(parameters))
}

/// Request or tensor parameters as the JSON path carries them.
fn to_json(parameters: &HashMap<String, InferParameter>) -> Parameters {
    parameters
        .iter()
        .filter_map(|(k, p)| {
            let v = match p.parameter_choice.as_ref()? {
                ParameterChoice::BoolParam(b) => Value::from(*b),
                ParameterChoice::Int64Param(i) => Value::from(*i),
                ParameterChoice::StringParam(s) => Value::from(s.as_str()),
                ParameterChoice::DoubleParam(d) => Value::from(*d),
                ParameterChoice::Uint64Param(u) => Value::from(*u),
            };
            Some((k.clone(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::request::ResponseOutput;

    fn input(name: &str, datatype: &str, shape: Vec<i64>, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: datatype.into(), shape, parameters: HashMap::new(), contents }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> ModelInferRequest {
        ModelInferRequest { model_name: "m".into(), inputs, raw_input_contents: raw, ..Default::default() }
    }

    fn raw_of(t: &Tensor) -> &[u8] {
        match &t.data {
            TensorData::Raw(b) => b,
            TensorData::Strings(_) => panic!("not raw"),
        }
    }

    #[test]
    fn typed_contents_become_little_endian_elements() {
        let c = |f: fn(&mut InferTensorContents)| {
            let mut c = InferTensorContents::default();
            f(&mut c);
            Some(c)
        };
        let cases: Vec<(&str, Option<InferTensorContents>, Vec<u8>)> = vec![
            ("BOOL", c(|c| c.bool_contents = vec![true, false]), vec![1, 0]),
            ("UINT8", c(|c| c.uint_contents = vec![0, 255]), vec![0, 255]),
            (
                "UINT16",
                c(|c| c.uint_contents = vec![1, 65535]),
                [1u16, 65535].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "UINT32",
                c(|c| c.uint_contents = vec![1, u32::MAX]),
                [1u32, u32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "UINT64",
                c(|c| c.uint64_contents = vec![1, u64::MAX]),
                [1u64, u64::MAX].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            ("INT8", c(|c| c.int_contents = vec![-128, 127]), vec![0x80, 0x7f]),
            ("INT16", c(|c| c.int_contents = vec![-1, 2]), [-1i16, 2].iter().flat_map(|v| v.to_le_bytes()).collect()),
            (
                "INT32",
                c(|c| c.int_contents = vec![i32::MIN, 2]),
                [i32::MIN, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "INT64",
                c(|c| c.int64_contents = vec![i64::MIN, 2]),
                [i64::MIN, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "FP32",
                c(|c| c.fp32_contents = vec![1.5, -0.25]),
                [1.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "FP64",
                c(|c| c.fp64_contents = vec![1.5, -0.25]),
                [1.5f64, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        for (dt, contents, expected) in cases {
            let r =
                decode_request(request(vec![input("x", dt, vec![2], contents)], vec![]), &Limits::default()).unwrap();
            assert_eq!(raw_of(&r.inputs[0]), &expected[..], "{dt}");
            assert_eq!(r.inputs[0].datatype.as_str(), dt);
        }
        let c = InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"a"), Bytes::from_static(b"")],
            ..Default::default()
        };
        let r = decode_request(request(vec![input("s", "BYTES", vec![1, 2], Some(c))], vec![]), &Limits::default())
            .unwrap();
        assert_eq!(r.inputs[0].data, TensorData::Strings(vec![Bytes::from_static(b"a"), Bytes::new()]));
    }

    #[test]
    fn raw_contents_are_used_without_copying() {
        let buf = Bytes::from([1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        let mut strings = Vec::new();
        for s in [&b"ab"[..], b"c"] {
            strings.extend_from_slice(&(s.len() as u32).to_le_bytes());
            strings.extend_from_slice(s);
        }
        let r = decode_request(
            request(
                vec![input("x", "FP32", vec![1, 2], None), input("s", "BYTES", vec![2], None)],
                vec![buf.clone(), Bytes::from(strings)],
            ),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(raw_of(&r.inputs[0]).as_ptr(), buf.as_ptr());
        assert_eq!(r.inputs[1].data, TensorData::Strings(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")]));
    }

    #[test]
    fn bad_tensors_are_invalid_arguments_with_clear_messages() {
        let fp32 = |n: usize| Some(InferTensorContents { fp32_contents: vec![0.0; n], ..Default::default() });
        let ints = |v: Vec<i32>| Some(InferTensorContents { int_contents: v, ..Default::default() });
        let cases = [
            (
                request(vec![input("x", "FP32", vec![2, 2], fp32(3))], vec![]),
                "input 'x': shape needs 4 FP32 elements, fp32_contents has 3",
            ),
            (request(vec![input("x", "FP32", vec![2], ints(vec![1, 2]))], vec![]), "fp32_contents has 0"),
            (request(vec![input("x", "INT8", vec![1], ints(vec![128]))], vec![]), "value 128 is out of range for INT8"),
            (request(vec![input("x", "FP16", vec![1], None)], vec![]), "send it in raw_input_contents"),
            (request(vec![input("x", "FLOAT", vec![1], None)], vec![]), "unknown datatype 'FLOAT'"),
            (request(vec![input("x", "FP32", vec![-1], None)], vec![]), "negative dimension"),
            (request(vec![input("x", "FP32", vec![1 << 40, 1 << 40], None)], vec![]), "too large"),
            (
                request(vec![input("x", "FP32", vec![2], None)], vec![Bytes::from_static(&[0; 7])]),
                "7 bytes of binary data do not hold 2 FP32 elements",
            ),
            (
                request(vec![input("x", "FP32", vec![1], fp32(1))], vec![Bytes::from_static(&[0; 4])]),
                "both in contents and in raw_input_contents",
            ),
            (
                request(
                    vec![input("x", "FP32", vec![1], None), input("y", "FP32", vec![1], None)],
                    vec![Bytes::from_static(&[0; 4])],
                ),
                "raw_input_contents has 1 entries for 2 inputs",
            ),
            (
                request(vec![input("s", "BYTES", vec![1], None)], vec![Bytes::from_static(&[9, 0, 0, 0, 1])]),
                "runs past the end",
            ),
        ];
        for (req, msg) in cases {
            let err = decode_request(req, &Limits::default()).unwrap_err();
            assert!(matches!(err, ServeError::BadRequest(_)), "{err}");
            assert!(err.to_string().contains(msg), "{err} should contain {msg}");
        }
    }

    #[test]
    fn responses_carry_raw_outputs_in_order() {
        let x = Tensor::new(
            "x",
            DataType::Int32,
            vec![1, 2],
            TensorData::Raw(Bytes::from_static(&[1, 0, 0, 0, 2, 0, 0, 0])),
        )
        .unwrap();
        let s =
            Tensor::new("s", DataType::Bytes, vec![1], TensorData::Strings(vec![Bytes::from_static(b"hi")])).unwrap();
        let resp = encode_response(InferResponse {
            model_name: "m".into(),
            model_version: "3".into(),
            id: Some("7".into()),
            outputs: vec![
                ResponseOutput { tensor: x, delivery: Delivery::Json },
                ResponseOutput { tensor: s, delivery: Delivery::Json },
            ],
        });
        assert_eq!((resp.model_name.as_str(), resp.model_version.as_str(), resp.id.as_str()), ("m", "3", "7"));
        assert_eq!(resp.outputs[0].name, "x");
        assert_eq!(resp.outputs[0].datatype, "INT32");
        assert_eq!(resp.outputs[0].shape, vec![1, 2]);
        assert_eq!(resp.outputs[1].datatype, "BYTES");
        assert_eq!(&resp.raw_output_contents[0][..], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&resp.raw_output_contents[1][..], &[2, 0, 0, 0, b'h', b'i']);
    }

    #[test]
    fn parameters_reach_the_request() {
        let mut req = request(vec![], vec![]);
        req.parameters
            .insert("flag".into(), InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) });
        req.parameters.insert("n".into(), InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(-3)) });
        req.id = "abc".into();
        let r = decode_request(req, &Limits::default()).unwrap();
        assert_eq!(r.id.as_deref(), Some("abc"));
        assert_eq!(r.parameters["flag"], Value::from(true));
        assert_eq!(r.parameters["n"], Value::from(-3));
    }
}
