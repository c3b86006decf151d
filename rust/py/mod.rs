//! The pyo3 boundary: the only part of the crate that knows about Python.

mod batch;
mod consumer;
mod errors;
mod inspect;
mod lifecycle;
mod logs;
mod mock;
mod plugins;

use pyo3::prelude::*;

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install()?;
    batch::init_pymodule(m)?;
    consumer::init_pymodule(m)?;
    inspect::init_pymodule(m)?;
    lifecycle::init_pymodule(m)?;
    mock::init_pymodule(m)
}
