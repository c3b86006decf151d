//! Routes the core's `log` records, librdkafka's included (rust-rdkafka logs them with the
//! target `librdkafka`), to Python's `logging`: the logger `fastconsume`, and
//! `fastconsume.librdkafka` for librdkafka's own lines. Records below INFO are dropped
//! before any formatting.
//!
//! A record is handed to one thread that attaches the GIL to emit it, never emitted by the
//! thread that logs: that one may hold a lock (the pool's, or one inside librdkafka) that a
//! thread holding the GIL is waiting for. Handing off never blocks; if Python falls 1,024
//! records behind, the excess is counted and reported once it catches up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;

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
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.lines.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<PythonLog> = OnceLock::new();

fn emit(lines: &Receiver<Line>) {
    while let Ok(line) = lines.recv() {
        let dropped = LOGGER.get().map_or(0, |l| l.dropped.swap(0, Ordering::Relaxed));
        // Not at all once the interpreter shuts down: librdkafka's threads may outlive it.
        let attached = Python::try_attach(|py| {
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
