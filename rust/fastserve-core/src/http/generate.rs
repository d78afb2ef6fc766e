//! Triton's generate extension: `POST .../generate` and `.../generate_stream` take a flat JSON
//! object whose fields are the model's inputs by name and answer each response as a flat object
//! of its outputs, once or as Server-Sent Events. Requests are turned into V2 requests and run
//! through the one pipeline like any other.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::error::{Result, ServeError};
use crate::http::json::{check_json_depth, parse_infer_request, JsonData};
use crate::request::{InferRequest, InferResponse, Parameters};
use crate::server::state::Limits;
use crate::spec::{ModelSpec, TensorSpec};

/// Turns a generate request into a V2 request for `spec`: a string is a BYTES element, a number
/// or boolean an element of the input's datatype, an array a 1-D tensor (shaped as the input's
/// fixed dims when they hold exactly its elements), with the batch dimension of 1 added when the
/// model batches; `parameters` pass through.
pub fn parse_generate_request(body: &Bytes, spec: &ModelSpec, limits: &Limits) -> Result<InferRequest> {
    check_json_depth(body, limits.max_json_depth)?;
    let fields: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| ServeError::bad_request(format!("a generate request must be a JSON object of inputs: {e}")))?;
    let mut inputs = Vec::with_capacity(fields.len());
    let mut parameters = Parameters::new();
    for (name, value) in fields {
        if name == "parameters" {
            parameters = match value {
                Value::Object(p) => p,
                other => return Err(ServeError::bad_request(format!("'parameters' must be an object, got {other}"))),
            };
            continue;
        }
        let Some(input) = spec.inputs.iter().find(|t| t.name == name) else {
            let known: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
            return Err(ServeError::bad_request(format!(
                "unexpected field '{name}' for model '{}' (its inputs are {known:?})",
                spec.name
            )));
        };
        inputs.push(wire_input(spec, input, value)?);
    }
    let wire = json!({ "inputs": inputs, "parameters": parameters });
    let body = Bytes::from(serde_json::to_vec(&wire).map_err(|e| ServeError::Internal(e.to_string()))?);
    let mut request = parse_infer_request(&body, None, limits)?;
    // Generate responses are JSON fields; the binary extension does not apply.
    request.parameters.remove("binary_data_output");
    Ok(request)
}

/// One input as a V2 JSON input.
fn wire_input(spec: &ModelSpec, input: &TensorSpec, value: Value) -> Result<Value> {
    let elements = match value {
        Value::Array(items) => {
            if let Some(nested) = items.iter().find(|v| v.is_array() || v.is_object()) {
                return Err(ServeError::bad_request(format!(
                    "field '{}': arrays must be flat, found {nested}",
                    input.name
                )));
            }
            items
        }
        Value::Object(_) | Value::Null => {
            return Err(ServeError::bad_request(format!(
                "field '{}' must be a string, a number, a boolean or a flat array",
                input.name
            )))
        }
        scalar => vec![scalar],
    };
    let n = elements.len() as i64;
    let fixed = input.dims.iter().all(|&d| d >= 0) && input.dims.iter().product::<i64>() == n;
    let mut shape = if fixed { input.dims.clone() } else { vec![n] };
    if spec.batching() {
        shape.insert(0, 1);
    }
    Ok(json!({ "name": input.name, "datatype": input.datatype.as_str(), "shape": shape, "data": elements }))
}

/// A response as a flat object: model name and version, and each output by name, one-element
/// outputs as their element and others as a flat array.
pub fn generate_response(response: &InferResponse) -> Value {
    let mut out = Map::new();
    out.insert("model_name".into(), Value::from(response.model_name.as_str()));
    out.insert("model_version".into(), Value::from(response.model_version.as_str()));
    if let Some(id) = &response.id {
        out.insert("id".into(), Value::from(id.as_str()));
    }
    for o in &response.outputs {
        let data = serde_json::to_value(JsonData(&o.tensor)).unwrap_or(Value::Null);
        let value = match data {
            Value::Array(mut items) if items.len() == 1 => items.pop().unwrap_or(Value::Null),
            other => other,
        };
        out.insert(o.tensor.name.clone(), value);
    }
    Value::Object(out)
}

/// One Server-Sent Event carrying `value`.
pub fn sse_event(value: &Value) -> Bytes {
    let mut event = b"data: ".to_vec();
    // A JSON value serializes on one line, as an SSE data field needs.
    let _ = serde_json::to_writer(&mut event, value);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ResponseOutput;
    use crate::tensor::datatype::DataType;
    use crate::tensor::{Tensor, TensorData};

    fn spec(max_batch_size: usize) -> ModelSpec {
        ModelSpec {
            name: "gen".into(),
            version: 1,
            platform: "python".into(),
            max_batch_size,
            decoupled: true,
            inputs: vec![
                TensorSpec::new("PROMPT", DataType::Bytes, vec![1]),
                TensorSpec::new("N", DataType::Int32, vec![1]),
                TensorSpec::new("W", DataType::Fp32, vec![-1]),
            ],
            outputs: vec![TensorSpec::new("TEXT", DataType::Bytes, vec![1])],
        }
    }

    fn parse(body: &str, max_batch_size: usize) -> Result<InferRequest> {
        parse_generate_request(&Bytes::from(body.to_string()), &spec(max_batch_size), &Limits::default())
    }

    #[test]
    fn fields_become_inputs_of_their_declared_types() {
        let r = parse(r#"{"PROMPT": "hi", "N": 3, "W": [0.5, 2], "parameters": {"k": 1}}"#, 0).unwrap();
        let by_name = |n: &str| r.inputs.iter().find(|t| t.name == n).unwrap();
        assert_eq!((by_name("PROMPT").datatype, by_name("PROMPT").shape.clone()), (DataType::Bytes, vec![1]));
        assert_eq!((by_name("N").datatype, by_name("N").shape.clone()), (DataType::Int32, vec![1]));
        assert_eq!(by_name("W").shape, vec![2]);
        assert_eq!(r.parameters["k"], 1);
        let batched = parse(r#"{"PROMPT": "hi", "N": 3, "W": [1]}"#, 4).unwrap();
        assert!(batched.inputs.iter().all(|t| t.shape[0] == 1 && t.shape.len() == 2));
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, says) in [
            (r#"{"NOPE": 1}"#, "unexpected field 'NOPE'"),
            (r#"{"W": [[1]]}"#, "arrays must be flat"),
            (r#"{"N": "three"}"#, "N"),
            (r#"{"N": null}"#, "field 'N'"),
            (r#"[1]"#, "JSON object"),
            (r#"{"parameters": 3}"#, "'parameters' must be an object"),
        ] {
            let e = parse(body, 0).unwrap_err();
            assert!(matches!(e, ServeError::BadRequest(_)), "{body}: {e:?}");
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn responses_are_flat_objects_and_events() {
        let text = Tensor::new("TEXT", DataType::Bytes, vec![1], TensorData::Strings(vec![Bytes::from("a")])).unwrap();
        let response = InferResponse {
            model_name: "gen".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![ResponseOutput { tensor: text, delivery: crate::request::Delivery::Json }],
        };
        let v = generate_response(&response);
        assert_eq!(v, json!({"model_name": "gen", "model_version": "1", "TEXT": "a"}));
        assert_eq!(sse_event(&v), Bytes::from(format!("data: {v}\n\n")));
    }
}
