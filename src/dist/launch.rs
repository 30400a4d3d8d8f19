//! `ibot launch`: the built-in launcher for data-parallel training, a `torchrun` without Python.
//!
//! It starts `--nproc_per_node` copies of the running `ibot` executable on this machine, each
//! with the environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! ...), so the workers find each other through c10d's TCP store on `MASTER_ADDR:MASTER_PORT`.
//! Then it supervises them:
//!
//! - The worker with LOCAL_RANK 0 owns the terminal (its progress bar shows); the others' output
//!   is forwarded line by line with a `[rank R] ` prefix.
//! - When one worker fails, the others are asked to stop (SIGTERM), given `--grace_seconds`, then
//!   killed, and the launcher exits with the failing worker's code. A worker blocked in a
//!   collective would otherwise wait for its dead peer forever.
//! - SIGINT and SIGTERM sent to the launcher are forwarded to the workers, with the same grace
//!   period, and the launcher exits with 128 + the signal number, as a shell would report.
//! - On Linux, workers are killed by the kernel if the launcher itself dies (even by SIGKILL).
//!
//! Unix only: it signals processes by pid through `libc`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// `eprintln!` without its panic when stderr is gone: the launcher must go on supervising (and
/// cleaning up after) its workers even if nobody reads its messages.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr().lock(), $($arg)*);
    }};
}

/// How often the launcher looks at its workers and at pending signals.
const POLL: Duration = Duration::from_millis(50);

/// How long, once every worker is reaped, the launcher waits for the ends of their output. Only
/// a process started by a worker that outlives it can hold a pipe open that long.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Longest stretch of output without a line end that is buffered before being forwarded anyway.
const MAX_LINE: usize = 64 * 1024;

/// The end of `ibot launch --help`. Attached with `after_help` rather than written as the
/// struct's doc comment, which the doc comment of the subcommand in main.rs would replace.

/// What `ibot launch` starts: data-parallel workers of this executable, like `torchrun`
/// (its command-line options: [`crate::cli::launch::LaunchConfig`]).
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Worker processes to start on this node, typically one per GPU (torchrun's
    /// --nproc_per_node). Their LOCAL_RANK runs from 0 to nproc_per_node - 1.
    pub nproc_per_node: usize,
    /// Machines taking part (torchrun's --nnodes); each runs its own `ibot launch` with the same
    /// options but its own --node_rank. WORLD_SIZE = nnodes × nproc_per_node. E.g. two machines
    /// with 4 GPUs each: `--nnodes 2 --nproc_per_node 4` on both, 8 workers in all.
    pub nnodes: usize,
    /// Index of this machine among the --nnodes, from 0 (torchrun's --node_rank, GROUP_RANK).
    /// Its workers get RANK = node_rank × nproc_per_node + LOCAL_RANK; with 2 nodes of 4
    /// workers, node 0 runs ranks 0-3 and node 1 ranks 4-7.
    pub node_rank: usize,
    /// Address of the machine with --node_rank 0 (torchrun's --master_addr, MASTER_ADDR): the
    /// worker of rank 0 hosts the TCP store every worker meets at. Must be reachable from every
    /// node and given identically on all of them, e.g. `--master_addr 10.0.0.1` on both nodes.
    pub master_addr: String,
    /// Free TCP port on --master_addr for that store (torchrun's --master_port, MASTER_PORT);
    /// the same on every node. Two jobs on one master need different ports.
    pub master_port: u16,
    /// Seconds to wait for the other workers to exit after one failed or a signal arrived, before
    /// killing them.
    pub grace_seconds: u64,
    /// The ibot subcommand and its options, given to every worker as is, e.g. `train --data_path
    /// DATA --output_dir OUT`. Everything after the first word that is not a launch option
    /// belongs to it.
    pub command: Vec<String>,
}

/// Runs the workers to completion; returns the exit code the launcher should exit with (0 when
/// every worker succeeded).
pub fn launch(args: &LaunchConfig) -> Result<i32> {
    if args.command.first().map(String::as_str) == Some("launch") {
        bail!(
            "ibot launch: the command to run is `launch` itself; give the training command \
             directly, e.g. `ibot launch --nproc_per_node 2 train ...`"
        );
    }
    let program = std::env::current_exe().context("ibot launch: locating the ibot executable")?;
    run_workers(&program, &args.command, args)
}

