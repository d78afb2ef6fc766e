//! The Python repository manager as the core's `RepositoryControl`. Its exceptions map to
//! protocol errors: LookupError → not found, PermissionError → forbidden, anything else → bad request.

use fastserve_core::request::Parameters;
use fastserve_core::server::repository::{IndexEntry, RepositoryControl};
use fastserve_core::ServeError;
use pyo3::exceptions::{PyLookupError, PyPermissionError};
use pyo3::prelude::*;

pub struct PyRepositoryControl {
    manager: Py<PyAny>,
}

impl PyRepositoryControl {
    pub fn new(manager: Py<PyAny>) -> Self {
        Self { manager }
    }
}

fn to_serve_error(py: Python<'_>, e: PyErr) -> ServeError {
    let message = e.value(py).to_string();
    if e.is_instance_of::<PyLookupError>(py) {
        ServeError::not_found(message)
    } else if e.is_instance_of::<PyPermissionError>(py) {
        ServeError::Forbidden(message)
    } else {
        ServeError::bad_request(message)
    }
}

impl RepositoryControl for PyRepositoryControl {
    fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, ServeError> {
        Python::attach(|py| {
            let rows = self.manager.bind(py).call_method1("index", (ready_only,)).map_err(|e| to_serve_error(py, e))?;
            let rows: Vec<(String, Option<String>, String, String)> =
                rows.extract().map_err(|e| to_serve_error(py, e))?;
            Ok(rows
                .into_iter()
                .map(|(name, version, state, reason)| IndexEntry { name, version, state, reason })
                .collect())
        })
    }

    fn load(&self, name: &str, parameters: &Parameters) -> Result<(), ServeError> {
        self.call("load", name, parameters)
    }

    fn unload(&self, name: &str, parameters: &Parameters) -> Result<(), ServeError> {
        self.call("unload", name, parameters)
    }
}

impl PyRepositoryControl {
    fn call(&self, method: &str, name: &str, parameters: &Parameters) -> Result<(), ServeError> {
        let json = serde_json::to_string(parameters).unwrap_or_else(|_| "{}".into());
        Python::attach(|py| {
            self.manager.bind(py).call_method1(method, (name, json)).map(|_| ()).map_err(|e| to_serve_error(py, e))
        })
    }
}
