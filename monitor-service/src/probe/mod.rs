//! The memory probe: one reading of the monitored processes, this process's cgroup and the
//! machine, with the usage ratio and level computed from them.
//!
//! It knows nothing of gRPC, so the server, the `check` command and insight-service's load
//! shedding share it. Reading never fails: a file that is missing or unreadable is reported as
//! "not available" (0 or `None`) and logged once, and the next sample tries again.
//!
//! A sample re-reads what a memory spike moves first (each process's statm, the cgroup's usage)
//! every time, the slow-moving figures (cgroup limit, memory.stat breakdown, OOM count, the
//! machine's meminfo) at most once per [`SLOW_REFRESH`], and PSI at most once per
//! [`PRESSURE_REFRESH`], which keeps a 10 Hz sample stream a few microseconds per sample (see
//! BENCHMARKS.md). Of memory.stat and meminfo, only one decides the usage ratio (memory.stat,
//! through the working set, when the cgroup has a limit; meminfo when it has none); the other
//! is context and is re-read once per [`CONTEXT_REFRESH`].

mod cgroup;
mod file;
mod procfs;
mod system;

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use serde::{Serialize, Serializer};

pub use cgroup::{CgroupMem, CgroupVersion, V1_UNLIMITED_FROM};
pub use procfs::{PAGE_SIZE, ProcessMem};
pub use system::SystemMem;

/// How stale the slow-moving figures of a [`Probe`] sample may be: one second.
///
/// A limit or an OOM count changes on rare events, and the machine's meminfo is context. The
/// one figure whose age matters is memory.stat's inactive_file, which turns the usage (read
/// fresh on every sample) into the working set: while it is stale, page cache the kernel
/// reclaimed since is still subtracted, so near the limit, where the kernel is reclaiming, the
/// working set reads low by what was reclaimed in the window. One second bounds that window at
/// ten samples at 10 Hz and well inside the alert dwell (10 s by default). Two seconds would
/// save ~0.3 µs per 10 Hz sample (memory.stat is ~6.5 µs of kernel formatting on cgroup v1,
/// now read once in 10 samples, then once in 20) and double that window: not worth it
/// (BENCHMARKS.md).
pub const SLOW_REFRESH: Duration = Duration::from_secs(1);

/// How stale the figures that do not decide the usage ratio may be: five seconds. With a
/// cgroup limit that is the machine's meminfo; without one, memory.stat (the working set is
/// then reported but the ratio comes from the machine). They are the two costliest files
/// (memory.stat ~2–8 µs, meminfo ~1.5–5 µs of kernel formatting, depending on the machine's
/// load), and context does not need to be as fresh as the figure an alert fires on.
pub const CONTEXT_REFRESH: Duration = Duration::from_secs(5);

/// How stale PSI's avg10 figures may be: two seconds, because the kernel recomputes them only
/// every 2 s (`PSI_FREQ`); reading more often returns the same numbers. The worst case is a new
/// value seen up to 2 s after the kernel computed it, on an average that spans 10 s.
pub const PRESSURE_REFRESH: Duration = Duration::from_secs(2);

/// What to read and where, and the thresholds of [`Level`].
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// Where procfs is mounted: `<proc_root>/<pid>/statm`, `<proc_root>/self/cgroup`,
    /// `<proc_root>/meminfo` and `<proc_root>/pressure/memory` are read under it.
    pub proc_root: PathBuf,
    /// Where the cgroup hierarchy is mounted (v2 directly, v1 with one directory per controller).
    pub cgroup_root: PathBuf,
    /// Processes to report: the first is `Sample::process`, the rest `Sample::targets`.
    /// Empty means this process itself.
    pub pids: Vec<u32>,
    /// Usage ratio at or above which the level is [`Level::Warning`].
    pub warn_ratio: f64,
    /// Usage ratio at or above which the level is [`Level::Critical`].
    pub critical_ratio: f64,
}

impl Default for ProbeConfig {
    /// The host's own mounts, this process, and thresholds that leave room to react before the
    /// kernel's OOM killer does (10 % of the limit left at critical).
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            pids: Vec::new(),
            warn_ratio: 0.80,
            critical_ratio: 0.90,
        }
    }
}

