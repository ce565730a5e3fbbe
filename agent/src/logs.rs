//! Task output with rotation: each task's stdout and stderr go into a pipe,
//! and a small task per stream copies it into `<sandbox>/stdout` (or
//! `stderr`), rotating to `stdout.1` … `stdout.N` when the file would grow
//! past `--log-max-size` (the oldest beyond `--log-max-files` is deleted),
//! like Mesos' logrotate container logger.
//!
//! The pumps here serve plain processes (`--isolation=none`). A container's
//! output is pumped by its own init with the same rotation and file names
//! (`containerizer::Output::Sandbox`), so it is captured while no agent
//! runs; `LogConfig` configures both.
//!
//! Internal API, public for the agent's tests.
//!
//! Memory matters (an agent holds thousands of containers): a pump holds no
//! buffer while it waits; it reads into a stack buffer only once the pipe is
//! readable, and writes synchronously (a page-cache write is shorter than a
//! hop to the blocking pool).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::net::unix::pipe;

/// Default `--log-max-size`: 10 MiB per file keeps recent output at hand
/// without filling small disks.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Default `--log-max-files`: the live file plus 4 rotated ones.
pub const DEFAULT_LOG_MAX_FILES: u32 = 5;
/// Read size per wake-up; on the stack, only while a read is in progress.
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Largest size of one file, in bytes (> 0).
    pub max_size: u64,
    /// Files kept per stream, the live one included (>= 1).
    pub max_files: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_LOG_MAX_SIZE,
            max_files: DEFAULT_LOG_MAX_FILES,
        }
    }
}

/// A pipe for one output stream: the read end (non-blocking, for the pump)
/// and the write end (blocking, for the task). Both close on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is involved.
    let rc = unsafe {
        let flags = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((read, write))
}

/// The live file and its rotations: `stdout`, `stdout.1`, … `stdout.N-1`.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    config: LogConfig,
}

impl RotatingFile {
    /// Creates (truncates) the live file.
    pub fn create(path: PathBuf, config: LogConfig) -> io::Result<Self> {
        let file = open_new(&path)?;
        Ok(Self {
            path,
            file,
            size: 0,
            config,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.config.max_files.max(1);
        if keep == 1 {
            // Only the live file is kept: start it over.
            self.file = open_new(&self.path)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(self.rotated(keep - 1));
        for n in (1..keep - 1).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = open_new(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// Appends, rotating first when `data` would not fit. A single write
    /// larger than a whole file is split across files.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        let max = self.config.max_size.max(1);
        while !data.is_empty() {
            if self.size >= max {
                self.rotate()?;
            }
            let room = usize::try_from(max - self.size).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(data.len().min(room));
            self.file.write_all(now)?;
            self.size += now.len() as u64;
            data = rest;
        }
        Ok(())
    }
}

fn open_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
}

/// Copies the pipe into the rotating file until every writer has closed
/// it (the task and anything it started are gone). Returns bytes copied.
pub async fn pump(read: OwnedFd, mut out: RotatingFile) -> io::Result<u64> {
    let receiver = pipe::Receiver::from_owned_fd(read)?;
    let mut total = 0u64;
    loop {
        receiver.readable().await?;
        // The buffer lives only in this synchronous block, never across an
        // await, so a waiting pump costs a few words, not 16 KiB.
        let done = {
            let mut buf = [0u8; READ_SIZE];
            match receiver.try_read(&mut buf) {
                Ok(0) => true,
                Ok(n) => {
                    out.write(&buf[..n])?;
                    total += n as u64;
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(e) => return Err(e),
            }
        };
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotation_keeps_the_newest_files_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut f = RotatingFile::create(
            path.clone(),
            LogConfig {
                max_size: 4,
                max_files: 3,
            },
        )
        .unwrap();
        f.write(b"aaaabbbbccccdd").unwrap();
        assert_eq!(read(&path), "dd");
        assert_eq!(read(&dir.path().join("stdout.1")), "cccc");
        assert_eq!(read(&dir.path().join("stdout.2")), "bbbb");
        assert!(
            !dir.path().join("stdout.3").exists(),
            "only 3 files are kept"
        );
    }

    #[test]
    fn a_single_file_limit_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let mut f = RotatingFile::create(
            path.clone(),
            LogConfig {
                max_size: 3,
                max_files: 1,
            },
        )
        .unwrap();
        f.write(b"abcdef").unwrap();
        assert_eq!(read(&path), "def");
        assert!(!dir.path().join("stderr.1").exists());
    }

    #[tokio::test]
    async fn the_pump_copies_until_every_writer_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let (r, w) = pipe().unwrap();
        let out = RotatingFile::create(path.clone(), LogConfig::default()).unwrap();
        let pump = tokio::spawn(pump(r, out));
        let mut writer = File::from(w);
        writer.write_all(b"hello ").unwrap();
        writer.write_all(b"world\n").unwrap();
        drop(writer);
        assert_eq!(pump.await.unwrap().unwrap(), 12);
        assert_eq!(read(&path), "hello world\n");
    }
}
