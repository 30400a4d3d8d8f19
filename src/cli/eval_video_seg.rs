//! `ibot eval-video-seg`: the official `eval_video_segmentation.py` (DAVIS-2017).

use std::path::PathBuf;

use anyhow::Result;

use crate::eval::video_seg::{self, PropagationConfig, VideoSegConfig};

/// Options of `ibot eval-video-seg` (names and defaults of eval_video_segmentation.py; the
/// weight options are the shared ones of the evaluation commands, --crop_size excepted).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct EvalVideoSegArgs {
    #[command(flatten)]
    pub weights: super::WeightsArgs,
    /// DAVIS-2017: ImageSets/2017/val.txt, JPEGImages/480p/<video>/, Annotations/480p/<video>/.
    #[arg(long)]
    pub data_path: PathBuf,
    /// Where <video>/<frame>.png segmentations go (palette PNGs for the DAVIS evaluator).
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Number of preceding frames used as context besides the first one.
    #[arg(long, default_value_t = 7)]
    pub n_last_frames: usize,
    /// Source patches considered for a target patch: at most this many patches away on each
    /// axis (0: all).
    #[arg(long, default_value_t = 12)]
    pub size_mask_neighborhood: i64,
    /// Labels accumulate from the top k affinities.
    #[arg(long, default_value_t = 5)]
    pub topk: i64,
}

impl EvalVideoSegArgs {
    pub fn config(&self) -> VideoSegConfig {
        VideoSegConfig {
            data_path: self.data_path.clone(),
            output_dir: self.output_dir.clone(),
            propagation: PropagationConfig {
                n_last_frames: self.n_last_frames,
                size_mask_neighborhood: self.size_mask_neighborhood,
                topk: self.topk,
            },
        }
    }
}

/// `ibot eval-video-seg`.
pub fn run(a: EvalVideoSegArgs) -> Result<()> {
    anyhow::ensure!(
        a.n_last_frames >= 1 && a.topk >= 1 && a.size_mask_neighborhood >= 0,
        "--n_last_frames and --topk must be at least 1, --size_mask_neighborhood at least 0"
    );
    let list = a.data_path.join("ImageSets/2017/val.txt");
    anyhow::ensure!(
        list.is_file(),
        "{} not found: DAVIS-2017 is laid out as ImageSets/2017/val.txt, JPEGImages/480p/<video>/ and Annotations/480p/<video>/",
        list.display()
    );
    let (_, backbone, _, device) = a.weights.config().open_backbone()?;
    let n = video_seg::run(&a.config(), &backbone, device)?;
    println!("{n} videos segmented into {}", a.output_dir.display());
    Ok(())
}
