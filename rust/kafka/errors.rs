//! librdkafka's errors as the core sees them: `KafkaError` becomes the core's `Error` (a code
//! and a message), error events are classified into connect failures, and repeats are
//! collapsed before they are logged.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::core::errors::{ConnectFailure, Error};

/// The core's error for a `KafkaError`: a rejected property names it, anything else keeps
/// librdkafka's code and message.
pub fn to_error(context: &'static str, source: KafkaError) -> Error {
    match source {
        KafkaError::ClientConfig(_, reason, name, _) => Error::Property { name, reason },
        source => {
            let code = source.rdkafka_error_code().map_or_else(|| "no code".to_string(), |c| format!("{c:?}"));
            Error::Kafka { context, code, message: source.to_string() }
        }
    }
}

/// Classifies one of librdkafka's error events; `None` for the ones that only repeat
/// another ("all brokers are down" follows each broker's own failure).
#[must_use]
pub fn classify_error(error: &KafkaError, reason: &str) -> Option<ConnectFailure> {
    let code = match error {
        KafkaError::Global(code)
        | KafkaError::MessageConsumption(code)
        | KafkaError::MessageConsumptionFatal(code)
        | KafkaError::MetadataFetch(code) => Some(*code),
        _ => None,
    };
    match code {
        Some(RDKafkaErrorCode::AllBrokersDown) => None,
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Some(ConnectFailure::Authentication)
        }
        Some(RDKafkaErrorCode::SSL) => Some(ConnectFailure::Tls),
        // A plaintext client on a TLS listener: the broker hangs up on the first request,
        // and librdkafka's reason says what it suspects.
        _ if reason.contains("connecting to a SSL listener") => Some(ConnectFailure::Tls),
        _ => Some(ConnectFailure::Unreachable),
    }
}

/// How long identical librdkafka errors are collapsed before their count is logged.
const REPEAT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// Distinct errors remembered for collapsing; a handful covers every broker of a cluster.
const REMEMBERED: usize = 16;
/// Hang-ups on the first request in a row that say "TLS listener" (see `record_failure`).
const FIRST_REQUEST_HANGUPS: u32 = 2;

/// What makes two of librdkafka's error lines the same: the text without its trailing
/// "(after 3ms in state CONNECT, 1 identical error(s) suppressed)", which differs each time.
fn repeat_key(line: &str) -> &str {
    match line.rfind(" (after ") {
        Some(at) if line.ends_with(')') => &line[..at],
        _ => line,
    }
}

/// librdkafka's error events, as a client context sees them: each distinct one logged once
/// at WARNING, identical repeats (a broker that stays down fails again every reconnect
/// backoff, and "all brokers are down" follows each time) counted and logged as one line with
/// the count at most every 30 s and when a connect ends; and the last meaningful one kept,
/// classified, to explain a failed connect. Shared by the consumer and `inspect`.
#[derive(Default)]
pub struct ErrorWatch {
    state: Mutex<WatchState>,
}

struct Seen {
    key: String,
    line: String,
    /// Times it came again since it was last logged.
    repeats: u64,
    logged_at: Instant,
}

#[derive(Default)]
struct WatchState {
    last: Option<(ConnectFailure, String)>,
    seen: Vec<Seen>,
    /// Hang-ups on the first request in a row (see `record_failure`).
    first_request_hangups: u32,
}

impl Seen {
    /// The line that reports collapsed repeats, if any, and restarts the count.
    fn take_repeats(&mut self) -> Option<String> {
        let report = (self.repeats > 0).then(|| {
            let secs = self.logged_at.elapsed().as_secs_f64().max(1.0);
            format!("{} (repeated {} more time(s) in {secs:.0} s)", self.line, self.repeats)
        });
        self.repeats = 0;
        self.logged_at = Instant::now();
        report
    }
}

