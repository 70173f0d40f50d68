//! Imports: valid items are written in batches of [`BATCH_ROWS`], each batch one transaction;
//! invalid items are counted and listed (up to [`MAX_REJECTIONS_LISTED`]).

use std::{sync::Arc, time::SystemTime};

use futures::future::BoxFuture;

use super::{ImportWriter, StoreError, WriteCounts};
use crate::{
    domain::Entry,
    music::{AudioFeatures, Play},
};

/// Rows per transaction. One transaction per row would pay a commit (an fsync) per row; one
/// transaction for a whole stream would hold SQLite's write lock, and the memory of every
/// row, for as long as the client keeps sending. 500 rows of at most 8 KiB bound a batch to
/// about 4 MiB and commit a few times a second under a fast import.
pub const BATCH_ROWS: usize = 500;

/// Rejections listed in one response; further ones are only counted. Bounds the response
/// (at most a few hundred KiB, far below the message limit) whatever the client streams.
pub const MAX_REJECTIONS_LISTED: usize = 1000;

/// A play of one listener, ready for storing: its identity is (user_id, track_id,
/// played_at), so `played_at` is required.
#[derive(Clone, Debug, PartialEq)]
pub struct ListeningRecord {
    /// The listener.
    pub user_id: String,
    /// The play (validated by `Play::validate`).
    pub play: Play,
    /// When it started (the play's `played_at`, required for stored plays).
    pub played_at: SystemTime,
}

/// An item an [`Import`] can write: one call per batch, so the item type picks the store
/// method without the importer knowing it.
pub trait Record: Send + Sync + Sized + 'static {
    /// Writes `batch` in one transaction.
    fn write<'a>(
        store: &'a dyn ImportWriter,
        batch: &'a [Self],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>>;
}

impl Record for Entry {
    fn write<'a>(
        store: &'a dyn ImportWriter,
        batch: &'a [Self],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
        store.upsert_feedback(batch, now)
    }
}

impl Record for ListeningRecord {
    fn write<'a>(
        store: &'a dyn ImportWriter,
        batch: &'a [Self],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
        store.upsert_plays(batch, now)
    }
}

/// One import in progress: collects valid items and writes every [`BATCH_ROWS`] of them.
/// A failed batch is rolled back whole; batches written before it stay, which is safe
/// because a re-import of the same stream is idempotent.
#[derive(Debug)]
pub struct Import<T> {
    store: Arc<dyn ImportWriter>,
    batch: Vec<T>,
    counts: WriteCounts,
}

impl<T: Record> Import<T> {
    /// An empty import into `store`.
    pub fn new(store: Arc<dyn ImportWriter>) -> Self {
        Self {
            store,
            batch: Vec::with_capacity(BATCH_ROWS),
            counts: WriteCounts::default(),
        }
    }

    /// Adds a valid item, writing the batch when it is full.
    pub async fn push(&mut self, item: T) -> Result<(), StoreError> {
        self.batch.push(item);
        if self.batch.len() >= BATCH_ROWS {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes what is left and returns the counts of the whole import.
    pub async fn finish(mut self) -> Result<WriteCounts, StoreError> {
        self.flush().await?;
        Ok(self.counts)
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let written = T::write(self.store.as_ref(), &self.batch, SystemTime::now()).await?;
        self.counts += written;
        self.batch.clear();
        Ok(())
    }
}

/// Why one imported item was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The item's id (for plays `track_id@played_at`); empty when that was the fault.
    pub id: String,
    /// Position of the item in the stream, from 0.
    pub position: u32,
    /// The offending field, relative to the item (e.g. `text`, `play.artist`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The rejections of one import: all counted, the first [`MAX_REJECTIONS_LISTED`] listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejections {
    /// Items rejected in all.
    pub count: u32,
    /// The first of them, in stream order.
    pub listed: Vec<Rejection>,
}

impl Rejections {
    /// Counts `rejection` and lists it while there is room.
    pub fn add(&mut self, rejection: Rejection) {
        self.count = self.count.saturating_add(1);
        if self.listed.len() < MAX_REJECTIONS_LISTED {
            self.listed.push(rejection);
        }
    }
}

/// A [`ListeningRecord`] as both backends' SQL binds it.
pub(super) struct PlayRow<'a> {
    pub user_id: &'a str,
    pub track_id: &'a str,
    pub played_at_us: i64,
    pub track_name: &'a str,
    pub artist: &'a str,
    /// JSON array of strings.
    pub genres: String,
    pub ms_played: i64,
    pub skipped: bool,
    pub duration_ms: Option<i64>,
    /// JSON array of the nine features in proto order.
    pub features: Option<String>,
}

impl<'a> PlayRow<'a> {
    /// Encodes `record`; validation bounded every number, so the casts cannot wrap.
    pub fn encode(record: &'a ListeningRecord) -> Result<Self, StoreError> {
        let play = &record.play;
        let encode_error = |error: serde_json::Error| {
            StoreError::Corrupt(format!("cannot encode a play for storing: {error}"))
        };
        let features = play
            .features
            .map(|features| serde_json::to_string(&features.to_array()))
            .transpose()
            .map_err(encode_error)?;
        Ok(Self {
            user_id: &record.user_id,
            track_id: &play.track_id,
            played_at_us: super::micros(record.played_at),
            track_name: &play.track_name,
            artist: &play.artist,
            genres: serde_json::to_string(&play.genres).map_err(encode_error)?,
            ms_played: i64::try_from(play.ms_played).unwrap_or(i64::MAX),
            skipped: play.skipped,
            duration_ms: play
                .duration_ms
                .map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)),
            features,
        })
    }
}

