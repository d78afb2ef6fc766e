//! Triton's `reshape`: clients see a tensor's declared `dims`, the model takes and gives its
//! `reshape`. An instance of a model with reshaped tensors is wrapped, so every path (batches,
//! per-request batches, streams, sequences) hands the model its shapes and clients theirs. Only
//! the shape changes, never the data.

use std::sync::Arc;

use super::instance::{Instance, ModelRequest, PerRequest, PhaseClock};
use crate::error::{Result, ServeError};
use crate::spec::{ModelSpec, TensorSpec};
use crate::tensor::Tensor;

pub(super) struct Reshaped {
    inner: Box<dyn Instance>,
    /// What clients see.
    client: Arc<ModelSpec>,
    /// What the model sees: each reshaped tensor's `reshape` as its dims.
    model: ModelSpec,
}

impl Reshaped {
    /// `inner` wrapped when some tensor of `spec` is reshaped, else `inner` itself.
    pub(super) fn wrap(inner: Box<dyn Instance>, spec: &Arc<ModelSpec>) -> Box<dyn Instance> {
        let reshaped = spec.inputs.iter().chain(&spec.outputs).any(|t| t.reshape.is_some());
        if !reshaped {
            return inner;
        }
        let as_model = |t: &TensorSpec| TensorSpec {
            dims: t.reshape.clone().unwrap_or_else(|| t.dims.clone()),
            reshape: None,
            ..t.clone()
        };
        let model = ModelSpec {
            inputs: spec.inputs.iter().map(as_model).collect(),
            outputs: spec.outputs.iter().map(as_model).collect(),
            ..ModelSpec::clone(spec)
        };
        Box::new(Self { inner, client: spec.clone(), model })
    }

    fn to_model(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        inputs
            .into_iter()
            .map(|t| reshape(t, &self.client.inputs, &self.model.inputs, self.client.batching()))
            .collect()
    }

    fn to_client(&self, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        outputs
            .into_iter()
            .map(|t| reshape(t, &self.model.outputs, &self.client.outputs, self.client.batching()))
            .collect()
    }

    fn request_to_model(&self, mut request: ModelRequest) -> Result<ModelRequest> {
        request.inputs = self.to_model(std::mem::take(&mut request.inputs))?;
        Ok(request)
    }
}

/// `t` in the shape `to` declares for it (when `from` and `to` differ for its name): the batch
/// dimension kept, a variable dimension resolved from the element count.
fn reshape(mut t: Tensor, from: &[TensorSpec], to: &[TensorSpec], batching: bool) -> Result<Tensor> {
    let (Some(a), Some(b)) = (from.iter().find(|s| s.name == t.name), to.iter().find(|s| s.name == t.name)) else {
        return Ok(t);
    };
    if a.dims == b.dims {
        return Ok(t);
    }
    let rows = if batching { t.shape.first().copied().unwrap_or(0) } else { 1 };
    let per_row = t.element_count().checked_div(rows).unwrap_or(0);
    let known: usize = b.dims.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    let variable = per_row.checked_div(known).unwrap_or(0);
    let mut shape: Vec<usize> = if batching { vec![rows] } else { Vec::new() };
    shape.extend(b.dims.iter().map(|&d| if d < 0 { variable } else { d as usize }));
    let fits = crate::tensor::element_count(&shape) == Some(t.element_count());
    if !fits {
        return Err(ServeError::bad_request(format!(
            "tensor '{}' of shape {:?} cannot be reshaped to {:?}",
            t.name, t.shape, b.dims
        )));
    }
    t.shape = shape;
    Ok(t)
}

