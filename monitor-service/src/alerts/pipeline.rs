//! The alert pipeline: every sample from the sampler goes through the [`AlertEngine`]; every
//! event it produces is logged, queued for the alert history and published to the hub.

use std::{future::Future, sync::Arc};

use futures::{Stream, StreamExt};
use tokio::{sync::broadcast, time::Instant};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use super::{AlertEngine, AlertHub};
use crate::{history::HistoryWriter, probe::Sample};

/// The samples of the sampler's in-process feed (`Sampler::subscribe_internal`) as a stream
/// that ends when the sampler stops. Falling behind is logged and skipped over: the engine
/// judges the samples it gets (an OOM kill is still seen, as the count only grows), and a
/// dwell simply spans the gap.
pub fn samples(feed: broadcast::Receiver<Arc<Sample>>) -> impl Stream<Item = Arc<Sample>> {
    BroadcastStream::new(feed).filter_map(|item| async move {
        match item {
            Ok(sample) => Some(sample),
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "alert engine fell behind the sampler; skipped samples"
                );
                None
            }
        }
    })
}

/// Runs until `samples` ends (the sampler stopped) or `stop` resolves (the server is shutting
/// down), then lets the history writer store what it has queued. Neither the hub nor the
/// history can hold it up: publishing never waits for a subscriber and storing is queued for
/// another task, so a slow or unreachable database never delays an alert.
pub async fn run<S>(
    samples: S,
    mut engine: AlertEngine,
    hub: AlertHub,
    history: HistoryWriter,
    stop: impl Future<Output = ()>,
) where
    S: Stream<Item = Arc<Sample>>,
{
    let mut samples = std::pin::pin!(samples);
    let mut stop = std::pin::pin!(stop);
    loop {
        let sample = tokio::select! {
            biased;
            () = &mut stop => break,
            sample = samples.next() => match sample {
                Some(sample) => sample,
                None => break,
            },
        };
        // Judged at arrival: the sampler hands samples over as soon as they are taken, and the
        // monotonic clock is what dwell times are measured on.
        let now = Instant::now();
        for event in engine.observe(&sample, now) {
            event.log();
            let event = Arc::new(event);
            history.record(Arc::clone(&event));
            hub.publish(event);
        }
    }
    history.finish().await;
}
