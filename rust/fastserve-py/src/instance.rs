//! A Python object with `execute(inputs) -> outputs` as a model instance of the Rust scheduler.
//! For a decoupled model `execute` is a generator (or an async generator): each `yield` is one
//! response, taken with the GIL and handed over without it. An object with
//! `execute_requests(inputs, infos)` (the Triton Python-model adapter) takes a batch's requests
//! one by one instead: a list of per-request input dicts in, a list of per-request output dicts or
//! error messages out; its decoupled form is `execute_stream(inputs, info)`.

use std::fmt;
use std::sync::Arc;

use fastserve_core::request::{RequestInfo, SequenceId, SequenceTag};
use fastserve_core::scheduler::{
    execute_concatenated, Instance, InstanceReport, KillSwitch, ModelRequest, PerRequest, PhaseClock,
};
use fastserve_core::spec::ModelSpec;
use fastserve_core::{ServeError, Tensor};
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::convert::NumpyCache;
use crate::thread_state::attach;

/// The model version an instance serves: written into messages, logged as `model` and `version`.
#[derive(Clone, Debug)]
pub struct Label {
    pub name: String,
    pub version: u64,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model '{}' version {}", self.name, self.version)
    }
}

pub struct PyInstance {
    model: Py<PyAny>,
    label: Label,
    numpy: NumpyCache,
    /// Directory prefixes never shown to clients (error messages carry no server paths).
    private_paths: Arc<Vec<String>>,
    /// The event loop async generators run on, made at the first one.
    event_loop: Option<Py<PyAny>>,
    /// The model takes a batch's requests one by one (`execute_requests`, `execute_stream`).
    per_request: bool,
    /// `fastserve_kill()`: the model runs in a worker process the watchdog may kill.
    kill: Option<KillSwitch>,
    /// `fastserve_report()`: the model reports its worker process after each batch.
    reports: bool,
}

/// Python's names for what a process-isolated instance (`fastserve.isolation.ProcessInstance`)
/// offers beyond `execute`: prefixed, so no model's own method is taken for them.
const KILL_METHOD: &str = "fastserve_kill";
const REPORT_METHOD: &str = "fastserve_report";

/// Triton's request flags for a request's place in its sequence.
const SEQUENCE_START: u32 = 1;
const SEQUENCE_END: u32 = 2;

/// What a decoupled model's `execute` returned.
enum Produced {
    Generator(Py<PyAny>),
    AsyncGenerator(Py<PyAny>),
    /// A plain dict: the request's only response.
    One(Vec<Tensor>),
}

