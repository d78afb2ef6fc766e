//! A model version's configuration as Triton reports it: the gRPC `ModelConfig` message, and the
//! same message as JSON for `GET /v2/models/{m}[/versions/{v}]/config` (what
//! `tritonclient.http.get_model_config` reads). One builder, so both protocols always agree.

use serde_json::{json, Value};

use crate::error::Result;
use crate::proto::{
    self, model_config, model_ensembling, model_queue_policy, model_sequence_batching, ModelConfig,
    ModelDynamicBatching, ModelEnsembling, ModelInput, ModelOutput, ModelQueuePolicy, ModelSequenceBatching,
    ModelTransactionPolicy,
};
use crate::scheduler::sequence::config::{ControlKind, Strategy};
use crate::scheduler::SequenceConfig;
use crate::server::state::ServerState;
use crate::spec::TensorSpec;
use crate::tensor::datatype::DataType;

/// The configuration of the version `version` names (or the one unversioned requests reach).
pub fn build(state: &ServerState, name: &str, version: Option<&str>) -> Result<ModelConfig> {
    let mv = state.registry.resolve(name, version)?;
    let scheduler = mv.scheduler()?;
    let spec = scheduler.spec();
    let config = scheduler.config();
    let policy = &config.policy;
    let saturating = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Ok(ModelConfig {
        name: spec.name.clone(),
        platform: spec.platform.clone(),
        backend: backend_of(&spec.platform).to_string(),
        max_batch_size: saturating(spec.max_batch_size),
        input: spec
            .inputs
            .iter()
            .map(|t| ModelInput {
                name: t.name.clone(),
                data_type: config_type(t),
                dims: t.dims.clone(),
                ..Default::default()
            })
            .collect(),
        output: spec
            .outputs
            .iter()
            .map(|t| ModelOutput {
                name: t.name.clone(),
                data_type: config_type(t),
                dims: t.dims.clone(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: if let Some(ensemble) = &config.ensemble {
            Some(model_config::SchedulingChoice::EnsembleScheduling(ModelEnsembling {
                step: ensemble
                    .step
                    .iter()
                    .map(|s| model_ensembling::Step {
                        model_name: s.model_name.clone(),
                        model_version: s.model_version,
                        input_map: s.input_map.clone().into_iter().collect(),
                        output_map: s.output_map.clone().into_iter().collect(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }))
        } else if let Some(sequence) = &config.sequence {
            Some(model_config::SchedulingChoice::SequenceBatching(sequence_batching(sequence)))
        } else {
            spec.batching().then(|| {
                model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                    preferred_batch_size: policy.preferred_batch_sizes.iter().map(|&n| saturating(n)).collect(),
                    max_queue_delay_microseconds: micros(policy.max_queue_delay),
                    priority_levels: config.priority_levels,
                    default_priority_level: config.default_priority_level,
                    default_queue_policy: Some(ModelQueuePolicy {
                        // Expired requests are refused, never run late; requests may set their own.
                        timeout_action: model_queue_policy::TimeoutAction::Reject as i32,
                        default_timeout_microseconds: config.default_queue_timeout.map_or(0, micros),
                        allow_timeout_override: true,
                        max_queue_size: u32::try_from(config.max_queue_size).unwrap_or(u32::MAX),
                    }),
                    ..Default::default()
                })
            })
        },
        model_transaction_policy: Some(ModelTransactionPolicy { decoupled: spec.decoupled }),
        ..Default::default()
    })
}

/// Triton's JSON form of the message: enum values by name, 64-bit integers as numbers.
pub fn to_json(c: &ModelConfig) -> Value {
    let tensor = |name: &str, data_type: i32, dims: &[i64]| {
        let data_type = proto::DataType::try_from(data_type).map_or("TYPE_INVALID", |t| t.as_str_name());
        json!({"name": name, "data_type": data_type, "dims": dims})
    };
    let mut out = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|t| tensor(&t.name, t.data_type, &t.dims)).collect::<Vec<_>>(),
        "output": c.output.iter().map(|t| tensor(&t.name, t.data_type, &t.dims)).collect::<Vec<_>>(),
    });
    if let Some(policy) = &c.model_transaction_policy {
        out["model_transaction_policy"] = json!({ "decoupled": policy.decoupled });
    }
    if let Some(model_config::SchedulingChoice::EnsembleScheduling(e)) = &c.scheduling_choice {
        let steps: Vec<Value> = e
            .step
            .iter()
            .map(|s| {
                fn sorted(
                    m: &std::collections::HashMap<String, String>,
                ) -> std::collections::BTreeMap<&String, &String> {
                    m.iter().collect()
                }
                json!({
                    "model_name": s.model_name,
                    "model_version": s.model_version,
                    "input_map": sorted(&s.input_map),
                    "output_map": sorted(&s.output_map),
                })
            })
            .collect();
        out["ensemble_scheduling"] = json!({ "step": steps });
    }
    if let Some(model_config::SchedulingChoice::SequenceBatching(b)) = &c.scheduling_choice {
        out["sequence_batching"] = sequence_json(b);
    }
    if let Some(model_config::SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice {
        let queue = b.default_queue_policy.as_ref().map(|q| {
            json!({
                "timeout_action": model_queue_policy::TimeoutAction::try_from(q.timeout_action)
                    .map_or("REJECT", |a| a.as_str_name()),
                "default_timeout_microseconds": q.default_timeout_microseconds,
                "allow_timeout_override": q.allow_timeout_override,
                "max_queue_size": q.max_queue_size,
            })
        });
        out["dynamic_batching"] = json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
            "priority_levels": b.priority_levels,
            "default_priority_level": b.default_priority_level,
            "default_queue_policy": queue,
        });
    }
    out
}

