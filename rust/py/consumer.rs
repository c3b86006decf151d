//! `Consumer`: the native engine behind `fastconsume.App`. `run` releases the GIL for the
//! whole run (worker threads attach on their own); `stop` may come from any thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_pyerr;
use super::lifecycle;
use super::logs::{self, LOG_LINES_BEFORE_AN_ERROR};
use super::plugins::{PluginFailure, PluginSpec, Plugins, RateLimitSpec};
use crate::core::errors::Error;
use crate::core::lane::{LaneOptions, OnFailure, RetryPolicy};
use crate::engine::{Engine, RunError, RunOptions};
use crate::kafka::config::SourceConfig;

#[pyclass(frozen, module = "fastconsume._core", name = "Consumer")]
pub struct PyConsumer {
    config: SourceConfig,
    engine: Engine<PluginFailure>,
    running: AtomicBool,
}

/// Clears `running` however a run ends.
struct RunningGuard<'a>(&'a AtomicBool);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn duration(py: Python<'_>, seconds: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|e| to_pyerr(py, &Error::Config(format!("{what}: {e}"))))
}

/// The consumer settings Python passes, checked.
pub(super) fn source_config(
    py: Python<'_>,
    bootstrap: String,
    group: String,
    topics: Vec<String>,
    kafka: Vec<(String, String)>,
    connect_timeout: f64,
    wait_for_topics: bool,
) -> PyResult<SourceConfig> {
    let connect_timeout = duration(py, connect_timeout, "connect_timeout")?;
    let config = SourceConfig { bootstrap, group, topics, kafka, connect_timeout, wait_for_topics };
    config.validate().map_err(|e| to_pyerr(py, &e))?;
    Ok(config)
}

#[pymethods]
impl PyConsumer {
    #[new]
    #[pyo3(signature = (*, bootstrap, group, topics, kafka, connect_timeout, wait_for_topics=false))]
    fn new(
        py: Python<'_>,
        bootstrap: String,
        group: String,
        topics: Vec<String>,
        kafka: Vec<(String, String)>,
        connect_timeout: f64,
        wait_for_topics: bool,
    ) -> PyResult<Self> {
        let config = source_config(py, bootstrap, group, topics, kafka, connect_timeout, wait_for_topics)?;
        Ok(PyConsumer { config, engine: Engine::default(), running: AtomicBool::new(false) })
    }

