//! SIGINT / SIGTERM during `ibot train`: the run stops between two iterations with a message
//! naming the checkpoint that holds the last finished epoch, and the process exits with
//! 128 + the signal number (130 / 143), as a shell reports a process killed by it.
//!
//! The handler only records the signal (all a handler may safely do); the training loop looks
//! at it between iterations ([`pending`]). A step can take long (seconds to minutes on a CPU),
//! so a watcher thread ends the process itself if the loop has not stopped within
//! [`GRACE`] (never in the middle of writing a checkpoint, which is atomic anyway). A second
//! signal ends the process at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long after the first signal the loop may take to reach the end of its step.
pub const GRACE: Duration = Duration::from_secs(10);

/// The first SIGINT/SIGTERM received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Where the run is, for the message: epoch, iteration, and whether a checkpoint is being
/// written (the watcher then waits for it).
static EPOCH: AtomicUsize = AtomicUsize::new(0);
static ITER: AtomicUsize = AtomicUsize::new(0);
static SAVING: AtomicBool = AtomicBool::new(false);
/// Rank 0 reports; the other ranks of a data-parallel run exit quietly.
static MAIN: AtomicBool = AtomicBool::new(true);
static OUTPUT_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) }
    }
}

/// The training run was stopped by a signal; `main` exits with [`Interrupted::exit_code`].
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

impl Interrupted {
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal).clamp(0, 255) as u8
    }
}

/// Installs the SIGINT / SIGTERM handlers and the watcher thread (once per process).
pub fn install() -> Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is valid; the handler only touches an atomic (or calls
        // _exit), both async-signal-safe. SA_RESTART keeps reads and writes from failing.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("installing the handler of signal {sig}"));
        }
    }
    std::thread::Builder::new()
        .name("ibot-signals".into())
        .spawn(watch)
        .context("starting the signal watcher")?;
    Ok(())
}

/// The signal received, if any.
pub fn pending() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Records where the run is (called by the training loop).
pub fn set_position(epoch: usize, iteration: usize) {
    EPOCH.store(epoch, Ordering::SeqCst);
    ITER.store(iteration, Ordering::SeqCst);
}

/// Records the run's output directory and whether this process reports.
pub fn set_run(output_dir: &Path, main: bool) {
    if let Ok(mut d) = OUTPUT_DIR.lock() {
        *d = Some(output_dir.to_path_buf());
    }
    MAIN.store(main, Ordering::SeqCst);
}

/// Marks a checkpoint being written: the watcher does not end the process meanwhile.
pub struct Saving;
impl Saving {
    pub fn begin() -> Self {
        SAVING.store(true, Ordering::SeqCst);
        Saving
    }
}
impl Drop for Saving {
    fn drop(&mut self) {
        SAVING.store(false, Ordering::SeqCst);
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The message for an interruption now: where the run was and which checkpoint holds the
/// last finished epoch (read from the file itself, not assumed).
pub fn message(sig: i32) -> String {
    let (epoch, it) = (EPOCH.load(Ordering::SeqCst), ITER.load(Ordering::SeqCst));
    let dir = OUTPUT_DIR.lock().ok().and_then(|d| d.clone());
    let kept = match dir {
        Some(dir) => {
            let ckpt = dir.join("checkpoint.safetensors");
            match super::checkpoint::read_meta(&ckpt) {
                Ok(m) if m.epoch > 0 => format!(
                    "the last finished epoch ({}) is in {}; rerun the same command to resume (from epoch {})",
                    m.epoch - 1,
                    ckpt.display(),
                    m.epoch
                ),
                Ok(_) => format!(
                    "{} holds no finished epoch; rerun the same command to start again",
                    ckpt.display()
                ),
                Err(_) if ckpt.exists() => format!(
                    "{} exists but is not readable; rerun the same command to see why",
                    ckpt.display()
                ),
                Err(_) => format!(
                    "no epoch had finished, so {} has no checkpoint; rerun the same command to start again",
                    dir.display()
                ),
            }
        }
        None => "training had not started".to_string(),
    };
    format!(
        "{} received: interrupted at epoch {epoch} iteration {it}; {kept}",
        signal_name(sig)
    )
}

/// The error the training loop returns when it sees a signal.
pub fn interrupted(sig: i32) -> anyhow::Error {
    anyhow::Error::new(Interrupted {
        signal: sig,
        message: if MAIN.load(Ordering::SeqCst) {
            message(sig)
        } else {
            String::new()
        },
    })
}

fn watch() {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let Some(sig) = pending() else { continue };
        let main = MAIN.load(Ordering::SeqCst);
        if main {
            let _ = writeln!(
                std::io::stderr(),
                "\n{}: stopping after the current step (send it again to stop at once)",
                signal_name(sig)
            );
        }
        let t0 = Instant::now();
        while t0.elapsed() < GRACE || SAVING.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The loop did not get to the end of its step in time: stop here. Checkpoints are
        // written atomically, so the last one is whole.
        if main {
            let _ = writeln!(std::io::stderr(), "{}", message(sig));
        }
        std::process::exit(128 + sig);
    }
}
