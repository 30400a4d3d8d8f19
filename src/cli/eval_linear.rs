//! `ibot eval-linear`'s options.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Arch, CheckpointKey};
use crate::device::DeviceChoice;
use crate::eval::linear::LinearConfig;

/// Options of `ibot eval-linear` (names and defaults of the official `eval_linear.py`).
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct LinearArgs {
    /// Weights to evaluate: an `ibot train` checkpoint, an exported backbone, or an official
    /// .pth (full checkpoint or backbone only).
    #[arg(long, alias = "checkpoint")]
    pub pretrained_weights: PathBuf,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, value_enum, default_value = "teacher")]
    pub checkpoint_key: CheckpointKey,
    /// Architecture (vit_tiny/small/base/large, swin_tiny/small/base/large); only needed for
    /// non-standard ViT widths (checked against the weights).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Number of attention heads, for weights of a non-standard width.
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Folder with train/ and val/ image folders, or IDX files (train-* and t10k-*). Other
    /// layouts: give --train_path and --val_path.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// Training images, instead of <data_path>/train: an image folder, a folder of IDX files
    /// (train-* is read) or an IDX images file.
    #[arg(long)]
    pub train_path: Option<PathBuf>,
    /// Validation images, instead of <data_path>/val: an image folder, a folder of IDX files
    /// (t10k-* is read) or an IDX images file.
    #[arg(long)]
    pub val_path: Option<PathBuf>,
    /// Concatenate the [CLS] tokens of the last n blocks (official: 4 for ViT-S, 1 for ViT-B/L).
    /// Swin: the average-pooled tokens of the last n blocks, over all stages.
    #[arg(long, default_value_t = 4)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both (official choice for ViT-B/L).
    /// ViT only (a Swin needs 0).
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Learning rate for a batch of 256 (scaled linearly with the batch size).
    #[arg(long, default_value_t = 0.001)]
    pub lr: f64,
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
    /// Resume from this checkpoint, relative to --output_dir (default:
    /// <output_dir>/checkpoint_<key>_linear.safetensors when it exists).
    #[arg(long)]
    pub load_from: Option<PathBuf>,
    /// Crop side for training and validation views (default: the resolution the checkpoint
    /// was trained at, 224 for the official models).
    #[arg(long)]
    pub crop_size: Option<usize>,
    /// Use at most this many training and validation images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Not the official protocol: compute the features of the centre-cropped training images once
    /// and train on those (no augmentation; about `epochs` times faster on a CPU).
    #[arg(long)]
    pub precompute_features: bool,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Do not train: evaluate a trained classifier (--pretrained_linear, or the one stored in
    /// a file written by `ibot combine`) on the validation images (--val_path,
    /// <data_path>/val, or --data_path itself when it is an image folder of classes) and
    /// print top-1 / top-5, as the official validate_network.
    #[arg(long)]
    pub evaluate: bool,
    /// With --evaluate: a linear checkpoint (eval-linear's best_<key>_linear.safetensors, or
    /// an official checkpoint_<key>_linear.pth).
    #[arg(long)]
    pub pretrained_linear: Option<PathBuf>,
    /// With --evaluate: which classifier of an eval_linear_multi sweep (best_acc_hidx).
    #[arg(long)]
    pub head_index: Option<usize>,
}

impl LinearArgs {
    pub fn into_config(self) -> LinearConfig {
        LinearConfig {
            pretrained_weights: self.pretrained_weights,
            checkpoint_key: self.checkpoint_key,
            arch: self.arch,
            num_heads: self.num_heads,
            data_path: self.data_path,
            train_path: self.train_path,
            val_path: self.val_path,
            n_last_blocks: self.n_last_blocks,
            avgpool_patchtokens: self.avgpool_patchtokens,
            epochs: self.epochs,
            lr: self.lr,
            batch_size_per_gpu: self.batch_size_per_gpu,
            seed: self.seed,
            num_workers: self.num_workers,
            val_freq: self.val_freq,
            output_dir: self.output_dir,
            num_labels: self.num_labels,
            load_from: self.load_from,
            crop_size: self.crop_size,
            subset: self.subset,
            precompute_features: self.precompute_features,
            device: self.device,
        }
    }
}

pub fn run(a: LinearArgs) -> anyhow::Result<()> {
    if a.evaluate {
        return super::combine::evaluate(a);
    }
    crate::eval::linear::run_command(&a.into_config()).map(|_| ())
}
