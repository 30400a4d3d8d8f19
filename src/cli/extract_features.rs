//! `ibot extract-features`'s options.

use std::path::PathBuf;

use clap::Args;

use super::{DistArgs, WeightsArgs};
use crate::eval::extract::FeatureConfig;

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct FeatureArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// An image folder (with or without class folders) or a folder of IDX files.
    #[arg(long)]
    pub data_path: PathBuf,
    /// IDX split to read (train or t10k); ignored for image folders.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// The safetensors file to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Concatenate the [CLS] tokens of the last n blocks (Swin: the average-pooled tokens of
    /// the last n blocks, over all stages).
    #[arg(long, default_value_t = 1)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both. ViT only (a Swin needs 0).
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
    /// Use at most this many images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Under torchrun / srun / `ibot launch`, every rank extracts a shard of the features.
    #[command(flatten)]
    pub dist: DistArgs,
}

impl FeatureArgs {
    pub fn into_config(self) -> FeatureConfig {
        FeatureConfig {
            weights: self.weights.config(),
            data_path: self.data_path,
            split: self.split,
            output: self.output,
            n_last_blocks: self.n_last_blocks,
            avgpool_patchtokens: self.avgpool_patchtokens,
            batch_size_per_gpu: self.batch_size_per_gpu,
            num_workers: self.num_workers,
            subset: self.subset,
            dist: self.dist.config(),
        }
    }
}

pub fn run(a: FeatureArgs) -> anyhow::Result<()> {
    crate::eval::extract::run(&a.into_config())
}
