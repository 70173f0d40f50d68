//! Memory of the cgroup this process runs in (the container, under Kubernetes): cgroup v2's
//! unified hierarchy, or cgroup v1's memory controller on older and hybrid hosts.
//!
//! Everything is read under two base directories (`proc_root`, `cgroup_root`) so tests run on
//! fixture trees, and a file that is absent is "not available", never an error.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::file::RereadFile;

/// cgroup v1 has no "unlimited" word: it reports the largest page-aligned `i64`
/// (9223372036854771712). Anything this large is no real limit; a smaller value is reported
/// as is, even when it exceeds the machine's RAM, because that is still the configured limit.
pub const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// Which cgroup hierarchy the numbers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// The v1 memory controller (`memory.usage_in_bytes`, ...).
    V1,
    /// The v2 unified hierarchy (`memory.current`, ...), as on current Kubernetes nodes.
    V2,
}

impl CgroupVersion {
    /// "v1" or "v2", as in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Memory of one cgroup. Byte counts of files that are missing read as 0.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CgroupMem {
    /// Which hierarchy was read.
    pub version: CgroupVersion,
    /// The group's path inside the hierarchy ("/" when only the hierarchy root is visible).
    /// Shared: every sample carries it, so a sample clones a pointer rather than the string.
    pub path: Arc<str>,
    /// Bytes charged to the group (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    pub current_bytes: u64,
    /// Hard limit in bytes; 0 = unlimited (or the limit file is missing).
    pub max_bytes: u64,
    /// `current - inactive_file`: the kubelet's working set, which its eviction and the OOM
    /// decision track, so page cache that can be dropped does not count as pressure.
    pub working_set_bytes: u64,
    /// Anonymous memory (heap, stacks) in bytes.
    pub anon_bytes: u64,
    /// Page cache in bytes.
    pub file_bytes: u64,
    /// Inactive page cache in bytes (reclaimed first).
    pub inactive_file_bytes: u64,
    /// OOM kills in the group so far.
    pub oom_kills: u64,
    /// PSI "some" avg10 (percent of time some task stalled on memory); `None` when the kernel
    /// does not expose pressure. v1 has no per-group PSI, so it is the system-wide value there.
    pub pressure_some_avg10: Option<f64>,
    /// PSI "full" avg10 (percent of time all tasks stalled on memory); `None` when unavailable.
    pub pressure_full_avg10: Option<f64>,
}

/// Where the group's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) version: CgroupVersion,
    /// Path inside the hierarchy, as reported in `CgroupMem::path`.
    pub(crate) path: Arc<str>,
    /// Directory holding the group's `memory.*` files.
    pub(crate) dir: PathBuf,
}

/// Finds the memory cgroup of this process.
///
/// The hierarchy is chosen by what is mounted at `cgroup_root`: a `cgroup.controllers` file there
/// means a pure v2 mount; otherwise a `memory` directory means v1 (hybrid hosts also list a
/// `0::/` line, but their v2 mount has no memory controller, so v1 is the one to read). The group
/// comes from `<proc_root>/self/cgroup`; when its directory is not visible (inside a cgroup
/// namespace the path may be "/" or point outside the mount) or that file is absent, the
/// hierarchy root stands in, which inside a container is the container's own group.
pub(crate) fn locate(proc_root: &Path, cgroup_root: &Path) -> io::Result<Option<Location>> {
    let membership = match fs::read_to_string(proc_root.join("self").join("cgroup")) {
        Ok(text) => parse_membership(&text),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Membership::default(),
        Err(error) => return Err(error),
    };
    let (version, base, path) = if cgroup_root.join("cgroup.controllers").is_file() {
        (CgroupVersion::V2, cgroup_root.to_path_buf(), membership.v2)
    } else if cgroup_root.join("memory").is_dir() {
        (
            CgroupVersion::V1,
            cgroup_root.join("memory"),
            membership.v1_memory,
        )
    } else {
        return Ok(None);
    };
    let location = path
        .and_then(|path| group_dir(&base, &path).map(|dir| (path, dir)))
        .filter(|(_, dir)| dir.is_dir());
    Ok(Some(match location {
        Some((path, dir)) => Location {
            version,
            path: path.into(),
            dir,
        },
        None => Location {
            version,
            path: "/".into(),
            dir: base,
        },
    }))
}

