//! The engine: a run's threads around the scheduler. It connects (the Kafka side), starts
//! the workers, waits (asleep) for a reason to end, then shuts down in order: stop fetching,
//! finish running calls (bounded), commit, leave.
//!
//! Threads: one source thread (the poll loop, which also drives the timer wheel), `workers`
//! worker threads, the caller's thread, which waits, and a dead-letter producer when a plugin
//! has a dead-letter topic. Their number does not change during a run.
//!
//! Delivery: at least once. A partition's offset is committed up to where every plugin has
//! finished its calls (see `core::offsets`): from the wheel, synchronously on revoke, and at
//! the end, after the drain, so what finished while it waited is included.

mod dead_letters;
mod intake;
mod options;
mod shared;
pub mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

pub use self::options::RunOptions;
pub use self::workers::{Completer, Host, Worker};

use self::shared::Shared;
use crate::core::errors::Error;
use crate::core::lane::OnFailure;
use crate::core::sched::{CallFailure, Ending, Late, Snapshot};
use crate::kafka::commit::commit_sync;
use crate::kafka::config::SourceConfig;
use crate::kafka::dlq::DeadLetters;
use crate::kafka::intake::Intake;
use crate::kafka::source::Source;

/// Why a run ended early.
#[derive(Debug)]
pub enum RunError<E> {
    Core(Error),
    Plugin(E),
}

impl<E> From<Error> for RunError<E> {
    fn from(error: Error) -> Self {
        RunError::Core(error)
    }
}

/// Runs consumers, one run at a time. `stop()` may come from any thread; one that comes
/// before a run ends that run at once.
pub struct Engine<E> {
    stop: AtomicBool,
    current: Mutex<Option<Arc<Shared<E>>>>,
}

impl<E> Default for Engine<E> {
    fn default() -> Self {
        Engine { stop: AtomicBool::new(false), current: Mutex::default() }
    }
}

impl<E: CallFailure + 'static> Engine<E> {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(shared) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            shared.request_stop();
        }
    }

    /// The current (or last) run's counters.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|shared| shared.snapshot())
    }

    /// Consumes until `stop()`, a plugin failure, or (with `idle_timeout`) until nothing new
    /// arrived for that long and every plugin is done. `host` makes the calls, on
    /// `options.workers` threads.
    pub fn run<H: Host<Failure = E>>(
        &self,
        config: &SourceConfig,
        options: &RunOptions,
        host: Arc<H>,
    ) -> Result<(), RunError<E>> {
        // Until this run's scheduler exists, there are no counters to show: not the last run's.
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
        options.validate()?;
        let dead_letters = if options.lanes.iter().any(|l| matches!(l.retry.on_failure, OnFailure::DeadLetter(_))) {
            Some(Arc::new(DeadLetters::new(&config.bootstrap, &config.kafka, options.dlq_timeout)?))
        } else {
            None
        };
        // Each run has its own scheduler and stop: a call that fails late (after a timed-out
        // drain) must not stop the next run. A stop() before this one is handed over once it
        // can reach it.
        let shared = Shared::new(options.lanes.clone(), dead_letters, config.commit_interval())?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(shared.clone());
        if self.stop.load(Ordering::Acquire) {
            shared.request_stop();
        }
        let outcome = Self::run_shared(&shared, config, options, &host);
        self.stop.store(false, Ordering::Release);
        outcome
    }

    fn run_shared<H: Host<Failure = E>>(
        shared: &Arc<Shared<E>>,
        config: &SourceConfig,
        options: &RunOptions,
        host: &Arc<H>,
    ) -> Result<(), RunError<E>> {
        let intake: Arc<dyn Intake> = shared.clone();
        let source = match Source::start(config, options.shape(), intake) {
            Ok(source) => source,
            Err(error) => {
                shared.close(); // the dead-letter producer must not outlive the run
                return Err(error.into());
            }
        };
        shared.attach(&source.consumer);
        let workers = match workers::spawn(shared, options.workers, host) {
            Ok(workers) => workers,
            Err(error) => {
                shared.request_stop();
                shared.close();
                drop(source.join());
                return Err(error.into());
            }
        };

        let ending = shared.wait_for_ending();
        // Stop fetching first, then finish what is running, then commit and leave.
        shared.request_stop();
        let consumer = source.join();
        let (finished, late_failure) = shared.drain(options.shutdown_timeout);
        if !finished {
            log::warn!("shutdown: plugin calls still running after {:?}; leaving them", options.shutdown_timeout);
        }
        commit_sync(&consumer, &**shared, &shared.offsets_to_commit(), "final commit");
        shared.detach();
        drop(consumer); // closes: the revoke callback runs and the group is left
        shared.close();
        if finished {
            for handle in workers {
                if handle.join().is_err() {
                    log::error!("a worker thread panicked");
                }
            }
        }
        match ending {
            Ending::Failed(error) => Err(RunError::Plugin(error)),
            Ending::SourceFailed(error) => Err(RunError::Core(error)),
            Ending::Stopped | Ending::Drained => match late_failure {
                None => Ok(()),
                Some(Late::Plugin(error)) => Err(RunError::Plugin(error)),
                Some(Late::Core(error)) => Err(RunError::Core(error)),
            },
        }
    }
}

#[cfg(test)]
mod tests;
