//! Tensors as the serving path carries them: a name, a datatype, a concrete shape and the data.

pub mod datatype;

use bytes::Bytes;

use crate::error::{Result, ServeError};
use crate::tensor::datatype::DataType;

/// Tensor contents. Fixed-size types share one little-endian buffer, so batching is a
/// concatenation and splitting is a zero-copy slice.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Raw(Bytes),
    Strings(Vec<Bytes>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Number of elements a shape holds, or `None` on overflow (a hostile shape).
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Builds a tensor after checking that the data holds exactly `shape` elements of `datatype`.
    pub fn new(name: impl Into<String>, datatype: DataType, shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let t = Tensor { name: name.into(), datatype, shape, data };
        t.check_consistent()?;
        Ok(t)
    }

    pub fn element_count(&self) -> usize {
        element_count(&self.shape).unwrap_or(usize::MAX)
    }

    /// The number of elements the data actually holds.
    pub fn data_elements(&self) -> usize {
        match (&self.data, self.datatype.size()) {
            (TensorData::Raw(b), Some(size)) => b.len() / size,
            (TensorData::Strings(s), _) => s.len(),
            (TensorData::Raw(_), None) => 0,
        }
    }

    /// Checks that data, datatype and shape agree.
    pub fn check_consistent(&self) -> Result<()> {
        let expected = element_count(&self.shape).ok_or_else(|| {
            ServeError::bad_request(format!("tensor '{}': shape {:?} is too large", self.name, self.shape))
        })?;
        match (&self.data, self.datatype.size()) {
            (TensorData::Raw(b), Some(size)) => {
                if b.len() != expected.saturating_mul(size) {
                    return Err(ServeError::bad_request(format!(
                        "tensor '{}': shape {:?} of {} needs {} bytes, got {}",
                        self.name,
                        self.shape,
                        self.datatype,
                        expected.saturating_mul(size),
                        b.len()
                    )));
                }
            }
            (TensorData::Strings(s), None) => {
                if s.len() != expected {
                    return Err(ServeError::bad_request(format!(
                        "tensor '{}': shape {:?} needs {} elements, got {}",
                        self.name,
                        self.shape,
                        expected,
                        s.len()
                    )));
                }
            }
            _ => {
                return Err(ServeError::Internal(format!(
                    "tensor '{}': data representation does not match datatype {}",
                    self.name, self.datatype
                )))
            }
        }
        Ok(())
    }

    /// Elements in one row (everything but the first dimension).
    pub fn row_elements(&self) -> usize {
        element_count(self.shape.get(1..).unwrap_or(&[])).unwrap_or(usize::MAX)
    }

    /// Rows `[start, start + rows)` along the first dimension, without copying fixed-size data.
    pub fn slice_rows(&self, start: usize, rows: usize) -> Result<Tensor> {
        let total_rows = self.shape.first().copied().unwrap_or(0);
        if start + rows > total_rows {
            return Err(ServeError::Internal(format!(
                "output '{}' has {} rows, expected at least {}",
                self.name,
                total_rows,
                start + rows
            )));
        }
        let per_row = self.row_elements();
        let mut shape = self.shape.clone();
        shape[0] = rows;
        let data = match &self.data {
            TensorData::Raw(b) => {
                let size = self.datatype.size().unwrap_or(1);
                TensorData::Raw(b.slice(start * per_row * size..(start + rows) * per_row * size))
            }
            TensorData::Strings(s) => TensorData::Strings(s[start * per_row..(start + rows) * per_row].to_vec()),
        };
        Ok(Tensor { name: self.name.clone(), datatype: self.datatype, shape, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DataType::Fp32, shape, TensorData::Raw(bytes.into())).unwrap()
    }

    #[test]
    fn rejects_data_that_does_not_fill_the_shape() {
        let err = Tensor::new("x", DataType::Fp32, vec![2, 2], TensorData::Raw(vec![0u8; 12].into())).unwrap_err();
        assert!(matches!(err, ServeError::BadRequest(_)));
        assert!(Tensor::new("x", DataType::Bytes, vec![2], TensorData::Strings(vec![Bytes::new()])).is_err());
    }

    #[test]
    fn overflowing_shapes_are_rejected() {
        let err = Tensor::new("x", DataType::Fp32, vec![usize::MAX, 4], TensorData::Raw(Bytes::new())).unwrap_err();
        assert!(err.to_string().contains("too large"));
    }

    #[test]
    fn slices_rows() {
        let t = fp32("x", vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let s = t.slice_rows(1, 2).unwrap();
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(s, fp32("x", vec![2, 2], &[3.0, 4.0, 5.0, 6.0]));
        assert!(t.slice_rows(2, 2).is_err());
    }
}
