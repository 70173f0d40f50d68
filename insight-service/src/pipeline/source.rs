//! Where a summary's entries come from, and what the pipeline may remember between runs.
//!
//! The pipeline pulls entries from an [`EntrySource`] as a stream and cuts chunks as they
//! arrive ([`Chunker`]), so a summary of stored feedback holds one page of rows and the chunks
//! in flight, never the whole selection: memory does not grow with the number of matching
//! rows. A [`ChunkMemo`] lets finished chunk insights outlive the request (the insight cache,
//! a job's checkpoints), so a retry or an overlapping request does not redo them.

use std::sync::Arc;

use futures::{
    future::BoxFuture,
    stream::{self, BoxStream},
};
use sha2::{Digest, Sha256};

use super::{chunk::entry_prompt_bytes, prompts::PROMPT_VERSION};
use crate::domain::{ChunkInsight, Entry};

/// Why a source could not deliver its entries (the store went away mid-read, say).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// An ordered sequence of entries the pipeline may read more than once (the offline fallback
/// re-reads them when every remote chunk failed).
pub trait EntrySource: Send + Sync {
    /// The entries in order, at most `limit` of them.
    fn entries(&self, limit: usize) -> BoxStream<'_, Result<Entry, SourceError>>;

    /// How many entries the source holds in all, beyond any limit (for `entries_skipped`).
    fn available(&self) -> BoxFuture<'_, Result<usize, SourceError>>;

    /// Whether every read yields the same entries (inline ones); a store's may change.
    fn is_fixed(&self) -> bool {
        false
    }

    /// Every entry, when the source already holds them in memory (inline ones): the map step
    /// then hands out ranges of them instead of copying each entry into a chunk.
    fn shared(&self) -> Option<Arc<Vec<Entry>>> {
        None
    }
}

/// Entries given inline in the request.
#[derive(Clone, Debug)]
pub struct InlineEntries(pub Arc<Vec<Entry>>);

impl EntrySource for InlineEntries {
    fn entries(&self, limit: usize) -> BoxStream<'_, Result<Entry, SourceError>> {
        Box::pin(stream::iter(self.0.iter().take(limit).cloned().map(Ok)))
    }

    fn available(&self) -> BoxFuture<'_, Result<usize, SourceError>> {
        Box::pin(std::future::ready(Ok(self.0.len())))
    }

    fn is_fixed(&self) -> bool {
        true
    }

    fn shared(&self) -> Option<Arc<Vec<Entry>>> {
        Some(self.0.clone())
    }
}

/// Finished chunk insights kept beyond one request, by content key ([`chunk_key`]).
/// Failures are the memo's own business: a memo that cannot read answers `None`, one that
/// cannot write drops the insight; the summary never fails because of its memo.
pub trait ChunkMemo: Send + Sync {
    /// The insight remembered under `key`, if any.
    fn recall<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<ChunkInsight>>;
    /// Remembers a successful chunk's insight under `key`.
    fn remember<'a>(&'a self, key: &'a str, insight: &'a ChunkInsight) -> BoxFuture<'a, ()>;
}

/// Cuts a stream of entries into chunks of at most `chunk_size` entries whose prompt bytes
/// stay within `budget_bytes` (the streaming form of [`super::chunk::chunk_ranges`], with the
/// same boundaries). An entry larger than the budget on its own still gets a chunk.
#[derive(Debug)]
pub struct Chunker {
    chunk_size: usize,
    budget_bytes: usize,
    current: Vec<Entry>,
    bytes: usize,
}

impl Chunker {
    /// An empty chunker.
    pub fn new(chunk_size: usize, budget_bytes: usize) -> Self {
        let chunk_size = chunk_size.max(1);
        Self {
            chunk_size,
            budget_bytes,
            current: Vec::with_capacity(chunk_size),
            bytes: 0,
        }
    }

    /// Adds `entry`; returns the chunk it closed, if it did not fit the current one.
    pub fn push(&mut self, entry: Entry) -> Option<Vec<Entry>> {
        let cost = entry_prompt_bytes(&entry);
        let full = self.current.len() == self.chunk_size;
        let over = !self.current.is_empty() && self.bytes + cost > self.budget_bytes;
        let closed = if full || over {
            self.bytes = 0;
            Some(std::mem::replace(
                &mut self.current,
                Vec::with_capacity(self.chunk_size),
            ))
        } else {
            None
        };
        self.bytes += cost;
        self.current.push(entry);
        closed
    }

