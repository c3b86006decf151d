//! The worker threads' life on the Python side: each attaches to the interpreter once, and
//! releases the GIL while it waits for a task, so the GIL is held only to build a batch's
//! objects and to call the plugin (granian's pattern). A worker whose call returned reports
//! it and takes the next ready call in one trip, still holding the GIL: a round of ready
//! calls costs one GIL hand-over, not one per call. After `ATTACHED_CALLS` calls in a row it
//! releases the GIL once, so other Python threads get their turn.
//!
//! An `async` plugin's call is handed to the app's event loop and the worker moves on: the
//! call completes from the loop's thread, so a lane's concurrency counts calls in flight,
//! not threads. Its deadline cancels it.
//!
//! Outcomes: a call succeeds when it returns (its value is ignored), or fails when it raises,
//! under the plugin's policy. Two mistakes that would skip the plugin's body fail the call
//! too: a sync plugin returning an awaitable (a coroutine, a future) or a generator. An
//! exception that asks the process to exit (`SystemExit`, `KeyboardInterrupt`) is fatal:
//! the run ends with it whatever the policy. A worker thread that panics fails the run.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyString, PyType};

use super::batch::PyBatch;
use super::errors::exception;
use super::lifecycle;
use crate::core::errors::Error;
use crate::core::limit::RateLimit;
use crate::core::sched::{CallFailure, Task};
use crate::engine::{Completer, Host, Worker};

/// `fastconsume.RateLimit`, read by attribute.
#[derive(FromPyObject)]
pub struct RateLimitSpec {
    #[pyo3(attribute)]
    pub per_second: f64,
    /// `None`: the batch size charged.
    #[pyo3(attribute)]
    pub burst: Option<u32>,
}

impl RateLimitSpec {
    pub fn with_default_burst(&self, batch_size: usize) -> RateLimit {
        let burst = self.burst.unwrap_or_else(|| u32::try_from(batch_size).unwrap_or(u32::MAX));
        RateLimit { per_second: self.per_second, burst }
    }
}

/// A plugin as Python registered it: `fastconsume._plugins.Plugin`, read by attribute.
#[derive(FromPyObject)]
pub struct PluginSpec {
    #[pyo3(attribute)]
    pub name: String,
    /// The callable: sync, or an `async` function handed to the event loop.
    #[pyo3(attribute)]
    pub func: Py<PyAny>,
    #[pyo3(attribute)]
    pub is_async: bool,
    #[pyo3(attribute)]
    pub batch_size: usize,
    #[pyo3(attribute)]
    pub concurrency: usize,
    #[pyo3(attribute)]
    pub max_queued: usize,
    #[pyo3(attribute)]
    pub max_queued_bytes: usize,
    /// Seconds.
    #[pyo3(attribute)]
    pub timeout: Option<f64>,
    #[pyo3(attribute)]
    pub rate_limit: Option<RateLimitSpec>,
    #[pyo3(attribute)]
    pub retries: u32,
    /// First and largest backoff, in seconds.
    #[pyo3(attribute)]
    pub backoff: (f64, f64),
    #[pyo3(attribute)]
    pub dlq: Option<String>,
    /// `"dead_letter"`, `"retry"` or `"stop"`.
    #[pyo3(attribute)]
    pub failure_policy: String,
}

/// A plugin raised (or an async call was cancelled at its deadline). Boxed: it travels in
/// `Result`s on the failure path only.
pub struct PluginFailure(Box<Failure>);

struct Failure {
    error: PyErr,
    /// What a `PluginError` says if this failure ends the run.
    message: String,
    kind: String,
    detail: String,
    /// From `PartialFailure`: the positions in the call's batch that failed.
    positions: Option<Vec<usize>>,
    fatal: bool,
}

