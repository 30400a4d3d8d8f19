//! `ibot eval-unsup`'s options.

use std::path::PathBuf;

use clap::Args;

use super::WeightsArgs;
use crate::eval::unsup::UnsupConfig;

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct UnsupArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// A folder with a val/ image folder, or IDX files (the t10k-* split is used). Other
    /// layouts: give --val_path.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// The images to evaluate, instead of <data_path>/val: an image folder, a folder of IDX
    /// files (t10k-* is read) or an IDX images file.
    #[arg(long)]
    pub val_path: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    /// Use at most this many images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Also write the metrics as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl UnsupArgs {
    pub fn into_config(self) -> UnsupConfig {
        UnsupConfig {
            weights: self.weights.config(),
            data_path: self.data_path,
            val_path: self.val_path,
            batch_size_per_gpu: self.batch_size_per_gpu,
            subset: self.subset,
            output: self.output,
        }
    }
}

pub fn run(a: UnsupArgs) -> anyhow::Result<()> {
    crate::eval::unsup::run(&a.into_config())
}
