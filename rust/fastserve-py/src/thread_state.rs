//! Model threads keep one Python thread state for their whole life.
//!
//! `Python::attach` on a thread Python did not start creates a thread state and, on return,
//! destroys it; CPython 3.11+ maps a 16 KiB frame stack for each new state and unmaps it again,
//! so every batch cost an mmap/munmap pair and a TLB shootdown across every core (seen as the
//! top kernel cost of a profile under load). A state kept by the thread is found and reused by
//! every later attach.

use std::cell::Cell;

use pyo3::prelude::*;

thread_local! {
    static KEPT: Cell<bool> = const { Cell::new(false) };
}

/// Attaches to Python on a thread that keeps its thread state between attaches.
pub fn attach<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
    keep();
    Python::attach(f)
}

fn keep() {
    KEPT.with(|kept| {
        if kept.get() {
            return;
        }
        // SAFETY: a thread with no Python thread state cannot hold the GIL. For such a thread
        // PyGILState_Ensure creates its state and takes the GIL, and PyEval_SaveThread releases the
        // GIL while the state stays registered, so every later PyGILState_Ensure (Python::attach)
        // finds and reuses it. A thread that has a state already (one Python started) keeps it.
        unsafe {
            if pyo3::ffi::PyGILState_GetThisThreadState().is_null() {
                pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
        }
        kept.set(true);
    });
}
