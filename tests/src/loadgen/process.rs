//! Servers under test as child processes: started on `127.0.0.1:0`, found by the `addr` field of
//! their JSON "listening" log line, measured by CPU time, and killed when dropped, so no server
//! outlives the benchmark that started it. Errors are returned, not panicked, because benchmark
//! binaries report them (the e2e tests' `Spawned` panics instead).

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::Duration,
};

/// Log lines of a child kept for error messages.
const LOG_TAIL: usize = 20;
/// Linux's USER_HZ: the unit of the CPU times in `/proc/<pid>/stat` (fixed by the ABI).
const USER_HZ: f64 = 100.0;

/// Why a child server could not be started or measured.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started at all.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Feeding the child its stdin failed.
    #[error("cannot write to the stdin of {program}: {source}")]
    Stdin {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The child did not log its address in time (or exited); its last log lines say why.
    #[error("{program} did not log its address within {timeout:?}; last log lines:\n{logs}")]
    NoAddress {
        /// The program.
        program: String,
        /// How long we waited.
        timeout: Duration,
        /// Its last stderr lines.
        logs: String,
    },
    /// `/proc/<pid>/stat` could not be read or parsed.
    #[error("cannot read the CPU time of pid {pid}: {reason}")]
    Stat {
        /// The process.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
}

/// A server running as a child process; killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildServer {
    child: Child,
    addr: SocketAddr,
    /// Held open for the child's lifetime: a child that watches its stdin (the echo server)
    /// exits when it closes, even if this process is killed without running `Drop`.
    stdin: Option<ChildStdin>,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl ChildServer {
    /// Starts `command` (which must make the server listen on `127.0.0.1:0` and log JSON lines
    /// on stderr with an `addr` field once it listens), writes `stdin` to it if given, and waits
    /// up to `timeout` for its address. Stderr keeps being drained afterwards, so the child never
    /// blocks on a full pipe; lines with WARN or ERROR are echoed with `name` as a prefix.
    pub fn start(
        name: &str,
        mut command: Command,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self, ProcessError> {
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        let logs = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        if let Some(stderr) = child.stderr.take() {
            let (logs, name) = (logs.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("WARN") || line.contains("ERROR") {
                        eprintln!("[{name}] {line}");
                    }
                    if let Some(sender) = &addr_tx
                        && let Some(addr) = listening_addr(&line)
                    {
                        let _ = sender.send(addr);
                        addr_tx = None;
                    }
                    let mut tail = logs.lock().unwrap_or_else(PoisonError::into_inner);
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut pipe = child.stdin.take();
        if let (Some(pipe), Some(bytes)) = (pipe.as_mut(), stdin) {
            let written = pipe.write_all(bytes).and_then(|()| pipe.flush());
            if let Err(source) = written {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProcessError::Stdin { program, source });
            }
        }
        // From here on the child is killed by Drop on every path.
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdin: pipe,
            logs,
        };
        match addr_rx.recv_timeout(timeout) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(_) => Err(ProcessError::NoAddress {
                program,
                timeout,
                logs: server.log_tail().join("\n"),
            }),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for tonic.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time it has used so far: with a call count, the server's CPU cost per
    /// call, which says what dominates when its throughput is low.
    pub fn cpu_time(&self) -> Result<Duration, ProcessError> {
        cpu_time(self.child.id())
    }

    /// Its last stderr lines (at most 20), for error reports.
    pub fn log_tail(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr` of a JSON log line that has one (tracing's JSON format with flattened fields, as
/// both services and the echo server log when they listen).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    json.get("addr")?.as_str()?.parse().ok()
}

/// User + system CPU time used so far by process `pid` (this process: `std::process::id()`),
/// from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration, ProcessError> {
    stat_cpu_time(&format!("/proc/{pid}/stat"), pid)
}

fn stat_cpu_time(path: &str, pid: u32) -> Result<Duration, ProcessError> {
    let error = |reason: String| ProcessError::Stat { pid, reason };
    let stat = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    let (_, after_name) = stat
        .rsplit_once(')')
        .ok_or_else(|| error("no ')' after the command name".to_owned()))?;
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name (1-based).
    let ticks = |index: usize| -> Result<u64, ProcessError> {
        fields
            .get(index)
            .ok_or_else(|| error("the line is too short".to_owned()))?
            .parse::<u64>()
            .map_err(|e| error(e.to_string()))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(total as f64 / USER_HZ))
}

/// While held, asks the kernel to keep every CPU out of idle states with an exit latency above
/// zero (a PM QoS request through `/dev/cpu_dma_latency`, what `cyclictest` and other latency
/// benchmarks do), so idle vCPUs poll instead of halting.
///
/// Why a benchmark would: on this machine (a Firecracker VM whose `haltpoll` idle driver runs
/// with `guest_halt_poll_ns=0`), a halted vCPU that receives a wake-up costs a few hundred
/// microseconds per hop, so a single loopback round trip between otherwise idle threads has a
/// median of ~0.5 ms whatever the server does, which hides sub-millisecond latencies. Busy
/// callers never see it (their threads do not halt). The request ends when this is dropped
/// (the file is closed). Needs root.
#[derive(Debug)]
pub struct IdlePoll {
    _file: std::fs::File,
}

impl IdlePoll {
    /// Where the kernel takes PM QoS CPU latency requests.
    pub const PATH: &'static str = "/dev/cpu_dma_latency";

    /// Requests a zero exit latency until the returned value is dropped.
    pub fn hold() -> std::io::Result<Self> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().write(true).open(Self::PATH)?;
        // The kernel reads a binary 32-bit integer (microseconds).
        file.write_all(&0i32.to_ne_bytes())?;
        Ok(Self { _file: file })
    }
}

/// Moves every thread of this process into the `SCHED_IDLE` scheduling class (threads started
/// later inherit it from the thread that starts them), and returns how many threads it found
/// (any that ended before `chrt` reached them included).
///
/// Why a benchmark would: when the load generator shares the server's cores, each wake-up of
/// the server (an incoming call, a refusal to send) may wait behind the load generator's time
/// slice, up to a few milliseconds, a delay the same load sent from another machine would not
/// cause. A `SCHED_IDLE` thread is preempted at once by any normal thread that wakes up, and
/// still gets every cycle the server leaves idle, which is nearly all of them here. The
/// server must then be started back in the normal class (children inherit the class, see
/// `overload::ServerSpec::normal_class`); a thread that sets itself `SCHED_FIFO` (the latency
/// probe) leaves it. Done with util-linux's `chrt` on each thread id (no unsafe code here).
pub fn idle_class_for_this_process() -> std::io::Result<usize> {
    let mut moved = std::collections::HashSet::new();
    // A thread not yet moved may start another meanwhile: scan until a pass finds none new.
    loop {
        let mut new = 0;
        for task in std::fs::read_dir("/proc/self/task")? {
            let tid = task?.file_name().to_string_lossy().into_owned();
            if moved.contains(&tid) {
                continue;
            }
            let chrt = std::process::Command::new("chrt")
                .args(["--idle", "--pid", "0", &tid])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .output()?;
            let gone = || !std::path::Path::new("/proc/self/task").join(&tid).exists();
            if !chrt.status.success() && !gone() {
                return Err(std::io::Error::other(format!(
                    "chrt --idle on thread {tid}: {}",
                    String::from_utf8_lossy(&chrt.stderr).trim()
                )));
            }
            // A thread that ended meanwhile (an idle blocking-pool thread) needs nothing.
            moved.insert(tid);
            new += 1;
        }
        if new == 0 {
            return Ok(moved.len());
        }
    }
}
