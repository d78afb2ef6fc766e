//! `[sequence_batching]`: Triton's sequence batcher settings, with Triton's names, as `config.toml`
//! and `add_model(sequence_batching=...)` give them. Checked once against the model's interface.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::ModelSpec;
use crate::tensor::datatype::DataType;

/// How one model version batches the requests of its sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequenceConfig {
    /// A sequence with no request for this long is released (its slot freed, its state dropped).
    pub max_sequence_idle_microseconds: u64,
    /// `direct` (each sequence owns a batch slot of one instance) or `oldest`.
    pub strategy: Strategy,
    pub direct: Direct,
    pub oldest: Oldest,
    pub control_input: Vec<ControlInput>,
    pub state: Vec<State>,
}

/// A table of its own in `config.toml`, a dict for `add_model`.
impl crate::options::OptionKind for SequenceConfig {
    const KIND: &'static str = "table";
}

impl Default for SequenceConfig {
    fn default() -> Self {
        Self {
            max_sequence_idle_microseconds: 1_000_000,
            strategy: Strategy::Direct,
            direct: Direct::default(),
            oldest: Oldest::default(),
            control_input: Vec::new(),
            state: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Direct,
    Oldest,
}

/// `[sequence_batching.direct]`: how long an instance's batch may wait for more of its slots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Direct {
    /// How long the oldest ready request may wait for the batch to reach the utilization below.
    pub max_queue_delay_microseconds: u64,
    /// The share of an instance's slots (0 to 1) with a request ready before a batch is sent at once.
    pub minimum_slot_utilization: f32,
}

/// `[sequence_batching.oldest]`: batches formed from the oldest requests of the candidate
/// sequences, one request per sequence per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Oldest {
    /// Sequences batched together at most; later sequences wait until one ends.
    pub max_candidate_sequences: usize,
    /// A batch is sent as soon as it has this many rows (0: as soon as an instance is free).
    pub preferred_batch_size: Vec<usize>,
    /// How long the oldest request may wait for a fuller batch.
    pub max_queue_delay_microseconds: u64,
}

impl Default for Oldest {
    fn default() -> Self {
        Self { max_candidate_sequences: 1024, preferred_batch_size: Vec::new(), max_queue_delay_microseconds: 0 }
    }
}

/// `[[sequence_batching.control_input]]`: an input tensor the scheduler fills per batch row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlInput {
    pub name: String,
    pub control: Vec<Control>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::enum_variant_names)]
pub enum ControlKind {
    #[serde(rename = "CONTROL_SEQUENCE_START")]
    Start,
    #[serde(rename = "CONTROL_SEQUENCE_READY")]
    Ready,
    #[serde(rename = "CONTROL_SEQUENCE_END")]
    End,
    #[serde(rename = "CONTROL_SEQUENCE_CORRID")]
    CorrId,
}

/// One control: its kind and the values meaning false and true (one of the three), or the
/// datatype of the correlation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub kind: ControlKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub int32_false_true: Vec<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fp32_false_true: Vec<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bool_false_true: Vec<bool>,
    /// CORRID only: `TYPE_UINT64` (or another integer type) or `TYPE_STRING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_type: Option<String>,
}

/// `[[sequence_batching.state]]`: an implicit state the server carries from one request of a
/// sequence to the next: the model's `output_name` output becomes its `input_name` input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub input_name: String,
    pub output_name: String,
    pub data_type: String,
    /// Without the batch dimension; every dimension fixed.
    pub dims: Vec<i64>,
    #[serde(default)]
    pub initial_state: InitialState,
}

/// The state a sequence starts with: zeros (the default) or every element `fill`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitialState {
    pub name: Option<String>,
    pub zero_data: Option<bool>,
    pub fill: Option<f64>,
}

/// A control as the scheduler applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    pub input: String,
    pub kind: ControlKind,
    pub datatype: DataType,
    /// The values for false and true (unused for CORRID).
    pub false_true: [f64; 2],
}

/// A state as the scheduler applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSpec {
    pub input: String,
    pub output: String,
    pub datatype: DataType,
    pub dims: Vec<usize>,
    pub fill: f64,
}

/// The checked settings the scheduler runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencePlan {
    pub idle: Duration,
    pub strategy: Strategy,
    pub max_candidates: usize,
    pub preferred: Vec<usize>,
    pub max_queue_delay: Duration,
    /// Direct: the queue delay and slot share above.
    pub direct_delay: Duration,
    pub min_slot_utilization: f32,
    pub controls: Vec<ControlSpec>,
    pub states: Vec<StateSpec>,
}

/// Triton's `TYPE_*` name, or the V2 name.
fn datatype(name: &str, what: &str) -> Result<DataType, String> {
    DataType::ALL
        .into_iter()
        .find(|d| d.config_name() == name || d.as_str() == name)
        .ok_or_else(|| format!("{what}: unknown data_type '{name}' (e.g. TYPE_INT32, TYPE_FP32, TYPE_STRING)"))
}