/// The group paths listed in `/proc/self/cgroup`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Membership {
    /// Path of the v1 line whose controllers include `memory`.
    v1_memory: Option<String>,
    /// Path of the v2 line (`0::/path`).
    v2: Option<String>,
}

/// Parses `hierarchy-id:controllers:path` lines; lines of any other shape are skipped.
fn parse_membership(text: &str) -> Membership {
    let mut membership = Membership::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            membership.v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            membership.v1_memory = Some(path.to_owned());
        }
    }
    membership
}

/// `base` joined with the absolute group `path`; `None` when the path would leave `base`
/// (a `..` component, as the kernel shows for groups outside our cgroup namespace).
fn group_dir(base: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.strip_prefix('/')?);
    relative
        .components()
        .all(|component| matches!(component, Component::Normal(_)))
        .then(|| base.join(relative))
}

/// Reads the memory cgroup, locating it on first use (and again while none is found, so a
/// hierarchy that appears later is picked up).
#[derive(Debug)]
pub(crate) struct CgroupReader {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    group: Option<GroupFiles>,
    locate_failing: bool,
    refresh: Refresh,
}

/// How often the files that are not read on every sample are re-read; zero re-reads them on
/// every read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Refresh {
    /// The limit and the OOM count ([`SlowFigures`]), and memory.stat while a limit is set.
    slow: Duration,
    /// memory.stat while no limit is set: the working set it yields is then only context, as
    /// the usage ratio comes from the machine's memory.
    context: Duration,
    /// PSI (`memory.pressure`, or the system-wide `/proc/pressure/memory` on v1).
    pressure: Duration,
}

impl CgroupReader {
    /// A reader for the hierarchy mounted at `cgroup_root`, membership read under `proc_root`.
    pub(crate) fn new(proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            group: None,
            locate_failing: false,
            refresh: Refresh::default(),
        }
    }

    /// Re-reads the slow-moving files (see [`SlowFigures`]) at most once per `period`; zero,
    /// the default, re-reads every file on every read.
    pub(crate) fn with_slow_refresh(mut self, period: Duration) -> Self {
        self.refresh.slow = period;
        self.apply_refresh()
    }

    /// Re-reads memory.stat at most once per `period` while the group has no limit (see
    /// [`Refresh::context`]); zero, the default, on every read.
    pub(crate) fn with_context_refresh(mut self, period: Duration) -> Self {
        self.refresh.context = period;
        self.apply_refresh()
    }

    /// Re-reads the PSI file at most once per `period`; zero, the default, on every read.
    pub(crate) fn with_pressure_refresh(mut self, period: Duration) -> Self {
        self.refresh.pressure = period;
        self.apply_refresh()
    }

    fn apply_refresh(mut self) -> Self {
        if let Some(group) = &mut self.group {
            group.refresh = self.refresh;
        }
        self
    }

    /// The group's memory at `now` (which decides whether the slow files are due); `None`
    /// when no memory controller is found.
    pub(crate) fn read(&mut self, now: Instant) -> Option<CgroupMem> {
        if self.group.is_none() {
            let refresh = self.refresh;
            self.group = self
                .locate_logged()
                .map(|location| GroupFiles::new(location, &self.proc_root))
                .map(|mut files| {
                    files.refresh = refresh;
                    files
                });
        }
        self.group.as_mut()?.read(now)
    }

    fn locate_logged(&mut self) -> Option<Location> {
        match locate(&self.proc_root, &self.cgroup_root) {
            Ok(location) => {
                self.locate_failing = false;
                if let Some(location) = &location {
                    tracing::debug!(
                        version = ?location.version,
                        path = %location.path,
                        dir = %location.dir.display(),
                        "memory cgroup located"
                    );
                }
                location
            }
            Err(error) => {
                if !self.locate_failing {
                    self.locate_failing = true;
                    tracing::warn!(
                        %error,
                        proc_root = %self.proc_root.display(),
                        "cannot read this process's cgroup membership; no cgroup memory"
                    );
                }
                None
            }
        }
    }
}

