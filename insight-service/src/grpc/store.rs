//! ImportFeedback, ImportListening and ListFeedback at the edge: each message is converted and
//! checked with the same rules as inline input (`convert::entry_from_proto` +
//! `pipeline::validate_entry`; `Play::try_from` + `Play::validate`), then handed to the store.
//!
//! Imports read the client stream one message at a time and write every
//! [`crate::store::BATCH_ROWS`] valid items in one transaction, so memory stays bounded by a
//! batch whatever the stream's length.

use spotifai_proto::insight as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::{
    convert::{entry_from_proto, system_time},
    error::store_status,
};
use crate::{
    domain::Entry,
    music::{MusicError, Play},
    pipeline::{PipelineError, validate_entry},
    store::{FeedbackFilter, FeedbackQuery, Import, ListeningRecord, Rejection, Rejections, Store},
};

/// Stores a stream of feedback entries: valid ones upserted by id, invalid ones listed with
/// their position, field and reason. A store failure ends the call with UNAVAILABLE; batches
/// committed before it stay, which a retry of the whole stream (idempotent) completes.
pub async fn import_feedback<S>(
    store: &Store,
    mut messages: S,
) -> Result<pb::ImportFeedbackResponse, Status>
where
    S: Stream<Item = Result<pb::FeedbackEntry, Status>> + Unpin,
{
    // Connect before reading: with the store down the caller learns it at once.
    let mut import = Import::<Entry>::new(store.get().await.map_err(store_status)?);
    let mut rejections = Rejections::default();
    let mut position: u32 = 0;
    while let Some(message) = messages.next().await {
        let message = message?;
        let id = message.id.clone();
        let checked = entry_from_proto(message).and_then(|entry| {
            validate_entry(&entry)?;
            Ok(entry)
        });
        match checked {
            Ok(entry) => import.push(entry).await.map_err(store_status)?,
            Err(error) => rejections.add(rejection(id, position, error)),
        }
        position = position.saturating_add(1);
    }
    let counts = import.finish().await.map_err(store_status)?;
    Ok(pb::ImportFeedbackResponse {
        inserted: counts.inserted,
        updated: counts.updated,
        rejected: rejections.count,
        rejections: rejections.listed.into_iter().map(Into::into).collect(),
    })
}

/// Stores a stream of plays, upserted by (user_id, track_id, played_at); the same contract
/// as [`import_feedback`]. Besides the play rules, `user_id` and `play.played_at` are
/// required: they are the play's identity.
pub async fn import_listening<S>(
    store: &Store,
    mut messages: S,
) -> Result<pb::ImportListeningResponse, Status>
where
    S: Stream<Item = Result<pb::ListeningPlay, Status>> + Unpin,
{
    let mut import = Import::<ListeningRecord>::new(store.get().await.map_err(store_status)?);
    let mut rejections = Rejections::default();
    let mut position: u32 = 0;
    while let Some(message) = messages.next().await {
        let message = message?;
        let id = play_id(&message);
        match listening_record(message) {
            Ok(record) => import.push(record).await.map_err(store_status)?,
            Err(MusicError::InvalidArgument { field, reason }) => rejections.add(Rejection {
                id,
                position,
                field,
                reason,
            }),
            Err(other) => rejections.add(Rejection {
                id,
                position,
                field: "play".to_owned(),
                reason: other.to_string(),
            }),
        }
        position = position.saturating_add(1);
    }
    let counts = import.finish().await.map_err(store_status)?;
    Ok(pb::ImportListeningResponse {
        inserted: counts.inserted,
        updated: counts.updated,
        rejected: rejections.count,
        rejections: rejections.listed.into_iter().map(Into::into).collect(),
    })
}

/// One page of stored feedback; bad filters, `page_size` or `page_token` are
/// INVALID_ARGUMENT naming the field.
pub async fn list_feedback(
    store: &Store,
    request: pb::ListFeedbackRequest,
) -> Result<pb::ListFeedbackResponse, Status> {
    let filter = match request.filter {
        Some(selector) => filter_from_proto(selector, "filter").map_err(Status::from)?,
        None => FeedbackFilter::default(),
    };
    let query =
        FeedbackQuery::new(request.page_size, &request.page_token, filter).map_err(store_status)?;
    let page = store
        .get()
        .await
        .map_err(store_status)?
        .list_feedback(&query)
        .await
        .map_err(store_status)?;
    Ok(pb::ListFeedbackResponse {
        entries: page.entries.into_iter().map(entry_to_proto).collect(),
        next_page_token: page.next.map(|token| token.encode()).unwrap_or_default(),
    })
}

