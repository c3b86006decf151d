//! The dispatch policy: which job a worker takes next. Cancels first (a cancelled call frees
//! its lane sooner), then the lanes' calls, lanes taking turns. Once a stop began, no call
//! starts; cancels still run.
//!
//! Waking: a worker awake takes the next job itself once its call returns, so work that
//! becomes ready wakes a sleeping worker only if none is awake (`Wakes::workers`, counted
//! where work becomes ready). Ready work that waited `HELP_AFTER` while no job started (it
//! sits behind slow calls) wakes one more, and so on every `HELP_AFTER` (`Wakes::helpers`,
//! from one `Timer::Help` entry at a time). At a steady rate a round of batches thus costs
//! one wake-up, not one per call.

use std::time::Instant;

use super::{Call, CallFailure, Cancel, Scheduler, Task, Timer};
use crate::core::lane::{Chunk, Take};

/// What a worker does next.
pub enum Job {
    Call(Task),
    /// An async call's deadline passed: cancel it.
    Cancel(Cancel),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Call(task) => f.debug_tuple("Call").field(task).finish(),
            Job::Cancel(_) => f.write_str("Cancel"),
        }
    }
}

impl<E: CallFailure> Scheduler<E> {
    /// The next job for a worker, started; `None` when there is nothing to do now (the
    /// worker sleeps until woken).
    pub fn next_job(&mut self, now: Instant) -> Option<Job> {
        if let Some(cancel) = self.cancels.pop_front() {
            self.last_start = Some(now);
            return Some(Job::Cancel(cancel));
        }
        if self.stopping {
            return None;
        }
        let count = self.lanes.len();
        for i in 0..count {
            let index = (self.next_lane + i) % count;
            match self.lanes[index].take() {
                Take::Call(chunk) => {
                    self.next_lane = (index + 1) % count;
                    let task = self.start_call(index, chunk, now);
                    self.last_start = Some(now);
                    // What is still ready waits behind this call: help comes if it waits long.
                    if self.ready_jobs() > 0 {
                        self.arm_help(now);
                    }
                    return Some(Job::Call(task));
                }
                Take::Throttled(until) => {
                    self.schedule(until, Timer::Unthrottle { lane: index });
                }
                Take::Nothing => {}
            }
        }
        None
    }

    fn start_call(&mut self, lane: usize, chunk: Chunk, now: Instant) -> Task {
        let call = self.next_call;
        self.next_call += 1;
        let deadline = self.lanes[lane].options.timeout.map(|timeout| now + timeout);
        if let Some(at) = deadline {
            let (key, _) = self.schedule(at, Timer::Deadline { call });
            self.calls.insert(call, Call::new(lane, key, &chunk));
        }
        Task { lane, chunk, call, deadline }
    }
}
