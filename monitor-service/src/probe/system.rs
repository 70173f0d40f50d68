//! Memory of the whole machine, from `/proc/meminfo` (sysinfo where that cannot be read).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;
use sysinfo::{MemoryRefreshKind, System};

use super::file::RereadFile;

/// Memory of the machine as the kernel reports it (not the container's view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SystemMem {
    /// Total RAM in bytes; 0 when it could not be read.
    pub total_bytes: u64,
    /// Available RAM in bytes (MemAvailable: free plus reclaimable).
    pub available_bytes: u64,
    /// Total swap in bytes.
    pub swap_total_bytes: u64,
    /// Used swap in bytes.
    pub swap_used_bytes: u64,
}

/// Reads the machine's memory from `<proc_root>/meminfo` through a kept descriptor, falling
/// back to sysinfo where that file cannot be read (another OS, a fixture tree without it).
///
/// Not sysinfo first: its refresh opens, reads into a fresh `String` and closes /proc/meminfo
/// every time, which measured ~20 µs more than a `pread` on a kept descriptor (BENCHMARKS.md),
/// the largest single cost of a sample. And at most once per `refresh`, because even the pread
/// is ~8 µs of kernel formatting while the machine's totals are context, not the limit a
/// container is killed at.
#[derive(Debug)]
pub(crate) struct SystemReader {
    meminfo: RereadFile,
    /// Created on the first fallback; `None` also when sysinfo cannot run on this platform.
    fallback: Option<System>,
    fallback_tried: bool,
    refresh: Duration,
    /// The period while the figures are only context (a cgroup limit decides the usage ratio).
    context_refresh: Duration,
    last: Option<(Instant, SystemMem)>,
}

impl SystemReader {
    /// A reader of `<proc_root>/meminfo`; nothing is read yet.
    pub(crate) fn new(proc_root: &Path) -> Self {
        Self {
            meminfo: RereadFile::new(proc_root.join("meminfo")),
            fallback: None,
            fallback_tried: false,
            refresh: Duration::ZERO,
            context_refresh: Duration::ZERO,
            last: None,
        }
    }

    /// Re-reads at most once per `period`; zero, the default, re-reads on every read.
    pub(crate) fn with_refresh(mut self, period: Duration) -> Self {
        self.refresh = period;
        self
    }

    /// Re-reads at most once per `period` when the caller says the figures are only context;
    /// zero, the default, re-reads on every read.
    pub(crate) fn with_context_refresh(mut self, period: Duration) -> Self {
        self.context_refresh = period;
        self
    }

    /// The machine's memory at `now`, which decides whether the cached figures are due:
    /// after the refresh period when they `decide` the usage ratio, else after the context one.
    pub(crate) fn read(&mut self, now: Instant, decide: bool) -> SystemMem {
        let period = if decide {
            self.refresh
        } else {
            self.context_refresh
        };
        if let Some((at, mem)) = self.last
            && now.saturating_duration_since(at) < period
        {
            return mem;
        }
        let mem = match self.meminfo.read_or_log(|text| Ok(parse_meminfo(text))) {
            Some(Some(mem)) => mem,
            _ => self.read_fallback(),
        };
        self.last = Some((now, mem));
        mem
    }

    fn read_fallback(&mut self) -> SystemMem {
        if !self.fallback_tried {
            self.fallback_tried = true;
            self.fallback = match System::new() {
                Ok(system) => Some(system),
                Err(error) => {
                    tracing::warn!(%error, "system memory is not available on this platform");
                    None
                }
            };
        }
        let Some(system) = &mut self.fallback else {
            return SystemMem::default();
        };
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        SystemMem {
            total_bytes: system.total_memory(),
            available_bytes: system.available_memory(),
            swap_total_bytes: system.total_swap(),
            swap_used_bytes: system.used_swap(),
        }
    }
}

