//! What an alert says: its one-line message and the cleanup recommendations, chosen from the
//! sample the way the old monitor script's checklist was meant to be read (which knob to turn,
//! and whether the page cache or the process heap is the problem).

use std::time::Duration;

use super::{Metric, Severity};
use crate::probe::{CgroupMem, Sample};

const KIB: f64 = 1024.0;
const MIB: f64 = KIB * 1024.0;
const GIB: f64 = MIB * 1024.0;

/// The message of a threshold alert's FIRING event.
pub(super) fn firing_message(
    metric: Metric,
    severity: Severity,
    value: f64,
    threshold: f64,
    sample: &Sample,
) -> String {
    match metric {
        Metric::UsageRatio => format!(
            "{} at {} of {} ({severity} ≥ {})",
            usage_subject(sample),
            percent(value),
            usage_limit(sample),
            percent(threshold)
        ),
        Metric::PressureSomeAvg10 => format!(
            "memory pressure: tasks of {} stalled on memory {} of the last 10 s \
             ({severity} ≥ {})",
            group_name(sample),
            psi_percent(value),
            psi_percent(threshold)
        ),
        // OOM alerts have their own message (`oom_firing_message`); this keeps the function
        // total.
        Metric::OomKills => format!(
            "{} OOM kills in {} ({severity} above {threshold})",
            value,
            group_name(sample)
        ),
    }
}

/// The message of a threshold alert's RESOLVED event; `value` is `None` when the sample no
/// longer has the metric.
pub(super) fn resolved_message(
    metric: Metric,
    severity: Severity,
    value: Option<f64>,
    clear_level: f64,
    sample: &Sample,
) -> String {
    match (metric, value) {
        (Metric::UsageRatio, Some(value)) => format!(
            "{} back to {} of {} ({severity} cleared below {})",
            usage_subject(sample),
            percent(value),
            usage_limit(sample),
            percent(clear_level)
        ),
        (Metric::PressureSomeAvg10, Some(value)) => format!(
            "memory pressure of {} down to {} of the last 10 s ({severity} cleared below {})",
            group_name(sample),
            psi_percent(value),
            psi_percent(clear_level)
        ),
        (metric, _) => format!("{metric} is no longer reported; {severity} alert cleared"),
    }
}

/// The message of an OOM alert's FIRING event.
pub(super) fn oom_firing_message(new_kills: u64, total: u64, sample: &Sample) -> String {
    let plural = if new_kills == 1 { "" } else { "s" };
    let limit = match sample.cgroup.as_ref().map(|group| group.max_bytes) {
        Some(max) if max > 0 => format!("at the {} limit", bytes(max)),
        _ => "because memory ran out".to_owned(),
    };
    format!(
        "{new_kills} new OOM kill{plural} in {} ({total} in total): the kernel killed a \
         process {limit}",
        group_name(sample)
    )
}

/// The message of an OOM alert's RESOLVED event.
pub(super) fn oom_resolved_message(kills: u64, dwell: Duration, sample: &Sample) -> String {
    format!(
        "no new OOM kill in {} for {} ({kills} during the alert)",
        group_name(sample),
        humantime::format_duration(dwell)
    )
}

