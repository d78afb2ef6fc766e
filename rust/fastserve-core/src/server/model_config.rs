//! A model version's configuration as Triton reports it: the gRPC `ModelConfig` message, and the
//! same message as JSON for `GET /v2/models/{m}[/versions/{v}]/config` (what
//! `tritonclient.http.get_model_config` reads). One builder, so both protocols always agree.

use serde_json::{json, Value};

use crate::error::Result;
use crate::proto::{
    self, model_config, model_queue_policy, ModelConfig, ModelDynamicBatching, ModelInput, ModelOutput,
    ModelQueuePolicy, ModelTransactionPolicy,
};
use crate::server::state::ServerState;
use crate::spec::TensorSpec;

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
            .map(|t| ModelInput { name: t.name.clone(), data_type: config_type(t), dims: t.dims.clone() })
            .collect(),
        output: spec
            .outputs
            .iter()
            .map(|t| ModelOutput { name: t.name.clone(), data_type: config_type(t), dims: t.dims.clone() })
            .collect(),
        scheduling_choice: spec.batching().then(|| {
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
            })
        }),
        model_transaction_policy: Some(ModelTransactionPolicy { decoupled: spec.decoupled }),
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

fn backend_of(platform: &str) -> &str {
    match platform {
        "onnxruntime_onnx" => "onnxruntime",
        other => other,
    }
}

fn config_type(t: &TensorSpec) -> i32 {
    proto::DataType::from_str_name(t.datatype.config_name()).unwrap_or(proto::DataType::TypeInvalid) as i32
}