impl PyInstance {
    pub fn new(py: Python<'_>, model: Py<PyAny>, label: Label, private_paths: Arc<Vec<String>>) -> PyResult<Self> {
        if !model.bind(py).hasattr("execute")? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{label}: the model object has no execute() method"
            )));
        }
        let per_request = model.bind(py).hasattr("execute_requests")?;
        let reports = model.bind(py).hasattr(REPORT_METHOD)?;
        let kill = match model.bind(py).getattr(KILL_METHOD) {
            Ok(method) if method.is_callable() => Some(kill_switch(method.unbind(), label.clone())),
            _ => None,
        };
        Ok(Self {
            model,
            label,
            numpy: NumpyCache::new(py)?,
            private_paths,
            event_loop: None,
            per_request,
            kill,
            reports,
        })
    }

    fn public(&self, message: String) -> String {
        self.private_paths.iter().fold(message, |m, path| m.replace(path.as_str(), "<repository>"))
    }

    /// The model's exception as the request's error; its traceback goes to the log once (the
    /// batch's request ids are logged with the failed batch).
    fn raised(&self, e: &PyErr) -> ServeError {
        let traceback = attach(|py| e.traceback(py).and_then(|tb| tb.format().ok())).unwrap_or_default();
        tracing::warn!(model = %self.label.name, version = self.label.version, error = %e, traceback = %traceback.trim_end(), "execute() raised");
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

    /// What a per-request model is shown of a request besides its inputs: `(request_id,
    /// parameters as JSON, requested output names, correlation id, flags)`, as Triton's
    /// `InferenceRequest` answers them (an empty id, `{}`, 0 when absent).
    fn info<'py>(
        &self,
        py: Python<'py>,
        info: Option<&RequestInfo>,
        sequence: Option<&SequenceTag>,
    ) -> Result<Bound<'py, PyTuple>, ServeError> {
        let id = info.and_then(|i| i.id.as_deref()).unwrap_or("");
        let parameters = match info {
            Some(i) => serde_json::to_string(&i.parameters)
                .map_err(|e| ServeError::Internal(format!("cannot encode request parameters: {e}")))?,
            None => "{}".to_string(),
        };
        let outputs = info.map(|i| i.outputs.as_slice()).unwrap_or_default();
        let flags =
            sequence.map_or(0, |t| (if t.start { SEQUENCE_START } else { 0 }) | (if t.end { SEQUENCE_END } else { 0 }));
        let build = || -> PyResult<Bound<'py, PyTuple>> {
            let correlation = match sequence.map(|t| &t.id) {
                None => 0u64.into_pyobject(py)?.into_any(),
                Some(SequenceId::Number(n)) => n.into_pyobject(py)?.into_any(),
                Some(SequenceId::Text(t)) => PyString::new(py, t).into_any(),
            };
            PyTuple::new(
                py,
                [
                    PyString::new(py, id).into_any(),
                    PyString::new(py, &parameters).into_any(),
                    PyList::new(py, outputs)?.into_any(),
                    correlation,
                    flags.into_pyobject(py)?.into_any(),
                ],
            )
        };
        build().map_err(|e| ServeError::Internal(format!("cannot build the request's info: {e}")))
    }

    /// Calls `execute` (with `info`: the per-request model's `execute_stream`) and tells what it
    /// returned.
    fn begin(
        &mut self,
        py: Python<'_>,
        inputs: Vec<Tensor>,
        info: Option<(Option<&RequestInfo>, Option<&SequenceTag>)>,
    ) -> Result<Produced, ServeError> {
        let args = self
            .numpy
            .inputs_to_dict(py, inputs)
            .map_err(|e| ServeError::Internal(format!("cannot build model inputs: {e}")))?;
        let result = match info {
            None => self.model.bind(py).call_method1("execute", (args,)),
            Some((info, sequence)) => {
                let info = self.info(py, info, sequence)?;
                self.model.bind(py).call_method1("execute_stream", (args, info))
            }
        };
        let result = result.map_err(|e| self.raised(&e))?;
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
            tracing::warn!(model = %self.label.name, version = self.label.version, error = %e, "closing the generator raised");
        }
    }
}

/// Calls the instance's kill method from the watchdog's thread (the instance's own thread waits
/// for its worker without the GIL).
fn kill_switch(method: Py<PyAny>, label: Label) -> KillSwitch {
    Arc::new(move || {
        attach(|py| {
            if let Err(e) = method.call0(py) {
                tracing::warn!(model = %label.name, version = label.version, error = %e, "killing the instance's worker process failed");
            }
        })
    })
}

impl Instance for PyInstance {
    fn kill_switch(&self) -> Option<KillSwitch> {
        self.kill.clone()
    }

    /// `fastserve_report()` returns `(restarts since the last report, resident bytes or None,
    /// why the instance can serve no more or None)`.
    fn report(&mut self) -> InstanceReport {
        if !self.reports {
            return InstanceReport::default();
        }
        attach(|py| {
            let report = self
                .model
                .bind(py)
                .call_method0(REPORT_METHOD)
                .and_then(|r| r.extract::<(u64, Option<u64>, Option<String>)>());
            match report {
                Ok((restarts, resident_bytes, unavailable)) => InstanceReport {
                    restarts,
                    resident_bytes,
                    unavailable: unavailable.map(|reason| self.public(reason)),
                },
                Err(e) => {
                    tracing::warn!(model = %self.label.name, version = self.label.version, error = %e, "the instance's report is unreadable");
                    InstanceReport::default()
                }
            }
        })
    }

