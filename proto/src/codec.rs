//! The monitor service's codec: prost encoding with a small per-call encode buffer.
//!
//! tonic gives every call's response body an encode buffer of
//! `DEFAULT_CODEC_BUFFER_SIZE` (8 KiB) for the life of the call. For a unary call that is
//! gone in a millisecond; for a `StreamSamples` subscriber it is held for hours, and it is most of
//! what a subscriber costs the server: at 10,000 subscribers, 80 MiB of buffers for messages of
//! ~250 bytes. A sample or an alert fits in [`ENCODE_BUFFER`] with room to spare; a larger
//! message (a `ListAlerts` page) grows the buffer as it would grow tonic's. Decoding keeps
//! tonic's default: request buffers live only while a request is read.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes reserved per call for encoding its messages: a memory sample is ~250 bytes with a
/// Kubernetes pod's cgroup path, an alert event under 1 KiB.
pub const ENCODE_BUFFER: usize = 1024;

/// tonic's default yield threshold (32 KiB): encoded messages are handed to the transport in
/// batches up to this size when many are ready at once.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with an [`ENCODE_BUFFER`]-byte encode buffer; named by the generated monitor
/// client and server (`codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct SmallMessageCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallMessageCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for SmallMessageCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::Encoder;

    use super::*;
    use crate::monitor::{MemorySample, StreamSamplesRequest};

    #[test]
    fn the_encode_buffer_is_small_and_the_decoder_default() {
        let mut codec = SmallMessageCodec::<MemorySample, StreamSamplesRequest>::default();
        let encoder = codec.encoder();
        let settings = format!("{:?}", encoder.buffer_settings());
        assert!(settings.contains("buffer_size: 1024"), "{settings}");
        let decoder = format!(
            "{:?}",
            tonic::codec::Decoder::buffer_settings(&codec.decoder())
        );
        assert_eq!(decoder, format!("{:?}", BufferSettings::default()));
    }
}
