//! The pyo3 boundary: the only part of the crate that knows about Python.

mod arrow;
mod batch;
mod consumer;
mod errors;
mod inspect;
mod lifecycle;
mod logs;
mod mock;
mod plugins;

use std::time::Duration;

use pyo3::prelude::*;

/// How long the interpreter's exit waits for the log bridge to emit what it was handed.
const LOG_FLUSH: Duration = Duration::from_secs(1);

/// The `atexit` hook of `fastconsume._app`: emits the log lines still on their way (a run's
/// revoke, its final commit), then closes the interpreter gate (`lifecycle::close`).
#[pyfunction]
#[pyo3(name = "_close_interpreter_gate")]
fn close_interpreter_gate(py: Python<'_>) -> (usize, usize) {
    py.detach(|| logs::flush(LOG_FLUSH));
    lifecycle::close(py)
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install()?;
    arrow::init_pymodule(m)?;
    batch::init_pymodule(m)?;
    consumer::init_pymodule(m)?;
    inspect::init_pymodule(m)?;
    lifecycle::init_pymodule(m)?;
    m.add_function(wrap_pyfunction!(close_interpreter_gate, m)?)?;
    mock::init_pymodule(m)
}
