//! fastconsume's native core. Four layers, each using only those below it:
//!
//! - `core`: pure state. Batches, lanes, offsets, the timer wheel, rate limits, counters,
//!   errors, and `core::sched`, the scheduler: the engine as a state machine with no I/O.
//! - `kafka`: the Kafka side. The consumer and its poll loop, the bulk fetch, commits, the
//!   dead-letter producer, `inspect`, the mock cluster. It hands batches and rebalances to an
//!   `Intake`, and never sees the scheduler.
//! - `engine`: a run's threads. The scheduler behind one lock, the `Intake` the Kafka side
//!   feeds, and the workers, generic over the `Host` that makes the calls.
//! - `py`: the pyo3 edge, the only part that knows Python; it is the engine's `Host`.
//!
//! Everything but `py` is tested with plain `cargo test`.

mod core;
mod engine;
mod kafka;
mod py;

/// The timer wheel, for its benchmark.
pub use crate::core::timer;

use pyo3::prelude::*;

/// The private native module behind the `fastconsume` package.
// gil_used stays at its default (true): the wheel is abi3, which free-threaded CPython does
// not load, so declaring otherwise would promise something no build can use.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::init_pymodule(m)
}
