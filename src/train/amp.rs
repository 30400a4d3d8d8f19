//! Mixed precision: libtorch's autocast (bfloat16 on CPUs, float16 on CUDA) and a loss scaler
//! with the behaviour of `torch.cuda.amp.GradScaler`.
//!
//! The official `--use_fp16` runs the forward passes and the loss under
//! `torch.cuda.amp.autocast()` and steps through a `GradScaler`. Here the same flag picks:
//! CUDA → float16 autocast with loss scaling; a CPU with AMX (bfloat16 tile matrix units) →
//! bfloat16 autocast, which needs no scaling and about halves a ViT step there; a CPU with
//! AVX512-BF16 and no AMX → what a start-up probe measured to pay, cached per machine
//! ([`super::precision_probe`]): on such a Xeon (2 cores, products on MKL) a ViT-S/16 step
//! under bfloat16 autocast took 1.5x its float32 time, on a Zen 5 (products on oneDNN) 0.74x;
//! any other CPU → float32 (emulated bfloat16 is slower still).

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

extern "C" {
    fn ibot_autocast_enter(cuda: i32, half: i32) -> i32;
    fn ibot_autocast_exit(cuda: i32, previous: i32);
    fn ibot_autocast_is_enabled(cuda: i32) -> i32;
    fn ibot_torch_version() -> *const std::os::raw::c_char;
}

/// The arithmetic of the forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bfloat16 autocast (no loss scaling).
    Bf16,
    /// float16 autocast with loss scaling (CUDA).
    Fp16,
}

impl Precision {
    /// What `--use_fp16` means on `device` (see [`auto`]).
    pub fn for_device(use_fp16: bool, device: Device) -> Self {
        auto(use_fp16, device).0
    }

    /// The precision a run uses: `choice` when it names one, else what `--use_fp16` means on
    /// `device` ([`auto`], which may run the bfloat16 probe). float16 needs CUDA (its loss scaling guards CUDA's float16 kernels; CPUs take
    /// bfloat16).
    pub fn resolve(
        use_fp16: bool,
        choice: PrecisionChoice,
        device: Device,
    ) -> anyhow::Result<Self> {
        Ok(match choice {
            PrecisionChoice::Auto => Self::for_device(use_fp16, device),
            PrecisionChoice::Float32 => Precision::Fp32,
            PrecisionChoice::Bfloat16 => Precision::Bf16,
            PrecisionChoice::Float16 if device.is_cuda() => Precision::Fp16,
            PrecisionChoice::Float16 => anyhow::bail!(
                "--precision float16 needs a CUDA device (this run is on {device:?}); \
                 use --precision bfloat16 on a CPU"
            ),
        })
    }

    /// A small integer for collectives (see [`Precision::from_code`]).
    pub fn code(self) -> i64 {
        match self {
            Precision::Fp32 => 0,
            Precision::Bf16 => 1,
            Precision::Fp16 => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Precision::Fp32),
            1 => Some(Precision::Bf16),
            2 => Some(Precision::Fp16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "float32",
            Precision::Bf16 => "bfloat16 autocast",
            Precision::Fp16 => "float16 autocast with loss scaling",
        }
    }
}

/// `--precision`: `auto` follows `--use_fp16`; the others force one arithmetic, e.g. bfloat16
/// on a CPU without native support (emulated: slower, but the numerics of a bfloat16 machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    Auto,
    Float32,
    Bfloat16,
    Float16,
}

/// What `--use_fp16` with `--precision auto` means on `device`, and why (for the start-up
/// line): float32 without `--use_fp16`; float16 with loss scaling on CUDA; on a CPU with AMX,
/// bfloat16; on a CPU with AVX512-BF16 and no AMX, what the per-machine probe measured to pay
/// ([`super::precision_probe`], cached); on other CPUs float32 (emulated bfloat16 is slower).
/// `IBOT_PRECISION_PROBE` (`off`, `fp32`, `bf16`, `fresh`) overrides the probe.
pub fn auto(use_fp16: bool, device: Device) -> (Precision, String) {
    use super::precision_probe as probe;
    const FORCE: &str = "--precision float32|bfloat16 forces either";
    if !use_fp16 {
        return (Precision::Fp32, "--use_fp16 false".into());
    }
    if device.is_cuda() {
        return (Precision::Fp16, "--use_fp16 on CUDA".into());
    }
    let over = std::env::var(probe::ENV).unwrap_or_default();
    match over.as_str() {
        "fp32" | "float32" => {
            return (
                Precision::Fp32,
                format!(
                    "--use_fp16, and {}={over} answers for the probe",
                    probe::ENV
                ),
            )
        }
        "bf16" | "bfloat16" => {
            return (
                Precision::Bf16,
                format!(
                    "--use_fp16, and {}={over} answers for the probe",
                    probe::ENV
                ),
            )
        }
        _ => {}
    }
    if cpu_has_amx_bf16() {
        return (
            Precision::Bf16,
            format!("--use_fp16 on a CPU with AMX bfloat16 units; {FORCE}"),
        );
    }
    if !cpu_has_native_bf16() {
        return (
            Precision::Fp32,
            format!(
                "--use_fp16, but this CPU has no native bfloat16 arithmetic, where bfloat16 is \
                 slower than float32; {FORCE}"
            ),
        );
    }
    if over == "off" {
        return (
            Precision::Fp32,
            format!(
                "--use_fp16 on a CPU with AVX512-BF16 and no AMX, {}=off: no probe; {FORCE}",
                probe::ENV
            ),
        );
    }
    match probe::probe_this_machine(over == "fresh") {
        Ok(p) => (p.precision(), p.reason()),
        Err(e) => (
            Precision::Fp32,
            format!("--use_fp16, but the bfloat16 probe failed ({e:#}); {FORCE}"),
        ),
    }
}

