//! `ibot visualize-attention`'s options.

use std::path::PathBuf;

use clap::{ArgAction, Args};

use super::WeightsArgs;
use crate::analysis::visualize::AttentionConfig;

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct AttentionArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// The image to look at (any format the data loader reads), or a folder: every image in
    /// it (class sub-folders or flat), each into its own sub-folder id<i>_<name> of
    /// --output_dir.
    #[arg(long)]
    pub image_path: PathBuf,
    /// Resize to HEIGHT WIDTH (two numbers), or the shorter side to N keeping the aspect ratio
    /// (one number); the result is then cut to a multiple of the patch size.
    #[arg(long, action = ArgAction::Set, num_args = 1..=2, default_values_t = [480, 480])]
    pub image_size: Vec<usize>,
    /// Share of each head's attention mass whose patches are drawn over the image (0 to 1;
    /// 0 draws no masks).
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f64,
    /// Where the pictures go.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
}

impl AttentionArgs {
    pub fn into_config(self) -> AttentionConfig {
        AttentionConfig {
            weights: self.weights.config(),
            image_path: self.image_path,
            image_size: self.image_size,
            threshold: self.threshold,
            output_dir: self.output_dir,
        }
    }
}

pub fn run(a: AttentionArgs) -> anyhow::Result<()> {
    crate::analysis::visualize::run(&a.into_config())
}
