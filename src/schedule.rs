//! Schedules of the official code, computed in f64 exactly as numpy / PyTorch do: the
//! per-iteration cosine schedules of training (learning rate, weight decay, teacher momentum),
//! the linear teacher-temperature warm-up of the loss, and the per-epoch `CosineAnnealingLR` of
//! the linear probe.

use anyhow::{ensure, Result};

/// `np.linspace(start, stop, num)` (endpoint included): `start + i·step`, last value = `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// The official `utils.cosine_scheduler`: one value per iteration, a linear warm-up from
/// `start_warmup_value` to `base` over `warmup_epochs`, then a half cosine from `base` to `final_`.
pub fn cosine_scheduler(
    base: f64,
    final_: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Result<Vec<f64>> {
    let total = epochs * niter_per_ep;
    let warmup_iters = warmup_epochs * niter_per_ep;
    ensure!(
        warmup_iters <= total,
        "warm-up ({warmup_epochs} epochs) is longer than training ({epochs} epochs)"
    );
    Ok(warmup_then_cosine(
        base,
        final_,
        total,
        warmup_iters,
        start_warmup_value,
    ))
}

/// `total` values: a linear warm-up from `start_warmup_value` to `base` over `warmup_iters`
/// (`np.linspace`, both ends included), then a half cosine from `base` towards `final_` over the
/// rest (the body of `utils.cosine_scheduler`, which BEiT's `--warmup_steps` variant shares).
pub fn warmup_then_cosine(
    base: f64,
    final_: f64,
    total: usize,
    warmup_iters: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let mut s = linspace(start_warmup_value, base, warmup_iters.min(total));
    let n = total - s.len();
    s.extend((0..n).map(|i| {
        let c = (std::f64::consts::PI * i as f64 / n as f64).cos();
        final_ + 0.5 * (base - final_) * (1.0 + c)
    }));
    s
}

/// PyTorch's `CosineAnnealingLR(T_max=epochs, eta_min=0)` after `epoch` scheduler steps (the
/// linear probe's per-epoch schedule, as the official eval_linear.py).
pub fn cosine_annealing_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    base * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos()) / 2.0
}
