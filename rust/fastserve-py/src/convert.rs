//! Tensors across the Python boundary: Rust buffers become NumPy arrays without a copy, and
//! contiguous NumPy outputs become `Bytes` that borrow the array's memory.

use bytes::Bytes;
use fastserve_core::{DataType, ServeError, Tensor, TensorData};
use numpy::{PyArray1, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{IntoPyDict, PyBytes, PyDict, PyList, PyString, PyTuple};

/// NumPy objects looked up once per instance instead of once per tensor.
pub struct NumpyCache {
    dtypes: Vec<(DataType, Py<PyAny>)>,
    array: Py<PyAny>,
    asarray: Py<PyAny>,
    /// `{"order": "C"}`, built once.
    c_order: Py<PyDict>,
    object_dtype: Py<PyAny>,
}

impl NumpyCache {
    pub fn new(py: Python<'_>) -> PyResult<Self> {
        let np = py.import("numpy")?;
        let dtype = np.getattr("dtype")?;
        let mut dtypes = Vec::new();
        for dt in DataType::ALL {
            dtypes.push((dt, dtype.call1((dt.numpy_name(),))?.unbind()));
        }
        Ok(Self {
            dtypes,
            array: np.getattr("array")?.unbind(),
            asarray: np.getattr("asarray")?.unbind(),
            c_order: [("order", "C")].into_py_dict(py)?.unbind(),
            object_dtype: dtype.call1(("object",))?.unbind(),
        })
    }

    fn dtype<'py>(&self, py: Python<'py>, dt: DataType) -> Option<&Bound<'py, PyAny>> {
        self.dtypes.iter().find(|(d, _)| *d == dt).map(|(_, o)| o.bind(py))
    }

    /// Builds the `execute` argument: `{name: ndarray}`.
    pub fn inputs_to_dict<'py>(&self, py: Python<'py>, inputs: Vec<Tensor>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for t in inputs {
            let shape = PyTuple::new(py, &t.shape)?;
            let array = match t.data {
                TensorData::Raw(bytes) => {
                    // Zero-copy when the buffer is uniquely owned (always, for a single request).
                    let vec: Vec<u8> = Vec::from(bytes);
                    let raw = PyArray1::<u8>::from_vec(py, vec);
                    let dtype = self
                        .dtype(py, t.datatype)
                        .ok_or_else(|| pyo3::exceptions::PyTypeError::new_err(unsupported(t.datatype).to_string()))?;
                    raw.call_method1("view", (dtype,))?.call_method1("reshape", (shape,))?
                }
                TensorData::Strings(items) => {
                    let list = PyList::empty(py);
                    for b in &items {
                        list.append(PyBytes::new(py, b))?;
                    }
                    self.array.bind(py).call1((list, self.object_dtype.bind(py)))?.call_method1("reshape", (shape,))?
                }
            };
            dict.set_item(t.name, array)?;
        }
        Ok(dict)
    }

    /// Reads `execute`'s result: a mapping of output name to array-like.
    pub fn outputs_from_dict(&self, result: &Bound<'_, PyAny>) -> Result<Vec<Tensor>, ServeError> {
        let py = result.py();
        let dict = result.cast::<PyDict>().map_err(|_| {
            ServeError::ModelError(format!(
                "execute() must return a dict of output name to array, got {}",
                type_name(result)
            ))
        })?;
        let mut out = Vec::with_capacity(dict.len());
        for (key, value) in dict.iter() {
            let name: String = key.extract().map_err(|_| {
                ServeError::ModelError(format!("output names must be strings, got {}", type_name(&key)))
            })?;
            let tensor = self.output_tensor(py, name, &value).map_err(|e| match e {
                Conversion::Py(err) => ServeError::ModelError(format!("cannot convert an output: {err}")),
                Conversion::Serve(err) => err,
            })?;
            out.push(tensor);
        }
        Ok(out)
    }

    fn output_tensor(&self, py: Python<'_>, name: String, value: &Bound<'_, PyAny>) -> Result<Tensor, Conversion> {
        // C order without ascontiguousarray's promotion of scalars to shape [1]: a 0-d output
        // must stay 0-d, so the declared dims can be checked against what the model returned.
        let array = self.asarray.bind(py).call((value,), Some(self.c_order.bind(py)))?;
        let untyped = array
            .cast::<PyUntypedArray>()
            .map_err(|_| ServeError::ModelError(format!("output '{name}' is not convertible to a NumPy array")))?;
        let descr = untyped.dtype();
        let shape = untyped.shape().to_vec();
        let datatype = match (descr.kind(), descr.itemsize()) {
            (b'b', 1) => DataType::Bool,
            (b'u', 1) => DataType::Uint8,
            (b'u', 2) => DataType::Uint16,
            (b'u', 4) => DataType::Uint32,
            (b'u', 8) => DataType::Uint64,
            (b'i', 1) => DataType::Int8,
            (b'i', 2) => DataType::Int16,
            (b'i', 4) => DataType::Int32,
            (b'i', 8) => DataType::Int64,
            (b'f', 2) => DataType::Fp16,
            (b'f', 4) => DataType::Fp32,
            (b'f', 8) => DataType::Fp64,
            (b'O' | b'S' | b'U', _) => {
                let items = array.call_method0("ravel")?.call_method0("tolist")?;
                let mut strings = Vec::with_capacity(untyped.len());
                for item in items.try_iter()? {
                    let item = item?;
                    if let Ok(b) = item.cast::<PyBytes>() {
                        strings.push(Bytes::copy_from_slice(b.as_bytes()));
                    } else if let Ok(s) = item.cast::<PyString>() {
                        strings.push(Bytes::copy_from_slice(s.to_str()?.as_bytes()));
                    } else {
                        return Err(ServeError::ModelError(format!(
                            "output '{name}' holds a {} element; BYTES outputs hold bytes or str",
                            type_name(&item)
                        ))
                        .into());
                    }
                }
                return Ok(Tensor::new(name, DataType::Bytes, shape, TensorData::Strings(strings))?);
            }
            (kind, size) => {
                return Err(ServeError::ModelError(format!(
                    "output '{name}' has NumPy dtype kind '{}' of {size} bytes, which has no V2 datatype",
                    kind as char
                ))
                .into())
            }
        };
        let array = if descr.is_native_byteorder() == Some(false) {
            // Rare: a byte-swapped array; make a native copy.
            let native = self.dtype(py, datatype).ok_or_else(|| unsupported(datatype))?;
            array.call_method1("astype", (native,))?
        } else {
            array
        };
        let untyped = array.cast::<PyUntypedArray>().map_err(|_| unsupported(datatype))?;
        let len = untyped.len() * datatype.size().unwrap_or(1);
        let data = if len == 0 {
            Bytes::new()
        } else {
            // SAFETY: the array is C-contiguous (asarray order C) and holds `len` bytes; the owner
            // keeps it alive for as long as any slice of the Bytes exists.
            let ptr = unsafe { (*untyped.as_array_ptr()).fields.data as *const u8 };
            Bytes::from_owner(ArrayOwner { _array: array.clone().unbind(), ptr, len })
        };
        Ok(Tensor::new(name, datatype, shape, TensorData::Raw(data))?)
    }
}

/// Keeps a NumPy array alive while Rust reads its memory. Models must not modify an array after
/// returning it (documented in the Model API).
struct ArrayOwner {
    _array: Py<PyAny>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer targets memory owned by the referenced array, which is only read; `Py` is
// Send and defers its decref until a thread holds the GIL.
unsafe impl Send for ArrayOwner {}

impl AsRef<[u8]> for ArrayOwner {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the constructor: valid, live, `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

enum Conversion {
    Py(PyErr),
    Serve(ServeError),
}

impl From<PyErr> for Conversion {
    fn from(e: PyErr) -> Self {
        Self::Py(e)
    }
}

impl From<ServeError> for Conversion {
    fn from(e: ServeError) -> Self {
        Self::Serve(e)
    }
}

fn unsupported(dt: DataType) -> ServeError {
    ServeError::Internal(format!("no NumPy dtype for {dt}"))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}
