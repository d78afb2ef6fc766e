//! Triton's `ModelConfig` (as JSON, see [`super::table`]) → the equivalent `config.toml` table.
//! Each message takes the fields it maps; what it leaves is reported.

use serde_json::{json, Map, Value};

use super::table::{Report, Table};
use crate::tensor::datatype::DataType;

/// Triton platforms and backends fastserve serves, and the backend each becomes.
const BACKENDS: [(&str, &str); 5] = [
    ("onnxruntime_onnx", "onnxruntime"),
    ("onnxruntime", "onnxruntime"),
    ("openvino", "openvino"),
    ("python", "python"),
    ("ensemble", "ensemble"),
];

pub fn model_config(mut t: Table, model: &str, report: &mut Report) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(name) = t.take_str("name") {
        if name != model {
            report.invalid(&t.path, "name", format!("'{name}' differs from the model's directory name '{model}'"));
        }
    }
    backend(&mut t, &mut out, report);
    if let Some(n) = t.take("max_batch_size") {
        out.insert("max_batch_size".into(), n);
    }
    for (key, output) in [("input", "input"), ("output", "output")] {
        let tensors: Vec<Value> = t.take_tables(key).into_iter().map(|io| tensor(io, report)).collect();
        if !tensors.is_empty() {
            out.insert(output.into(), Value::Array(tensors));
        }
    }
    if let Some(db) = t.take_table("dynamic_batching") {
        out.insert("dynamic_batching".into(), Value::Object(dynamic_batching(db, report)));
    }
    if let Some(sb) = t.take_table("sequence_batching") {
        out.insert("sequence_batching".into(), Value::Object(sequence_batching(sb, report)));
    }
    if let Some(mut es) = t.take_table("ensemble_scheduling") {
        let steps: Vec<Value> = es.take_tables("step").into_iter().map(|s| ensemble_step(s, report)).collect();
        es.finish(report);
        out.insert("ensemble".into(), json!({ "step": steps }));
    }
    instance_group(&mut t, &mut out, report);
    if let Some(vp) = t.take_table("version_policy") {
        out.insert("version_policy".into(), Value::Object(version_policy(vp, report)));
    }
    if let Some(Value::Object(parameters)) = t.take("parameters") {
        let mut table = Map::new();
        for (key, value) in parameters {
            // ModelParameter { string_value }: the only field; an unset one is the empty string.
            let value = value.get("string_value").cloned().unwrap_or_else(|| Value::String(String::new()));
            table.insert(key, value);
        }
        out.insert("parameters".into(), Value::Object(table));
    }
    let warmups: Vec<Value> = t.take_tables("model_warmup").into_iter().map(|w| warmup(w, report)).collect();
    if !warmups.is_empty() {
        out.insert("warmup".into(), Value::Array(warmups));
    }
    if let Some(mut policy) = t.take_table("model_transaction_policy") {
        let decoupled = policy.take_bool("decoupled");
        policy.finish(report);
        out.insert("model_transaction_policy".into(), json!({ "decoupled": decoupled }));
    }
    if let Some(file) = t.take_str("default_model_filename") {
        out.insert("default_model_filename".into(), Value::String(file));
    }
    t.finish(report);
    out
}

/// `platform` and `backend` → `backend`; both may be given, and must then agree.
fn backend(t: &mut Table, out: &mut Map<String, Value>, report: &mut Report) {
    let mut chosen: Option<&str> = None;
    for key in ["platform", "backend"] {
        let Some(name) = t.take_str(key) else { continue };
        match BACKENDS.iter().find(|(triton, _)| *triton == name) {
            Some((_, ours)) if chosen.is_some_and(|c| c != *ours) => {
                report.invalid(&t.path, key, format!("'{name}' contradicts platform '{}'", chosen.unwrap_or_default()))
            }
            Some((_, ours)) => chosen = Some(ours),
            None => report.invalid(
                &t.path,
                key,
                format!(
                    "'{name}' is not served by fastserve (it serves platform onnxruntime_onnx and ensemble, and the \
                     onnxruntime, openvino and python backends)"
                ),
            ),
        }
    }
    if let Some(backend) = chosen {
        out.insert("backend".into(), Value::String(backend.into()));
    }
}

/// `TYPE_FP32` → `FP32` (`TYPE_STRING` → `BYTES`).
fn datatype(t: &mut Table, key: &str, report: &mut Report) -> Option<String> {
    let name = t.take_str(key).unwrap_or_else(|| "TYPE_INVALID".into());
    match DataType::ALL.into_iter().find(|d| d.config_name() == name) {
        Some(d) => Some(d.as_str().to_string()),
        None => {
            report.invalid(&t.path, key, format!("{name} is not a datatype fastserve serves"));
            None
        }
    }
}

