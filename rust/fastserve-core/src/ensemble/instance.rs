//! The ensemble's executor, an `Instance` of the ensemble's own scheduler (so the ensemble has
//! a queue, statistics, versions and routing like any model): it runs one request (or batch) of
//! the graph by submitting each step to its model's scheduler once the step's inputs exist, and
//! waits for whichever step finishes first.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;

use tokio::sync::oneshot;

use super::plan::EnsemblePlan;
use crate::error::{Result, ServeError};
use crate::registry::Registry;
use crate::request::{InferRequest, Reply};
use crate::scheduler::{Instance, PhaseClock, QueueOptions};
use crate::spec::ModelSpec;
use crate::tensor::Tensor;

pub struct EnsembleInstance {
    registry: Weak<Registry>,
    plan: Arc<EnsemblePlan>,
    spec: Arc<ModelSpec>,
    /// Waits for the first of the running steps; made at the first request.
    waiter: Option<tokio::runtime::Runtime>,
}

impl EnsembleInstance {
    pub fn new(registry: Weak<Registry>, plan: Arc<EnsemblePlan>, spec: Arc<ModelSpec>) -> Self {
        Self { registry, plan, spec, waiter: None }
    }

    /// Queues step `i` with its inputs taken from the ensemble tensors (shared, not copied).
    fn submit(&self, registry: &Registry, i: usize, tensors: &HashMap<String, Tensor>) -> Result<Submitted> {
        let step = &self.plan.steps[i];
        let in_step = |e: ServeError| e.context(&format!("ensemble '{}' {}", self.spec.name, step.label(i)));
        let version = step.version();
        let mv = registry.resolve(&step.model_name, version.as_deref()).map_err(in_step)?;
        let scheduler = mv.scheduler().map_err(in_step)?;
        let inputs = step
            .input_map
            .iter()
            .filter_map(|(input, tensor)| tensors.get(tensor).map(|t| Tensor { name: input.clone(), ..t.clone() }))
            .collect();
        let mut request = InferRequest { inputs, ..Default::default() };
        let validated = scheduler.spec().validate(&mut request).map_err(in_step)?;
        // The ensemble's callers wait on its steps too (in-process call cycles are refused).
        let callers = crate::scheduler::calls::current().map(|c| c.chain).unwrap_or_default();
        let options = QueueOptions { callers, ..Default::default() };
        let reply = scheduler.submit_with(validated, options).map_err(in_step)?;
        Ok(Submitted { stats: scheduler.stats().clone(), start: std::time::Instant::now(), reply })
    }
}

/// A step on its way: where its answer comes, and what its model's statistics count it as.
struct Submitted {
    stats: Arc<crate::observe::stats::ModelStats>,
    start: std::time::Instant,
    reply: oneshot::Receiver<Reply>,
}

/// The first of `running` to answer, taken out of it.
async fn first_answer(running: &mut Vec<(usize, Submitted)>) -> (usize, Submitted, Option<Reply>) {
    std::future::poll_fn(|cx| {
        for k in 0..running.len() {
            if let Poll::Ready(answer) = Pin::new(&mut running[k].1.reply).poll(cx) {
                let (i, submitted) = running.swap_remove(k);
                return Poll::Ready((i, submitted, answer.ok()));
            }
        }
        Poll::Pending
    })
    .await
}

