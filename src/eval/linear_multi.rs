//! Many linear probes trained at once on the same frozen features, as the official
//! `eval_linear_multi.py`: one classifier per (lr, weight decay, optimiser) of the sweep, all fed
//! the same batches in one pass over the data (the backbone runs once per batch), each with its
//! own optimiser and `CosineAnnealingLR(epochs, eta_min=0)`; every classifier is validated and
//! the best top-1 accuracy is reported with its settings.
//!
//! The official sweep: learning rates `base x n` for base in 1e-4, 1e-3, 1e-2, 1e-1, 1 and n in
//! 1..=9 (45 values, each scaled by batch/256 like eval_linear.py's); with `--sweep_lr_only
//! true` (the default) weight decay 0 and SGD only, otherwise weight decay {0, 1e-6} x {SGD,
//! LARS}. Every classifier is one [`LinearProbe`] stepping exactly as `eval-linear` does, with
//! the data order, augmentation and validation of [`super::linear::run`].
//!
//! One deliberate difference: the official script draws each classifier's N(0, 0.01) weights
//! one after another from the seeded generator, so no two start alike; here every classifier
//! starts from the same draw, the one `eval-linear --seed S` makes. The sweep then compares
//! learning rates and nothing else, and classifier k is exactly `eval-linear --lr lrs[k]`
//! (`tests/protocols.rs` checks this).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::features::{view_batch, FeatureSpec};
use super::linear::{
    append_line, epoch_order, evaluate, probe_features, training_view_of, LinearProbe, Optim,
    ProbeData,
};
use crate::data::dataset::Dataset;
use crate::data::ops::Rgb8;
use crate::models::BackboneRef;
use crate::schedule::cosine_annealing_lr;

/// The official learning rates: `[base * n for base in 10**k, k in -4..=0, for n in 1..=9]`.
pub fn official_lrs() -> Vec<f64> {
    let mut v = Vec::with_capacity(45);
    for k in -4..=0 {
        let base = 10f64.powf(f64::from(k));
        for n in 1..=9 {
            v.push(base * f64::from(n));
        }
    }
    v
}

/// One classifier of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Learning rate for a batch of 256 (before the linear scaling).
    pub lr: f64,
    pub wd: f64,
    pub optim: Optim,
}

/// `itertools.product(lrs, wds, optims)`, the official order of the classifiers.
pub fn permutes(lrs: &[f64], wds: &[f64], optims: &[Optim]) -> Vec<Group> {
    let mut v = Vec::new();
    for &lr in lrs {
        for &wd in wds {
            for &optim in optims {
                v.push(Group { lr, wd, optim });
            }
        }
    }
    v
}

/// Settings of a sweep (see [`crate::cli::eval_linear_multi`] for their meaning).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiConfig {
    pub spec: FeatureSpec,
    pub groups: Vec<Group>,
    pub epochs: usize,
    pub batch_size_per_gpu: usize,
    pub seed: u64,
    pub num_workers: usize,
    pub val_freq: usize,
    pub output_dir: PathBuf,
    pub checkpoint_key: String,
    pub num_labels: Option<i64>,
    pub crop_size: Option<usize>,
    pub subset: Option<usize>,
    pub precompute_features: bool,
}

/// A classifier's last validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupResult {
    pub group: Group,
    pub acc1: f64,
    pub acc5: Option<f64>,
    pub loss: f64,
    /// Its best top-1 over all validations.
    pub best_acc1: f64,
}

/// Outcome of a sweep (also `<output_dir>/results_linear_multi_<key>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiResult {
    /// Highest top-1 of any classifier at any validation (the official `best_acc`).
    pub best_acc: f64,
    /// The classifier that reached it (the later one on ties, as the official `>=`).
    pub best_group: usize,
    pub best_epoch: usize,
    /// The same over the weight-decay-0 SGD classifiers only (`best_acc_sweep_lr_only`).
    pub best_acc_sweep_lr_only: f64,
    pub groups: Vec<GroupResult>,
    pub epochs: usize,
    pub feature_dim: i64,
    pub num_labels: i64,
}

/// The classifier with the highest top-1 in `accs`: the later one on ties (the official loop
/// keeps the last group with `acc >= best`).
pub fn argmax_later(accs: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &a) in accs.iter().enumerate() {
        if best.map_or(true, |b| a >= accs[b]) {
            best = Some(i);
        }
    }
    best
}