fn tensor(mut io: Table, report: &mut Report) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), Value::String(io.take_str("name").unwrap_or_default()));
    if let Some(d) = datatype(&mut io, "data_type", report) {
        out.insert("datatype".into(), Value::String(d));
    }
    out.insert("dims".into(), io.take("dims").unwrap_or_else(|| json!([])));
    if let Some(mut reshape) = io.take_table("reshape") {
        out.insert("reshape".into(), reshape.take("shape").unwrap_or_else(|| json!([])));
        reshape.finish(report);
    }
    if io.take_bool("optional") {
        out.insert("optional".into(), Value::Bool(true));
    }
    io.finish(report);
    Value::Object(out)
}

fn dynamic_batching(mut db: Table, report: &mut Report) -> Map<String, Value> {
    let mut out = Map::new();
    let renamed = [
        ("preferred_batch_size", "preferred_batch_sizes"),
        ("max_queue_delay_microseconds", "max_queue_delay_us"),
        ("priority_levels", "priority_levels"),
        ("default_priority_level", "default_priority_level"),
    ];
    for (triton, ours) in renamed {
        if let Some(v) = db.take(triton) {
            out.insert(ours.into(), v);
        }
    }
    if let Some(mut policy) = db.take_table("default_queue_policy") {
        if let Some(action) = policy.take_str("timeout_action") {
            // REJECT is the default (never written); DELAY would run expired requests late.
            report.invalid(
                &policy.path,
                "timeout_action",
                format!("{action} is not supported (expired requests are rejected)"),
            );
        }
        if let Some(v) = policy.take("default_timeout_microseconds") {
            out.insert("default_queue_timeout_us".into(), v);
        }
        if let Some(v) = policy.take("max_queue_size") {
            out.insert("max_queue_size".into(), v);
        }
        // Requests may always set their own timeout (`parameters.timeout`).
        policy.take_bool("allow_timeout_override");
        policy.finish(report);
    }
    db.finish(report);
    out
}

fn sequence_batching(mut sb: Table, report: &mut Report) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(v) = sb.take("max_sequence_idle_microseconds") {
        out.insert("max_sequence_idle_microseconds".into(), v);
    }
    for strategy in ["direct", "oldest"] {
        let Some(mut s) = sb.take_table(strategy) else { continue };
        let mut table = Map::new();
        let keys: &[&str] = if strategy == "direct" {
            &["max_queue_delay_microseconds", "minimum_slot_utilization"]
        } else {
            &["max_candidate_sequences", "preferred_batch_size", "max_queue_delay_microseconds"]
        };
        for key in keys {
            if let Some(v) = s.take(key) {
                table.insert((*key).into(), v);
            }
        }
        // fastserve's oldest strategy always answers a sequence's requests in order.
        s.take_bool("preserve_ordering");
        s.finish(report);
        out.insert("strategy".into(), Value::String(strategy.into()));
        out.insert(strategy.into(), Value::Object(table));
    }
    let controls: Vec<Value> = sb
        .take_tables("control_input")
        .into_iter()
        .map(|mut ci| {
            let name = ci.take_str("name").unwrap_or_default();
            let control: Vec<Value> = ci.take_tables("control").into_iter().map(|c| control(c, report)).collect();
            ci.finish(report);
            json!({ "name": name, "control": control })
        })
        .collect();
    if !controls.is_empty() {
        out.insert("control_input".into(), Value::Array(controls));
    }
    let states: Vec<Value> = sb.take_tables("state").into_iter().map(|s| state(s, report)).collect();
    if !states.is_empty() {
        out.insert("state".into(), Value::Array(states));
    }
    sb.finish(report);
    out
}

fn control(mut c: Table, report: &mut Report) -> Value {
    // CONTROL_SEQUENCE_START is the enum's default, so never written.
    let kind = c.take_str("kind").unwrap_or_else(|| "CONTROL_SEQUENCE_START".into());
    let mut out = Map::new();
    out.insert("kind".into(), Value::String(kind));
    for key in ["int32_false_true", "fp32_false_true", "bool_false_true"] {
        if let Some(v) = c.take(key) {
            out.insert(key.into(), v);
        }
    }
    if let Some(d) = c.take_str("data_type") {
        out.insert("data_type".into(), Value::String(d));
    }
    c.finish(report);
    Value::Object(out)
}

