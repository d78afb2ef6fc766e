//! Dynamic batching as pure functions: which queued requests form the next batch, how their
//! inputs are concatenated, and how outputs are split back. The threads live in `scheduler`.

use std::time::Duration;

use bytes::BytesMut;

use crate::error::{Result, ServeError};
use crate::tensor::{Tensor, TensorData};

/// Per-model batching settings (the `[dynamic_batching]` config table plus `max_batch_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// 0 disables batching: every request runs alone, with no batch dimension.
    pub max_batch_size: usize,
    /// How long the oldest request may wait for the batch to fill.
    pub max_queue_delay: Duration,
    /// Batch sizes the model runs best at; sent as soon as one is reached.
    pub preferred_batch_sizes: Vec<usize>,
}

impl BatchPolicy {
    /// Whether the batcher sends a request that finds the queue empty and an instance idle alone
    /// and at once ([`plan_batch`] with nothing else queued).
    pub fn sends_a_lone_request_at_once(&self) -> bool {
        self.max_batch_size == 0 || self.max_queue_delay.is_zero()
    }
}

/// What the batcher needs to know of a queued request.
pub trait Batchable {
    fn rows(&self) -> usize;
    fn inputs(&self) -> &[Tensor];
}

/// Requests can share a batch when they have the same inputs (optional ones may be left out),
/// agreeing on everything but the batch dimension.
pub fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.datatype == y.datatype && x.shape.get(1..) == y.shape.get(1..))
}

/// The next batch: indices into the queue (oldest first) and whether to send it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub indices: Vec<usize>,
    pub rows: usize,
    /// Nothing is gained by waiting longer (full, preferred size reached, or no delay allowed).
    pub ready: bool,
}

/// Plans a batch led by the oldest request, taking compatible requests in arrival order while
/// they fit. `expired` means the oldest request's queue delay has passed.
pub fn plan_batch<J: Batchable>(queue: &[J], policy: &BatchPolicy, expired: bool) -> BatchPlan {
    let Some(first) = queue.first() else {
        return BatchPlan { indices: vec![], rows: 0, ready: false };
    };
    if policy.max_batch_size == 0 {
        return BatchPlan { indices: vec![0], rows: first.rows(), ready: true };
    }
    let max = policy.max_batch_size;
    let mut indices = Vec::new();
    let mut cumulative = Vec::new();
    let mut rows = 0;
    let mut full = false;
    for (i, job) in queue.iter().enumerate() {
        if !compatible(first.inputs(), job.inputs()) {
            continue;
        }
        if rows + job.rows() > max {
            full = true;
            break;
        }
        rows += job.rows();
        indices.push(i);
        cumulative.push(rows);
        if rows == max {
            full = true;
            break;
        }
    }
    let largest_preferred = policy.preferred_batch_sizes.iter().copied().filter(|&p| p <= max).max();
    let reached_preferred = largest_preferred.is_some_and(|p| rows >= p);
    let ready = full || reached_preferred || expired || policy.max_queue_delay.is_zero();
    if ready && !policy.preferred_batch_sizes.is_empty() {
        // Cut at the largest preferred size the queued requests hit exactly; the rest waits.
        if let Some(k) = cumulative.iter().rposition(|c| policy.preferred_batch_sizes.contains(c)) {
            indices.truncate(k + 1);
            rows = cumulative[k];
        }
    }
    BatchPlan { indices, rows, ready }
}

/// Concatenates the inputs of a batch along the batch dimension, one buffer per input.
pub fn concat_inputs(requests: &[&[Tensor]]) -> Result<Vec<Tensor>> {
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    if requests.len() == 1 {
        return Ok(first.to_vec());
    }
    let mut out = Vec::with_capacity(first.len());
    for (i, proto) in first.iter().enumerate() {
        let rows: usize = requests.iter().map(|r| r[i].shape[0]).sum();
        let mut shape = proto.shape.clone();
        shape[0] = rows;
        let data = match &proto.data {
            TensorData::Raw(_) => {
                let total: usize = requests
                    .iter()
                    .map(|r| match &r[i].data {
                        TensorData::Raw(b) => b.len(),
                        TensorData::Strings(_) => 0,
                    })
                    .sum();
                let mut buf = BytesMut::with_capacity(total);
                for r in requests {
                    if let TensorData::Raw(b) = &r[i].data {
                        buf.extend_from_slice(b);
                    }
                }
                TensorData::Raw(buf.freeze())
            }
            TensorData::Strings(_) => {
                let mut all = Vec::new();
                for r in requests {
                    if let TensorData::Strings(s) = &r[i].data {
                        all.extend(s.iter().cloned());
                    }
                }
                TensorData::Strings(all)
            }
        };
        let t = Tensor { name: proto.name.clone(), datatype: proto.datatype, shape, data };
        t.check_consistent().map_err(|e| ServeError::Internal(format!("batch assembly: {e}")))?;
        out.push(t);
    }
    Ok(out)
}