/// The kept-open files of one located group.
#[derive(Debug)]
struct GroupFiles {
    location: Location,
    usage: RereadFile,
    limit: RereadFile,
    stat: RereadFile,
    /// v1 `memory.oom_control`, v2 `memory.events`: both carry an `oom_kill` key.
    oom: RereadFile,
    pressure: RereadFile,
    refresh: Refresh,
    /// The slow-moving figures and when they were read.
    slow: Option<(Instant, SlowFigures)>,
    /// memory.stat's figures and when they were read: on the slow period while a limit is set
    /// (they make the working set, which then decides the usage ratio), else on the context one.
    stat_figures: Option<(Instant, MemoryStat)>,
    /// PSI's avg10 figures and when they were read.
    psi: Option<(Instant, Pressure)>,
}

/// The figures that move slowly: the limit (changed by an operator), the OOM count (an event
/// after the fact), and the stat breakdown (page cache ages over seconds; kept apart in
/// [`GroupFiles::stat_figures`] because its period depends on the limit). Re-reading them on every
/// 100 ms sample would cost several times what the usage read does (memory.stat alone is ~9 µs
/// of kernel formatting on cgroup v1) for little newer information, so they are re-read at most
/// once per `Refresh::slow`. Usage, which a spike moves first, is read on every sample.
///
/// PSI is kept apart ([`GroupFiles::psi`]) because the kernel itself recomputes avg10 only
/// every 2 s, so it has its own, longer period.
#[derive(Debug, Default)]
struct SlowFigures {
    max_bytes: u64,
    oom_kills: u64,
}

impl GroupFiles {
    fn new(location: Location, proc_root: &Path) -> Self {
        let dir = &location.dir;
        let (usage, limit, oom, pressure) = match location.version {
            CgroupVersion::V1 => (
                dir.join("memory.usage_in_bytes"),
                dir.join("memory.limit_in_bytes"),
                dir.join("memory.oom_control"),
                // v1 groups have no PSI file; the system-wide one is the closest signal.
                proc_root.join("pressure").join("memory"),
            ),
            CgroupVersion::V2 => (
                dir.join("memory.current"),
                dir.join("memory.max"),
                dir.join("memory.events"),
                dir.join("memory.pressure"),
            ),
        };
        Self {
            usage: RereadFile::new(usage),
            limit: RereadFile::new(limit),
            stat: RereadFile::new(dir.join("memory.stat")),
            oom: RereadFile::new(oom),
            pressure: RereadFile::new(pressure),
            location,
            refresh: Refresh::default(),
            slow: None,
            stat_figures: None,
            psi: None,
        }
    }

    /// `None` when the usage file is missing: then this group has no memory controller.
    fn read(&mut self, now: Instant) -> Option<CgroupMem> {
        let version = self.location.version;
        let current_bytes = self.usage.read_or_log(parse_u64)?;
        if is_due(self.slow.as_ref(), now, self.refresh.slow) {
            self.slow = Some((now, self.read_slow()));
        }
        let limited = self
            .slow
            .as_ref()
            .is_some_and(|(_, slow)| slow.max_bytes > 0);
        let stat_period = if limited {
            self.refresh.slow
        } else {
            self.refresh.context
        };
        if is_due(self.stat_figures.as_ref(), now, stat_period) {
            let stat = self
                .stat
                .read_or_log(|text| Ok(MemoryStat::parse(version, text)))
                .unwrap_or_default();
            self.stat_figures = Some((now, stat));
        }
        if is_due(self.psi.as_ref(), now, self.refresh.pressure) {
            let pressure = self
                .pressure
                .read_or_log(|text| Ok(Pressure::parse(text)))
                .unwrap_or_default();
            self.psi = Some((now, pressure));
        }
        let SlowFigures {
            max_bytes,
            oom_kills,
        } = self.slow.as_ref().map(|(_, slow)| slow)?;
        let stat = self.stat_figures.as_ref().map(|(_, stat)| stat)?;
        let pressure = self.psi.as_ref().map(|(_, psi)| psi)?;
        Some(CgroupMem {
            version,
            path: self.location.path.clone(),
            current_bytes,
            max_bytes: *max_bytes,
            working_set_bytes: current_bytes.saturating_sub(stat.inactive_file),
            anon_bytes: stat.anon,
            file_bytes: stat.file,
            inactive_file_bytes: stat.inactive_file,
            oom_kills: *oom_kills,
            pressure_some_avg10: pressure.some_avg10,
            pressure_full_avg10: pressure.full_avg10,
        })
    }

