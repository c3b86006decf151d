//! The scheduler behind one lock, shared by the source thread, the workers, the engine's
//! thread and librdkafka's delivery callbacks. Every event runs under the lock, taken a few
//! times per batch (never per message); whatever it leaves to do (wake threads, log, write
//! dead letters, drop a failure) runs after the lock is released, so nothing that may block,
//! take the interpreter or call librdkafka ever runs under it.
//!
//! Workers sleep on `work` until a job is ready; a worker awake runs every ready job before
//! it sleeps, so a sleeping one is woken only when none is awake, or when work has waited
//! `HELP_AFTER` behind running calls (see `core::sched::dispatch`). The engine's thread, a
//! revoke and a drain sleep on `progress`, which a call's completion signals only when one
//! of them waits for it (a revoke or a drain), or the run ends: not once per call.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::core::errors::{Error, Result};
use crate::core::lane::LaneOptions;
use crate::core::sched::{CallFailure, Effect, Ending, Job, Late, Scheduler, Snapshot, Task, Wakes, WriteBound};
use crate::kafka::consumer::{cached_high_watermark, KafkaConsumer};
use crate::kafka::dlq::DeadLetters;
use crate::kafka::intake::Wake;

pub struct Shared<E> {
    sched: Mutex<Scheduler<E>>,
    work: Condvar,
    progress: Condvar,
    /// Mirrors the scheduler's stop, for the source to read without the lock.
    stop: AtomicBool,
    /// Set under the lock: workers exit once they see it.
    closed: AtomicBool,
    /// Workers not asleep on `work` (running a call, or looking for one). Changed under the
    /// lock, so an event that made work ready reads, after it, whether someone will take it.
    awake: AtomicUsize,
    /// Threads in `wait_progress` (a revoke, a drain): completions must wake them.
    progress_waiters: AtomicUsize,
    wake_source: Mutex<Option<Wake>>,
    /// Taken at `close`, so the producer's threads end with the run, not with the app.
    pub(super) dead_letters: Mutex<Option<Arc<DeadLetters>>>,
    /// For the stats' high watermarks. Weak: the consumer's context holds this.
    consumer: Mutex<Weak<KafkaConsumer>>,
    /// Itself, for dead-letter acknowledgements that arrive on librdkafka's thread.
    pub(super) this: Weak<Shared<E>>,
}

