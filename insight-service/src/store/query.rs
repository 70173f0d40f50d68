//! ListFeedback's query: filters, page size, and the keyset page token.

use std::time::SystemTime;

use super::{StoreError, micros};
use crate::domain::Entry;

/// Page size when a request asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page a request may ask for: bounds the memory and time of one answer.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Where a page ends: the (created_at, id) of its last entry, which the next page starts
/// after. Keyset pagination stays correct and cheap however deep the client pages and
/// however many entries arrive meanwhile, where an OFFSET would skip or repeat rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    created_at_us: i64,
    id: String,
}

impl PageToken {
    const VERSION: &'static str = "v1";

    /// The opaque text handed to clients: a version tag, the time as 16 hex digits, then the
    /// id's bytes in hex (so any id survives, and the token is URL- and JSON-safe).
    pub fn encode(&self) -> String {
        let mut text = format!("{}{:016x}", Self::VERSION, self.created_at_us as u64);
        for byte in self.id.as_bytes() {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// The token `text` encodes; INVALID_ARGUMENT naming `page_token` for anything else.
    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let malformed = || {
            StoreError::invalid(
                "page_token",
                "malformed: pass back a next_page_token exactly as a previous ListFeedback \
                 response returned it, or an empty one for the first page",
            )
        };
        let hex = text
            .strip_prefix(Self::VERSION)
            .filter(|hex| {
                hex.len() > 16 && hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .ok_or_else(malformed)?;
        let (at, id) = hex.split_at(16);
        let created_at_us = u64::from_str_radix(at, 16).map_err(|_| malformed())? as i64;
        let bytes = (0..id.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&id[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| malformed())?;
        let id = String::from_utf8(bytes)
            .ok()
            // No stored id holds a NUL (validation refuses it; PostgreSQL cannot store one).
            .filter(|id| !id.contains('\0'))
            .ok_or_else(malformed)?;
        Ok(Self { created_at_us, id })
    }
}

/// Which entries ListFeedback returns; every set field narrows the selection.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedbackFilter {
    /// Only this user's entries; `None` = all users.
    pub user_id: Option<String>,
    /// Only entries created at or after this instant.
    pub since: Option<SystemTime>,
    /// Only entries created before this instant.
    pub until: Option<SystemTime>,
    /// Only entries rated at least this (1..=5); `None` = no lower bound (unrated included).
    pub min_rating: Option<u8>,
    /// Only entries rated at most this (1..=5); unrated entries are then excluded, since
    /// "rated at most 2" says nothing of an entry that has no rating.
    pub max_rating: Option<u8>,
    /// Only entries from this source; `None` = any.
    pub source: Option<String>,
}

/// A validated ListFeedback request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackQuery {
    /// Entries per page, 1..=[`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Continue after this position; `None` = the first page.
    pub after: Option<PageToken>,
    /// Which entries.
    pub filter: FeedbackFilter,
    /// Newest first: descending (created_at, id). ListFeedback pages oldest first; a summary
    /// of stored entries reads newest first, so its `max_entries` are the most recent ones.
    pub newest_first: bool,
}

impl FeedbackQuery {
    /// Checks a request: `page_size` 0 takes [`DEFAULT_PAGE_SIZE`], above [`MAX_PAGE_SIZE`] is
    /// refused; an empty `page_token` starts at the first page; ratings must lie in 1..=5
    /// with min ≤ max.
    pub fn new(
        page_size: u32,
        page_token: &str,
        filter: FeedbackFilter,
    ) -> Result<Self, StoreError> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(StoreError::invalid(
                    "page_size",
                    format!(
                        "must be at most {MAX_PAGE_SIZE} (0 = the default {DEFAULT_PAGE_SIZE}), got {size}"
                    ),
                ));
            }
            size => size,
        };
        for (field, rating) in [
            ("filter.min_rating", filter.min_rating),
            ("filter.max_rating", filter.max_rating),
        ] {
            if let Some(rating) = rating
                && !(1..=5).contains(&rating)
            {
                return Err(StoreError::invalid(
                    field,
                    format!("must be 1..5 (0 = no bound), got {rating}"),
                ));
            }
        }
        if let (Some(min), Some(max)) = (filter.min_rating, filter.max_rating)
            && min > max
        {
            return Err(StoreError::invalid(
                "filter.max_rating",
                format!("must be at least filter.min_rating ({min}), got {max}"),
            ));
        }
        let after = match page_token {
            "" => None,
            token => Some(PageToken::decode(token)?),
        };
        Ok(Self {
            page_size,
            after,
            filter,
            newest_first: false,
        })
    }

    /// The query flattened into the values both backends' static SQL binds: absent bounds
    /// become bounds that hold for every row, so no SQL is assembled at run time.
    pub(super) fn bounds(&self) -> Bounds {
        let (after_us, after_id) = match &self.after {
            Some(token) => (token.created_at_us, token.id.clone()),
            // No stored row is at the latest representable time, so everything precedes it.
            None if self.newest_first => (i64::MAX, String::new()),
            // Every stored id is non-empty, so ("" at the earliest time) precedes every row.
            None => (i64::MIN, String::new()),
        };
        let filter = &self.filter;
        Bounds {
            since_us: filter.since.map_or(i64::MIN, micros),
            until_us: filter.until.map_or(i64::MAX, micros),
            min_rating: match (filter.min_rating, filter.max_rating) {
                (Some(min), _) => i16::from(min),
                (None, Some(_)) => 1,
                (None, None) => 0,
            },
            max_rating: filter.max_rating.map_or(5, i16::from),
            source: filter.source.clone().unwrap_or_default(),
            user_id: filter.user_id.clone(),
            after_us,
            after_id,
            newest_first: self.newest_first,
            // One more than asked, to learn whether another page follows.
            limit: i64::from(self.page_size) + 1,
        }
    }
}