/// How close memory use is to its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below the warning threshold.
    Ok,
    /// At or above the warning threshold.
    Warning,
    /// At or above the critical threshold.
    Critical,
}

impl Level {
    /// The level of `ratio` against the thresholds; critical wins when both are crossed, so
    /// misordered thresholds still never under-report.
    pub fn of_ratio(ratio: f64, warn_ratio: f64, critical_ratio: f64) -> Self {
        if ratio >= critical_ratio {
            Self::Critical
        } else if ratio >= warn_ratio {
            Self::Warning
        } else {
            Self::Ok
        }
    }

    /// Upper-case name, as operators read it in tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
        }
    }
}

/// One memory reading.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Sequence number; [`Probe::sample`] leaves it 0 and whoever hands samples out numbers
    /// them (the server counts all samples it takes, from 1).
    pub seq: u64,
    /// When the reading started; serialized as RFC 3339 with milliseconds.
    #[serde(serialize_with = "serialize_rfc3339")]
    pub at: SystemTime,
    /// The monitored process (this process unless pids were configured).
    pub process: ProcessMem,
    /// Further monitored processes (each configured pid after the first).
    pub targets: Vec<ProcessMem>,
    /// This process's cgroup; `None` when no cgroup memory controller is found.
    pub cgroup: Option<CgroupMem>,
    /// The machine.
    pub system: SystemMem,
    /// See [`usage_ratio`].
    pub usage_ratio: f64,
    /// `usage_ratio` against the configured thresholds.
    pub level: Level,
}

/// The fraction of the binding memory limit in use, 0.0..=1.0 (can exceed 1.0 briefly).
///
/// With a cgroup limit it is working set / limit: that is what the kernel's OOM decision and
/// the kubelet's eviction track. Without one, the machine is the limit: (total − available) /
/// total. 0.0 when nothing is known (no limit and no system figures).
pub fn usage_ratio(cgroup: Option<&CgroupMem>, system: &SystemMem) -> f64 {
    match cgroup {
        Some(group) if group.max_bytes > 0 => {
            group.working_set_bytes as f64 / group.max_bytes as f64
        }
        _ if system.total_bytes > 0 => {
            system.total_bytes.saturating_sub(system.available_bytes) as f64
                / system.total_bytes as f64
        }
        _ => 0.0,
    }
}

/// Reads memory figures; create it once and call [`Probe::sample`] repeatedly, because it keeps
/// its files open between samples.
#[derive(Debug)]
pub struct Probe {
    warn_ratio: f64,
    critical_ratio: f64,
    process: procfs::StatmReader,
    targets: Vec<procfs::StatmReader>,
    cgroup: cgroup::CgroupReader,
    system: system::SystemReader,
}

impl Probe {
    /// A probe for `config`. Nothing is read yet, so this cannot fail; paths that do not exist
    /// simply read as "not available".
    pub fn new(config: ProbeConfig) -> Self {
        let ProbeConfig {
            proc_root,
            cgroup_root,
            pids,
            warn_ratio,
            critical_ratio,
        } = config;
        // Our own pid, not `<proc_root>/self`, so the reading is the same whether procfs is
        // reached as /proc or as a fixture tree, and `self` needs no re-resolution per read.
        let (first, rest) = pids
            .split_first()
            .map_or((std::process::id(), &[][..]), |(first, rest)| {
                (*first, rest)
            });
        Self {
            warn_ratio,
            critical_ratio,
            process: procfs::StatmReader::new(&proc_root, first),
            targets: rest
                .iter()
                .map(|pid| procfs::StatmReader::new(&proc_root, *pid))
                .collect(),
            system: system::SystemReader::new(&proc_root)
                .with_refresh(SLOW_REFRESH)
                .with_context_refresh(CONTEXT_REFRESH),
            cgroup: cgroup::CgroupReader::new(proc_root, cgroup_root)
                .with_slow_refresh(SLOW_REFRESH)
                .with_context_refresh(CONTEXT_REFRESH)
                .with_pressure_refresh(PRESSURE_REFRESH),
        }
    }

