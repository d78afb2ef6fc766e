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
            let answer = answer.unwrap_or_else(|| Err(ServeError::unavailable("the model stopped before answering")));
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
