//! Counting repeated fields in an encoded protobuf message without decoding it.
//!
//! prost decodes every element of a repeated field before any validation can look at the
//! count, and an element costs far more decoded than on the wire: an empty `FeedbackEntry` is
//! 2 bytes encoded and 128 bytes as a struct, so a 4 MiB message of them would decode into
//! ~2 million entries and hundreds of MiB, far past what memory admission charged for it. The
//! admission layer counts them here first (the message is already in memory, and this reads it
//! without allocating) and charges what they will decode to before prost runs.

/// Wire types of the protobuf encoding.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// One field of a message: its number, and for a length-delimited field its payload.
struct Field<'a> {
    number: u64,
    payload: Option<&'a [u8]>,
}

/// Reads a base-128 varint at `*pos`, with prost's own decoder (so it accepts exactly what
/// prost will).
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut rest = buf.get(*pos..)?;
    let value = prost::encoding::decode_varint(&mut rest).ok()?;
    *pos = buf.len() - rest.len();
    Some(value)
}

/// The fields of `message` in order; `None` at the first malformed one.
fn fields(message: &[u8]) -> impl Iterator<Item = Option<Field<'_>>> {
    let mut pos = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= message.len() {
            return None;
        }
        let field = next_field(message, &mut pos);
        failed = field.is_none();
        Some(field)
    })
}

fn next_field<'a>(message: &'a [u8], pos: &mut usize) -> Option<Field<'a>> {
    let key = varint(message, pos)?;
    let number = key >> 3;
    let payload = match (key & 7) as u8 {
        VARINT => {
            varint(message, pos)?;
            None
        }
        FIXED64 => {
            *pos = pos.checked_add(8).filter(|end| *end <= message.len())?;
            None
        }
        FIXED32 => {
            *pos = pos.checked_add(4).filter(|end| *end <= message.len())?;
            None
        }
        LEN => {
            let len = usize::try_from(varint(message, pos)?).ok()?;
            let end = pos.checked_add(len).filter(|end| *end <= message.len())?;
            let payload = &message[*pos..end];
            *pos = end;
            Some(payload)
        }
        // Groups (3, 4) are not used by proto3 messages; anything else is not protobuf.
        _ => return None,
    };
    (number != 0).then_some(Field { number, payload })
}

/// The payloads of every occurrence of the length-delimited field `number` in `message`.
fn occurrences(message: &[u8], number: u64) -> impl Iterator<Item = Option<&[u8]>> {
    fields(message).filter_map(move |field| match field {
        None => Some(None),
        Some(Field {
            number: n,
            payload: Some(payload),
        }) if n == number => Some(Some(payload)),
        // The same number with another wire type is for prost to reject.
        Some(_) => None,
    })
}

/// What a repeated field at a path holds: how many elements in all, and how many occurrences
/// of a field inside them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Elements of the repeated field, over every occurrence of the messages around it (prost
    /// merges repeated occurrences of a message field, so they add up).
    pub elements: usize,
    /// Occurrences of the inner field in all elements together.
    pub total_inner: usize,
}

/// Counts the elements of the repeated message field at `path` (field numbers from the top
/// level, e.g. `[1, 1]` for `input.entries` then `entries`), and the occurrences of field
/// `inner` inside them (0 if `inner` is `None`). `None` when the bytes are not valid protobuf
/// wire format.
pub fn count(message: &[u8], path: &[u64], inner: Option<u64>) -> Option<Counted> {
    let mut counted = Counted::default();
    walk(message, path, inner, &mut counted)?;
    Some(counted)
}

fn walk(message: &[u8], path: &[u64], inner: Option<u64>, counted: &mut Counted) -> Option<()> {
    let Some((&first, rest)) = path.split_first() else {
        return Some(());
    };
    for payload in occurrences(message, first) {
        let payload = payload?;
        if rest.is_empty() {
            counted.elements += 1;
            if let Some(inner) = inner {
                for field in fields(payload) {
                    counted.total_inner += usize::from(field?.number == inner);
                }
            }
        } else {
            walk(payload, rest, inner, counted)?;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use spotifai_proto::insight as pb;

    use super::*;

    fn summarize(entries: usize) -> Vec<u8> {
        pb::SummarizeFeedbackRequest {
            input: Some(pb::summarize_feedback_request::Input::Entries(
                pb::FeedbackBatch {
                    entries: (0..entries)
                        .map(|i| pb::FeedbackEntry {
                            id: format!("e{i}"),
                            text: "the ads".into(),
                            rating: 3,
                            ..Default::default()
                        })
                        .collect(),
                },
            )),
            options: Some(pb::SummaryOptions {
                chunk_size: Some(5),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_the_entries_of_a_real_request() {
        for n in [0, 1, 15, 10_001] {
            let counted = count(&summarize(n), &[1, 1], None).unwrap();
            assert_eq!(counted.elements, n);
        }
    }

    #[test]
    fn counts_empty_entries_and_merged_occurrences() {
        // Two `entries` batches of empty entries (2 bytes each on the wire): prost merges
        // them, so the count is their sum.
        let mut batch = Vec::new();
        for _ in 0..1000 {
            batch.extend_from_slice(&[0x0a, 0x00]);
        }
        let mut message = Vec::new();
        for _ in 0..2 {
            message.push(0x0a);
            prost::encoding::encode_varint(batch.len() as u64, &mut message);
            message.extend_from_slice(&batch);
        }
        assert_eq!(count(&message, &[1, 1], None).unwrap().elements, 2000);
        let decoded = pb::SummarizeFeedbackRequest::decode(message.as_slice()).unwrap();
        let Some(pb::summarize_feedback_request::Input::Entries(batch)) = decoded.input else {
            panic!("entries expected");
        };
        assert_eq!(batch.entries.len(), 2000, "prost agrees");
    }

    #[test]
    fn counts_genres_per_play() {
        let play = |genres: usize| pb::TrackPlay {
            track_id: "t".into(),
            genres: vec![String::new(); genres],
            ..Default::default()
        };
        let message = pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::History(
                pb::ListeningHistory {
                    plays: vec![play(2), play(40), play(0)],
                },
            )),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            count(&message, &[1, 1], Some(4)).unwrap(),
            Counted {
                elements: 3,
                total_inner: 42,
            }
        );
    }

    #[test]
    fn malformed_bytes_are_none_never_a_panic() {
        for bad in [
            &[0x0a, 0x05, 0x01][..],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[0x0b],
            &[0x08],
            &[0x09, 0x00],
            &[0x00, 0x00],
        ] {
            assert_eq!(count(bad, &[1, 1], Some(4)), None, "{bad:?}");
        }
        // Another field of the same number but not length-delimited is left to prost.
        assert_eq!(count(&[0x08, 0x01], &[1, 1], None).unwrap().elements, 0);
    }
}
