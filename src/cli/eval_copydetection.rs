//! `ibot eval-copydetection`: the official `eval_copy_detection.py` (Copydays).

use std::path::PathBuf;

use anyhow::Result;

use super::common::{write_json, OpenBackbone};
use crate::eval::copydetection::{self, BlockResult, CopyConfig};

/// Options of `ibot eval-copydetection` (names and defaults of eval_copy_detection.py; the
/// weight options are the shared ones of the evaluation commands, --crop_size excepted).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct EvalCopydetectionArgs {
    #[command(flatten)]
    pub weights: super::WeightsArgs,
    /// Copydays: a folder with original/, strong/, jpegqual/<q>/ and crops/<c>/ of .jpg files.
    #[arg(long)]
    pub data_path: PathBuf,
    /// Images to learn the whitening from (the paper: 20k random YFCC100M images); skipped
    /// when the folder does not exist.
    #[arg(long)]
    pub whitening_path: Option<PathBuf>,
    /// Distractor images added to the database (the paper: 10k YFCC100M images); skipped when
    /// the folder does not exist.
    #[arg(long)]
    pub distractors_path: Option<PathBuf>,
    /// Images are resized to IMSIZE x IMSIZE (bicubic, aspect ratio not kept).
    #[arg(long, default_value_t = 224)]
    pub imsize: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size_per_gpu: usize,
    /// Threads decoding and resizing images.
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
    /// Also write the per-block mAP as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl EvalCopydetectionArgs {
    pub fn config(&self) -> CopyConfig {
        CopyConfig {
            data_path: self.data_path.clone(),
            whitening_path: self.whitening_path.clone(),
            distractors_path: self.distractors_path.clone(),
            imsize: self.imsize,
            batch_size_per_gpu: self.batch_size_per_gpu,
            num_workers: self.num_workers,
        }
    }

    pub fn run(&self, open: OpenBackbone) -> Result<Vec<BlockResult>> {
        anyhow::ensure!(
            self.imsize > 0 && self.batch_size_per_gpu > 0,
            "--imsize and --batch_size_per_gpu must be positive"
        );
        anyhow::ensure!(
            self.data_path.join("original").is_dir(),
            "{} is missing: Copydays is laid out as <data_path>/original, strong, jpegqual/<q>, crops/<c>",
            self.data_path.join("original").display()
        );
        let (backbone, _, device) = open()?;
        let r = copydetection::run(&self.config(), &backbone, device)?;
        if let Some(out) = &self.output {
            write_json(out, &serde_json::to_value(&r)?)?;
        }
        Ok(r)
    }
}

/// `ibot eval-copydetection`.
pub fn run(a: EvalCopydetectionArgs) -> Result<()> {
    a.run(super::common::opener(&a.weights)).map(|_| ())
}