/// A stored play row as both backends read it (the columns of the `listening_plays` table);
/// `FromRow` is derived for any database whose types fit, so one decoding serves both.
#[derive(sqlx::FromRow)]
pub(super) struct StoredPlay {
    pub user_id: String,
    pub track_id: String,
    #[sqlx(rename = "played_at")]
    pub played_at_us: i64,
    pub track_name: String,
    pub artist: String,
    pub genres: String,
    pub ms_played: i64,
    pub skipped: bool,
    pub duration_ms: Option<i64>,
    pub features: Option<String>,
}

impl StoredPlay {
    /// The play this row holds; a value the domain cannot hold is [`StoreError::Corrupt`].
    pub fn decode(self) -> Result<ListeningRecord, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!(
                "play of {:?} / track {:?} at {} µs has {what}",
                self.user_id, self.track_id, self.played_at_us
            ))
        };
        let played_at = super::from_micros(self.played_at_us)
            .ok_or_else(|| corrupt("an unrepresentable time"))?;
        let genres: Vec<String> =
            serde_json::from_str(&self.genres).map_err(|_| corrupt("malformed genres"))?;
        let features = match &self.features {
            Some(text) => Some(AudioFeatures::from_array(
                serde_json::from_str(text).map_err(|_| corrupt("malformed audio features"))?,
            )),
            None => None,
        };
        let ms_played =
            u64::try_from(self.ms_played).map_err(|_| corrupt("a negative ms_played"))?;
        let duration_ms = self
            .duration_ms
            .map(u64::try_from)
            .transpose()
            .map_err(|_| corrupt("a negative duration_ms"))?;
        Ok(ListeningRecord {
            play: Play {
                track_id: self.track_id,
                track_name: self.track_name,
                artist: self.artist,
                genres,
                played_at: Some(played_at),
                ms_played,
                features,
                skipped: self.skipped,
                duration_ms,
            },
            user_id: self.user_id,
            played_at,
        })
    }
}

/// Decodes a stored feedback row; a value the domain cannot hold is [`StoreError::Corrupt`].
pub(super) fn decode_entry(
    id: String,
    user_id: String,
    text: String,
    rating: i64,
    created_at_us: i64,
    source: String,
) -> Result<(i64, Entry), StoreError> {
    let rating = match rating {
        0 => None,
        1..=5 => Some(rating as u8),
        other => {
            return Err(StoreError::Corrupt(format!(
                "feedback {id:?} has rating {other}, not 0..5"
            )));
        }
    };
    let created_at = super::from_micros(created_at_us).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "feedback {id:?} has created_at {created_at_us} µs, not a representable time"
        ))
    })?;
    Ok((
        created_at_us,
        Entry {
            id,
            user_id,
            text,
            rating,
            created_at: Some(created_at),
            source,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records the size of every batch written.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<usize>>);

    impl ImportWriter for Recorder {
        fn upsert_feedback<'a>(
            &'a self,
            entries: &'a [Entry],
            _now: SystemTime,
        ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
            if let Ok(mut sizes) = self.0.lock() {
                sizes.push(entries.len());
            }
            let inserted = u32::try_from(entries.len()).unwrap_or(u32::MAX);
            Box::pin(async move {
                Ok(WriteCounts {
                    inserted,
                    updated: 0,
                })
            })
        }

        fn upsert_plays<'a>(
            &'a self,
            _plays: &'a [ListeningRecord],
            _now: SystemTime,
        ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
            Box::pin(async { Ok(WriteCounts::default()) })
        }
    }

    #[tokio::test]
    async fn items_are_written_in_batches_of_batch_rows() {
        let recorder = Arc::new(Recorder::default());
        let mut import = Import::<Entry>::new(recorder.clone());
        for i in 0..(2 * BATCH_ROWS + 7) {
            let entry = Entry {
                id: format!("e{i}"),
                user_id: String::new(),
                text: "x".to_owned(),
                rating: None,
                created_at: None,
                source: String::new(),
            };
            assert!(import.push(entry).await.is_ok());
        }
        let counts = import.finish().await.ok();
        assert_eq!(counts.map(|c| c.inserted), Some(2 * 500 + 7));
        let sizes = recorder.0.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(sizes, [BATCH_ROWS, BATCH_ROWS, 7]);
    }

    #[test]
    fn rejections_are_all_counted_but_listed_up_to_the_cap() {
        let mut rejections = Rejections::default();
        for position in 0..(MAX_REJECTIONS_LISTED as u32 + 5) {
            rejections.add(Rejection {
                id: String::new(),
                position,
                field: "id".to_owned(),
                reason: "must not be empty".to_owned(),
            });
        }
        assert_eq!(rejections.count, MAX_REJECTIONS_LISTED as u32 + 5);
        assert_eq!(rejections.listed.len(), MAX_REJECTIONS_LISTED);
    }
}
