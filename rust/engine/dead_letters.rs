//! Applies the scheduler's dead-letter effects: starts each write on the producer, reports
//! its acknowledgement back, and words the warning for a write that waits.

use std::time::Instant;

use super::shared::{lock_of, Shared};
use crate::core::errors::{Error, Result};
use crate::core::sched::{CallFailure, DeadLetterWait, DeadLetterWrite};

impl<E: CallFailure + 'static> Shared<E> {
    /// Starts a write. `done` may run on librdkafka's thread, or at once on this one.
    pub(super) fn send_dead_letters(&self, write: DeadLetterWrite) {
        let Some(dead_letters) = lock_of(&self.dead_letters).clone() else {
            let closed = Error::Internal("the dead-letter producer closed before a write could start".into());
            return self.dead_lettered(write.write, Err(closed));
        };
        let this = self.this.clone();
        let id = write.write;
        let done = Box::new(move |result: Result<()>| {
            if let Some(shared) = this.upgrade() {
                shared.dead_lettered(id, result);
            }
        });
        dead_letters.send(&write.topic, &write.batch, &write.indexes, &write.info, done);
    }

    fn dead_lettered(&self, write: u64, result: Result<()>) {
        self.apply(|sched| sched.dead_lettered(write, result, Instant::now()));
        self.notify_progress();
    }

    pub(super) fn dead_letters_wait(&self, wait: &DeadLetterWait) {
        let last = lock_of(&self.dead_letters).as_ref().and_then(|d| d.last_error().since(wait.started));
        let last = last.map_or_else(
            || "; librdkafka has reported no error since it began".to_string(),
            |e| format!("; librdkafka's last error: {e}"),
        );
        let bound = wait.bound.map_or_else(
            || "it has no bound: the producer's message.timeout.ms is 0".to_string(),
            |bound| format!("it fails after {:.1} s, dlq_timeout", bound.as_secs_f64()),
        );
        log::warn!(
            "plugin {:?}: the dead-letter write of {} to {:?} has waited {:.1} s for the broker's \
             acknowledgement ({bound}); until then the call holds its concurrency slot and the \
             offsets stay uncommitted{last}",
            wait.plugin,
            wait.what,
            wait.topic,
            wait.waited.as_secs_f64(),
        );
    }
}
