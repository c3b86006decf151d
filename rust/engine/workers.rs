//! The worker threads, generic over the host that makes the calls (`py` supplies Python's).
//! A worker sleeps until a job is ready; it runs cancels of async calls itself (they may wait
//! for the interpreter, which the source thread must never do) and hands calls to the host.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::shared::Shared;
use crate::core::errors::Error;
use crate::core::sched::{CallFailure, Cancel, Job, Task};

/// What makes the calls.
pub trait Host: Send + Sync + 'static {
    type Failure: CallFailure + 'static;
    /// One worker thread's whole life: take calls with `worker.next()` until `None`, and
    /// report each with `worker.complete`, or later through `worker.completer()` for a
    /// call that completes on another thread.
    fn serve(&self, worker: &Worker<Self::Failure>);
}

/// A worker thread's handle on the run.
pub struct Worker<E> {
    shared: Arc<Shared<E>>,
}

/// Reports calls that complete away from their worker (async calls, on the event loop's
/// thread).
pub struct Completer<E> {
    shared: Arc<Shared<E>>,
}

impl<E: CallFailure + 'static> Completer<E> {
    pub fn complete(&self, task: Task, outcome: Result<(), E>, took: Duration) {
        self.shared.complete(task, outcome, took);
    }
}

impl<E: CallFailure + 'static> Worker<E> {
    /// Blocks until a call is ready; `None` once the run is over. Cancels due meanwhile
    /// run here, on this worker.
    pub fn next(&self) -> Option<Task> {
        loop {
            match self.shared.next_job()? {
                Job::Call(task) => return Some(task),
                Job::Cancel(cancel) => cancel(),
            }
        }
    }

    pub fn complete(&self, task: Task, outcome: Result<(), E>, took: Duration) {
        self.shared.complete(task, outcome, took);
    }

    /// Reports a call and, in the same trip, takes the next one if it is ready now, without
    /// sleeping: `None` means call `next` (which may sleep). Cancels due run here first.
    pub fn complete_and_next(&self, task: Task, outcome: Result<(), E>, took: Duration) -> Option<Task> {
        let mut job = self.shared.complete_and_take(task, outcome, took);
        loop {
            match job? {
                Job::Call(task) => return Some(task),
                Job::Cancel(cancel) => cancel(),
            }
            job = self.shared.try_next_job();
        }
    }

    pub fn completer(&self) -> Completer<E> {
        Completer { shared: self.shared.clone() }
    }

    /// An asynchronous call can be cancelled with `cancel` until it completes; if its
    /// deadline has passed already, it is cancelled now, here.
    pub fn cancel_with(&self, call: u64, cancel: Cancel) {
        if let Some(cancel) = self.shared.apply(|sched| sched.register_cancel(call, cancel)) {
            cancel();
        }
    }

    /// The thread cannot go on (it panicked): the run fails instead of waiting for it.
    pub fn fail_run(&self, error: Error) {
        self.shared.fail_run(error);
    }
}

pub(super) fn spawn<H: Host>(
    shared: &Arc<Shared<H::Failure>>,
    count: usize,
    host: &Arc<H>,
) -> Result<Vec<JoinHandle<()>>, Error> {
    (0..count)
        .map(|i| {
            let worker = Worker { shared: shared.clone() };
            let host = host.clone();
            shared.worker_started();
            std::thread::Builder::new()
                .name(format!("fastconsume-worker-{i}"))
                .spawn(move || host.serve(&worker))
                .map_err(|e| Error::Internal(format!("cannot start worker thread {i}: {e}")))
        })
        .collect()
}
