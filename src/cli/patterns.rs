//! `ibot patterns` (the official analysis/extract_pattern/extract_topk_cluster.py).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::model_args::{vit, ModelArgs};
use crate::analysis::patterns::{self, PatternType, PatternsConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TypeArg {
    /// Every patch token is assigned to a prototype.
    Patch,
    /// The [CLS] token of every image is.
    Cls,
}

/// Options, named as the official script's (`--pretrained_path` is accepted for
/// `--pretrained_weights`, `--output_dir` for `--save_path`).
#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct PatternsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The images: an image folder (with or without class sub-folders).
    #[arg(long)]
    pub data_path: PathBuf,
    /// Folder for the grids, patterns_<type>.json and the resumable state.
    #[arg(long, alias = "output_dir")]
    pub save_path: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Side of the centre crop (default: the resolution the model was built for; the official
    /// script's 224). Images are first resized to img_size // 7 * 8.
    #[arg(long)]
    pub img_size: Option<usize>,
    /// Side, in patches, of the window drawn around each patch.
    #[arg(long, default_value_t = 5)]
    pub patch_window: usize,
    /// Tokens assigned to prototypes: patch or cls.
    #[arg(long = "type", value_enum, default_value = "patch")]
    pub pattern_type: TypeArg,
    /// Members drawn per prototype (the grid is ceil(sqrt(topk)) tiles square).
    #[arg(long, default_value_t = 196)]
    pub topk: usize,
    /// Grids drawn: the prototypes with the most members.
    #[arg(long, default_value_t = 100)]
    pub show_pics: usize,
    /// Parts the data set is processed in; the counts and top-k lists are saved after each,
    /// and a rerun resumes after the last saved part.
    #[arg(long, default_value_t = 16)]
    pub chunks: usize,
    /// Threads decoding and resizing images.
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
}

pub fn run(a: PatternsArgs) -> Result<()> {
    let (p, backbone, device) = a.model.load("patterns")?;
    let net = vit(&backbone)?;
    let (_, head) = p.head_model(device)?.with_context(|| {
        format!(
            "{} has no projection head (a backbone-only file?): patterns assigns tokens to the \
             head's prototypes, so it needs a full checkpoint (ibot train's, or the official \
             checkpoint.pth) with --checkpoint_key teacher or student",
            a.model.pretrained_weights.display()
        )
    })?;
    let ds = crate::data::dataset::open(&a.data_path, "train")?;
    let cfg = PatternsConfig {
        pattern_type: match a.pattern_type {
            TypeArg::Patch => PatternType::Patch,
            TypeArg::Cls => PatternType::Cls,
        },
        topk: a.topk,
        show_pics: a.show_pics,
        patch_window: a.patch_window,
        chunks: a.chunks,
        batch_size: a.batch_size,
        img_size: a.img_size.unwrap_or(p.config.img_size() as usize),
        save_path: a.save_path.clone(),
        num_workers: a.num_workers,
        fingerprint: format!(
            "{} ({}) on {}, img_size {:?}",
            a.model.pretrained_weights.display(),
            a.model.checkpoint_key,
            ds.describe(),
            a.img_size
        ),
    };
    let state = patterns::collect(&cfg, net, &head, ds.as_ref(), device)?;
    let shown = patterns::render(&cfg, &state, net.cfg.patch_size as usize, ds.as_ref())?;
    let used = state.counts.iter().filter(|&&c| c > 0).count();
    println!(
        "{used} of {} prototypes used; {} grids in {}",
        state.out_dim(),
        shown.len(),
        cfg.save_path.display()
    );
    Ok(())
}