/// The `[sequence_batching]` settings in Triton's message shape.
fn sequence_batching(s: &SequenceConfig) -> ModelSequenceBatching {
    use model_sequence_batching::{control, Control, ControlInput, InitialState, State, StrategyChoice};
    let kind = |k: ControlKind| match k {
        ControlKind::Start => control::Kind::ControlSequenceStart,
        ControlKind::Ready => control::Kind::ControlSequenceReady,
        ControlKind::End => control::Kind::ControlSequenceEnd,
        ControlKind::CorrId => control::Kind::ControlSequenceCorrid,
    };
    let strategy = match s.strategy {
        Strategy::Direct => StrategyChoice::Direct(model_sequence_batching::StrategyDirect {
            max_queue_delay_microseconds: s.direct.max_queue_delay_microseconds,
            minimum_slot_utilization: s.direct.minimum_slot_utilization,
        }),
        Strategy::Oldest => StrategyChoice::Oldest(model_sequence_batching::StrategyOldest {
            max_candidate_sequences: i32::try_from(s.oldest.max_candidate_sequences).unwrap_or(i32::MAX),
            preferred_batch_size: s
                .oldest
                .preferred_batch_size
                .iter()
                .map(|&n| i32::try_from(n).unwrap_or(i32::MAX))
                .collect(),
            max_queue_delay_microseconds: s.oldest.max_queue_delay_microseconds,
            preserve_ordering: true,
        }),
    };
    ModelSequenceBatching {
        strategy_choice: Some(strategy),
        max_sequence_idle_microseconds: s.max_sequence_idle_microseconds,
        control_input: s
            .control_input
            .iter()
            .map(|c| ControlInput {
                name: c.name.clone(),
                control: c
                    .control
                    .iter()
                    .map(|k| Control {
                        kind: kind(k.kind) as i32,
                        int32_false_true: k.int32_false_true.clone(),
                        fp32_false_true: k.fp32_false_true.clone(),
                        bool_false_true: k.bool_false_true.clone(),
                        data_type: k.data_type.as_deref().map_or(0, type_number),
                    })
                    .collect(),
            })
            .collect(),
        state: s
            .state
            .iter()
            .map(|st| State {
                input_name: st.input_name.clone(),
                output_name: st.output_name.clone(),
                data_type: type_number(&st.data_type),
                dims: st.dims.clone(),
                initial_state: vec![InitialState {
                    data_type: type_number(&st.data_type),
                    dims: st.dims.clone(),
                    name: st.initial_state.name.clone().unwrap_or_default(),
                    state_data: st
                        .initial_state
                        .fill
                        .is_none()
                        .then_some(model_sequence_batching::initial_state::StateData::ZeroData(true)),
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A `TYPE_*` (or V2) datatype name as the proto enum's number.
fn type_number(name: &str) -> i32 {
    DataType::ALL
        .into_iter()
        .find(|d| d.config_name() == name || d.as_str() == name)
        .and_then(|d| proto::DataType::from_str_name(d.config_name()))
        .unwrap_or(proto::DataType::TypeInvalid) as i32
}

fn sequence_json(b: &ModelSequenceBatching) -> Value {
    use model_sequence_batching::{control, StrategyChoice};
    let type_name = |t: i32| proto::DataType::try_from(t).map_or("TYPE_INVALID", |t| t.as_str_name());
    let mut out = json!({
        "max_sequence_idle_microseconds": b.max_sequence_idle_microseconds,
        "control_input": b.control_input.iter().map(|c| json!({
            "name": c.name,
            "control": c.control.iter().map(|k| json!({
                "kind": control::Kind::try_from(k.kind).map_or("CONTROL_SEQUENCE_START", |k| k.as_str_name()),
                "int32_false_true": k.int32_false_true,
                "fp32_false_true": k.fp32_false_true,
                "bool_false_true": k.bool_false_true,
                "data_type": type_name(k.data_type),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "state": b.state.iter().map(|s| json!({
            "input_name": s.input_name,
            "output_name": s.output_name,
            "data_type": type_name(s.data_type),
            "dims": s.dims,
            "initial_state": s.initial_state.iter().map(|i| json!({
                "data_type": type_name(i.data_type),
                "dims": i.dims,
                "name": i.name,
                "zero_data": matches!(i.state_data, Some(model_sequence_batching::initial_state::StateData::ZeroData(true))),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    match &b.strategy_choice {
        Some(StrategyChoice::Oldest(o)) => {
            out["oldest"] = json!({
                "max_candidate_sequences": o.max_candidate_sequences,
                "preferred_batch_size": o.preferred_batch_size,
                "max_queue_delay_microseconds": o.max_queue_delay_microseconds,
                "preserve_ordering": o.preserve_ordering,
            });
        }
        Some(StrategyChoice::Direct(d)) => {
            out["direct"] = json!({
                "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
                "minimum_slot_utilization": d.minimum_slot_utilization,
            });
        }
        None => {}
    }
    out
}

fn backend_of(platform: &str) -> &str {
    match platform {
        "onnxruntime_onnx" => "onnxruntime",
        other => other,
    }
}

fn config_type(t: &TensorSpec) -> i32 {
    proto::DataType::from_str_name(t.datatype.config_name()).unwrap_or(proto::DataType::TypeInvalid) as i32
}