/// The figures of /proc/meminfo (`Key:   value kB` lines), without allocating; `None` when
/// MemTotal is missing, i.e. this is not a meminfo file. Without MemAvailable (kernels before
/// 3.14) available memory is estimated the way sysinfo and `free` do.
///
/// The key is matched before the value is parsed: meminfo has ~55 lines and we want nine.
fn parse_meminfo(text: &str) -> Option<SystemMem> {
    let (mut total, mut available, mut swap_total, mut swap_free) = (None, None, None, None);
    let (mut free, mut buffers, mut cached, mut reclaimable, mut shmem) =
        (None, None, None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "MemFree" => &mut free,
            "Buffers" => &mut buffers,
            "Cached" => &mut cached,
            "SReclaimable" => &mut reclaimable,
            "Shmem" => &mut shmem,
            "SwapTotal" => &mut swap_total,
            "SwapFree" => &mut swap_free,
            _ => continue,
        };
        let value = value.trim();
        let kib = value.strip_suffix("kB").unwrap_or(value).trim_end();
        *slot = kib.parse::<u64>().ok().map(|kib| kib.saturating_mul(1024));
        // With MemAvailable (every kernel since 3.14) the four figures we report are all in
        // the first ~16 of ~55 lines: the rest is not scanned. Without it, read on for the
        // estimate's inputs.
        if total.is_some() && available.is_some() && swap_total.is_some() && swap_free.is_some() {
            break;
        }
    }
    let [
        swap_total,
        swap_free,
        free,
        buffers,
        cached,
        reclaimable,
        shmem,
    ] = [
        swap_total,
        swap_free,
        free,
        buffers,
        cached,
        reclaimable,
        shmem,
    ]
    .map(|bytes| bytes.unwrap_or(0));
    let total_bytes = total?;
    let available_bytes = available.unwrap_or_else(|| {
        free.saturating_add(buffers)
            .saturating_add(cached)
            .saturating_add(reclaimable)
            .saturating_sub(shmem)
    });
    Some(SystemMem {
        total_bytes,
        available_bytes,
        swap_total_bytes: swap_total,
        swap_used_bytes: swap_total.saturating_sub(swap_free),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\n\
        MemAvailable:    9000000 kB\nBuffers:          100000 kB\nCached:          2000000 kB\n\
        SwapCached:            0 kB\nSwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n\
        HugePages_Total:       0\n";

    #[test]
    fn parses_meminfo_in_bytes() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some(SystemMem {
                total_bytes: 16_000_000 * 1024,
                available_bytes: 9_000_000 * 1024,
                swap_total_bytes: 4_000_000 * 1024,
                swap_used_bytes: 1_000_000 * 1024,
            })
        );
    }

    #[test]
    fn estimates_available_on_old_kernels_and_rejects_other_files() {
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n\
            Shmem: 50 kB\nSReclaimable: 40 kB\n";
        assert_eq!(parse_meminfo(old).unwrap().available_bytes, 300 * 1024);
        assert_eq!(parse_meminfo("garbage\nSwapTotal: x kB\n"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn reads_a_fixture_and_falls_back_to_sysinfo_without_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meminfo"), MEMINFO).unwrap();
        let mem = SystemReader::new(dir.path()).read(Instant::now(), true);
        assert_eq!(mem.total_bytes, 16_000_000 * 1024);

        let missing = SystemReader::new(&dir.path().join("nowhere")).read(Instant::now(), true);
        assert!(missing.total_bytes > 0, "sysinfo reads the real machine");
    }

    #[test]
    fn rereads_only_after_the_refresh_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(&path, MEMINFO).unwrap();
        let mut cached = SystemReader::new(dir.path()).with_refresh(Duration::from_secs(3600));
        let mut fresh = SystemReader::new(dir.path());
        let first = cached.read(Instant::now(), true);
        assert_eq!(fresh.read(Instant::now(), true), first);
        std::fs::write(&path, MEMINFO.replace("9000000", "8000000")).unwrap();
        assert_eq!(
            cached.read(Instant::now(), true),
            first,
            "not re-read within the period"
        );
        assert_eq!(
            fresh.read(Instant::now(), true).available_bytes,
            8_000_000 * 1024
        );
    }

    #[test]
    fn reads_the_real_machine() {
        let mem = SystemReader::new(Path::new("/proc")).read(Instant::now(), true);
        assert!(mem.total_bytes > 0);
        assert!(mem.available_bytes <= mem.total_bytes);
        assert!(mem.swap_used_bytes <= mem.swap_total_bytes);
    }
}
