//! A cgroup v1 memory group with a hard limit, created for one run and removed when dropped
//! (also when a test panics): the "container" the OOM test puts the real service in.
//!
//! v1 because that is what this CI machine mounts (`/sys/fs/cgroup/memory`); Kubernetes nodes
//! use v2, whose `memory.max` enforces the same hard limit with the same OOM killer, and the
//! service's probe reads both.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Where the v1 memory controller is mounted.
pub const V1_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

/// How long the guard waits for killed tasks to leave the group before moving them out.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why a group could not be created, configured or read.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct CgroupError {
    /// What was being done ("create", "write", "read").
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

/// Why this machine cannot run the cgroup test, or `Ok` with the controller's mount point.
///
/// Needs Linux, root (creating a group and moving a process into it), and a cgroup v1 memory
/// controller at [`V1_MEMORY_ROOT`] (a pure v2 host has `cgroup.controllers` at
/// `/sys/fs/cgroup` instead).
pub fn v1_memory_support() -> Result<PathBuf, String> {
    if !cfg!(target_os = "linux") {
        return Err(format!(
            "cgroups are Linux-only (this is {})",
            std::env::consts::OS
        ));
    }
    match effective_uid() {
        Some(0) => {}
        Some(uid) => {
            return Err(format!(
                "creating a memory cgroup needs root (euid is {uid})"
            ));
        }
        None => return Err("cannot read the effective uid from /proc/self/status".to_owned()),
    }
    let root = PathBuf::from(V1_MEMORY_ROOT);
    if !root.join("memory.limit_in_bytes").is_file() {
        return Err(format!(
            "no cgroup v1 memory controller at {V1_MEMORY_ROOT} (a cgroup v2-only host?)"
        ));
    }
    Ok(root)
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`), so no unsafe
/// `geteuid` call is needed.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// What the kernel reports about a group's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupMemory {
    /// `memory.limit_in_bytes`.
    pub limit: u64,
    /// `memory.usage_in_bytes` now.
    pub usage: u64,
    /// `memory.max_usage_in_bytes`: the peak since creation or the last reset.
    pub max_usage: u64,
    /// `memory.failcnt`: how often usage hit the limit (each hit means reclaim).
    pub failcnt: u64,
    /// `oom_kill` of `memory.oom_control`: processes the OOM killer killed in this group.
    /// `None` on kernels older than 4.13, which do not report it.
    pub oom_kill: Option<u64>,
    /// `under_oom` of `memory.oom_control`: the group is in an OOM situation right now.
    pub under_oom: bool,
}

/// A memory group `insight-oom-<pid>-<nanos>` under the v1 controller; removed on drop.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    /// Where tasks that outlive the kill go before the group is removed.
    home: PathBuf,
}

impl MemoryCgroup {
    /// Creates a group under `root` with a hard limit of `limit` bytes, and the same limit on
    /// memory + swap when the kernel accounts swap, and swappiness 0, so swap cannot hide an
    /// OOM (without swap accounting, swappiness 0 is what keeps the group's pages out of swap).
    pub fn create(root: &Path, limit: u64) -> Result<Self, CgroupError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = root.join(format!("insight-oom-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|source| CgroupError {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        // From here on Drop removes the group, also if configuring it fails.
        let group = Self {
            home: own_group(root).unwrap_or_else(|| root.to_path_buf()),
            dir,
        };
        group.write("memory.limit_in_bytes", &limit.to_string())?;
        // memsw must be at least the memory limit, so it is set after it.
        if group.dir.join("memory.memsw.limit_in_bytes").is_file() {
            group.write("memory.memsw.limit_in_bytes", &limit.to_string())?;
        }
        if group.dir.join("memory.swappiness").is_file() {
            group.write("memory.swappiness", "0")?;
        }
        Ok(group)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its `cgroup.procs`: writing a pid there moves that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The processes in the group now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Reads the group's memory figures.
    pub fn memory(&self) -> Result<CgroupMemory, CgroupError> {
        let oom = self.read("memory.oom_control")?;
        let key = |name: &str| {
            oom.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse::<u64>().ok())?
            })
        };
        Ok(CgroupMemory {
            limit: self.read_u64("memory.limit_in_bytes")?,
            usage: self.read_u64("memory.usage_in_bytes")?,
            max_usage: self.read_u64("memory.max_usage_in_bytes")?,
            failcnt: self.read_u64("memory.failcnt")?,
            oom_kill: key("oom_kill"),
            under_oom: key("under_oom") == Some(1),
        })
    }

    /// Resets the peak (`memory.max_usage_in_bytes`) and `memory.failcnt`, so the next reading
    /// covers only what follows.
    pub fn reset_peak(&self) -> Result<(), CgroupError> {
        self.write("memory.max_usage_in_bytes", "0")?;
        self.write("memory.failcnt", "0")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.file(name);
        std::fs::write(&path, value).map_err(|source| CgroupError {
            action: "write",
            path,
            source,
        })
    }

    fn read(&self, name: &str) -> Result<String, CgroupError> {
        let path = self.file(name);
        std::fs::read_to_string(&path).map_err(|source| CgroupError {
            action: "read",
            path,
            source,
        })
    }

    fn read_u64(&self, name: &str) -> Result<u64, CgroupError> {
        let text = self.read(name)?;
        text.trim().parse().map_err(|_| CgroupError {
            action: "parse",
            path: self.file(name),
            source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_owned()),
        })
    }
}

impl Drop for MemoryCgroup {
    /// Kills what is still inside (only processes this run put there), waits for the group to
    /// empty, moves any straggler back to the group this process runs in, and removes the
    /// directory. Best effort: a failure is printed, never a panic inside a panic.
    fn drop(&mut self) {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in pids {
                    let _ = std::fs::write(self.home.join("cgroup.procs"), pid.to_string());
                }
                break;
            }
            for pid in &pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The last task's exit can take a moment to uncharge; rmdir says EBUSY until then.
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(e) = last {
            eprintln!("WARNING: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The v1 memory group this process runs in, if visible under `root`.
fn own_group(root: &Path) -> Option<PathBuf> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })?;
    let dir = root.join(path.trim_start_matches('/'));
    dir.join("cgroup.procs").is_file().then_some(dir)
}
