//! Memory-pressure shedding: the monitor-service probe, sampled in-process (no network, so
//! shedding never depends on another service being up), turned into a level with hysteresis.
//!
//! - **Critical**: new heavy calls are refused, and the readiness status of
//!   `spotifai.insight.v1.InsightService` turns NOT_SERVING so Kubernetes stops routing to this
//!   pod; the overall "" status (liveness) stays SERVING: restarting would not help. (Only a
//!   sampler that panicked turns liveness NOT_SERVING too, see [`supervise`].)
//! - **Elevated** (warning): calls are admitted but made cheaper (one map call at a time, half
//!   the prompt budget).

use std::time::Duration;

use monitor_service::{
    lifecycle::Drain,
    probe::{Probe, Sample},
};
use spotifai_proto::INSIGHT_SERVICE_NAME;
use tokio::{sync::watch, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};

/// The readiness status of the insight service at `level`.
pub fn readiness(level: Pressure) -> ServingStatus {
    if level == Pressure::Critical {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    }
}

/// How hard memory is pressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// Below the warning thresholds.
    #[default]
    Normal,
    /// At or above a warning threshold: make work cheaper.
    Elevated,
    /// At or above a critical threshold: shed new heavy calls.
    Critical,
}

/// Thresholds of [`PressureTracker`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PressureConfig {
    /// Usage ratio entering Elevated.
    pub warn_ratio: f64,
    /// Usage ratio entering Critical.
    pub critical_ratio: f64,
    /// PSI memory "some" avg10 (percent) entering Elevated.
    pub warn_psi: f64,
    /// PSI memory "some" avg10 (percent) entering Critical.
    pub critical_psi: f64,
    /// A level is left only below threshold × (1 − hysteresis), so a reading hovering at a
    /// threshold does not flap readiness.
    pub hysteresis: f64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            warn_ratio: 0.80,
            critical_ratio: 0.90,
            warn_psi: 10.0,
            critical_psi: 25.0,
            hysteresis: 0.05,
        }
    }
}

/// The level state machine, pure so it is tested without a clock or files.
#[derive(Clone, Copy, Debug, Default)]
pub struct PressureTracker {
    config: PressureConfig,
    level: Pressure,
}

impl PressureTracker {
    /// Starts at Normal.
    pub fn new(config: PressureConfig) -> Self {
        Self {
            config,
            level: Pressure::Normal,
        }
    }

    /// The current level.
    pub fn level(&self) -> Pressure {
        self.level
    }

    /// Feeds one reading (usage ratio, PSI some avg10 if known) and returns the new level.
    pub fn observe(&mut self, ratio: f64, psi: Option<f64>) -> Pressure {
        let c = self.config;
        let psi = psi.unwrap_or(0.0);
        let above = |ratio_t: f64, psi_t: f64| ratio >= ratio_t || psi >= psi_t;
        let below = |ratio_t: f64, psi_t: f64| {
            ratio < ratio_t * (1.0 - c.hysteresis) && psi < psi_t * (1.0 - c.hysteresis)
        };
        let entered = if above(c.critical_ratio, c.critical_psi) {
            Pressure::Critical
        } else if above(c.warn_ratio, c.warn_psi) {
            Pressure::Elevated
        } else {
            Pressure::Normal
        };
        self.level = match self.level {
            Pressure::Critical if !below(c.critical_ratio, c.critical_psi) => Pressure::Critical,
            Pressure::Elevated | Pressure::Critical
                if entered < Pressure::Elevated && !below(c.warn_ratio, c.warn_psi) =>
            {
                Pressure::Elevated
            }
            _ => entered,
        };
        self.level
    }

    /// Feeds a probe sample.
    pub fn observe_sample(&mut self, sample: &Sample) -> Pressure {
        let psi = sample.cgroup.as_ref().and_then(|c| c.pressure_some_avg10);
        self.observe(sample.usage_ratio, psi)
    }
}

/// Whether `sample` gives pressure nothing to go on: no memory limit with a reading (cgroup or
/// machine) and no PSI. Its usage ratio is then 0, Normal: shedding for pressure is off
/// without that being visible anywhere, so the sampler says so in the log.
pub fn reads_nothing(sample: &Sample) -> bool {
    let cgroup_known = sample
        .cgroup
        .as_ref()
        .is_some_and(|c| c.max_bytes > 0 || c.pressure_some_avg10.is_some());
    !cgroup_known && sample.system.total_bytes == 0
}

/// Logs when the probe starts or stops [reading nothing](reads_nothing); returns the new state.
pub fn note_blindness(was_blind: bool, sample: &Sample) -> bool {
    let blind = reads_nothing(sample);
    if blind && !was_blind {
        tracing::error!(
            "the memory probe reads no memory figures (no cgroup limit, no /proc/meminfo, no \
             PSI): pressure counts as Normal and nothing is shed for it until it does"
        );
    } else if was_blind && !blind {
        tracing::info!(
            usage_ratio = sample.usage_ratio,
            "the memory probe reads memory figures again"
        );
    }
    blind
}

