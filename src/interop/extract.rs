//! `ibot extract-backbone`: the backbone weights of a checkpoint (ours or an official .pth) to
//! a safetensors file under the official names, like extract_backbone_weights.py.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::config::{Arch, CheckpointKey};

/// Options of `ibot extract-backbone`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtractConfig {
    /// The checkpoint to read.
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    pub checkpoint_key: CheckpointKey,
    pub arch: Option<Arch>,
    pub num_heads: Option<i64>,
    /// Names for timm's VisionTransformer (ViT only).
    pub timm: bool,
    /// Replace `output` when it exists (never the input file).
    pub force: bool,
}

/// Reads the weights and writes their backbone.
pub fn run(e: &ExtractConfig) -> Result<()> {
    if let (Ok(a), Ok(b)) = (e.input.canonicalize(), e.output.canonicalize()) {
        anyhow::ensure!(
            a != b,
            "the output {} is the input file: refusing to overwrite the checkpoint being read",
            e.output.display()
        );
    }
    anyhow::ensure!(
        e.force || std::fs::symlink_metadata(&e.output).is_err(),
        "{} already exists; pass --force to replace it",
        e.output.display()
    );
    let p = super::load_pretrained_with(
        &e.input,
        e.checkpoint_key.as_str(),
        e.arch.map(Arch::as_str),
        e.num_heads,
    )?;
    let n = super::export_backbone(&p, &e.output, e.timm)?;
    println!(
        "{n} backbone tensors of {} written to {}",
        p.description,
        e.output.display()
    );
    Ok(())
}
