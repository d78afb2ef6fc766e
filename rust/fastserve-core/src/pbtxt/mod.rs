//! `config.pbtxt`: Triton's model configuration, converted to the equivalent `config.toml` table so
//! a Triton model repository loads unchanged. The text format is parsed on the Python side by
//! protobuf's own implementation (prost-reflect's parser refuses Triton's `input: [ { ... } ]`
//! lists) against [`descriptors`], the descriptors of Triton's `model_config.proto` compiled into
//! the crate; the encoded message comes here. A field fastserve does not honor is an error naming
//! it; a performance-only one, a warning.

mod convert;
mod table;

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value};

use table::{Path, Report, Table};

/// The descriptor set `build.rs` writes for the generated protos.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The serialized `FileDescriptorSet` holding `inference.ModelConfig`.
pub fn descriptors() -> &'static [u8] {
    DESCRIPTORS
}

/// A `config.pbtxt` as `config.toml` would say it.
#[derive(Debug)]
pub struct Converted {
    pub table: Map<String, Value>,
    /// Performance-only fields that have no effect in fastserve, by path.
    pub warnings: Vec<String>,
}

impl Converted {
    /// The table as a `config.toml` file.
    pub fn to_toml(&self) -> Result<String, String> {
        to_toml(&self.table)
    }
}

/// A configuration table as a `config.toml` file (`fastserve convert-config`, `fastserve config`).
pub fn to_toml(table: &Map<String, Value>) -> Result<String, String> {
    toml::to_string(table).map_err(|e| format!("cannot write the configuration as TOML: {e}"))
}

fn model_config_descriptor() -> Result<MessageDescriptor, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    let pool = POOL
        .get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| format!("model_config.proto descriptors: {e}")))
        .as_ref()?;
    pool.get_message_by_name("inference.ModelConfig").ok_or_else(|| "no inference.ModelConfig descriptor".into())
}

/// Converts an encoded `inference.ModelConfig` (the `config.pbtxt` of model `model`); the error
/// lists every problem at once.
pub fn convert(encoded: &[u8], model: &str) -> Result<Converted, String> {
    let message = DynamicMessage::decode(model_config_descriptor()?, encoded)
        .map_err(|e| format!("config.pbtxt: not an encoded ModelConfig: {e}"))?;
    // Protobuf's JSON mapping with proto field names, without fields at their defaults: every key
    // present is one the file sets.
    let options = SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false);
    let json = message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| format!("config.pbtxt: {e}"))?;
    let Value::Object(map) = json else { return Err("config.pbtxt: not a message".into()) };
    let mut report = Report::default();
    let table = convert::model_config(Table::new(map, Path::default()), model, &mut report);
    let mut problems = report.invalid;
    if !report.unsupported.is_empty() {
        problems.insert(0, format!("fastserve does not support field(s) {}", report.unsupported.join(", ")));
    }
    if !problems.is_empty() {
        return Err(format!("config.pbtxt: {}", problems.join("; ")));
    }
    Ok(Converted { table, warnings: report.tuning })
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_reflect::DynamicMessage;
    use serde_json::json;

    use super::{model_config_descriptor, Converted};

    /// Parses with prost-reflect's text format, which needs `field: [ ... ]` for message lists.
    fn convert(text: &str, model: &str) -> Result<Converted, String> {
        let message = DynamicMessage::parse_text_format(model_config_descriptor()?, text).map_err(|e| e.to_string())?;
        super::convert(&message.encode_to_vec(), model)
    }

    const ADD_SUB: &str = r#"
