//! The crate's error type. It stays free of the bindings; `py::errors` maps each variant to the
//! matching Python exception at the boundary.

use std::fmt;

/// Everything the core can fail with, each variant carrying enough to name the cause.
#[derive(Debug)]
pub enum Error {
    /// A setting is wrong: the user can fix it (maps to `ValueError`).
    Config(String),
    /// the Kafka client rejected a property: `(property, its reason)`.
    Property { name: String, reason: String },
    /// The brokers could not be reached within the connect timeout, or refused the client
    /// for good (authentication, TLS), which ends the wait at once.
    Connect { bootstrap: String, waited_ms: u64, failure: ConnectFailure, last_error: Option<String> },
    /// Topics the cluster does not have (and `wait_for_topics` is off).
    UnknownTopics { bootstrap: String, topics: Vec<String> },
    /// Produced messages were not acknowledged.
    Delivery { topic: String, failed: u64, sent: u64 },
    /// A plugin's dead letters were not acknowledged (boxed: it is large and rare).
    DeadLetter(Box<DeadLetterFailure>),
    /// A bug or a resource failure inside fastconsume (a thread that could not start or
    /// panicked).
    Internal(String),
    /// Kafka failed in a way that stops the consumer: the Kafka client's error code (its enum's
    /// name) and its message.
    Kafka { context: &'static str, code: String, message: String },
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
    /// the Kafka client's error code and text, and what else is known (its last error, the bound).
    pub cause: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(message) | Error::Internal(message) => f.write_str(message),
            Error::Property { name, reason } => write!(f, "Kafka client property {name:?}: {reason}"),
            Error::Connect { bootstrap, waited_ms, failure, last_error } => {
                match failure {
                    ConnectFailure::Unreachable => {
                        write!(f, "could not reach Kafka at {bootstrap} within {waited_ms} ms")?;
                    }
                    ConnectFailure::Authentication => {
                        write!(f, "authentication with Kafka at {bootstrap} failed after {waited_ms} ms")?;
                    }
                    ConnectFailure::Tls => write!(f, "TLS with Kafka at {bootstrap} failed after {waited_ms} ms")?,
                }
                if let Some(last) = last_error {
                    write!(f, " (last error: {last})")?;
                }
                Ok(())
            }
            Error::UnknownTopics { bootstrap, topics } => {
                let s = if topics.len() == 1 { "" } else { "s" };
                write!(
                    f,
                    "unknown topic{s} {} at {bootstrap}: create {}, or set wait_for_topics=True to wait for {}",
                    topics.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", "),
                    if topics.len() == 1 { "it" } else { "them" },
                    if topics.len() == 1 { "it" } else { "them" },
                )
            }
            Error::Delivery { topic, failed, sent } => {
                write!(f, "{failed} of {sent} messages to {topic:?} were not delivered")
            }
            Error::DeadLetter(d) => write!(
                f,
                "plugin {:?}: dead-letter write of {} to {:?} failed ({} of {} not delivered): {}",
                d.plugin, d.what, d.topic, d.failed, d.sent, d.cause
            ),
            Error::Kafka { context, code, message } => write!(f, "{context}: {message} ({code})"),
        }
    }
}

impl std::error::Error for Error {}

/// How a connect failed. Authentication and TLS failures are permanent (retrying cannot fix
/// a password or a certificate), so a connect that sees one ends at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing answered in time: resolve failure, connection refused, a timeout.
    Unreachable,
    Authentication,
    Tls,
}

impl ConnectFailure {
    #[must_use]
    pub fn is_permanent(self) -> bool {
        self != ConnectFailure::Unreachable
    }
}
