//! The sequence batcher: slots and empty-slot padding (direct), one request in flight per
//! sequence in arrival order (oldest, several instances), implicit state, idle release.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::request::{Failed, SequenceId, SequenceTag};
use crate::spec::TensorSpec;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

fn ints(t: &Tensor) -> Vec<i32> {
    let TensorData::Raw(b) = &t.data else { unreachable!() };
    b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn int_tensor(name: &str, shape: Vec<usize>, values: &[i32]) -> Tensor {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(name, DataType::Int32, shape, TensorData::Raw(data.into())).unwrap()
}

/// Reports each batch's START, READY and X columns; adds X to the state TOTAL; can hold the
/// first batch on a gate.
struct Recorder {
    seen: crossbeam_channel::Sender<(Vec<i32>, Vec<i32>, Vec<i32>)>,
    gate: Option<crossbeam_channel::Receiver<()>>,
}

impl Instance for Recorder {
    fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
        let by = |n: &str| inputs.iter().find(|t| t.name == n).unwrap();
        let (x, total) = (ints(by("X")), ints(by("TOTAL_IN")));
        let _ = self.seen.send((ints(by("START")), ints(by("READY")), x.clone()));
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        let sums: Vec<i32> = x.iter().zip(&total).map(|(a, b)| a + b).collect();
        let rows = x.len();
        Ok(vec![int_tensor("SUM", vec![rows, 1], &sums), int_tensor("TOTAL_OUT", vec![rows, 1], &sums)])
    }
}

fn config(strategy: &str, idle_us: u64) -> SequenceConfig {
    with_direct(strategy, idle_us, serde_json::json!({}))
}