impl Instance for Reshaped {
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
        let outputs = self.inner.execute(self.to_model(inputs)?, clock)?;
        self.to_client(outputs)
    }

    fn per_request(&self) -> bool {
        self.inner.per_request()
    }

    fn execute_requests(
        &mut self,
        _: &ModelSpec,
        requests: Vec<ModelRequest>,
        clock: &mut PhaseClock,
    ) -> Result<PerRequest> {
        let requests = requests.into_iter().map(|r| self.request_to_model(r)).collect::<Result<Vec<_>>>()?;
        // The inner instance checks what the model returned against the model's own shapes.
        let answers = self.inner.execute_requests(&self.model, requests, clock)?;
        Ok(answers.into_iter().map(|a| a.and_then(|outputs| self.to_client(outputs))).collect())
    }

    fn execute_stream(
        &mut self,
        inputs: Vec<Tensor>,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<()>,
    ) -> Result<()> {
        let inputs = self.to_model(inputs)?;
        let (client, model) = (self.client.clone(), self.model.outputs.clone());
        let mut emit_client = |outputs: Vec<Tensor>| {
            let outputs = outputs.into_iter().map(|t| reshape(t, &model, &client.outputs, client.batching()));
            emit(outputs.collect::<Result<Vec<_>>>()?)
        };
        self.inner.execute_stream(inputs, clock, &mut emit_client)
    }

    fn execute_stream_request(
        &mut self,
        request: ModelRequest,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<()>,
    ) -> Result<()> {
        let request = self.request_to_model(request)?;
        let (client, model) = (self.client.clone(), self.model.outputs.clone());
        let mut emit_client = |outputs: Vec<Tensor>| {
            let outputs = outputs.into_iter().map(|t| reshape(t, &model, &client.outputs, client.batching()));
            emit(outputs.collect::<Result<Vec<_>>>()?)
        };
        self.inner.execute_stream_request(request, clock, &mut emit_client)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::tensor::datatype::DataType;
    use crate::tensor::TensorData;

    fn spec(max_batch_size: usize) -> Arc<ModelSpec> {
        let mut x = TensorSpec::new("X", DataType::Fp32, vec![1]);
        x.reshape = Some(vec![]);
        let mut y = TensorSpec::new("Y", DataType::Fp32, vec![2, -1]);
        y.reshape = Some(vec![-1]);
        Arc::new(ModelSpec {
            name: "m".into(),
            version: 1,
            platform: "python".into(),
            max_batch_size,
            decoupled: false,
            inputs: vec![x],
            outputs: vec![y],
        })
    }

    fn fp32(name: &str, shape: Vec<usize>) -> Tensor {
        let n = crate::tensor::element_count(&shape).unwrap();
        Tensor::new(name, DataType::Fp32, shape, TensorData::Raw(Bytes::from(vec![0u8; 4 * n]))).unwrap()
    }

    /// Records the shapes it is given and answers a flat Y of 2 x 3 values per row.
    struct Flat(Vec<Vec<usize>>);

    impl Instance for Flat {
        fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
            self.0.push(inputs[0].shape.clone());
            Ok(vec![fp32("Y", vec![inputs[0].shape[0], 6])])
        }
    }

    #[test]
    fn the_model_gets_its_shapes_and_clients_theirs() {
        let mut wrapped = Reshaped::wrap(Box::new(Flat(Vec::new())), &spec(8));
        let outputs = wrapped.execute(vec![fp32("X", vec![3, 1])], &mut PhaseClock::new()).unwrap();
        assert_eq!(outputs[0].shape, vec![3, 2, 3], "Y back in its declared dims, -1 resolved");
    }

    #[test]
    fn a_shape_that_cannot_be_reshaped_is_refused() {
        let e =
            reshape(fp32("Y", vec![1, 5]), &[TensorSpec::new("Y", DataType::Fp32, vec![-1])], &spec(8).outputs, true)
                .unwrap_err();
        assert!(e.to_string().contains("cannot be reshaped to [2, -1]"), "{e}");
    }

    #[test]
    fn reshapes_are_checked_once() {
        let mut t = TensorSpec::new("X", DataType::Fp32, vec![2, 3]);
        t.reshape = Some(vec![5]);
        assert!(t.check_reshape().unwrap_err().contains("different number of elements"));
        t.reshape = Some(vec![-1, -1]);
        assert!(t.check_reshape().unwrap_err().contains("one variable"));
        t.reshape = Some(vec![6]);
        assert!(t.check_reshape().is_ok());
    }
}