/// Splits batched outputs back into each request's rows, in request order.
pub fn split_outputs(outputs: &[Tensor], rows: &[usize]) -> Result<Vec<Vec<Tensor>>> {
    let mut per_request = Vec::with_capacity(rows.len());
    let mut start = 0;
    for &r in rows {
        per_request.push(outputs.iter().map(|t| t.slice_rows(start, r)).collect::<Result<Vec<_>>>()?);
        start += r;
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::datatype::DataType;

    struct Job(Vec<Tensor>);

    impl Batchable for Job {
        fn rows(&self) -> usize {
            self.0[0].shape[0]
        }
        fn inputs(&self) -> &[Tensor] {
            &self.0
        }
    }

    fn rows_of(values: &[f32], width: usize) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new("x", DataType::Fp32, vec![values.len() / width, width], TensorData::Raw(bytes.into())).unwrap()
    }

    fn job(rows: usize, width: usize) -> Job {
        Job(vec![rows_of(&vec![0.0; rows * width], width)])
    }

    fn policy(max: usize, delay_us: u64, preferred: &[usize]) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            max_queue_delay: Duration::from_micros(delay_us),
            preferred_batch_sizes: preferred.to_vec(),
        }
    }

    #[test]
    fn fills_up_to_the_limit_in_arrival_order() {
        let q: Vec<Job> = (0..6).map(|_| job(1, 2)).collect();
        let plan = plan_batch(&q, &policy(4, 1000, &[]), false);
        assert_eq!(plan, BatchPlan { indices: vec![0, 1, 2, 3], rows: 4, ready: true });
    }

    #[test]
    fn multi_row_requests_never_exceed_the_limit() {
        let q = vec![job(3, 2), job(2, 2), job(1, 2)];
        let plan = plan_batch(&q, &policy(4, 1000, &[]), false);
        assert_eq!(plan.indices, vec![0]);
        assert!(plan.ready, "the next request does not fit, so waiting cannot help");
    }

    #[test]
    fn waits_for_the_delay_unless_full() {
        let q = vec![job(1, 2), job(1, 2)];
        let p = policy(8, 1000, &[]);
        assert!(!plan_batch(&q, &p, false).ready);
        let expired = plan_batch(&q, &p, true);
        assert!(expired.ready);
        assert_eq!(expired.rows, 2);
        assert!(plan_batch(&q, &policy(8, 0, &[]), false).ready, "no delay: send what is there");
    }

    #[test]
    fn preferred_sizes_send_early_and_cut_the_batch() {
        let q: Vec<Job> = (0..5).map(|_| job(1, 2)).collect();
        let plan = plan_batch(&q, &policy(8, 1000, &[2, 4]), false);
        assert_eq!(plan, BatchPlan { indices: vec![0, 1, 2, 3], rows: 4, ready: true });
        let q3: Vec<Job> = (0..3).map(|_| job(1, 2)).collect();
        assert!(!plan_batch(&q3, &policy(8, 1000, &[2, 4]), false).ready);
        let expired = plan_batch(&q3, &policy(8, 1000, &[2, 4]), true);
        assert_eq!(expired.rows, 2, "on expiry the largest preferred size reached wins");
    }

    #[test]
    fn shape_incompatible_requests_are_kept_apart() {
        let q = vec![job(1, 2), job(1, 3), job(1, 2), job(1, 3)];
        let plan = plan_batch(&q, &policy(8, 0, &[]), false);
        assert_eq!(plan.indices, vec![0, 2]);
        let rest = vec![job(1, 3), job(1, 3)];
        assert_eq!(plan_batch(&rest, &policy(8, 0, &[]), false).indices, vec![0, 1]);
    }

    #[test]
    fn no_batching_takes_one_request() {
        let q = vec![job(2, 2), job(2, 2)];
        let plan = plan_batch(&q, &policy(0, 1000, &[]), false);
        assert_eq!(plan, BatchPlan { indices: vec![0], rows: 2, ready: true });
    }

    #[test]
    fn outputs_split_back_to_their_requests() {
        let a = vec![rows_of(&[1.0, 2.0], 2)];
        let b = vec![rows_of(&[3.0, 4.0, 5.0, 6.0], 2)];
        let batch = concat_inputs(&[&a, &b]).unwrap();
        assert_eq!(batch[0].shape, vec![3, 2]);
        let split = split_outputs(&batch, &[1, 2]).unwrap();
        assert_eq!(split[0], a);
        assert_eq!(split[1], b);
    }

    #[test]
    fn strings_concatenate_and_split() {
        let s = |v: &[&'static str]| {
            Tensor::new(
                "s",
                DataType::Bytes,
                vec![v.len()],
                TensorData::Strings(v.iter().map(|x| bytes::Bytes::from_static(x.as_bytes())).collect()),
            )
            .unwrap()
        };
        let a = vec![s(&["a"])];
        let b = vec![s(&["b", "c"])];
        let batch = concat_inputs(&[&a, &b]).unwrap();
        assert_eq!(batch[0], s(&["a", "b", "c"]));
        assert_eq!(split_outputs(&batch, &[1, 2]).unwrap(), vec![a, b]);
    }

    #[test]
    fn requests_with_different_inputs_never_share_a_batch() {
        let t =
            |name: &str| Tensor::new(name, DataType::Fp32, vec![1, 2], TensorData::Raw(vec![0u8; 8].into())).unwrap();
        assert!(compatible(&[t("A"), t("B")], &[t("A"), t("B")]));
        // Each left out a different optional input.
        assert!(!compatible(&[t("A")], &[t("B")]));
        assert!(!compatible(&[t("A"), t("B")], &[t("A")]));
    }
}