    /// Reads the files behind [`SlowFigures`]; each missing or broken one reads as 0 / `None`.
    fn read_slow(&mut self) -> SlowFigures {
        let version = self.location.version;
        let max_bytes = self
            .limit
            .read_or_log(|text| match version {
                CgroupVersion::V1 => parse_v1_limit(text),
                CgroupVersion::V2 => parse_v2_limit(text),
            })
            .unwrap_or(0);
        let oom_kills = self
            .oom
            .read_or_log(|text| Ok(flat_keyed(text, "oom_kill")))
            .flatten()
            .unwrap_or(0);
        SlowFigures {
            max_bytes,
            oom_kills,
        }
    }

    #[cfg(test)]
    fn paths(&self) -> [&Path; 5] {
        [
            self.usage.path(),
            self.limit.path(),
            self.stat.path(),
            self.oom.path(),
            self.pressure.path(),
        ]
    }
}

/// Whether figures read at `last` are due again at `now`: never read, or `period` has passed.
/// A `now` before `last` (a caller-driven clock) counts as no time passed.
fn is_due<T>(last: Option<&(Instant, T)>, now: Instant, period: Duration) -> bool {
    last.is_none_or(|(at, _)| now.saturating_duration_since(*at) >= period)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A file holding one decimal number.
fn parse_u64(text: &str) -> io::Result<u64> {
    let text = text.trim();
    text.parse()
        .map_err(|error| invalid(format!("expected a byte count, got {text:?}: {error}")))
}

/// v2 `memory.max`: a byte count, or "max" for unlimited (→ 0).
fn parse_v2_limit(text: &str) -> io::Result<u64> {
    if text.trim() == "max" {
        Ok(0)
    } else {
        parse_u64(text)
    }
}

/// v1 `memory.limit_in_bytes`: a byte count, with [`V1_UNLIMITED_FROM`] and above unlimited (→ 0).
fn parse_v1_limit(text: &str) -> io::Result<u64> {
    let limit = parse_u64(text)?;
    Ok(if limit >= V1_UNLIMITED_FROM { 0 } else { limit })
}

/// The `key value` lines of a flat-keyed file (memory.stat, memory.events, oom_control), as
/// byte slices: the scan looks at each key once and parses only the values asked for, because
/// v1's memory.stat has ~40 keys and we want three of them.
fn keyed_lines(text: &str) -> impl Iterator<Item = (&[u8], &[u8])> {
    text.as_bytes()
        .split(|&byte| byte == b'\n')
        .filter_map(|line| {
            let space = line.iter().position(|&byte| byte == b' ')?;
            Some((line.get(..space)?, line.get(space + 1..)?))
        })
}

/// A decimal `u64` (surrounding ASCII whitespace allowed); `None` if malformed or too large.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0_u64, |total, &byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        total.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The value of `key` in a flat-keyed file (`key value` lines); `None` if absent or malformed.
fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    keyed_lines(text)
        .find(|(name, _)| *name == key.as_bytes())
        .and_then(|(_, value)| parse_decimal(value))
}

/// The `memory.stat` keys we report; absent keys read as 0.
#[derive(Debug, Default, PartialEq, Eq)]
struct MemoryStat {
    anon: u64,
    file: u64,
    inactive_file: u64,
}

