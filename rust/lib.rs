//! fastconsume's native core: a Kafka poll loop, per-plugin lanes on a bounded worker pool,
//! offset tracking, and the pyo3 boundary that calls Python plugins once per batch.
//!
//! Only `py` knows about Python; everything else is tested with plain `cargo test`.

pub mod batch;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod errors;
pub mod fetch;
pub mod inspect;
pub mod lane;
pub mod limit;
pub mod mock;
pub mod offsets;
pub mod pool;
pub mod seed;
pub mod source;
pub mod stats;
pub mod timer;

mod py;

use pyo3::prelude::*;

/// The private native module behind the `fastconsume` package.
// gil_used stays at its default (true): the wheel is abi3, which free-threaded CPython does
// not load, so declaring otherwise would promise something no build can use.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::init_pymodule(m)
}
