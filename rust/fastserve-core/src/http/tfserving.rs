//! KServe V1 / TensorFlow Serving REST: `POST /v1/models/{m}[/versions/{v}]:predict` with a row
//! (`instances`) or columnar (`inputs`) body, answered as `predictions` or `outputs` the way
//! TensorFlow Serving does, and `GET /v1/models/{m}` (the model's version status in TensorFlow
//! Serving's shape). A predict request is turned into a V2 request and runs through the one
//! pipeline like any other, within the same limits as the V2 JSON path.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::error::{Result, ServeError};
use crate::http::json::{check_json_depth, parse_infer_request, JsonData};
use crate::registry::{ModelEntry, ModelVersion, VersionState};
use crate::request::{InferRequest, InferResponse};
use crate::server::state::Limits;
use crate::spec::ModelSpec;
use crate::tensor::Tensor;

/// How a predict request was written, which decides how it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `{"instances": [...]}`: one element per row, answered as `{"predictions": [...]}`.
    Rows,
    /// `{"inputs": ...}`: whole tensors, answered as `{"outputs": ...}`.
    Columns,
}

/// Turns a TensorFlow Serving predict body into a V2 request for `spec`. Each input's shape comes
/// from its nesting (rows: the row count first, then one row's shape); its datatype is the
/// model's. `signature_name` is accepted and ignored: a model has one signature here.
pub fn parse_predict_request(body: &Bytes, spec: &ModelSpec, limits: &Limits) -> Result<(InferRequest, Form)> {
    check_json_depth(body, limits.max_json_depth)?;
    let fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ServeError::bad_request(format!("a predict request must be a JSON object with 'instances' or 'inputs': {e}"))
    })?;
    let mut rows = None;
    let mut columns = None;
    for (key, value) in fields {
        match key.as_str() {
            "instances" => rows = Some(value),
            "inputs" => columns = Some(value),
            "signature_name" if value.is_string() => {}
            "signature_name" => return Err(ServeError::bad_request("'signature_name' must be a string")),
            other => {
                return Err(ServeError::bad_request(format!(
                    "unexpected field '{other}': a predict request has 'instances' or 'inputs' (and optionally \
                     'signature_name')"
                )))
            }
        }
    }
    let (tensors, form) = match (rows, columns) {
        (Some(rows), None) => (row_tensors(spec, rows)?, Form::Rows),
        (None, Some(columns)) => (column_tensors(spec, columns)?, Form::Columns),
        (Some(_), Some(_)) => {
            return Err(ServeError::bad_request("a predict request has either 'instances' or 'inputs', not both"))
        }
        (None, None) => return Err(ServeError::bad_request("a predict request needs 'instances' or 'inputs'")),
    };
    let inputs: Vec<Value> = tensors
        .into_iter()
        .map(|(name, shape, data)| {
            let datatype = spec.inputs.iter().find(|t| t.name == name).map_or("", |t| t.datatype.as_str());
            json!({ "name": name, "datatype": datatype, "shape": shape, "data": data })
        })
        .collect();
    let wire =
        Bytes::from(serde_json::to_vec(&json!({ "inputs": inputs })).map_err(|e| ServeError::Internal(e.to_string()))?);
    let mut request = parse_infer_request(&wire, None, limits)?;
    // Answers are JSON; the binary extension does not apply.
    request.parameters.remove("binary_data_output");
    Ok((request, form))
}

/// One input as (name, shape, flat elements).
type WireTensor = (String, Vec<usize>, Vec<Value>);

/// The input a value belongs to: named by the object's keys, or the model's only input.
fn named_values(spec: &ModelSpec, value: Value, what: &str) -> Result<Vec<(String, Value)>> {
    let names_inputs =
        |m: &Map<String, Value>| !m.is_empty() && m.keys().all(|k| spec.inputs.iter().any(|t| t.name == *k));
    match value {
        Value::Object(map) if names_inputs(&map) => Ok(map.into_iter().collect()),
        Value::Object(map) => {
            let known: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
            let unknown: Vec<&String> = map.keys().filter(|k| !known.contains(&k.as_str())).collect();
            Err(ServeError::bad_request(format!(
                "{what}: unknown input(s) {unknown:?} for model '{}' (its inputs are {known:?})",
                spec.name
            )))
        }
        value => match spec.inputs.as_slice() {
            [only] => Ok(vec![(only.name.clone(), value)]),
            inputs => {
                let known: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
                Err(ServeError::bad_request(format!(
                    "{what}: model '{}' has inputs {known:?}: name them in an object",
                    spec.name
                )))
            }
        },
    }
}

/// `inputs`: each named value is a whole tensor.
fn column_tensors(spec: &ModelSpec, columns: Value) -> Result<Vec<WireTensor>> {
    named_values(spec, columns, "'inputs'")?
        .into_iter()
        .map(|(name, value)| {
            let (shape, data) = flatten(value, &name)?;
            Ok((name, shape, data))
        })
        .collect()
}