/// The launcher proper: runs `program` with `command` as its arguments in every worker, with
/// the topology and timing of `args` (whose own `command` is ignored, so tests can run a shell).
///
/// Must be called from a thread that outlives the workers, since on Linux they are killed when
/// the thread that spawned them exits; it is, as it returns only once they are all reaped.
fn run_workers(program: &Path, command: &[String], args: &LaunchConfig) -> Result<i32> {
    let world_size = validate(command, args)?;
    let grace = Duration::from_secs(args.grace_seconds);
    let omp_threads = omp_num_threads(args.nproc_per_node);
    let first = args.node_rank * args.nproc_per_node;
    note!(
        "ibot launch: starting {} worker(s), ranks {}..={} of {}, rendezvous at {}:{}",
        args.nproc_per_node,
        first,
        first + args.nproc_per_node - 1,
        world_size,
        args.master_addr,
        args.master_port
    );

    // Declared before `workers` so it is dropped after them: a signal arriving while they are
    // being stopped still lands in our handler rather than killing the launcher.
    let _signals = SignalHandlers::install()?;
    // If anything below fails, dropping `workers` kills and reaps those already started.
    let mut workers = Workers::default();
    for local_rank in 0..args.nproc_per_node {
        let mut env = worker_env(args, local_rank);
        if let Some(n) = &omp_threads {
            env.push(("OMP_NUM_THREADS", n.clone()));
        }
        workers.spawn(program, command, &env, first + local_rank, local_rank == 0)?;
    }

    let code = loop {
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            note!(
                "ibot launch: received {}; forwarding it to the workers",
                signal_name(sig)
            );
            workers.shutdown(sig, grace);
            break 128 + sig;
        }
        if let Some((rank, status)) = workers.reap_exited()? {
            note!("ibot launch: rank {rank} {}", describe_failure(status));
            workers.shutdown(libc::SIGTERM, grace);
            break failure_code(status);
        }
        if workers.all_exited() {
            break 0;
        }
        thread::sleep(POLL);
    };
    workers.join_output();
    Ok(code)
}

/// Checks the topology and the command; returns WORLD_SIZE.
fn validate(command: &[String], args: &LaunchConfig) -> Result<usize> {
    ensure!(
        args.nproc_per_node >= 1,
        "ibot launch: --nproc_per_node must be at least 1"
    );
    ensure!(args.nnodes >= 1, "ibot launch: --nnodes must be at least 1");
    ensure!(
        args.node_rank < args.nnodes,
        "ibot launch: --node_rank {} is out of range for --nnodes {} (node ranks run from 0 to {})",
        args.node_rank,
        args.nnodes,
        args.nnodes - 1
    );
    ensure!(
        !args.master_addr.is_empty(),
        "ibot launch: --master_addr is empty"
    );
    ensure!(
        !command.is_empty(),
        "ibot launch: no command to run in the workers"
    );
    args.nproc_per_node
        .checked_mul(args.nnodes)
        .context("ibot launch: --nproc_per_node × --nnodes overflows")
}

/// The torchrun variables of the worker with `local_rank` on this node (all but
/// OMP_NUM_THREADS, which depends on the launcher's own environment).
fn worker_env(args: &LaunchConfig, local_rank: usize) -> Vec<(&'static str, String)> {
    let rank = args.node_rank * args.nproc_per_node + local_rank;
    let world_size = args.nproc_per_node * args.nnodes;
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world_size.to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string()),
        ("GROUP_RANK", args.node_rank.to_string()),
        ("GROUP_WORLD_SIZE", args.nnodes.to_string()),
        // One role ("default") holding every worker: role ranks are global ranks.
        ("ROLE_NAME", "default".to_string()),
        ("ROLE_RANK", rank.to_string()),
        ("ROLE_WORLD_SIZE", world_size.to_string()),
        ("MASTER_ADDR", args.master_addr.clone()),
        ("MASTER_PORT", args.master_port.to_string()),
        // No elastic restarts: code that checks these sees a first and only attempt.
        ("TORCHELASTIC_RESTART_COUNT", "0".to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".to_string()),
        ("IBOT_LAUNCHED", "1".to_string()),
    ]
}

/// Variables of the launcher's own environment (say, when it runs under torchrun) that would
/// mislead the workers. TORCHELASTIC_USE_AGENT_STORE=True tells rank 0 that a launcher already
/// hosts the TCP store; this one does not, so rank 0 must create it.
const INHERITED_ENV_DROPPED: &[&str] = &["TORCHELASTIC_USE_AGENT_STORE"];

