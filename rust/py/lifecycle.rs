//! The interpreter's end, counting stop signals where they are delivered, and signals once
//! a run is over.
//!
//! On Python before 3.13 a thread that takes the GIL while the interpreter finalizes is ended
//! with `pthread_exit`. On a thread with Rust frames that forced unwind reaches a
//! `catch_unwind` (the thread's start, a pyo3 trampoline) and glibc aborts the process
//! ("FATAL: exception not rethrown"). So no Rust thread may attach once finalization begins:
//!
//! - every place where a native thread attaches or re-attaches goes through [`Gate`]: after
//!   [`close`] (run by an `atexit` hook, before finalization) such a thread parks for good
//!   instead, or gives up attaching (the log bridge);
//! - [`close`] reports the worker threads still inside a plugin call: those re-take the GIL
//!   inside the interpreter (after a `time.sleep`, an I/O wait), beyond any gate, so the caller must
//!   then leave with `os._exit` rather than finalize.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyModule;

/// Set once by [`close`]; never cleared (the interpreter does not come back).
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Threads between their check of `CLOSED` and the end of their attach.
static ATTACHING: AtomicUsize = AtomicUsize::new(0);
/// Worker threads attached: in a plugin call, or about to start one.
static IN_CALL: AtomicUsize = AtomicUsize::new(0);
/// `Consumer.run` calls not returned yet.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Counts a run as going on while it lives.
pub(super) struct Running(());

