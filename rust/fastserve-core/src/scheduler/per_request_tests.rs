//! Batches answered request by request (`Instance::execute_requests`): the default concatenates,
//! executes once and splits; an instance that takes requests one by one sees each request with its
//! info, and one request's failure (an error, or outputs that break the spec) fails only that one.

use std::sync::Arc;
use std::time::Duration;

use super::plan::BatchPolicy;
use super::*;
use crate::request::RequestInfo;
use crate::spec::TensorSpec;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

fn fp32(name: &str, values: &[f32]) -> Tensor {
    let b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(name, DataType::Fp32, vec![values.len(), 1], TensorData::Raw(b.into())).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    let TensorData::Raw(b) = &t.data else { unreachable!() };
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn spec() -> Arc<ModelSpec> {
    Arc::new(ModelSpec {
        name: "each".into(),
        version: 1,
        platform: "test".into(),
        max_batch_size: 8,
        decoupled: false,
        inputs: vec![TensorSpec::new("X", DataType::Fp32, vec![1])],
        outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![1])],
    })
}

/// Negates a whole batch at once, reporting the batch sizes it runs.
struct Negate {
    seen: crossbeam_channel::Sender<usize>,
    /// Answers with one row too few.
    short: bool,
}

impl Instance for Negate {
    fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
        let _ = self.seen.send(inputs[0].shape[0]);
        let mut values: Vec<f32> = floats(&inputs[0]).iter().map(|v| -v).collect();
        if self.short {
            values.pop();
        }
        Ok(vec![fp32("Y", &values)])
    }
}

fn request(values: &[f32], info: Option<&str>) -> ModelRequest {
    let info = info.map(|id| Arc::new(RequestInfo { id: Some(id.into()), ..Default::default() }));
    ModelRequest { inputs: vec![fp32("X", values)], rows: values.len(), info, sequence: None }
}

#[test]
fn the_default_runs_one_concatenated_batch_and_splits_it_back() {
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let mut model = Negate { seen: seen_tx, short: false };
    let requests = vec![request(&[1.0], None), request(&[2.0, 3.0], None), request(&[4.0], None)];
    let answers = model.execute_requests(&spec(), requests, &mut PhaseClock::new()).unwrap();
    assert_eq!(seen.try_iter().collect::<Vec<_>>(), vec![4], "one execution of all four rows");
    let got: Vec<Vec<f32>> = answers.into_iter().map(|a| floats(&a.unwrap()[0])).collect();
    assert_eq!(got, vec![vec![-1.0], vec![-2.0, -3.0], vec![-4.0]]);
}

#[test]
fn the_default_fails_the_whole_batch_when_its_outputs_break_the_spec() {
    let (seen_tx, _seen) = crossbeam_channel::unbounded();
    let mut model = Negate { seen: seen_tx, short: true };
    let requests = vec![request(&[1.0], None), request(&[2.0], None)];
    let err = model.execute_requests(&spec(), requests, &mut PhaseClock::new()).unwrap_err();
    assert!(matches!(err, ServeError::ModelError(_)), "{err}");
}

/// Answers each request on its own: a negative first value is that request's error, 99 leaves
/// out the declared output; the first batch waits on a gate. Reports each batch's request ids.
struct EachOwn {
    seen: crossbeam_channel::Sender<Vec<Option<String>>>,
    gate: Option<crossbeam_channel::Receiver<()>>,
}

impl Instance for EachOwn {
    fn execute(&mut self, _: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
        unreachable!("a per-request instance gets execute_requests")
    }

    fn per_request(&self) -> bool {
        true
    }

    fn execute_requests(
        &mut self,
        _: &ModelSpec,
        requests: Vec<ModelRequest>,
        _: &mut PhaseClock,
    ) -> Result<PerRequest> {
        let _ = self.seen.send(requests.iter().map(|r| r.info.as_ref().and_then(|i| i.id.clone())).collect());
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        Ok(requests
            .iter()
            .map(|r| {
                let values = floats(&r.inputs[0]);
                if values[0] < 0.0 {
                    Err(ServeError::ModelError(format!("negative: {}", values[0])))
                } else if values[0] == 99.0 {
                    Ok(vec![])
                } else {
                    Ok(vec![fp32("Y", &values.iter().map(|v| v * 10.0).collect::<Vec<_>>())])
                }
            })
            .collect())
    }
}

#[tokio::test]
async fn one_requests_failure_leaves_the_others_in_its_batch_answered() {
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
    let policy = BatchPolicy { max_batch_size: 8, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] };
    let instance = EachOwn { seen: seen_tx, gate: Some(gate_rx) };
    let s = Scheduler::start(spec(), SchedulerConfig::new(policy, 100), vec![Box::new(instance)]).unwrap();
    assert!(s.wants_request_info());
    let submit = |values: &[f32], id: &str| {
        let info = Some(Arc::new(RequestInfo { id: Some(id.into()), ..Default::default() }));
        let request = ValidatedRequest { inputs: vec![fp32("X", values)], rows: values.len() };
        s.submit_with(request, QueueOptions { info, ..Default::default() }).unwrap()
    };
    let first = submit(&[1.0], "first");
    assert_eq!(seen.recv_timeout(Duration::from_secs(10)).unwrap(), vec![Some("first".to_string())]);
    // Queued behind the gated batch, these three run as one batch.
    let replies =
        [submit(&[2.0, 3.0], "ok"), submit(&[-1.0], "error"), submit(&[99.0], "missing"), submit(&[4.0], "ok2")];
    gate_tx.send(()).unwrap();
    assert_eq!(floats(&first.await.unwrap().unwrap().outputs[0]), vec![10.0]);
    let ids = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ids.len(), 4, "the queued requests formed one batch: {ids:?}");
    let [ok, error, missing, ok2] = replies;
    let ok = ok.await.unwrap().unwrap();
    assert_eq!((floats(&ok.outputs[0]), ok.served.batch_size), (vec![20.0, 30.0], 5));
    assert_eq!(
        error.await.unwrap().unwrap_err().to_string(),
        ServeError::ModelError("negative: -1".into()).to_string()
    );
    let missing = missing.await.unwrap().unwrap_err();
    assert!(missing.to_string().contains("did not return output 'Y'"), "{missing}");
    assert_eq!(floats(&ok2.await.unwrap().unwrap().outputs[0]), vec![40.0]);
    assert_eq!(s.stats().execution_count(), 2);
    assert_eq!(s.stats().responses(), 3, "only the answered requests count as responses");
}

#[tokio::test]
async fn a_batch_answered_with_the_wrong_count_fails_whole() {
    struct Short;
    impl Instance for Short {
        fn execute(&mut self, _: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
            unreachable!()
        }
        fn per_request(&self) -> bool {
            true
        }
        fn execute_requests(&mut self, _: &ModelSpec, _: Vec<ModelRequest>, _: &mut PhaseClock) -> Result<PerRequest> {
            Ok(Vec::new())
        }
    }
    let policy = BatchPolicy { max_batch_size: 8, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] };
    let s = Scheduler::start(spec(), SchedulerConfig::new(policy, 10), vec![Box::new(Short)]).unwrap();
    let request = ValidatedRequest { inputs: vec![fp32("X", &[1.0])], rows: 1 };
    let err = s.submit(request).unwrap().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("answered 0 of a batch's 1 requests"), "{err}");
}
