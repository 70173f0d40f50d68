//! The job RPCs' conversions: domain [`Job`] to `pb::Job`, and the request's job id.

use spotifai_proto::insight as pb;
use tonic::Status;

use super::error::to_status;
use crate::{jobs::Job, pipeline::PipelineError, store::JobState};

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => Self::Queued,
            JobState::Running => Self::Running,
            JobState::Succeeded => Self::Succeeded,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}

impl From<Job> for pb::Job {
    fn from(job: Job) -> Self {
        Self {
            id: job.id,
            state: pb::JobState::from(job.state).into(),
            progress: Some(pb::JobProgress {
                chunks_done: job.chunks_done,
                chunks_total: job.chunks_total,
            }),
            result: job.result.map(Into::into),
            error: job.error.unwrap_or_default(),
            created_at: Some(job.created_at.into()),
            updated_at: Some(job.updated_at.into()),
        }
    }
}

/// A job as GetJob and WatchJob answer it. A result too large for one message (a big job in
/// small chunks carries one insight per chunk) is sent without its chunk insights, and
/// `error` says so: the summary itself is complete, and a job must stay readable.
pub fn job_reply(job: Job, max_message_size: usize) -> pb::Job {
    use prost::Message as _;
    let mut reply = pb::Job::from(job);
    if reply.encoded_len() > max_message_size
        && let Some(result) = reply.result.as_mut()
    {
        let chunks = result.chunks.len();
        result.chunks.clear();
        reply.error = format!(
            "result.chunks omitted: its {chunks} chunk insights exceed the {max_message_size} \
             byte message limit (--max-message-size); the summary, themes and sentiment are \
             complete"
        );
    }
    reply
}

/// The id of a GetJob/WatchJob/CancelJob request; empty is INVALID_ARGUMENT naming `id`.
pub fn job_id(request: &pb::GetJobRequest) -> Result<&str, Status> {
    let id = request.id.trim();
    if id.is_empty() {
        return Err(to_status(PipelineError::invalid(
            "id",
            "the job id returned by SubmitSummaryJob is required",
        )));
    }
    Ok(id)
}