/// `instances`: each element is one row (of the only input, or an object of every input's row);
/// the rows of an input are stacked.
fn row_tensors(spec: &ModelSpec, rows: Value) -> Result<Vec<WireTensor>> {
    let Value::Array(rows) = rows else {
        return Err(ServeError::bad_request("'instances' must be a list with one element per row"));
    };
    if rows.is_empty() {
        return Err(ServeError::bad_request("'instances' is empty: send at least one row"));
    }
    let count = rows.len();
    let mut tensors: Vec<WireTensor> = Vec::new();
    for (i, row) in rows.into_iter().enumerate() {
        let values = named_values(spec, row, &format!("instance {i}"))?;
        if i > 0 && values.len() != tensors.len() {
            return Err(ServeError::bad_request(format!("instance {i} does not name the same inputs as instance 0")));
        }
        for (name, value) in values {
            let (shape, data) = flatten(value, &name)?;
            match tensors.iter_mut().find(|t| t.0 == name) {
                Some(t) if t.1[1..] == shape[..] => t.2.extend(data),
                Some(t) => {
                    return Err(ServeError::bad_request(format!(
                        "instance {i}: input '{name}' has shape {shape:?}, instance 0 had {:?}; rows must be alike",
                        &t.1[1..]
                    )))
                }
                None if i == 0 => {
                    let mut full = vec![count];
                    full.extend(shape);
                    tensors.push((name, full, data));
                }
                None => {
                    return Err(ServeError::bad_request(format!(
                        "instance {i} names input '{name}', which instance 0 did not"
                    )))
                }
            }
        }
    }
    Ok(tensors)
}

/// A nested list as (shape, elements in row-major order). Ragged lists, objects and nulls are
/// refused with the input's name.
fn flatten(value: Value, name: &str) -> Result<(Vec<usize>, Vec<Value>)> {
    let mut shape = Vec::new();
    let mut probe = &value;
    while let Value::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    let mut flat = Vec::new();
    collect(value, &shape, 0, &mut flat, name)?;
    Ok((shape, flat))
}

fn collect(value: Value, shape: &[usize], depth: usize, flat: &mut Vec<Value>, name: &str) -> Result<()> {
    let ragged =
        || ServeError::bad_request(format!("input '{name}': lists must be rectangular (ragged at depth {depth})"));
    match value {
        Value::Array(items) => {
            if shape.get(depth) != Some(&items.len()) {
                return Err(ragged());
            }
            for item in items {
                collect(item, shape, depth + 1, flat, name)?;
            }
            Ok(())
        }
        Value::Object(_) | Value::Null => Err(ServeError::bad_request(format!(
            "input '{name}': elements must be numbers, strings or booleans (binary {{\"b64\": ...}} values are not \
             supported)"
        ))),
        scalar if depth == shape.len() => {
            flat.push(scalar);
            Ok(())
        }
        _ => Err(ragged()),
    }
}

/// The elements of `flat` nested as `shape` says (a scalar for an empty shape).
fn nest(flat: &[Value], shape: &[usize]) -> Value {
    match shape.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((&n, rest)) => {
            let size: usize = rest.iter().product();
            Value::Array((0..n).map(|i| nest(flat.get(i * size..(i + 1) * size).unwrap_or(&[]), rest)).collect())
        }
    }
}