impl PluginFailure {
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let Failure { error, message, .. } = *self.0;
        let plugin_error = exception(py, "PluginError", message);
        plugin_error.set_cause(py, Some(error));
        plugin_error
    }

    /// Reads what failed from a raised exception; `PartialFailure` names positions and,
    /// through `error` or its `__cause__`, the error behind them. `fatal`: the run must end
    /// with it (also implied by `SystemExit` and `KeyboardInterrupt`).
    fn new(py: Python<'_>, error: PyErr, plugin: &str, task: &Task, fatal: bool) -> Self {
        let value = error.value(py);
        let fatal = fatal || value.is_instance_of::<PySystemExit>() || value.is_instance_of::<PyKeyboardInterrupt>();
        let mut positions = None;
        let mut cause = value.clone().into_any();
        if let Ok(partial) = partial_failure_type(py) {
            if value.is_instance(partial).unwrap_or(false) {
                positions = value.getattr("indexes").and_then(|i| i.extract::<Vec<usize>>()).ok();
                let named = value.getattr("error").ok().filter(|e| !e.is_none());
                if let Some(behind) = named.or_else(|| value.getattr("__cause__").ok().filter(|e| !e.is_none())) {
                    cause = behind;
                }
            }
        }
        let kind = cause.get_type().qualname().map_or_else(|_| "Exception".to_string(), |n| n.to_string());
        let detail = cause.str().map_or_else(|_| String::new(), |s| s.to_string_lossy().into_owned());
        let chunk = &task.chunk;
        let mut message = format!(
            "plugin {plugin:?} failed on {} (attempt {}): {}",
            chunk.describe(),
            chunk.attempt,
            value.repr().map_or_else(|_| "?".to_string(), |r| r.to_string()),
        );
        if fatal {
            message.push_str("; the run stops whatever the plugin's policy (not retried, not dead-lettered)");
        }
        PluginFailure(Box::new(Failure { error, message, kind, detail, positions, fatal }))
    }
}

impl CallFailure for PluginFailure {
    fn failed_positions(&self) -> Option<&[usize]> {
        self.0.positions.as_deref()
    }

    fn kind(&self) -> String {
        self.0.kind.clone()
    }

    fn detail(&self) -> String {
        self.0.detail.clone()
    }

    fn fatal(&self) -> bool {
        self.0.fatal
    }
}

fn partial_failure_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static PARTIAL_FAILURE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    PARTIAL_FAILURE.import(py, "fastconsume.errors", "PartialFailure")
}

/// A sync plugin returned something that means its work did not happen: the error that
/// fails the call, saying what to write instead. `None` for any other value, which is
/// ignored. Only looked at when the call returned something other than `None`.
fn returned_mistake(py: Python<'_>, plugin: &str, returned: &Bound<'_, PyAny>) -> Option<PyErr> {
    static COROUTINE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static GENERATOR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static ASYNC_GENERATOR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let is = |cell: &'static PyOnceLock<Py<PyType>>, name: &str| {
        cell.import(py, "types", name).is_ok_and(|t| returned.is_instance(t).unwrap_or(false))
    };
    let (message, close) = if is(&COROUTINE, "CoroutineType") {
        let message = format!(
            "plugin {plugin:?} returned a coroutine, which fastconsume does not await, so its body never ran: \
             declare the plugin `async def` (or await the coroutine inside an `async def` plugin)"
        );
        (message, true)
    } else if is(&GENERATOR, "GeneratorType") {
        let message = format!(
            "plugin {plugin:?} returned a generator, so its body never ran: process the batch in the call \
             itself instead of yielding (a generator runs only when iterated)"
        );
        (message, true)
    } else if is(&ASYNC_GENERATOR, "AsyncGeneratorType") {
        let message = format!(
            "plugin {plugin:?} returned an async generator, so its body never ran: declare it `async def` \
             without `yield`"
        );
        (message, false)
    } else if returned.hasattr("__await__").unwrap_or(false) {
        let kind = returned.get_type().qualname().map_or_else(|_| "awaitable".to_string(), |n| n.to_string());
        let message = format!(
            "plugin {plugin:?} returned an awaitable ({kind}), which fastconsume does not await: declare the \
             plugin `async def` and await it there"
        );
        (message, false)
    } else {
        return None;
    };
    // Closed, so that Python does not warn later that a coroutine was never awaited.
    if close {
        if let Err(error) = returned.call_method0("close") {
            error.write_unraisable(py, Some(returned));
        }
    }
    Some(PyTypeError::new_err(message))
}

