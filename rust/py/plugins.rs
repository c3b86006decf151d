//! Calls the plugins on each batch: the `BatchHandler` the engine drives. The GIL is attached
//! once per fetched batch, for building its Python objects and calling each plugin on its
//! slices, and is released while the engine waits for the next batch.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::batch::{BatchObjects, PyBatch};
use super::errors::exception;
use crate::batch::Batch;
use crate::engine::BatchHandler;

/// A registered plugin as the core sees it.
pub struct Plugin {
    pub name: String,
    pub call: Py<PyAny>,
    pub batch_size: usize,
}

/// Counters of one plugin, updated once per call.
#[derive(Clone, Debug, Default)]
pub struct PluginStats {
    pub batches: u64,
    pub messages: u64,
    pub errors: u64,
    pub busy: Duration,
    pub max_latency: Duration,
}

impl PluginStats {
    fn record(&mut self, messages: usize, took: Duration, failed: bool) {
        self.batches += 1;
        self.messages += messages as u64;
        self.errors += u64::from(failed);
        self.busy += took;
        self.max_latency = self.max_latency.max(took);
    }

    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("batches", self.batches)?;
        d.set_item("messages", self.messages)?;
        d.set_item("errors", self.errors)?;
        d.set_item("busy_seconds", self.busy.as_secs_f64())?;
        d.set_item("max_latency_seconds", self.max_latency.as_secs_f64())?;
        Ok(d)
    }
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

/// Names the partitions and offsets of messages `start..end`, for an error message.
fn describe(batch: &Batch, start: usize, end: usize) -> String {
    let mut ranges: Vec<(&str, i32, i64, i64)> = Vec::new();
    for i in start..end {
        let m = batch.get(i);
        match ranges
            .iter_mut()
            .find(|r| r.0 == m.topic && r.1 == m.partition)
        {
            Some(range) => range.3 = m.offset,
            None => ranges.push((m.topic, m.partition, m.offset, m.offset)),
        }
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|(topic, partition, first, last)| {
            format!("{topic}[{partition}] offsets {first}..={last}")
        })
        .collect();
    parts.join(", ")
}

/// Runs every plugin, one after another, on each batch.
pub struct PluginRunner {
    plugins: Vec<(Plugin, Py<PyString>)>,
    stats: Arc<Mutex<Vec<PluginStats>>>,
}

impl PluginRunner {
    pub fn new(py: Python<'_>, plugins: Vec<Plugin>, stats: Arc<Mutex<Vec<PluginStats>>>) -> Self {
        *stats.lock().unwrap_or_else(PoisonError::into_inner) =
            vec![PluginStats::default(); plugins.len()];
        let plugins = plugins
            .into_iter()
            .map(|p| {
                let name = PyString::intern(py, &p.name).unbind();
                (p, name)
            })
            .collect();
        PluginRunner { plugins, stats }
    }
}

impl BatchHandler for PluginRunner {
    type Error = PluginFailure;

    fn handle(&mut self, batch: &Arc<Batch>) -> Result<(), PluginFailure> {
        Python::attach(|py| {
            let objects = Arc::new(BatchObjects::new(batch.clone()));
            for (index, (plugin, name)) in self.plugins.iter().enumerate() {
                let mut start = 0;
                while start < batch.len() {
                    let end = (start + plugin.batch_size).min(batch.len());
                    let view = PyBatch::new(objects.clone(), start, end, name.clone_ref(py));
                    let began = Instant::now();
                    let result = Py::new(py, view).and_then(|view| plugin.call.call1(py, (view,)));
                    let took = began.elapsed();
                    self.stats.lock().unwrap_or_else(PoisonError::into_inner)[index].record(
                        end - start,
                        took,
                        result.is_err(),
                    );
                    if let Err(error) = result {
                        let message = format!(
                            "plugin {:?} failed on a batch of {} message(s) from {}: {}",
                            plugin.name,
                            end - start,
                            describe(batch, start, end),
                            error
                                .value(py)
                                .repr()
                                .map_or_else(|_| "?".to_string(), |r| r.to_string()),
                        );
                        return Err(PluginFailure { error, message });
                    }
                    start = end;
                }
            }
            Ok(())
        })
    }
}
