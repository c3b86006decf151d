//! What the Kafka side hands its batches, rebalances and commit results to. The engine
//! implements it; the Kafka side never sees the scheduler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::batch::{Batch, Partition};
use crate::core::errors::Error;

/// Wakes the thread that drives the timer wheel (the poll loop).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// What driving the wheel left for the poll loop.
#[derive(Debug, Default)]
pub struct Driven {
    /// When the wheel is next due (`None`: empty).
    pub next: Option<Instant>,
    /// Offsets to commit now: the commit interval fell due and they moved since the last.
    pub commit: Vec<(Partition, i64)>,
}

pub trait Intake: Send + Sync {
    fn assign(&self, partitions: Vec<Partition>);
    /// Drops waiting work of the partitions and waits, bounded, for their running calls;
    /// returns the offsets to commit before the partitions go.
    fn revoke(&self, partitions: &[Partition], timeout: Duration) -> Vec<(Partition, i64)>;
    /// Kafka acknowledged a commit of these offsets.
    fn committed(&self, offsets: &[(Partition, i64)]);
    /// The last high watermarks seen of partitions about to be revoked, for stats.
    fn record_high_watermarks(&self, watermarks: Vec<(Partition, i64)>);
    /// Offers batches, in one trip; those a full lane refuses are left in `batches`, in
    /// order (behind a refused batch, later ones of its partition are refused too).
    fn submit(&self, batches: &mut Vec<Arc<Batch>>);
    /// Drain mode: whether nothing new was fetched for the idle timeout and nothing waits
    /// to be offered. Told on every turn of the poll loop (the loop keeps serving the group
    /// while idle), and `false` as soon as anything arrives.
    fn source_idle(&self, idle: bool);
    fn source_failed(&self, error: Error);
    fn stop_requested(&self) -> bool;
    /// How to wake the source when a wheel entry falls due before it planned to wake;
    /// `None` once the source is gone.
    fn set_waker(&self, wake: Option<Wake>);
    /// Puts one of the source's own deadlines on the wheel (it is driving it, so it is not
    /// woken for it).
    fn schedule_wake(&self, at: Instant);
    /// Fires due wheel entries; says when the wheel is next due and what to commit now.
    fn drive_timers(&self, now: Instant) -> Driven;
}
