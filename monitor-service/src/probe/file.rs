//! A kernel file (procfs, cgroupfs) kept open and re-read from offset 0 on every sample.
//!
//! Reopening a path costs a path walk and a file-descriptor allocation per sample per file;
//! `pread(fd, buf, 0)` on an open procfs or cgroupfs file makes the kernel regenerate its
//! contents, so keeping the descriptor is both cheaper and as fresh. A descriptor can go stale
//! (the process behind `/proc/<pid>/statm` exited, the group was removed): any failed read drops
//! it and the next attempt reopens the path, so a file that comes back is picked up again.

use std::{fs::File, io, os::unix::fs::FileExt, path::PathBuf};

/// Kernel files we read are a few KiB at most (memory.stat is the largest, ~2 KiB); a bigger file
/// means the path points somewhere unexpected, and we refuse rather than buffer it.
const MAX_FILE_BYTES: usize = 64 * 1024;

/// Read-buffer growth step; one step holds any of the files we read in a single `pread`.
const READ_CHUNK: usize = 4096;

/// One file, kept open between reads.
#[derive(Debug)]
pub(crate) struct RereadFile {
    path: PathBuf,
    file: Option<File>,
    /// Read buffer; it only grows, so it is zeroed once rather than on every read.
    buf: Vec<u8>,
    /// Bytes of `buf` the last read filled.
    len: usize,
    /// Set while reads fail, so a broken file is logged once, not once per sample.
    failing: bool,
}

impl RereadFile {
    /// A reader of `path`; nothing is opened until the first read.
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            buf: Vec::new(),
            len: 0,
            failing: false,
        }
    }

    /// The path this reader reads.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads the whole file and parses it; `Ok(None)` when the file does not exist (the vector
    /// cgroups pattern: an absent file is "not available", not an error).
    pub(crate) fn read_with<T>(
        &mut self,
        parse: impl FnOnce(&str) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        if !self.refresh()? {
            return Ok(None);
        }
        let text = std::str::from_utf8(self.buf.get(..self.len).unwrap_or_default())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        parse(text).map(Some)
    }

    /// Like [`RereadFile::read_with`], but a failure becomes `None` after being logged (once
    /// until the file reads again), so one unreadable file never stops sampling.
    pub(crate) fn read_or_log<T>(
        &mut self,
        parse: impl FnOnce(&str) -> io::Result<T>,
    ) -> Option<T> {
        match self.read_with(parse) {
            Ok(value) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "readable again");
                }
                value
            }
            Err(error) => {
                if self.failing {
                    tracing::debug!(path = %self.path.display(), %error, "still unreadable");
                } else {
                    self.failing = true;
                    tracing::warn!(
                        path = %self.path.display(),
                        %error,
                        "cannot read; reporting the value as not available"
                    );
                }
                None
            }
        }
    }

    /// Fills `buf` with the current contents; false when the file does not exist.
    fn refresh(&mut self) -> io::Result<bool> {
        if let Some(file) = &self.file {
            match read_all_at(file, &mut self.buf) {
                Ok(len) => {
                    self.len = len;
                    return Ok(true);
                }
                // A stale descriptor (e.g. ESRCH once the process exited): reopen below, which
                // reports a file that is really gone as NotFound.
                Err(_) => self.file = None,
            }
        }
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        match read_all_at(&file, &mut self.buf) {
            Ok(len) => {
                self.len = len;
                self.file = Some(file);
                Ok(true)
            }
            // /proc/<pid>/* of a process that exited between open and read.
            Err(error) if error.raw_os_error() == Some(ESRCH) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// `ESRCH` ("no such process") on Linux, which procfs returns for a process that has gone;
/// `libc` is not a dependency for one constant.
const ESRCH: i32 = 3;

/// Reads `file` from offset 0 to its end into `buf` with positioned reads; returns the length.
///
/// A read that returns less than it asked for is taken as the end, so a file smaller than the
/// buffer costs one `pread`: procfs and cgroupfs fill the whole buffer unless the file ends
/// (seq_file and sysfs attributes alike), and asking again to see 0 would make the kernel
/// regenerate the file a second time just to skip it, doubling the cost of every sample.
///
/// `buf` keeps its length between calls and grows by [`READ_CHUNK`] only when a file fills it,
/// so the steady state neither allocates nor zeroes memory.
fn read_all_at(file: &File, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut len = 0;
    loop {
        if len >= MAX_FILE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file is larger than {MAX_FILE_BYTES} bytes"),
            ));
        }
        if buf.len() < len + READ_CHUNK {
            buf.resize(len + READ_CHUNK, 0);
        }
        let Some(free) = buf.get_mut(len..) else {
            return Ok(len);
        };
        let asked = free.len();
        // Files and offsets here are < MAX_FILE_BYTES, so the cast cannot truncate.
        match file.read_at(free, len as u64) {
            Ok(0) => return Ok(len),
            Ok(read) => {
                len += read;
                if read < asked {
                    return Ok(len);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_none_and_appears_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        let mut file = RereadFile::new(path.clone());
        assert_eq!(file.read_with(|s| Ok(s.to_owned())).unwrap(), None);

        std::fs::write(&path, "42\n").unwrap();
        assert_eq!(
            file.read_with(|s| Ok(s.to_owned())).unwrap().as_deref(),
            Some("42\n")
        );
    }

    #[test]
    fn rereads_new_contents_through_the_kept_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        std::fs::write(&path, "a much longer first value\n").unwrap();
        let mut file = RereadFile::new(path.clone());
        assert_eq!(
            file.read_with(|s| Ok(s.to_owned())).unwrap().as_deref(),
            Some("a much longer first value\n")
        );
        // fs::write truncates the same inode, so the open descriptor sees the new, shorter text.
        std::fs::write(&path, "7\n").unwrap();
        assert_eq!(
            file.read_with(|s| Ok(s.to_owned())).unwrap().as_deref(),
            Some("7\n")
        );
    }

    #[test]
    fn reads_files_larger_than_one_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let text = "x".repeat(READ_CHUNK * 2 + 17);
        std::fs::write(&path, &text).unwrap();
        let mut file = RereadFile::new(path);
        assert_eq!(file.read_with(|s| Ok(s.len())).unwrap(), Some(text.len()));
    }

    #[test]
    fn oversized_and_non_utf8_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'1'; MAX_FILE_BYTES + 1]).unwrap();
        let error = RereadFile::new(big).read_with(|_| Ok(())).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);

        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let mut file = RereadFile::new(binary);
        assert_eq!(
            file.read_with(|_| Ok(())).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(file.read_or_log(|_| Ok(())), None);
    }

    #[test]
    fn parse_errors_propagate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        std::fs::write(&path, "not a number").unwrap();
        let mut file = RereadFile::new(path);
        let error = file
            .read_with(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
