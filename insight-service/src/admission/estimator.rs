//! Peak-memory estimate of one heavy call, computed from the 5-byte gRPC length prefix BEFORE
//! the request body is read, so the budget is charged before tonic buffers anything.
//!
//! The estimate is deliberately an upper bound built from the server's own caps (it cannot see
//! the options inside a message it has not decoded yet):
//!
//! ```text
//! FIXED                                  per-call task, h2 stream, response encode buffer
//! + 2 × L                                the encoded message tonic buffers, and the decoded
//!                                        strings (prost copies each string once)
//! + min(L / MIN_ENTRY_BYTES, cap) × E    per-entry struct overhead (proto + domain), for many
//!                                        tiny entries where 2 × L alone would undercount;
//!                                        once the message is in memory its entries (or plays,
//!                                        and their genres) are counted without decoding, and
//!                                        a message holding more is charged the difference
//!                                        ([`counted_elements_bytes`]) before prost decodes it
//! + P × (3 × B + 3 × R)                  P map calls in flight, each with a prompt of at most
//!                                        B bytes (built once, serialized once), the copy of a
//!                                        large chunk's entries its sentiment is computed from
//!                                        off the async workers (`crate::cpu`), and a response
//!                                        body read up to R bytes, which for a moment lives
//!                                        beside the answer text parsed out of it and the JSON
//!                                        parser's scratch copy of that text (R = 0 for the
//!                                        `local` backend, which reads no responses)
//! ```
//!
//! `tests/estimator.rs` measures real peaks with a counting allocator and checks that the
//! estimate bounds them without being wildly pessimistic.

/// Memory a call costs regardless of its size (task, h2 stream state, encode buffers).
pub const FIXED_BYTES: u64 = 256 * 1024;
/// Smallest plausible encoded feedback entry (an id, a one-letter text, tags): bounds the
/// entry count a message of L bytes can hold.
pub const MIN_ENTRY_BYTES: u64 = 12;
/// Heap overhead per decoded entry beyond its string bytes: the protobuf struct, the domain
/// struct, the chunk bookkeeping and its share of the chunk insight.
pub const ENTRY_OVERHEAD_BYTES: u64 = 512;

/// The server settings the estimate depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimatorConfig {
    /// `--max-entries-cap`: no request summarizes more.
    pub max_entries_cap: u64,
    /// `--map-parallelism`: map calls in flight per request.
    pub map_parallelism: u64,
    /// `--prompt-budget-bytes`: the largest prompt.
    pub prompt_budget_bytes: u64,
    /// `--llm-max-response-bytes`: the largest response body read; 0 for the `local`
    /// backend, which reads none.
    pub max_response_bytes: u64,
}

/// Upper bound of the peak heap one call with an `encoded_len`-byte request will use.
pub fn estimate(encoded_len: u64, config: &EstimatorConfig) -> u64 {
    let in_flight = config.map_parallelism.max(1)
        * (3 * config.prompt_budget_bytes + 3 * config.max_response_bytes);
    FIXED_BYTES
        .saturating_add(encoded_len.saturating_mul(2))
        .saturating_add(charged_elements_bytes(encoded_len, config))
        .saturating_add(in_flight)
}

/// Peak memory of a client-streaming import (ImportFeedback, ImportListening), whatever the
/// stream's length and whatever its first message looks like: one message in tonic's buffer
/// and decoded (each at most `max_message_size`; an oversized one is still decoded before
/// validation refuses it), and a batch of `store::BATCH_ROWS` items at the largest valid size
/// (an entry's text and labels), waiting for their transaction.
pub fn import_estimate(max_message_size: u64) -> u64 {
    let item = (crate::pipeline::MAX_TEXT_BYTES + 3 * crate::pipeline::MAX_LABEL_BYTES) as u64
        + ENTRY_OVERHEAD_BYTES;
    FIXED_BYTES
        .saturating_add(max_message_size.saturating_mul(2))
        .saturating_add(crate::store::BATCH_ROWS as u64 * item)
}

/// Heap of one decoded element of a repeated string field (a `String` in a `Vec` that may
/// have doubled while growing, plus the allocator's rounding): what `genres` costs per entry.
pub const STRING_ELEMENT_BYTES: u64 = 64;

/// The per-element term of [`estimate`] as charged before the message is read:
/// `min(L / MIN_ENTRY_BYTES, cap) × ENTRY_OVERHEAD_BYTES`.
pub fn charged_elements_bytes(encoded_len: u64, config: &EstimatorConfig) -> u64 {
    (encoded_len / MIN_ENTRY_BYTES)
        .min(config.max_entries_cap)
        .saturating_mul(ENTRY_OVERHEAD_BYTES)
}

/// The per-element term once the message is in memory and its repeated fields are counted
/// (`admission::wire`): `elements` message elements (entries, plays) and `strings` elements
/// of repeated string fields inside them. prost decodes every one of them before any check of
/// their number, so this is not capped: a message of 2 million empty entries is charged for
/// 2 million entries.
pub fn counted_elements_bytes(elements: u64, strings: u64) -> u64 {
    elements
        .saturating_mul(ENTRY_OVERHEAD_BYTES)
        .saturating_add(strings.saturating_mul(STRING_ELEMENT_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: EstimatorConfig = EstimatorConfig {
        max_entries_cap: 10_000,
        map_parallelism: 4,
        prompt_budget_bytes: 16 * 1024,
        max_response_bytes: 256 * 1024,
    };

    #[test]
    fn grows_with_the_request_and_the_parallelism() {
        let small = estimate(10_000, &CONFIG);
        let large = estimate(3_000_000, &CONFIG);
        assert!(large > small + 5_000_000);
        let wider = estimate(
            10_000,
            &EstimatorConfig {
                map_parallelism: 8,
                ..CONFIG
            },
        );
        assert!(wider > small);
    }

    #[test]
    fn entry_overhead_is_capped_by_the_entries_cap() {
        let huge = estimate(u64::MAX / 4, &CONFIG);
        assert!(huge < u64::MAX, "saturates, never overflows");
        let a = estimate(12 * 20_000, &CONFIG) - 2 * 12 * 20_000;
        let b = estimate(12 * 40_000, &CONFIG) - 2 * 12 * 40_000;
        assert_eq!(a, b, "beyond the cap, only the bytes grow");
    }
}
