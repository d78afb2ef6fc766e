//! A Python object with `execute(inputs) -> outputs` as a model instance of the Rust scheduler.
//! For a decoupled model `execute` is a generator (or an async generator): each `yield` is one
//! response, taken with the GIL and handed over without it.

use std::sync::Arc;

use fastserve_core::scheduler::{Instance, PhaseClock};
use fastserve_core::{ServeError, Tensor};
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::NumpyCache;

pub struct PyInstance {
    model: Py<PyAny>,
    label: String,
    numpy: NumpyCache,
    /// Directory prefixes never shown to clients (error messages carry no server paths).
    private_paths: Arc<Vec<String>>,
    /// The event loop async generators run on, made at the first one.
    event_loop: Option<Py<PyAny>>,
}

/// What a decoupled model's `execute` returned.
enum Produced {
    Generator(Py<PyAny>),
    AsyncGenerator(Py<PyAny>),
    /// A plain dict: the request's only response.
    One(Vec<Tensor>),
}

impl PyInstance {
    pub fn new(py: Python<'_>, model: Py<PyAny>, label: String, private_paths: Arc<Vec<String>>) -> PyResult<Self> {
        if !model.bind(py).hasattr("execute")? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{label}: the model object has no execute() method"
            )));
        }
        Ok(Self { model, label, numpy: NumpyCache::new(py)?, private_paths, event_loop: None })
    }

    fn public(&self, message: String) -> String {
        self.private_paths.iter().fold(message, |m, path| m.replace(path.as_str(), "<repository>"))
    }

    fn raised(&self, e: &PyErr) -> ServeError {
        tracing::warn!(model = %self.label, error = %e, "execute() raised");
        ServeError::ModelError(self.public(format!("{} raised {}", self.label, e)))
    }

    fn event_loop<'py>(&mut self, py: Python<'py>) -> Result<Bound<'py, PyAny>, ServeError> {
        if self.event_loop.is_none() {
            let new = py
                .import("asyncio")
                .and_then(|m| m.call_method0("new_event_loop"))
                .map_err(|e| ServeError::Internal(format!("{}: cannot create an event loop: {e}", self.label)))?;
            self.event_loop = Some(new.unbind());
        }
        self.event_loop.as_ref().map(|l| l.bind(py).clone()).ok_or_else(|| ServeError::Internal("no event loop".into()))
    }

    /// Calls `execute` and tells what it returned.
    fn begin(&mut self, py: Python<'_>, inputs: Vec<Tensor>) -> Result<Produced, ServeError> {
        let args = self
            .numpy
            .inputs_to_dict(py, inputs)
            .map_err(|e| ServeError::Internal(format!("cannot build model inputs: {e}")))?;
        let result = self.model.bind(py).call_method1("execute", (args,)).map_err(|e| self.raised(&e))?;
        if result.is_instance_of::<PyDict>() {
            return Ok(Produced::One(self.numpy.outputs_from_dict(&result)?));
        }
        if result.hasattr("__anext__").unwrap_or(false) {
            return Ok(Produced::AsyncGenerator(result.unbind()));
        }
        if result.hasattr("__next__").unwrap_or(false) {
            return Ok(Produced::Generator(result.unbind()));
        }
        if result.hasattr("__await__").unwrap_or(false) {
            let event_loop = self.event_loop(py)?;
            let dict = event_loop.call_method1("run_until_complete", (result,)).map_err(|e| self.raised(&e))?;
            return Ok(Produced::One(self.numpy.outputs_from_dict(&dict)?));
        }
        Err(ServeError::ModelError(format!(
            "{}: execute() of a decoupled model must yield each response (a generator or an async \
             generator) or return one dict, not {}",
            self.label,
            result.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )))
    }

    /// The generator's next response; None once it returned.
    fn next_response(&mut self, py: Python<'_>, produced: &Produced) -> Result<Option<Vec<Tensor>>, ServeError> {
        let item = match produced {
            Produced::Generator(g) => match g.bind(py).call_method0("__next__") {
                Err(e) if e.is_instance_of::<PyStopIteration>(py) => return Ok(None),
                other => other,
            },
            Produced::AsyncGenerator(g) => {
                let step = g.bind(py).call_method0("__anext__").map_err(|e| self.raised(&e))?;
                match self.event_loop(py)?.call_method1("run_until_complete", (step,)) {
                    Err(e) if e.is_instance_of::<PyStopAsyncIteration>(py) => return Ok(None),
                    other => other,
                }
            }
            Produced::One(_) => return Ok(None),
        };
        let item = item.map_err(|e| self.raised(&e))?;
        self.numpy.outputs_from_dict(&item).map(Some)
    }

    /// Stops a generator early: `GeneratorExit` at its current `yield`, so its `finally` runs.
    fn close(&mut self, py: Python<'_>, produced: &Produced) {
        let closed = match produced {
            Produced::Generator(g) => g.bind(py).call_method0("close").map(drop),
            Produced::AsyncGenerator(g) => match (g.bind(py).call_method0("aclose"), self.event_loop(py)) {
                (Ok(step), Ok(event_loop)) => event_loop.call_method1("run_until_complete", (step,)).map(drop),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(PyErr::new::<pyo3::exceptions::PyRuntimeError, _>(e.to_string())),
            },
            Produced::One(_) => Ok(()),
        };
        if let Err(e) = closed {
            tracing::warn!(model = %self.label, error = %e, "closing the generator raised");
        }
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
            let mut result = result.map_err(|e| self.raised(&e))?;
            // `async def execute`: run it to completion on the instance's own event loop.
            if result.hasattr("__await__").unwrap_or(false) {
                let event_loop = self.event_loop(py)?;
                result = event_loop.call_method1("run_until_complete", (result,)).map_err(|e| self.raised(&e))?;
            }
            self.numpy.outputs_from_dict(&result)
        })
    }

    /// The GIL is held to start the generator and to take each response, never while `emit`
    /// waits for a slow reader.
    fn execute_stream(
        &mut self,
        inputs: Vec<Tensor>,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        clock.infer_started();
        let produced = Python::attach(|py| self.begin(py, inputs))?;
        if let Produced::One(outputs) = produced {
            clock.infer_finished();
            return emit(outputs);
        }
        let result = loop {
            match Python::attach(|py| self.next_response(py, &produced)) {
                Ok(Some(outputs)) => {
                    if let Err(e) = emit(outputs) {
                        Python::attach(|py| self.close(py, &produced));
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                // A bad response (not a dict, wrong tensors): the generator is still suspended.
                Err(e) => {
                    Python::attach(|py| self.close(py, &produced));
                    break Err(e);
                }
            }
        };
        clock.infer_finished();
        // The generator object is released with the GIL held.
        Python::attach(|_| drop(produced));
        result
    }
}

impl Drop for PyInstance {
    fn drop(&mut self) {
        Python::attach(|py| {
            if let Some(event_loop) = self.event_loop.take() {
                let _ = event_loop.bind(py).call_method0("close");
            }
            let model = self.model.bind(py);
            if model.hasattr("finalize").unwrap_or(false) {
                if let Err(e) = model.call_method0("finalize") {
                    tracing::warn!(model = %self.label, error = %e, "finalize() raised");
                }
            }
        });
    }
}
