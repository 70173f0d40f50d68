//! Splitting entries into chunks bounded by an entry count AND a prompt byte budget, so no
//! single map call can grow with the input: the seed app's one-giant-prompt is impossible.

use super::prompts::defanged_len;
use crate::domain::Entry;

/// Bytes a prompt spends on one entry besides its text (fence markers, id, rating): a
/// deliberate over-estimate so a chunk that fits here also fits once rendered.
pub const ENTRY_OVERHEAD_BYTES: usize = 96;

/// Bytes one entry adds to a map prompt (its text as rendered: fence markers inside it are
/// defanged into longer characters).
pub fn entry_prompt_bytes(entry: &Entry) -> usize {
    defanged_len(&entry.text) + entry_overhead_bytes(entry)
}

/// What [`entry_prompt_bytes`] counts for an entry besides its text.
pub fn entry_overhead_bytes(entry: &Entry) -> usize {
    entry.id.len() + ENTRY_OVERHEAD_BYTES
}

/// Splits `entries` in input order into chunks of at most `chunk_size` entries whose prompt
/// bytes stay within `budget_bytes`. An entry larger than the budget on its own still gets a
/// chunk (alone): it was accepted by validation (≤ 8 KiB), so it must be summarized.
pub fn chunk_ranges(
    entries: &[Entry],
    chunk_size: usize,
    budget_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let chunk_size = chunk_size.max(1);
    let mut ranges = Vec::with_capacity(entries.len().div_ceil(chunk_size));
    let mut start = 0;
    let mut bytes = 0;
    for (i, entry) in entries.iter().enumerate() {
        let cost = entry_prompt_bytes(entry);
        let full = i - start == chunk_size;
        let over = i > start && bytes + cost > budget_bytes;
        if full || over {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += cost;
    }
    if start < entries.len() {
        ranges.push(start..entries.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn count_bounds_chunks_when_bytes_fit() {
        let entries: Vec<Entry> = (0..12).map(|i| entry(i, 100)).collect();
        let ranges = chunk_ranges(&entries, 5, 1 << 20);
        assert_eq!(ranges, vec![0..5, 5..10, 10..12]);
    }

    #[test]
    fn byte_budget_splits_large_entries_earlier() {
        // Each entry costs 1000 + 2 + 96 = 1098 bytes; 3 fit in 3500.
        let entries: Vec<Entry> = (0..7).map(|i| entry(i, 1000)).collect();
        let ranges = chunk_ranges(&entries, 50, 3500);
        assert_eq!(ranges, vec![0..3, 3..6, 6..7]);
        for range in &ranges {
            let bytes: usize = entries[range.clone()].iter().map(entry_prompt_bytes).sum();
            assert!(bytes <= 3500);
        }
    }

    #[test]
    fn rendered_map_prompts_fit_the_budget_even_for_text_full_of_fence_markers() {
        // Each "<<<" renders as "‹‹‹", twice its bytes.
        let entries: Vec<Entry> = (0..40)
            .map(|i| Entry {
                text: "<<<".repeat(20 + i * 7),
                ..entry(i, 0)
            })
            .collect();
        for range in chunk_ranges(&entries, 50, 2048) {
            let rendered = crate::pipeline::prompts::map_prompt(&entries[range.clone()], 60, 2048)
                .user
                .len();
            assert!(rendered <= 2048, "{range:?}: {rendered}");
        }
    }

    #[test]
    fn an_entry_larger_than_the_budget_alone_is_cut_to_fit() {
        use crate::pipeline::{
            MAX_TEXT_BYTES,
            prompts::{CUT_MARK, map_prompt},
        };
        // The largest entry validation lets through, plain and all fence markers (rendered
        // three times as long), against the smallest budget, the budget halved under memory
        // pressure, and the default.
        for text in ["a".repeat(MAX_TEXT_BYTES), "<".repeat(MAX_TEXT_BYTES)] {
            for budget in [4096, 8192, 16 * 1024] {
                let big = Entry {
                    text: text.clone(),
                    ..entry(0, 0)
                };
                let alone = std::slice::from_ref(&big);
                assert_eq!(
                    chunk_ranges(alone, 5, budget),
                    vec![0..1],
                    "it still gets a chunk"
                );
                let user = map_prompt(alone, 60, budget).user;
                assert!(user.len() <= budget, "{budget}: {}", user.len());
                let cut = entry_prompt_bytes(&big) > budget;
                assert_eq!(user.contains(CUT_MARK), cut, "{budget}");
                assert!(user.ends_with("<<<END 0>>>\n"), "the fence still closes");
            }
        }
    }

    #[test]
    fn an_entry_over_budget_gets_its_own_chunk() {
        let entries = vec![entry(0, 10), entry(1, 9000), entry(2, 10)];
        assert_eq!(chunk_ranges(&entries, 5, 4096), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn every_entry_is_in_exactly_one_chunk() {
        let entries: Vec<Entry> = (0..1000).map(|i| entry(i, (i * 37) % 3000)).collect();
        let ranges = chunk_ranges(&entries, 7, 8192);
        let mut next = 0;
        for range in ranges {
            assert_eq!(range.start, next);
            assert!(range.len() <= 7 && !range.is_empty());
            next = range.end;
        }
        assert_eq!(next, 1000);
    }
}
