//! Load-time checks of an ensemble against the models it composes, and the checked graph.

use std::collections::{HashMap, HashSet};

use super::config::{EnsembleConfig, Step};
use crate::registry::Registry;
use crate::spec::{ModelSpec, TensorSpec};

/// A checked ensemble: its steps, and where each ensemble tensor comes from.
#[derive(Debug, Clone)]
pub struct EnsemblePlan {
    pub steps: Vec<Step>,
}

/// Who produces an ensemble tensor: the request (an ensemble input) or a step's output.
struct Producer {
    what: String,
    spec: TensorSpec,
    batching: bool,
}

fn dims_agree(a: &TensorSpec, b: &TensorSpec) -> bool {
    a.dims.len() == b.dims.len() && a.dims.iter().zip(&b.dims).all(|(&x, &y)| x < 0 || y < 0 || x == y)
}

fn shape(batching: bool, t: &TensorSpec) -> String {
    let mut dims: Vec<String> = t.dims.iter().map(i64::to_string).collect();
    if batching {
        dims.insert(0, "-1".into());
    }
    format!("{} [{}]", t.datatype, dims.join(","))
}

impl EnsemblePlan {
    /// Checks `config` for the ensemble `spec` against the composing models now in `registry`:
    /// every step's model exists and is loaded, every model input is mapped, the maps name real
    /// tensors, no tensor is produced twice, no cycle, producers and consumers agree on datatype
    /// and shape, and every ensemble output is produced. Messages name the step.
    pub fn check(spec: &ModelSpec, config: &EnsembleConfig, registry: &Registry) -> Result<Self, String> {
        if config.step.is_empty() {
            return Err("[[ensemble.step]]: an ensemble needs at least one step".into());
        }
        let mut producers: HashMap<String, Producer> = HashMap::new();
        for t in &spec.inputs {
            producers.insert(
                t.name.clone(),
                Producer { what: format!("ensemble input '{}'", t.name), spec: t.clone(), batching: spec.batching() },
            );
        }
        let mut models: Vec<std::sync::Arc<ModelSpec>> = Vec::with_capacity(config.step.len());
        for (i, step) in config.step.iter().enumerate() {
            let at = step.label(i);
            if step.model_name == spec.name {
                return Err(format!("{at}: an ensemble cannot contain itself"));
            }
            let version = step.version();
            let mv = registry.resolve(&step.model_name, version.as_deref()).map_err(|e| format!("{at}: {e}"))?;
            let model = mv.spec().map_err(|e| format!("{at}: {e}"))?.clone();
            if spec.batching() && (!model.batching() || model.max_batch_size < spec.max_batch_size) {
                return Err(format!(
                    "{at}: the ensemble's max_batch_size {} exceeds the model's {}",
                    spec.max_batch_size, model.max_batch_size
                ));
            }
            if !spec.batching() && model.batching() {
                return Err(format!(
                    "{at}: the model batches (max_batch_size {}), so the ensemble must set max_batch_size too",
                    model.max_batch_size
                ));
            }
            for input in &model.inputs {
                if !step.input_map.contains_key(&input.name) {
                    return Err(format!("{at}: model input '{}' is not in input_map", input.name));
                }
            }
            for name in step.input_map.keys() {
                if !model.inputs.iter().any(|t| &t.name == name) {
                    return Err(format!("{at}: input_map names '{name}', which is not an input of the model"));
                }
            }
            for (output, tensor) in &step.output_map {
                let Some(out) = model.output(output) else {
                    return Err(format!("{at}: output_map names '{output}', which is not an output of the model"));
                };
                if let Some(previous) = producers.get(tensor) {
                    return Err(format!("{at}: tensor '{tensor}' is already produced by {}", previous.what));
                }
                producers.insert(
                    tensor.clone(),
                    Producer { what: format!("{at} output '{output}'"), spec: out.clone(), batching: model.batching() },
                );
            }
            models.push(model);
        }
        for (i, (step, model)) in config.step.iter().zip(&models).enumerate() {
            for (input, tensor) in &step.input_map {
                let Some(producer) = producers.get(tensor) else {
                    return Err(format!(
                        "{}: input '{input}' reads tensor '{tensor}', which nothing produces",
                        step.label(i)
                    ));
                };
                let Some(consumer) = model.inputs.iter().find(|t| &t.name == input) else { continue };
                if producer.spec.datatype != consumer.datatype || !dims_agree(&producer.spec, consumer) {
                    return Err(format!(
                        "{}: input '{input}' is {}, but tensor '{tensor}' ({}) is {}",
                        step.label(i),
                        shape(model.batching(), consumer),
                        producer.what,
                        shape(producer.batching, &producer.spec)
                    ));
                }
            }
        }
        for out in &spec.outputs {
            let Some(producer) = producers.get(&out.name) else {
                return Err(format!("ensemble output '{}' is produced by no step", out.name));
            };
            if producer.spec.datatype != out.datatype || !dims_agree(&producer.spec, out) {
                return Err(format!(
                    "ensemble output '{}' is {}, but {} is {}",
                    out.name,
                    shape(spec.batching(), out),
                    producer.what,
                    shape(producer.batching, &producer.spec)
                ));
            }
        }
        check_acyclic(spec, &config.step)?;
        Ok(Self { steps: config.step.clone() })
    }

    /// Why the ensemble cannot serve now (a step's model is unavailable), if it cannot.
    pub fn unavailable(&self, registry: &Registry) -> Option<String> {
        self.steps.iter().enumerate().find_map(|(i, step)| {
            let version = step.version();
            let found = registry.resolve(&step.model_name, version.as_deref());
            match found.and_then(|mv| mv.scheduler().map(|_| ())) {
                Ok(()) => None,
                Err(e) => Some(format!("{} is unavailable: {e}", step.label(i))),
            }
        })
    }
}

/// Every step must become runnable from the ensemble's inputs; a step left over waits on
/// itself through others.
fn check_acyclic(spec: &ModelSpec, steps: &[Step]) -> Result<(), String> {
    let mut available: HashSet<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
    let mut done = vec![false; steps.len()];
    loop {
        let mut progressed = false;
        for (i, step) in steps.iter().enumerate() {
            if !done[i] && step.input_map.values().all(|t| available.contains(t.as_str())) {
                done[i] = true;
                progressed = true;
                available.extend(step.output_map.values().map(String::as_str));
            }
        }
        if !progressed {
            break;
        }
    }
    match done.iter().position(|d| !d) {
        None => Ok(()),
        Some(i) => Err(format!("{}: its inputs depend on its own outputs (a cycle)", steps[i].label(i))),
    }
}
