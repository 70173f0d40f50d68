//! The one place where domain errors become gRPC statuses (DESIGN.md's error contract).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::pipeline::PipelineError;

/// Maps a pipeline error to the status of the error contract, with machine-readable details:
/// a `BadRequest` field violation for bad input, an `ErrorInfo` naming the backend when the
/// LLM is unavailable.
pub fn to_status(error: PipelineError) -> Status {
    match error {
        PipelineError::InvalidArgument { field, reason } => {
            let message = format!("{field}: {reason}");
            let details = ErrorDetails::with_bad_request_violation(field, reason);
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        PipelineError::BackendUnavailable { backend, message } => {
            let text = format!("the {backend} backend is unavailable: {message}");
            let details = ErrorDetails::with_error_info(
                "BACKEND_UNAVAILABLE",
                "insight.spotifai",
                [("backend".to_owned(), backend)],
            );
            Status::with_error_details(Code::Unavailable, text, details)
        }
        error @ PipelineError::DeadlineExceeded { .. } => {
            Status::deadline_exceeded(error.to_string())
        }
    }
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
    fn backend_unavailable_names_the_backend() {
        let status = to_status(PipelineError::BackendUnavailable {
            backend: "gemini".into(),
            message: "timeout".into(),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("gemini"));
        let info = status.get_error_details().error_info().cloned();
        assert_eq!(
            info.and_then(|i| i.metadata.get("backend").cloned()),
            Some("gemini".to_owned())
        );
    }
}
