//! What `--use_fp16` (with `--precision auto`) means on a CPU with native bfloat16 arithmetic
//! (AVX512-BF16) but no AMX: measured, not assumed. Whether bfloat16 autocast pays there
//! depends on the CPU and on the library doing the products: on an AMD Zen 5, oneDNN's bfloat16
//! inner product runs in half the time of the float32 products (oneDNN's, or MKL's AVX-512
//! ones) and a ViT-S step under autocast took 0.74x its float32 time; on issue 14's Xeon
//! (AVX512-BF16, no AMX, products on MKL) the same step took 1.5x. So the first run on a machine times a representative piece of a training
//! step both ways and picks bfloat16 only when it takes at most [`THRESHOLD`] of the float32
//! time; the answer is cached per machine in `precision-probe.json`.
//!
//! The probe is a ViT-S MLP block (LayerNorm, 384 → 1536 → GELU → 384) on [`TOKENS`] tokens,
//! forward and backward (gradients of the input and of every parameter), in float32 through
//! [`crate::models::layers::linear`] (the path training takes) and under bfloat16 autocast (its
//! casts of the activations and weights, bfloat16 products forward and backward, float32
//! gradients of the float32 parameters: what autocast really costs). One warm-up each, then
//! [`REPS`] alternating repetitions; the medians are compared. About 0.3 s on one Zen 5 core.
//! It uses no random numbers (the inputs are a deterministic pattern), so probing or not does
//! not change a seeded run's random stream.
//!
//! The cache (`$IBOT_CACHE_DIR`, else `$XDG_CACHE_HOME/ibot`, else `~/.cache/ibot`) maps a key
//! (CPU model name, the relevant CPU flags, libtorch version, libtorch thread count, the float32
//! product library of `IBOT_CPU_GEMM` and whether MKL picks its kernels by CPU features) to the
//! two timings and the choice. An unreadable or
//! corrupt cache is ignored (re-probed and rewritten), an unwritable one only gives a note.
//!
//! `IBOT_PRECISION_PROBE` overrides the probe (for tests and for users who want no probe):
//! `off` keeps the behaviour without a probe (bfloat16 only with AMX, else float32), `fp32` /
//! `bf16` answer as if the probe had chosen that (on any CPU, AMX or not), `fresh` ignores the
//! cache entry and measures again (then caches the new answer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::amp::{autocast, Precision};

/// bfloat16 is chosen when its time is at most this fraction of float32's.
pub const THRESHOLD: f64 = 0.8;
/// Tokens of the probe's MLP block (a ViT-S/16 step has 2x197 + 10x37 = 764 per image).
pub const TOKENS: i64 = 1024;
/// Timed repetitions of each precision (after one warm-up each).
pub const REPS: usize = 5;
/// The cache file's name inside the cache directory.
pub const CACHE_FILE: &str = "precision-probe.json";
/// The environment variable that overrides the probe (see the module documentation).
pub const ENV: &str = "IBOT_PRECISION_PROBE";

/// The probe's two medians.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub float32_ms: f64,
    pub bfloat16_ms: f64,
}

impl Timings {
    /// bfloat16 time / float32 time.
    pub fn ratio(&self) -> f64 {
        self.bfloat16_ms / self.float32_ms
    }

    /// Plausible timings (finite, positive): anything else in a cache is ignored.
    pub fn valid(&self) -> bool {
        self.float32_ms.is_finite()
            && self.bfloat16_ms.is_finite()
            && self.float32_ms > 0.0
            && self.bfloat16_ms > 0.0
    }

    /// The decision: bfloat16 when it takes at most [`THRESHOLD`] of the float32 time.
    pub fn choice(&self) -> Precision {
        if self.valid() && self.ratio() <= THRESHOLD {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }
}

/// One machine's cached answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub timings: Timings,
    pub precision: Precision,
    /// Seconds since the Unix epoch when it was measured.
    pub measured_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    /// Keyed by [`machine_key`].
    entries: BTreeMap<String, Entry>,
}

/// Where the answer came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Read from this cache file.
    Cache(PathBuf),
    /// Measured now; `saved` says where it was cached, or why it was not.
    Measured {
        saved: std::result::Result<PathBuf, String>,
    },
}

/// The probe's answer for this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    pub timings: Timings,
    pub source: Source,
    /// Set when a cache file existed but could not be used (it was re-probed).
    pub cache_note: Option<String>,
}

impl Probed {
    pub fn precision(&self) -> Precision {
        self.timings.choice()
    }

    /// The start-up line's reason, e.g. "bfloat16 0.62x float32 in the start-up probe (...)".
    pub fn reason(&self) -> String {
        let t = &self.timings;
        let verdict = if self.precision() == Precision::Bf16 {
            format!("<= {THRESHOLD}x: bfloat16 pays")
        } else {
            format!("> {THRESHOLD}x: bfloat16 does not pay")
        };
        let source = match &self.source {
            Source::Cache(p) => format!("cached in {}", p.display()),
            Source::Measured { saved: Ok(p) } => format!("measured now, cached in {}", p.display()),
            Source::Measured { saved: Err(e) } => format!("measured now, not cached: {e}"),
        };
        let note = self
            .cache_note
            .as_ref()
            .map(|n| format!("; {n}"))
            .unwrap_or_default();
        format!(
            "--use_fp16 on a CPU with AVX512-BF16 and no AMX: a ViT-S MLP block forward + backward \
             took {:.1} ms in bfloat16 autocast vs {:.1} ms in float32 ({:.2}x, {verdict}; {source}{note}); \
             --precision float32|bfloat16 forces either",
            t.bfloat16_ms,
            t.float32_ms,
            t.ratio()
        )
    }
}

