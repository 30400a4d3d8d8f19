//! The weights options shared by the analysis commands.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Args;
use tch::Device;

use crate::interop::Pretrained;
use crate::models::{Backbone, VisionTransformer};

/// Where the model comes from.
#[derive(Args, Clone, Debug)]
#[command(rename_all = "snake_case")]
pub struct ModelArgs {
    /// The weights: an `ibot train` checkpoint, a backbone from `extract-backbone`, or an
    /// official .pth (full checkpoint.pth or backbone-only file).
    #[arg(long, alias = "pretrained_path", alias = "checkpoint")]
    pub pretrained_weights: PathBuf,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Architecture; only needed when a ViT's width is not a standard one (checked against
    /// the weights).
    #[arg(long)]
    pub arch: Option<String>,
    /// Number of attention heads, for weights of a width no standard ViT has.
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Patch size; read off the weights, and checked when given (the official scripts need it).
    #[arg(long)]
    pub patch_size: Option<i64>,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    /// The weights, their backbone and the device.
    pub fn load(&self, what: &str) -> Result<(Pretrained, Backbone, Device)> {
        ensure!(
            ["teacher", "student"].contains(&self.checkpoint_key.as_str()),
            "--checkpoint_key must be teacher or student, not '{}'",
            self.checkpoint_key
        );
        let device = crate::device::select_device(&self.device)?;
        let p = crate::interop::load_pretrained_with(
            &self.pretrained_weights,
            &self.checkpoint_key,
            self.arch.as_deref(),
            self.num_heads,
        )?;
        eprintln!("weights: {}", p.description);
        if let Some(ps) = self.patch_size {
            ensure!(
                ps == p.config.patch_size(),
                "--patch_size {ps} does not match the weights' patch size {}",
                p.config.patch_size()
            );
        }
        let (_, backbone) = p.backbone_model(device)?;
        ensure!(
            backbone.as_vit().is_some(),
            "{what} needs a ViT: a Swin Transformer has no global [CLS] token and its patch \
             tokens are merged across stages"
        );
        Ok((p, backbone, device))
    }
}

/// The ViT of a loaded backbone (checked by [`ModelArgs::load`]).
pub fn vit(b: &Backbone) -> Result<&VisionTransformer> {
    b.as_vit().context("not a ViT")
}