/// The cleanup recommendations of a FIRING event: first what the memory consists of, then
/// the knobs in the order to try them.
pub(super) fn recommendations(metric: Metric, severity: Severity, sample: &Sample) -> Vec<String> {
    let mix = Mix::of(sample);
    let limit = sample
        .cgroup
        .as_ref()
        .map(|group| group.max_bytes)
        .filter(|max| *max > 0);
    let mut advice = Vec::new();
    if metric == Metric::OomKills {
        advice.push(
            "the kernel's OOM killer ended a process in this group: make sure the worker was \
             restarted (its supervisor or Kubernetes restarts it) and find the request it was \
             serving in the insight-service logs"
                .to_owned(),
        );
    }
    if metric == Metric::PressureSomeAvg10 {
        advice.push(
            "tasks are stalling while the kernel reclaims memory: the group runs close to \
             its limit even where the usage ratio looks moderate"
                .to_owned(),
        );
    }
    advice.push(mix.explain());
    let heap_is_the_problem = matches!(
        mix,
        Mix::AnonHeavy { .. } | Mix::Mixed { .. } | Mix::Unknown
    );
    if heap_is_the_problem || metric != Metric::UsageRatio {
        advice.push(
            "reduce concurrency: lower insight-service --max-concurrency so fewer summaries \
             hold their prompts and partial results in memory at once"
                .to_owned(),
        );
    }
    if heap_is_the_problem {
        advice.push(
            "use smaller chunks: lower chunk_size in SummaryOptions (default 5) and the map \
             parallelism, so each LLM call and its response hold fewer entries"
                .to_owned(),
        );
    }
    if matches!(mix, Mix::AnonHeavy { .. }) && severity == Severity::Critical {
        advice.push(
            "restart (recycle) the worker once it is idle: after a spike the allocator keeps \
             the freed heap fragmented, and only a fresh process returns it to the system"
                .to_owned(),
        );
    }
    if matches!(mix, Mix::FileHeavy { .. }) && metric != Metric::OomKills {
        advice.push(
            "active page cache counts in the working set: stream large inputs instead of \
             reading them whole, or give the group room for the files it keeps hot"
                .to_owned(),
        );
    }
    match limit {
        Some(max) if severity == Severity::Critical => advice.push(format!(
            "raise the memory limit if this load is expected: it is {} now; e.g. {} (+25%) \
             in the container's resources.limits.memory",
            bytes(max),
            bytes(max.saturating_add(max / 4))
        )),
        Some(_) => {}
        None => advice.push(
            "set a container memory limit: without one these figures are the whole machine's \
             and the OOM killer may pick any process on it"
                .to_owned(),
        ),
    }
    advice
}

/// What the group's charged memory consists of.
#[derive(Clone, Copy, Debug)]
enum Mix {
    /// Anonymous memory (heap, stacks) is at least half of it.
    AnonHeavy { anon: u64, current: u64 },
    /// Page cache is at least half of it.
    FileHeavy {
        file: u64,
        inactive: u64,
        working_set: u64,
        current: u64,
    },
    /// Neither dominates.
    Mixed { anon: u64, file: u64, current: u64 },
    /// No cgroup figures.
    Unknown,
}

impl Mix {
    fn of(sample: &Sample) -> Self {
        let Some(&CgroupMem {
            current_bytes: current,
            anon_bytes: anon,
            file_bytes: file,
            inactive_file_bytes: inactive,
            working_set_bytes: working_set,
            ..
        }) = sample.cgroup.as_ref()
        else {
            return Self::Unknown;
        };
        if current == 0 {
            Self::Unknown
        } else if anon.saturating_mul(2) >= current {
            Self::AnonHeavy { anon, current }
        } else if file.saturating_mul(2) >= current {
            Self::FileHeavy {
                file,
                inactive,
                working_set,
                current,
            }
        } else {
            Self::Mixed {
                anon,
                file,
                current,
            }
        }
    }

    fn explain(self) -> String {
        match self {
            Self::AnonHeavy { anon, current } => format!(
                "anonymous memory is {} ({} of the {} charged): the process heap is the \
                 problem, not the page cache",
                bytes(anon),
                percent(anon as f64 / current as f64),
                bytes(current)
            ),
            Self::FileHeavy {
                file,
                inactive,
                working_set,
                current,
            } => format!(
                "page cache is {} ({} of the {} charged, {} of it inactive): page cache is \
                 reclaimable and the kernel drops it before it kills; the working set \
                 (charged minus inactive_file, {}) is what the OOM killer and the kubelet \
                 track, so judge the pressure by it",
                bytes(file),
                percent(file as f64 / current as f64),
                bytes(current),
                bytes(inactive),
                bytes(working_set)
            ),
            Self::Mixed {
                anon,
                file,
                current,
            } => format!(
                "anonymous memory is {} and page cache {} of the {} charged: compare anon and \
                 file in memory.stat over time to see which one grows",
                bytes(anon),
                bytes(file),
                bytes(current)
            ),
            Self::Unknown => "no cgroup memory figures: inside the container, `monitor-service \
                 check` shows whether anonymous memory or page cache dominates"
                .to_owned(),
        }
    }
}

