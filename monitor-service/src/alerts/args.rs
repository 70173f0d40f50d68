//! The alert flags of `serve`. The usage-ratio thresholds are the probe's `--warn-ratio` and
//! `--critical-ratio` (one pair of numbers decides both a sample's level and its alerts).

use std::time::Duration;

use clap::Args;

use super::AlertConfig;
use crate::config::ProbeArgs;

/// Alert flags of `serve`.
#[derive(Clone, Debug, PartialEq, Args)]
#[command(next_help_heading = "Alerts")]
pub struct AlertArgs {
    /// Memory pressure (the cgroup's PSI "some avg10": percent of the last 10 s in which some
    /// task stalled waiting for memory) at or above which a WARNING alert fires. 10%: a tenth
    /// of wall time lost to reclaim is already visible as latency, while usage may still look
    /// fine.
    #[arg(long, env = "MONITOR_WARN_PSI", default_value = "10", value_parser = parse_psi)]
    pub warn_psi: f64,

    /// Memory pressure (PSI "some avg10", percent) at or above which a CRITICAL alert fires;
    /// must be above --warn-psi. 25%: a quarter of the time stalled means the group is
    /// thrashing, which typically precedes an OOM kill.
    #[arg(long, env = "MONITOR_CRITICAL_PSI", default_value = "25", value_parser = parse_psi)]
    pub critical_psi: f64,

    /// Hysteresis as a fraction of each threshold (0 <= h < 1): an alert that fired at
    /// threshold T resolves only once its metric is below T × (1 − h), e.g. a WARNING at 0.80
    /// usage clears below 0.76 with the default 0.05. A value oscillating just around a
    /// threshold then cannot resolve and re-fire the alert.
    #[arg(
        long,
        env = "MONITOR_HYSTERESIS",
        default_value = "0.05",
        value_parser = parse_hysteresis
    )]
    pub hysteresis: f64,

    /// How long a condition must hold before its alert fires, and be clear before it
    /// resolves; an OOM-kill alert fires at once and resolves after this long without a new
    /// kill (e.g. "10s", "1m"). 10s: ten samples at the default interval, so one spike or one
    /// dip does not flap an alert, while a real build-up is reported well before it kills.
    #[arg(long, env = "MONITOR_DWELL", default_value = "10s", value_parser = parse_dwell)]
    pub dwell: Duration,
}

impl Default for AlertArgs {
    /// The same values as the command line's defaults.
    fn default() -> Self {
        Self {
            warn_psi: 10.0,
            critical_psi: 25.0,
            hysteresis: 0.05,
            dwell: Duration::from_secs(10),
        }
    }
}

/// An alert flag value the flag parsers could not rule out on their own (a struct built in
/// code, or the cross-flag order rule).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AlertArgsError {
    /// A PSI threshold outside (0, 100].
    #[error("{flag} must be a percentage in (0, 100], got {value}")]
    Psi {
        /// The flag and its variable.
        flag: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// Warning not below critical: the WARNING alert could never be told apart.
    #[error(
        "--warn-psi/MONITOR_WARN_PSI ({warn}) must be below \
         --critical-psi/MONITOR_CRITICAL_PSI ({critical})"
    )]
    PsiOrder {
        /// The warning threshold.
        warn: f64,
        /// The critical threshold.
        critical: f64,
    },
    /// A hysteresis outside [0, 1).
    #[error("--hysteresis/MONITOR_HYSTERESIS must be a fraction in [0, 1), got {0}")]
    Hysteresis(f64),
}

impl AlertArgs {
    /// Checks every value, so arguments built in code get the same guarantees as parsed ones.
    pub fn validate(&self) -> Result<(), AlertArgsError> {
        for (flag, value) in [
            ("--warn-psi/MONITOR_WARN_PSI", self.warn_psi),
            ("--critical-psi/MONITOR_CRITICAL_PSI", self.critical_psi),
        ] {
            if !is_psi(value) {
                return Err(AlertArgsError::Psi { flag, value });
            }
        }
        if self.warn_psi >= self.critical_psi {
            return Err(AlertArgsError::PsiOrder {
                warn: self.warn_psi,
                critical: self.critical_psi,
            });
        }
        if !is_hysteresis(self.hysteresis) {
            return Err(AlertArgsError::Hysteresis(self.hysteresis));
        }
        Ok(())
    }