    /// Re-reads the slow-moving figures, PSI and context included, at most once per `period`
    /// instead of [`SLOW_REFRESH`], [`PRESSURE_REFRESH`] and [`CONTEXT_REFRESH`]; zero re-reads
    /// every file on every sample (a benchmark's worst case, or a caller that samples rarely and
    /// wants every figure current).
    pub fn with_slow_refresh(mut self, period: Duration) -> Self {
        self.cgroup = self
            .cgroup
            .with_slow_refresh(period)
            .with_context_refresh(period)
            .with_pressure_refresh(period);
        self.system = self
            .system
            .with_refresh(period)
            .with_context_refresh(period);
        self
    }

    /// Takes one reading. Never fails; `seq` is 0 (see [`Sample::seq`]).
    pub fn sample(&mut self) -> Sample {
        self.sample_at(Instant::now())
    }

    /// Takes one reading as if the monotonic clock read `now`, which only decides which cached
    /// slow figures are due; `at` is still the wall-clock time of the reading. For callers that
    /// drive time themselves: the benchmark replays a 10 Hz cadence back to back with it, to
    /// time the exact mix of fresh and cached reads the server does.
    pub fn sample_at(&mut self, now: Instant) -> Sample {
        let at = SystemTime::now();
        let process = self.process.read();
        let targets = self.targets.iter_mut().map(|t| t.read()).collect();
        let cgroup = self.cgroup.read(now);
        // meminfo decides the ratio unless a cgroup limit does (see `usage_ratio`).
        let system_decides = cgroup.as_ref().is_none_or(|group| group.max_bytes == 0);
        let system = self.system.read(now, system_decides);
        let usage_ratio = usage_ratio(cgroup.as_ref(), &system);
        Sample {
            seq: 0,
            at,
            process,
            targets,
            cgroup,
            system,
            usage_ratio,
            level: Level::of_ratio(usage_ratio, self.warn_ratio, self.critical_ratio),
        }
    }
}

/// Formats `at` as RFC 3339 with milliseconds; `None` outside 1970..=9999, which humantime
/// cannot format (it would panic before the epoch).
pub fn format_rfc3339(at: SystemTime) -> Option<String> {
    const YEAR_10000: u64 = 253_402_300_800;
    let since_epoch = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (since_epoch.as_secs() < YEAR_10000).then(|| humantime::format_rfc3339_millis(at).to_string())
}

