//! Maps core errors to the exception classes of `fastconsume.errors`. Those are defined in
//! Python so that they can subclass both `FastconsumeError` and the builtin a user expects
//! (`ValueError`, `ConnectionError`), which `create_exception!` cannot express.

use pyo3::prelude::*;

use crate::core::errors::{ConnectFailure, Error};

/// Instantiates `fastconsume.errors.<name>(message)` as a `PyErr`.
pub fn exception(py: Python<'_>, name: &str, message: String) -> PyErr {
    let made = py
        .import("fastconsume.errors")
        .and_then(|module| module.getattr(name))
        .and_then(|class| class.call1((message,)));
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(import_failed) => import_failed,
    }
}

pub fn to_pyerr(py: Python<'_>, error: &Error) -> PyErr {
    let name = match error {
        Error::Connect { failure: ConnectFailure::Authentication, .. } => "KafkaAuthenticationError",
        Error::Connect { failure: ConnectFailure::Tls, .. } => "KafkaTLSError",
        Error::UnknownTopics { .. } => "UnknownTopicError",
        Error::Config(_) | Error::Property { .. } => "ConfigError",
        Error::Connect { .. } => "KafkaConnectionError",
        Error::Kafka { .. } | Error::Delivery { .. } | Error::DeadLetter(_) => "KafkaError",
        Error::Internal(_) => "FastconsumeError",
    };
    exception(py, name, error.to_string())
}
