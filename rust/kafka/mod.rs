//! The Kafka side: the consumer and its poll loop, the bulk fetch, commits, the dead-letter
//! producer, `inspect`, and the mock cluster with its seeding.

pub mod commit;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod dlq;
pub mod errors;
pub mod fetch;
pub mod inspect;
pub mod intake;
pub mod mock;
pub mod poll;
pub mod seed;
pub mod source;
