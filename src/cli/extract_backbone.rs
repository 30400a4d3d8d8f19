//! `ibot extract-backbone`'s options.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Arch, CheckpointKey};
use crate::interop::extract::ExtractConfig;

#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct ExtractArgs {
    /// The checkpoint to read (ours or an official .pth).
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, value_enum, default_value = "teacher")]
    pub checkpoint_key: CheckpointKey,
    /// Architecture, only needed when the width is not a standard one (checked against the
    /// weights).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Number of attention heads, for weights of a non-standard width.
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Names for timm's VisionTransformer (drops `masked_embed`, which timm does not have).
    /// ViT only: Swin backbones are written under the official iBOT names.
    #[arg(long)]
    pub timm: bool,
    /// Replace OUTPUT when it already exists (it may never be the input file).
    #[arg(long)]
    pub force: bool,
}

impl ExtractArgs {
    pub fn into_config(self) -> ExtractConfig {
        ExtractConfig {
            input: self.input,
            output: self.output,
            checkpoint_key: self.checkpoint_key,
            arch: self.arch,
            num_heads: self.num_heads,
            timm: self.timm,
            force: self.force,
        }
    }
}

pub fn run(a: ExtractArgs) -> anyhow::Result<()> {
    crate::interop::extract::run(&a.into_config())
}
