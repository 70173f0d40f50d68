//! The alert state machine: thresholds with hysteresis and dwell on usage ratio and memory
//! pressure, and an alert on every new OOM kill.
//!
//! It is pure: [`AlertEngine::observe`] takes the sample and the instant it is judged at and
//! returns the events; it reads no clock, logs nothing and sends nothing, so tests drive it with
//! explicit instants and the pipeline decides where events go.

use std::{
    hash::BuildHasher,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{AlertEvent, AlertState, Metric, Severity, advice};
use crate::probe::Sample;

/// Thresholds and timing of the engine (see `AlertArgs` for why the defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// Usage ratio at or above which the usage WARNING alert's condition holds.
    pub warn_ratio: f64,
    /// Usage ratio at or above which the usage CRITICAL alert's condition holds.
    pub critical_ratio: f64,
    /// PSI "some avg10" (percent) at or above which the pressure WARNING condition holds.
    pub warn_psi: f64,
    /// PSI "some avg10" (percent) at or above which the pressure CRITICAL condition holds.
    pub critical_psi: f64,
    /// A firing alert's condition clears below `threshold × (1 − hysteresis)`.
    pub hysteresis: f64,
    /// How long a condition must hold before FIRING and be clear before RESOLVED; also how
    /// long without a new OOM kill resolves the OOM alert.
    pub dwell: Duration,
}

impl Default for AlertConfig {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            warn_ratio: 0.80,
            critical_ratio: 0.90,
            warn_psi: 10.0,
            critical_psi: 25.0,
            hysteresis: 0.05,
            dwell: Duration::from_secs(10),
        }
    }
}

impl AlertConfig {
    /// The level below which a metric that fired at `threshold` counts as clear.
    pub fn clear_level(&self, threshold: f64) -> f64 {
        threshold * (1.0 - self.hysteresis)
    }
}

/// Turns samples into alert events; one per server, fed every sample in order.
#[derive(Debug)]
pub struct AlertEngine {
    config: AlertConfig,
    rules: [ThresholdRule; 4],
    oom: OomRule,
    /// Random per engine, so alert ids never collide across restarts or replicas that share
    /// one history database.
    instance: u64,
    /// Alerts fired so far, numbering the ids of this engine.
    fired: u64,
}

/// One (metric, severity) threshold alert.
#[derive(Debug)]
struct ThresholdRule {
    metric: Metric,
    severity: Severity,
    threshold: f64,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Not firing; `above_since` is when the metric last rose to the threshold, if it is still
    /// there.
    Idle { above_since: Option<Instant> },
    /// Firing as alert `id`; `clear_since` is when the metric last fell below the clear level,
    /// if it is still below it.
    Firing {
        id: String,
        clear_since: Option<Instant>,
    },
}

#[derive(Debug, Default)]
struct OomRule {
    /// The group's kill count in the previous sample that had one.
    last_count: Option<u64>,
    firing: Option<OomAlert>,
}

#[derive(Debug)]
struct OomAlert {
    id: String,
    /// The kill count before the kills that fired it (the event's threshold).
    before: u64,
    /// When the latest kill was seen; the alert resolves a dwell after it.
    last_kill: Instant,
    /// Kills seen while it fired, the first ones included.
    kills: u64,
}

/// What happened to one alert in one observation, before it is dressed as an event.
struct Transition {
    id: String,
    metric: Metric,
    severity: Severity,
    state: AlertState,
    value: f64,
    threshold: f64,
    message: String,
    recommendations: Vec<String>,
}

impl AlertEngine {
    /// An engine with nothing firing. The thresholds are taken as given (`AlertArgs` and
    /// `ProbeArgs` validate them): a misordered pair only makes both alerts fire together.
    pub fn new(config: AlertConfig) -> Self {
        let rule = |metric, severity, threshold| ThresholdRule {
            metric,
            severity,
            threshold,
            phase: Phase::Idle { above_since: None },
        };
        let rules = [
            rule(Metric::UsageRatio, Severity::Warning, config.warn_ratio),
            rule(
                Metric::UsageRatio,
                Severity::Critical,
                config.critical_ratio,
            ),
            rule(
                Metric::PressureSomeAvg10,
                Severity::Warning,
                config.warn_psi,
            ),
            rule(
                Metric::PressureSomeAvg10,
                Severity::Critical,
                config.critical_psi,
            ),
        ];
        Self {
            config,
            rules,
            oom: OomRule::default(),
            instance: random_instance(),
            fired: 0,
        }
    }

