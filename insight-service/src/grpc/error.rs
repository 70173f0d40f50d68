//! The one place where domain errors become gRPC statuses (DESIGN.md's error contract).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    admission::AdmissionError, jobs::JobError, music::MusicError, pipeline::PipelineError,
    store::StoreError,
};

/// The ErrorInfo domain of this service's errors.
const DOMAIN: &str = "insight.spotifai";

/// Longest status message sent, in bytes. A message travels in the `grpc-message` trailer,
/// and clients refuse header blocks past 8–16 KiB (tonic: the stream past 16 KiB, the whole
/// connection past ~80 KiB), so an over-long one turns the status into a protocol error on
/// the caller's side. Whatever a message echoes of the request (an id, a user) is cut here,
/// for every error, after the first kilobyte that says what went wrong.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_BYTES`] on a character boundary, marked with `…` when cut.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        message.truncate(message.floor_char_boundary(MAX_MESSAGE_BYTES - '…'.len_utf8()));
        message.push('…');
    }
    message
}

/// Longest provider-asked delay passed on as RetryInfo. A provider's `Retry-After` is
/// whatever it sent (a far-future date, a typo of many digits); a client that honours
/// RetryInfo would stop calling for that long, so the advice is capped where waiting longer
/// stops being advice about a transient throttle.
const MAX_PROVIDER_DELAY: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Maps a pipeline error to the status of the error contract, with machine-readable details:
/// a `BadRequest` field violation for bad input; when the LLM is unavailable, an `ErrorInfo`
/// naming the backend and the kind of its last failure (`cause`: `rate_limited`, `auth`, …),
/// and a `RetryInfo` when the provider asked for a delay (a throttled caller that resends at
/// once only prolongs the throttling).
pub fn to_status(error: PipelineError) -> Status {
    match error {
        PipelineError::InvalidArgument { field, reason } => {
            let message = bounded(format!("{field}: {reason}"));
            let details = ErrorDetails::with_bad_request_violation(field, reason);
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        PipelineError::BackendUnavailable {
            backend,
            message,
            cause,
            retry_after,
        } => {
            let text = bounded(format!("the {backend} backend is unavailable: {message}"));
            let mut metadata = std::collections::HashMap::from([("backend".to_owned(), backend)]);
            if let Some(cause) = cause {
                metadata.insert("cause".to_owned(), cause.to_owned());
            }
            let mut details =
                ErrorDetails::with_error_info("BACKEND_UNAVAILABLE", DOMAIN, metadata);
            if let Some(delay) = retry_after.filter(|delay| !delay.is_zero()) {
                details.set_retry_info(Some(delay.min(MAX_PROVIDER_DELAY)));
            }
            Status::with_error_details(Code::Unavailable, text, details)
        }
        error @ (PipelineError::DeadlineExceeded { .. }
        | PipelineError::DeadlineExceededWaiting) => {
            Status::deadline_exceeded(bounded(error.to_string()))
        }
        error @ PipelineError::Source(_) => store_unavailable(error.to_string()),
    }
}

/// Whether the database refused a value (bad data, a constraint, a limit) rather than failed:
/// PostgreSQL SQLSTATE classes 22 (data exception), 23 (integrity constraint) and 54 (program
/// limit exceeded); SQLite's constraint, range and too-big errors. Validation stops these
/// first; this keeps a value it missed from being reported as a retry-safe outage.
fn refuses_a_value(error: &dyn sqlx::error::DatabaseError) -> bool {
    use sqlx::error::ErrorKind;
    if !matches!(error.kind(), ErrorKind::Other) {
        // Unique, foreign key, not null and check violations.
        return true;
    }
    error.code().is_some_and(|code| {
        code.starts_with("22")
            || code.starts_with("23")
            || code.starts_with("54")
            // SQLITE_TOOBIG, SQLITE_MISMATCH, SQLITE_RANGE, and extended constraint codes.
            || matches!(code.as_ref(), "18" | "20" | "25")
    })
}

/// UNAVAILABLE with the STORE_UNAVAILABLE reason: the database is down or went away; retrying
/// later is safe.
fn store_unavailable(message: String) -> Status {
    let details = ErrorDetails::with_error_info(
        "STORE_UNAVAILABLE",
        DOMAIN,
        std::collections::HashMap::new(),
    );
    Status::with_error_details(Code::Unavailable, bounded(message), details)
}

/// Maps a music-analysis error: bad input names its field; a user without stored plays is
/// NOT_FOUND; a store failure is the store's status; a failed LLM with fallback disabled is
/// UNAVAILABLE naming the backend, or DEADLINE_EXCEEDED when it was the caller's deadline.
pub fn music_status(error: MusicError) -> Status {
    match error {
        MusicError::InvalidArgument { field, reason } => {
            to_status(PipelineError::InvalidArgument { field, reason })
        }
        error @ MusicError::NoStoredPlays { .. } => Status::not_found(bounded(error.to_string())),
        MusicError::Store(error) => store_status(error),
        MusicError::Refused(error) => admission_status(&error),
        MusicError::BackendUnavailable { source } => to_status(PipelineError::backend_failed(
            source.backend(),
            &source,
            None,
        )),
        error @ MusicError::DeadlineExceeded { .. } => {
            Status::deadline_exceeded(bounded(error.to_string()))
        }
    }
}

/// Maps a store error: bad request values name their field (INVALID_ARGUMENT); a database
/// that is down, locked or cannot be migrated is UNAVAILABLE with an ErrorInfo, so clients
/// retry (imports are idempotent, so a retried import is safe); a row that cannot be read
/// back is DATA_LOSS, never INTERNAL.
pub fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::InvalidArgument { field, reason } => {
            to_status(PipelineError::InvalidArgument { field, reason })
        }
        StoreError::Unavailable(sqlx::Error::Database(db)) if refuses_a_value(&*db) => {
            // Retrying the same request would fail the same way: not UNAVAILABLE.
            Status::invalid_argument(bounded(format!(
                "the database refused a value of this request: {}",
                db.message()
            )))
        }
        error @ (StoreError::Unavailable(_) | StoreError::Migrate(_)) => {
            store_unavailable(error.to_string())
        }
        error @ StoreError::Corrupt(_) => Status::data_loss(bounded(error.to_string())),
    }
}