impl ErrorWatch {
    fn state(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one error event (from `ClientContext::error`), and logs it unless it repeats
    /// one logged recently.
    pub fn record(&self, error: &KafkaError, reason: &str) {
        let line = if reason.is_empty() { error.to_string() } else { reason.to_string() };
        let failure = classify_error(error, reason);
        self.remember(failure.map(|f| (f, line.clone())), line);
    }

    /// Records a broker failure librdkafka logged (facility `FAIL`) rather than reported as
    /// an error event: a connection the broker closed, for one. Its log line comes at once
    /// (error events wait for the queue to be served), and says the same as the event if
    /// there is one, so both collapse into one line.
    pub fn record_failure(&self, message: &str) {
        // "[thrd:host:port/bootstrap]: host:port/bootstrap: Connect to ... failed"
        let line = match message.strip_prefix("[thrd:").and_then(|rest| rest.split_once("]: ")) {
            Some((_, line)) => line,
            None => message,
        };
        let mut failure = if line.contains("SASL authentication error") || line.contains("SASL SCRAM") {
            ConnectFailure::Authentication
        } else if line.contains("SSL handshake failed") || line.contains("certificate verify failed") {
            ConnectFailure::Tls
        } else {
            ConnectFailure::Unreachable
        };
        let mut named = line.to_string();
        {
            let mut state = self.state();
            // A broker that hangs up on the very first request (ApiVersion) is, twice in a
            // row, a TLS listener reached without TLS. Once could be a broker going down.
            if line.contains("Disconnected") && line.contains("in state APIVERSION_QUERY") {
                state.first_request_hangups += 1;
                if state.first_request_hangups >= FIRST_REQUEST_HANGUPS {
                    failure = ConnectFailure::Tls;
                    named = format!(
                        "{line}: the broker hangs up on the first request, as a TLS listener does for a \
                         client without TLS (is security.protocol right?)"
                    );
                }
            } else {
                state.first_request_hangups = 0;
            }
        }
        self.remember(Some((failure, named)), line.to_string());
    }

    fn remember(&self, failure: Option<(ConnectFailure, String)>, line: String) {
        let mut lines = Vec::new();
        {
            let mut state = self.state();
            if let Some(failure) = failure {
                // A later "could not connect" must not hide an authentication or TLS failure.
                if failure.0.is_permanent() || state.last.as_ref().is_none_or(|(f, _)| !f.is_permanent()) {
                    state.last = Some(failure);
                }
            }
            let key = repeat_key(&line);
            if let Some(seen) = state.seen.iter_mut().find(|seen| seen.key == key) {
                seen.repeats += 1;
                if seen.logged_at.elapsed() >= REPEAT_REPORT_INTERVAL {
                    lines.extend(seen.take_repeats());
                }
            } else {
                if state.seen.len() >= REMEMBERED {
                    let mut oldest = state.seen.remove(0);
                    lines.extend(oldest.take_repeats());
                }
                state.seen.push(Seen {
                    key: key.to_string(),
                    line: line.clone(),
                    repeats: 0,
                    logged_at: Instant::now(),
                });
                lines.push(line);
            }
        }
        // Logged outside the lock: the log bridge must never wait while a client lock is held.
        for line in lines {
            log::warn!("librdkafka: {line}");
        }
    }

    /// Logs the counts of collapsed repeats not yet reported (at the end of a connect).
    pub fn flush(&self) {
        let lines: Vec<String> = self.state().seen.iter_mut().filter_map(Seen::take_repeats).collect();
        for line in lines {
            log::warn!("librdkafka: {line}");
        }
    }

    /// The last error worth naming, and its kind.
    #[must_use]
    pub fn last(&self) -> Option<(ConnectFailure, String)> {
        self.state().last.clone()
    }

    /// The last error if it is permanent (authentication, TLS).
    #[must_use]
    pub fn permanent(&self) -> Option<(ConnectFailure, String)> {
        self.last().filter(|(failure, _)| failure.is_permanent())
    }
}

/// librdkafka's own log lines (`ClientContext::log`), at the level librdkafka gave them,
/// except a broker's failure ("FAIL"), which goes to `errors` to be classified and collapsed
/// with the error events.
pub fn log_librdkafka(errors: &ErrorWatch, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    if facility == "FAIL" {
        errors.record_failure(message);
        return;
    }
    let level = match level {
        L::Emerg | L::Alert | L::Critical | L::Error => log::Level::Error,
        L::Warning => log::Level::Warn,
        L::Notice | L::Info => log::Level::Info,
        L::Debug => log::Level::Debug,
    };
    log::log!(target: "librdkafka", level, "librdkafka: {facility} {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::Global(code)
    }

    #[test]
    fn all_brokers_down_does_not_hide_the_cause() {
        let watch = ErrorWatch::default();
        watch.record(&global(RDKafkaErrorCode::BrokerTransportFailure), "Connect to ipv4#127.0.0.1:1 failed");
        watch.record(&global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert_eq!(watch.last(), Some((ConnectFailure::Unreachable, "Connect to ipv4#127.0.0.1:1 failed".into())));
        assert_eq!(watch.permanent(), None);
    }

    #[test]
    fn authentication_and_tls_are_permanent() {
        let watch = ErrorWatch::default();
        watch.record(&global(RDKafkaErrorCode::Authentication), "SASL authentication error: invalid credentials");
        assert_eq!(watch.permanent().map(|(f, _)| f), Some(ConnectFailure::Authentication));
        watch.record(&global(RDKafkaErrorCode::SSL), "SSL handshake failed: certificate verify failed");
        assert_eq!(watch.permanent().map(|(f, _)| f), Some(ConnectFailure::Tls));
        let plaintext = "Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol \
                         configuration (connecting to a SSL listener?)";
        assert_eq!(
            classify_error(&global(RDKafkaErrorCode::BrokerTransportFailure), plaintext),
            Some(ConnectFailure::Tls)
        );
    }

    #[test]
    fn repeats_are_counted_not_kept() {
        let watch = ErrorWatch::default();
        for ms in 0..5 {
            let reason = format!("Failed to resolve 'nosuchhost.invalid:9092' (after {ms}ms in state CONNECT)");
            watch.record(&global(RDKafkaErrorCode::Resolve), &reason);
            watch.record(&global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        }
        let state = watch.state();
        let counts: Vec<_> = state.seen.iter().map(|s| (s.key.as_str(), s.repeats)).collect();
        assert_eq!(counts, vec![("Failed to resolve 'nosuchhost.invalid:9092'", 4), ("1/1 brokers are down", 4)]);
    }

    #[test]
    fn repeats_are_reported_once() {
        let watch = ErrorWatch::default();
        watch.record(&global(RDKafkaErrorCode::Resolve), "a");
        watch.record(&global(RDKafkaErrorCode::Resolve), "a");
        let mut state = watch.state();
        assert_eq!(state.seen[0].take_repeats().as_deref(), Some("a (repeated 1 more time(s) in 1 s)"));
        assert_eq!(state.seen[0].take_repeats(), None, "reported once");
    }

    #[test]
    fn failure_log_lines_are_classified() {
        let watch = ErrorWatch::default();
        watch.record_failure("[thrd:h:1/bootstrap]: h:1/bootstrap: Connect to ipv4#h:1 failed: Connection refused");
        assert_eq!(watch.last().map(|(f, _)| f), Some(ConnectFailure::Unreachable));
        let hangup = "[thrd:h:1/bootstrap]: h:1/bootstrap: Disconnected: connection closed by peer: receive 0 after \
                      POLLIN (after 1ms in state APIVERSION_QUERY)";
        watch.record_failure(hangup);
        assert_eq!(watch.permanent(), None, "once may be a broker going down");
        watch.record_failure(hangup);
        let (failure, named) = watch.permanent().expect("a TLS failure");
        assert_eq!(failure, ConnectFailure::Tls);
        assert!(named.starts_with("h:1/bootstrap: Disconnected") && named.contains("TLS listener"), "{named}");
        watch.record(&global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        watch.record_failure("[thrd:h:1/bootstrap]: h:1/bootstrap: Connect to ipv4#h:1 failed: Connection refused");
        assert_eq!(watch.permanent().map(|(f, _)| f), Some(ConnectFailure::Tls), "not hidden by a later one");
    }

    #[test]
    fn the_key_drops_only_the_timing_suffix() {
        assert_eq!(
            repeat_key("x: refused (after 0ms in state CONNECT, 1 identical error(s) suppressed)"),
            "x: refused"
        );
        assert_eq!(repeat_key("1/1 brokers are down"), "1/1 brokers are down");
    }
}