/// [`FeedbackQuery`] flattened into the values the SQL binds.
#[derive(Clone, Debug)]
pub(super) struct Bounds {
    pub since_us: i64,
    pub until_us: i64,
    pub min_rating: i16,
    pub max_rating: i16,
    /// "" = any source (no stored entry is filtered on an empty source).
    pub source: String,
    /// `Some` picks the per-user query (and its index).
    pub user_id: Option<String>,
    pub after_us: i64,
    pub after_id: String,
    /// Descending order (and a `<` keyset condition).
    pub newest_first: bool,
    pub limit: i64,
}

/// Where a page of one user's plays ends: the (played_at, track_id) of its last play, which
/// the next page starts after (keyset order, as for feedback).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlayCursor {
    /// `played_at` of the last play read, µs since the Unix epoch.
    pub played_at_us: i64,
    /// `track_id` of the last play read.
    pub track_id: String,
}

impl PlayCursor {
    /// The position just after `record`.
    pub fn after(record: &super::ListeningRecord) -> Self {
        Self {
            played_at_us: micros(record.played_at),
            track_id: record.play.track_id.clone(),
        }
    }
}

/// A page of feedback in (created_at, id) order.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedbackPage {
    /// The entries; `created_at` is always set (the import time when the entry had none).
    pub entries: Vec<Entry>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
}

impl FeedbackPage {
    /// A page from rows fetched with [`Bounds::limit`] (one more than the page size): the
    /// extra row only says that a next page exists.
    pub(super) fn from_rows(mut rows: Vec<(i64, Entry)>, page_size: u32) -> Self {
        let page_size = page_size as usize;
        let more = rows.len() > page_size;
        rows.truncate(page_size);
        let next = match rows.last() {
            Some((created_at_us, entry)) if more => Some(PageToken {
                created_at_us: *created_at_us,
                id: entry.id.clone(),
            }),
            _ => None,
        };
        Self {
            entries: rows.into_iter().map(|(_, entry)| entry).collect(),
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_any_id() {
        for (us, id) in [
            (0, "a"),
            (-5, "ü/é \"x\""),
            (i64::MAX, "id-1"),
            (i64::MIN, "z"),
        ] {
            let token = PageToken {
                created_at_us: us,
                id: id.to_owned(),
            };
            assert_eq!(PageToken::decode(&token.encode()).ok(), Some(token));
        }
    }

    #[test]
    fn malformed_tokens_name_page_token() {
        for text in [
            "x",
            "v1",
            "v10000000000000000",
            "v1000000000000000zz61",
            "v2000000000000000061",
            "v10000000000000000ff",
        ] {
            match PageToken::decode(text) {
                Err(StoreError::InvalidArgument { field, .. }) => assert_eq!(field, "page_token"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn page_size_and_ratings_are_checked() {
        let field = |result: Result<FeedbackQuery, StoreError>| match result {
            Err(StoreError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(FeedbackQuery::new(1001, "", FeedbackFilter::default())),
            "page_size"
        );
        let ok = FeedbackQuery::new(0, "", FeedbackFilter::default());
        assert_eq!(ok.map(|q| q.page_size).ok(), Some(DEFAULT_PAGE_SIZE));
        let inverted = FeedbackFilter {
            min_rating: Some(4),
            max_rating: Some(2),
            ..FeedbackFilter::default()
        };
        assert_eq!(
            field(FeedbackQuery::new(10, "", inverted)),
            "filter.max_rating"
        );
        let high = FeedbackFilter {
            min_rating: Some(6),
            ..FeedbackFilter::default()
        };
        assert_eq!(field(FeedbackQuery::new(10, "", high)), "filter.min_rating");
    }
}