/// Maps a job error: bad request INVALID_ARGUMENT, unknown id NOT_FOUND, store UNAVAILABLE.
pub fn job_status(error: JobError) -> Status {
    match error {
        JobError::Invalid(error) => to_status(error),
        error @ JobError::NotFound(_) => Status::not_found(bounded(error.to_string())),
        JobError::Store(error) => store_status(error),
    }
}

/// Maps an overload refusal: RESOURCE_EXHAUSTED with an ErrorInfo reason and, where waiting
/// helps, a RetryInfo delay; DEADLINE_EXCEEDED for deadlines.
pub fn admission_status(error: &AdmissionError) -> Status {
    let message = bounded(error.to_string());
    let (reason, retry_after) = match *error {
        AdmissionError::DeadlineExceeded { .. }
        | AdmissionError::RecvStalled { .. }
        | AdmissionError::RecvTooSlow { .. } => {
            return Status::deadline_exceeded(message);
        }
        AdmissionError::Malformed { reason } => {
            return to_status(PipelineError::invalid("request", reason));
        }
        AdmissionError::QueueFull { retry_after, .. } => ("CONCURRENCY_LIMIT", Some(retry_after)),
        AdmissionError::QueueTimeout { retry_after, .. } => ("QUEUE_TIMEOUT", Some(retry_after)),
        AdmissionError::MemoryBudget { retry_after, .. } => ("MEMORY_BUDGET", Some(retry_after)),
        AdmissionError::MemoryPressure { retry_after } => ("MEMORY_PRESSURE", Some(retry_after)),
        // Retrying the same message can never succeed: no RetryInfo, so that clients that
        // honour it do not retry forever.
        AdmissionError::OverBudget { .. } => ("MEMORY_BUDGET", None),
        AdmissionError::MessageTooLarge { .. } | AdmissionError::LightMessageTooLarge { .. } => {
            ("MESSAGE_TOO_LARGE", None)
        }
    };
    let mut details =
        ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::new());
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

