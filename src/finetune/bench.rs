//! `ibot finetune --bench_steps N`: the time of a fine-tuning step on random images (data
//! loading excluded), comparable with bench/torch_finetune_step.py.

use std::time::Instant;

use anyhow::Result;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use super::{cls, run, FinetuneConfig};

/// Milliseconds per step, images per second and CPU milliseconds per step (this process, all
/// threads: on a shared machine the steadier number) over `steps` timed steps after `warmup`
/// untimed ones: forward with drop path, the criterion on Mixup targets, backward, clipping
/// when set, AdamW over the recipe's groups, EMA when on.
pub fn step(
    cfg: &FinetuneConfig,
    nb_classes: i64,
    steps: usize,
    warmup: usize,
) -> Result<(f64, f64, f64)> {
    let device = crate::device::select_device(&cfg.device)?;
    let (model, _) = run::build_model(cfg, nb_classes, device)?;
    let mut t = run::Trainer::new(model, cfg, device)?;
    let mut mcfg = cfg.mixup.clone();
    mcfg.num_classes = nb_classes as usize;
    let mixup = cls::Mixup::new(&mcfg)?;
    let s = cfg.aug.input_size as i64;
    let b = cfg.batch_size as i64;
    let x = Tensor::randn([b, 3, s, s], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(nb_classes, [b], (Kind::Int64, Device::Cpu));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut t0 = Instant::now();
    let mut c0 = crate::bench::process_cpu_seconds();
    for i in 0..warmup + steps {
        if i == warmup {
            t0 = Instant::now();
            c0 = crate::bench::process_cpu_seconds();
        }
        let (xm, ym) = mixup.apply(&x, &y, &mut rng)?;
        t.micro_step(&xm, &ym, cfg.lr, cfg.weight_decay)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu_ms = (crate::bench::process_cpu_seconds() - c0) * 1e3 / steps.max(1) as f64;
    let ms = dt * 1e3 / steps.max(1) as f64;
    Ok((ms, (b as f64 * steps as f64) / dt, cpu_ms))
}
