//! The engine as the Kafka side's intake: batches, rebalances, commit results and the
//! wheel's driving, each an event on the scheduler. A revoke waits here, on the poll thread,
//! for the revoked partitions' running calls (bounded), driving the wheel while it waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::Shared;
use crate::core::batch::{Batch, Partition};
use crate::core::errors::Error;
use crate::core::sched::CallFailure;
use crate::kafka::intake::{Driven, Intake, Wake};

impl<E: CallFailure + 'static> Intake for Shared<E> {
    fn assign(&self, partitions: Vec<Partition>) {
        self.apply(|sched| sched.assign(partitions));
    }

    fn revoke(&self, partitions: &[Partition], timeout: Duration) -> Vec<(Partition, i64)> {
        let mut sched = self.lock();
        // At shutdown the drain already waited for running calls; their results can no
        // longer be committed, so waiting again would only delay the close.
        let deadline = if sched.is_intake_closed() { Instant::now() } else { Instant::now() + timeout };
        loop {
            sched.drop_waiting(Some(partitions));
            if sched.running_on(partitions) == 0 {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!("revoke: calls still running; their results will not be committed");
                break;
            }
            sched = self.wait_progress(sched, deadline);
        }
        let offsets = sched.revoke(partitions);
        drop(sched);
        self.notify_progress();
        offsets
    }

    fn committed(&self, offsets: &[(Partition, i64)]) {
        self.lock().committed(offsets);
    }

    fn record_high_watermarks(&self, watermarks: Vec<(Partition, i64)>) {
        self.lock().record_high_watermarks(watermarks);
    }

    fn submit(&self, batches: &mut Vec<Arc<Batch>>) {
        let now = Instant::now();
        self.apply(|sched| {
            let mut blocked: Vec<Partition> = Vec::new(); // allocates only on a refusal
            batches.retain(|batch| {
                if blocked.contains(batch.partition()) {
                    return true;
                }
                let refused = sched.submit(batch.clone(), now).is_err();
                if refused {
                    blocked.push(batch.partition().clone());
                }
                refused
            });
        });
    }

    fn source_idle(&self, idle: bool) {
        if self.lock().source_idle(idle) {
            self.notify_progress();
        }
    }

    fn source_failed(&self, error: Error) {
        self.fail_run(error);
    }

    fn stop_requested(&self) -> bool {
        Shared::stop_requested(self)
    }

    fn set_waker(&self, wake: Option<Wake>) {
        Shared::set_waker(self, wake);
    }

    fn schedule_wake(&self, at: Instant) {
        self.lock().schedule_source_wake(at);
    }

    fn drive_timers(&self, now: Instant) -> Driven {
        self.apply(|sched| {
            sched.handle_timeout(now);
            Driven { next: sched.poll_timeout(), commit: sched.take_commit() }
        })
    }
}
