//! Safe wrappers over `csrc/fastops.cpp`: libtorch operators that tch does not expose, used
//! where they are measurably faster than composing tch calls (see the callers for the numbers).
//!
//! * [`onednn_linear`]: `x · wᵀ + b` in float32 on oneDNN, with its own autograd node
//!   ([`crate::models::layers::linear`] decides when);
//! * [`linear_gelu`]: `gelu(x · wᵀ + b)` fused in one oneDNN call, without gradient (the
//!   teacher's and feature extraction's MLPs, [`crate::models::layers::Linear::forward_gelu`]);
//! * [`fused_adamw`], [`fused_sgd`]: `torch.optim.AdamW(fused=True)` / `SGD(fused=True)` updates
//!   of many parameters in one call (one pass over each tensor instead of a chain of temporaries);
//! * [`foreach_ema`]: the teacher EMA as multi-tensor operations;
//! * [`mkl_picks_kernels_by_features`]: whether MKL's vendor check is answered by
//!   `csrc/fastops.cpp` (MKL then runs its AVX-512 kernels on AMD CPUs too).

use std::ffi::{c_char, c_int, CStr};

use anyhow::{anyhow, ensure, Result};
use tch::Tensor;

mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn ibot_fastops_free_error(s: *mut c_char);
        pub fn ibot_mkl_vendor_override_bound() -> c_int;
        pub fn ibot_onednn_linear(
            x: *mut c_void,
            w: *mut c_void,
            b: *mut c_void,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn ibot_linear_gelu(
            x: *mut c_void,
            w: *mut c_void,
            b: *mut c_void,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn ibot_grad_mode_enabled() -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn ibot_fused_adam(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            steps: *const *mut c_void,
            n: c_int,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            decoupled: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn ibot_fused_sgd(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            bufs: *const *mut c_void,
            n: c_int,
            weight_decay: f64,
            momentum: f64,
            lr: f64,
            nesterov: c_int,
            first_step: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ibot_foreach_ema(
            teacher: *const *mut c_void,
            student: *const *mut c_void,
            n: c_int,
            m: f64,
            err: *mut *mut c_char,
        ) -> c_int;
    }
}

/// The message of a failed call (and frees it).
fn take_error(err: *mut c_char, what: &str) -> anyhow::Error {
    if err.is_null() {
        return anyhow!("{what} failed");
    }
    // SAFETY: the shim returns a NUL-terminated string from strdup, freed once here.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::ibot_fastops_free_error(err) };
    anyhow!("{what}: {msg}")
}

/// Raw `at::Tensor*` of each tensor (shallow handles kept alive by the caller's slice).
fn ptrs(ts: &[Tensor]) -> Vec<*mut std::ffi::c_void> {
    ts.iter()
        .map(|t| t.as_ptr() as *mut std::ffi::c_void)
        .collect()
}

/// `x · wᵀ + b` over the last dimension of `x` with oneDNN's float32 inner product (CPU, float32
/// tensors); differentiable in `x`, `w` and `b`.
pub fn onednn_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_shim(ffi::ibot_onednn_linear, x, w, b, "oneDNN linear")
}

/// The signature of the shim's linear entry points.
type LinearShim = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    *mut std::ffi::c_void,
    *mut std::ffi::c_void,
    *mut *mut c_char,
) -> *mut std::ffi::c_void;

/// Calls a linear entry point of the shim on `x`, `w` and the optional `b`.
fn linear_shim(
    f: LinearShim,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    what: &str,
) -> Result<Tensor> {
    let mut err = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors; the shim returns a new at::Tensor* or null.
    let out = unsafe {
        f(
            x.as_ptr() as *mut _,
            w.as_ptr() as *mut _,
            b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut _),
            &mut err,
        )
    };
    if out.is_null() {
        return Err(take_error(err, what));
    }
    // SAFETY: `out` is a heap at::Tensor that tch takes ownership of.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// `gelu(x · wᵀ + b)` (exact erf GELU) as one oneDNN float32 inner product with the GELU