/// Samples `probe` every `interval`, publishes the level on `tx`, and keeps the readiness
/// status of the insight service in step (never back to SERVING once draining began). The
/// level already on `tx` (the caller's first sample) is the one in force at the start. Ends
/// when every receiver of `tx` is gone (the server stopped).
///
/// `remote` is the optional second opinion (`--monitor-url`, see
/// `grpc::monitor_alerts`): the level published is the higher of the two. A remote signal that
/// goes away counts as Normal.
pub async fn run_monitor(
    mut probe: Probe,
    mut tracker: PressureTracker,
    interval: Duration,
    tx: watch::Sender<Pressure>,
    mut remote: Option<watch::Receiver<Pressure>>,
    health: HealthReporter,
    drain: Drain,
) {
    // The caller took the first sample; the next is due one interval later.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut published = *tx.borrow();
    let following = remote.is_some();
    // Reported from the first tick on, one interval after the caller's first sample.
    let mut blind = false;
    loop {
        let remote_changed = async {
            match remote.as_mut() {
                Some(receiver) => receiver.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticker.tick() => {
                // A handful of small reads of kernel files: cheaper inline than a blocking-pool
                // hop.
                let sample = probe.sample();
                blind = note_blindness(blind, &sample);
                let before = tracker.level();
                let level = tracker.observe_sample(&sample);
                if level != before {
                    let psi = sample.cgroup.as_ref().and_then(|c| c.pressure_some_avg10);
                    tracing::warn!(
                        from = ?before,
                        to = ?level,
                        usage_ratio = sample.usage_ratio,
                        psi_some_avg10 = psi,
                        "memory pressure changed"
                    );
                }
            }
            alive = remote_changed => {
                if !alive {
                    remote = None;
                }
            }
            () = tx.closed() => return,
        }
        let from_monitor = remote
            .as_ref()
            .map_or(Pressure::Normal, |receiver| *receiver.borrow());
        let level = tracker.level().max(from_monitor);
        if level == published {
            continue;
        }
        // The local change was logged above with its readings; with a monitor, also say which
        // side set the level now in force.
        if following {
            tracing::warn!(
                from = ?published,
                to = ?level,
                local = ?tracker.level(),
                monitor = ?from_monitor,
                "memory pressure level in force changed"
            );
        }
        published = level;
        tx.send_replace(level);
        let status = readiness(level);
        if status == ServingStatus::NotServing || !drain.is_draining() {
            health
                .set_service_status(INSIGHT_SERVICE_NAME, status)
                .await;
            // A drain that began between the check and the update has already announced
            // NOT_SERVING, and SERVING may have landed after it: announce it again. (The drain
            // starts refusing before it announces, so if it had announced before this update,
            // it is visible here.)
            if status == ServingStatus::Serving && drain.is_draining() {
                health
                    .set_service_status(INSIGHT_SERVICE_NAME, ServingStatus::NotServing)
                    .await;
            }
        }
    }
}

/// Watches the sampler task ([`run_monitor`]). Should it ever panic, the level it publishes
/// is frozen, shedding stuck on or off for good, and nothing else would tell: so the service
/// then reports NOT_SERVING for "" (liveness) as well as for itself, and Kubernetes restarts
/// the pod rather than let it run without working overload protection.
pub async fn supervise(sampler: JoinHandle<()>, health: HealthReporter) {
    if let Err(error) = sampler.await
        && error.is_panic()
    {
        tracing::error!(
            %error,
            "the memory pressure sampler panicked; reporting NOT_SERVING so the pod is restarted"
        );
        for name in [INSIGHT_SERVICE_NAME, ""] {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enters_and_leaves_levels_with_hysteresis() {
        let mut t = PressureTracker::new(PressureConfig::default());
        assert_eq!(t.observe(0.50, None), Pressure::Normal);
        assert_eq!(t.observe(0.81, None), Pressure::Elevated);
        assert_eq!(t.observe(0.91, None), Pressure::Critical);
        // Inside the band below critical (0.855..0.90): stays Critical, no flapping.
        assert_eq!(t.observe(0.88, None), Pressure::Critical);
        assert_eq!(t.observe(0.90, None), Pressure::Critical);
        assert_eq!(t.observe(0.86, None), Pressure::Critical);
        // Below 0.855: leaves Critical to Elevated (still above warning).
        assert_eq!(t.observe(0.85, None), Pressure::Elevated);
        // Inside the warning band (0.76..0.80): stays Elevated.
        assert_eq!(t.observe(0.78, None), Pressure::Elevated);
        assert_eq!(t.observe(0.75, None), Pressure::Normal);
    }

    #[test]
    fn a_sample_without_any_memory_figure_reads_nothing() {
        use monitor_service::probe::{CgroupMem, CgroupVersion};
        let mut sample = monitor_service::probe::Probe::new(Default::default()).sample();
        assert!(!reads_nothing(&sample), "{sample:?}");
        assert!(!note_blindness(false, &sample));
        sample.system.total_bytes = 0;
        sample.cgroup = None;
        assert!(reads_nothing(&sample));
        assert!(note_blindness(false, &sample));
        // A cgroup with a limit, or with PSI, is something to go on; one with neither is not.
        let group = |max_bytes, psi| CgroupMem {
            version: CgroupVersion::V2,
            path: "/".into(),
            current_bytes: 1 << 20,
            max_bytes,
            working_set_bytes: 1 << 20,
            anon_bytes: 0,
            file_bytes: 0,
            inactive_file_bytes: 0,
            oom_kills: 0,
            pressure_some_avg10: psi,
            pressure_full_avg10: None,
        };
        for (max_bytes, psi, blind) in [
            (1 << 30, None, false),
            (0, Some(0.0), false),
            (0, None, true),
        ] {
            sample.cgroup = Some(group(max_bytes, psi));
            assert_eq!(reads_nothing(&sample), blind, "{max_bytes} {psi:?}");
        }
    }

    #[test]
    fn psi_alone_can_raise_the_level() {
        let mut t = PressureTracker::new(PressureConfig::default());
        assert_eq!(t.observe(0.1, Some(12.0)), Pressure::Elevated);
        assert_eq!(t.observe(0.1, Some(30.0)), Pressure::Critical);
        assert_eq!(t.observe(0.1, Some(24.0)), Pressure::Critical);
        assert_eq!(t.observe(0.1, Some(2.0)), Pressure::Normal);
    }

    /// The status `health` reports for `service`, by a Check as a probe would ask.
    async fn status_of(health: &HealthReporter, service: &str) -> i32 {
        use tonic_health::pb::{HealthCheckRequest, health_server::Health};
        let service_impl =
            tonic_health::server::HealthService::from_health_reporter(health.clone());
        service_impl
            .check(tonic::Request::new(HealthCheckRequest {
                service: service.to_owned(),
            }))
            .await
            .map(|response| response.into_inner().status)
            .unwrap_or(-1)
    }

    #[tokio::test]
    async fn a_panicked_sampler_turns_liveness_and_readiness_not_serving() {
        let (health, _service) = tonic_health::server::health_reporter();
        health
            .set_service_status(INSIGHT_SERVICE_NAME, ServingStatus::Serving)
            .await;
        let serving = ServingStatus::Serving as i32;
        let not_serving = ServingStatus::NotServing as i32;
        // A sampler that ends normally (the server stopped) changes nothing.
        supervise(tokio::spawn(async {}), health.clone()).await;
        assert_eq!(status_of(&health, "").await, serving);
        assert_eq!(status_of(&health, INSIGHT_SERVICE_NAME).await, serving);
        #[allow(clippy::panic)]
        let sampler = tokio::spawn(async { panic!("injected sampler failure") });
        supervise(sampler, health.clone()).await;
        assert_eq!(status_of(&health, "").await, not_serving);
        assert_eq!(status_of(&health, INSIGHT_SERVICE_NAME).await, not_serving);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_stops_once_the_server_drops_its_receivers() {
        let root = tempfile::tempdir().unwrap();
        let probe = Probe::new(monitor_service::probe::ProbeConfig {
            proc_root: root.path().to_path_buf(),
            cgroup_root: root.path().to_path_buf(),
            pids: Vec::new(),
            warn_ratio: 0.8,
            critical_ratio: 0.9,
        });
        let (health, _service) = tonic_health::server::health_reporter();
        let (tx, rx) = watch::channel(Pressure::Normal);
        let sampler = tokio::spawn(run_monitor(
            probe,
            PressureTracker::new(PressureConfig::default()),
            Duration::from_secs(3600),
            tx,
            None,
            health,
            Drain::new(),
        ));
        // An hour between samples: only the closed channel can end it in time (before the
        // fix it looked only after a level change).
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!sampler.is_finished(), "runs while the server listens");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), sampler)
            .await
            .expect("the sampler ends once nobody listens")
            .unwrap();
    }

    #[test]
    fn a_drop_from_critical_straight_to_calm_is_normal() {
        let mut t = PressureTracker::new(PressureConfig::default());
        t.observe(0.95, None);
        assert_eq!(t.observe(0.2, None), Pressure::Normal);
    }
}
