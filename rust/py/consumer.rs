//! `Consumer`: the native engine behind `fastconsume.App`. `run` releases the GIL for the
//! whole run and attaches it only inside plugin calls; `stop` may come from any thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_pyerr;
use super::plugins::{Plugin, PluginRunner, PluginStats};
use crate::config::SourceConfig;
use crate::engine::{Engine, RunError, RunOptions};

#[pyclass(frozen, module = "fastconsume._core", name = "Consumer")]
pub struct PyConsumer {
    config: SourceConfig,
    engine: Engine,
    running: AtomicBool,
    plugin_names: Mutex<Vec<String>>,
    plugin_stats: Arc<Mutex<Vec<PluginStats>>>,
}

/// Clears `running` however a run ends.
struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[pymethods]
impl PyConsumer {
    #[new]
    #[pyo3(signature = (*, bootstrap, group, topics, kafka, connect_timeout))]
    fn new(
        py: Python<'_>,
        bootstrap: String,
        group: String,
        topics: Vec<String>,
        kafka: Vec<(String, String)>,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let config = SourceConfig {
            bootstrap,
            group,
            topics,
            kafka,
            connect_timeout: Duration::try_from_secs_f64(connect_timeout).map_err(|e| {
                to_pyerr(
                    py,
                    &crate::errors::Error::Config(format!("connect_timeout: {e}")),
                )
            })?,
        };
        config.validate().map_err(|e| to_pyerr(py, &e))?;
        Ok(PyConsumer {
            config,
            engine: Engine::default(),
            running: AtomicBool::new(false),
            plugin_names: Mutex::default(),
            plugin_stats: Arc::default(),
        })
    }

    /// Consumes until `stop()`, or in drain mode until idle. `plugins` holds
    /// `(name, callable, batch_size)`; fetched batches hold up to the largest batch size
    /// and wait at most `linger` seconds to fill.
    #[pyo3(signature = (plugins, *, linger, idle_timeout=None))]
    fn run(
        &self,
        py: Python<'_>,
        plugins: Vec<(String, Py<PyAny>, usize)>,
        linger: f64,
        idle_timeout: Option<f64>,
    ) -> PyResult<()> {
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(PyRuntimeError::new_err("this app is already running"));
        }
        let _running = RunningGuard(&self.running);
        let seconds = |value: f64, what: &str| {
            Duration::try_from_secs_f64(value)
                .map_err(|e| to_pyerr(py, &crate::errors::Error::Config(format!("{what}: {e}"))))
        };
        let options = RunOptions {
            batch_size: plugins.iter().map(|p| p.2).max().unwrap_or(1),
            linger: seconds(linger, "linger")?,
            idle_timeout: idle_timeout
                .map(|s| seconds(s, "idle_timeout"))
                .transpose()?,
        };
        let plugins: Vec<Plugin> = plugins
            .into_iter()
            .map(|(name, call, batch_size)| Plugin {
                name,
                call,
                batch_size,
            })
            .collect();
        *self
            .plugin_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            plugins.iter().map(|p| p.name.clone()).collect();
        let mut runner = PluginRunner::new(py, plugins, self.plugin_stats.clone());
        let outcome = py.detach(|| self.engine.run(&self.config, &options, &mut runner));
        match outcome {
            Ok(_) => Ok(()),
            Err(RunError::Core(error)) => Err(to_pyerr(py, &error)),
            Err(RunError::Handler(failure)) => Err(failure.into_pyerr(py)),
        }
    }

    /// Asks the current run (or the next, if none is running) to stop gracefully.
    fn stop(&self) {
        self.engine.stop_handle().stop();
    }

    /// Counters of the current or last run.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = PyDict::new(py);
        let summary = self.engine.progress();
        stats.set_item("running", self.running.load(Ordering::Acquire))?;
        stats.set_item("messages", summary.messages)?;
        stats.set_item("batches", summary.batches)?;
        let plugins = PyDict::new(py);
        let names = self
            .plugin_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let counters = self
            .plugin_stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (name, counters) in names.iter().zip(counters) {
            plugins.set_item(name, counters.to_dict(py)?)?;
        }
        stats.set_item("plugins", plugins)?;
        Ok(stats)
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyConsumer>()
}
