//! What a model version accepts and returns, and the checks that turn a decoded request
//! into a job the scheduler can batch.

use crate::error::{Result, ServeError};
use crate::request::InferRequest;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

/// One input or output as declared by config or read from the model; `dims` exclude the batch dim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// -1 marks a variable dimension.
    pub dims: Vec<i64>,
    /// Triton's `reshape`: the shape the model itself takes or gives (without the batch
    /// dimension; at most one -1), while clients see `dims`.
    pub reshape: Option<Vec<i64>>,
    /// Triton's `optional`: an input requests may leave out.
    pub optional: bool,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, datatype: DataType, dims: Vec<i64>) -> Self {
        Self { name: name.into(), datatype, dims, reshape: None, optional: false }
    }

    /// Refuses a reshape that no tensor could satisfy: more than one variable dimension, or a
    /// fixed element count other than the declared dims'.
    pub fn check_reshape(&self) -> std::result::Result<(), String> {
        let Some(reshape) = &self.reshape else { return Ok(()) };
        let variable = |dims: &[i64]| dims.iter().filter(|&&d| d < 0).count();
        if variable(reshape) > 1 || reshape.iter().any(|&d| d < -1) {
            return Err(format!("'{}': reshape {reshape:?} may have one variable (-1) dimension at most", self.name));
        }
        let fixed = |dims: &[i64]| dims.iter().filter(|&&d| d >= 0).try_fold(1i64, |a, &d| a.checked_mul(d));
        if variable(&self.dims) == 0 && variable(reshape) == 0 && fixed(&self.dims) != fixed(reshape) {
            return Err(format!(
                "'{}': reshape {reshape:?} holds a different number of elements than dims {:?}",
                self.name, self.dims
            ));
        }
        Ok(())
    }
}

/// The served interface of one model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    /// Triton-style platform string, e.g. `onnxruntime_onnx` or `python`.
    pub platform: String,
    /// 0 disables batching: tensors carry no batch dimension.
    pub max_batch_size: usize,
    /// Triton's decoupled transaction policy: each request runs alone and may get any number of
    /// responses, each holding any of the declared outputs.
    pub decoupled: bool,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A request that passed validation: inputs in the model's declared order.
#[derive(Debug)]
pub struct ValidatedRequest {
    pub inputs: Vec<Tensor>,
    /// Rows along the batch dimension (1 when the model does not batch).
    pub rows: usize,
}

/// Triton's hint after a shape error on a batching model.
const BATCH_NOTE: &str =
    "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be \
                          prepended to each input shape. If you want to specify the full shape including the batch \
                          dim in your input dims config, try setting max_batch_size to zero. See the model \
                          configuration docs for more info on max_batch_size.";