impl MemoryStat {
    /// One pass over the file, whatever the version.
    fn parse(version: CgroupVersion, text: &str) -> Self {
        // [anon, file, inactive_file]: v2's keys, or v1's group-only and hierarchical ones.
        let mut own = [None; 3];
        let mut total = [None; 3];
        for (key, value) in keyed_lines(text) {
            let slot = match (version, key) {
                (CgroupVersion::V2, b"anon") => &mut own[0],
                (CgroupVersion::V2, b"file") => &mut own[1],
                (CgroupVersion::V2, b"inactive_file") => &mut own[2],
                (CgroupVersion::V1, b"rss") => &mut own[0],
                (CgroupVersion::V1, b"cache") => &mut own[1],
                (CgroupVersion::V1, b"inactive_file") => &mut own[2],
                (CgroupVersion::V1, b"total_rss") => &mut total[0],
                (CgroupVersion::V1, b"total_cache") => &mut total[1],
                (CgroupVersion::V1, b"total_inactive_file") => &mut total[2],
                _ => continue,
            };
            *slot = parse_decimal(value);
            // v2's three keys are in the first ~20 of ~50 lines; v1's hierarchical `total_*`
            // keys come last, so v1 reads to the end.
            if version == CgroupVersion::V2 && own.iter().all(Option::is_some) {
                break;
            }
        }
        // v1's `total_*` keys include the group's descendants (like every v2 value), the plain
        // keys only the group itself; prefer the hierarchical ones when present.
        let pick = |index: usize| {
            total
                .get(index)
                .copied()
                .flatten()
                .or_else(|| own.get(index).copied().flatten())
                .unwrap_or(0)
        };
        Self {
            anon: pick(0),
            file: pick(1),
            inactive_file: pick(2),
        }
    }
}

/// Memory pressure stall information (`some avg10=... avg60=... avg300=... total=...`).
#[derive(Debug, Default, PartialEq)]
struct Pressure {
    some_avg10: Option<f64>,
    full_avg10: Option<f64>,
}