/// "memory working set" against a cgroup limit, "machine memory in use" otherwise, as
/// `usage_ratio` is computed.
fn usage_subject(sample: &Sample) -> &'static str {
    match &sample.cgroup {
        Some(group) if group.max_bytes > 0 => "memory working set",
        _ => "machine memory in use",
    }
}

/// What the usage ratio is a fraction of.
fn usage_limit(sample: &Sample) -> String {
    match &sample.cgroup {
        Some(group) if group.max_bytes > 0 => {
            format!("the {} cgroup limit", bytes(group.max_bytes))
        }
        _ => format!("the machine's {}", bytes(sample.system.total_bytes)),
    }
}

fn group_name(sample: &Sample) -> String {
    match &sample.cgroup {
        Some(group) => format!("cgroup {}", group.path),
        None => "the machine".to_owned(),
    }
}

/// A ratio as a percentage: whole when it is close to one ("93%"), else one decimal ("85.5%").
fn percent(ratio: f64) -> String {
    psi_percent(ratio * 100.0)
}

/// A percentage as [`percent`] prints it.
fn psi_percent(value: f64) -> String {
    if (value - value.round()).abs() < 0.05 {
        format!("{value:.0}%")
    } else {
        format!("{value:.1}%")
    }
}

/// Bytes in the largest binary unit that keeps the number readable: "256 MiB", "1.5 GiB".
fn bytes(bytes: u64) -> String {
    let value = bytes as f64;
    let (scaled, unit) = if value >= GIB {
        (value / GIB, "GiB")
    } else if value >= MIB {
        (value / MIB, "MiB")
    } else if value >= KIB {
        (value / KIB, "KiB")
    } else {
        return format!("{bytes} B");
    };
    if (scaled - scaled.round()).abs() < 0.05 {
        format!("{scaled:.0} {unit}")
    } else {
        format!("{scaled:.1} {unit}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::probe::{CgroupVersion, Level, ProcessMem, SystemMem};

    const MI: u64 = 1024 * 1024;

    fn sample(anon: u64, file: u64, inactive: u64, max: u64) -> Sample {
        let current = anon + file;
        let working_set = current - inactive;
        let usage_ratio = if max > 0 {
            working_set as f64 / max as f64
        } else {
            0.5
        };
        Sample {
            seq: 1,
            at: SystemTime::UNIX_EPOCH,
            process: ProcessMem {
                pid: 1,
                rss_bytes: anon,
                virtual_bytes: anon,
            },
            targets: Vec::new(),
            cgroup: Some(CgroupMem {
                version: CgroupVersion::V2,
                path: "/app".into(),
                current_bytes: current,
                max_bytes: max,
                working_set_bytes: working_set,
                anon_bytes: anon,
                file_bytes: file,
                inactive_file_bytes: inactive,
                oom_kills: 0,
                pressure_some_avg10: None,
                pressure_full_avg10: None,
            }),
            system: SystemMem {
                total_bytes: 16 * 1024 * MI,
                available_bytes: 8 * 1024 * MI,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            usage_ratio,
            level: Level::Critical,
        }
    }

    fn mentions(advice: &[String], words: &str) -> bool {
        advice.iter().any(|line| line.contains(words))
    }

    #[test]
    fn anon_heavy_points_at_the_heap_and_the_concurrency_knobs() {
        let advice = recommendations(
            Metric::UsageRatio,
            Severity::Critical,
            &sample(216 * MI, 24 * MI, 5 * MI, 256 * MI),
        );
        assert_eq!(
            advice[0],
            "anonymous memory is 216 MiB (90% of the 240 MiB charged): the process heap is \
             the problem, not the page cache"
        );
        assert!(mentions(&advice, "the process heap is the problem"));
        assert!(mentions(&advice, "--max-concurrency"));
        assert!(mentions(&advice, "chunk_size"));
        assert!(mentions(&advice, "restart (recycle) the worker"));
        assert!(mentions(&advice, "it is 256 MiB now; e.g. 320 MiB (+25%)"));
        assert!(!mentions(&advice, "reclaimable"));
    }

    #[test]
    fn file_cache_heavy_says_the_cache_is_reclaimable_and_the_working_set_counts() {
        let advice = recommendations(
            Metric::UsageRatio,
            Severity::Critical,
            &sample(50 * MI, 200 * MI, 10 * MI, 256 * MI),
        );
        assert!(
            advice[0].starts_with(
                "page cache is 200 MiB (80% of the 250 MiB charged, 10 MiB of it inactive)"
            ),
            "{advice:?}"
        );
        assert!(mentions(&advice, "page cache is reclaimable"));
        assert!(mentions(
            &advice,
            "working set (charged minus inactive_file, 240 MiB)"
        ));
        assert!(mentions(&advice, "OOM killer"));
        assert!(!mentions(&advice, "restart (recycle)"));
        assert!(!mentions(&advice, "heap is the problem"));
        assert!(mentions(&advice, "raise the memory limit"));
    }

    #[test]
    fn warning_does_not_ask_to_raise_the_limit_or_restart() {
        let advice = recommendations(
            Metric::UsageRatio,
            Severity::Warning,
            &sample(200 * MI, 10 * MI, 0, 256 * MI),
        );
        assert!(!mentions(&advice, "raise the memory limit"));
        assert!(!mentions(&advice, "restart"));
        assert!(mentions(&advice, "--max-concurrency"));
    }

    #[test]
    fn no_limit_asks_for_one() {
        let mut bare = sample(100 * MI, 10 * MI, 0, 0);
        let advice = recommendations(Metric::UsageRatio, Severity::Critical, &bare);
        assert!(mentions(&advice, "set a container memory limit"));
        bare.cgroup = None;
        let advice = recommendations(Metric::UsageRatio, Severity::Warning, &bare);
        assert!(mentions(&advice, "no cgroup memory figures"));
        assert_eq!(
            firing_message(Metric::UsageRatio, Severity::Warning, 0.815, 0.8, &bare),
            "machine memory in use at 81.5% of the machine's 16 GiB (warning ≥ 80%)"
        );
    }

    #[test]
    fn pressure_and_oom_advice() {
        let advice = recommendations(
            Metric::PressureSomeAvg10,
            Severity::Warning,
            &sample(40 * MI, 200 * MI, 10 * MI, 256 * MI),
        );
        assert!(mentions(&advice, "stalling while the kernel reclaims"));
        assert!(mentions(&advice, "--max-concurrency"));
        let advice = recommendations(
            Metric::OomKills,
            Severity::Critical,
            &sample(250 * MI, 5 * MI, 0, 256 * MI),
        );
        assert!(advice[0].contains("OOM killer ended a process"));
        assert!(mentions(&advice, "raise the memory limit"));
    }

    #[test]
    fn formats_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(256 * MI), "256 MiB");
        assert_eq!(bytes(1536 * MI), "1.5 GiB");
        assert_eq!(bytes(u64::MAX), "17179869184 GiB");
        assert_eq!(percent(0.93), "93%");
        assert_eq!(percent(0.855), "85.5%");
        assert_eq!(psi_percent(f64::NAN), "NaN%");
    }
}
