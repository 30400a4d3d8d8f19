//! The weight options every evaluation command shares.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Arch, CheckpointKey};
use crate::device::DeviceChoice;
use crate::eval::weights::WeightsConfig;

/// Where the weights come from (shared by the evaluation commands).
#[derive(Args, Clone, Debug)]
#[command(rename_all = "snake_case")]
pub struct WeightsArgs {
    /// Weights to evaluate: an `ibot train` checkpoint, a backbone from `extract-backbone`, or an
    /// official .pth (full checkpoint.pth or backbone-only file).
    #[arg(long, alias = "checkpoint")]
    pub pretrained_weights: Option<PathBuf>,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, value_enum, default_value = "teacher")]
    pub checkpoint_key: CheckpointKey,
    /// Architecture (vit_tiny/small/base/large, swin_tiny/small/base/large); only needed when a
    /// ViT's width is not a standard one (a Swin's shape is read off its tensors). Checked
    /// against the weights: an --arch whose width or depth differs is an error.
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Number of attention heads, for weights of a width no standard ViT has (no tensor shape
    /// shows it); checked against the width and against --arch.
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Evaluation crop side, 1 to 4096 pixels and at least one patch (default: the resolution
    /// the position embedding was built for; Swin: the one the model was built for, 224 for
    /// official weights).
    #[arg(long)]
    pub crop_size: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl WeightsArgs {
    pub fn config(&self) -> WeightsConfig {
        WeightsConfig {
            pretrained_weights: self.pretrained_weights.clone(),
            checkpoint_key: self.checkpoint_key,
            arch: self.arch,
            num_heads: self.num_heads,
            crop_size: self.crop_size,
            device: self.device,
        }
    }
}
