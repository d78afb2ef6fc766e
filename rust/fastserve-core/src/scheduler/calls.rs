//! Which models an instance thread is working for right now, so a model that calls another
//! in-process (`fastserve.infer`) cannot wait on itself: the chain of callers travels with each
//! call, and a call to a model already in the chain is refused instead of deadlocking.

use std::cell::RefCell;
use std::time::Instant;

/// What the current thread's batch is part of.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The model running the batch, then the models waiting on its requests (outermost last).
    pub chain: Vec<String>,
    /// When the batch's `execution_timeout_ms` runs out, if it has one.
    pub deadline: Option<Instant>,
}

thread_local! {
    static CURRENT: RefCell<Option<CallContext>> = const { RefCell::new(None) };
}

/// The context of the batch this thread runs, if it is a model thread inside `execute`.
pub fn current() -> Option<CallContext> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Marks this thread as running a batch of `model` for `callers`; cleared when dropped.
pub(super) struct Entered;

pub(super) fn enter<'a>(model: &str, callers: impl Iterator<Item = &'a String>, deadline: Option<Instant>) -> Entered {
    let mut chain = vec![model.to_string()];
    for caller in callers {
        if !chain.contains(caller) {
            chain.push(caller.clone());
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Some(CallContext { chain, deadline }));
    Entered
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}