    /// The last, partial chunk, if any.
    pub fn finish(self) -> Option<Vec<Entry>> {
        (!self.current.is_empty()).then_some(self.current)
    }
}

/// Feeds `hasher` the identity of `entries` as a cache key sees it: each entry's id, rating
/// (the map prompt shows it, and the sentiment counts it) and a hash of its text,
/// length-prefixed so no two different inputs write the same bytes.
pub fn hash_entries<'a>(hasher: &mut Sha256, entries: impl IntoIterator<Item = &'a Entry>) {
    for entry in entries {
        hash_entry(hasher, entry);
    }
}

/// One entry's part of [`hash_entries`].
pub fn hash_entry(hasher: &mut Sha256, entry: &Entry) {
    hasher.update((entry.id.len() as u64).to_le_bytes());
    hasher.update(entry.id.as_bytes());
    hasher.update([entry.rating.unwrap_or(0)]);
    hasher.update(Sha256::digest(entry.text.as_bytes()));
}

/// The key of one chunk's insight: the prompt version, the backend and model that answer it,
/// the word budget, each entry's share of the prompt budget if the chunk is cut to fit it, and
/// the chunk's entries (ids and text hashes). Equal keys mean the same
/// prompt to the same model, so a remembered insight can stand in for a call.
pub fn chunk_key(
    backend: &str,
    model: &str,
    max_words: usize,
    cut_share: Option<usize>,
    entries: &[Entry],
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"chunk\0");
    hasher.update(PROMPT_VERSION.to_le_bytes());
    for part in [backend, model] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.update((max_words as u64).to_le_bytes());
    // A chunk too large for its prompt budget is prompted cut (`prompts::cut_share`): its
    // answer read that cut text, not the whole, and is not the answer under another budget.
    hasher.update((cut_share.unwrap_or(0) as u64).to_le_bytes());
    hash_entries(&mut hasher, entries);
    hex(&hasher.finalize())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 15)] as char);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::chunk::chunk_ranges;

    fn entry(id: usize, text_len: usize) -> Entry {
        Entry {
            id: format!("e{id}"),
            user_id: String::new(),
            text: "x".repeat(text_len),
            rating: None,
            created_at: None,
            source: String::new(),
        }
    }

    #[test]
    fn the_chunker_cuts_where_chunk_ranges_does() {
        let entries: Vec<Entry> = (0..40).map(|i| entry(i, (i * 97) % 700 + 1)).collect();
        for (size, budget) in [(5, 16 * 1024), (3, 900), (50, 1500), (1, 10)] {
            let expected: Vec<Vec<String>> = chunk_ranges(&entries, size, budget)
                .into_iter()
                .map(|r| entries[r].iter().map(|e| e.id.clone()).collect())
                .collect();
            let mut chunker = Chunker::new(size, budget);
            let mut got = Vec::new();
            for e in entries.iter().cloned() {
                got.extend(chunker.push(e));
            }
            got.extend(chunker.finish());
            let got: Vec<Vec<String>> = got
                .into_iter()
                .map(|c| c.into_iter().map(|e| e.id).collect())
                .collect();
            assert_eq!(got, expected, "chunk_size {size}, budget {budget}");
        }
    }

    #[test]
    fn chunk_keys_change_with_text_backend_and_words_but_not_other_fields() {
        let a = vec![entry(1, 10), entry(2, 20)];
        let key = chunk_key("gemini", "m", 60, None, &a);
        assert_eq!(key.len(), 64);
        assert_eq!(key, chunk_key("gemini", "m", 60, None, &a.clone()));
        let mut edited = a.clone();
        edited[1].text.push('y');
        assert_ne!(key, chunk_key("gemini", "m", 60, None, &edited));
        assert_ne!(key, chunk_key("openai", "m", 60, None, &a));
        assert_ne!(key, chunk_key("gemini", "m2", 60, None, &a));
        assert_ne!(key, chunk_key("gemini", "m", 59, None, &a));
        let mut rated = a.clone();
        rated[0].rating = Some(4);
        assert_ne!(key, chunk_key("gemini", "m", 60, None, &rated));
        // Who wrote it and where it came from are not in the prompt.
        let mut moved = a.clone();
        moved[0].user_id = "someone".into();
        moved[0].source = "ios".into();
        assert_eq!(key, chunk_key("gemini", "m", 60, None, &moved));
    }
}