/// The precision of a (possibly data-parallel) run and the reason for the start-up line: an
/// explicit `--precision` as given; with `--precision auto`, `stored` (the precision of the
/// checkpoint the run resumes from, when that run chose it with the same options) so that a
/// resumed run keeps its arithmetic; otherwise [`auto`] on rank 0 only (the probe runs once),
/// and every rank takes rank 0's answer.
pub fn decide_for_run(
    use_fp16: bool,
    choice: PrecisionChoice,
    device: Device,
    stored: Option<(Precision, std::path::PathBuf)>,
    comm: &dyn crate::dist::Comm,
) -> anyhow::Result<(Precision, String)> {
    use anyhow::Context;
    let (mut precision, mut reason) = if choice != PrecisionChoice::Auto {
        (
            Precision::resolve(use_fp16, choice, device)?,
            "--precision".to_string(),
        )
    } else if let Some((p, path)) =
        stored.filter(|(p, _)| *p != Precision::Fp16 || device.is_cuda())
    {
        (
            p,
            format!(
                "--precision auto resumes with the precision stored in {}; --precision \
                 float32|bfloat16 forces either",
                path.display()
            ),
        )
    } else if comm.is_main() {
        auto(use_fp16, device)
    } else {
        (Precision::Fp32, String::new())
    };
    if comm.world_size() > 1 {
        let codes = crate::dist::all_gather_i64(comm, &[precision.code()])?;
        let rank0 = Precision::from_code(codes[0])
            .with_context(|| format!("rank 0 sent precision code {}", codes[0]))?;
        if !comm.is_main() {
            reason = "rank 0's choice".into();
        }
        precision = rank0;
    }
    Ok((precision, reason))
}

/// The libtorch version the binary was built against (`TORCH_VERSION`, e.g. "2.13.0").
pub fn torch_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ibot_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16).
pub fn cpu_has_native_bf16() -> bool {
    cpu_flag(&["avx512_bf16", "amx_bf16"])
}

/// True when the CPU has AMX bfloat16 tile units (where bfloat16 autocast pays).
pub fn cpu_has_amx_bf16() -> bool {
    cpu_flag(&["amx_bf16"])
}

fn cpu_flag(names: &[&str]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| names.contains(&f)))
            })
            .unwrap_or(false)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = names;
        false
    }
}

/// Runs `f` with autocast on for `device` in `precision` (a plain call for float32). Autocast
/// state is per thread in libtorch, as is this scope; it is restored even if `f` panics.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    let half = match precision {
        Precision::Fp32 => return f(),
        Precision::Bf16 => 0,
        Precision::Fp16 => 1,
    };
    let cuda = i32::from(device.is_cuda());
    struct Exit(i32, i32);
    impl Drop for Exit {
        fn drop(&mut self) {
            // SAFETY: plain calls into libtorch's thread-local autocast state.
            unsafe { ibot_autocast_exit(self.0, self.1) }
        }
    }
    // SAFETY: as above; the returned previous state is handed back on exit.
    let _exit = Exit(cuda, unsafe { ibot_autocast_enter(cuda, half) });
    f()
}

/// Whether autocast is currently on for `device` on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: reads libtorch's thread-local autocast flag.
    unsafe { ibot_autocast_is_enabled(i32::from(device.is_cuda())) != 0 }
}

/// `torch.cuda.amp.GradScaler` with its defaults: the loss is multiplied by `scale` before the
/// backward pass; gradients are divided by it before clipping; a step whose gradients hold an
/// inf or NaN is skipped and halves the scale; 2000 clean steps in a row double it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Clean steps since the last change of scale.
    pub growth_tracker: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }
}

impl GradScaler {
    /// `scaler.scale(loss)`.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale
    }

    /// `scaler.unscale_(optimizer)`: divides every gradient by the scale (multiplying by the
    /// float32 reciprocal, as PyTorch does) and reports whether any is not finite.
    pub fn unscale(&self, grads: &mut [Option<Tensor>]) -> bool {
        let _g = tch::no_grad_guard();
        let inv = (1.0f32 / self.scale as f32) as f64;
        let mut found_inf = false;
        for g in grads.iter_mut().flatten() {
            let _ = g.g_mul_scalar_(inv);
            if !found_inf {
                found_inf = g.isfinite().logical_not().any().int64_value(&[]) != 0;
            }
        }
        found_inf
    }

    /// `scaler.update()` after a step that found (or not) non-finite gradients.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}
