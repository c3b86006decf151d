//! The worker threads' life on the Python side: each attaches to the interpreter once, and
//! releases the GIL while it waits for a task and while it reports one, so the GIL is held
//! only to build a batch's objects and to call the plugin (granian's pattern).

use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyString;

use super::batch::PyBatch;
use super::errors::exception;
use crate::batch::Batch;
use crate::pool::{Pool, Task};

/// A plugin as Python registered it: `fastconsume._plugins.Plugin`, read by attribute.
#[derive(FromPyObject)]
pub struct PluginSpec {
    #[pyo3(attribute)]
    pub name: String,
    /// The callable the worker calls: sync, or an async plugin already wrapped to run on
    /// the app's event loop.
    #[pyo3(attribute)]
    pub func: Py<PyAny>,
    #[pyo3(attribute)]
    pub batch_size: usize,
    #[pyo3(attribute)]
    pub concurrency: usize,
    #[pyo3(attribute)]
    pub max_queued: usize,
    #[pyo3(attribute)]
    pub max_queued_bytes: usize,
}

/// A plugin raised: the run stops and re-raises it, chained, naming the plugin.
pub struct PluginFailure {
    pub error: PyErr,
    pub message: String,
}

impl PluginFailure {
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let error = exception(py, "PluginError", self.message);
        error.set_cause(py, Some(self.error));
        error
    }
}

/// The callables, by lane.
pub struct Plugins {
    calls: Vec<(Py<PyAny>, Py<PyString>)>,
}

impl Plugins {
    pub fn new(py: Python<'_>, specs: &[PluginSpec]) -> Self {
        let calls = specs.iter().map(|s| (s.func.clone_ref(py), PyString::intern(py, &s.name).unbind())).collect();
        Plugins { calls }
    }

    /// One worker thread's whole life.
    pub fn serve(&self, pool: &Pool<PluginFailure>) {
        Python::attach(|py| {
            while let Some(task) = py.detach(|| pool.next_task()) {
                let started = Instant::now();
                let outcome = self.call(py, &task);
                let took = started.elapsed();
                py.detach(|| pool.complete(task, outcome, took));
            }
        });
    }

    fn call(&self, py: Python<'_>, task: &Task) -> Result<(), PluginFailure> {
        let (call, name) = &self.calls[task.lane];
        let chunk = &task.chunk;
        let batch = PyBatch::new(chunk.batch.clone(), chunk.range.clone(), name.clone_ref(py));
        let result = Py::new(py, batch).and_then(|batch| call.call1(py, (batch,)));
        result.map(drop).map_err(|error| {
            let message = format!(
                "plugin {:?} failed on {}: {}",
                name.bind(py).to_string_lossy(),
                describe(&chunk.batch, &chunk.range),
                error.value(py).repr().map_or_else(|_| "?".to_string(), |r| r.to_string()),
            );
            PluginFailure { error, message }
        })
    }
}

/// Names the partition and offsets of a slice, for an error message.
fn describe(batch: &Batch, range: &std::ops::Range<usize>) -> String {
    let partition = batch.partition();
    let (first, last) = (batch.get(range.start).offset, batch.get(range.end - 1).offset);
    format!("{} message(s) of {}[{}] offsets {first}..={last}", range.len(), partition.topic, partition.partition)
}