impl Running {
    pub(super) fn start() -> Running {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pass through the gate: while it lives, [`close`] waits. Taken just before attaching and
/// dropped once attached. `CLOSED` and `ATTACHING` are both `SeqCst`, so either the thread
/// sees `CLOSED` or `close` sees it counted (Dekker's handshake); no lock is shared with a
/// thread holding the GIL.
pub(super) struct Gate(());

impl Gate {
    /// `None` once the interpreter is closing: the caller must not attach.
    pub(super) fn enter() -> Option<Gate> {
        ATTACHING.fetch_add(1, Ordering::SeqCst);
        if CLOSED.load(Ordering::SeqCst) {
            ATTACHING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Gate(()))
    }

    /// Like [`Gate::enter`], but a thread that must not attach parks for good: the process
    /// is ending, and whatever it would have done needs Python.
    pub(super) fn enter_or_park() -> Gate {
        Gate::enter().unwrap_or_else(|| park_forever())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        ATTACHING.fetch_sub(1, Ordering::SeqCst);
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// `py.detach(f)`, re-attaching only while the interpreter is not closing (else the thread
/// parks and this never returns).
pub(super) fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    let (value, gate) = py.detach(|| {
        let value = f();
        (value, Gate::enter_or_park())
    });
    drop(gate); // attached again: close() may go on
    value
}

/// [`detach`] for a worker that is attached for a plugin call: while detached it does not
/// count as in a call.
pub(super) fn worker_detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    IN_CALL.fetch_sub(1, Ordering::SeqCst);
    let (value, gate) = py.detach(|| {
        let value = f();
        (value, Gate::enter_or_park())
    });
    // Counted before the gate is released, so close() never misses a worker about to call.
    IN_CALL.fetch_add(1, Ordering::SeqCst);
    drop(gate);
    value
}

/// A worker thread's whole attached life: `f` runs attached and counted as in a call (see
/// [`worker_detach`]); nothing runs if the interpreter is already closing.
pub(super) fn worker_attach(f: impl FnOnce(Python<'_>)) {
    let Some(gate) = Gate::enter() else { return };
    Python::attach(|py| {
        IN_CALL.fetch_add(1, Ordering::SeqCst);
        drop(gate);
        f(py);
        IN_CALL.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Closes the gate and returns how many worker threads are still in a plugin call and how
/// many runs have not returned (one still stopping, after a second signal). Called with the
/// GIL held (see `py::close_interpreter_gate`); waits detached, so threads already past the
/// gate can finish attaching.
pub(super) fn close(py: Python<'_>) -> (usize, usize) {
    CLOSED.store(true, Ordering::SeqCst);
    py.detach(|| {
        // Threads past the gate only wait for the GIL, which this thread has released.
        while ATTACHING.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    (IN_CALL.load(Ordering::SeqCst), RUNS.load(Ordering::SeqCst))
}

/// The exit code of [`exit_at_once`]'s handler.
static EXIT_CODE: AtomicI32 = AtomicI32::new(130);

extern "C" fn exit_at_once_handler(_signum: libc::c_int) {
    const MESSAGE: &[u8] = b"fastconsume: second signal: exiting at once\n";
    // Only async-signal-safe calls: write(2) and _exit(2).
    // SAFETY: MESSAGE is a valid buffer of that length; fd 2 may be closed, which write reports.
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        libc::_exit(EXIT_CODE.load(Ordering::Relaxed));
    }
}

/// Makes each of `signals` end the process at once with `code` (after one line on stderr),
/// whatever Python is doing, finalization included: for the signals after a run stopped by
/// a first one. A native handler, because Python's run only between bytecodes, on the main
/// thread, and not at all late in finalization.
#[pyfunction]
#[pyo3(name = "_exit_at_once_on")]
fn exit_at_once_on(signals: Vec<i32>, code: i32) -> PyResult<()> {
    EXIT_CODE.store(code, Ordering::Relaxed);
    for signum in signals {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only makes
        // async-signal-safe calls.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = exit_at_once_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signum, &raw const action, std::ptr::null_mut())
        };
        if installed != 0 {
            let error = std::io::Error::last_os_error();
            return Err(pyo3::exceptions::PyOSError::new_err(format!("cannot handle signal {signum}: {error}")));
        }
    }
    Ok(())
}

/// Signal numbers [`count_signals`] accepts (Linux's `NSIG` is 65).
const SIGNALS: usize = 65;
/// Deliveries of the signals [`count_signals`] counts, since the process began.
static DELIVERIES: AtomicUsize = AtomicUsize::new(0);
/// Per signal number, the handler each delivery is passed on to after it is counted
/// (Python's own C handler); 0 where none was wrapped.
static CHAINED: [AtomicUsize; SIGNALS] = [const { AtomicUsize::new(0) }; SIGNALS];

extern "C" fn count_then_chain(signum: libc::c_int) {
    // Counted before Python's handler trips its flag: a Python handler that runs for this
    // delivery (or after it) always reads a count that includes it, whichever thread the
    // kernel chose and however Python's handlers nest.
    DELIVERIES.fetch_add(1, Ordering::SeqCst);
    let next = usize::try_from(signum).ok().and_then(|i| CHAINED.get(i)).map_or(0, |h| h.load(Ordering::SeqCst));
    if next != 0 {
        // SAFETY: `count_signals` stored only a real one-argument handler (not SIG_DFL or
        // SIG_IGN, not an SA_SIGINFO one) taken from sigaction; Python's is async-signal-safe.
        let handler = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(next) };
        handler(signum);
    }
}

/// Counts every delivery of `signals` (atomically, in the process's native handler) and then
/// passes it on to the handler installed now, which must be Python's (`signal.signal` with a
/// Python callable). Lasts until the signal's handler is set again.
#[pyfunction]
#[pyo3(name = "_count_signals")]
fn count_signals(signals: Vec<i32>) -> PyResult<()> {
    let ours = count_then_chain as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signum in signals {
        let Some(chained) = usize::try_from(signum).ok().filter(|&i| i > 0).and_then(|i| CHAINED.get(i)) else {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("no such signal: {signum}")));
        };
        // SAFETY: a zeroed sigaction is a valid buffer for sigaction to fill in.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into `current`.
        if unsafe { libc::sigaction(signum, std::ptr::null(), &raw mut current) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(pyo3::exceptions::PyOSError::new_err(format!(
                "cannot read signal {signum}'s handler: {error}"
            )));
        }
        if current.sa_sigaction == ours {
            continue; // counted already
        }
        if current.sa_flags & libc::SA_SIGINFO != 0
            || current.sa_sigaction == libc::SIG_DFL
            || current.sa_sigaction == libc::SIG_IGN
        {
            let message = format!("signal {signum} has no Python handler whose deliveries could be counted");
            return Err(pyo3::exceptions::PyRuntimeError::new_err(message));
        }
        chained.store(current.sa_sigaction, Ordering::SeqCst); // before any delivery can reach ours
        let mut action = current; // Python's flags and mask (no SA_RESTART: waits see EINTR)
        action.sa_sigaction = ours;
        // SAFETY: `action` is a valid sigaction; the handler makes only async-signal-safe calls.
        if unsafe { libc::sigaction(signum, &raw const action, std::ptr::null_mut()) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(pyo3::exceptions::PyOSError::new_err(format!("cannot count signal {signum}: {error}")));
        }
    }
    Ok(())
}

/// How many deliveries of the signals [`count_signals`] counts came since the process began.
#[pyfunction]
#[pyo3(name = "_signal_deliveries")]
fn signal_deliveries() -> usize {
    DELIVERIES.load(Ordering::SeqCst)
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(count_signals, m)?)?;
    m.add_function(wrap_pyfunction!(signal_deliveries, m)?)?;
    m.add_function(wrap_pyfunction!(exit_at_once_on, m)?)
}
