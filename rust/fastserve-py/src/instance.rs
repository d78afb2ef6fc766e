//! A Python object with `execute(inputs) -> outputs` as a model instance of the Rust scheduler.

use std::sync::Arc;

use fastserve_core::scheduler::{Instance, PhaseClock};
use fastserve_core::{ServeError, Tensor};
use pyo3::prelude::*;

use crate::convert::NumpyCache;

pub struct PyInstance {
    model: Py<PyAny>,
    label: String,
    numpy: NumpyCache,
    /// Directory prefixes never shown to clients (error messages carry no server paths).
    private_paths: Arc<Vec<String>>,
}

impl PyInstance {
    pub fn new(py: Python<'_>, model: Py<PyAny>, label: String, private_paths: Arc<Vec<String>>) -> PyResult<Self> {
        if !model.bind(py).hasattr("execute")? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{label}: the model object has no execute() method"
            )));
        }
        Ok(Self { model, label, numpy: NumpyCache::new(py)?, private_paths })
    }

    fn public(&self, message: String) -> String {
        self.private_paths.iter().fold(message, |m, path| m.replace(path.as_str(), "<repository>"))
    }
}

impl Instance for PyInstance {
    /// One GIL acquisition per batch: build the input dict, call `execute`, read the outputs.
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>, ServeError> {
        Python::attach(|py| {
            let args = self
                .numpy
                .inputs_to_dict(py, inputs)
                .map_err(|e| ServeError::Internal(format!("cannot build model inputs: {e}")))?;
            clock.infer_started();
            let result = self.model.bind(py).call_method1("execute", (args,));
            clock.infer_finished();
            let result = result.map_err(|e| {
                tracing::warn!(model = %self.label, error = %e, "execute() raised");
                ServeError::ModelError(self.public(format!("{} raised {}", self.label, e)))
            })?;
            self.numpy.outputs_from_dict(&result)
        })
    }
}

impl Drop for PyInstance {
    fn drop(&mut self) {
        Python::attach(|py| {
            let model = self.model.bind(py);
            if model.hasattr("finalize").unwrap_or(false) {
                if let Err(e) = model.call_method0("finalize") {
                    tracing::warn!(model = %self.label, error = %e, "finalize() raised");
                }
            }
        });
    }
}