impl Instance for EnsembleInstance {
    fn execute(&mut self, inputs: Vec<Tensor>, clock: &mut PhaseClock) -> Result<Vec<Tensor>> {
        let registry = self
            .registry
            .upgrade()
            .ok_or_else(|| ServeError::unavailable(format!("ensemble '{}': the server stopped", self.spec.name)))?;
        if self.waiter.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| ServeError::Internal(format!("ensemble '{}': {e}", self.spec.name)))?;
            self.waiter = Some(runtime);
        }
        clock.infer_started();
        let mut tensors: HashMap<String, Tensor> = inputs.into_iter().map(|t| (t.name.clone(), t)).collect();
        let steps = self.plan.steps.len();
        let mut started = vec![false; steps];
        let mut running = Vec::with_capacity(steps);
        loop {
            for (i, step) in self.plan.steps.iter().enumerate() {
                if !started[i] && step.input_map.values().all(|t| tensors.contains_key(t)) {
                    started[i] = true;
                    running.push((i, self.submit(&registry, i, &tensors)?));
                }
            }
            if running.is_empty() {
                break;
            }
            let Some(waiter) = &self.waiter else { return Err(ServeError::Internal("no waiter".into())) };
            let (i, submitted, answer) = waiter.block_on(first_answer(&mut running));
            let step = &self.plan.steps[i];
            let label = format!("ensemble '{}' {}", self.spec.name, step.label(i));
            let answer = answer
                .unwrap_or_else(|| Err(ServeError::unavailable("the model stopped before answering").into()))
                .map_err(ServeError::from);
            // A step counts as a request of its model, as in Triton.
            submitted.stats.record_request(answer.as_ref().map(|_| ()), submitted.start.elapsed());
            let executed = answer.map_err(|e| e.context(&label))?;
            for t in executed.outputs {
                if let Some(name) = step.output_map.get(&t.name) {
                    tensors.insert(name.clone(), Tensor { name: name.clone(), ..t });
                }
            }
        }
        clock.infer_finished();
        self.spec
            .outputs
            .iter()
            .map(|o| {
                tensors.remove(&o.name).ok_or_else(|| {
                    ServeError::Internal(format!("ensemble '{}': output '{}' was not produced", self.spec.name, o.name))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ensemble::config::{EnsembleConfig, Step};
    use crate::registry::ModelVersion;
    use crate::scheduler::plan::BatchPolicy;
    use crate::scheduler::{Scheduler, SchedulerConfig};
    use crate::spec::TensorSpec;
    use crate::tensor::datatype::DataType;
    use crate::tensor::TensorData;

    /// Y = X * factor + offset over FP32, failing on negative input.
    struct Affine(f32, f32);

    fn floats(t: &Tensor) -> Vec<f32> {
        let TensorData::Raw(b) = &t.data else { unreachable!() };
        b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn tensor(name: &str, values: &[f32]) -> Tensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DataType::Fp32, vec![values.len(), 1], TensorData::Raw(data.into())).unwrap()
    }

    impl Instance for Affine {
        fn execute(&mut self, inputs: Vec<Tensor>, _: &mut PhaseClock) -> Result<Vec<Tensor>> {
            let x = floats(&inputs[0]);
            if x.iter().any(|v| *v < 0.0) {
                return Err(ServeError::ModelError("negative".into()));
            }
            let y: Vec<f32> = x.iter().map(|v| v * self.0 + self.1).collect();
            Ok(vec![tensor("Y", &y)])
        }
    }

    fn spec(name: &str, platform: &str) -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            name: name.into(),
            version: 1,
            platform: platform.into(),
            max_batch_size: 4,
            decoupled: false,
            inputs: vec![TensorSpec::new("X", DataType::Fp32, vec![1])],
            outputs: vec![TensorSpec::new("Y", DataType::Fp32, vec![1])],
        })
    }

    fn config() -> SchedulerConfig {
        SchedulerConfig::new(
            BatchPolicy {
                max_batch_size: 4,
                max_queue_delay: std::time::Duration::ZERO,
                preferred_batch_sizes: vec![],
            },
            16,
        )
    }

    fn step(model: &str, input: &str, output: &str) -> Step {
        Step {
            model_name: model.into(),
            model_version: -1,
            input_map: [("X".to_string(), input.to_string())].into(),
            output_map: [("Y".to_string(), output.to_string())].into(),
        }
    }

    fn registry() -> Arc<Registry> {
        let registry = Arc::new(Registry::new());
        for (name, a, b) in [("double", 2.0, 0.0), ("inc", 1.0, 1.0)] {
            let s = Scheduler::start(spec(name, "test"), config(), vec![Box::new(Affine(a, b))]).unwrap();
            registry.insert(ModelVersion::ready(s));
        }
        registry
    }

    #[test]
    fn steps_run_in_dependency_order_and_a_failure_names_its_step() {
        let registry = registry();
        let ensemble = spec("chain", "ensemble");
        let steps = EnsembleConfig { step: vec![step("inc", "t", "Y"), step("double", "X", "t")] };
        let plan = Arc::new(EnsemblePlan::check(&ensemble, &steps, &registry).unwrap());
        let mut instance = EnsembleInstance::new(Arc::downgrade(&registry), plan, ensemble);
        let mut clock = PhaseClock::new();
        let out = instance.execute(vec![tensor("X", &[1.0, 5.0])], &mut clock).unwrap();
        assert_eq!(floats(&out[0]), vec![3.0, 11.0]);
        let e = instance.execute(vec![tensor("X", &[-1.0])], &mut clock).unwrap_err();
        assert!(
            matches!(&e, ServeError::ModelError(m) if m.contains("ensemble 'chain' step 2 (model 'double')")),
            "{e}"
        );
        let double = registry.resolve("double", None).unwrap();
        assert_eq!(double.stats().unwrap().success.count(), 1);
        assert_eq!(double.stats().unwrap().fail.count(), 1);
    }

    #[test]
    fn graphs_that_cannot_run_are_refused_at_load() {
        let registry = registry();
        let ensemble = spec("e", "ensemble");
        for (steps, says) in [
            (vec![step("nosuch", "X", "Y")], "step 1 (model 'nosuch')"),
            (vec![step("double", "X", "Y"), step("inc", "X", "Y")], "already produced"),
            (vec![step("double", "X", "t")], "ensemble output 'Y' is produced by no step"),
            (vec![step("double", "u", "t"), step("inc", "t", "u"), step("inc", "t", "Y")], "a cycle"),
            (vec![step("e", "X", "Y")], "cannot contain itself"),
        ] {
            let e = EnsemblePlan::check(&ensemble, &EnsembleConfig { step: steps }, &registry).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}
