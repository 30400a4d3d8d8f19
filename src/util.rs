//! Small helpers shared by the rest of the crate.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// The checkpoint a run resumes from: `load_from` taken relative to `output_dir` (an absolute
/// path stays as is) and required to exist, else `default` when it exists, else none.
pub fn resume_path(
    output_dir: &Path,
    load_from: Option<&Path>,
    default: &Path,
) -> Result<Option<std::path::PathBuf>> {
    match load_from {
        Some(p) => {
            let p = output_dir.join(p);
            anyhow::ensure!(p.is_file(), "--load_from: {} does not exist", p.display());
            Ok(Some(p))
        }
        None => Ok(default.is_file().then(|| default.to_path_buf())),
    }
}

/// Checks, before any long work, that a result file can be written at `path` (the value of
/// `flag`): not a directory, and in a folder that exists. Otherwise the error came only after
/// the work, and named [`atomic_write`]'s temporary file instead of the flag.
pub fn check_output_file(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!(
            "{flag} {} is a directory; give a file name (e.g. {})",
            path.display(),
            path.join("result").display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "{flag} {}: the folder {} does not exist (create it first)",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Checks, before any long work, that the folder `dir` given to `flag` is not a file.
pub fn check_output_dir(dir: &Path, flag: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "{flag} {} is a file, not a folder: give a folder for the outputs",
            dir.display()
        );
    }
    Ok(())
}

/// Creates the `--output_dir` folder `dir` (and its parents). A file of that name gave "creating
/// DIR: File exists", which hid that the value names a file.
pub fn create_output_dir(dir: &Path) -> Result<()> {
    check_output_dir(dir, "--output_dir")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating --output_dir {}", dir.display()))
}

/// Writes `v` as pretty JSON to `path`, atomically (see [`atomic_write`]).
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    atomic_write(path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Writes `bytes` to `path` so that readers only ever see the old or the new complete file:
/// write to a temporary sibling, fsync it, rename over `path`, fsync the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Largest absolute value of a tensor, as f64 (0 for an empty tensor).
pub fn max_abs(t: &tch::Tensor) -> f64 {
    if t.numel() == 0 {
        return 0.0;
    }
    t.abs().max().to_kind(tch::Kind::Double).double_value(&[])
}

/// Keeps freed memory in the process instead of returning it to the OS after every step.
///
/// A training step allocates and frees tensors of ~100 MB (e.g. `[B·G, 196, 8192]` patch
/// logits). glibc serves those with fresh `mmap`s, so every step page-faults them in again;
/// on a 2-core CPU that costs about a quarter of a ViT-S/16 step. Serving them from the heap
/// and never trimming it removes that cost (measured with `ibot bench step`, see README). Left
/// alone when the user set any `MALLOC_*` tuning variable.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_")) {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}

/// Progress of `n` steps of `label` on stderr: an animated bar on a terminal; otherwise (a
/// log file, a pipe, a batch job) a plain line with the rate and the time left every
/// [`PLAIN_EVERY`] and at the end, so long evaluations never run silently.
pub fn progress_bar(n: u64, label: &str) -> Progress {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return Progress::plain(n, label);
    }
    let pb = indicatif::ProgressBar::new(n);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    Progress {
        bar: Some(pb),
        plain: None,
    }
}

/// How often the plain progress lines come.
pub const PLAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// See [`progress_bar`].
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Option<PlainProgress>,
}

struct PlainProgress {
    label: String,
    len: u64,
    pos: std::cell::Cell<u64>,
    start: std::time::Instant,
    last: std::cell::Cell<std::time::Instant>,
    msg: std::cell::RefCell<String>,
}

impl Progress {
    fn plain(n: u64, label: &str) -> Self {
        let now = std::time::Instant::now();
        Self {
            bar: None,
            plain: Some(PlainProgress {
                label: label.to_string(),
                len: n,
                pos: std::cell::Cell::new(0),
                start: now,
                last: std::cell::Cell::new(now),
                msg: std::cell::RefCell::new(String::new()),
            }),
        }
    }

    /// Shows nothing (e.g. on the ranks other than 0).
    pub fn hidden() -> Self {
        Self {
            bar: None,
            plain: None,
        }
    }

    pub fn inc(&self, k: u64) {
        if let Some(b) = &self.bar {
            b.inc(k);
        }
        if let Some(p) = &self.plain {
            p.pos.set(p.pos.get() + k);
            if p.last.get().elapsed() >= PLAIN_EVERY {
                p.last.set(std::time::Instant::now());
                p.line();
            }
        }
    }

    /// A short status after the counts (the bar's message; the plain lines' tail).
    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        if let Some(p) = &self.plain {
            p.msg.replace(msg);
        }
    }

    pub fn finish_and_clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(p) = &self.plain {
            // Only runs long enough to have said something get a closing line.
            if p.start.elapsed() >= PLAIN_EVERY {
                p.line();
            }
        }
    }
}

impl PlainProgress {
    fn line(&self) {
        let (pos, t) = (self.pos.get(), self.start.elapsed().as_secs_f64());
        let rate = pos as f64 / t.max(1e-9);
        let left = if rate > 0.0 && self.len >= pos {
            format!(", {:.0}s left", (self.len - pos) as f64 / rate)
        } else {
            String::new()
        };
        let msg = self.msg.borrow();
        eprintln!(
            "{}: {pos}/{} ({rate:.2}/s, {t:.0}s{left}){}{}",
            self.label,
            self.len,
            if msg.is_empty() { "" } else { " " },
            msg
        );
    }
}

static THREADS_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets libtorch's intra-op threads on the user's request (`--threads`); data-parallel ranks
/// then keep that number instead of sharing the cores among themselves.
pub fn set_threads_explicitly(n: i32) {
    THREADS_SET.store(true, std::sync::atomic::Ordering::Relaxed);
    tch::set_num_threads(n);
}

/// Whether [`set_threads_explicitly`] was called.
pub fn threads_set_explicitly() -> bool {
    THREADS_SET.load(std::sync::atomic::Ordering::Relaxed)
}

/// An exclusive advisory lock (`flock`) on `<dir>/.ibot.lock`, held while this value lives.
/// The OS releases it when the process ends in any way (even `kill -9`), so it never goes stale.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Name of the lock file [`lock_dir`] keeps in the directory.
pub const LOCK_FILE: &str = ".ibot.lock";

/// Takes [`DirLock`] on `dir` for this process (its pid is written into the lock file), or
/// fails with "another ibot run (pid N) is using DIR" when another process holds it. On a file
/// system without `flock` support the run goes on unlocked, with a warning.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    use std::io::{Read, Seek};
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = match text.trim() {
                "" => "unknown".to_string(),
                t => t.to_string(),
            };
            anyhow::bail!(
                "another ibot run (pid {pid}) is using {}; wait for it to finish or choose another --output_dir",
                dir.display()
            );
        }
        eprintln!(
            "warning: could not lock {} ({err}); nothing stops another run from using the same directory",
            path.display()
        );
        return Ok(DirLock { _file: file });
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(pid.as_bytes()))
        .and_then(|_| file.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(DirLock { _file: file })
}