impl From<PipelineError> for Status {
    fn from(error: PipelineError) -> Self {
        to_status(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_in_message_and_details() {
        let status = to_status(PipelineError::invalid(
            "entries[2].text",
            "must not be empty",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("entries[2].text:"));
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "entries[2].text");
    }

    #[test]
    fn messages_are_cut_to_a_kilobyte_whatever_they_echo() {
        let long = "é".repeat(100_000);
        for status in [
            music_status(MusicError::NoStoredPlays {
                user_id: long.clone(),
            }),
            job_status(JobError::NotFound(long.clone())),
            to_status(PipelineError::invalid("entries[0].id", long.clone())),
            store_status(StoreError::Corrupt(long.clone())),
        ] {
            assert!(status.message().len() <= MAX_MESSAGE_BYTES, "{status:?}");
            assert!(status.message().ends_with('…'), "{}", status.message());
        }
        let short = job_status(JobError::NotFound("j1".into()));
        assert!(!short.message().ends_with('…'), "{}", short.message());
    }

    #[test]
    fn store_errors_are_unavailable_or_name_the_field() {
        let down = store_status(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        assert_eq!(down.code(), Code::Unavailable);
        let bad = store_status(StoreError::invalid("page_token", "malformed"));
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(
            bad.message().starts_with("page_token:"),
            "{}",
            bad.message()
        );
    }

    #[test]
    fn backend_unavailable_names_the_backend_the_cause_and_the_asked_delay() {
        let status = to_status(PipelineError::BackendUnavailable {
            backend: "gemini".into(),
            message: "no chunk succeeded".into(),
            cause: None,
            retry_after: None,
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("gemini"));
        let details = status.get_error_details();
        let info = details.error_info().cloned().unwrap();
        assert_eq!(info.reason, "BACKEND_UNAVAILABLE");
        assert_eq!(info.metadata.get("backend").unwrap(), "gemini");
        assert!(!info.metadata.contains_key("cause"), "{info:?}");
        assert!(details.retry_info().is_none());

        let throttled = crate::llm::LlmError::RateLimited {
            backend: "gemini".into(),
            retry_after: Some(std::time::Duration::from_secs(38)),
            message: "quota exceeded".into(),
        };
        let status = to_status(PipelineError::backend_failed("gemini", &throttled, None));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("quota exceeded"), "{status:?}");
        let details = status.get_error_details();
        let info = details.error_info().cloned().unwrap();
        assert_eq!(info.metadata.get("cause").unwrap(), "rate_limited");
        let delay = details.retry_info().and_then(|r| r.retry_delay);
        assert_eq!(delay, Some(std::time::Duration::from_secs(38)));

        // A provider's absurd delay is passed on capped.
        let forever = crate::llm::LlmError::RateLimited {
            backend: "gemini".into(),
            retry_after: Some(std::time::Duration::from_secs(99_999_999)),
            message: "quota exceeded".into(),
        };
        let status = to_status(PipelineError::backend_failed("gemini", &forever, None));
        let delay = status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay);
        assert_eq!(delay, Some(MAX_PROVIDER_DELAY));

        // A bad key: the cause says so, and no delay (waiting does not help).
        let refused = music_status(MusicError::BackendUnavailable {
            source: crate::llm::LlmError::Auth {
                backend: "openai".into(),
                message: "invalid key".into(),
            },
        });
        let details = refused.get_error_details();
        let info = details.error_info().cloned().unwrap();
        assert_eq!(info.metadata.get("backend").unwrap(), "openai");
        assert_eq!(info.metadata.get("cause").unwrap(), "auth");
        assert!(details.retry_info().is_none());
    }
}
