//! The pure core: batches, lanes, offsets, the timer wheel, rate limits, counters and the
//! crate's error type. Nothing here knows the Kafka client, Python, a thread or a lock (the scheduler and lanes are single-threaded state; the engine holds them behind its lock).

pub mod batch;
pub mod errors;
pub mod lane;
pub mod limit;
pub mod offsets;
pub mod sched;
pub mod stats;
pub mod timer;
