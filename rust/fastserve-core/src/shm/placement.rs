//! A request's tensors in shared memory, resolved once for every protocol: inputs are copied out
//! of their regions into ordinary tensors before anything looks at their data, and outputs are
//! written into the slots the request named before the response describes them.

use std::sync::Arc;

use crate::error::{Result, ServeError};
use crate::http::json::{binary_size, decode_binary, put_binary};
use crate::request::{Delivery, InferRequest, ResponseOutput};
use crate::shm::region::{Region, Slot};
use crate::shm::SharedMemory;
use crate::tensor::{Tensor, TensorData};

/// Where a request's outputs go. Holding the regions keeps them open until the request is done,
/// even if they are unregistered meanwhile.
#[derive(Debug, Default)]
pub struct OutputSlots(Vec<OutputSlot>);

#[derive(Debug)]
struct OutputSlot {
    output: String,
    region: Arc<Region>,
    slot: Slot,
}

/// Resolves the request's shared-memory tensors: checks every output slot (registered, in
/// bounds, writable), then copies each input's bytes out of its region, once, and decodes that
/// copy into `request.inputs`. Fixed-size inputs must name exactly the bytes their shape holds;
/// a BYTES input may take at most `max_bytes_input` bytes (the body limit: as many as in a body).
pub fn place(shm: &SharedMemory, request: &mut InferRequest, max_bytes_input: usize) -> Result<OutputSlots> {
    let mut slots = Vec::new();
    for o in &request.outputs {
        let Some(at) = &o.shared_memory else { continue };
        let what = format!("output '{}'", o.name);
        let region = shm.region(&what, &at.region)?;
        let slot = region.slot(&what, at.offset, at.byte_size, true)?;
        slots.push(OutputSlot { output: o.name.clone(), region, slot });
    }
    for input in std::mem::take(&mut request.shared_memory_inputs) {
        let (h, at) = (input.header, input.at);
        let what = format!("input '{}'", h.name);
        let region = shm.region(&what, &at.region)?;
        let slot = region.slot(&what, at.offset, at.byte_size, false)?;
        match h.datatype.size() {
            Some(size) => {
                let needed = (h.elements as u64).saturating_mul(size as u64);
                if needed != at.byte_size {
                    return Err(ServeError::bad_request(format!(
                        "{what}: shape {:?} of {} needs {needed} bytes, but shared_memory_byte_size is {}",
                        h.shape, h.datatype, at.byte_size
                    )));
                }
            }
            None if at.byte_size > max_bytes_input as u64 => {
                return Err(ServeError::PayloadTooLarge(format!(
                    "{what}: shared_memory_byte_size {} is over the limit of {} bytes for a BYTES tensor",
                    at.byte_size, max_bytes_input
                )))
            }
            None => {}
        }
        let copy = region.read(slot)?;
        let data = decode_binary(&h.name, h.datatype, h.elements, copy)?;
        request.inputs.push(Tensor::new(h.name, h.datatype, h.shape, data)?);
    }
    Ok(OutputSlots(slots))
}

impl OutputSlots {
    /// Writes every output the request placed in shared memory into its slot and marks it so the
    /// response only describes it. An output larger than its slot fails the request.
    pub fn deliver(&self, outputs: &mut [ResponseOutput]) -> Result<()> {
        for o in outputs.iter_mut() {
            let Some(s) = self.0.iter().find(|s| s.output == o.tensor.name) else { continue };
            let needed = binary_size(&o.tensor);
            if needed as u64 > s.slot.len {
                return Err(ServeError::bad_request(format!(
                    "shared memory size specified with the request for output '{}' ({} bytes) should be at least {needed} \
                     bytes to hold the results",
                    s.output, s.slot.len
                )));
            }
            match &o.tensor.data {
                TensorData::Raw(bytes) => s.region.write(s.slot, bytes)?,
                TensorData::Strings(_) => {
                    let mut buf = Vec::with_capacity(needed);
                    put_binary(&mut buf, &o.tensor);
                    s.region.write(s.slot, &buf)?;
                }
            }
            o.delivery = Delivery::SharedMemory;
        }
        Ok(())
    }
}
