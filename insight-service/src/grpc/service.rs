//! The InsightService adapter: validate the envelope, call the pipeline, convert the answer.

use std::pin::Pin;

use spotifai_proto::insight::{
    self as pb, insight_service_server::InsightService, summarize_feedback_request::Input,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{convert::entries_from_proto, error::to_status};
use crate::pipeline::{Pipeline, PipelineError, RequestedOptions, resolve_options};

/// A boxed server stream, as tonic's associated stream types want.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of the insight service.
#[derive(Clone, Debug)]
pub struct InsightGrpc {
    pipeline: Pipeline,
    max_entries_cap: u32,
}

impl InsightGrpc {
    /// An adapter over `pipeline`; `max_entries_cap` is the server's `--max-entries-cap`.
    pub fn new(pipeline: Pipeline, max_entries_cap: u32) -> Self {
        Self {
            pipeline,
            max_entries_cap,
        }
    }
}

/// The RPCs whose behaviour arrives with a later issue say which, so a caller knows it is not
/// a bug in their request.
fn not_yet(what: &str, arrives_with: &str) -> Status {
    Status::unimplemented(format!(
        "{what} not available yet: it arrives with the {arrives_with}"
    ))
}

#[tonic::async_trait]
impl InsightService for InsightGrpc {
    #[tracing::instrument(skip(self, request), fields(entries))]
    async fn summarize_feedback(
        &self,
        request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<pb::FeedbackSummary>, Status> {
        let request = request.into_inner();
        let options = resolve_options(
            request
                .options
                .map(RequestedOptions::from)
                .unwrap_or_default(),
            self.max_entries_cap,
        )
        .map_err(to_status)?;
        let entries = match request.input {
            Some(Input::Entries(batch)) => entries_from_proto(batch.entries).map_err(to_status)?,
            Some(Input::Selector(_)) => {
                return Err(not_yet(
                    "summaries of stored feedback (selector) are",
                    "insight store issue; send inline `entries` meanwhile",
                ));
            }
            None => {
                return Err(to_status(PipelineError::invalid(
                    "input",
                    "one of `entries` or `selector` is required",
                )));
            }
        };
        tracing::Span::current().record("entries", entries.len());
        let summary = self
            .pipeline
            .summarize(entries, options)
            .await
            .map_err(to_status)?;
        Ok(Response::new(summary.into()))
    }

    type StreamFeedbackSummaryStream = BoxStream<pb::SummaryEvent>;

    async fn stream_feedback_summary(
        &self,
        _request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<Self::StreamFeedbackSummaryStream>, Status> {
        Err(not_yet(
            "streamed summaries are",
            "insight pipeline issue; use SummarizeFeedback meanwhile",
        ))
    }

    async fn analyze_music(
        &self,
        _request: Request<pb::AnalyzeMusicRequest>,
    ) -> Result<Response<pb::MusicAnalysis>, Status> {
        Err(not_yet("music analysis is", "insight pipeline issue"))
    }

    async fn import_feedback(
        &self,
        _request: Request<Streaming<pb::FeedbackEntry>>,
    ) -> Result<Response<pb::ImportFeedbackResponse>, Status> {
        Err(not_yet("the feedback store is", "insight store issue"))
    }

    async fn import_listening(
        &self,
        _request: Request<Streaming<pb::ListeningPlay>>,
    ) -> Result<Response<pb::ImportListeningResponse>, Status> {
        Err(not_yet("the listening store is", "insight store issue"))
    }

    async fn list_feedback(
        &self,
        _request: Request<pb::ListFeedbackRequest>,
    ) -> Result<Response<pb::ListFeedbackResponse>, Status> {
        Err(not_yet("the feedback store is", "insight store issue"))
    }

    async fn submit_summary_job(
        &self,
        _request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet("jobs are", "insight store issue (background jobs)"))
    }

    async fn get_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet("jobs are", "insight store issue (background jobs)"))
    }

    type WatchJobStream = BoxStream<pb::Job>;

    async fn watch_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_yet("jobs are", "insight store issue (background jobs)"))
    }

    async fn cancel_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet("jobs are", "insight store issue (background jobs)"))
    }
}
