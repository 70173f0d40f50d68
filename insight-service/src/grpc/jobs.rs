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
