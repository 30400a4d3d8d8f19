//! `ibot eval-linear-multi`: the official `eval_linear_multi.py` learning-rate sweep.

use std::path::PathBuf;

use anyhow::Result;

use super::common::{open_splits, OpenBackbone};
use crate::eval::features::FeatureSpec;
use crate::eval::linear::Optim;
use crate::eval::linear_multi::{self, official_lrs, permutes, MultiConfig, MultiResult};

/// Options of `ibot eval-linear-multi` (names and defaults of eval_linear_multi.py; the weight
/// options are the shared ones of the evaluation commands).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct EvalLinearMultiArgs {
    #[command(flatten)]
    pub weights: super::WeightsArgs,
    /// Folder with train/ and val/ image folders, or IDX files train-* and t10k-*. Other
    /// layouts: --train_path and --val_path.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// Training images, instead of <data_path>/train.
    #[arg(long)]
    pub train_path: Option<PathBuf>,
    /// Validation images, instead of <data_path>/val.
    #[arg(long)]
    pub val_path: Option<PathBuf>,
    /// Learning rates for a batch of 256 (scaled by batch/256), one classifier each. Default:
    /// the official 45, 1e-4 x (1..9), 1e-3 x (1..9), ..., 1 x (1..9).
    #[arg(long, action = clap::ArgAction::Set, num_args = 1..)]
    pub lrs: Option<Vec<f64>>,
    /// true (official default): weight decay 0 and SGD only; false: every learning rate also
    /// with weight decay 1e-6 and with the LARS optimiser (4 classifiers per learning rate).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sweep_lr_only: bool,
    /// Concatenate the [CLS] tokens of the last n blocks (official: 4 for ViT-S, 1 for ViT-B/L).
    #[arg(long, default_value_t = 4)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both (official choice for ViT-B/L).
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads decoding and augmenting images.
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
    /// Validate every this many epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    pub val_freq: usize,
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Number of classes (default: read from the data set).
    #[arg(long)]
    pub num_labels: Option<i64>,
    /// Use at most this many training and validation images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Not the official protocol: train on centre-crop features computed once (no
    /// augmentation; about `epochs` times faster on a CPU).
    #[arg(long)]
    pub precompute_features: bool,
}

impl EvalLinearMultiArgs {
    /// The sweep's settings; `crop` is the resolved evaluation crop side.
    pub fn config(&self, checkpoint_key: &str, crop: Option<usize>) -> MultiConfig {
        let lrs = self.lrs.clone().unwrap_or_else(official_lrs);
        let (wds, optims) = if self.sweep_lr_only {
            (vec![0.0], vec![Optim::Sgd])
        } else {
            (vec![0.0, 1e-6], vec![Optim::Sgd, Optim::Lars])
        };
        MultiConfig {
            spec: FeatureSpec {
                n_last_blocks: self.n_last_blocks,
                avgpool: self.avgpool_patchtokens,
            },
            groups: permutes(&lrs, &wds, &optims),
            epochs: self.epochs,
            batch_size_per_gpu: self.batch_size_per_gpu,
            seed: self.seed,
            num_workers: self.num_workers,
            val_freq: self.val_freq,
            output_dir: self.output_dir.clone(),
            checkpoint_key: checkpoint_key.to_string(),
            num_labels: self.num_labels,
            crop_size: crop,
            subset: self.subset,
            precompute_features: self.precompute_features,
        }
    }

    /// Opens the backbone and the data, runs the sweep and prints the official summary.
    pub fn run(&self, checkpoint_key: &str, open: OpenBackbone) -> Result<MultiResult> {
        if let Some(lrs) = &self.lrs {
            anyhow::ensure!(!lrs.is_empty(), "--lrs needs at least one value");
        }
        let (backbone, size, device) = open()?;
        let (train, val) = open_splits(
            self.data_path.as_deref(),
            self.train_path.as_deref(),
            self.val_path.as_deref(),
        )?;
        crate::eval::warn_upsampling(train.as_ref(), size, false);
        let cfg = self.config(checkpoint_key, Some(size));
        eprintln!(
            "data: {} training ({}), {} validation images; {} classifiers",
            train.len(),
            train.describe(),
            val.len(),
            cfg.groups.len()
        );
        let r = linear_multi::run(&cfg, &backbone, train.as_ref(), val.as_ref(), device)?;
        let g = cfg.groups[r.best_group];
        println!(
            "Training of the supervised linear classifier on frozen features completed.\n \
             Top-1 test accuracy: {:.1}\n Top-1 test accuracy with sweeping lr only: {:.1}\n \
             Optim configs with top-1 test accuracy: lr {:.5}, wd {}, optim {}",
            r.best_acc,
            r.best_acc_sweep_lr_only,
            g.lr,
            python_exp(g.wd),
            match g.optim {
                Optim::Sgd => "sgd",
                Optim::Lars => "lars",
            }
        );
        Ok(r)
    }
}

/// `ibot eval-linear-multi`.
pub fn run(a: EvalLinearMultiArgs) -> Result<()> {
    a.run(
        a.weights.checkpoint_key.as_str(),
        super::common::opener(&a.weights),
    )
    .map(|_| ())
}

/// Python's `f"{x:.0e}"` (`0e+00`, `1e-06`), as the official summary prints the weight decay.
fn python_exp(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x:.0}e+00");
    }
    let mut e = x.abs().log10().floor() as i32;
    let mut m = (x / 10f64.powi(e)).round();
    if m.abs() >= 10.0 {
        m /= 10.0;
        e += 1;
    }
    format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_exp_formats_like_python() {
        assert_eq!(super::python_exp(0.0), "0e+00");
        assert_eq!(super::python_exp(1e-6), "1e-06");
        assert_eq!(super::python_exp(0.96), "1e+00");
    }
}