    /// The engine's configuration: these flags plus the probe's usage-ratio thresholds.
    pub fn config(&self, probe: &ProbeArgs) -> AlertConfig {
        AlertConfig {
            warn_ratio: probe.warn_ratio,
            critical_ratio: probe.critical_ratio,
            warn_psi: self.warn_psi,
            critical_psi: self.critical_psi,
            hysteresis: self.hysteresis,
            dwell: self.dwell,
        }
    }
}

fn is_psi(value: f64) -> bool {
    value > 0.0 && value <= 100.0
}

fn is_hysteresis(value: f64) -> bool {
    (0.0..1.0).contains(&value)
}

/// A percentage in (0, 100]; NaN and infinities fail the range check.
fn parse_psi(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a percentage such as 10, got {text:?}"))?;
    if is_psi(value) {
        Ok(value)
    } else {
        Err(format!("must be a percentage in (0, 100], got {value}"))
    }
}

/// A fraction in [0, 1).
fn parse_hysteresis(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a fraction such as 0.05, got {text:?}"))?;
    if is_hysteresis(value) {
        Ok(value)
    } else {
        Err(format!("must be a fraction in [0, 1), got {value}"))
    }
}

/// A humantime duration ("10s", "1m", "0s" to fire and resolve on the first sample).
fn parse_dwell(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        alerts: AlertArgs,
    }

    fn parse(args: &[&str]) -> Result<AlertArgs, clap::Error> {
        Harness::try_parse_from(["harness"].iter().chain(args).copied()).map(|h| h.alerts)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        if std::env::vars().any(|(name, _)| name.starts_with("MONITOR_")) {
            return;
        }
        assert_eq!(parse(&[]).unwrap(), AlertArgs::default());
    }

    #[test]
    fn parses_every_flag() {
        let args = parse(&[
            "--warn-psi",
            "5",
            "--critical-psi",
            "50.5",
            "--hysteresis",
            "0",
            "--dwell",
            "250ms",
        ])
        .unwrap();
        assert_eq!(
            args,
            AlertArgs {
                warn_psi: 5.0,
                critical_psi: 50.5,
                hysteresis: 0.0,
                dwell: Duration::from_millis(250),
            }
        );
        assert_eq!(args.validate(), Ok(()));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--warn-psi", "0"][..], "--warn-psi"),
            (&["--critical-psi", "101"][..], "--critical-psi"),
            (&["--critical-psi", "NaN"][..], "--critical-psi"),
            (&["--hysteresis", "1"][..], "--hysteresis"),
            (&["--hysteresis=-0.1"][..], "--hysteresis"),
            (&["--dwell", "soon"][..], "--dwell"),
        ] {
            let text = parse(args).unwrap_err().to_string();
            assert!(text.contains(flag), "{args:?}: {text}");
        }
    }

    #[test]
    fn validate_catches_values_built_in_code() {
        let mut args = AlertArgs {
            warn_psi: 30.0,
            ..AlertArgs::default()
        };
        assert_eq!(
            args.validate(),
            Err(AlertArgsError::PsiOrder {
                warn: 30.0,
                critical: 25.0
            })
        );
        args.warn_psi = f64::NAN;
        assert!(matches!(
            args.validate(),
            Err(AlertArgsError::Psi { flag, .. }) if flag.starts_with("--warn-psi")
        ));
        args.warn_psi = 10.0;
        args.hysteresis = 1.0;
        assert_eq!(args.validate(), Err(AlertArgsError::Hysteresis(1.0)));
        let error = AlertArgsError::Hysteresis(1.0).to_string();
        assert!(error.contains("MONITOR_HYSTERESIS"), "{error}");
    }

    #[test]
    fn config_takes_the_ratios_from_the_probe_flags() {
        let probe = ProbeArgs {
            warn_ratio: 0.5,
            critical_ratio: 0.6,
            ..ProbeArgs::default()
        };
        let config = AlertArgs::default().config(&probe);
        assert_eq!((config.warn_ratio, config.critical_ratio), (0.5, 0.6));
        assert_eq!(config.dwell, Duration::from_secs(10));
        assert_eq!((config.warn_psi, config.critical_psi), (10.0, 25.0));
    }
}