/// Trains every classifier of `cfg.groups` on `backbone`'s features of `train`, validating on
/// `val`.
pub fn run<'a>(
    cfg: &MultiConfig,
    backbone: impl Into<BackboneRef<'a>>,
    train: &dyn Dataset,
    val: &dyn Dataset,
    device: Device,
) -> Result<MultiResult> {
    let spec = cfg.spec;
    let backbone = backbone.into();
    spec.validate_for(backbone)?;
    ensure!(
        !cfg.groups.is_empty(),
        "no classifiers to train (empty --lrs?)"
    );
    for g in &cfg.groups {
        ensure!(
            g.lr > 0.0 && g.lr.is_finite() && g.wd >= 0.0 && g.wd.is_finite(),
            "learning rates must be positive and weight decays non-negative (got lr {}, wd {})",
            g.lr,
            g.wd
        );
    }
    ensure!(
        cfg.epochs > 0 && cfg.batch_size_per_gpu > 0 && cfg.val_freq > 0,
        "--epochs, --batch_size_per_gpu and --val_freq must be positive"
    );
    let ProbeData {
        train_idx,
        val_idx,
        num_labels,
        size,
    } = ProbeData::new(
        train,
        val,
        cfg.subset,
        cfg.num_labels,
        cfg.crop_size,
        backbone,
    )?;
    let dim = spec.dim_for(backbone);
    let feats_of = |x: &Tensor| spec.features_of(backbone, &x.to_device(device));
    crate::util::create_output_dir(&cfg.output_dir)?;

    // Every classifier starts from the draw `eval-linear --seed` makes (see the module notes).
    tch::manual_seed(cfg.seed as i64);
    let init = LinearProbe::new(dim, num_labels, device);
    let mut probes: Vec<LinearProbe> = cfg
        .groups
        .iter()
        .map(|_| LinearProbe::from_weights(init.weight.detach(), init.bias.detach()))
        .collect();

    let bs = cfg.batch_size_per_gpu;
    let eval_feats = |ds: &dyn Dataset, idx: &[usize], what: &str| {
        probe_features(ds, idx, size, bs, cfg.num_workers, &feats_of, device, what)
    };
    let (val_f, val_l) = eval_feats(val, &val_idx, "validation features")?;
    let cached_train = if cfg.precompute_features {
        Some(eval_feats(train, &train_idx, "training features")?)
    } else {
        None
    };

    let k = cfg.groups.len();
    let base_scale = bs as f64 / 256.0;
    let log_path = cfg.output_dir.join("log.txt");
    let mut last: Vec<(f64, Option<f64>, f64)> = vec![(0.0, None, 0.0); k];
    let mut best_each = vec![0.0f64; k];
    let (mut best_acc, mut best_group, mut best_epoch) = (0.0f64, 0usize, 0usize);
    let mut best_lr_only = 0.0f64;
    for epoch in 0..cfg.epochs {
        let lrs: Vec<f64> = cfg
            .groups
            .iter()
            .map(|g| cosine_annealing_lr(g.lr * base_scale, epoch, cfg.epochs))
            .collect();
        let order = epoch_order(&train_idx, cfg.seed, epoch);
        let bar = crate::util::progress_bar(
            order.len().div_ceil(bs) as u64,
            &format!("epoch {epoch} ({k} classifiers)"),
        );
        let mut loss_sum = vec![0.0f64; k];
        let mut steps = 0usize;
        for (b, chunk) in order.chunks(bs).enumerate() {
            let (feats, y) = match &cached_train {
                Some((f, l)) => {
                    let pos: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
                    let pos = Tensor::from_slice(&pos).to_device(device);
                    (f.index_select(0, &pos), l.index_select(0, &pos))
                }
                None => {
                    let seed = cfg.seed;
                    let view =
                        move |img: &Rgb8, i: usize| training_view_of(img, i, size, seed, epoch);
                    let (x, y) = view_batch(train, chunk, size, cfg.num_workers, &view)?;
                    (feats_of(&x)?, y.to_device(device))
                }
            };
            for (j, (probe, g)) in probes.iter_mut().zip(&cfg.groups).enumerate() {
                loss_sum[j] += probe
                    .train_step_with(&feats, &y, lrs[j], g.wd, g.optim)
                    .with_context(|| {
                        format!(
                            "epoch {epoch}, batch {b}, classifier {j} (lr {}, wd {}, {:?})",
                            g.lr, g.wd, g.optim
                        )
                    })?;
            }
            steps += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let mut log = serde_json::Map::new();
        for j in 0..k {
            log.insert(
                format!("train_loss{j}"),
                (loss_sum[j] / steps.max(1) as f64).into(),
            );
            log.insert(format!("train_lr{j}"), lrs[j].into());
        }
        log.insert("epoch".into(), epoch.into());
        if epoch % cfg.val_freq == 0 || epoch + 1 == cfg.epochs {
            let mut accs = Vec::with_capacity(k);
            for (j, probe) in probes.iter().enumerate() {
                let (acc1, acc5, vloss) = evaluate(probe, &val_f, &val_l, num_labels);
                last[j] = (acc1, acc5, vloss);
                best_each[j] = best_each[j].max(acc1);
                log.insert(format!("test_loss{j}"), vloss.into());
                log.insert(format!("test_acc{j}@1"), acc1.into());
                if let Some(a5) = acc5 {
                    log.insert(format!("test_acc{j}@5"), a5.into());
                }
                accs.push(acc1);
                // The official `group % (len(wds) * len(optims)) == 0`: the wd-0 SGD classifiers.
                if cfg.groups[j].wd == 0.0 && cfg.groups[j].optim == Optim::Sgd {
                    best_lr_only = best_lr_only.max(acc1);
                }
            }
            let hidx = argmax_later(&accs).unwrap_or(0);
            if accs[hidx] >= best_acc {
                (best_acc, best_group, best_epoch) = (accs[hidx], hidx, epoch);
                save_classifiers(cfg, &probes, best_group, epoch)?;
            }
            eprintln!(
                "epoch {epoch}: best of {k} classifiers now {:.2}% (lr {}, wd {}, {:?}); max so far {best_acc:.2}%, sweeping lr only {best_lr_only:.2}%",
                accs[hidx], cfg.groups[hidx].lr, cfg.groups[hidx].wd, cfg.groups[hidx].optim
            );
        }
        append_line(&log_path, &serde_json::Value::Object(log).to_string())?;
    }
    let res = MultiResult {
        best_acc,
        best_group,
        best_epoch,
        best_acc_sweep_lr_only: best_lr_only,
        groups: cfg
            .groups
            .iter()
            .zip(&last)
            .zip(&best_each)
            .map(|((g, l), b)| GroupResult {
                group: *g,
                acc1: l.0,
                acc5: l.1,
                loss: l.2,
                best_acc1: *b,
            })
            .collect(),
        epochs: cfg.epochs,
        feature_dim: dim,
        num_labels,
    };
    let out = cfg
        .output_dir
        .join(format!("results_linear_multi_{}.json", cfg.checkpoint_key));
    crate::util::atomic_write(&out, serde_json::to_string_pretty(&res)?.as_bytes())?;
    save_classifiers(cfg, &probes, usize::MAX, cfg.epochs)?;
    Ok(res)
}

/// `best_<key>_linear_multi.safetensors` (the best classifier as `linear.weight`/`linear.bias`,
/// with its settings in the metadata) when `best` is a group, else every classifier's final
/// weights in `checkpoint_<key>_linear_multi.safetensors` as `<k>.linear.weight` (the official
/// ModuleList's names without the DDP `module.`).
fn save_classifiers(
    cfg: &MultiConfig,
    probes: &[LinearProbe],
    best: usize,
    epoch: usize,
) -> Result<()> {
    let mut md = std::collections::HashMap::new();
    if let Some(p) = probes.get(best) {
        md.insert(
            "ibot_linear_multi".to_string(),
            serde_json::json!({"group": best, "settings": cfg.groups[best], "epoch": epoch + 1})
                .to_string(),
        );
        let named: Vec<(String, Tensor)> = p
            .state()
            .into_iter()
            .filter(|(n, _)| n.starts_with("linear."))
            .map(|(n, t)| (n, t.to_kind(Kind::Float)))
            .collect();
        let path = cfg.output_dir.join(format!(
            "best_{}_linear_multi.safetensors",
            cfg.checkpoint_key
        ));
        return crate::params::write_safetensors(&path, &named, Some(md));
    }
    md.insert(
        "ibot_linear_multi".to_string(),
        serde_json::json!({"groups": cfg.groups, "epoch": epoch}).to_string(),
    );
    let mut named = Vec::new();
    for (j, p) in probes.iter().enumerate() {
        for (n, t) in p.state() {
            if n.starts_with("linear.") {
                named.push((format!("{j}.{n}"), t));
            }
        }
    }
    let path = cfg.output_dir.join(format!(
        "checkpoint_{}_linear_multi.safetensors",
        cfg.checkpoint_key
    ));
    crate::params::write_safetensors(&path, &named, Some(md))
}
