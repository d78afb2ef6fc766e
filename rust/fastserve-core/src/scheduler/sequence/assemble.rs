//! A sequence batch's tensors: the requests' inputs row by row (empty slots zero-filled), the
//! control inputs (START, END, READY, CORRID per row) and the implicit state inputs; and, after
//! execution, each row's new state taken out of the model's outputs.

use bytes::{Bytes, BytesMut};
use half::f16;

use super::config::{ControlKind, ControlSpec, SequencePlan, StateSpec};
use crate::error::{Result, ServeError};
use crate::request::{SequenceId, SequenceTag};
use crate::scheduler::plan::concat_inputs;
use crate::tensor::datatype::DataType;
use crate::tensor::{Tensor, TensorData};

/// One row of a sequence batch: a request of a sequence, with the sequence's state (None: the
/// initial state), or an empty slot.
pub(in crate::scheduler) enum Row<'a> {
    Request { inputs: &'a [Tensor], tag: &'a SequenceTag, state: Option<&'a [Tensor]> },
    Empty,
}

/// The model's inputs for `rows` (at least one a request): the declared inputs, then the control
/// inputs, then the state inputs. With `batching` every tensor has the batch dimension first.
pub(in crate::scheduler) fn assemble(plan: &SequencePlan, batching: bool, rows: &[Row<'_>]) -> Result<Vec<Tensor>> {
    let template = rows
        .iter()
        .find_map(|r| match r {
            Row::Request { inputs, .. } => Some(*inputs),
            Row::Empty => None,
        })
        .ok_or_else(|| ServeError::Internal("a sequence batch without requests".into()))?;
    let padding: Vec<Tensor> = template.iter().map(zeros_like).collect();
    let per_row: Vec<&[Tensor]> = rows
        .iter()
        .map(|r| match r {
            Row::Request { inputs, .. } => *inputs,
            Row::Empty => padding.as_slice(),
        })
        .collect();
    let mut inputs = concat_inputs(&per_row)?;
    for control in &plan.controls {
        inputs.push(control_tensor(control, batching, rows)?);
    }
    for state in &plan.states {
        inputs.push(state_tensor(state, batching, rows)?);
    }
    Ok(inputs)
}

fn zeros_like(t: &Tensor) -> Tensor {
    let data = match &t.data {
        TensorData::Raw(b) => TensorData::Raw(Bytes::from(vec![0u8; b.len()])),
        TensorData::Strings(s) => TensorData::Strings(vec![Bytes::new(); s.len()]),
    };
    Tensor { name: t.name.clone(), datatype: t.datatype, shape: t.shape.clone(), data }
}

/// `v` as one little-endian element of `datatype` (saturating, as a cast).
fn element(datatype: DataType, v: f64) -> Vec<u8> {
    match datatype {
        DataType::Bool => vec![u8::from(v != 0.0)],
        DataType::Uint8 => vec![v as u8],
        DataType::Uint16 => (v as u16).to_le_bytes().to_vec(),
        DataType::Uint32 => (v as u32).to_le_bytes().to_vec(),
        DataType::Uint64 => (v as u64).to_le_bytes().to_vec(),
        DataType::Int8 => (v as i8).to_le_bytes().to_vec(),
        DataType::Int16 => (v as i16).to_le_bytes().to_vec(),
        DataType::Int32 => (v as i32).to_le_bytes().to_vec(),
        DataType::Int64 => (v as i64).to_le_bytes().to_vec(),
        DataType::Fp16 => f16::from_f64(v).to_le_bytes().to_vec(),
        DataType::Fp32 => (v as f32).to_le_bytes().to_vec(),
        DataType::Fp64 => v.to_le_bytes().to_vec(),
        DataType::Bytes => Vec::new(),
    }
}

fn shape(batching: bool, rows: usize, dims: &[usize]) -> Vec<usize> {
    let mut shape = Vec::with_capacity(dims.len() + 1);
    if batching {
        shape.push(rows);
    }
    shape.extend_from_slice(dims);
    shape
}

fn control_tensor(c: &ControlSpec, batching: bool, rows: &[Row<'_>]) -> Result<Tensor> {
    let dims = shape(batching, rows.len(), &[1]);
    if c.kind == ControlKind::CorrId {
        return corrid_tensor(c, dims, rows);
    }
    let mut buf = BytesMut::new();
    for row in rows {
        let on = match row {
            Row::Empty => false,
            Row::Request { tag, .. } => match c.kind {
                ControlKind::Start => tag.start,
                ControlKind::End => tag.end,
                ControlKind::Ready | ControlKind::CorrId => true,
            },
        };
        buf.extend_from_slice(&element(c.datatype, c.false_true[usize::from(on)]));
    }
    Tensor::new(c.input.clone(), c.datatype, dims, TensorData::Raw(buf.freeze()))
}

fn corrid_tensor(c: &ControlSpec, dims: Vec<usize>, rows: &[Row<'_>]) -> Result<Tensor> {
    let ids = rows.iter().map(|r| match r {
        Row::Request { tag, .. } => Some(&tag.id),
        Row::Empty => None,
    });
    let data = if c.datatype == DataType::Bytes {
        TensorData::Strings(
            ids.map(|id| match id {
                Some(SequenceId::Text(s)) => Bytes::from(s.clone()),
                Some(SequenceId::Number(n)) => Bytes::from(n.to_string()),
                None => Bytes::new(),
            })
            .collect(),
        )
    } else {
        let mut buf = BytesMut::new();
        for id in ids {
            let n = match id {
                Some(SequenceId::Number(n)) => *n,
                None => 0,
                Some(SequenceId::Text(s)) => {
                    return Err(ServeError::bad_request(format!(
                        "sequence id '{s}' is a string, but control input '{}' takes {} ids",
                        c.input, c.datatype
                    )))
                }
            };
            let bytes = match c.datatype {
                DataType::Uint32 | DataType::Int32 => {
                    u32::try_from(n).map_err(|_| too_large(n, c))?.to_le_bytes().to_vec()
                }
                _ => n.to_le_bytes().to_vec(),
            };
            buf.extend_from_slice(&bytes);
        }
        TensorData::Raw(buf.freeze())
    };
    Tensor::new(c.input.clone(), c.datatype, dims, data)
}

fn too_large(n: u64, c: &ControlSpec) -> ServeError {
    ServeError::bad_request(format!("sequence id {n} does not fit control input '{}' ({})", c.input, c.datatype))
}

/// A sequence's first state: zeros, or every element `fill`.
pub(in crate::scheduler) fn initial_state(s: &StateSpec) -> Tensor {
    let count: usize = s.dims.iter().product();
    let data = match s.datatype {
        DataType::Bytes => TensorData::Strings(vec![Bytes::new(); count]),
        dt => TensorData::Raw(Bytes::from(element(dt, s.fill).repeat(count))),
    };
    Tensor { name: s.input.clone(), datatype: s.datatype, shape: s.dims.clone(), data }
}

fn state_tensor(s: &StateSpec, batching: bool, rows: &[Row<'_>]) -> Result<Tensor> {
    let initial = initial_state(s);
    let per_row: Vec<&Tensor> = rows
        .iter()
        .map(|r| match r {
            Row::Request { tag, state: Some(state), .. } if !tag.start => {
                state.iter().find(|t| t.name == s.input).unwrap_or(&initial)
            }
            _ => &initial,
        })
        .collect();
    let data = match s.datatype {
        DataType::Bytes => TensorData::Strings(
            per_row
                .iter()
                .flat_map(|t| match &t.data {
                    TensorData::Strings(v) => v.clone(),
                    TensorData::Raw(_) => Vec::new(),
                })
                .collect(),
        ),
        _ => {
            let mut buf = BytesMut::new();
            for t in &per_row {
                if let TensorData::Raw(b) = &t.data {
                    buf.extend_from_slice(b);
                }
            }
            TensorData::Raw(buf.freeze())
        }
    };
    Tensor::new(s.input.clone(), s.datatype, shape(batching, rows.len(), &s.dims), data)
        .map_err(|e| ServeError::Internal(format!("state '{}': {e}", s.input)))
}

/// Takes the state outputs out of a batch's `outputs` and returns each row's new state (named
/// as the state inputs, without the batch dimension). A missing or misshapen state output is the
/// model's fault.
pub(in crate::scheduler) fn take_states(
    plan: &SequencePlan,
    batching: bool,
    rows: usize,
    outputs: &mut Vec<Tensor>,
    model: &str,
) -> Result<Vec<Vec<Tensor>>> {
    let mut per_row: Vec<Vec<Tensor>> = (0..rows).map(|_| Vec::with_capacity(plan.states.len())).collect();
    for s in &plan.states {
        let at = outputs.iter().position(|t| t.name == s.output).ok_or_else(|| {
            ServeError::ModelError(format!("model '{model}' did not return state output '{}'", s.output))
        })?;
        let t = outputs.swap_remove(at);
        let expected = shape(batching, rows, &s.dims);
        if t.datatype != s.datatype || t.shape != expected {
            return Err(ServeError::ModelError(format!(
                "model '{model}' returned state output '{}' as {} {:?}, but the state is {} {:?}",
                s.output, t.datatype, t.shape, s.datatype, expected
            )));
        }
        for (r, row) in per_row.iter_mut().enumerate() {
            let mut one = if batching { t.slice_rows(r, 1)? } else { t.clone() };
            one.shape = s.dims.clone();
            one.name = s.input.clone();
            row.push(one);
        }
    }
    Ok(per_row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::sequence::config::{SequenceConfig, Strategy};
    use std::time::Duration;

    fn plan() -> SequencePlan {
        SequencePlan {
            idle: Duration::from_secs(1),
            strategy: Strategy::Direct,
            max_candidates: 8,
            preferred: vec![],
            max_queue_delay: Duration::ZERO,
            direct_delay: Duration::ZERO,
            min_slot_utilization: 0.0,
            controls: vec![
                ControlSpec {
                    input: "START".into(),
                    kind: ControlKind::Start,
                    datatype: DataType::Int32,
                    false_true: [0.0, 1.0],
                },
                ControlSpec {
                    input: "READY".into(),
                    kind: ControlKind::Ready,
                    datatype: DataType::Fp32,
                    false_true: [0.0, 1.0],
                },
                ControlSpec {
                    input: "CORRID".into(),
                    kind: ControlKind::CorrId,
                    datatype: DataType::Uint64,
                    false_true: [0.0, 1.0],
                },
            ],
            states: vec![StateSpec {
                input: "S_IN".into(),
                output: "S_OUT".into(),
                datatype: DataType::Int32,
                dims: vec![2],
                fill: 7.0,
            }],
        }
    }

    fn ints(t: &Tensor) -> Vec<i64> {
        let TensorData::Raw(b) = &t.data else { panic!() };
        match t.datatype {
            DataType::Int32 => b.chunks(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect(),
            DataType::Fp32 => b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DataType::Uint64 => b.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            _ => panic!(),
        }
    }

    fn x(v: i32) -> Vec<Tensor> {
        vec![Tensor::new("X", DataType::Int32, vec![1, 1], TensorData::Raw(Bytes::from(v.to_le_bytes().to_vec())))
            .unwrap()]
    }

    #[test]
    fn rows_get_their_controls_and_state_and_empty_slots_are_not_ready() {
        let plan = plan();
        let a = SequenceTag { id: SequenceId::Number(5), start: true, end: false };
        let b = SequenceTag { id: SequenceId::Number(9), start: false, end: false };
        let state = vec![Tensor::new(
            "S_IN",
            DataType::Int32,
            vec![2],
            TensorData::Raw(Bytes::from([1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())),
        )
        .unwrap()];
        let (xa, xb) = (x(10), x(20));
        let rows = [
            Row::Request { inputs: &xa, tag: &a, state: None },
            Row::Empty,
            Row::Request { inputs: &xb, tag: &b, state: Some(&state) },
        ];
        let inputs = assemble(&plan, true, &rows).unwrap();
        let by = |n: &str| inputs.iter().find(|t| t.name == n).unwrap();
        assert_eq!(ints(by("X")), vec![10, 0, 20]);
        assert_eq!(by("START").shape, vec![3, 1]);
        assert_eq!(ints(by("START")), vec![1, 0, 0]);
        assert_eq!(ints(by("READY")), vec![1, 0, 1]);
        assert_eq!(ints(by("CORRID")), vec![5, 0, 9]);
        assert_eq!(by("S_IN").shape, vec![3, 2]);
        assert_eq!(ints(by("S_IN")), vec![7, 7, 7, 7, 1, 2]);
    }

    #[test]
    fn new_states_are_taken_out_of_the_outputs_per_row() {
        let plan = plan();
        let data: Vec<u8> = [1i32, 2, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut outputs = vec![
            Tensor::new("S_OUT", DataType::Int32, vec![2, 2], TensorData::Raw(Bytes::from(data))).unwrap(),
            x(1).remove(0),
        ];
        let states = take_states(&plan, true, 2, &mut outputs, "m").unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(
            (states[1][0].name.as_str(), states[1][0].shape.clone(), ints(&states[1][0])),
            ("S_IN", vec![2], vec![3, 4])
        );
        let mut missing = vec![x(1).remove(0)];
        assert!(matches!(take_states(&plan, true, 1, &mut missing, "m"), Err(ServeError::ModelError(_))));
    }

    #[test]
    fn settings_are_checked_against_the_model() {
        use crate::spec::{ModelSpec, TensorSpec};
        let spec = ModelSpec {
            name: "m".into(),
            version: 1,
            platform: "python".into(),
            max_batch_size: 4,
            decoupled: false,
            inputs: vec![TensorSpec::new("X", DataType::Int32, vec![1])],
            outputs: vec![TensorSpec::new("Y", DataType::Int32, vec![1])],
        };
        let parse = |toml: serde_json::Value| {
            serde_json::from_value::<SequenceConfig>(toml).map_err(|e| e.to_string()).and_then(|c| c.plan(&spec))
        };
        let ok = parse(serde_json::json!({
            "strategy": "oldest",
            "oldest": {"max_candidate_sequences": 4, "preferred_batch_size": [2]},
            "control_input": [{"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]}],
            "state": [{"input_name": "S", "output_name": "S_OUT", "data_type": "TYPE_FP32", "dims": [3]}],
        }))
        .unwrap();
        assert_eq!((ok.strategy, ok.controls.len(), ok.states[0].dims.clone()), (Strategy::Oldest, 1, vec![3]));
        for (bad, says) in [
            (serde_json::json!({"strategy": "newest"}), "unknown variant"),
            (
                serde_json::json!({"control_input": [{"name": "X", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]}]}),
                "also an [[input]]",
            ),
            (
                serde_json::json!({"control_input": [{"name": "S", "control": [{"kind": "CONTROL_SEQUENCE_START"}]}]}),
                "exactly one of",
            ),
            (
                serde_json::json!({"control_input": [{"name": "S", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_FP32"}]}]}),
                "integer type",
            ),
            (
                serde_json::json!({"state": [{"input_name": "S", "output_name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]}),
                "also an [[output]]",
            ),
            (
                serde_json::json!({"state": [{"input_name": "S", "output_name": "T", "data_type": "TYPE_FP32", "dims": [-1]}]}),
                "fixed",
            ),
            (serde_json::json!({"oldest": {"preferred_batch_size": [8]}}), "preferred_batch_size"),
            (serde_json::json!({"max_sequence_idle_microseconds": 0}), "max_sequence_idle_microseconds"),
            (serde_json::json!({"bogus": 1}), "unknown field"),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