    /// The configuration it judges by.
    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// Ids of the alerts firing now.
    pub fn firing(&self) -> Vec<&str> {
        let thresholds = self.rules.iter().filter_map(|rule| match &rule.phase {
            Phase::Firing { id, .. } => Some(id.as_str()),
            Phase::Idle { .. } => None,
        });
        thresholds
            .chain(self.oom.firing.as_ref().map(|alert| alert.id.as_str()))
            .collect()
    }

    /// Judges `sample`, taken at `now`, and returns the FIRING and RESOLVED events it causes,
    /// in rule order (usage warning, usage critical, pressure warning, pressure critical, OOM).
    ///
    /// A threshold alert fires once its metric has stayed at or above the threshold for the
    /// dwell time, and resolves once it has stayed below the clear level (see
    /// [`AlertConfig::clear_level`]) for the dwell time; a sample in between restarts the
    /// wait. A metric the sample lacks (no PSI, no cgroup) cannot fire, and counts as clear
    /// for an alert already firing, so a vanished metric does not keep an alert up forever.
    /// Samples must come with non-decreasing instants; an earlier one counts as "no time
    /// passed".
    pub fn observe(&mut self, sample: &Sample, now: Instant) -> Vec<AlertEvent> {
        let mut transitions = Vec::new();
        for index in 0..self.rules.len() {
            if let Some(transition) = self.observe_threshold(index, sample, now) {
                transitions.push(transition);
            }
        }
        if let Some(transition) = self.observe_oom(sample, now) {
            transitions.push(transition);
        }
        if transitions.is_empty() {
            return Vec::new();
        }
        let shared = Arc::new(sample.clone());
        transitions
            .into_iter()
            .map(|transition| AlertEvent {
                id: transition.id,
                at: sample.at,
                severity: transition.severity,
                state: transition.state,
                metric: transition.metric,
                value: transition.value,
                threshold: transition.threshold,
                message: transition.message,
                recommendations: transition.recommendations,
                sample: Arc::clone(&shared),
            })
            .collect()
    }

    fn observe_threshold(
        &mut self,
        index: usize,
        sample: &Sample,
        now: Instant,
    ) -> Option<Transition> {
        let dwell = self.config.dwell;
        let (metric, severity, threshold) = {
            let rule = &self.rules[index];
            (rule.metric, rule.severity, rule.threshold)
        };
        let clear_level = self.config.clear_level(threshold);
        let value = metric_value(metric, sample);
        match &mut self.rules[index].phase {
            Phase::Idle { above_since } => {
                let Some(value) = value.filter(|value| *value >= threshold) else {
                    *above_since = None;
                    return None;
                };
                let since = *above_since.get_or_insert(now);
                if now.saturating_duration_since(since) < dwell {
                    return None;
                }
                let id = self.next_id(metric, severity);
                self.rules[index].phase = Phase::Firing {
                    id: id.clone(),
                    clear_since: None,
                };
                Some(Transition {
                    id,
                    metric,
                    severity,
                    state: AlertState::Firing,
                    value,
                    threshold,
                    message: advice::firing_message(metric, severity, value, threshold, sample),
                    recommendations: advice::recommendations(metric, severity, sample),
                })
            }
            Phase::Firing { id, clear_since } => {
                if value.is_some_and(|value| value >= clear_level) {
                    *clear_since = None;
                    return None;
                }
                let since = *clear_since.get_or_insert(now);
                if now.saturating_duration_since(since) < dwell {
                    return None;
                }
                let id = std::mem::take(id);
                self.rules[index].phase = Phase::Idle { above_since: None };
                Some(Transition {
                    id,
                    metric,
                    severity,
                    state: AlertState::Resolved,
                    // A vanished metric reads as 0, as the protobuf sample shows it.
                    value: value.unwrap_or(0.0),
                    threshold,
                    message: advice::resolved_message(metric, severity, value, clear_level, sample),
                    recommendations: Vec::new(),
                })
            }
        }
    }