/// Converts a selector; field paths start with `prefix` (`filter` for ListFeedback). Rating
/// ranges are checked by [`FeedbackQuery::new`]; values too large for a rating are refused
/// here, where the proto's u32 is narrowed.
pub fn filter_from_proto(
    selector: pb::FeedbackSelector,
    prefix: &str,
) -> Result<FeedbackFilter, PipelineError> {
    let time = |ts: Option<prost_types::Timestamp>, field: &str| {
        ts.map(|ts| system_time(ts, &format!("{prefix}.{field}")))
            .transpose()
    };
    let rating = |value: u32, field: &str| match value {
        0 => Ok(None),
        1..=5 => Ok(Some(value as u8)),
        other => Err(PipelineError::invalid(
            format!("{prefix}.{field}"),
            format!("must be 1..5 (0 = no bound), got {other}"),
        )),
    };
    let non_empty = |text: String| (!text.is_empty()).then_some(text);
    crate::pipeline::no_nul(&format!("{prefix}.user_id"), &selector.user_id)?;
    crate::pipeline::no_nul(&format!("{prefix}.source"), &selector.source)?;
    Ok(FeedbackFilter {
        since: time(selector.since, "since")?,
        until: time(selector.until, "until")?,
        min_rating: rating(selector.min_rating, "min_rating")?,
        max_rating: rating(selector.max_rating, "max_rating")?,
        user_id: non_empty(selector.user_id),
        source: non_empty(selector.source),
    })
}

/// A stored entry as the proto carries it (`created_at` always set by the store).
fn entry_to_proto(entry: Entry) -> pb::FeedbackEntry {
    pb::FeedbackEntry {
        id: entry.id,
        user_id: entry.user_id,
        text: entry.text,
        rating: entry.rating.map_or(0, u32::from),
        created_at: entry.created_at.map(prost_types::Timestamp::from),
        source: entry.source,
    }
}

/// The rejection of an invalid entry (conversion and validation errors are all
/// InvalidArgument; anything else is reported against the whole entry).
fn rejection(id: String, position: u32, error: PipelineError) -> Rejection {
    let (field, reason) = match error {
        PipelineError::InvalidArgument { field, reason } => (field, reason),
        other => ("entry".to_owned(), other.to_string()),
    };
    Rejection {
        id,
        position,
        field,
        reason,
    }
}

/// Checks a ListeningPlay and turns it into a record to store; field paths are relative to
/// the message (`user_id`, `play.artist`, `play.played_at`).
fn listening_record(message: pb::ListeningPlay) -> Result<ListeningRecord, MusicError> {
    if message.user_id.trim().is_empty() {
        return Err(MusicError::invalid("user_id", "must not be empty"));
    }
    let proto = message
        .play
        .ok_or_else(|| MusicError::invalid("play", "is required"))?;
    let play = Play::try_from(proto).map_err(|e| e.within("play"))?;
    play.validate().map_err(|e| e.within("play"))?;
    let played_at = play.played_at.ok_or_else(|| {
        MusicError::invalid(
            "play.played_at",
            "is required for stored plays: it is part of the play's identity",
        )
    })?;
    Ok(ListeningRecord {
        user_id: message.user_id,
        play,
        played_at,
    })
}

/// The id a rejected play is reported under: `track_id@played_at` (RFC 3339), with what is
/// known of them.
fn play_id(message: &pb::ListeningPlay) -> String {
    let Some(play) = &message.play else {
        return String::new();
    };
    let at = play
        .played_at
        .and_then(|ts| std::time::SystemTime::try_from(ts).ok())
        .map(|time| humantime::format_rfc3339_micros(time).to_string())
        .unwrap_or_default();
    format!("{}@{at}", play.track_id)
}

impl From<Rejection> for pb::ImportRejection {
    fn from(r: Rejection) -> Self {
        Self {
            id: r.id,
            position: r.position,
            field: r.field,
            reason: r.reason,
        }
    }
}
