//! Routes the core's `log` records, librdkafka's included (rust-rdkafka logs them with the
//! target `librdkafka`), to Python's `logging`: the logger `fastconsume`, and
//! `fastconsume.librdkafka` for librdkafka's own lines. Records below INFO are dropped
//! before any formatting.
//!
//! A record is handed to one thread that attaches the GIL to emit it, never emitted by the
//! thread that logs: that one may hold a lock (the scheduler's, or one inside librdkafka) that a
//! thread holding the GIL is waiting for. Handing off never blocks; if Python falls 1,024
//! records behind, the excess is counted and reported once it catches up. Once the
//! interpreter is closing (an `atexit` hook), the bridge stops and later records are dropped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;

use super::lifecycle::Gate;

const BACKLOG: usize = 1024;

struct Line {
    level: u8,
    logger: &'static str,
    message: String,
}

struct PythonLog {
    lines: SyncSender<Line>,
    dropped: AtomicU64,
}

impl Log for PythonLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => 40,
            Level::Warn => 30,
            Level::Info => 20,
            Level::Debug | Level::Trace => 10,
        };
        let logger = if record.target().starts_with("librdkafka") { "fastconsume.librdkafka" } else { "fastconsume" };
        let line = Line { level, logger, message: record.args().to_string() };
        PENDING.fetch_add(1, Ordering::SeqCst); // before the send: the bridge may emit it at once
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.lines.try_send(line) {
            PENDING.fetch_sub(1, Ordering::SeqCst);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<PythonLog> = OnceLock::new();
/// Records handed to the bridge and not emitted yet.
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// How long an error raised from the core waits for the log lines queued before it.
pub(super) const LOG_LINES_BEFORE_AN_ERROR: Duration = Duration::from_millis(500);

/// Waits, at most `timeout`, until the bridge has emitted every record handed to it so far
/// (the interpreter's exit waits for the lines of a run's last moments). Call it detached.
pub(super) fn flush(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while PENDING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn emit(lines: &Receiver<Line>) {
    while let Ok(line) = lines.recv() {
        let dropped = LOGGER.get().map_or(0, |l| l.dropped.swap(0, Ordering::Relaxed));
        // Not at all once the interpreter shuts down: librdkafka's threads may outlive it, and
        // attaching during finalization would abort the process (see `lifecycle`).
        let Some(gate) = Gate::enter() else {
            PENDING.fetch_sub(1, Ordering::SeqCst);
            return;
        };
        let attached = Python::try_attach(|py| {
            drop(gate);
            let logged = py.import("logging").and_then(|logging| {
                if dropped > 0 {
                    let logger = logging.call_method1("getLogger", ("fastconsume",))?;
                    logger.call_method1("warning", ("%d log records were dropped: Python fell behind", dropped))?;
                }
                let logger = logging.call_method1("getLogger", (line.logger,))?;
                logger.call_method1("log", (line.level, "%s", line.message))
            });
            if let Err(error) = logged {
                error.write_unraisable(py, None);
            }
        });
        PENDING.fetch_sub(1, Ordering::SeqCst);
        if attached.is_none() {
            return;
        }
    }
}

/// Installs the bridge once per process; a logger installed by someone else stays.
pub fn install() -> PyResult<()> {
    if LOGGER.get().is_some() {
        return Ok(());
    }
    let (sender, receiver) = sync_channel(BACKLOG);
    let logger = LOGGER.get_or_init(|| PythonLog { lines: sender, dropped: AtomicU64::new(0) });
    std::thread::Builder::new()
        .name("fastconsume-log".into())
        .spawn(move || emit(&receiver))
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start the log thread: {e}")))?;
    if log::set_logger(logger).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
    Ok(())
}
