//! A cgroup v2 fixture tree that a test changes at will, so insight-service's in-process
//! pressure probe (`--probe-proc-root`, `--probe-cgroup-root`) reads an injected memory usage
//! instead of the machine's.
//!
//! Layout, as monitor-service's `probe::cgroup` looks for it:
//!
//! ```text
//! <root>/proc/self/cgroup            "0::/test"      (v2 membership line)
//! <root>/cgroup/cgroup.controllers   "memory"        (marks a pure v2 mount)
//! <root>/cgroup/test/memory.current  usage, rewritten in place by `set_usage`
//! <root>/cgroup/test/memory.max      the limit
//! <root>/cgroup/test/memory.stat     "inactive_file 0": the working set is all of usage
//! ```
//!
//! There is no `<root>/proc/meminfo` and no `memory.pressure`, so the usage ratio is exactly
//! `memory.current / memory.max` and PSI never adds a signal.

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

/// Width `memory.current` is always written at (a u64 has at most 20 digits), see
/// [`FakeCgroup::set_usage`].
const USAGE_WIDTH: usize = 20;

/// A v2 memory cgroup fixture in a temporary directory, removed on drop.
pub struct FakeCgroup {
    dir: tempfile::TempDir,
    max_bytes: u64,
}

impl FakeCgroup {
    /// A group limited to `max_bytes`, using `ratio` of it.
    pub fn new(max_bytes: u64, ratio: f64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("proc/self")).unwrap();
        fs::write(root.join("proc/self/cgroup"), "0::/test\n").unwrap();
        fs::create_dir_all(root.join("cgroup/test")).unwrap();
        fs::write(root.join("cgroup/cgroup.controllers"), "memory\n").unwrap();
        fs::write(
            root.join("cgroup/test/memory.max"),
            format!("{max_bytes}\n"),
        )
        .unwrap();
        fs::write(
            root.join("cgroup/test/memory.stat"),
            "anon 0\nfile 0\ninactive_file 0\n",
        )
        .unwrap();
        fs::write(
            root.join("cgroup/test/memory.current"),
            " ".repeat(USAGE_WIDTH) + "\n",
        )
        .unwrap();
        let group = Self { dir, max_bytes };
        group.set_usage(ratio);
        group
    }

    /// For `--probe-proc-root`.
    pub fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// For `--probe-cgroup-root`.
    pub fn cgroup_root(&self) -> PathBuf {
        self.dir.path().join("cgroup")
    }

    /// The directory holding everything.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sets `memory.current` to `ratio` of the limit.
    ///
    /// Written in place with one `pwrite` of a fixed-width, space-padded number and no
    /// truncation: the probe keeps the file open and re-reads it from offset 0, so replacing
    /// the file (rename) would go unseen, and truncating first could let a sample read an empty
    /// file in between.
    pub fn set_usage(&self, ratio: f64) {
        let bytes = (self.max_bytes as f64 * ratio) as u64;
        let text = format!("{bytes:<USAGE_WIDTH$}\n");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup_root().join("test/memory.current"))
            .unwrap();
        file.write_all_at(text.as_bytes(), 0).unwrap();
    }
}

/// A probe root with no cgroup and no PSI, and a `meminfo` with all of its 16 GiB available,
/// so the probe reads a usage ratio of 0 and pressure never changes. Servers in tests that are
/// not about pressure point both probe roots here, so the memory in use on the machine running
/// the tests cannot shed their calls. (Without a `meminfo` the probe would fall back to the
/// machine's own figures.)
pub fn calm_probe_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("meminfo"),
        "MemTotal:       16777216 kB\nMemFree:        16777216 kB\nMemAvailable:   16777216 kB\n",
    )
    .unwrap();
    dir
}
