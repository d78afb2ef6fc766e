//! KServe V2 REST JSON: infer requests (with the binary tensor extension) and responses.
//!
//! Tensor data is decoded straight from the JSON text into the little-endian buffer the batcher
//! concatenates, without an intermediate `serde_json::Value` per element.

use std::fmt;

use bytes::{BufMut, Bytes};
use half::f16;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{Result, ServeError};
use crate::request::{
    Delivery, InferRequest, InferResponse, InputHeader, Parameters, RequestedOutput, SharedMemoryInput, SharedMemoryRef,
};
use crate::server::state::Limits;
use crate::tensor::datatype::DataType;
use crate::tensor::{element_count, Tensor, TensorData};

#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(borrow)]
    inputs: Vec<WireInput<'a>>,
    #[serde(default)]
    outputs: Vec<WireOutput>,
}

#[derive(Deserialize)]
struct WireInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Parameters>,
}

fn param_u64(params: &Option<Parameters>, key: &str) -> Result<Option<u64>> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ServeError::bad_request(format!("parameter '{key}' must be a non-negative integer"))),
    }
}

/// Parses a V2 infer request. With `header_len` (the `Inference-Header-Content-Length` header) the
/// JSON is the first `header_len` bytes and inputs with `binary_data_size` take their data from the rest.
/// `limits` bounds the JSON nesting depth and the tensor elements the shapes ask for.
pub fn parse_infer_request(body: &Bytes, header_len: Option<usize>, limits: &Limits) -> Result<InferRequest> {
    let (json, mut binary) = match header_len {
        None => (body.clone(), Bytes::new()),
        Some(n) if n <= body.len() => (body.slice(..n), body.slice(n..)),
        Some(n) => {
            return Err(ServeError::bad_request(format!(
                "Inference-Header-Content-Length {n} exceeds the body size {}",
                body.len()
            )))
        }
    };
    check_json_depth(&json, limits.max_json_depth)?;
    let wire: WireRequest<'_> = serde_json::from_slice(&json)
        .map_err(|e| ServeError::bad_request(format!("malformed infer request JSON: {e}")))?;
    for input in &wire.inputs {
        check_fits_text(input)?;
    }
    limits.admit_shapes(wire.inputs.iter().map(|i| i.shape.as_slice()))?;
    let mut inputs = Vec::with_capacity(wire.inputs.len());
    let mut shared_memory_inputs = Vec::new();
    for input in wire.inputs {
        match SharedMemoryRef::from_parameters("input", &input.name, input.parameters.as_ref())? {
            Some(at) => shared_memory_inputs.push(shared_memory_input(input, at)?),
            None => inputs.push(decode_input(input, &mut binary)?),
        }
    }
    if !binary.is_empty() {
        return Err(ServeError::bad_request(format!(
            "{} bytes of binary data follow the JSON header but no input claims them",
            binary.len()
        )));
    }
    let parameters = wire.parameters.unwrap_or_default();
    let default_binary = parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    let outputs = wire
        .outputs
        .into_iter()
        .map(|o| {
            let binary = match o.parameters.as_ref().and_then(|p| p.get("binary_data")) {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => {
                    return Err(ServeError::bad_request(format!(
                        "output '{}': parameter 'binary_data' must be a boolean",
                        o.name
                    )))
                }
            };
            let shared_memory = SharedMemoryRef::from_parameters("output", &o.name, o.parameters.as_ref())?;
            if shared_memory.is_some() && binary == Some(true) {
                return Err(ServeError::bad_request(format!(
                    "output '{}': parameters 'shared_memory_region' and 'binary_data' = true exclude each other",
                    o.name
                )));
            }
            Ok(RequestedOutput { name: o.name, binary: binary.unwrap_or(default_binary), shared_memory })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(InferRequest { id: wire.id, parameters, inputs, shared_memory_inputs, outputs })
}

/// Refuses JSON nested deeper than `max_depth` arrays and objects. One pass over the bytes with a
/// counter, never recursion, so a hostile document is refused before any parser descends into it.
pub fn check_json_depth(json: &[u8], max_depth: usize) -> Result<()> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ServeError::bad_request(format!(
                        "JSON nesting is deeper than the limit of {max_depth} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Every JSON element takes at least one byte of text: a shape asking for more cannot match, which
/// is the client's mistake (400) before it is a size limit (413). Bad shapes are left to
/// [`decode_input`], which names them.
fn check_fits_text(input: &WireInput<'_>) -> Result<()> {
    let Some(raw) = input.data else { return Ok(()) };
    let dims: Option<Vec<usize>> = input.shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let Some(elements) = dims.as_deref().and_then(element_count) else { return Ok(()) };
    let binary = param_u64(&input.parameters, "binary_data_size")?.is_some();
    if !binary && elements > raw.get().len() {
        return Err(ServeError::bad_request(format!(
            "input '{}': shape {:?} needs {elements} elements, more than {} bytes of JSON data can hold",
            input.name,
            input.shape,
            raw.get().len()
        )));
    }
    Ok(())
}

/// An input in shared memory: its data must not be in the body too.
fn shared_memory_input(input: WireInput<'_>, at: SharedMemoryRef) -> Result<SharedMemoryInput> {
    let binary = param_u64(&input.parameters, "binary_data_size")?.is_some();
    if input.data.is_some() || binary {
        return Err(ServeError::bad_request(format!(
            "input '{}': set only one of 'data', parameter 'binary_data_size' and parameter 'shared_memory_region'",
            input.name
        )));
    }
    Ok(SharedMemoryInput { header: InputHeader::parse(input.name, &input.datatype, &input.shape)?, at })
}

/// Decodes one input (the request's element limit was checked from all shapes before).
fn decode_input(input: WireInput<'_>, binary: &mut Bytes) -> Result<Tensor> {
    let InputHeader { name, datatype, shape, elements } =
        InputHeader::parse(input.name, &input.datatype, &input.shape)?;
    let binary_size = param_u64(&input.parameters, "binary_data_size")?;
    let data = if let Some(size) = binary_size {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > binary.len() {
            return Err(ServeError::bad_request(format!(
                "input '{name}': binary_data_size {size} exceeds the {} bytes of binary data left",
                binary.len()
            )));
        }
        let chunk = binary.split_to(size);
        decode_binary(&name, datatype, elements, chunk)?
    } else {
        let raw = input.data.ok_or_else(|| {
            ServeError::bad_request(format!("input '{name}' has neither 'data' nor binary_data_size"))
        })?;
        decode_json_data(&name, datatype, elements, raw.get())?
    };
    Tensor::new(name, datatype, shape, data)
}

/// Binary extension data: raw little-endian elements, or BYTES as 4-byte length + bytes.
pub fn decode_binary(name: &str, datatype: DataType, elements: usize, chunk: Bytes) -> Result<TensorData> {
    match datatype.size() {
        Some(size) => {
            if Some(chunk.len()) != elements.checked_mul(size) {
                return Err(ServeError::bad_request(format!(
                    "input '{name}': {} bytes of binary data do not hold {elements} {datatype} elements",
                    chunk.len()
                )));
            }
            Ok(TensorData::Raw(chunk))
        }
        None => decode_length_prefixed(name, elements, chunk).map(TensorData::Strings),
    }
}

/// Splits 4-byte little-endian length-prefixed strings, checking every length against what is left.
pub fn decode_length_prefixed(name: &str, elements: usize, mut chunk: Bytes) -> Result<Vec<Bytes>> {
    // Each element needs at least its 4-byte prefix, which bounds the allocation.
    let mut out = Vec::with_capacity(elements.min(chunk.len() / 4));
    while !chunk.is_empty() {
        if chunk.len() < 4 {
            return Err(ServeError::bad_request(format!("input '{name}': truncated BYTES length prefix")));
        }
        let len = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        if len > chunk.len() - 4 {
            return Err(ServeError::bad_request(format!(
                "input '{name}': BYTES element of {len} bytes runs past the end of the data"
            )));
        }
        out.push(chunk.slice(4..4 + len));
        chunk = chunk.slice(4 + len..);
        if out.len() > elements {
            break;
        }
    }
    if out.len() != elements {
        return Err(ServeError::bad_request(format!(
            "input '{name}': expected {elements} BYTES elements, got {}",
            if out.len() > elements { "more".to_string() } else { out.len().to_string() }
        )));
    }
    Ok(out)
}

/// Collects decoded elements; stops as soon as there are more than the shape holds.
struct Sink {
    datatype: DataType,
    raw: Vec<u8>,
    strings: Vec<Bytes>,
    count: usize,
    limit: usize,
}

impl Sink {
    fn admit(&mut self) -> std::result::Result<(), String> {
        self.count += 1;
        if self.count > self.limit {
            return Err(format!("data has more than the {} elements the shape holds", self.limit));
        }
        Ok(())
    }

    fn push_int(&mut self, v: i128) -> std::result::Result<(), String> {
        self.admit()?;
        let dt = self.datatype;
        let out_of_range = || format!("value {v} is out of range for {dt}");
        macro_rules! put {
            ($t:ty) => {
                self.raw.extend_from_slice(&<$t>::try_from(v).map_err(|_| out_of_range())?.to_le_bytes())
            };
        }
        match dt {
            DataType::Uint8 => put!(u8),
            DataType::Uint16 => put!(u16),
            DataType::Uint32 => put!(u32),
            DataType::Uint64 => put!(u64),
            DataType::Int8 => put!(i8),
            DataType::Int16 => put!(i16),
            DataType::Int32 => put!(i32),
            DataType::Int64 => put!(i64),
            DataType::Fp16 | DataType::Fp32 | DataType::Fp64 => {
                self.count -= 1;
                return self.push_float(v as f64);
            }
            DataType::Bool => return Err(format!("expected true or false for BOOL, got {v}")),
            DataType::Bytes => return Err(format!("expected a string for BYTES, got {v}")),
        }
        Ok(())
    }

    fn push_float(&mut self, v: f64) -> std::result::Result<(), String> {
        self.admit()?;
        match self.datatype {
            DataType::Fp16 => self.raw.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            DataType::Fp32 => self.raw.extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::Fp64 => self.raw.extend_from_slice(&v.to_le_bytes()),
            dt => return Err(format!("expected an integer for {dt}, got {v}")),
        }
        Ok(())
    }

    fn push_bool(&mut self, v: bool) -> std::result::Result<(), String> {
        self.admit()?;
        match self.datatype {
            DataType::Bool => self.raw.push(v as u8),
            dt => return Err(format!("expected a number for {dt}, got {v}")),
        }
        Ok(())
    }

    fn push_str(&mut self, v: &str) -> std::result::Result<(), String> {
        self.admit()?;
        match self.datatype {
            DataType::Bytes => self.strings.push(Bytes::copy_from_slice(v.as_bytes())),
            dt => return Err(format!("expected a number for {dt}, got a string")),
        }
        Ok(())
    }
}

/// Walks nested JSON arrays in row-major order, feeding scalars to the sink.
struct Nested<'s>(&'s mut Sink);

impl<'de> DeserializeSeed<'de> for Nested<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, boolean, string or array of them")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let sink = self.0;
        while seq.next_element_seed(Nested(&mut *sink))?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<(), E> {
        self.0.push_bool(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<(), E> {
        self.0.push_int(v as i128).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<(), E> {
        self.0.push_int(v as i128).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<(), E> {
        self.0.push_float(v).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<(), E> {
        self.0.push_str(v).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        Err(E::custom("null is not a tensor element"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> std::result::Result<(), A::Error> {
        Err(de::Error::custom("an object is not a tensor element"))
    }
}

/// Decodes a JSON `data` value (flat or nested, row-major) holding exactly `elements` elements.
pub fn decode_json_data(name: &str, datatype: DataType, elements: usize, json: &str) -> Result<TensorData> {
    if let Some(floats) = decode_json_floats(datatype, elements, json) {
        return floats
            .map(|raw| TensorData::Raw(raw.into()))
            .map_err(|e| ServeError::bad_request(format!("input '{name}': {e}")));
    }
    // Every JSON element takes at least one byte of text, which bounds the allocation.
    let capacity = elements.min(json.len());
    let mut sink = Sink {
        datatype,
        raw: Vec::with_capacity(datatype.size().map_or(0, |s| capacity * s)),
        strings: Vec::new(),
        count: 0,
        limit: elements,
    };
    let mut de = serde_json::Deserializer::from_str(json);
    Nested(&mut sink)
        .deserialize(&mut de)
        .map_err(|e| ServeError::bad_request(format!("input '{name}': {}", strip_position(&e))))?;
    if sink.count != elements {
        return Err(ServeError::bad_request(format!(
            "input '{name}': shape needs {elements} elements, data has {}",
            sink.count
        )));
    }
    Ok(match datatype {
        DataType::Bytes => TensorData::Strings(sink.strings),
        _ => TensorData::Raw(sink.raw.into()),
    })
}

/// Float tensors parsed from each number's own text by the standard library's correctly rounded
/// parser, so every value comes back bit-identical: serde_json hands visitors an `f64`, which is
/// not correctly rounded without its `float_roundtrip` feature and rounds FP32 twice (decimal →
/// f64 → f32) with it. `json` is already valid JSON (a `RawValue`), so only numbers, brackets,
/// commas and whitespace need telling apart; `None` for anything else (strings, booleans, null,
/// objects), which the general decoder then reports.
fn decode_json_floats(datatype: DataType, elements: usize, json: &str) -> Option<std::result::Result<Vec<u8>, String>> {
    let size = match datatype {
        DataType::Fp16 | DataType::Fp32 | DataType::Fp64 => datatype.size()?,
        _ => return None,
    };
    let bytes = json.as_bytes();
    // Every element takes at least one byte of text, which bounds the allocation.
    let mut raw = Vec::with_capacity(elements.min(json.len()) * size);
    let (mut i, mut count) = (0, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'[' | b']' | b',' | b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                count += 1;
                if count > elements {
                    return Some(Err(format!("data has more than the {elements} elements the shape holds")));
                }
                let text = &json[start..i];
                let out_of_range = || format!("value {text} is out of range for {datatype}");
                match datatype {
                    DataType::Fp64 => match text.parse::<f64>() {
                        Ok(v) if v.is_finite() => raw.extend_from_slice(&v.to_le_bytes()),
                        _ => return Some(Err(out_of_range())),
                    },
                    DataType::Fp32 => match text.parse::<f32>() {
                        Ok(v) if v.is_finite() => raw.extend_from_slice(&v.to_le_bytes()),
                        _ => return Some(Err(out_of_range())),
                    },
                    _ => match text.parse::<f64>().map(f16::from_f64) {
                        Ok(v) if v.is_finite() => raw.extend_from_slice(&v.to_le_bytes()),
                        _ => return Some(Err(out_of_range())),
                    },
                }
            }
            _ => return None,
        }
    }
    if count != elements {
        return Some(Err(format!("shape needs {elements} elements, data has {count}")));
    }
    Some(Ok(raw))
}

/// Data errors point into a sub-document, so their line/column would mislead the user.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Serializes tensor data as a flat JSON array.
/// A tensor's elements as a flat JSON array.
pub(crate) struct JsonData<'a>(pub(crate) &'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.data_elements()))?;
        match &t.data {
            TensorData::Strings(items) => {
                for b in items {
                    seq.serialize_element(&*String::from_utf8_lossy(b))?;
                }
            }
            TensorData::Raw(buf) => {
                macro_rules! each {
                    ($t:ty, $n:expr, $conv:expr) => {
                        for c in buf.chunks_exact($n) {
                            let v = <$t>::from_le_bytes(c.try_into().expect("chunk size"));
                            seq.serialize_element(&$conv(v))?;
                        }
                    };
                }
                match t.datatype {
                    DataType::Bool => {
                        for &b in buf.iter() {
                            seq.serialize_element(&(b != 0))?;
                        }
                    }
                    DataType::Uint8 => each!(u8, 1, |v| v),
                    DataType::Uint16 => each!(u16, 2, |v| v),
                    DataType::Uint32 => each!(u32, 4, |v| v),
                    DataType::Uint64 => each!(u64, 8, |v| v),
                    DataType::Int8 => each!(i8, 1, |v| v),
                    DataType::Int16 => each!(i16, 2, |v| v),
                    DataType::Int32 => each!(i32, 4, |v| v),
                    DataType::Int64 => each!(i64, 8, |v| v),
                    DataType::Fp16 => each!(u16, 2, |v| f16::from_bits(v).to_f32()),
                    DataType::Fp32 => each!(f32, 4, |v| v),
                    DataType::Fp64 => each!(f64, 8, |v| v),
                    DataType::Bytes => {}
                }
            }
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct WireResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<WireResponseOutput<'a>>,
}

#[derive(Serialize)]
struct WireResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// Bytes of an output as the binary extension sends them.
pub fn binary_size(t: &Tensor) -> usize {
    match &t.data {
        TensorData::Raw(b) => b.len(),
        TensorData::Strings(s) => s.iter().map(|b| 4 + b.len()).sum(),
    }
}

/// Appends an output's binary-extension bytes.
pub fn put_binary(out: &mut Vec<u8>, t: &Tensor) {
    match &t.data {
        TensorData::Raw(b) => out.extend_from_slice(b),
        TensorData::Strings(items) => {
            for b in items {
                out.put_u32_le(b.len() as u32);
                out.extend_from_slice(b);
            }
        }
    }
}

/// Encodes a response. Returns the body and, when any output is binary, the JSON header length
/// for the `Inference-Header-Content-Length` header.
pub fn encode_infer_response(resp: &InferResponse) -> (Vec<u8>, Option<usize>) {
    let outputs = resp
        .outputs
        .iter()
        .map(|o| WireResponseOutput {
            name: &o.tensor.name,
            datatype: o.tensor.datatype.as_str(),
            shape: &o.tensor.shape,
            // An output written into shared memory is only described, as Triton does.
            parameters: (o.delivery == Delivery::Binary)
                .then(|| BinarySize { binary_data_size: binary_size(&o.tensor) }),
            data: (o.delivery == Delivery::Json).then_some(JsonData(&o.tensor)),
        })
        .collect();
    let wire = WireResponse {
        model_name: &resp.model_name,
        model_version: &resp.model_version,
        id: resp.id.as_deref(),
        outputs,
    };
    let mut body = Vec::with_capacity(256);
    // Serializing plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, &wire);
    if !resp.outputs.iter().any(|o| o.delivery == Delivery::Binary) {
        return (body, None);
    }
    let header_len = body.len();
    for o in resp.outputs.iter().filter(|o| o.delivery == Delivery::Binary) {
        put_binary(&mut body, &o.tensor);
    }
    (body, Some(header_len))
}

/// The V2 error body: `{"error": "<message>"}`.
pub fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ResponseOutput;

    fn parse(json: &str) -> Result<InferRequest> {
        parse_infer_request(&Bytes::copy_from_slice(json.as_bytes()), None, &Limits::default())
    }

    fn raw(t: &Tensor) -> &[u8] {
        match &t.data {
            TensorData::Raw(b) => b,
            _ => panic!("not raw"),
        }
    }

    #[test]
    fn parses_nested_and_flat_data() {
        let r = parse(r#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}],"outputs":[{"name":"y"}]}"#).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        let expected: Vec<u8> = [1.0f32, 2.5, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(raw(&r.inputs[0]), &expected[..]);
        assert_eq!(r.outputs[0].name, "y");
        let flat = parse(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#).unwrap();
        assert_eq!(raw(&flat.inputs[0]), &expected[..]);
    }

    #[test]
    fn every_datatype_round_trips() {
        let cases = [
            ("BOOL", "[true,false]"),
            ("UINT8", "[0,255]"),
            ("UINT16", "[0,65535]"),
            ("UINT32", "[0,4294967295]"),
            ("UINT64", "[0,18446744073709551615]"),
            ("INT8", "[-128,127]"),
            ("INT16", "[-32768,32767]"),
            ("INT32", "[-2147483648,2147483647]"),
            ("INT64", "[-9223372036854775808,9223372036854775807]"),
            ("FP16", "[1.5,-2.0]"),
            ("FP32", "[1.5,-0.1]"),
            ("FP64", "[1.5,-0.1]"),
            ("BYTES", r#"["a","héllo"]"#),
        ];
        for (dt, data) in cases {
            let json = format!(r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":{data}}}]}}"#);
            let r = parse(&json).unwrap_or_else(|e| panic!("{dt}: {e}"));
            let resp = InferResponse {
                model_name: "m".into(),
                model_version: "1".into(),
                id: None,
                outputs: vec![ResponseOutput { tensor: r.inputs[0].clone(), delivery: Delivery::Json }],
            };
            let (body, header) = encode_infer_response(&resp);
            assert_eq!(header, None);
            let v: Value = serde_json::from_slice(&body).unwrap();
            let expected: Value = serde_json::from_str(data).unwrap();
            let got = &v["outputs"][0]["data"];
            if dt == "FP16" || dt == "FP32" || dt == "FP64" {
                for (g, e) in got.as_array().unwrap().iter().zip(expected.as_array().unwrap()) {
                    assert!((g.as_f64().unwrap() - e.as_f64().unwrap()).abs() < 1e-6, "{dt}");
                }
            } else {
                assert_eq!(got, &expected, "{dt}");
            }
            assert_eq!(v["outputs"][0]["datatype"], dt);
        }
    }

    #[test]
    fn rejects_bad_data_with_clear_messages() {
        let cases = [
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"UINT8","data":[1,256]}]}"#,
                "input 'x': value 256 is out of range for UINT8",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                "input 'x': shape needs 3 elements, data has 2",
            ),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1,2]}]}"#, "more than the 1 elements"),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[1.5]}]}"#,
                "expected an integer for INT32",
            ),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#, "unknown datatype 'FLOAT'"),
            (r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#, "negative dimension"),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#, "neither 'data' nor binary_data_size"),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[null]}]}"#,
                "null is not a tensor element",
            ),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[1]}]}"#, "expected true or false"),
            (
                r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","data":[1]}]}"#,
                "too large",
            ),
            (r#"{"inputs": [}"#, "malformed infer request JSON"),
            (r#"{"outputs": []}"#, "malformed infer request JSON: missing field `inputs`"),
        ];
        for (json, msg) in cases {
            let err = parse(json).unwrap_err();
            assert!(matches!(err, ServeError::BadRequest(_)), "{json}");
            assert!(err.to_string().contains(msg), "{err} should contain {msg}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        assert!(matches!(parse(&deep), Err(ServeError::BadRequest(_))));
    }

    #[test]
    fn binary_extension_inputs_and_outputs() {
        let header = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}},{"name":"s","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}],"outputs":[{"name":"x","parameters":{"binary_data":true}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(b"ab");
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(b"c");
        let r = parse_infer_request(&Bytes::from(body.clone()), Some(header.len()), &Limits::default()).unwrap();
        assert_eq!(raw(&r.inputs[0]), &body[header.len()..header.len() + 8]);
        assert_eq!(r.inputs[1].data, TensorData::Strings(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")]));
        assert!(r.outputs[0].binary);

        let resp = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![ResponseOutput { tensor: r.inputs[0].clone(), delivery: Delivery::Binary }],
        };
        let (out, header_len) = encode_infer_response(&resp);
        let n = header_len.unwrap();
        let v: Value = serde_json::from_slice(&out[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(&out[n..], &body[header.len()..header.len() + 8]);
    }

    #[test]
    fn binary_sizes_are_checked_before_use() {
        let header = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[0u8; 4]);
        let err = parse_infer_request(&Bytes::from(body.clone()), Some(header.len()), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("exceeds the 4 bytes of binary data left"), "{err}");
        let err =
            parse_infer_request(&Bytes::from(body.clone()), Some(body.len() + 1), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("exceeds the body size"), "{err}");
        body.extend_from_slice(&[0u8; 8]);
        let err = parse_infer_request(&Bytes::from(body), Some(header.len()), &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("no input claims them"), "{err}");
        let err = decode_length_prefixed("s", 1, Bytes::from_static(&[9, 0, 0, 0, 1])).unwrap_err();
        assert!(err.to_string().contains("runs past the end"), "{err}");
    }
    #[test]
    fn nesting_deeper_than_the_limit_is_refused_without_recursion() {
        let deep = "[".repeat(200_000) + &"]".repeat(200_000);
        let body = format!(r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}]}}"#);
        let err = parse(&body).unwrap_err();
        assert_eq!(err, ServeError::bad_request("JSON nesting is deeper than the limit of 64 levels"));
        // Brackets inside strings, escaped quotes included, do not count.
        let quoted = format!(r#"{{"id":"\"{}","inputs":[]}}"#, "[".repeat(1000));
        assert!(parse(&quoted).is_ok());
        assert!(check_json_depth(b"[[[]]]", 3).is_ok());
        assert!(check_json_depth(b"[{\"a\":[]}]", 2).is_err());
    }

    #[test]
    fn shapes_are_checked_against_the_element_limit_before_decoding() {
        // More elements than the data's text can hold: a 400 without allocating for the shape.
        let err =
            parse(r#"{"inputs":[{"name":"x","shape":[1000000000000],"datatype":"FP32","data":[1,2,3]}]}"#).unwrap_err();
        assert!(matches!(&err, ServeError::BadRequest(m) if m.contains("needs 1000000000000 elements")), "{err}");
        let limits = Limits { max_request_elements: 5, ..Limits::default() };
        let two = r#"{"name":"x","shape":[3],"datatype":"INT32","data":[1,2,3]}"#;
        let body = format!(r#"{{"inputs":[{two},{two}]}}"#);
        let err = parse_infer_request(&Bytes::from(body), None, &limits).unwrap_err();
        assert_eq!(
            err,
            ServeError::PayloadTooLarge("the request's inputs hold 6 tensor elements, over the limit of 5".into())
        );
    }

    /// Encodes `values` as a response's JSON data and decodes that text as request data.
    fn json_round_trip(datatype: DataType, raw: Vec<u8>, elements: usize) -> Vec<u8> {
        let t = Tensor::new("x", datatype, vec![elements], TensorData::Raw(raw.into())).unwrap();
        let text = serde_json::to_string(&JsonData(&t)).unwrap();
        match decode_json_data("x", datatype, elements, &text).unwrap() {
            TensorData::Raw(b) => b.to_vec(),
            TensorData::Strings(_) => unreachable!(),
        }
    }

    fn decoded(datatype: DataType, text: &str) -> Vec<u8> {
        match decode_json_data("x", datatype, 1, text).unwrap() {
            TensorData::Raw(b) => b.to_vec(),
            TensorData::Strings(_) => unreachable!(),
        }
    }

    #[test]
    fn floats_are_parsed_correctly_rounded() {
        // serde_json's default parser answered -0.4922065185513296 for this one.
        assert_eq!(decoded(DataType::Fp64, "[-0.49220651855132963]"), (-0.492_206_518_551_329_63_f64).to_le_bytes());
        for (text, v) in [("4.9e-324", 4.9e-324_f64), ("1.7976931348623157e308", f64::MAX), ("-0.0", -0.0)] {
            assert_eq!(decoded(DataType::Fp64, text), v.to_le_bytes(), "{text}");
        }
        for (text, v) in [("1e-45", f32::from_bits(1)), ("3.4028235e38", f32::MAX), ("0.1", 0.1_f32)] {
            assert_eq!(decoded(DataType::Fp32, text), v.to_le_bytes(), "{text}");
        }
        let err = decode_json_data("x", DataType::Fp32, 1, "[1e39]").unwrap_err().to_string();
        assert!(err.contains("out of range for FP32"), "{err}");
        let err = decode_json_data("x", DataType::Fp32, 1, r#"["1"]"#).unwrap_err().to_string();
        assert!(err.contains("got a string"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4000))]

        /// Every finite double (subnormals and extremes included) comes back bit-identical, whether
        /// written shortest (as we answer), with 17 significant digits (as C's %.17g), or in
        /// exponent form; and what we answer parses back to the same bits.
        #[test]
        fn fp64_json_round_trips_bit_identically(bits in proptest::prelude::any::<u64>()) {
            let v = f64::from_bits(bits);
            proptest::prop_assume!(v.is_finite());
            for text in [format!("[{v}]"), format!("[{v:.16e}]"), format!("[{v:e}]")] {
                proptest::prop_assert_eq!(decoded(DataType::Fp64, &text), v.to_le_bytes().to_vec(), "{}", text);
            }
            proptest::prop_assert_eq!(json_round_trip(DataType::Fp64, v.to_le_bytes().to_vec(), 1), v.to_le_bytes().to_vec());
        }

        /// The same for FP32, including the exact double value of a float (what a client that
        /// widens float32 to a Python float sends).
        #[test]
        fn fp32_json_round_trips_bit_identically(bits in proptest::prelude::any::<u32>()) {
            let v = f32::from_bits(bits);
            proptest::prop_assume!(v.is_finite());
            let wide = f64::from(v);
            for text in [format!("[{v}]"), format!("[{v:.8e}]"), format!("[{wide}]"), format!("[{wide:.16e}]")] {
                proptest::prop_assert_eq!(decoded(DataType::Fp32, &text), v.to_le_bytes().to_vec(), "{}", text);
            }
            proptest::prop_assert_eq!(json_round_trip(DataType::Fp32, v.to_le_bytes().to_vec(), 1), v.to_le_bytes().to_vec());
        }

        #[test]
        fn fp16_json_round_trips_bit_identically(bits in proptest::prelude::any::<u16>()) {
            let v = f16::from_bits(bits);
            proptest::prop_assume!(v.is_finite());
            proptest::prop_assert_eq!(json_round_trip(DataType::Fp16, v.to_le_bytes().to_vec(), 1), v.to_le_bytes().to_vec());
        }
    }
}