    fn observe_oom(&mut self, sample: &Sample, now: Instant) -> Option<Transition> {
        let count = sample.cgroup.as_ref().map(|group| group.oom_kills);
        // A count that went down belongs to a recreated group: it becomes the new baseline.
        // The first count seen is a baseline too: kills before the monitor started are not new.
        let new_kills = match (self.oom.last_count, count) {
            (Some(before), Some(count)) if count > before => Some((before, count)),
            _ => None,
        };
        if count.is_some() {
            self.oom.last_count = count;
        }
        if let Some((before, count)) = new_kills {
            if let Some(alert) = &mut self.oom.firing {
                // Kills while it fires extend the alert rather than start new ones, so a crash
                // loop is one alert; its RESOLVED message counts them.
                alert.last_kill = now;
                alert.kills = alert.kills.saturating_add(count - before);
                return None;
            }
            let id = self.next_id(Metric::OomKills, Severity::Critical);
            self.oom.firing = Some(OomAlert {
                id: id.clone(),
                before,
                last_kill: now,
                kills: count - before,
            });
            return Some(Transition {
                id,
                metric: Metric::OomKills,
                severity: Severity::Critical,
                state: AlertState::Firing,
                value: count as f64,
                threshold: before as f64,
                message: advice::oom_firing_message(count - before, count, sample),
                recommendations: advice::recommendations(
                    Metric::OomKills,
                    Severity::Critical,
                    sample,
                ),
            });
        }
        let quiet = self.oom.firing.as_ref().is_some_and(|alert| {
            now.saturating_duration_since(alert.last_kill) >= self.config.dwell
        });
        if !quiet {
            return None;
        }
        let alert = self.oom.firing.take()?;
        Some(Transition {
            id: alert.id,
            metric: Metric::OomKills,
            severity: Severity::Critical,
            state: AlertState::Resolved,
            value: self.oom.last_count.unwrap_or(alert.before) as f64,
            threshold: alert.before as f64,
            message: advice::oom_resolved_message(alert.kills, self.config.dwell, sample),
            recommendations: Vec::new(),
        })
    }

    fn next_id(&mut self, metric: Metric, severity: Severity) -> String {
        self.fired += 1;
        format!("{metric}-{severity}-{:016x}-{}", self.instance, self.fired)
    }
}

/// The metric's value in `sample`; `None` when the sample lacks it. Non-finite readings (a
/// malformed kernel file) are treated as missing rather than as infinitely high.
fn metric_value(metric: Metric, sample: &Sample) -> Option<f64> {
    let value = match metric {
        Metric::UsageRatio => Some(sample.usage_ratio),
        Metric::PressureSomeAvg10 => sample
            .cgroup
            .as_ref()
            .and_then(|group| group.pressure_some_avg10),
        Metric::OomKills => sample.cgroup.as_ref().map(|group| group.oom_kills as f64),
    };
    value.filter(|value| value.is_finite())
}