/// Fails the run if the worker thread it watches unwinds, instead of leaving the engine
/// waiting for a call that will never complete.
struct WorkerWatch<'a>(&'a Worker<PluginFailure>);

impl Drop for WorkerWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail_run(Error::Internal("a worker thread panicked; the run cannot go on".into()));
        }
    }
}

struct Lane {
    func: Py<PyAny>,
    name: Py<PyString>,
    is_async: bool,
    timeout: Option<Duration>,
}

/// The callables, by lane, and the event loop of the async ones.
pub struct Plugins {
    lanes: Vec<Lane>,
    /// `fastconsume._plugins.AsyncLoop`, when some plugin is async.
    event_loop: Option<Py<PyAny>>,
}

/// How many calls a worker makes in a row without releasing the GIL between them.
const ATTACHED_CALLS: u32 = 32;

impl Host for Plugins {
    type Failure = PluginFailure;

    /// One worker thread's whole life: attached to the interpreter once, detached while it
    /// waits for a call.
    fn serve(&self, worker: &Worker<PluginFailure>) {
        let _watch = WorkerWatch(worker);
        lifecycle::worker_attach(|py| {
            let mut next = lifecycle::worker_detach(py, || worker.next());
            let mut in_a_row = 0;
            while let Some(task) = next {
                if self.lanes[task.lane].is_async {
                    self.start_async(py, worker, task);
                    next = lifecycle::worker_detach(py, || worker.next());
                    continue;
                }
                let started = Instant::now();
                let outcome = self.call(py, &task);
                let took = started.elapsed();
                in_a_row += 1;
                next = if in_a_row < ATTACHED_CALLS {
                    worker.complete_and_next(task, outcome, took)
                } else {
                    lifecycle::worker_detach(py, || worker.complete(task, outcome, took));
                    None
                };
                if next.is_none() {
                    in_a_row = 0;
                    next = lifecycle::worker_detach(py, || worker.next());
                }
            }
        });
    }
}

impl Plugins {
    pub fn new(py: Python<'_>, specs: &[PluginSpec], event_loop: Option<Py<PyAny>>) -> Self {
        let lanes = specs
            .iter()
            .map(|s| Lane {
                func: s.func.clone_ref(py),
                name: PyString::intern(py, &s.name).unbind(),
                is_async: s.is_async,
                timeout: s.timeout.and_then(|t| Duration::try_from_secs_f64(t).ok()),
            })
            .collect();
        Plugins { lanes, event_loop }
    }

    fn batch(&self, py: Python<'_>, task: &Task) -> PyResult<Py<PyBatch>> {
        let lane = &self.lanes[task.lane];
        Py::new(py, PyBatch::new(&task.chunk, lane.name.clone_ref(py), task.deadline))
    }

    fn name(&self, py: Python<'_>, task: &Task) -> String {
        self.lanes[task.lane].name.bind(py).to_string_lossy().into_owned()
    }

    fn failure(&self, py: Python<'_>, error: PyErr, task: &Task) -> PluginFailure {
        PluginFailure::new(py, error, &self.name(py, task), task, false)
    }

    fn call(&self, py: Python<'_>, task: &Task) -> Result<(), PluginFailure> {
        let result = self.batch(py, task).and_then(|batch| self.lanes[task.lane].func.call1(py, (batch,)));
        match result {
            Ok(returned) if returned.is_none(py) => Ok(()),
            Ok(returned) => match returned_mistake(py, &self.name(py, task), returned.bind(py)) {
                Some(error) => Err(self.failure(py, error, task)),
                None => Ok(()),
            },
            Err(error) => Err(self.failure(py, error, task)),
        }
    }

    /// An async call that could not be handed to the event loop fails (its policy applies).
    fn fail_to_start(&self, py: Python<'_>, worker: &Worker<PluginFailure>, task: Task, error: PyErr) {
        let failure = self.failure(py, error, &task);
        lifecycle::worker_detach(py, || worker.complete(task, Err(failure), Duration::ZERO));
    }