fn serialize_rfc3339<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    match format_rfc3339(*at) {
        Some(text) => serializer.serialize_str(&text),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{fs, path::Path, time::Duration};

    use super::*;

    fn write(root: &Path, relative: &str, text: &str) {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn group(working_set: u64, max: u64) -> CgroupMem {
        CgroupMem {
            version: CgroupVersion::V2,
            path: "/".into(),
            current_bytes: working_set,
            max_bytes: max,
            working_set_bytes: working_set,
            anon_bytes: 0,
            file_bytes: 0,
            inactive_file_bytes: 0,
            oom_kills: 0,
            pressure_some_avg10: None,
            pressure_full_avg10: None,
        }
    }

    const SYSTEM: SystemMem = SystemMem {
        total_bytes: 1000,
        available_bytes: 250,
        swap_total_bytes: 0,
        swap_used_bytes: 0,
    };

    #[test]
    fn ratio_uses_the_cgroup_limit_when_there_is_one() {
        assert_eq!(usage_ratio(Some(&group(450, 500)), &SYSTEM), 0.9);
    }

    #[test]
    fn ratio_falls_back_to_the_machine() {
        assert_eq!(usage_ratio(Some(&group(450, 0)), &SYSTEM), 0.75);
        assert_eq!(usage_ratio(None, &SYSTEM), 0.75);
        assert_eq!(usage_ratio(None, &SystemMem::default()), 0.0);
    }

    #[test]
    fn levels_at_the_thresholds() {
        assert_eq!(Level::of_ratio(0.79, 0.8, 0.9), Level::Ok);
        assert_eq!(Level::of_ratio(0.8, 0.8, 0.9), Level::Warning);
        assert_eq!(Level::of_ratio(0.9, 0.8, 0.9), Level::Critical);
        assert_eq!(Level::of_ratio(1.5, 0.8, 0.9), Level::Critical);
    }

    #[test]
    fn samples_a_fixture_tree_with_targets() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let cgroup_root = dir.path().join("cgroup");
        write(&proc_root, "10/statm", "300 100 0 0 0 0 0\n");
        write(&proc_root, "11/statm", "30 10 0 0 0 0 0\n");
        write(&proc_root, "self/cgroup", "0::/app\n");
        write(&cgroup_root, "cgroup.controllers", "memory\n");
        write(&cgroup_root, "app/memory.current", "950\n");
        write(&cgroup_root, "app/memory.max", "1000\n");
        write(&cgroup_root, "app/memory.stat", "inactive_file 100\n");

        let mut probe = Probe::new(ProbeConfig {
            proc_root,
            cgroup_root,
            pids: vec![10, 11, 12],
            ..ProbeConfig::default()
        });
        let sample = probe.sample();
        assert_eq!(sample.seq, 0);
        assert_eq!(sample.process.rss_bytes, 100 * PAGE_SIZE);
        assert_eq!(
            sample.targets,
            vec![
                ProcessMem {
                    pid: 11,
                    rss_bytes: 10 * PAGE_SIZE,
                    virtual_bytes: 30 * PAGE_SIZE,
                },
                ProcessMem {
                    pid: 12,
                    rss_bytes: 0,
                    virtual_bytes: 0,
                },
            ]
        );
        assert_eq!(sample.cgroup.as_ref().unwrap().working_set_bytes, 850);
        assert_eq!(sample.usage_ratio, 0.85);
        assert_eq!(sample.level, Level::Warning);
    }

    #[test]
    fn samples_with_nothing_to_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = Probe::new(ProbeConfig {
            proc_root: dir.path().join("no-proc"),
            cgroup_root: dir.path().join("no-cgroup"),
            ..ProbeConfig::default()
        });
        let sample = probe.sample();
        assert_eq!(
            sample.process,
            ProcessMem {
                pid: std::process::id(),
                rss_bytes: 0,
                virtual_bytes: 0,
            }
        );
        assert_eq!(sample.cgroup, None);
        // With no <proc_root>/meminfo the machine's figures come from sysinfo, which reads the
        // real /proc/meminfo.
        assert!(sample.system.total_bytes > 0);
    }

    #[test]
    fn samples_the_real_machine() {
        let mut probe = Probe::new(ProbeConfig::default());
        let sample = probe.sample();
        assert_eq!(sample.process.pid, std::process::id());
        assert!(sample.process.rss_bytes > 0);
        assert!(sample.system.total_bytes > 0);
        assert!(sample.usage_ratio >= 0.0);
        let again = probe.sample();
        assert!(again.process.rss_bytes > 0);
        assert!(again.at >= sample.at);
    }

    #[test]
    fn serializes_for_check_json() {
        let sample = Sample {
            seq: 3,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            process: ProcessMem {
                pid: 1,
                rss_bytes: 2,
                virtual_bytes: 3,
            },
            targets: vec![],
            cgroup: Some(group(5, 0)),
            system: SYSTEM,
            usage_ratio: 0.75,
            level: Level::Warning,
        };
        let json = serde_json::to_value(&sample).unwrap();
        assert_eq!(json["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["process"]["rss_bytes"], 2);
        assert_eq!(json["cgroup"]["version"], "v2");
        assert_eq!(
            json["cgroup"]["pressure_some_avg10"],
            serde_json::Value::Null
        );
        assert_eq!(json["system"]["total_bytes"], 1000);
        assert_eq!(json["level"], "warning");
    }

    #[test]
    fn times_humantime_cannot_format_do_not_panic() {
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_rfc3339(before_epoch), None);
        let far_future = SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(format_rfc3339(far_future), None);
    }
}