fn with_direct(strategy: &str, idle_us: u64, direct: serde_json::Value) -> SequenceConfig {
    serde_json::from_value(serde_json::json!({
        "strategy": strategy,
        "direct": direct,
        "max_sequence_idle_microseconds": idle_us,
        "control_input": [
            {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
            {"name": "READY", "control": [{"kind": "CONTROL_SEQUENCE_READY", "int32_false_true": [0, 1]}]},
        ],
        "state": [{"input_name": "TOTAL_IN", "output_name": "TOTAL_OUT", "data_type": "TYPE_INT32", "dims": [1]}],
    }))
    .unwrap()
}

type Seen = crossbeam_channel::Receiver<(Vec<i32>, Vec<i32>, Vec<i32>)>;

type Started = (Arc<Scheduler>, Seen, crossbeam_channel::Sender<()>);

fn start(strategy: &str, instances: usize, idle_us: u64, gated: bool) -> Started {
    start_with(config(strategy, idle_us), instances, gated)
}

fn start_with(sequence: SequenceConfig, instances: usize, gated: bool) -> Started {
    let spec = Arc::new(ModelSpec {
        name: "acc".into(),
        version: 1,
        platform: "test".into(),
        max_batch_size: 4,
        decoupled: false,
        inputs: vec![TensorSpec::new("X", DataType::Int32, vec![1])],
        outputs: vec![TensorSpec::new("SUM", DataType::Int32, vec![1])],
    });
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
    let instances: Vec<Box<dyn Instance>> = (0..instances)
        .map(|i| {
            let gate = (gated && i == 0).then(|| gate_rx.clone());
            Box::new(Recorder { seen: seen_tx.clone(), gate }) as Box<dyn Instance>
        })
        .collect();
    let mut cfg = SchedulerConfig::new(
        plan::BatchPolicy { max_batch_size: 4, max_queue_delay: Duration::ZERO, preferred_batch_sizes: vec![] },
        100,
    );
    cfg.sequence = Some(sequence);
    (Scheduler::start(spec, cfg, instances).unwrap(), seen, gate_tx)
}

fn submit(s: &Scheduler, seq: u64, x: i32, start: bool, end: bool) -> oneshot::Receiver<Reply> {
    let request = ValidatedRequest { inputs: vec![int_tensor("X", vec![1, 1], &[x])], rows: 1 };
    let tag = SequenceTag { id: SequenceId::Number(seq), start, end };
    s.submit_with(request, QueueOptions { sequence: Some(tag), ..Default::default() }).unwrap()
}

async fn sum(reply: oneshot::Receiver<Reply>) -> i32 {
    ints(&reply.await.unwrap().unwrap().outputs[0])[0]
}

#[tokio::test]
async fn direct_slots_batch_sequences_and_pad_empty_slots_as_not_ready() {
    let (s, seen, gate) = start("direct", 1, 1_000_000, true);
    let a1 = submit(&s, 1, 10, true, false);
    assert_eq!(seen.recv_timeout(Duration::from_secs(60)).unwrap(), (vec![1], vec![1], vec![10]));
    // While the first batch is held, sequence 1's next request and sequence 2's first queue up.
    let (a2, b1) = (submit(&s, 1, 5, false, false), submit(&s, 2, 100, true, false));
    gate.send(()).unwrap();
    assert_eq!(sum(a1).await, 10);
    assert_eq!(seen.recv_timeout(Duration::from_secs(60)).unwrap(), (vec![0, 1], vec![1, 1], vec![5, 100]));
    assert_eq!((sum(a2).await, sum(b1).await), (15, 100));
    // Only sequence 2 (slot 1) has a request: slot 0 is an empty row, not ready.
    let b2 = submit(&s, 2, 1, false, true);
    assert_eq!(seen.recv_timeout(Duration::from_secs(60)).unwrap(), (vec![0, 0], vec![0, 1], vec![0, 1]));
    assert_eq!(sum(b2).await, 101);
}

#[tokio::test]
async fn oldest_runs_each_sequence_in_order_across_instances() {
    let (s, _seen, _gate) = start("oldest", 3, 1_000_000, false);
    let mut replies = Vec::new();
    for step in 0..10 {
        for seq in 1..=5u64 {
            replies.push((seq, submit(&s, seq, step + seq as i32, step == 0, step == 9)));
        }
    }
    let mut totals = [0i32; 6];
    for (seq, reply) in replies {
        let got = sum(reply).await;
        // Each answer is the running total: steps ran in order with the state of the one before.
        assert!(got > totals[seq as usize], "sequence {seq}: {got} after {}", totals[seq as usize]);
        totals[seq as usize] = got;
    }
    for seq in 1..=5i32 {
        assert_eq!(totals[seq as usize], (0..10).map(|step| step + seq).sum::<i32>());
    }
    // Released once their END requests ran.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.stats().active_sequences() != 0 {
        assert!(Instant::now() < deadline, "the ended sequences were never released");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn an_idle_sequence_is_released_and_a_late_request_is_refused() {
    let (s, _seen, _gate) = start("direct", 1, 1_000, false);
    assert_eq!(sum(submit(&s, 7, 3, true, false)).await, 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.stats().sequences_idle_released() == 0 {
        assert!(Instant::now() < deadline, "the sequence was never released");
        std::thread::sleep(Duration::from_millis(1));
    }
    let late = submit(&s, 7, 1, false, false).await.unwrap();
    assert!(
        matches!(&late, Err(Failed { error: ServeError::BadRequest(m), .. }) if m.contains("not active")),
        "{late:?}"
    );
}

#[tokio::test]
async fn direct_waits_for_its_minimum_slot_utilization() {
    let direct = serde_json::json!({"max_queue_delay_microseconds": 3_600_000_000u64, "minimum_slot_utilization": 1.0});
    let (s, seen, _gate) = start_with(with_direct("direct", 1_000_000, direct), 1, false);
    let replies: Vec<_> = (1..=4).map(|seq| submit(&s, seq, seq as i32, true, true)).collect();
    // Nothing runs until all four slots have a request (the delay is an hour): one full batch.
    assert_eq!(seen.recv_timeout(Duration::from_secs(60)).unwrap(), (vec![1; 4], vec![1; 4], vec![1, 2, 3, 4]));
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(sum(reply).await, i as i32 + 1);
    }
}