pub(super) fn lock_of<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<E: CallFailure + 'static> Shared<E> {
    pub fn new(
        lanes: Vec<LaneOptions>,
        dead_letters: Option<Arc<DeadLetters>>,
        commit_interval: Duration,
    ) -> Result<Arc<Self>> {
        let bound = dead_letters.as_ref().map(|d| WriteBound(d.timeout()));
        let sched = Scheduler::new(lanes, commit_interval, bound, Instant::now())?;
        Ok(Arc::new_cyclic(|this| Shared {
            sched: Mutex::new(sched),
            work: Condvar::new(),
            progress: Condvar::new(),
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            awake: AtomicUsize::new(0),
            progress_waiters: AtomicUsize::new(0),
            wake_source: Mutex::new(None),
            dead_letters: Mutex::new(dead_letters),
            consumer: Mutex::new(Weak::new()),
            this: this.clone(),
        }))
    }

    /// A poisoned lock means a panic already failed the run; each event leaves the
    /// scheduler consistent, so keep going rather than panic again.
    pub(super) fn lock(&self) -> MutexGuard<'_, Scheduler<E>> {
        lock_of(&self.sched)
    }

    /// Runs `event` on the scheduler, then does what it left to do, outside the lock.
    pub(super) fn apply<R>(&self, event: impl FnOnce(&mut Scheduler<E>) -> R) -> R {
        let mut sched = self.lock();
        let result = event(&mut sched);
        let outputs = Self::outputs(&mut sched);
        drop(sched);
        self.act(outputs);
        result
    }

    fn outputs(sched: &mut Scheduler<E>) -> (Wakes, Vec<Effect<E>>) {
        let mut effects = Vec::new(); // allocates only if there is one
        while let Some(effect) = sched.poll_effect() {
            effects.push(effect);
        }
        (sched.take_wakes(), effects)
    }

    /// Wakes whom the scheduler named, and applies its effects; never under the lock.
    fn act(&self, (wakes, effects): (Wakes, Vec<Effect<E>>)) {
        if wakes.stopped {
            self.stop.store(true, Ordering::Release);
        }
        for effect in effects {
            match effect {
                Effect::Warn(message) => log::warn!("{message}"),
                Effect::Discard(failure) => drop(failure),
                Effect::DeadLetter(write) => self.send_dead_letters(write),
                Effect::DeadLetterWaiting(wait) => self.dead_letters_wait(&wait),
            }
        }
        let sleepers = wakes.helpers + usize::from(wakes.workers > 0 && self.awake.load(Ordering::Acquire) == 0);
        for _ in 0..sleepers {
            self.work.notify_one();
        }
        if wakes.stopped {
            self.work.notify_all(); // calls no longer start; cancels still run
        }
        if wakes.driver || wakes.stopped {
            self.progress.notify_all();
            self.wake_source();
        }
    }

    pub(super) fn notify_progress(&self) {
        self.progress.notify_all();
    }

    fn wake_source(&self) {
        let wake = lock_of(&self.wake_source).clone();
        if let Some(wake) = wake {
            wake();
        }
    }

    pub(super) fn set_waker(&self, wake: Option<Wake>) {
        *lock_of(&self.wake_source) = wake;
    }

    /// Gives the run the consumer whose cache the stats read high watermarks from.
    pub fn attach(&self, consumer: &Arc<KafkaConsumer>) {
        *lock_of(&self.consumer) = Arc::downgrade(consumer);
    }

    /// Forgets the consumer before it closes, so no late caller keeps it alive past the close.
    pub fn detach(&self) {
        *lock_of(&self.consumer) = Weak::new();
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks the run to end; wakes the engine, the workers and the source.
    pub fn request_stop(&self) {
        self.apply(Scheduler::stop);
    }

    /// A thread the run relies on (a worker, the event loop of async plugins) ended, or the
    /// source failed: the run fails with `error` instead of waiting for calls that would
    /// never complete.
    pub fn fail_run(&self, error: Error) {
        self.apply(|sched| sched.source_failed(error));
        self.notify_progress();
    }

    // --- the workers' side -------------------------------------------------------------

    /// A worker thread starts: it is awake until it first finds nothing to do.
    pub(super) fn worker_started(&self) {
        self.awake.fetch_add(1, Ordering::AcqRel);
    }

    /// Blocks until a job is ready, and starts it; `None` once the run is closed.
    pub(super) fn next_job(&self) -> Option<Job> {
        let mut sched = self.lock();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            let job = sched.next_job(Instant::now());
            let outputs = Self::outputs(&mut sched);
            if job.is_some() || outputs.0 != Wakes::default() || !outputs.1.is_empty() {
                drop(sched);
                self.act(outputs);
                if job.is_some() {
                    return job;
                }
                sched = self.lock();
                continue;
            }
            self.awake.fetch_sub(1, Ordering::AcqRel);
            sched = self.work.wait(sched).unwrap_or_else(PoisonError::into_inner);
            self.awake.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The next ready job, started, without sleeping for one.
    pub(super) fn try_next_job(&self) -> Option<Job> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.apply(|sched| sched.next_job(Instant::now()))
    }

    /// A call returned: reports it and, in the same trip under the lock, starts the next
    /// ready job if there is one (`None`: nothing ready now; `next_job` sleeps for one).
    pub(super) fn complete_and_take(
        &self,
        task: Task,
        outcome: std::result::Result<(), E>,
        took: Duration,
    ) -> Option<Job> {
        let now = Instant::now();
        let (job, notify) = self.apply(|sched| {
            sched.complete(task, outcome, took, now);
            let job = if self.closed.load(Ordering::Acquire) { None } else { sched.next_job(now) };
            (job, self.progress_matters(sched))
        });
        if notify {
            self.notify_progress();
        }
        job
    }

    /// A call returned (see `Scheduler::complete`).
    pub fn complete(&self, task: Task, outcome: std::result::Result<(), E>, took: Duration) {
        let notify = self.apply(|sched| {
            sched.complete(task, outcome, took, Instant::now());
            self.progress_matters(sched)
        });
        if notify {
            self.notify_progress();
        }
    }

    /// Whether a completion must signal `progress`: a revoke or a drain waits on it, or the
    /// run ends now (the engine's thread waits for that).
    fn progress_matters(&self, sched: &Scheduler<E>) -> bool {
        self.progress_waiters.load(Ordering::Acquire) > 0 || sched.would_end()
    }

    // --- the engine's side -------------------------------------------------------------

    /// Waits on `progress` until `until` at most, firing timers that fall due meanwhile.
    /// Returns the lock for the caller to re-check its condition.
    pub(super) fn wait_progress<'a>(
        &'a self,
        mut sched: MutexGuard<'a, Scheduler<E>>,
        until: Instant,
    ) -> MutexGuard<'a, Scheduler<E>> {
        let now = Instant::now();
        sched.handle_timeout(now);
        let outputs = Self::outputs(&mut sched);
        if outputs.0 != Wakes::default() || !outputs.1.is_empty() {
            drop(sched);
            self.act(outputs);
            return self.lock();
        }
        let wake = sched.poll_timeout().map_or(until, |next| next.min(until));
        self.progress_waiters.fetch_add(1, Ordering::AcqRel);
        let sched = self
            .progress
            .wait_timeout(sched, wake.saturating_duration_since(now))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        self.progress_waiters.fetch_sub(1, Ordering::AcqRel);
        sched
    }

    /// Sleeps until the run should end, and says why.
    pub fn wait_for_ending(&self) -> Ending<E> {
        let mut sched = self.lock();
        loop {
            if let Some(ending) = sched.ending() {
                return ending;
            }
            sched = self.progress.wait(sched).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Stops admitting, drops waiting work, and waits up to `timeout` for running calls
    /// (dead-letter writes included). Returns whether every call finished, and a failure
    /// that arrived meanwhile (a plugin's, or the core's: a dead-letter write that failed).
    pub fn drain(&self, timeout: Duration) -> (bool, Option<Late<E>>) {
        let deadline = Instant::now() + timeout;
        self.apply(Scheduler::close_intake);
        let mut sched = self.lock();
        loop {
            // A retry scheduled by a call that failed meanwhile is dropped too.
            sched.drop_waiting(None);
            let finished = sched.running() == 0;
            if finished || Instant::now() >= deadline {
                return (finished, sched.take_late());
            }
            sched = self.wait_progress(sched, deadline);
        }
    }

    /// The offsets to commit at the end of the run, after the drain.
    pub fn offsets_to_commit(&self) -> Vec<(crate::core::batch::Partition, i64)> {
        self.lock().offsets_to_commit()
    }

    /// Lets the workers exit, and ends the dead-letter producer (the drain waited for its
    /// writes): its threads must not outlive the run.
    pub fn close(&self) {
        {
            let mut sched = self.lock();
            sched.close_dead_letters();
            self.closed.store(true, Ordering::Release);
        }
        self.work.notify_all();
        let dead_letters = lock_of(&self.dead_letters).take();
        drop(dead_letters); // outside every lock: dropping it may run its callbacks, which lock
    }

    pub fn snapshot(&self) -> Snapshot {
        let consumer = lock_of(&self.consumer).upgrade(); // dropped after the guard: see `detach`
        let sched = self.lock();
        let high_watermark = |p: &_| consumer.as_ref().and_then(|c| cached_high_watermark(c, p));
        sched.snapshot(Instant::now(), &high_watermark)
    }
}
