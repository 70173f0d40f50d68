//! Conversions between protobuf messages and domain types, at the edge of the service.

use std::time::SystemTime;

use spotifai_proto::insight as pb;

use crate::{
    domain::{ChunkInsight, ChunkStatus, Entry, FeedbackSummary, Sentiment, SentimentLabel, Usage},
    pipeline::{PipelineError, RequestedOptions},
};

/// Converts inline entries; fails only on what the domain type cannot represent (a rating
/// outside 0..=5, an invalid timestamp). The other rules are the pipeline's.
pub fn entries_from_proto(entries: Vec<pb::FeedbackEntry>) -> Result<Vec<Entry>, PipelineError> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| entry_from_proto(e).map_err(|err| err.within(&format!("entries[{i}]"))))
        .collect()
}

/// Converts one entry, with field paths relative to it (`rating`, `created_at`): the one
/// conversion shared by inline summaries and `ImportFeedback`, so both accept the same
/// ratings and timestamps.
pub fn entry_from_proto(e: pb::FeedbackEntry) -> Result<Entry, PipelineError> {
    let rating = match e.rating {
        0 => None,
        r @ 1..=5 => Some(r as u8),
        r => {
            return Err(PipelineError::invalid(
                "rating",
                format!("must be 0 (no rating) or 1..5, got {r}"),
            ));
        }
    };
    let created_at = e
        .created_at
        .map(|ts| system_time(ts, "created_at"))
        .transpose()?;
    Ok(Entry {
        id: e.id,
        user_id: e.user_id,
        text: e.text,
        rating,
        created_at,
        source: e.source,
    })
}

/// Earliest and latest instants a `google.protobuf.Timestamp` may hold (0001-01-01 and
/// 9999-12-31T23:59:59Z): the protobuf spec's range, which every client library honours.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// Converts a Timestamp, rejecting values outside the protobuf range or with nanos outside
/// 0..1e9, with `field` named in the error.
pub fn system_time(ts: prost_types::Timestamp, field: &str) -> Result<SystemTime, PipelineError> {
    if !TIMESTAMP_SECONDS.contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(PipelineError::invalid(
            field,
            format!(
                "not a valid timestamp (seconds {}, nanos {}): must lie in 0001-01-01..9999-12-31 with nanos in 0..1e9",
                ts.seconds, ts.nanos
            ),
        ));
    }
    SystemTime::try_from(ts).map_err(|err| PipelineError::invalid(field, err.to_string()))
}

impl From<pb::SummaryOptions> for RequestedOptions {
    fn from(o: pb::SummaryOptions) -> Self {
        Self {
            chunk_size: o.chunk_size,
            max_entries: o.max_entries,
            max_words: o.max_words,
            bypass_cache: o.bypass_cache,
            disable_fallback: o.disable_fallback,
        }
    }
}

impl From<SentimentLabel> for pb::SentimentLabel {
    fn from(label: SentimentLabel) -> Self {
        match label {
            SentimentLabel::Positive => Self::Positive,
            SentimentLabel::Neutral => Self::Neutral,
            SentimentLabel::Negative => Self::Negative,
            SentimentLabel::Mixed => Self::Mixed,
        }
    }
}

impl From<Sentiment> for pb::Sentiment {
    fn from(s: Sentiment) -> Self {
        Self {
            label: pb::SentimentLabel::from(s.label).into(),
            score: s.score,
            positive: s.positive,
            neutral: s.neutral,
            negative: s.negative,
            average_rating: s.average_rating,
            rated: s.rated,
        }
    }
}

impl From<Usage> for pb::Usage {
    fn from(u: Usage) -> Self {
        Self {
            llm_calls: u.llm_calls,
            prompt_bytes: u.prompt_bytes,
            response_bytes: u.response_bytes,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
        }
    }
}

impl From<ChunkInsight> for pb::ChunkInsight {
    fn from(c: ChunkInsight) -> Self {
        let status = match c.status {
            ChunkStatus::Ok => pb::ChunkStatus::Ok,
            ChunkStatus::Failed => pb::ChunkStatus::Failed,
        };
        Self {
            index: c.index,
            entry_ids: c.entry_ids,
            insight: c.insight,
            themes: c.themes,
            sentiment: Some(c.sentiment.into()),
            status: status.into(),
            error: c.error.unwrap_or_default(),
        }
    }
}

impl From<FeedbackSummary> for pb::FeedbackSummary {
    fn from(s: FeedbackSummary) -> Self {
        Self {
            summary: s.summary,
            themes: s.themes,
            sentiment: Some(s.sentiment.into()),
            chunks: s.chunks.into_iter().map(Into::into).collect(),
            entries_used: s.entries_used,
            entries_skipped: s.entries_skipped,
            degraded: s.degraded,
            cached: s.cached,
            backend: s.backend,
            model: s.model,
            usage: Some(s.usage.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, rating: u32) -> pb::FeedbackEntry {
        pb::FeedbackEntry {
            id: id.into(),
            text: "fine".into(),
            rating,
            ..Default::default()
        }
    }

    #[test]
    fn rating_out_of_range_names_the_entry() {
        let err = entries_from_proto(vec![entry("a", 5), entry("b", 6)]).err();
        match err {
            Some(PipelineError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "entries[1].rating")
            }
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn zero_rating_means_none() {
        let entries = entries_from_proto(vec![entry("a", 0), entry("b", 3)]).unwrap_or_default();
        assert_eq!(entries[0].rating, None);
        assert_eq!(entries[1].rating, Some(3));
    }

    #[test]
    fn invalid_timestamp_names_the_field() {
        let mut e = entry("a", 1);
        e.created_at = Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
        let err = entries_from_proto(vec![e]).err();
        assert!(
            matches!(&err, Some(PipelineError::InvalidArgument { field, .. }) if field == "entries[0].created_at"),
            "{err:?}"
        );
    }
}