    /// Consumes until `stop()`, a plugin failure, or in drain mode until idle.
    #[pyo3(signature = (
        plugins, *, linger, workers, shutdown_timeout, revoke_timeout, idle_timeout=None, rate_limit=None,
        event_loop=None, dlq_timeout=30.0,
    ))]
    #[allow(clippy::too_many_arguments)] // each is a keyword argument of the Python method
    fn run(
        &self,
        py: Python<'_>,
        plugins: Vec<PluginSpec>,
        linger: f64,
        workers: usize,
        shutdown_timeout: f64,
        revoke_timeout: f64,
        idle_timeout: Option<f64>,
        rate_limit: Option<RateLimitSpec>,
        event_loop: Option<Py<PyAny>>,
        dlq_timeout: f64,
    ) -> PyResult<()> {
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(PyRuntimeError::new_err("this app is already running"));
        }
        let _running = RunningGuard(&self.running);
        let _counted = lifecycle::Running::start();
        let options = RunOptions {
            lanes: plugins.iter().map(|p| lane_options(py, p)).collect::<PyResult<_>>()?,
            linger: duration(py, linger, "linger")?,
            idle_timeout: idle_timeout.map(|s| duration(py, s, "idle_timeout")).transpose()?,
            workers,
            shutdown_timeout: duration(py, shutdown_timeout, "shutdown_timeout")?,
            revoke_timeout: duration(py, revoke_timeout, "revoke_timeout")?,
            rate_limit: rate_limit
                .map(|r| r.with_default_burst(plugins.iter().map(|p| p.batch_size).max().unwrap_or(1))),
            dlq_timeout: duration(py, dlq_timeout, "dlq_timeout")?,
        };
        let plugins = Arc::new(Plugins::new(py, &plugins, event_loop));
        let outcome = lifecycle::detach(py, || {
            let outcome = self.engine.run(&self.config, &options, plugins);
            if outcome.is_err() {
                // The lines logged on the way to the failure come before the exception.
                logs::flush(LOG_LINES_BEFORE_AN_ERROR);
            }
            outcome
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(RunError::Core(error)) => Err(to_pyerr(py, &error)),
            Err(RunError::Plugin(failure)) => Err(failure.into_pyerr(py)),
        }
    }

    /// Asks the current run (or the next, if none is running) to stop gracefully.
    fn stop(&self, py: Python<'_>) {
        lifecycle::detach(py, || self.engine.stop());
    }

    /// Counters of the current or last run.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = PyDict::new(py);
        let snapshot = lifecycle::detach(py, || self.engine.snapshot());
        // Running once the run's counters exist, so a running app always lists its plugins.
        stats.set_item("running", self.running.load(Ordering::Acquire) && snapshot.is_some())?;
        let plugins = PyDict::new(py);
        let partitions = PyDict::new(py);
        stats.set_item("messages", snapshot.as_ref().map_or(0, |s| s.admitted))?;
        let timers = PyDict::new(py);
        timers.set_item("entries", snapshot.as_ref().map_or(0, |s| s.timers))?;
        timers.set_item("peak", snapshot.as_ref().map_or(0, |s| s.timers_peak))?;
        stats.set_item("timers", timers)?;
        for (name, lane, options) in snapshot.iter().flat_map(|s| &s.lanes) {
            let d = PyDict::new(py);
            d.set_item("batches", lane.batches)?;
            d.set_item("messages", lane.messages)?;
            d.set_item("errors", lane.errors)?;
            d.set_item("in_flight", lane.in_flight)?;
            d.set_item("queued", lane.queued)?;
            d.set_item("queued_peak", lane.queued_peak)?;
            d.set_item("max_queued", options.max_queued)?;
            d.set_item("latency_p50", lane.latency.quantile(0.5).as_secs_f64())?;
            d.set_item("latency_p99", lane.latency.quantile(0.99).as_secs_f64())?;
            d.set_item("retries", lane.retries)?;
            d.set_item("retry_wait", lane.retry_wait.as_secs_f64())?;
            d.set_item("dead_lettered", lane.dead_lettered)?;
            d.set_item("dead_letters_pending", lane.dead_letters_pending)?;
            d.set_item("dead_letters_oldest", lane.dead_letters_oldest.as_secs_f64())?;
            d.set_item("overruns", lane.overruns)?;
            d.set_item("timeouts", lane.timeouts)?;
            d.set_item("throttled", lane.throttled)?;
            plugins.set_item(name, d)?;
        }
        for p in snapshot.iter().flat_map(|s| &s.partitions) {
            let d = PyDict::new(py);
            d.set_item("topic", &*p.partition.topic)?;
            d.set_item("partition", p.partition.partition)?;
            d.set_item("assigned", p.assigned)?;
            d.set_item("position", p.position)?;
            d.set_item("committed", p.committed)?;
            let lag = match (p.high_watermark, p.committed) {
                (Some(high), Some(committed)) => Some((high - committed).max(0)),
                (Some(high), None) => p.position.map(|_| high),
                _ => None,
            };
            d.set_item("lag", lag)?;
            partitions.set_item(format!("{}[{}]", p.partition.topic, p.partition.partition), d)?;
        }
        stats.set_item("plugins", plugins)?;
        stats.set_item("partitions", partitions)?;
        Ok(stats)
    }
}

/// A lane's options from a registered plugin (Python validated them; the engine checks
/// them again against each other).
fn lane_options(py: Python<'_>, p: &PluginSpec) -> PyResult<LaneOptions> {
    let on_failure = match (p.failure_policy.as_str(), &p.dlq) {
        ("dead_letter", Some(topic)) => OnFailure::DeadLetter(topic.clone()),
        ("retry", _) => OnFailure::RetryForever,
        ("stop", _) => OnFailure::Stop,
        (other, _) => {
            let message = format!("plugin {:?}: on_failure {other:?} needs a dlq topic or is unknown", p.name);
            return Err(to_pyerr(py, &Error::Config(message)));
        }
    };
    Ok(LaneOptions {
        name: p.name.clone(),
        batch_size: p.batch_size,
        concurrency: p.concurrency,
        max_queued: p.max_queued,
        max_queued_bytes: p.max_queued_bytes,
        timeout: p.timeout.map(|t| duration(py, t, "timeout")).transpose()?,
        rate_limit: p.rate_limit.as_ref().map(|r| r.with_default_burst(p.batch_size)),
        retry: RetryPolicy {
            retries: p.retries,
            first_backoff: duration(py, p.backoff.0, "backoff")?,
            max_backoff: duration(py, p.backoff.1, "backoff")?,
            on_failure,
        },
    })
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyConsumer>()
}
