//! `ibot video-generation` (the official analysis/attention_map/video_generation.py).

use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgAction, Args};

use super::model_args::{vit, ModelArgs};
use crate::analysis::video::{self, VideoConfig};

/// Options, named as the official script's.
#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct VideoArgs {
    /// The model (not needed with --video_only).
    #[arg(long, alias = "pretrained_path", alias = "checkpoint")]
    pub pretrained_weights: Option<PathBuf>,
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long)]
    pub num_heads: Option<i64>,
    #[arg(long)]
    pub patch_size: Option<i64>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A folder of frames (sorted by name); with --video_only, a folder of attention frames.
    #[arg(long)]
    pub input_path: PathBuf,
    /// Where attention/ and video.gif go.
    #[arg(long, default_value = "./")]
    pub output_path: PathBuf,
    /// Accepted as officially (the official script computes the masks but does not draw them).
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f64,
    /// Resize the frames: the shorter side to N (one number) or to HEIGHT WIDTH (two).
    #[arg(long, action = ArgAction::Set, num_args = 1..=2)]
    pub resize: Option<Vec<usize>>,
    /// Only turn the attention frames of --input_path into the animation.
    #[arg(long)]
    pub video_only: bool,
    /// Frames per second of the animation.
    #[arg(long, default_value_t = 30.0)]
    pub fps: f64,
    /// gif (the official mp4 and avi need a video codec, which ibot does not link).
    #[arg(long, default_value = "gif")]
    pub video_format: String,
}

pub fn run(a: VideoArgs) -> Result<()> {
    let cfg = VideoConfig {
        input_path: a.input_path.clone(),
        output_path: a.output_path.clone(),
        threshold: a.threshold,
        resize: a.resize.clone(),
        video_only: a.video_only,
        fps: a.fps,
        video_format: a.video_format.clone(),
    };
    let loaded = match (&a.pretrained_weights, a.video_only) {
        (_, true) => None,
        (Some(w), false) => Some(
            ModelArgs {
                pretrained_weights: w.clone(),
                checkpoint_key: a.checkpoint_key.clone(),
                arch: a.arch.clone(),
                num_heads: a.num_heads,
                patch_size: a.patch_size,
                device: a.device.clone(),
            }
            .load("video-generation")?,
        ),
        (None, false) => anyhow::bail!(
            "give --pretrained_weights (the model whose attention is drawn), or --video_only"
        ),
    };
    let (net, device) = match &loaded {
        Some((_, b, d)) => (Some(vit(b)?), *d),
        None => (None, tch::Device::Cpu),
    };
    let r = video::run(&cfg, net, device)?;
    println!("{} frames: {}", r.frames.len(), r.video.display());
    Ok(())
}