    /// One GIL acquisition per batch: build the input dict, call `execute`, read the outputs.
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>, ServeError> {
        attach(|py| {
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

    /// One GIL acquisition per batch: a list of per-request input dicts (zero-copy, as
    /// `execute`'s) and their infos in, a list of per-request output dicts or errors out (a message,
    /// or a Triton error code name and a message).
    fn execute_requests(
        &mut self,
        spec: &ModelSpec,
        requests: Vec<ModelRequest>,
        clock: &mut PhaseClock,
    ) -> Result<PerRequest, ServeError> {
        if !self.per_request {
            return execute_concatenated(self, spec, requests, clock);
        }
        let count = requests.len();
        attach(|py| {
            let built = |e: PyErr| ServeError::Internal(format!("cannot build model inputs: {e}"));
            let (inputs, infos) = (PyList::empty(py), PyList::empty(py));
            for r in requests {
                infos.append(self.info(py, r.info.as_deref(), r.sequence.as_ref())?).map_err(built)?;
                inputs.append(self.numpy.inputs_to_dict(py, r.inputs).map_err(built)?).map_err(built)?;
            }
            clock.infer_started();
            let result = self.model.bind(py).call_method1("execute_requests", (inputs, infos));
            clock.infer_finished();
            let result = result.map_err(|e| self.raised(&e))?;
            let not_a_list =
                |_| ServeError::ModelError(format!("{}: execute_requests() must return a list", self.label));
            let list = result.cast::<PyList>().map_err(not_a_list)?;
            let mut answers = Vec::with_capacity(count);
            for item in list.iter() {
                let failed = |message: String| self.public(format!("{}: {message}", self.label));
                answers.push(if let Ok(message) = item.cast::<PyString>() {
                    Err(ServeError::ModelError(failed(message.to_string())))
                } else if let Ok(error) = item.cast::<PyTuple>() {
                    // Checked by type first: a failed extract on every answered request would build a PyErr.
                    match error.extract::<(String, String)>() {
                        Ok((code, message)) => Err(ServeError::from_model_code(&code, failed(message))),
                        Err(_) => Err(ServeError::ModelError(failed(
                            "a request's error must be a (code name, message) tuple of strings".into(),
                        ))),
                    }
                } else {
                    self.numpy.outputs_from_dict(&item)
                });
            }
            Ok(answers)
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
        self.stream(inputs, None, clock, emit)
    }

    fn execute_stream_request(
        &mut self,
        request: ModelRequest,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        if !self.per_request {
            return self.stream(request.inputs, None, clock, emit);
        }
        let info = Some((request.info.as_deref(), request.sequence.as_ref()));
        self.stream(request.inputs, info, clock, emit)
    }

    fn per_request(&self) -> bool {
        self.per_request
    }
}

impl PyInstance {
    /// Starts a decoupled request (`info`: a per-request model's) and hands each response to
    /// `emit`; the GIL is held to start the generator and to take each response, never while
    /// `emit` waits for a slow reader.
    fn stream(
        &mut self,
        inputs: Vec<Tensor>,
        info: Option<(Option<&RequestInfo>, Option<&SequenceTag>)>,
        clock: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        clock.infer_started();
        let produced = attach(|py| self.begin(py, inputs, info))?;
        if let Produced::One(outputs) = produced {
            clock.infer_finished();
            return emit(outputs);
        }
        let result = loop {
            match attach(|py| self.next_response(py, &produced)) {
                Ok(Some(outputs)) => {
                    if let Err(e) = emit(outputs) {
                        attach(|py| self.close(py, &produced));
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                // A bad response (not a dict, wrong tensors): the generator is still suspended.
                Err(e) => {
                    attach(|py| self.close(py, &produced));
                    break Err(e);
                }
            }
        };
        clock.infer_finished();
        // The generator object is released with the GIL held.
        attach(|_| drop(produced));
        result
    }
}

impl Drop for PyInstance {
    fn drop(&mut self) {
        attach(|py| {
            if let Some(event_loop) = self.event_loop.take() {
                let _ = event_loop.bind(py).call_method0("close");
            }
            let model = self.model.bind(py);
            if model.hasattr("finalize").unwrap_or(false) {
                if let Err(e) = model.call_method0("finalize") {
                    tracing::warn!(model = %self.label.name, version = self.label.version, error = %e, "finalize() raised");
                }
            }
        });
    }
}