fn state(mut s: Table, report: &mut Report) -> Value {
    let mut out = Map::new();
    for key in ["input_name", "output_name"] {
        out.insert(key.into(), Value::String(s.take_str(key).unwrap_or_default()));
    }
    out.insert("data_type".into(), Value::String(s.take_str("data_type").unwrap_or_else(|| "TYPE_INVALID".into())));
    out.insert("dims".into(), s.take("dims").unwrap_or_else(|| json!([])));
    let mut initial = s.take_tables("initial_state");
    if initial.len() > 1 {
        report.invalid(&s.path, "initial_state", "fastserve takes one initial state per state");
    }
    if let Some(mut first) = initial.drain(..).next() {
        let mut table = Map::new();
        if let Some(name) = first.take_str("name") {
            table.insert("name".into(), Value::String(name));
        }
        if first.take_bool("zero_data") {
            table.insert("zero_data".into(), Value::Bool(true));
        }
        // The state's own type and shape, restated.
        first.take("data_type");
        first.take("dims");
        first.finish(report);
        out.insert("initial_state".into(), Value::Object(table));
    }
    s.finish(report);
    Value::Object(out)
}

fn ensemble_step(mut s: Table, report: &mut Report) -> Value {
    let mut out = Map::new();
    out.insert("model_name".into(), Value::String(s.take_str("model_name").unwrap_or_default()));
    if let Some(v) = s.take("model_version") {
        out.insert("model_version".into(), v);
    }
    for key in ["input_map", "output_map"] {
        if let Some(v) = s.take(key) {
            out.insert(key.into(), v);
        }
    }
    s.finish(report);
    Value::Object(out)
}

/// One `instance_group` (fastserve serves one group per model version).
fn instance_group(t: &mut Table, out: &mut Map<String, Value>, report: &mut Report) {
    let groups = t.take_tables("instance_group");
    if groups.len() > 1 {
        report.invalid(
            &t.path,
            "instance_group",
            format!("fastserve serves one instance group, found {}", groups.len()),
        );
    }
    let Some(mut g) = groups.into_iter().next() else { return };
    let mut table = Map::new();
    // A group's name only labels it.
    g.take("name");
    if let Some(count) = g.take("count") {
        table.insert("count".into(), count);
    }
    let gpus = g.take("gpus");
    // KIND_AUTO (the default, never written): the GPUs listed, else the CPU.
    let kind = match g.take_str("kind").as_deref() {
        None | Some("KIND_AUTO") => {
            if gpus.is_some() {
                "gpu"
            } else {
                "cpu"
            }
        }
        Some("KIND_CPU") => "cpu",
        Some("KIND_GPU") => "gpu",
        Some(other) => {
            report.invalid(&g.path, "kind", format!("{other} is not supported (KIND_CPU, KIND_GPU, KIND_AUTO are)"));
            "cpu"
        }
    };
    table.insert("kind".into(), Value::String(kind.into()));
    if let Some(gpus) = gpus {
        table.insert("gpus".into(), gpus);
    }
    g.finish(report);
    out.insert("instance_group".into(), Value::Object(table));
}

fn version_policy(mut vp: Table, report: &mut Report) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(mut latest) = vp.take_table("latest") {
        out.insert("latest".into(), latest.take("num_versions").unwrap_or_else(|| json!(0)));
        latest.finish(report);
    }
    if let Some(all) = vp.take_table("all") {
        out.insert("all".into(), Value::Bool(true));
        all.finish(report);
    }
    if let Some(mut specific) = vp.take_table("specific") {
        out.insert("specific".into(), specific.take("versions").unwrap_or_else(|| json!([])));
        specific.finish(report);
    }
    vp.finish(report);
    out
}

/// `model_warmup` → `[[warmup]]`: one data kind (all zero or all random) per sample.
fn warmup(mut w: Table, report: &mut Report) -> Value {
    let mut out = Map::new();
    w.take("name");
    for key in ["batch_size", "count"] {
        if let Some(v) = w.take(key) {
            out.insert(key.into(), v);
        }
    }
    let mut dims = Map::new();
    let mut kinds = Vec::new();
    if let Some(Value::Object(inputs)) = w.take("inputs") {
        for (name, input) in inputs {
            let Value::Object(map) = input else { continue };
            let mut input = Table::new(map, w.path.join("inputs").join(&name));
            input.take("data_type");
            if let Some(d) = input.take("dims") {
                dims.insert(name.clone(), d);
            }
            if input.take_bool("zero_data") {
                kinds.push("zero");
            } else if input.take_bool("random_data") {
                kinds.push("random");
            }
            input.finish(report);
        }
    }
    kinds.sort_unstable();
    kinds.dedup();
    match kinds.as_slice() {
        [] | ["zero"] => {
            out.insert("data".into(), json!("zero"));
        }
        ["random"] => {
            out.insert("data".into(), json!("random"));
        }
        _ => report.invalid(
            &w.path,
            "inputs",
            "fastserve fills a warmup sample's inputs all with zeros or all at random",
        ),
    }
    if !dims.is_empty() {
        out.insert("dims".into(), Value::Object(dims));
    }
    w.finish(report);
    Value::Object(out)
}
