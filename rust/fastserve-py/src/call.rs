//! `fastserve.infer`: a Python model calling another model of the same server in-process.

use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use fastserve_core::registry::Registry;
use fastserve_core::scheduler::calls::{self, CallContext};
use fastserve_core::ServeError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::convert::NumpyCache;

/// The server whose models `fastserve.infer` reaches: the one created last that still exists.
static CURRENT: RwLock<Option<Weak<Registry>>> = RwLock::new(None);

/// NumPy's dtypes and constructors, looked up at the first call rather than at every one.
static NUMPY: PyOnceLock<NumpyCache> = PyOnceLock::new();

pub fn set_current(registry: &Arc<Registry>) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(registry));
}

fn current() -> Option<Arc<Registry>> {
    CURRENT.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(Weak::upgrade)
}

/// The calling model's chain and the seconds left of its execution timeout (None: no limit),
/// for a call made later from another thread (`fastserve.infer_async`).
#[pyfunction]
pub fn call_context() -> Option<(Vec<String>, Option<f64>)> {
    calls::current().map(|c| {
        let left = c.deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        (c.chain, left)
    })
}

/// Runs `inputs` (a dict of arrays) on `model` and returns its outputs as a dict of arrays; the
/// GIL is released while the model runs.
#[pyfunction]
#[pyo3(signature = (model, inputs, version = None, parameters = None, context = None))]
pub fn infer<'py>(
    py: Python<'py>,
    model: String,
    inputs: &Bound<'py, PyAny>,
    version: Option<String>,
    parameters: Option<&Bound<'py, PyAny>>,
    context: Option<(Vec<String>, Option<f64>)>,
) -> PyResult<Bound<'py, PyDict>> {
    let registry = current()
        .ok_or_else(|| PyRuntimeError::new_err("fastserve.infer: no fastserve server is running in this process"))?;
    let numpy = NUMPY.get_or_try_init(py, || NumpyCache::new(py))?;
    let tensors = numpy
        .outputs_from_dict(inputs)
        .map_err(|e| PyValueError::new_err(format!("fastserve.infer('{model}') inputs: {e}")))?;
    let parameters = match parameters {
        Some(p) => pythonize::depythonize(p).map_err(|e| PyValueError::new_err(format!("parameters: {e}")))?,
        None => Default::default(),
    };
    let context = context.map(|(chain, left)| CallContext {
        chain,
        deadline: left.and_then(|s| Instant::now().checked_add(Duration::from_secs_f64(s.max(0.0)))),
    });
    let context = context.or_else(calls::current);
    let outputs = py
        .detach(|| fastserve_core::call::infer(&registry, &model, version.as_deref(), tensors, parameters, context))
        .map_err(|e: ServeError| PyRuntimeError::new_err(format!("fastserve.infer('{model}'): {e}")))?;
    numpy.inputs_to_dict(py, outputs)
}
