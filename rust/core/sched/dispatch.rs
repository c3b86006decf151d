//! The dispatch policy: which job a worker takes next. Cancels first (a cancelled call frees
//! its lane sooner), then the lanes' calls, lanes taking turns. Once a stop began, no call
//! starts; cancels still run. How many workers an event wakes is `Wakes::workers`, counted
//! where work becomes ready: the one other place the policy shows.

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
                    return Some(Job::Call(self.start_call(index, chunk, now)));
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
            self.calls.insert(call, Call::new(lane, key, chunk.describe()));
        }
        Task { lane, chunk, call, deadline }
    }
}