    /// Hands an async call to the event loop; it completes through `Completion`.
    fn start_async(&self, py: Python<'_>, worker: &Worker<PluginFailure>, task: Task) {
        let lane = &self.lanes[task.lane];
        let (call, has_deadline) = (task.call, task.deadline.is_some());
        let Some(event_loop) = &self.event_loop else {
            let error = pyo3::exceptions::PyRuntimeError::new_err("async plugin without an event loop");
            return self.fail_to_start(py, worker, task, error);
        };
        let batch = match self.batch(py, &task) {
            Ok(batch) => batch,
            Err(error) => return self.fail_to_start(py, worker, task, error),
        };
        // The task goes in once the completion exists, so a failure to make it still reports.
        let completion = Completion {
            completer: worker.completer(),
            task: Mutex::new(None),
            started: Instant::now(),
            name: lane.name.clone_ref(py),
            timeout: lane.timeout,
        };
        let completion = match Py::new(py, completion) {
            Ok(completion) => completion,
            Err(error) => return self.fail_to_start(py, worker, task, error),
        };
        *completion.get().task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        match event_loop.call_method1(py, "start", (lane.func.clone_ref(py), batch, completion.clone_ref(py))) {
            Ok(handle) if has_deadline => {
                let cancel = Box::new(move || {
                    // Run by the engine's thread: not at all once the interpreter is closing.
                    let Some(gate) = lifecycle::Gate::enter() else { return };
                    Python::try_attach(|py| {
                        drop(gate);
                        if let Err(error) = handle.call_method0(py, "cancel") {
                            error.write_unraisable(py, None);
                        }
                    });
                });
                lifecycle::worker_detach(py, || worker.cancel_with(call, cancel));
            }
            Ok(_) => {}
            Err(error) => completion.get().fail_to_start(py, error),
        }
    }
}

/// Reports an async call's outcome to the engine; called by its asyncio task when done, on the
/// event loop's thread.
#[pyclass(frozen, module = "fastconsume._core", name = "Completion")]
pub struct Completion {
    completer: Completer<PluginFailure>,
    task: Mutex<Option<Task>>,
    started: Instant,
    name: Py<PyString>,
    timeout: Option<Duration>,
}

impl Completion {
    fn take(&self) -> Option<Task> {
        self.task.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn report(&self, py: Python<'_>, task: Task, outcome: Result<(), PyErr>, fatal: bool) {
        let took = self.started.elapsed();
        let name = self.name.bind(py).to_string_lossy().into_owned();
        let outcome = outcome.map_err(|error| PluginFailure::new(py, error, &name, &task, fatal));
        lifecycle::detach(py, || self.completer.complete(task, outcome, took));
    }

    fn fail_to_start(&self, py: Python<'_>, error: PyErr) {
        if let Some(task) = self.take() {
            self.report(py, task, Err(error), false);
        }
    }
}

#[pymethods]
impl Completion {
    /// `ended`: how the call ended, as `cancelled()` and `exception()` (an `asyncio.Task`,
    /// done, or `fastconsume._plugins.Outcome`), and `fatal` when the run must end with it.
    /// Never raises: an exception here would only be logged by the event loop, and the call
    /// never reported.
    fn __call__(&self, py: Python<'_>, ended: Bound<'_, PyAny>) {
        let Some(task) = self.take() else { return };
        let fatal = ended.getattr("fatal").is_ok_and(|f| f.is_truthy().unwrap_or(false));
        let outcome = match ended.call_method0("cancelled").and_then(|c| c.is_truthy()) {
            Ok(true) => {
                let timeout = self.timeout.map_or_else(String::new, |t| format!(" of {:.3} s", t.as_secs_f64()));
                Err(pyo3::exceptions::PyTimeoutError::new_err(format!("cancelled at its deadline (timeout{timeout})")))
            }
            Ok(false) => match ended.call_method0("exception") {
                Ok(exception) if exception.is_none() => Ok(()),
                Ok(exception) => Err(PyErr::from_value(exception)),
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        self.report(py, task, outcome, fatal);
    }
}