/// The cache directory: `$IBOT_CACHE_DIR`, else `$XDG_CACHE_HOME/ibot`, else `~/.cache/ibot`.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("IBOT_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ibot")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("ibot")))
}

/// The key of this machine's answer: CPU model name, the relevant CPU flags, libtorch version,
/// libtorch's thread count and the float32 product library.
pub fn machine_key() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    const RELEVANT: &[&str] = &[
        "avx2",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_tile",
    ];
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            RELEVANT
                .iter()
                .copied()
                .filter(|f| l.split_whitespace().any(|x| x == *f))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{model} | {} | libtorch {} | threads {} | float32 products {}",
        flags.join(" "),
        crate::train::amp::torch_version(),
        tch::get_num_threads(),
        crate::models::layers::CpuGemm::current().name()
    )
}

/// The cached entry for `key` in `file`: `Ok(None)` when there is no file or no entry, `Err`
/// when the file cannot be read or parsed or the entry is implausible.
fn read_entry(file: &Path, key: &str) -> Result<Option<Entry>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("unreadable"),
    };
    let cache: CacheFile = serde_json::from_str(&text).context("not a probe cache")?;
    match cache.entries.get(key) {
        None => Ok(None),
        Some(e) => {
            ensure!(
                e.timings.valid() && e.precision == e.timings.choice(),
                "implausible entry"
            );
            Ok(Some(e.clone()))
        }
    }
}

/// Adds `entry` under `key` to `file` (other machines' entries of a readable file are kept),
/// written atomically.
fn write_entry(file: &Path, key: &str, entry: Entry) -> Result<()> {
    let mut cache: CacheFile = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    cache.entries.insert(key.to_string(), entry);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::util::atomic_write(file, serde_json::to_string_pretty(&cache)?.as_bytes())
}

/// The answer for `key`: from `cache_file` when it holds a usable entry (and `fresh` is
/// false), else from `measure`, then cached there (a failure to cache is reported in the
/// answer, not an error). Only a failing `measure` is an error.
pub fn probe_cached(
    cache_file: Option<&Path>,
    key: &str,
    fresh: bool,
    measure: &mut dyn FnMut() -> Result<Timings>,
) -> Result<Probed> {
    let mut cache_note = None;
    if let (Some(f), false) = (cache_file, fresh) {
        match read_entry(f, key) {
            Ok(Some(e)) => {
                return Ok(Probed {
                    timings: e.timings,
                    source: Source::Cache(f.to_path_buf()),
                    cache_note: None,
                })
            }
            Ok(None) => {}
            Err(e) => cache_note = Some(format!("{} ignored ({e:#})", f.display())),
        }
    }
    let timings = measure()?;
    ensure!(timings.valid(), "the probe measured {timings:?}");
    let saved = match cache_file {
        None => Err("no cache directory (set IBOT_CACHE_DIR)".to_string()),
        Some(f) => {
            let entry = Entry {
                timings,
                precision: timings.choice(),
                measured_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            write_entry(f, key, entry)
                .map(|()| f.to_path_buf())
                .map_err(|e| format!("{e:#}"))
        }
    };
    Ok(Probed {
        timings,
        source: Source::Measured { saved },
        cache_note,
    })
}

/// This machine's answer through the default cache ([`cache_dir`]).
pub fn probe_this_machine(fresh: bool) -> Result<Probed> {
    let file = cache_dir().map(|d| d.join(CACHE_FILE));
    probe_cached(file.as_deref(), &machine_key(), fresh, &mut || {
        measure(TOKENS, REPS)
    })
}

/// Times the probe block (see the module documentation): medians of `reps` alternating
/// repetitions of each precision after one warm-up each.
pub fn measure(tokens: i64, reps: usize) -> Result<Timings> {
    let (dim, hidden) = (384i64, 1536i64);
    let opts = (Kind::Float, Device::Cpu);
    // A deterministic pattern in [-0.5, 0.5) (no random generator is touched).
    let pattern = |shape: &[i64], scale: f64| -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, opts) * 0.618_033_988_75).frac() - 0.5)
            .multiply_scalar(scale)
            .reshape(shape)
            .set_requires_grad(true)
    };
    let x = pattern(&[tokens, dim], 2.0);
    let ln_w = Tensor::ones([dim], opts).set_requires_grad(true);
    let ln_b = Tensor::zeros([dim], opts).set_requires_grad(true);
    let w1 = pattern(&[hidden, dim], 0.1);
    let b1 = pattern(&[hidden], 0.02);
    let w2 = pattern(&[dim, hidden], 0.05);
    let b2 = pattern(&[dim], 0.02);
    let g = pattern(&[tokens, dim], 1.0).detach();
    let inputs = [&x, &ln_w, &ln_b, &w1, &b1, &w2, &b2];
    let step = |p: Precision| -> Result<f64> {
        let t0 = Instant::now();
        let y = autocast(p, Device::Cpu, || {
            let h = x.layer_norm([dim], Some(&ln_w), Some(&ln_b), 1e-6, false);
            let h = crate::models::layers::linear(&h, &w1, Some(&b1)).gelu("none");
            crate::models::layers::linear(&h, &w2, Some(&b2))
        });
        let loss = (y.to_kind(Kind::Float) * &g).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[loss], &inputs, false, false)?;
        ensure!(grads.len() == inputs.len(), "missing gradients");
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    step(Precision::Fp32)?;
    step(Precision::Bf16)?;
    let (mut f, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        f.push(step(Precision::Fp32)?);
        b.push(step(Precision::Bf16)?);
    }
    Ok(Timings {
        float32_ms: median(&mut f),
        bfloat16_ms: median(&mut b),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
