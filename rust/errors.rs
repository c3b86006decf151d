//! The crate's error type. It stays free of pyo3; `py::errors` maps each variant to the
//! matching Python exception at the boundary.

use std::fmt;

use rdkafka::error::KafkaError;

/// Everything the core can fail with, each variant carrying enough to name the cause.
#[derive(Debug)]
pub enum Error {
    /// A setting is wrong: the user can fix it (maps to `ValueError`).
    Config(String),
    /// librdkafka rejected a property: `(property, librdkafka's reason)`.
    Property { name: String, reason: String },
    /// The brokers could not be reached within the connect timeout.
    Connect { bootstrap: String, waited_ms: u64, last_error: Option<String> },
    /// Produced messages were not acknowledged.
    Delivery { topic: String, failed: u64, sent: u64 },
    /// A plugin's dead letters were not acknowledged (boxed: it is large and rare).
    DeadLetter(Box<DeadLetterFailure>),
    /// A bug or a resource failure inside fastconsume (a thread that could not start or
    /// panicked).
    Internal(String),
    /// Kafka failed in a way that stops the consumer.
    Kafka { context: &'static str, source: KafkaError },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which dead letters were not written, and why.
#[derive(Debug)]
pub struct DeadLetterFailure {
    pub plugin: String,
    /// The dead-letter topic.
    pub topic: String,
    /// The messages, as `Batch::describe` names them: partition and offsets.
    pub what: String,
    pub failed: u64,
    pub sent: u64,
    /// librdkafka's error code and text, and what else is known (its last error, the bound).
    pub cause: String,
}

impl Error {
    pub(crate) fn kafka(context: &'static str, source: KafkaError) -> Self {
        match source {
            KafkaError::ClientConfig(_, reason, name, _) => Error::Property { name, reason },
            source => Error::Kafka { context, source },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(message) | Error::Internal(message) => f.write_str(message),
            Error::Property { name, reason } => write!(f, "librdkafka property {name:?}: {reason}"),
            Error::Connect { bootstrap, waited_ms, last_error } => {
                write!(f, "could not reach Kafka at {bootstrap} within {waited_ms} ms")?;
                if let Some(last) = last_error {
                    write!(f, " (last error: {last})")?;
                }
                Ok(())
            }
            Error::Delivery { topic, failed, sent } => {
                write!(f, "{failed} of {sent} messages to {topic:?} were not delivered")
            }
            Error::DeadLetter(d) => write!(
                f,
                "plugin {:?}: dead-letter write of {} to {:?} failed ({} of {} not delivered): {}",
                d.plugin, d.what, d.topic, d.failed, d.sent, d.cause
            ),
            Error::Kafka { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kafka { source, .. } => Some(source),
            _ => None,
        }
    }
}