fn elements(t: &Tensor) -> Vec<Value> {
    match serde_json::to_value(JsonData(t)) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

/// The answer in TensorFlow Serving's shape: rows as `predictions` (a list of values for one
/// output, of objects for several), columns as `outputs` (a value, or an object by name).
pub fn predict_response(response: &InferResponse, form: Form) -> Result<Value> {
    let outputs: Vec<(&Tensor, Vec<Value>)> =
        response.outputs.iter().map(|o| (&o.tensor, elements(&o.tensor))).collect();
    match form {
        Form::Columns => {
            let mut named: Map<String, Value> =
                outputs.iter().map(|(t, flat)| (t.name.clone(), nest(flat, &t.shape))).collect();
            let value = match outputs.as_slice() {
                [(only, _)] => named.remove(&only.name).unwrap_or(Value::Null),
                _ => Value::Object(named),
            };
            Ok(json!({ "outputs": value }))
        }
        Form::Rows => {
            let rows = outputs.first().and_then(|(t, _)| t.shape.first().copied()).unwrap_or(0);
            if let Some((t, _)) = outputs.iter().find(|(t, _)| t.shape.first() != Some(&rows)) {
                return Err(ServeError::Internal(format!(
                    "output '{}' of shape {:?} cannot be split into {rows} rows; send the columnar 'inputs' form",
                    t.name, t.shape
                )));
            }
            let row = |t: &Tensor, flat: &[Value], i: usize| {
                let size: usize = t.shape[1..].iter().product();
                nest(flat.get(i * size..(i + 1) * size).unwrap_or(&[]), &t.shape[1..])
            };
            let predictions: Vec<Value> = (0..rows)
                .map(|i| match outputs.as_slice() {
                    [(t, flat)] => row(t, flat, i),
                    _ => Value::Object(outputs.iter().map(|(t, flat)| (t.name.clone(), row(t, flat, i))).collect()),
                })
                .collect();
            Ok(json!({ "predictions": predictions }))
        }
    }
}

/// `GET /v1/models/{m}[/versions/{v}]`: each version's state in TensorFlow Serving's words
/// (AVAILABLE when it serves, END with the reason when its load failed or its instances stopped).
pub fn model_status(entry: &ModelEntry, version: Option<&ModelVersion>) -> Value {
    let one = |v: &ModelVersion| {
        let (state, code, message) = match &v.state {
            VersionState::Ready(s) => match s.unavailable() {
                None => ("AVAILABLE", "OK", String::new()),
                Some(why) => ("END", "UNAVAILABLE", why),
            },
            VersionState::Failed(why) => ("END", "UNKNOWN", why.clone()),
        };
        json!({
            "version": v.version.to_string(),
            "state": state,
            "status": { "error_code": code, "error_message": message },
        })
    };
    let statuses: Vec<Value> = match version {
        Some(v) => vec![one(v)],
        None => entry.versions.values().rev().map(|v| one(v)).collect(),
    };
    json!({ "model_version_status": statuses })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Delivery, ResponseOutput};
    use crate::spec::TensorSpec;
    use crate::tensor::datatype::DataType;
    use crate::tensor::TensorData;

    fn spec(inputs: &[&str]) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: 1,
            platform: "test".into(),
            max_batch_size: 8,
            decoupled: false,
            inputs: inputs.iter().map(|n| TensorSpec::new(*n, DataType::Fp32, vec![2])).collect(),
            outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![2])],
        }
    }

    fn parse(body: &str, inputs: &[&str]) -> Result<(InferRequest, Form)> {
        parse_predict_request(&Bytes::from(body.to_string()), &spec(inputs), &Limits::default())
    }

    #[test]
    fn rows_and_columns_become_the_same_tensor() {
        let (rows, form) =
            parse(r#"{"instances": [[1, 2], [3, 4]], "signature_name": "serving_default"}"#, &["X"]).unwrap();
        assert_eq!(form, Form::Rows);
        let (columns, form) = parse(r#"{"inputs": {"X": [[1, 2], [3, 4]]}}"#, &["X"]).unwrap();
        assert_eq!(form, Form::Columns);
        for r in [&rows, &columns] {
            assert_eq!((r.inputs[0].name.as_str(), r.inputs[0].shape.clone()), ("X", vec![2, 2]));
            assert_eq!(r.inputs[0].datatype, DataType::Fp32);
        }
        let (named, _) = parse(r#"{"instances": [{"A": [1, 2], "B": [3, 4]}]}"#, &["A", "B"]).unwrap();
        assert!(named.inputs.iter().all(|t| t.shape == vec![1, 2]), "{:?}", named.inputs);
    }

    #[test]
    fn bad_bodies_are_named() {
        for (body, says) in [
            (r#"{"instances": [[1, 2], [3]]}"#, "rows must be alike"),
            (r#"{"inputs": [[1, 2], [3]]}"#, "rectangular"),
            (r#"{"instances": []}"#, "empty"),
            (r#"{"instances": {"X": [1, 2]}}"#, "must be a list"),
            (r#"{"inputs": {"NOPE": [1, 2]}}"#, "unknown input"),
            (r#"{"inputs": [1, 2], "instances": [[1, 2]]}"#, "not both"),
            (r#"{"foo": 1}"#, "unexpected field 'foo'"),
            (r#"{}"#, "needs 'instances' or 'inputs'"),
            (r#"[1]"#, "JSON object"),
            (r#"{"inputs": [[null, 1]]}"#, "numbers, strings or booleans"),
            (r#"{"inputs": [["a", "b"]]}"#, "X"),
        ] {
            let e = parse(body, &["X"]).unwrap_err();
            assert!(matches!(e, ServeError::BadRequest(_)), "{body}: {e:?}");
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
        let e = parse(r#"{"instances": [[1, 2]]}"#, &["A", "B"]).unwrap_err();
        assert!(e.to_string().contains("name them"), "{e}");
    }

    #[test]
    fn answers_take_tensorflow_servings_shape() {
        let y = Tensor::new(
            "Y",
            DataType::Fp32,
            vec![2, 2],
            TensorData::Raw(Bytes::from(
                [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
            )),
        )
        .unwrap();
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![ResponseOutput { tensor: y, delivery: Delivery::Json }],
        };
        assert_eq!(predict_response(&response, Form::Rows).unwrap(), json!({"predictions": [[1.0, 2.0], [3.0, 4.0]]}));
        assert_eq!(predict_response(&response, Form::Columns).unwrap(), json!({"outputs": [[1.0, 2.0], [3.0, 4.0]]}));
    }
}
