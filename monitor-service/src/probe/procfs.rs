//! Per-process memory from `<proc_root>/<pid>/statm`.

use std::{io, path::Path};

use serde::Serialize;

use super::file::RereadFile;

/// Page size used to turn statm's page counts into bytes.
///
/// 4 KiB is the page size of every x86-64 Linux and of the arm64 kernels Kubernetes nodes run.
/// Asking the kernel (`sysconf(_SC_PAGESIZE)`) needs `unsafe` FFI, which the workspace denies;
/// on a 16/64 KiB-page kernel the byte counts would be under-reported by that factor.
pub const PAGE_SIZE: u64 = 4096;

/// Memory of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMem {
    /// Process id.
    pub pid: u32,
    /// Resident set size in bytes; 0 when the process is gone or unreadable.
    pub rss_bytes: u64,
    /// Virtual memory size in bytes; 0 when the process is gone or unreadable.
    pub virtual_bytes: u64,
}

/// Reads one process's statm through a kept-open descriptor.
#[derive(Debug)]
pub(crate) struct StatmReader {
    pid: u32,
    file: RereadFile,
}

impl StatmReader {
    /// A reader of `<proc_root>/<pid>/statm`.
    pub(crate) fn new(proc_root: &Path, pid: u32) -> Self {
        Self {
            pid,
            file: RereadFile::new(proc_root.join(pid.to_string()).join("statm")),
        }
    }

    /// The process's memory; zeros (with the pid) when it is gone or unreadable.
    pub(crate) fn read(&mut self) -> ProcessMem {
        let pid = self.pid;
        self.file
            .read_or_log(|text| parse_statm(pid, text))
            .unwrap_or(ProcessMem {
                pid,
                ..ProcessMem::default()
            })
    }
}

/// Parses statm: `size resident shared text lib data dt`, all in pages.
pub(crate) fn parse_statm(pid: u32, text: &str) -> io::Result<ProcessMem> {
    let mut fields = text.split_ascii_whitespace();
    let mut next_pages = |name: &str| -> io::Result<u64> {
        let field = fields.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("statm has no `{name}` field"),
            )
        })?;
        field.parse::<u64>().map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("statm `{name}` is not a page count ({field:?}): {error}"),
            )
        })
    };
    let size = next_pages("size")?;
    let resident = next_pages("resident")?;
    Ok(ProcessMem {
        pid,
        rss_bytes: resident.saturating_mul(PAGE_SIZE),
        virtual_bytes: size.saturating_mul(PAGE_SIZE),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_pages_into_bytes() {
        let mem = parse_statm(7, "2565 400 300 10 0 200 0\n").unwrap();
        assert_eq!(
            mem,
            ProcessMem {
                pid: 7,
                rss_bytes: 400 * 4096,
                virtual_bytes: 2565 * 4096,
            }
        );
    }

    #[test]
    fn rejects_truncated_and_garbage_statm() {
        assert_eq!(
            parse_statm(1, "").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            parse_statm(1, "12").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            parse_statm(1, "12 -3 0").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn huge_page_counts_saturate_instead_of_overflowing() {
        let mem = parse_statm(1, &format!("{} {}", u64::MAX, u64::MAX)).unwrap();
        assert_eq!(mem.rss_bytes, u64::MAX);
        assert_eq!(mem.virtual_bytes, u64::MAX);
    }

    #[test]
    fn fixture_process_and_missing_pid() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("42")).unwrap();
        std::fs::write(root.path().join("42/statm"), "100 25 0 0 0 0 0\n").unwrap();
        let mut reader = StatmReader::new(root.path(), 42);
        assert_eq!(reader.read().rss_bytes, 25 * PAGE_SIZE);
        assert_eq!(reader.read().virtual_bytes, 100 * PAGE_SIZE);

        let mut missing = StatmReader::new(root.path(), 43);
        assert_eq!(
            missing.read(),
            ProcessMem {
                pid: 43,
                rss_bytes: 0,
                virtual_bytes: 0
            }
        );
    }

    #[test]
    fn reads_this_process_from_the_real_proc() {
        let mut reader = StatmReader::new(Path::new("/proc"), std::process::id());
        let first = reader.read();
        assert_eq!(first.pid, std::process::id());
        assert!(first.rss_bytes > 0, "rss of a running test process is > 0");
        assert!(first.virtual_bytes >= first.rss_bytes);
        // The second read goes through the kept descriptor (pread at offset 0).
        let second = reader.read();
        assert!(second.rss_bytes > 0);
    }

    #[test]
    fn exited_child_reads_as_zero() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let mut reader = StatmReader::new(Path::new("/proc"), pid);
        let _ = reader.read();
        child.wait().unwrap();
        // Reaped: the kept descriptor fails with ESRCH, the reopen finds nothing.
        assert_eq!(
            reader.read(),
            ProcessMem {
                pid,
                rss_bytes: 0,
                virtual_bytes: 0
            }
        );
    }
}