/// fused into its output (`mkldnn::_linear_pointwise`, CPU, float32); only with grad mode off
/// (it has no backward; an error otherwise). [`crate::models::layers::Linear::forward_gelu`]
/// decides when it pays.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_shim(ffi::ibot_linear_gelu, x, w, b, "fused linear + GELU")
}

/// Whether autograd records operations in this thread (libtorch's grad mode).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { ffi::ibot_grad_mode_enabled() != 0 }
}

fn check_rc(rc: c_int, err: *mut c_char, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(take_error(err, what))
    }
}

/// AdamW over `params` (in place, with their moments) as `torch._fused_adamw_`, or with
/// `decoupled` false Adam with L2 weight decay (`torch.optim.Adam(fused=True)`,
/// `torch._fused_adam_`: the decay is added to the gradient before the moments). `steps[i]` is
/// a float32 scalar with parameter i's step count including this step.
#[allow(clippy::too_many_arguments)]
pub fn fused_adam(
    decoupled: bool,
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    [lr, beta1, beta2, weight_decay, eps]: [f64; 5],
) -> Result<()> {
    let what = if decoupled {
        "fused AdamW"
    } else {
        "fused Adam"
    };
    let n = params.len();
    ensure!(
        [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
            .iter()
            .all(|&l| l == n),
        "{what} needs as many gradients, moments and steps as parameters"
    );
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(steps),
    );
    let mut err = std::ptr::null_mut();
    // SAFETY: n live tensors in each list.
    let rc = unsafe {
        ffi::ibot_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n as c_int,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            c_int::from(decoupled),
            &mut err,
        )
    };
    check_rc(rc, err, what)
}

/// SGD with momentum (dampening 0, coupled weight decay), Nesterov or not, as
/// `torch._fused_sgd_`; with `first_step` the buffers (any contents) are set to the decayed
/// gradients first.
#[allow(clippy::too_many_arguments)]
pub fn fused_sgd(
    nesterov: bool,
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    weight_decay: f64,
    momentum: f64,
    lr: f64,
    first_step: bool,
) -> Result<()> {
    let n = params.len();
    ensure!(
        grads.len() == n && bufs.len() == n,
        "fused SGD needs as many gradients and buffers as parameters"
    );
    if n == 0 {
        return Ok(());
    }
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(bufs));
    let mut err = std::ptr::null_mut();
    // SAFETY: n live tensors in each list.
    let rc = unsafe {
        ffi::ibot_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n as c_int,
            weight_decay,
            momentum,
            lr,
            c_int::from(nesterov),
            c_int::from(first_step),
            &mut err,
        )
    };
    check_rc(rc, err, "fused SGD")
}

/// `t = t·m + (1-m)·s` for every pair, in place, with the official per-tensor roundings.
pub fn foreach_ema(teacher: &[Tensor], student: &[Tensor], m: f64) -> Result<()> {
    ensure!(
        teacher.len() == student.len(),
        "EMA over {} teacher and {} student tensors",
        teacher.len(),
        student.len()
    );
    if teacher.is_empty() {
        return Ok(());
    }
    let (t, s) = (ptrs(teacher), ptrs(student));
    let mut err = std::ptr::null_mut();
    // SAFETY: equal numbers of live tensors.
    let rc =
        unsafe { ffi::ibot_foreach_ema(t.as_ptr(), s.as_ptr(), t.len() as c_int, m, &mut err) };
    check_rc(rc, err, "teacher EMA")
}

/// True when MKL's vendor question (`mkl_serv_intel_cpu_true`) is bound to the answer in
/// `csrc/fastops.cpp`, so that MKL picks its kernels by the CPU's features (AVX-512 on AMD
/// Zen 4/5 too) instead of taking its AVX2 path on every non-Intel CPU. False in a binary linked
/// without build.rs's `--export-dynamic-symbol`. `IBOT_MKL_VENDOR_CHECK=1` keeps MKL's own
/// answer (the binding stays; the answer is then libtorch's).
pub fn mkl_picks_kernels_by_features() -> bool {
    // SAFETY: a pure query of the dynamic linker.
    let bound = unsafe { ffi::ibot_mkl_vendor_override_bound() == 1 };
    bound && std::env::var("IBOT_MKL_VENDOR_CHECK").as_deref() != Ok("1")
}