fn shape_str(shape: impl IntoIterator<Item = i64>) -> String {
    let parts: Vec<String> = shape.into_iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

impl ModelSpec {
    pub fn batching(&self) -> bool {
        self.max_batch_size > 0
    }

    /// The shape clients see: the batch dimension (as -1) first when batching.
    pub fn full_dims(&self, t: &TensorSpec) -> Vec<i64> {
        let mut dims = Vec::with_capacity(t.dims.len() + 1);
        if self.batching() {
            dims.push(-1);
        }
        dims.extend_from_slice(&t.dims);
        dims
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Checks names, datatypes, shapes and batch size; returns the inputs in declared order.
    /// Errors use Triton's wording (clients and scripts match on it), with its request id prefix.
    pub fn validate(&self, request: &mut InferRequest) -> Result<ValidatedRequest> {
        let tag =
            format!("[request id: {}] ", request.id.as_deref().filter(|id| !id.is_empty()).unwrap_or("<id_unknown>"));
        for (i, t) in request.inputs.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                return Err(ServeError::bad_request(format!(
                    "unexpected inference input '{}' for model '{}'",
                    t.name, self.name
                )));
            }
            if request.inputs[..i].iter().any(|o| o.name == t.name) {
                return Err(ServeError::bad_request(format!("input '{}' given more than once", t.name)));
            }
        }
        for o in &request.outputs {
            if self.output(&o.name).is_none() {
                return Err(ServeError::bad_request(format!(
                    "unexpected inference output '{}' for model '{}'",
                    o.name, self.name
                )));
            }
        }
        let missing: Vec<String> = self
            .inputs
            .iter()
            .filter(|s| !s.optional && !request.inputs.iter().any(|t| t.name == s.name))
            .map(|s| format!("'{}'", s.name))
            .collect();
        if !missing.is_empty() {
            let got: Vec<String> = request.inputs.iter().map(|t| format!("'{}'", t.name)).collect();
            let required = self.inputs.iter().filter(|s| !s.optional).count();
            let expected = if required == self.inputs.len() {
                format!("expected {required} inputs")
            } else {
                format!("expected number of inputs between {required} and {}", self.inputs.len())
            };
            return Err(ServeError::bad_request(format!(
                "{tag}{expected} but got {} inputs for model '{}'. Got input(s) [{}], but missing required \
                 input(s) [{}]. Please provide all required input(s).",
                request.inputs.len(),
                self.name,
                got.join(","),
                missing.join(",")
            )));
        }
        let mut given = std::mem::take(&mut request.inputs);
        let mut inputs = Vec::with_capacity(self.inputs.len());
        let mut rows: Option<usize> = None;
        for spec in &self.inputs {
            // Absent: an optional input the request left out.
            let Some(pos) = given.iter().position(|t| t.name == spec.name) else { continue };
            let t = given.swap_remove(pos);
            self.check_input(spec, &t, &tag)?;
            if self.batching() {
                let r = t.shape[0];
                match rows {
                    Some(prev) if prev != r => {
                        return Err(ServeError::bad_request(format!(
                            "input '{}': batch size {} differs from the other inputs' {}",
                            t.name, r, prev
                        )))
                    }
                    _ => rows = Some(r),
                }
            }
            inputs.push(t);
        }
        let rows = rows.unwrap_or(1);
        if self.batching() {
            if rows == 0 {
                return Err(ServeError::bad_request("batch size must be at least 1"));
            }
            if rows > self.max_batch_size {
                return Err(ServeError::bad_request(format!(
                    "{tag}inference request batch-size must be <= {} for '{}'",
                    self.max_batch_size, self.name
                )));
            }
        }
        Ok(ValidatedRequest { inputs, rows })
    }

    fn check_input(&self, spec: &TensorSpec, t: &Tensor, tag: &str) -> Result<()> {
        if t.datatype != spec.datatype {
            return Err(ServeError::bad_request(format!(
                "{tag}inference input '{}' data-type is '{}', but model '{}' expects '{}'",
                spec.name, t.datatype, self.name, spec.datatype
            )));
        }
        let expected = self.full_dims(spec);
        let matches =
            expected.len() == t.shape.len() && expected.iter().zip(&t.shape).all(|(&e, &g)| e < 0 || e as usize == g);
        if !matches {
            let note = if self.batching() { BATCH_NOTE } else { "" };
            return Err(ServeError::bad_request(format!(
                "{tag}unexpected shape for input '{}' for model '{}'. Expected {}, got {}. {note}",
                spec.name,
                self.name,
                shape_str(expected),
                shape_str(t.shape.iter().map(|&d| d as i64))
            )));
        }
        Ok(())
    }

    /// Checks what a model returned for a batch of `rows` rows against the declared outputs
    /// (names, datatypes, dims); a mismatch is the model's fault and fails the batch, so clients
    /// never receive tensors the model's metadata does not describe.
    pub fn check_outputs(&self, outputs: &[Tensor], rows: usize) -> Result<()> {
        self.check_tensors(outputs, rows, true)
    }

    /// Checks one response of a decoupled model: as [`ModelSpec::check_outputs`], but a response
    /// may carry any subset of the declared outputs (as Triton's decoupled responses do).
    pub fn check_response(&self, outputs: &[Tensor], rows: usize) -> Result<()> {
        self.check_tensors(outputs, rows, false)
    }

    fn check_tensors(&self, outputs: &[Tensor], rows: usize, all: bool) -> Result<()> {
        if let Some(extra) = outputs.iter().find(|t| self.output(&t.name).is_none()) {
            let declared: Vec<&str> = self.outputs.iter().map(|s| s.name.as_str()).collect();
            return Err(ServeError::ModelError(format!(
                "model '{}' returned output '{}', which its configuration does not declare (outputs are {:?})",
                self.name, extra.name, declared
            )));
        }
        for spec in &self.outputs {
            let Some(t) = outputs.iter().find(|t| t.name == spec.name) else {
                if !all {
                    continue;
                }
                return Err(ServeError::ModelError(format!(
                    "model '{}' did not return output '{}'",
                    self.name, spec.name
                )));
            };
            if t.datatype != spec.datatype {
                return Err(ServeError::ModelError(format!(
                    "model '{}' returned output '{}' as {}, but it is declared {}",
                    self.name, spec.name, t.datatype, spec.datatype
                )));
            }
            let got = || shape_str(t.shape.iter().map(|&d| d as i64));
            if self.batching() && t.shape.first() != Some(&rows) {
                return Err(ServeError::ModelError(format!(
                    "model '{}' returned output '{}' with shape {}, but the batch has {} rows",
                    self.name,
                    spec.name,
                    got(),
                    rows
                )));
            }
            let declared = self.full_dims(spec);
            let fits = declared.len() == t.shape.len()
                && declared
                    .iter()
                    .zip(&t.shape)
                    .skip(usize::from(self.batching()))
                    .all(|(&d, &g)| d < 0 || d as usize == g);
            if !fits {
                return Err(ServeError::ModelError(format!(
                    "model '{}' returned output '{}' with shape {}, but it is declared {}",
                    self.name,
                    spec.name,
                    got(),
                    shape_str(declared)
                )));
            }
            if let (TensorData::Raw(_), None) | (TensorData::Strings(_), Some(_)) = (&t.data, t.datatype.size()) {
                return Err(ServeError::Internal(format!("output '{}' has the wrong representation", t.name)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestedOutput;

    fn spec(max_batch_size: usize) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: 1,
            platform: "python".into(),
            max_batch_size,
            decoupled: false,
            inputs: vec![
                TensorSpec::new("A", DataType::Fp32, vec![-1, 4]),
                TensorSpec::new("B", DataType::Int32, vec![1]),
            ],
            outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![-1])],
        }
    }

    fn tensor(name: &str, dt: DataType, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(name, dt, shape, TensorData::Raw(vec![0u8; n * dt.size().unwrap()].into())).unwrap()
    }

    fn request(inputs: Vec<Tensor>) -> InferRequest {
        InferRequest { inputs, ..Default::default() }
    }

    #[test]
    fn orders_inputs_and_counts_rows() {
        let mut r = request(vec![tensor("B", DataType::Int32, vec![3, 1]), tensor("A", DataType::Fp32, vec![3, 2, 4])]);
        let v = spec(8).validate(&mut r).unwrap();
        assert_eq!(v.rows, 3);
        assert_eq!(v.inputs[0].name, "A");
    }

    #[test]
    fn reports_problems_in_user_terms() {
        let s = spec(8);
        let cases = [
            (
                vec![tensor("A", DataType::Fp32, vec![1, 2, 3]), tensor("B", DataType::Int32, vec![1, 1])],
                "unexpected shape for input 'A' for model 'm'. Expected [-1,-1,4], got [1,2,3]",
            ),
            (
                vec![tensor("A", DataType::Fp64, vec![1, 2, 4]), tensor("B", DataType::Int32, vec![1, 1])],
                "inference input 'A' data-type is 'FP64', but model 'm' expects 'FP32'",
            ),
            (
                vec![tensor("A", DataType::Fp32, vec![1, 2, 4])],
                "Got input(s) ['A'], but missing required input(s) ['B']",
            ),
            (vec![tensor("C", DataType::Fp32, vec![1])], "unexpected inference input 'C'"),
            (
                vec![tensor("A", DataType::Fp32, vec![9, 2, 4]), tensor("B", DataType::Int32, vec![9, 1])],
                "[request id: <id_unknown>] inference request batch-size must be <= 8 for 'm'",
            ),
            (
                vec![tensor("A", DataType::Fp32, vec![2, 2, 4]), tensor("B", DataType::Int32, vec![3, 1])],
                "batch size 3 differs",
            ),
        ];
        for (inputs, msg) in cases {
            let err = s.validate(&mut request(inputs)).unwrap_err();
            assert!(matches!(err, ServeError::BadRequest(_)));
            assert!(err.to_string().contains(msg), "{err} should contain {msg}");
        }
    }

    #[test]
    fn unknown_requested_output_is_rejected() {
        let mut r = request(vec![tensor("A", DataType::Fp32, vec![1, 1, 4]), tensor("B", DataType::Int32, vec![1, 1])]);
        r.outputs.push(RequestedOutput { name: "Z".into(), ..Default::default() });
        assert!(spec(8)
            .validate(&mut r)
            .unwrap_err()
            .to_string()
            .contains("unexpected inference output 'Z' for model 'm'"));
    }

    #[test]
    fn without_batching_there_is_no_batch_dim() {
        let mut r = request(vec![tensor("A", DataType::Fp32, vec![2, 4]), tensor("B", DataType::Int32, vec![1])]);
        assert_eq!(spec(0).validate(&mut r).unwrap().rows, 1);
    }

    #[test]
    fn model_output_mistakes_are_model_errors() {
        let s = spec(8);
        let err = s.check_outputs(&[], 1).unwrap_err();
        assert!(matches!(err, ServeError::ModelError(_)));
        let err = s.check_outputs(&[tensor("Y", DataType::Fp32, vec![2, 3])], 3).unwrap_err();
        assert!(err.to_string().contains("batch has 3 rows"));
        s.check_outputs(&[tensor("Y", DataType::Fp32, vec![3, 3])], 3).unwrap();
        let cases = [
            (vec![tensor("Y", DataType::Fp32, vec![3, 3, 1])], "with shape [3,3,1], but it is declared [-1,-1]"),
            (vec![tensor("Y", DataType::Fp32, vec![])], "with shape [], but the batch has 3 rows"),
            (
                vec![tensor("Y", DataType::Fp32, vec![3, 3]), tensor("Z", DataType::Fp32, vec![3])],
                "returned output 'Z', which its configuration does not declare",
            ),
        ];
        for (outputs, msg) in cases {
            let err = s.check_outputs(&outputs, 3).unwrap_err();
            assert!(matches!(err, ServeError::ModelError(_)) && err.to_string().contains(msg), "{err}");
        }
        let fixed = ModelSpec { outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![4])], ..spec(0) };
        let err = fixed.check_outputs(&[tensor("Y", DataType::Fp32, vec![7])], 1).unwrap_err();
        assert!(err.to_string().contains("with shape [7], but it is declared [4]"), "{err}");
        let err = fixed.check_outputs(&[tensor("Y", DataType::Fp32, vec![])], 1).unwrap_err();
        assert!(err.to_string().contains("with shape [], but it is declared [4]"), "{err}");
    }
}
