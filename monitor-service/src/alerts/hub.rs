//! Fan-out of alert events to `StreamAlerts` subscribers, in the console-subscriber style: one
//! producer (the alert pipeline) publishes, each subscriber has its own bounded channel, and
//! publishing never waits: a subscriber whose channel is full is dropped and told it lagged.
//!
//! A new subscriber first gets the alerts firing at that moment, so a dashboard that connects
//! mid-incident sees the incident; the snapshot and the registration happen under one lock, so
//! no event can fall between them or arrive twice.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
};

use futures::Stream;
use tokio::sync::mpsc;

use super::{AlertEvent, AlertState, Severity};

/// Live events a subscriber may have queued before it counts as stuck. Alerts are rare (each
/// needs a dwell time to fire), so a client this far behind is not reading at all.
pub const SUBSCRIBER_BUFFER: usize = 64;

/// Why a subscription ended or could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The subscriber did not read and its buffer filled up; it missed events. Subscribing
    /// again resynchronises it, since the firing alerts are sent first.
    #[error(
        "this alert stream fell more than {buffer} events behind and was dropped; \
         subscribe again (the firing alerts are sent first)"
    )]
    Lagged {
        /// The buffer that filled up.
        buffer: usize,
    },
    /// The server is shutting down; the client should reconnect (to another replica).
    #[error("the server is shutting down; reconnect to keep receiving alerts")]
    ShuttingDown,
}

/// Cheap to clone: all clones share the firing alerts and the subscribers.
#[derive(Clone, Debug, Default)]
pub struct AlertHub {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// FIRING events of the alerts that have not resolved yet, oldest first.
    firing: Vec<Arc<AlertEvent>>,
    subscribers: Vec<Subscriber>,
    closed: bool,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Arc<AlertEvent>>,
    min_severity: Option<Severity>,
    /// Set before `tx` is dropped by the hub, so the receiving side can tell why it ended.
    end: Arc<OnceLock<HubError>>,
}