/// A random number per engine: std's `RandomState` is seeded from the OS's randomness, and
/// the time and pid are mixed in so two engines in one process differ too.
fn random_instance() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::probe::{CgroupMem, CgroupVersion, Level, ProcessMem, SystemMem};

    const MIB: u64 = 1024 * 1024;
    const LIMIT: u64 = 256 * MIB;

    /// A sample of a 256 MiB cgroup at `ratio`, mostly anonymous memory.
    fn sample(ratio: f64) -> Sample {
        let working_set = (ratio * LIMIT as f64) as u64;
        Sample {
            seq: 0,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            process: ProcessMem {
                pid: 1,
                rss_bytes: working_set,
                virtual_bytes: 2 * working_set,
            },
            targets: Vec::new(),
            cgroup: Some(CgroupMem {
                version: CgroupVersion::V2,
                path: "/app".into(),
                current_bytes: working_set,
                max_bytes: LIMIT,
                working_set_bytes: working_set,
                anon_bytes: working_set * 9 / 10,
                file_bytes: working_set / 10,
                inactive_file_bytes: 0,
                oom_kills: 0,
                pressure_some_avg10: Some(0.0),
                pressure_full_avg10: Some(0.0),
            }),
            system: SystemMem {
                total_bytes: 16 * 1024 * MIB,
                available_bytes: 8 * 1024 * MIB,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            usage_ratio: ratio,
            level: Level::of_ratio(ratio, 0.8, 0.9),
        }
    }

    fn with_psi(mut sample: Sample, psi: Option<f64>) -> Sample {
        if let Some(group) = &mut sample.cgroup {
            group.pressure_some_avg10 = psi;
        }
        sample
    }

    fn with_oom_kills(mut sample: Sample, kills: u64) -> Sample {
        if let Some(group) = &mut sample.cgroup {
            group.oom_kills = kills;
        }
        sample
    }

    /// Feeds one sample per second (the default interval) and returns the events with the
    /// second they happened at.
    struct Driver {
        engine: AlertEngine,
        start: Instant,
        second: u64,
    }

    impl Driver {
        fn new() -> Self {
            Self {
                engine: AlertEngine::new(AlertConfig::default()),
                start: Instant::now(),
                second: 0,
            }
        }

        fn feed(&mut self, sample: &Sample) -> Vec<AlertEvent> {
            let now = self.start + Duration::from_secs(self.second);
            self.second += 1;
            self.engine.observe(sample, now)
        }

        /// Feeds `sample` for `seconds` seconds; returns (second, event) pairs.
        fn hold(&mut self, sample: &Sample, seconds: u64) -> Vec<(u64, AlertEvent)> {
            let mut events = Vec::new();
            for _ in 0..seconds {
                let second = self.second;
                events.extend(self.feed(sample).into_iter().map(|event| (second, event)));
            }
            events
        }
    }

    fn summary(events: &[(u64, AlertEvent)]) -> Vec<(u64, Metric, Severity, AlertState)> {
        events
            .iter()
            .map(|(second, event)| (*second, event.metric, event.severity, event.state))
            .collect()
    }

    #[test]
    fn warning_fires_only_after_the_dwell() {
        let mut driver = Driver::new();
        assert!(driver.hold(&sample(0.5), 5).is_empty());
        // Above 0.80 from second 5 on: the condition has held 10 s at second 15.
        let events = driver.hold(&sample(0.85), 20);
        assert_eq!(
            summary(&events),
            vec![(
                15,
                Metric::UsageRatio,
                Severity::Warning,
                AlertState::Firing
            )]
        );
        let event = &events[0].1;
        assert_eq!(event.value, 0.85);
        assert_eq!(event.threshold, 0.80);
        assert_eq!(
            event.message,
            "memory working set at 85% of the 256 MiB cgroup limit (warning ≥ 80%)"
        );
        assert!(!event.recommendations.is_empty());
        assert_eq!(event.sample.usage_ratio, 0.85);
        assert!(event.id.starts_with("usage_ratio-warning-"), "{}", event.id);
        assert_eq!(driver.engine.firing(), vec![event.id.as_str()]);
    }

    #[tokio::test(start_paused = true)]
    async fn dwell_is_measured_on_the_paused_tokio_clock() {
        let mut engine = AlertEngine::new(AlertConfig::default());
        let hot = sample(0.95);
        assert!(engine.observe(&hot, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(engine.observe(&hot, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let events = engine.observe(&hot, Instant::now());
        let fired: Vec<_> = events.iter().map(|e| (e.severity, e.state)).collect();
        assert_eq!(
            fired,
            vec![
                (Severity::Warning, AlertState::Firing),
                (Severity::Critical, AlertState::Firing)
            ]
        );
    }

    #[test]
    fn a_spike_shorter_than_the_dwell_fires_nothing() {
        let mut driver = Driver::new();
        for _ in 0..5 {
            assert!(driver.hold(&sample(0.97), 9).is_empty());
            assert!(driver.hold(&sample(0.5), 1).is_empty());
        }
        assert!(driver.engine.firing().is_empty());
    }

    #[test]
    fn a_value_oscillating_inside_the_hysteresis_band_does_not_flap() {
        let mut driver = Driver::new();
        let fired = driver.hold(&sample(0.82), 11);
        assert_eq!(fired.len(), 1);
        // Warning fired at 0.80 and clears below 0.76: 0.77..0.83 for two minutes stays one
        // alert, without a RESOLVED/FIRING pair per dip.
        for second in 0..120 {
            let ratio = if second % 2 == 0 { 0.77 } else { 0.83 };
            assert!(driver.feed(&sample(ratio)).is_empty(), "second {second}");
        }
        assert_eq!(driver.engine.firing(), vec![fired[0].1.id.as_str()]);
    }

    #[test]
    fn a_value_oscillating_around_the_threshold_never_fires() {
        let mut driver = Driver::new();
        for second in 0..120 {
            let ratio = if second % 3 == 2 { 0.79 } else { 0.81 };
            assert!(driver.feed(&sample(ratio)).is_empty(), "second {second}");
        }
    }

    #[test]
    fn escalates_to_critical_and_resolves_in_order_after_clear_for_the_dwell() {
        let mut driver = Driver::new();
        let mut events = driver.hold(&sample(0.85), 12);
        events.extend(driver.hold(&sample(0.93), 12));
        // Back under the critical clear level (0.855) but in warning territory.
        events.extend(driver.hold(&sample(0.84), 12));
        // Under the warning clear level (0.76), with one dip back up that restarts the wait.
        events.extend(driver.hold(&sample(0.70), 5));
        events.extend(driver.hold(&sample(0.78), 1));
        events.extend(driver.hold(&sample(0.70), 12));
        assert_eq!(
            summary(&events),
            vec![
                (
                    10,
                    Metric::UsageRatio,
                    Severity::Warning,
                    AlertState::Firing
                ),
                (
                    22,
                    Metric::UsageRatio,
                    Severity::Critical,
                    AlertState::Firing
                ),
                (
                    34,
                    Metric::UsageRatio,
                    Severity::Critical,
                    AlertState::Resolved
                ),
                (
                    52,
                    Metric::UsageRatio,
                    Severity::Warning,
                    AlertState::Resolved
                ),
            ]
        );
        let by_severity = |severity, state| {
            events
                .iter()
                .find(|(_, e)| e.severity == severity && e.state == state)
                .map(|(_, e)| e.clone())
                .unwrap()
        };
        let critical = by_severity(Severity::Critical, AlertState::Firing);
        let resolved = by_severity(Severity::Critical, AlertState::Resolved);
        assert_eq!(critical.id, resolved.id);
        assert_ne!(
            critical.id,
            by_severity(Severity::Warning, AlertState::Firing).id
        );
        assert_eq!(
            critical.message,
            "memory working set at 93% of the 256 MiB cgroup limit (critical ≥ 90%)"
        );
        assert_eq!(resolved.threshold, 0.90);
        assert_eq!(resolved.value, 0.84);
        assert_eq!(
            resolved.message,
            "memory working set back to 84% of the 256 MiB cgroup limit \
             (critical cleared below 85.5%)"
        );
        assert!(resolved.recommendations.is_empty());
        assert!(driver.engine.firing().is_empty());
    }

    #[test]
    fn a_resolved_alert_fires_again_with_a_new_id() {
        let mut driver = Driver::new();
        let first = driver.hold(&sample(0.85), 11);
        assert_eq!(driver.hold(&sample(0.5), 11).len(), 1);
        let second = driver.hold(&sample(0.85), 11);
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].1.id, second[0].1.id);
    }

    #[test]
    fn pressure_alerts_fire_and_a_vanished_metric_resolves_them() {
        let mut driver = Driver::new();
        let events = driver.hold(&with_psi(sample(0.5), Some(30.0)), 11);
        assert_eq!(
            summary(&events),
            vec![
                (
                    10,
                    Metric::PressureSomeAvg10,
                    Severity::Warning,
                    AlertState::Firing
                ),
                (
                    10,
                    Metric::PressureSomeAvg10,
                    Severity::Critical,
                    AlertState::Firing
                ),
            ]
        );
        assert_eq!(
            events[1].1.message,
            "memory pressure: tasks of cgroup /app stalled on memory 30% of the last 10 s \
             (critical ≥ 25%)"
        );
        let events = driver.hold(&with_psi(sample(0.5), None), 11);
        let states: Vec<_> = events.iter().map(|(_, e)| e.state).collect();
        assert_eq!(states, vec![AlertState::Resolved, AlertState::Resolved]);
        assert!(driver.hold(&with_psi(sample(0.5), None), 30).is_empty());
    }

    #[test]
    fn an_oom_kill_fires_at_once_and_resolves_after_the_dwell_without_kills() {
        let mut driver = Driver::new();
        // Kills before the monitor started are not new.
        assert!(driver.hold(&with_oom_kills(sample(0.5), 3), 5).is_empty());
        let events = driver.hold(&with_oom_kills(sample(0.5), 4), 1);
        assert_eq!(
            summary(&events),
            vec![(5, Metric::OomKills, Severity::Critical, AlertState::Firing)]
        );
        let fired = &events[0].1;
        assert_eq!((fired.value, fired.threshold), (4.0, 3.0));
        assert_eq!(
            fired.message,
            "1 new OOM kill in cgroup /app (4 in total): the kernel killed a process at the \
             256 MiB limit"
        );
        assert!(
            fired
                .recommendations
                .iter()
                .any(|r| r.contains("--max-concurrency"))
        );
        // A second kill 5 s later extends the alert instead of firing another one.
        assert!(driver.hold(&with_oom_kills(sample(0.5), 4), 4).is_empty());
        assert!(driver.hold(&with_oom_kills(sample(0.5), 6), 1).is_empty());
        let events = driver.hold(&with_oom_kills(sample(0.5), 6), 11);
        assert_eq!(
            summary(&events),
            vec![(
                20,
                Metric::OomKills,
                Severity::Critical,
                AlertState::Resolved
            )]
        );
        let resolved = &events[0].1;
        assert_eq!(resolved.id, fired.id);
        assert_eq!((resolved.value, resolved.threshold), (6.0, 3.0));
        assert_eq!(
            resolved.message,
            "no new OOM kill in cgroup /app for 10s (3 during the alert)"
        );
    }

    #[test]
    fn oom_counts_that_go_down_are_a_new_baseline() {
        let mut driver = Driver::new();
        assert!(driver.hold(&with_oom_kills(sample(0.5), 5), 2).is_empty());
        assert!(driver.hold(&with_oom_kills(sample(0.5), 0), 2).is_empty());
        assert_eq!(driver.hold(&with_oom_kills(sample(0.5), 1), 1).len(), 1);
    }

    #[test]
    fn samples_without_a_cgroup_or_with_odd_values_do_not_panic_or_fire() {
        let mut driver = Driver::new();
        let mut bare = sample(f64::NAN);
        bare.cgroup = None;
        assert!(driver.hold(&bare, 30).is_empty());
        let infinite = with_psi(sample(0.5), Some(f64::INFINITY));
        assert!(driver.hold(&infinite, 30).is_empty());
        let mut zero = sample(0.0);
        zero.cgroup = None;
        zero.system = SystemMem::default();
        assert!(driver.hold(&zero, 30).is_empty());
    }

    #[test]
    fn zero_dwell_fires_on_the_first_sample() {
        let mut engine = AlertEngine::new(AlertConfig {
            dwell: Duration::ZERO,
            ..AlertConfig::default()
        });
        let now = Instant::now();
        assert_eq!(engine.observe(&sample(0.85), now).len(), 1);
        assert_eq!(engine.observe(&sample(0.5), now).len(), 1);
    }

    #[test]
    fn ids_differ_between_engines() {
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let mut engine = AlertEngine::new(AlertConfig {
                    dwell: Duration::ZERO,
                    ..AlertConfig::default()
                });
                engine.observe(&sample(0.85), Instant::now())[0].id.clone()
            })
            .collect();
        assert_ne!(ids[0], ids[1]);
    }
}
