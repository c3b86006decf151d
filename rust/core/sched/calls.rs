//! Calls in flight with a deadline, and what their deadline does: an async call registered
//! a cancel and is cancelled (by a worker); a sync call cannot be, so it is an overrun,
//! warned about, and its result still counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CallFailure, Cancel, Effect, Scheduler, Task};
use crate::core::batch::Batch;
use crate::core::lane::Chunk;
use crate::core::timer::TimerKey;

/// A call in flight, for its deadline.
pub(super) struct Call {
    lane: usize,
    deadline: Option<TimerKey>,
    overdue: bool,
    cancel: Option<Cancel>,
    /// The call's messages (how many, the first and last position in the batch), worded
    /// only if the overrun line needs them: no string per call.
    batch: Arc<Batch>,
    span: (usize, Option<usize>, Option<usize>),
}

impl Call {
    pub(super) fn new(lane: usize, deadline: TimerKey, chunk: &Chunk) -> Self {
        let (batch, span) = (chunk.batch.clone(), chunk.span());
        Call { lane, deadline: Some(deadline), overdue: false, cancel: None, batch, span }
    }

    fn describe(&self) -> String {
        self.batch.describe(self.span.0, self.span.1, self.span.2)
    }
}

impl<E: CallFailure> Scheduler<E> {
    /// An asynchronous call can be cancelled with `cancel` until it completes. If its
    /// deadline has already passed, the cancel is handed back to run now.
    pub fn register_cancel(&mut self, call: u64, cancel: Cancel) -> Option<Cancel> {
        let record = self.calls.get_mut(&call)?;
        if !record.overdue {
            record.cancel = Some(cancel);
            return None;
        }
        let counts = &mut self.lanes[record.lane].stats;
        counts.overruns -= 1; // counted as an overrun when it fell due; it is a timeout
        counts.timeouts += 1;
        Some(cancel)
    }

    /// The call is over: its deadline no longer matters.
    pub(super) fn call_ended(&mut self, task: &Task) {
        if let Some(key) = self.calls.remove(&task.call).and_then(|call| call.deadline) {
            self.timers.cancel(key);
        }
    }

    pub(super) fn deadline_passed(&mut self, call: u64, now: Instant) {
        let Some(record) = self.calls.get_mut(&call) else { return };
        record.deadline = None;
        record.overdue = true;
        let lane = &mut self.lanes[record.lane];
        if let Some(cancel) = record.cancel.take() {
            lane.stats.timeouts += 1;
            self.cancels.push_back(cancel);
            self.work_ready(1, now);
        } else {
            lane.stats.overruns += 1;
            self.effects.push_back(Effect::Warn(format!(
                "plugin {:?} is past its timeout of {:?} on {}; its result will still count",
                lane.options.name,
                lane.options.timeout.unwrap_or(Duration::ZERO),
                record.describe()
            )));
        }
    }
}