name: "add_sub"
backend: "python"
max_batch_size: 8
input: [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_STRING dims: [ -1 ] reshape: { shape: [ ] } optional: true }
]
output: [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { default_timeout_microseconds: 5000 max_queue_size: 64 }
}
instance_group: [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest { num_versions: 2 } }
parameters { key: "mode" value: { string_value: "fast" } }
model_warmup: [ { name: "w" batch_size: 2 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"#;

    #[test]
    fn a_triton_config_becomes_its_config_toml_table() {
        let c = convert(ADD_SUB, "add_sub").unwrap();
        assert!(c.warnings.is_empty());
        assert_eq!(
            serde_json::Value::Object(c.table),
            json!({
                "backend": "python",
                "max_batch_size": 8,
                "input": [
                    {"name": "INPUT0", "datatype": "FP32", "dims": [4]},
                    {"name": "INPUT1", "datatype": "BYTES", "dims": [-1], "reshape": [], "optional": true},
                ],
                "output": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
                "dynamic_batching": {
                    "preferred_batch_sizes": [4, 8],
                    "max_queue_delay_us": 100,
                    "default_queue_timeout_us": 5000,
                    "max_queue_size": 64,
                },
                "instance_group": {"count": 2, "kind": "cpu"},
                "version_policy": {"latest": 2},
                "parameters": {"mode": "fast"},
                "warmup": [{"batch_size": 2, "data": "zero", "dims": {"INPUT0": [4]}}],
            })
        );
    }

    #[test]
    fn the_toml_form_reads_back_as_the_same_table() {
        let c = convert(ADD_SUB, "add_sub").unwrap();
        let back: serde_json::Value = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back, serde_json::Value::Object(c.table));
    }

    #[test]
    fn every_field_fastserve_does_not_honor_is_named() {
        let text = r#"
platform: "onnxruntime_onnx"
input: [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] format: FORMAT_NHWC is_shape_tensor: true } ]
batch_input: [ { kind: BATCH_ELEMENT_COUNT target_name: "N" data_type: TYPE_FP32 } ]
optimization { graph { level: 1 } }
"#;
        let e = convert(text, "m").unwrap_err();
        assert!(e.contains("input[0].format"), "{e}");
        assert!(e.contains("input[0].is_shape_tensor"), "{e}");
        assert!(e.contains("batch_input"), "{e}");
        assert!(!e.contains("optimization"), "performance-only fields warn: {e}");
    }

    #[test]
    fn performance_only_fields_are_warnings() {
        let text = "backend: \"onnxruntime\"\noptimization { graph { level: 1 } }\ninstance_group: [ { count: 1 rate_limiter { priority: 2 } } ]";
        let c = convert(text, "m").unwrap();
        assert_eq!(c.warnings, vec!["instance_group[0].rate_limiter", "optimization"]);
    }

    #[test]
    fn refusals_say_where_and_why() {
        for (text, needle) in [
            ("platform: \"tensorrt_plan\"", "'tensorrt_plan' is not served"),
            ("name: \"other\"", "differs from the model's directory name 'm'"),
            ("input: [ { name: \"X\" data_type: TYPE_BF16 } ]", "TYPE_BF16 is not a datatype"),
            ("instance_group: [ { count: 1 }, { count: 2 } ]", "one instance group, found 2"),
            ("dynamic_batching { default_queue_policy { timeout_action: DELAY } }", "DELAY is not supported"),
            ("no_such_field: 1", "no_such_field"),
        ] {
            let e = convert(text, "m").unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn sequence_batching_and_ensembles_keep_triton_names() {
        let text = r#"
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preserve_ordering: true }
  control_input: [ { name: "START" control: [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]
  state: [ { input_name: "IN" output_name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] initial_state: { data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "zeros" } } ]
}
"#;
        let c = convert(text, "m").unwrap();
        assert_eq!(
            c.table["sequence_batching"],
            json!({
                "max_sequence_idle_microseconds": 5000000,
                "strategy": "oldest",
                "oldest": {"max_candidate_sequences": 4},
                "control_input": [{"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]}],
                "state": [{"input_name": "IN", "output_name": "OUT", "data_type": "TYPE_FP32", "dims": [1],
                           "initial_state": {"name": "zeros", "zero_data": true}}],
            })
        );
        let text = r#"
platform: "ensemble"
ensemble_scheduling { step: [ { model_name: "a" model_version: -1 input_map { key: "X" value: "IN" } output_map { key: "Y" value: "MID" } } ] }
"#;
        let c = convert(text, "m").unwrap();
        assert_eq!(c.table["backend"], json!("ensemble"));
        assert_eq!(
            c.table["ensemble"],
            json!({"step": [{"model_name": "a", "model_version": -1, "input_map": {"X": "IN"}, "output_map": {"Y": "MID"}}]})
        );
    }
}
