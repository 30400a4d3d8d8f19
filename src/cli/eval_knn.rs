//! `ibot eval-knn`'s options.

use std::path::PathBuf;

use clap::{ArgAction, Args};

use super::{DistArgs, WeightsArgs};
use crate::eval::knn::KnnConfig;

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct KnnArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// A folder with train/ and val/ image folders, or IDX files (train-* and t10k-*). Other
    /// layouts: give --train_path and --val_path.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// The memory (training) images, instead of <data_path>/train: an image folder, a folder
    /// of IDX files (train-* is read) or an IDX images file.
    #[arg(long)]
    pub train_path: Option<PathBuf>,
    /// The query (validation) images, instead of <data_path>/val: an image folder, a folder of
    /// IDX files (t10k-* is read) or an IDX images file.
    #[arg(long)]
    pub val_path: Option<PathBuf>,
    /// Numbers of nearest neighbours k, each at least 1; a k above the number of training
    /// (memory) images is lowered to that number, with a note.
    #[arg(long, action = ArgAction::Set, num_args = 1.., default_values_t = vec![10, 20, 100, 200], allow_negative_numbers = true)]
    pub nb_knn: Vec<i64>,
    /// Temperature of the neighbours' votes, exp(cosine similarity / T); > 0.
    #[arg(long, default_value_t = 0.07, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Concatenate the [CLS] tokens of the last n blocks (official default 1).
    #[arg(long, default_value_t = 1)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the last block's patch tokens (without the final norm, as
    /// the official mean-pooling ViT); 2: both. The features are L2-normalised either way.
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    /// Use at most this many training / test images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Save the computed (L2-normalised) features and labels to this folder (knn_features.safetensors).
    #[arg(long)]
    pub dump_features: Option<PathBuf>,
    /// Reuse features saved by --dump_features from this folder instead of computing them.
    #[arg(long)]
    pub load_features: Option<PathBuf>,
    /// Also write the accuracies as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Under torchrun / srun / `ibot launch`, every rank extracts a shard of the features.
    #[command(flatten)]
    pub dist: DistArgs,
}

impl KnnArgs {
    pub fn into_config(self) -> KnnConfig {
        KnnConfig {
            weights: self.weights.config(),
            data_path: self.data_path,
            train_path: self.train_path,
            val_path: self.val_path,
            nb_knn: self.nb_knn,
            temperature: self.temperature,
            n_last_blocks: self.n_last_blocks,
            avgpool_patchtokens: self.avgpool_patchtokens,
            batch_size_per_gpu: self.batch_size_per_gpu,
            subset: self.subset,
            dump_features: self.dump_features,
            load_features: self.load_features,
            output: self.output,
            dist: self.dist.config(),
        }
    }
}

pub fn run(a: KnnArgs) -> anyhow::Result<()> {
    crate::eval::knn::run(&a.into_config())
}