impl SequenceConfig {
    /// Checks the settings against the model's interface; every message names the key.
    pub fn plan(&self, spec: &ModelSpec) -> Result<SequencePlan, String> {
        let at = "sequence_batching";
        if !(1..=86_400_000_000).contains(&self.max_sequence_idle_microseconds) {
            return Err(format!("{at}.max_sequence_idle_microseconds must be between 1 and 86400000000"));
        }
        let o = &self.oldest;
        if !(1..=1_048_576).contains(&o.max_candidate_sequences) {
            return Err(format!("{at}.oldest.max_candidate_sequences must be between 1 and 1048576"));
        }
        let rows = spec.max_batch_size.max(1);
        if let Some(p) = o.preferred_batch_size.iter().find(|&&p| p == 0 || p > rows) {
            return Err(format!("{at}.oldest.preferred_batch_size {p} must be between 1 and max_batch_size ({rows})"));
        }
        if o.max_queue_delay_microseconds > 3_600_000_000 {
            return Err(format!("{at}.oldest.max_queue_delay_microseconds must be at most 3600000000"));
        }
        let d = &self.direct;
        if d.max_queue_delay_microseconds > 3_600_000_000 {
            return Err(format!("{at}.direct.max_queue_delay_microseconds must be at most 3600000000"));
        }
        if !(0.0..=1.0).contains(&d.minimum_slot_utilization) {
            return Err(format!("{at}.direct.minimum_slot_utilization must be between 0 and 1"));
        }
        let mut taken: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
        let mut controls = Vec::new();
        for input in &self.control_input {
            if taken.contains(&input.name.as_str()) {
                return Err(format!(
                    "{at}.control_input '{}' is also an [[input]] or another control/state input",
                    input.name
                ));
            }
            taken.push(&input.name);
            let [control] = input.control.as_slice() else {
                return Err(format!("{at}.control_input '{}' needs exactly one control", input.name));
            };
            controls.push(control_spec(&input.name, control)?);
        }
        let mut states = Vec::new();
        for s in &self.state {
            if taken.contains(&s.input_name.as_str()) {
                return Err(format!(
                    "{at}.state input_name '{}' is also an [[input]] or a control input",
                    s.input_name
                ));
            }
            taken.push(&s.input_name);
            if spec.output(&s.output_name).is_some() {
                return Err(format!("{at}.state output_name '{}' is also an [[output]]", s.output_name));
            }
            let datatype = datatype(&s.data_type, &format!("{at}.state '{}'", s.input_name))?;
            let dims = s
                .dims
                .iter()
                .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0 && d <= 1 << 24))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    format!("{at}.state '{}': dims must be fixed and positive, got {:?}", s.input_name, s.dims)
                })?;
            let init = &s.initial_state;
            if init.zero_data == Some(false) && init.fill.is_none() {
                return Err(format!("{at}.state '{}': initial_state needs zero_data = true or fill", s.input_name));
            }
            if datatype == DataType::Bytes && init.fill.is_some() {
                return Err(format!("{at}.state '{}': a BYTES state starts empty; fill does not apply", s.input_name));
            }
            states.push(StateSpec {
                input: s.input_name.clone(),
                output: s.output_name.clone(),
                datatype,
                dims,
                fill: init.fill.unwrap_or(0.0),
            });
        }
        Ok(SequencePlan {
            idle: Duration::from_micros(self.max_sequence_idle_microseconds),
            strategy: self.strategy,
            max_candidates: o.max_candidate_sequences,
            preferred: o.preferred_batch_size.clone(),
            max_queue_delay: Duration::from_micros(o.max_queue_delay_microseconds),
            direct_delay: Duration::from_micros(d.max_queue_delay_microseconds),
            min_slot_utilization: d.minimum_slot_utilization,
            controls,
            states,
        })
    }
}

fn control_spec(input: &str, c: &Control) -> Result<ControlSpec, String> {
    let at = format!("sequence_batching.control_input '{input}'");
    if c.kind == ControlKind::CorrId {
        let name = c.data_type.as_deref().unwrap_or("TYPE_UINT64");
        let datatype = datatype(name, &at)?;
        let integer = matches!(
            datatype,
            DataType::Int32 | DataType::Int64 | DataType::Uint32 | DataType::Uint64 | DataType::Bytes
        );
        if !integer {
            return Err(format!("{at}: CONTROL_SEQUENCE_CORRID data_type must be an integer type or TYPE_STRING"));
        }
        return Ok(ControlSpec { input: input.to_string(), kind: c.kind, datatype, false_true: [0.0, 1.0] });
    }
    let (datatype, false_true) = match (&c.int32_false_true[..], &c.fp32_false_true[..], &c.bool_false_true[..]) {
        (&[f, t], [], []) => (DataType::Int32, [f64::from(f), f64::from(t)]),
        ([], &[f, t], []) => (DataType::Fp32, [f64::from(f), f64::from(t)]),
        ([], [], &[f, t]) => (DataType::Bool, [f64::from(u8::from(f)), f64::from(u8::from(t))]),
        _ => {
            return Err(format!(
                "{at}: set exactly one of int32_false_true, fp32_false_true, bool_false_true, as a [false, true] pair"
            ))
        }
    };
    Ok(ControlSpec { input: input.to_string(), kind: c.kind, datatype, false_true })
}
