//! Text for people: one alert event as a line, with its recommendations indented below.

use std::time::SystemTime;

use spotifai_proto::monitor::{self as pb, MemoryAlert};

use super::table::{ansi, paint, time_cell};

/// The metric's value in its own unit: the usage ratio as a percentage, PSI (already a
/// percentage) with two decimals, OOM kills as a count.
pub fn metric_value(metric: &str, value: f64) -> String {
    match metric {
        "usage_ratio" => format!("{:.1}%", value * 100.0),
        "oom_kills" => format!("{value:.0}"),
        _ if metric.starts_with("pressure") => format!("{value:.2}%"),
        _ => value.to_string(),
    }
}

const SEVERITY_WIDTH: usize = 8;
const STATE_WIDTH: usize = 8;

/// The event as text: time, severity, state, metric, value vs threshold and message on one
/// line, then each recommendation on its own line, indented. Severity and state are coloured
/// (yellow WARNING, red CRITICAL, green RESOLVED) when `colour` is set.
pub fn format_alert(alert: &MemoryAlert, colour: bool) -> String {
    let at = alert.at.and_then(|at| SystemTime::try_from(at).ok());
    let severity_colour = match alert.severity() {
        pb::Severity::Critical => ansi::RED,
        pb::Severity::Warning | pb::Severity::Unspecified => ansi::YELLOW,
    };
    // Padding first, colour second: escape codes would otherwise count towards the width.
    let severity = format!(
        "{:<SEVERITY_WIDTH$}",
        alert
            .severity()
            .as_str_name()
            .trim_start_matches("SEVERITY_")
    );
    let state = format!(
        "{:<STATE_WIDTH$}",
        alert
            .state()
            .as_str_name()
            .trim_start_matches("ALERT_STATE_")
    );
    let state_colour = match alert.state() {
        pb::AlertState::Resolved => ansi::GREEN,
        pb::AlertState::Firing | pb::AlertState::Unspecified => severity_colour,
    };
    let metric = if alert.metric.is_empty() {
        "?"
    } else {
        &alert.metric
    };
    let mut text = format!(
        "{}  {}  {}  {metric} {} vs threshold {}  {}",
        time_cell(at),
        paint(&severity, severity_colour, colour),
        paint(&state, state_colour, colour),
        metric_value(&alert.metric, alert.value),
        metric_value(&alert.metric, alert.threshold),
        one_line(&alert.message),
    );
    for recommendation in &alert.recommendations {
        text.push_str("\n    - ");
        text.push_str(&one_line(recommendation));
    }
    text
}

/// `text` with line breaks folded into spaces, so one event never breaks the layout.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn alert(state: pb::AlertState) -> MemoryAlert {
        MemoryAlert {
            id: "a1".to_owned(),
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            severity: pb::Severity::Critical.into(),
            state: state.into(),
            metric: "usage_ratio".to_owned(),
            value: 0.934,
            threshold: 0.9,
            message: "memory use is at 93% of the cgroup limit".to_owned(),
            recommendations: vec![
                "reduce concurrency".to_owned(),
                "raise the limit\n(memory.max)".to_owned(),
            ],
            sample: None,
        }
    }

    #[test]
    fn an_event_reads_as_one_line_plus_indented_recommendations() {
        let text = format_alert(&alert(pb::AlertState::Firing), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "2023-11-14T22:13:20.000Z  CRITICAL  FIRING    usage_ratio 93.4% vs threshold \
                 90.0%  memory use is at 93% of the cgroup limit",
                "    - reduce concurrency",
                "    - raise the limit (memory.max)",
            ]
        );
    }

    #[test]
    fn colours_only_when_asked() {
        let plain = format_alert(&alert(pb::AlertState::Resolved), false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = format_alert(&alert(pb::AlertState::Resolved), true);
        assert!(coloured.contains("\x1b[31mCRITICAL\x1b[0m"), "{coloured:?}");
        assert!(coloured.contains("\x1b[32mRESOLVED\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn values_in_the_metrics_unit() {
        assert_eq!(metric_value("usage_ratio", 0.8), "80.0%");
        assert_eq!(metric_value("pressure_some_avg10", 12.345), "12.35%");
        assert_eq!(metric_value("oom_kills", 3.0), "3");
        assert_eq!(metric_value("something_new", 1.5), "1.5");
    }

    #[test]
    fn an_empty_event_still_formats() {
        let text = format_alert(&MemoryAlert::default(), false);
        assert!(
            text.starts_with("unknown  UNSPECIFIED  UNSPECIFIED  ? 0 vs threshold 0"),
            "{text}"
        );
    }
}
