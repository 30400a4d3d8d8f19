//! Learning-rate schedules of the fine-tuning recipes.

use anyhow::{ensure, Result};

/// BEiT's `utils.cosine_scheduler` as `run_class_finetuning.py` calls it, per iteration (the
/// official one, [`crate::schedule::cosine_scheduler`]; the script passes no
/// `start_warmup_value`: 0, so `--warmup_lr` plays no part there), with its `--warmup_steps`: BEiT's
/// `cosine_scheduler(..., warmup_steps)`, whose warm-up lasts `warmup_steps` iterations instead of
/// `warmup_epochs × niter_per_ep` when `warmup_steps > 0` (None or 0: the official -1), is built
/// only when `warmup_epochs > 0`, and is followed by the half cosine over the remaining
/// iterations. A warm-up step count with `warmup_epochs == 0` (where the official schedule comes
/// out short and fails its length assertion) or longer than training is an error.
pub fn per_iteration_cosine_steps(
    base: f64,
    final_: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
    warmup_steps: Option<usize>,
) -> Result<Vec<f64>> {
    let steps = match warmup_steps {
        Some(s) if s > 0 => s,
        _ => {
            return crate::schedule::cosine_scheduler(
                base,
                final_,
                epochs,
                niter_per_ep,
                warmup_epochs,
                start_warmup_value,
            )
        }
    };
    let total = epochs * niter_per_ep;
    ensure!(
        warmup_epochs > 0,
        "--warmup_steps {steps} needs --warmup_epochs > 0 (the official cosine_scheduler builds \
         no warm-up otherwise and fails its length check)"
    );
    ensure!(
        steps <= total,
        "--warmup_steps {steps} is longer than training ({total} iterations)"
    );
    Ok(crate::schedule::warmup_then_cosine(
        base,
        final_,
        total,
        steps,
        start_warmup_value,
    ))
}

/// timm's `CosineLRScheduler` (`create_scheduler` with `--sched cosine`, one cycle of
/// `t_initial = epochs`, stepped per epoch) at epoch value `t`: `warmup_lr + t·(base -
/// warmup_lr)/warmup_t` during the warm-up, then `min + (base - min)(1 + cos(π t / epochs))/2`
/// (t not shifted by the warm-up, timm's default `warmup_prefix=False`).
pub fn timm_cosine(
    base: f64,
    min_lr: f64,
    warmup_lr: f64,
    warmup_epochs: usize,
    epochs: usize,
    t: usize,
) -> f64 {
    if t < warmup_epochs {
        warmup_lr + t as f64 * (base - warmup_lr) / warmup_epochs as f64
    } else if t < epochs {
        min_lr
            + 0.5
                * (base - min_lr)
                * (1.0 + (std::f64::consts::PI * t as f64 / epochs as f64).cos())
    } else {
        min_lr
    }
}

/// The learning rate epoch `epoch` of eval_cls.py trains with: the scheduler is built at
/// `t = 0` and stepped with `lr_scheduler.step(epoch)` AFTER each epoch, so epoch 0 and epoch 1
/// both use the value at t = 0 and epoch e ≥ 1 the value at t = e - 1.
pub fn deit_epoch_lr(
    base: f64,
    min_lr: f64,
    warmup_lr: f64,
    warmup_epochs: usize,
    epochs: usize,
    epoch: usize,
) -> f64 {
    timm_cosine(
        base,
        min_lr,
        warmup_lr,
        warmup_epochs,
        epochs,
        epoch.saturating_sub(1),
    )
}