/// OMP_NUM_THREADS for the workers, so that together they use each core once rather than each
/// starting a thread per core; `None` when the user has set it already (theirs wins).
fn omp_num_threads(nproc_per_node: usize) -> Option<String> {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / nproc_per_node.max(1)).max(1).to_string())
}

/// The launcher's exit code for a failed worker: its own code, or 128 + the signal that killed
/// it (the shell convention); never 0.
fn failure_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) if code != 0 => code,
        (_, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

fn describe_failure(status: ExitStatus) -> String {
    match status.signal() {
        Some(sig) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        None => format!("exited with code {}", failure_code(status)),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// Signals

/// The last SIGINT/SIGTERM received and not yet acted on (0: none). The handler may do nothing
/// but async-signal-safe work, so it only records the number; the polling loop acts on it.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// SIGINT and SIGTERM handlers for the launcher's lifetime; dropping restores the previous ones.
struct SignalHandlers {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalHandlers {
    fn install() -> Result<Self> {
        PENDING_SIGNAL.store(0, Ordering::SeqCst);
        // Built first so that a failure on the second signal restores the first.
        let mut handlers = SignalHandlers {
            previous: Vec::new(),
        };
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `sigaction` is a plain C struct for which all-zero is a valid value; the
            // handler only stores to an atomic, which is async-signal-safe. SA_RESTART keeps
            // the output threads' reads from failing with EINTR.
            let previous = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = record_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut previous) != 0 {
                    return Err(io::Error::last_os_error()).with_context(|| {
                        format!("ibot launch: installing the {} handler", signal_name(sig))
                    });
                }
                previous
            };
            handlers.previous.push((sig, previous));
        }
        Ok(handlers)
    }
}

impl Drop for SignalHandlers {
    fn drop(&mut self) {
        for (sig, previous) in self.previous.drain(..).rev() {
            // SAFETY: restores an action the kernel handed us for this very signal.
            unsafe {
                libc::sigaction(sig, &previous, std::ptr::null_mut());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workers

struct Worker {
    rank: usize,
    child: Child,
    /// Set once reaped; until then the pid cannot be reused, so signalling it is safe.
    status: Option<ExitStatus>,
}

impl Worker {
    fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid is still ours (the
            // child is not reaped yet); an error (it exited meanwhile) needs no handling.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }
}

/// The workers started so far and the threads forwarding their output. Dropping it kills and
/// reaps whatever still runs, so an error return never leaves workers behind.
#[derive(Default)]
struct Workers {
    list: Vec<Worker>,
    output: Vec<(usize, JoinHandle<()>)>,
}

impl Workers {
    /// Starts the worker of global `rank`. The first one on the node (`owns_terminal`) shares
    /// the launcher's stdin/stdout/stderr; the others read nothing and have their output piped
    /// to forwarding threads.
    fn spawn(
        &mut self,
        program: &Path,
        command: &[String],
        env: &[(&'static str, String)],
        rank: usize,
        owns_terminal: bool,
    ) -> Result<()> {
        let mut cmd = Command::new(program);
        cmd.args(command)
            .envs(env.iter().map(|(k, v)| (k, OsString::from(v))));
        for var in INHERITED_ENV_DROPPED {
            cmd.env_remove(var);
        }
        if !owns_terminal {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        die_with_launcher(&mut cmd);
        let mut child = cmd.spawn().with_context(|| {
            format!("ibot launch: starting rank {rank} ({})", program.display())
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // Recorded before the forwarding threads start, so that if starting one fails the
        // child is still killed and reaped by `drop`.
        self.list.push(Worker {
            rank,
            child,
            status: None,
        });
        if let Some(out) = stdout {
            self.forward(rank, out, Stream::Stdout)?;
        }
        if let Some(err) = stderr {
            self.forward(rank, err, Stream::Stderr)?;
        }
        Ok(())
    }

    fn forward(&mut self, rank: usize, src: impl Read + Send + 'static, to: Stream) -> Result<()> {
        let handle = thread::Builder::new()
            .name(format!("rank {rank} {to:?}"))
            .spawn(move || forward_output(src, rank, to))
            .with_context(|| format!("ibot launch: starting the output thread of rank {rank}"))?;
        self.output.push((rank, handle));
        Ok(())
    }

    /// Reaps the workers that exited since the last call; returns the first failure among them.
    fn reap_exited(&mut self) -> Result<Option<(usize, ExitStatus)>> {
        let mut failure = None;
        for w in self.list.iter_mut().filter(|w| w.status.is_none()) {
            let status = w
                .child
                .try_wait()
                .with_context(|| format!("ibot launch: checking on rank {}", w.rank))?;
            if let Some(status) = status {
                w.status = Some(status);
                if !status.success() && failure.is_none() {
                    failure = Some((w.rank, status));
                }
            }
        }
        Ok(failure)
    }

    fn all_exited(&self) -> bool {
        self.list.iter().all(|w| w.status.is_some())
    }

    /// Sends `sig` to every worker still running, waits up to `grace` for them to exit, then
    /// kills the rest. A further SIGINT/SIGTERM to the launcher meanwhile cuts the wait short,
    /// as a user pressing Ctrl-C twice means it.
    fn shutdown(&mut self, sig: libc::c_int, grace: Duration) {
        for w in &self.list {
            w.signal(sig);
        }
        let deadline = Instant::now() + grace;
        while !self.all_exited() && Instant::now() < deadline {
            if PENDING_SIGNAL.swap(0, Ordering::SeqCst) != 0 {
                note!("ibot launch: signal received while waiting; killing the workers now");
                break;
            }
            thread::sleep(POLL);
            // An error here means a worker cannot be waited for; `kill_and_reap` tries again.
            let _ = self.reap_exited();
        }
        for w in self.list.iter().filter(|w| w.status.is_none()) {
            note!("ibot launch: rank {} still running; killing it", w.rank);
        }
        self.kill_and_reap();
    }

    /// SIGKILLs and waits for every worker not yet reaped.
    fn kill_and_reap(&mut self) {
        for w in self.list.iter_mut().filter(|w| w.status.is_none()) {
            // Fails only when the child already exited, which `wait` then collects.
            let _ = w.child.kill();
            match w.child.wait() {
                Ok(status) => w.status = Some(status),
                Err(e) => note!("ibot launch: waiting for rank {}: {e}", w.rank),
            }
        }
    }

    /// Waits for the forwarding threads to pass on the last of the workers' output. They end
    /// when their pipe closes, which is when the worker exits, unless a process it started
    /// still holds the pipe: those are given up on after OUTPUT_DRAIN rather than waited for.
    fn join_output(&mut self) {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        while self.output.iter().any(|(_, h)| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        for (rank, handle) in self.output.drain(..) {
            if handle.is_finished() {
                // A panicking forwarder has lost some output already; nothing left to do.
                let _ = handle.join();
            } else {
                note!(
                    "ibot launch: the output of rank {rank} is still open after it exited \
                     (held by a process it started); no longer forwarding it"
                );
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.kill_and_reap();
        self.join_output();
    }
}

/// Asks the kernel to SIGKILL the worker when the launcher dies, so that killing the launcher
/// (even with SIGKILL, which it cannot catch) does not leave workers waiting on their peers.
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command) {
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are bare system calls, and
    // io::Error::last_os_error / from_raw_os_error only read errno or wrap an integer, with no
    // allocation and no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // If the launcher died before prctl, the death signal will never come: give up.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_cmd: &mut Command) {}

// ---------------------------------------------------------------------------------------------
// Output forwarding

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// Copies a worker's output to the launcher's stream of the same kind, one `[rank R] ` line at
/// a time, until the pipe closes.
fn forward_output(mut src: impl Read, rank: usize, to: Stream) {
    let prefix = format!("[rank {rank}] ");
    let mut lines = LineSplitter::default();
    let mut buf = [0u8; 8192];
    let emit = |line: &[u8]| write_line(to, &prefixed(&prefix, line));
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.push(&buf[..n], emit),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(emit);
}

/// `prefix` + `line` (as lossy UTF-8) + '\n', ready to be written in one go.
fn prefixed(prefix: &str, line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let mut out = Vec::with_capacity(prefix.len() + text.len() + 1);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
    out
}

/// Writes one whole line under the stream's lock, so lines of different workers never mix.
/// Errors (the launcher's own output closed, e.g. piped into `head`) are ignored: the pipe must
/// still be drained, or the worker would block writing to it.
fn write_line(to: Stream, line: &[u8]) {
    let _ = match to {
        Stream::Stdout => {
            let mut out = io::stdout().lock();
            out.write_all(line).and_then(|()| out.flush())
        }
        Stream::Stderr => {
            let mut err = io::stderr().lock();
            err.write_all(line).and_then(|()| err.flush())
        }
    };
}

/// Cuts a byte stream into lines at '\n' and at '\r': a progress bar redrawn with '\r' comes
/// out as one line per redraw instead of one endless line. "\r\n" counts as one line end, and
/// the empty pieces between consecutive '\r' are dropped.
#[derive(Default)]
struct LineSplitter {
    line: Vec<u8>,
    after_cr: bool,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' => self.emit(&mut emit),
                b'\r' => {
                    if !self.line.is_empty() {
                        self.emit(&mut emit);
                    }
                    self.after_cr = true;
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.emit(&mut emit);
                    }
                }
            }
        }
    }

    /// Emits a last line that had no line end.
    fn finish(mut self, mut emit: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            self.emit(&mut emit);
        }
    }

    fn emit(&mut self, emit: &mut impl FnMut(&[u8])) {
        emit(&self.line);
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// Tests that install signal handlers share the process-wide PENDING_SIGNAL and handlers,
    /// so they run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn args(
        nproc_per_node: usize,
        nnodes: usize,
        node_rank: usize,
        grace_seconds: u64,
    ) -> LaunchConfig {
        LaunchConfig {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr: "10.1.2.3".into(),
            master_port: 29511,
            grace_seconds,
            command: vec!["unused".into()],
        }
    }

    /// A fresh empty directory under the system temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ibot-launch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `sh -c SCRIPT DIR`: inside the script, `$0` is DIR.
    fn sh(script: &str, dir: &Path) -> Vec<String> {
        vec!["-c".into(), script.into(), dir.display().to_string()]
    }

    fn run_sh(script: &str, dir: &Path, a: &LaunchConfig) -> Result<i32> {
        run_workers(Path::new("/bin/sh"), &sh(script, dir), a)
    }

    fn is_alive(pid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    fn read_pids(dir: &Path, names: &[&str]) -> Vec<libc::pid_t> {
        names
            .iter()
            .map(|n| {
                std::fs::read_to_string(dir.join(n))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn all_succeed_with_torchrun_environment() {
        let _g = serial();
        let dir = temp_dir("env");
        let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $GROUP_WORLD_SIZE $ROLE_RANK $ROLE_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $IBOT_LAUNCHED $OMP_NUM_THREADS" > "$0/$LOCAL_RANK"; echo "hello from $RANK"; echo "to stderr" >&2"#;
        let a = args(3, 2, 1, 5);
        assert_eq!(run_sh(script, &dir, &a).unwrap(), 0);
        for local in 0..3 {
            let line = std::fs::read_to_string(dir.join(local.to_string())).unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            let rank = (3 + local).to_string();
            let local = local.to_string();
            assert_eq!(
                f[..11],
                [&*rank, "6", &*local, "3", "1", "2", &*rank, "6", "10.1.2.3", "29511", "1"],
                "{line}"
            );
            let omp: usize = f[11].parse().unwrap();
            assert!(omp >= 1);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failing_worker_stops_the_others() {
        let _g = serial();
        let dir = temp_dir("fail");
        // Rank 1 fails once the others are asleep; `exec` keeps their pid that of the sleeper.
        let script = r#"if [ "$LOCAL_RANK" = 1 ]; then
                while [ ! -f "$0/pid0" ] || [ ! -f "$0/pid2" ]; do sleep 0.05; done
                echo "rank 1 failing" >&2; exit 3
            fi
            echo $$ > "$0/tmp$LOCAL_RANK" && mv "$0/tmp$LOCAL_RANK" "$0/pid$LOCAL_RANK"
            exec sleep 100"#;
        let start = Instant::now();
        assert_eq!(run_sh(script, &dir, &args(3, 1, 0, 10)).unwrap(), 3);
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "took {:?}",
            start.elapsed()
        );
        for pid in read_pids(&dir, &["pid0", "pid2"]) {
            assert!(!is_alive(pid), "sleeper {pid} survived");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_killed_by_signal_gives_128_plus_signal() {
        let _g = serial();
        let dir = temp_dir("killed");
        let script = r#"if [ "$LOCAL_RANK" = 1 ]; then kill -KILL $$; fi; exec sleep 100"#;
        assert_eq!(
            run_sh(script, &dir, &args(2, 1, 0, 10)).unwrap(),
            128 + libc::SIGKILL
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn workers_ignoring_sigterm_are_killed_after_the_grace_period() {
        let _g = serial();
        let dir = temp_dir("grace");
        let script = r#"if [ "$LOCAL_RANK" = 1 ]; then
                while [ ! -f "$0/pid0" ]; do sleep 0.05; done; exit 5
            fi
            trap '' TERM
            echo $$ > "$0/tmp" && mv "$0/tmp" "$0/pid0"
            while :; do sleep 0.1; done"#;
        let start = Instant::now();
        assert_eq!(run_sh(script, &dir, &args(2, 1, 0, 1)).unwrap(), 5);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(8),
            "took {took:?}"
        );
        assert!(!is_alive(read_pids(&dir, &["pid0"])[0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signal_to_launcher_is_forwarded() {
        let _g = serial();
        let dir = temp_dir("signal");
        let script = r#"echo $$ > "$0/tmp$LOCAL_RANK" && mv "$0/tmp$LOCAL_RANK" "$0/pid$LOCAL_RANK"; exec sleep 100"#;
        // Signals the launcher once both workers run, i.e. while its handlers are in place. The
        // signal goes to this thread only, not to the process, so that no other test running in
        // parallel sees a system call interrupted.
        // SAFETY: pthread_self has no preconditions.
        let launcher = unsafe { libc::pthread_self() };
        let watched = dir.clone();
        let sender = thread::spawn(move || {
            while !(watched.join("pid0").exists() && watched.join("pid1").exists()) {
                thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: the target thread is alive: it runs the launcher until its workers exit,
            // which they do only on this signal.
            unsafe { libc::pthread_kill(launcher, libc::SIGTERM) };
        });
        let start = Instant::now();
        assert_eq!(
            run_sh(script, &dir, &args(2, 1, 0, 10)).unwrap(),
            128 + libc::SIGTERM
        );
        assert!(start.elapsed() < Duration::from_secs(8));
        sender.join().unwrap();
        for pid in read_pids(&dir, &["pid0", "pid1"]) {
            assert!(!is_alive(pid), "worker {pid} survived");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropping_workers_kills_and_reaps_them() {
        let _g = serial();
        let mut workers = Workers::default();
        let cmd = vec!["-c".to_string(), "exec sleep 100".to_string()];
        workers
            .spawn(Path::new("/bin/sh"), &cmd, &[], 0, false)
            .unwrap();
        let pid = workers.list[0].child.id() as libc::pid_t;
        assert!(is_alive(pid));
        drop(workers);
        assert!(!is_alive(pid));
    }

    #[test]
    fn spawn_failure_is_an_error() {
        let _g = serial();
        let err = run_workers(
            Path::new("/nonexistent/ibot"),
            &["train".into()],
            &args(2, 1, 0, 1),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("starting rank 0"), "{err:#}");
    }

    #[test]
    fn invalid_arguments_are_refused() {
        let cmd = ["train".to_string()];
        assert!(validate(&cmd, &args(0, 1, 0, 1)).is_err());
        assert!(validate(&cmd, &args(1, 0, 0, 1)).is_err());
        assert!(validate(&cmd, &args(1, 2, 2, 1)).is_err());
        assert!(validate(&[], &args(1, 1, 0, 1)).is_err());
        assert_eq!(validate(&cmd, &args(4, 2, 1, 1)).unwrap(), 8);
        let mut nested = args(1, 1, 0, 1);
        nested.command = vec!["launch".into(), "train".into()];
        let err = launch(&nested).unwrap_err();
        assert!(err.to_string().contains("`launch` itself"), "{err}");
    }

    #[test]
    fn omp_threads_divide_the_cores() {
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            let cores = thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(omp_num_threads(1), Some(cores.to_string()));
            assert_eq!(omp_num_threads(cores * 4), Some("1".to_string()));
        }
    }

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        s.finish(|l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn lines_split_at_newlines_and_carriage_returns() {
        assert_eq!(split(&[b"a\nb\n\nc"]), ["a", "b", "", "c"]);
        assert_eq!(
            split(&[b"10%\r20%\r", b"\r100%\r\n", b"done\n"]),
            ["10%", "20%", "100%", "done"]
        );
        assert_eq!(split(&[b"x\r", b"\ny\r\n"]), ["x", "y"]);
        assert_eq!(split(&[b"par", b"tial"]), ["partial"]);
        assert_eq!(split(&[&vec![b'z'; MAX_LINE + 1]]).len(), 2);
        assert_eq!(
            prefixed("[rank 3] ", b"hi \xff"),
            "[rank 3] hi \u{fffd}\n".as_bytes()
        );
    }
}