impl AlertHub {
    /// A hub with no firing alerts and no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock can leave the state half-updated in a way that matters (a
        // panic mid-publish at worst skips some subscribers), so a poisoned lock is used as is
        // rather than failing every later call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to events at or above `min_severity` (`None` = all): the currently firing
    /// alerts first, then every later event as it is published.
    pub fn subscribe(&self, min_severity: Option<Severity>) -> Result<AlertSubscription, HubError> {
        let mut state = self.state();
        if state.closed {
            return Err(HubError::ShuttingDown);
        }
        let snapshot: Vec<_> = state
            .firing
            .iter()
            .filter(|event| event.matches(min_severity))
            .cloned()
            .collect();
        // Room for the snapshot on top of the live buffer, so sending it cannot fail and does
        // not eat into the allowance for live events.
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER + snapshot.len());
        for event in snapshot {
            // Cannot fail: the channel is new, has room for all of them and `rx` is alive.
            let _ = tx.try_send(event);
        }
        let end = Arc::new(OnceLock::new());
        state.subscribers.push(Subscriber {
            tx,
            min_severity,
            end: Arc::clone(&end),
        });
        Ok(AlertSubscription {
            rx,
            end,
            finished: false,
        })
    }

    /// Records `event` as firing or resolved and offers it to every subscriber that wants it,
    /// without waiting: a subscriber whose buffer is full is dropped with
    /// [`HubError::Lagged`], and one that went away is forgotten.
    pub fn publish(&self, event: Arc<AlertEvent>) {
        let mut state = self.state();
        match event.state {
            AlertState::Firing => state.firing.push(Arc::clone(&event)),
            AlertState::Resolved => state.firing.retain(|firing| firing.id != event.id),
        }
        state.subscribers.retain(|subscriber| {
            if !event.matches(subscriber.min_severity) {
                return !subscriber.tx.is_closed();
            }
            match subscriber.tx.try_send(Arc::clone(&event)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = subscriber.end.set(HubError::Lagged {
                        buffer: SUBSCRIBER_BUFFER,
                    });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Ends every subscription with [`HubError::ShuttingDown`] (after the events already
    /// queued for it) and refuses new ones: alert streams never end on their own, so without
    /// this they would hold the server's drain for the whole grace period.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        for subscriber in state.subscribers.drain(..) {
            let _ = subscriber.end.set(HubError::ShuttingDown);
        }
    }

    /// The FIRING events of the alerts firing now, oldest first.
    pub fn firing(&self) -> Vec<Arc<AlertEvent>> {
        self.state().firing.clone()
    }

    /// Subscriptions currently registered.
    pub fn subscribers(&self) -> usize {
        self.state().subscribers.len()
    }
}

/// One subscriber's events: a [`Stream`] of events that ends with one error when the hub
/// dropped the subscriber (it lagged, or the server shuts down).
#[derive(Debug)]
pub struct AlertSubscription {
    rx: mpsc::Receiver<Arc<AlertEvent>>,
    end: Arc<OnceLock<HubError>>,
    finished: bool,
}

impl Stream for AlertSubscription {
    type Item = Result<Arc<AlertEvent>, HubError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(None) => {
                self.finished = true;
                // No reason recorded means the hub itself is gone: the server is stopping.
                let reason = self.end.get().cloned().unwrap_or(HubError::ShuttingDown);
                Poll::Ready(Some(Err(reason)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::{
        alerts::Metric,
        probe::{Level, ProcessMem, Sample, SystemMem},
    };

    fn event(id: &str, severity: Severity, state: AlertState) -> Arc<AlertEvent> {
        Arc::new(AlertEvent {
            id: id.to_owned(),
            at: SystemTime::UNIX_EPOCH,
            severity,
            state,
            metric: Metric::UsageRatio,
            value: 0.9,
            threshold: 0.8,
            message: format!("{id} {state:?}"),
            recommendations: Vec::new(),
            sample: Arc::new(Sample {
                seq: 1,
                at: SystemTime::UNIX_EPOCH,
                process: ProcessMem {
                    pid: 1,
                    rss_bytes: 1,
                    virtual_bytes: 1,
                },
                targets: Vec::new(),
                cgroup: None,
                system: SystemMem::default(),
                usage_ratio: 0.9,
                level: Level::Warning,
            }),
        })
    }

    /// What the subscription yields without waiting.
    fn ready(subscription: &mut AlertSubscription) -> Vec<Result<(String, AlertState), HubError>> {
        let mut seen = Vec::new();
        while let Some(Some(item)) = subscription.next().now_or_never() {
            seen.push(item.map(|event| (event.id.clone(), event.state)));
        }
        seen
    }

    #[test]
    fn a_new_subscriber_gets_the_firing_alerts_first() {
        let hub = AlertHub::new();
        hub.publish(event("a", Severity::Warning, AlertState::Firing));
        hub.publish(event("b", Severity::Critical, AlertState::Firing));
        hub.publish(event("c", Severity::Warning, AlertState::Firing));
        hub.publish(event("a", Severity::Warning, AlertState::Resolved));

        let mut subscription = hub.subscribe(None).unwrap();
        hub.publish(event("d", Severity::Warning, AlertState::Firing));
        assert_eq!(
            ready(&mut subscription),
            vec![
                Ok(("b".to_owned(), AlertState::Firing)),
                Ok(("c".to_owned(), AlertState::Firing)),
                Ok(("d".to_owned(), AlertState::Firing)),
            ]
        );
        let firing: Vec<_> = hub.firing().iter().map(|e| e.id.clone()).collect();
        assert_eq!(firing, vec!["b", "c", "d"]);
    }

    #[test]
    fn min_severity_filters_the_snapshot_and_live_events() {
        let hub = AlertHub::new();
        hub.publish(event("w", Severity::Warning, AlertState::Firing));
        hub.publish(event("c", Severity::Critical, AlertState::Firing));
        let mut critical = hub.subscribe(Some(Severity::Critical)).unwrap();
        let mut warning = hub.subscribe(Some(Severity::Warning)).unwrap();
        hub.publish(event("w", Severity::Warning, AlertState::Resolved));
        hub.publish(event("c", Severity::Critical, AlertState::Resolved));
        assert_eq!(
            ready(&mut critical),
            vec![
                Ok(("c".to_owned(), AlertState::Firing)),
                Ok(("c".to_owned(), AlertState::Resolved)),
            ]
        );
        assert_eq!(ready(&mut warning).len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_never_reads_does_not_block_the_others() {
        let hub = AlertHub::new();
        let mut stuck = hub.subscribe(None).unwrap();
        let mut reader = hub.subscribe(None).unwrap();
        let reading = tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(Ok(event)) = reader.next().await {
                ids.push(event.id.clone());
                if ids.len() == 1000 {
                    break;
                }
            }
            ids
        });
        for n in 0..1000 {
            hub.publish(event(&n.to_string(), Severity::Warning, AlertState::Firing));
            // Let the reader run, as a live client would between two alerts.
            tokio::task::yield_now().await;
        }
        let ids = tokio::time::timeout(Duration::from_secs(1), reading)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids, (0..1000).map(|n| n.to_string()).collect::<Vec<_>>());

        // The stuck one gets what fitted, then learns it lagged, then the stream ends.
        let seen = ready(&mut stuck);
        assert_eq!(seen.len(), SUBSCRIBER_BUFFER + 1);
        assert_eq!(
            seen.last().unwrap(),
            &Err(HubError::Lagged {
                buffer: SUBSCRIBER_BUFFER
            })
        );
        assert!(stuck.next().await.is_none());
    }

    #[test]
    fn gone_subscribers_are_forgotten() {
        let hub = AlertHub::new();
        let subscription = hub.subscribe(Some(Severity::Critical)).unwrap();
        drop(subscription);
        hub.publish(event("w", Severity::Warning, AlertState::Firing));
        assert_eq!(hub.subscribers(), 0);
    }

    #[test]
    fn close_ends_streams_after_their_queued_events_and_refuses_new_ones() {
        let hub = AlertHub::new();
        let mut subscription = hub.subscribe(None).unwrap();
        hub.publish(event("a", Severity::Warning, AlertState::Firing));
        hub.close();
        assert_eq!(
            ready(&mut subscription),
            vec![
                Ok(("a".to_owned(), AlertState::Firing)),
                Err(HubError::ShuttingDown)
            ]
        );
        assert_eq!(hub.subscribe(None).unwrap_err(), HubError::ShuttingDown);
    }
}
