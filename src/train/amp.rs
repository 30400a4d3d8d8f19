//! Mixed precision: libtorch's autocast (bfloat16 on CPUs, float16 on CUDA) and a loss scaler
//! with the behaviour of `torch.cuda.amp.GradScaler`.
//!
//! The official `--use_fp16` runs the forward passes and the loss under
//! `torch.cuda.amp.autocast()` and steps through a `GradScaler`. Here the same flag picks:
//! CUDA → float16 autocast with loss scaling; a CPU with AMX (bfloat16 tile matrix units) →
//! bfloat16 autocast, which needs no scaling and about halves a ViT step there; any other CPU →
//! float32. AVX512-BF16 alone is not enough: measured on such a Xeon (2 cores, no AMX), a
//! ViT-S/16 step under bfloat16 autocast took 1.5x its float32 time (the casts cost more than
//! the dot-product instructions save), and emulated bfloat16 is slower still.

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

extern "C" {
    fn ibot_autocast_enter(cuda: i32, half: i32) -> i32;
    fn ibot_autocast_exit(cuda: i32, previous: i32);
    fn ibot_autocast_is_enabled(cuda: i32) -> i32;
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
    /// What `--use_fp16` means on `device` (see the module documentation).
    pub fn for_device(use_fp16: bool, device: Device) -> Self {
        match (use_fp16, device) {
            (false, _) => Precision::Fp32,
            (true, Device::Cuda(_)) => Precision::Fp16,
            (true, _) if cpu_has_amx_bf16() => Precision::Bf16,
            (true, _) => Precision::Fp32,
        }
    }

    /// Why `auto` chose what it chose, for the start-up line.
    pub fn auto_reason(use_fp16: bool, device: Device) -> &'static str {
        match (use_fp16, device) {
            (false, _) => "--use_fp16 false",
            (true, Device::Cuda(_)) => "--use_fp16 on CUDA",
            (true, _) if cpu_has_amx_bf16() => "--use_fp16 on a CPU with AMX bfloat16 units",
            (true, _) if cpu_has_native_bf16() => {
                "--use_fp16, but this CPU has AVX512-BF16 without AMX, where bfloat16 autocast \
                 measured slower than float32; --precision bfloat16 forces it"
            }
            (true, _) => {
                "--use_fp16, but this CPU has no native bfloat16 arithmetic, where it would be \
                 slower than float32; --precision bfloat16 forces it"
            }
        }
    }

    /// The precision a run uses: `choice` when it names one, else what `--use_fp16` means on
    /// `device`. float16 needs CUDA (its loss scaling guards CUDA's float16 kernels; CPUs take
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