impl Pressure {
    fn parse(text: &str) -> Self {
        let mut pressure = Self::default();
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let slot = match words.next() {
                Some("some") => &mut pressure.some_avg10,
                Some("full") => &mut pressure.full_avg10,
                _ => continue,
            };
            *slot = words
                .find_map(|word| word.strip_prefix("avg10="))
                .and_then(|value| value.parse::<f64>().ok())
                .filter(|value| value.is_finite());
        }
        pressure
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A proc and a cgroup root in one temporary directory.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let fixture = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            fs::create_dir_all(fixture.proc_root()).unwrap();
            fs::create_dir_all(fixture.cgroup_root()).unwrap();
            fixture
        }
        fn proc_root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }
        fn cgroup_root(&self) -> PathBuf {
            self.dir.path().join("cgroup")
        }
        fn write(&self, relative: &str, text: &str) {
            let path = self.dir.path().join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        fn reader(&self) -> CgroupReader {
            CgroupReader::new(self.proc_root(), self.cgroup_root())
        }
    }

    const HYBRID_MEMBERSHIP: &str =
        "9:name=systemd:/\n4:memory:/process_api/job1\n2:cpu,cpuacct:/\n0::/\n";

    const V1_STAT: &str = "cache 73728\nrss 1671168\ninactive_file 32768\n\
        hierarchical_memory_limit 9223372036854771712\n\
        total_cache 81920\ntotal_rss 1679360\ntotal_inactive_file 40960\n";

    /// A hybrid host like the CI machine: v1 memory controller plus a v2 mount without it.
    fn v1_fixture() -> Fixture {
        let f = Fixture::new();
        f.write("proc/self/cgroup", HYBRID_MEMBERSHIP);
        f.write("cgroup/unified/cgroup.controllers", "");
        let group = "cgroup/memory/process_api/job1";
        f.write(&format!("{group}/memory.usage_in_bytes"), "3031040\n");
        f.write(
            &format!("{group}/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        f.write(&format!("{group}/memory.stat"), V1_STAT);
        f.write(
            &format!("{group}/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        f.write(
            "proc/pressure/memory",
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n\
             full avg10=0.25 avg60=0.00 avg300=0.00 total=99\n",
        );
        f
    }

    const V2_STAT: &str = "anon 104857600\nfile 52428800\nkernel 1000\ninactive_file 20971520\n\
        active_file 31457280\n";

    fn v2_fixture(max: &str) -> Fixture {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
        f.write("cgroup/cgroup.controllers", "cpuset cpu io memory pids\n");
        let group = "cgroup/kubepods/pod1/ctr";
        f.write(&format!("{group}/memory.current"), "167772160\n");
        f.write(&format!("{group}/memory.max"), max);
        f.write(&format!("{group}/memory.stat"), V2_STAT);
        f.write(
            &format!("{group}/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        f.write(
            &format!("{group}/memory.pressure"),
            "some avg10=12.34 avg60=5.00 avg300=1.00 total=555\n\
             full avg10=3.21 avg60=1.00 avg300=0.10 total=111\n",
        );
        f
    }

    #[test]
    fn v1_group_on_a_hybrid_host() {
        let f = v1_fixture();
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(
            mem,
            CgroupMem {
                version: CgroupVersion::V1,
                path: "/process_api/job1".into(),
                current_bytes: 3_031_040,
                max_bytes: 0,
                working_set_bytes: 3_031_040 - 40_960,
                anon_bytes: 1_679_360,
                file_bytes: 81_920,
                inactive_file_bytes: 40_960,
                oom_kills: 2,
                pressure_some_avg10: Some(1.5),
                pressure_full_avg10: Some(0.25),
            }
        );
    }

    #[test]
    fn v1_numeric_limit_and_stat_without_total_keys() {
        let f = v1_fixture();
        let group = "cgroup/memory/process_api/job1";
        f.write(
            &format!("{group}/memory.limit_in_bytes"),
            "4611686018427387904\n",
        );
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(mem.max_bytes, 0, "2^62 and above is v1's unlimited");

        // 1 TiB: likely more than this machine's RAM, but a configured limit all the same.
        f.write(&format!("{group}/memory.limit_in_bytes"), "1099511627776\n");
        f.write(
            &format!("{group}/memory.stat"),
            "cache 73728\nrss 1671168\ninactive_file 32768\n",
        );
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(mem.max_bytes, 1_099_511_627_776);
        assert_eq!(mem.anon_bytes, 1_671_168);
        assert_eq!(mem.file_bytes, 73_728);
        assert_eq!(mem.working_set_bytes, 3_031_040 - 32_768);
    }

    #[test]
    fn v2_group_with_max_limit() {
        let f = v2_fixture("max\n");
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(
            mem,
            CgroupMem {
                version: CgroupVersion::V2,
                path: "/kubepods/pod1/ctr".into(),
                current_bytes: 167_772_160,
                max_bytes: 0,
                working_set_bytes: 167_772_160 - 20_971_520,
                anon_bytes: 104_857_600,
                file_bytes: 52_428_800,
                inactive_file_bytes: 20_971_520,
                oom_kills: 1,
                pressure_some_avg10: Some(12.34),
                pressure_full_avg10: Some(3.21),
            }
        );
    }

    #[test]
    fn v2_group_with_numeric_limit_is_reread_through_kept_files() {
        let f = v2_fixture("268435456\n");
        let mut reader = f.reader();
        let mem = reader.read(Instant::now()).unwrap();
        assert_eq!(mem.max_bytes, 268_435_456);

        let group = "cgroup/kubepods/pod1/ctr";
        f.write(&format!("{group}/memory.current"), "200000000\n");
        f.write(&format!("{group}/memory.max"), "max\n");
        let mem = reader.read(Instant::now()).unwrap();
        assert_eq!(mem.current_bytes, 200_000_000);
        assert_eq!(mem.working_set_bytes, 200_000_000 - 20_971_520);
        assert_eq!(mem.max_bytes, 0);
    }

    #[test]
    fn slow_files_and_psi_are_reread_on_their_own_periods() {
        let f = v2_fixture("max\n");
        let group = "cgroup/kubepods/pod1/ctr";
        let mut reader = f
            .reader()
            .with_slow_refresh(Duration::from_secs(1))
            .with_context_refresh(Duration::from_secs(5))
            .with_pressure_refresh(Duration::from_secs(2));
        let start = Instant::now();
        let first = reader.read(start).unwrap();
        assert_eq!(first.inactive_file_bytes, 20_971_520);
        assert_eq!(first.pressure_some_avg10, Some(12.34));

        f.write(&format!("{group}/memory.current"), "200000000\n");
        f.write(&format!("{group}/memory.stat"), "inactive_file 1000\n");
        f.write(
            &format!("{group}/memory.pressure"),
            "some avg10=50.00 avg60=5.00 avg300=1.00 total=999\n",
        );
        let at = |ms| start + Duration::from_millis(ms);
        // Usage is read on every sample; the rest is cached within its period.
        let cached = reader.read(at(900)).unwrap();
        assert_eq!(cached.current_bytes, 200_000_000);
        assert_eq!(cached.working_set_bytes, 200_000_000 - 20_971_520);
        assert_eq!(cached.pressure_some_avg10, Some(12.34));

        let slow_due = reader.read(at(1000)).unwrap();
        // No limit ("max"): the working set is context, memory.stat waits for its own period.
        assert_eq!(slow_due.working_set_bytes, 200_000_000 - 20_971_520);
        let context_due = reader.read(at(5000)).unwrap();
        assert_eq!(context_due.working_set_bytes, 200_000_000 - 1000);
        assert_eq!(slow_due.pressure_some_avg10, Some(12.34), "PSI waits 2 s");

        let psi_due = reader.read(at(2000)).unwrap();
        assert_eq!(psi_due.pressure_some_avg10, Some(50.0));
        assert_eq!(psi_due.pressure_full_avg10, None);
    }

    #[test]
    fn with_a_limit_memory_stat_is_reread_on_the_slow_period() {
        let f = v2_fixture("1073741824\n");
        let group = "cgroup/kubepods/pod1/ctr";
        let mut reader = f
            .reader()
            .with_slow_refresh(Duration::from_secs(1))
            .with_context_refresh(Duration::from_secs(5));
        let start = Instant::now();
        let first = reader.read(start).unwrap();
        assert_eq!(first.max_bytes, 1_073_741_824);
        f.write(&format!("{group}/memory.stat"), "inactive_file 1000\n");
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(
            reader.read(at(900)).unwrap().inactive_file_bytes,
            20_971_520
        );
        // The working set decides the usage ratio now: memory.stat is as fresh as the limit.
        assert_eq!(reader.read(at(1000)).unwrap().inactive_file_bytes, 1000);
    }

    #[test]
    fn v1_stat_parsing_prefers_hierarchical_keys_in_one_pass() {
        let stat = "cache 1\nrss 2\ninactive_file 3\ntotal_rss 20\nbogus\n\
            total_inactive_file 30\ntotal_cache x\n";
        assert_eq!(
            MemoryStat::parse(CgroupVersion::V1, stat),
            MemoryStat {
                anon: 20,
                // A malformed total_cache falls back to the group's own figure.
                file: 1,
                inactive_file: 30,
            }
        );
        assert_eq!(
            MemoryStat::parse(CgroupVersion::V2, V2_STAT),
            MemoryStat {
                anon: 104_857_600,
                file: 52_428_800,
                inactive_file: 20_971_520,
            }
        );
        assert_eq!(parse_decimal(b" 18446744073709551615\n"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"-1"), None);
        assert_eq!(parse_decimal(b""), None);
    }

    #[test]
    fn no_cgroup_hierarchy_at_all() {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/\n");
        assert_eq!(locate(&f.proc_root(), &f.cgroup_root()).unwrap(), None);
        assert_eq!(f.reader().read(Instant::now()), None);

        let nowhere = f.dir.path().join("does-not-exist");
        assert_eq!(
            CgroupReader::new(nowhere.clone(), nowhere).read(Instant::now()),
            None
        );
    }

    #[test]
    fn missing_optional_files_read_as_not_available() {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/app\n");
        f.write("cgroup/cgroup.controllers", "memory\n");
        f.write("cgroup/app/memory.current", "1000\n");
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(
            mem,
            CgroupMem {
                version: CgroupVersion::V2,
                path: "/app".into(),
                current_bytes: 1000,
                max_bytes: 0,
                working_set_bytes: 1000,
                anon_bytes: 0,
                file_bytes: 0,
                inactive_file_bytes: 0,
                oom_kills: 0,
                pressure_some_avg10: None,
                pressure_full_avg10: None,
            }
        );
    }

    #[test]
    fn group_without_memory_controller_is_none_until_it_appears() {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/app\n");
        f.write("cgroup/cgroup.controllers", "cpu\n");
        fs::create_dir_all(f.cgroup_root().join("app")).unwrap();
        let mut reader = f.reader();
        assert_eq!(reader.read(Instant::now()), None);
        f.write("cgroup/app/memory.current", "5\n");
        assert_eq!(reader.read(Instant::now()).unwrap().current_bytes, 5);
    }

    #[test]
    fn malformed_files_degrade_to_zero_without_stopping() {
        let f = v2_fixture("lots\n");
        let group = "cgroup/kubepods/pod1/ctr";
        f.write(&format!("{group}/memory.events"), "oom_kill many\n");
        f.write(
            &format!("{group}/memory.pressure"),
            "some avg10=NaN\nfull\n",
        );
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!(mem.current_bytes, 167_772_160);
        assert_eq!(mem.max_bytes, 0);
        assert_eq!(mem.oom_kills, 0);
        assert_eq!(mem.pressure_some_avg10, None);
        assert_eq!(mem.pressure_full_avg10, None);

        f.write(&format!("{group}/memory.current"), "garbage\n");
        assert_eq!(f.reader().read(Instant::now()), None);
    }

    #[test]
    fn invisible_group_falls_back_to_the_hierarchy_root() {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/kubepods/elsewhere\n");
        f.write("cgroup/cgroup.controllers", "memory\n");
        f.write("cgroup/memory.current", "77\n");
        let mem = f.reader().read(Instant::now()).unwrap();
        assert_eq!((&*mem.path, mem.current_bytes), ("/", 77));
    }

    #[test]
    fn paths_leaving_the_mount_fall_back_to_the_root() {
        let f = Fixture::new();
        f.write("proc/self/cgroup", "0::/../../etc\n");
        f.write("cgroup/cgroup.controllers", "memory\n");
        let location = locate(&f.proc_root(), &f.cgroup_root()).unwrap().unwrap();
        assert_eq!(&*location.path, "/");
        assert_eq!(location.dir, f.cgroup_root());
    }

    #[test]
    fn missing_membership_file_uses_the_root() {
        let f = Fixture::new();
        fs::create_dir_all(f.cgroup_root().join("memory")).unwrap();
        let location = locate(&f.proc_root(), &f.cgroup_root()).unwrap().unwrap();
        assert_eq!(
            location,
            Location {
                version: CgroupVersion::V1,
                path: "/".into(),
                dir: f.cgroup_root().join("memory"),
            }
        );
    }

    #[test]
    fn v1_reads_system_pressure_and_v2_the_groups() {
        let f = v1_fixture();
        let location = locate(&f.proc_root(), &f.cgroup_root()).unwrap().unwrap();
        let files = GroupFiles::new(location, &f.proc_root());
        assert_eq!(files.paths()[4], f.proc_root().join("pressure/memory"));

        let f = v2_fixture("max");
        let location = locate(&f.proc_root(), &f.cgroup_root()).unwrap().unwrap();
        let files = GroupFiles::new(location, &f.proc_root());
        assert_eq!(
            files.paths()[4],
            f.cgroup_root().join("kubepods/pod1/ctr/memory.pressure")
        );
    }

    #[test]
    fn membership_parsing() {
        assert_eq!(
            parse_membership(HYBRID_MEMBERSHIP),
            Membership {
                v1_memory: Some("/process_api/job1".to_owned()),
                v2: Some("/".to_owned()),
            }
        );
        assert_eq!(
            parse_membership("garbage\n5:memory,hugetlb:/a:b\n"),
            Membership {
                v1_memory: Some("/a:b".to_owned()),
                v2: None,
            }
        );
    }

    #[test]
    fn pressure_parsing() {
        assert_eq!(
            Pressure::parse("some avg10=0.50 avg60=0.10 avg300=0.00 total=7\n"),
            Pressure {
                some_avg10: Some(0.5),
                full_avg10: None,
            }
        );
    }

    #[test]
    fn reads_the_real_machine() {
        // Whatever this machine mounts, reading must not fail; when a group is found its usage
        // includes at least this test process.
        if let Some(mem) =
            CgroupReader::new("/proc".into(), "/sys/fs/cgroup".into()).read(Instant::now())
        {
            assert!(mem.current_bytes > 0);
            assert!(mem.working_set_bytes <= mem.current_bytes);
            assert!(mem.path.starts_with('/'));
        }
    }
}
