//! Decoupled models in the scheduler: responses in order, a bounded buffer that makes the model
//! wait for its reader, cancellation when the reader goes away, one request per execution.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plan::BatchPolicy;
use super::*;
use crate::request::Failed;
use crate::spec::TensorSpec;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

/// Emits 0, 1, 2, ... (up to the request's value, or forever with `endless`), counting the
/// responses handed over and reporting how each execution ended and the rows it saw.
struct Counter {
    endless: bool,
    handed: Arc<AtomicUsize>,
    ended: crossbeam_channel::Sender<(usize, Result<()>)>,
}

fn int(v: i32, batched: bool) -> Tensor {
    let shape = if batched { vec![1, 1] } else { vec![1] };
    Tensor::new("OUT", DataType::Int32, shape, TensorData::Raw(v.to_le_bytes().to_vec().into())).unwrap()
}

impl Instance for Counter {
    fn execute(&mut self, _: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
        unreachable!("a decoupled model runs through execute_stream")
    }

    fn execute_stream(
        &mut self,
        inputs: Vec<Tensor>,
        _: &mut PhaseClock,
        emit: &mut dyn FnMut(Vec<Tensor>) -> Result<()>,
    ) -> Result<()> {
        let batched = inputs[0].shape.len() == 2;
        let TensorData::Raw(b) = &inputs[0].data else { unreachable!() };
        let n = i32::from_le_bytes(b[..4].try_into().unwrap());
        let mut i = 0;
        let result = loop {
            if !self.endless && i >= n {
                break Ok(());
            }
            if let Err(e) = emit(vec![int(i, batched)]) {
                break Err(e);
            }
            self.handed.fetch_add(1, Ordering::SeqCst);
            i += 1;
        };
        let _ = self.ended.send((inputs[0].shape[0], result.clone()));
        result
    }
}

struct Fixture {
    scheduler: Arc<Scheduler>,
    handed: Arc<AtomicUsize>,
    ended: crossbeam_channel::Receiver<(usize, Result<()>)>,
}

fn start(endless: bool, max_batch_size: usize) -> Fixture {
    let dims = vec![1];
    let spec = Arc::new(ModelSpec {
        name: "count".into(),
        version: 1,
        platform: "test".into(),
        max_batch_size,
        decoupled: true,
        inputs: vec![TensorSpec::new("N", DataType::Int32, dims.clone())],
        outputs: vec![TensorSpec::new("OUT", DataType::Int32, dims)],
    });
    let policy =
        BatchPolicy { max_batch_size, max_queue_delay: Duration::from_secs(3600), preferred_batch_sizes: vec![] };
    let handed = Arc::new(AtomicUsize::new(0));
    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let instance = Counter { endless, handed: handed.clone(), ended: ended_tx };
    let scheduler = Scheduler::start(spec, SchedulerConfig::new(policy, 100), vec![Box::new(instance)]).unwrap();
    Fixture { scheduler, handed, ended }
}

fn n(v: i32, batched: bool) -> ValidatedRequest {
    let t = int(v, batched);
    ValidatedRequest { inputs: vec![Tensor { name: "N".into(), ..t }], rows: 1 }
}

fn value(outputs: &[Tensor]) -> i32 {
    let TensorData::Raw(b) = &outputs[0].data else { unreachable!() };
    i32::from_le_bytes(b[..4].try_into().unwrap())
}

/// Waits for state another thread changes; the bound only guards against a hang.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn responses_arrive_in_order_then_the_final_answer() {
    let f = start(false, 0);
    let mut rx = f.scheduler.submit_stream(n(5, false), QueueOptions::default()).unwrap();
    let mut got = Vec::new();
    while let Some(outputs) = rx.responses.recv().await {
        got.push(value(&outputs));
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert!(rx.done.await.unwrap().unwrap().outputs.is_empty());
    assert_eq!(f.scheduler.stats().responses(), 5);
    let slots = f.scheduler.stats().response_indexes();
    assert_eq!(slots.len(), 5);
    assert!(slots.iter().all(|(_, s)| s.success.count() == 1));
}

#[tokio::test]
async fn a_slow_reader_makes_the_model_wait_at_a_bounded_buffer() {
    let f = start(true, 0);
    let mut rx = f.scheduler.submit_stream(n(0, false), QueueOptions::default()).unwrap();
    wait_for("a full buffer", || rx.responses.len() == STREAM_RESPONSES_BUFFERED);
    // The next response cannot be handed over until the reader takes one.
    assert_eq!(f.handed.load(Ordering::SeqCst), STREAM_RESPONSES_BUFFERED);
    assert_eq!(value(&rx.responses.recv().await.unwrap()), 0);
    wait_for("the model to go on", || f.handed.load(Ordering::SeqCst) == STREAM_RESPONSES_BUFFERED + 1);
    assert_eq!(rx.responses.len(), STREAM_RESPONSES_BUFFERED);
}

#[tokio::test]
async fn a_reader_that_goes_away_stops_the_model_and_frees_its_instance() {
    let f = start(true, 0);
    let rx = f.scheduler.submit_stream(n(0, false), QueueOptions::default()).unwrap();
    wait_for("a full buffer", || rx.responses.len() == STREAM_RESPONSES_BUFFERED);
    drop(rx);
    let (_, ended) = f.ended.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(matches!(ended, Err(ServeError::Cancelled(_))), "{ended:?}");
    wait_for("the cancellation to be counted", || f.scheduler.stats().cancelled() == 1);
    let slots = f.scheduler.stats().response_indexes();
    assert!(slots.iter().any(|(i, s)| *i == STREAM_RESPONSES_BUFFERED && s.cancel.count() == 1));
    // The one instance takes the next request.
    let mut rx = f.scheduler.submit_stream(n(0, false), QueueOptions::default()).unwrap();
    assert_eq!(value(&rx.responses.recv().await.unwrap()), 0);
}

#[tokio::test]
async fn a_batching_decoupled_model_runs_one_request_per_execution() {
    let f = start(false, 8);
    let streams: Vec<_> =
        (0..4).map(|_| f.scheduler.submit_stream(n(2, true), QueueOptions::default()).unwrap()).collect();
    for mut rx in streams {
        let mut got = Vec::new();
        while let Some(outputs) = rx.responses.recv().await {
            got.push(value(&outputs));
        }
        assert_eq!(got, vec![0, 1]);
        rx.done.await.unwrap().unwrap();
    }
    let rows: Vec<usize> = f.ended.try_iter().map(|(rows, _)| rows).collect();
    assert_eq!(rows, vec![1, 1, 1, 1]);
    assert_eq!(f.scheduler.stats().execution_count(), 4);
}

#[tokio::test]
async fn a_bounded_shutdown_ends_a_stream_waiting_for_its_reader() {
    let f = start(true, 0);
    let rx = f.scheduler.submit_stream(n(0, false), QueueOptions::default()).unwrap();
    wait_for("a full buffer", || rx.responses.len() == STREAM_RESPONSES_BUFFERED);
    // The model waits for a reader that never reads; the deadline (already passed) ends it.
    assert_eq!(f.scheduler.shutdown_by(Some(Instant::now())), 0);
    let (_, ended) = f.ended.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(matches!(&ended, Err(ServeError::Unavailable(m)) if m.contains("stopped while streaming")), "{ended:?}");
    let answer = rx.done.await.unwrap();
    assert!(matches!(answer, Err(Failed { error: ServeError::Unavailable(_), .. })), "{answer:?}");
}
