//! `ibot combine` (the official analysis/combine_ckpt.py) and `eval-linear --evaluate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::eval::combine::{self, CombineConfig, EvaluateConfig};

/// Options, named as the official script's.
#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct CombineArgs {
    /// The backbone: any weights --pretrained_weights takes (the official script reads a
    /// released `{"state_dict": ...}` file).
    #[arg(long)]
    pub checkpoint_backbone: PathBuf,
    /// The linear classifier: eval-linear's best_<key>_linear.safetensors, or the official
    /// eval_linear(_multi).py checkpoint_<key>_linear.pth.
    #[arg(long)]
    pub checkpoint_linear: PathBuf,
    /// The combined safetensors file to write.
    #[arg(long)]
    pub output_file: PathBuf,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Which classifier of an eval_linear_multi sweep (the official best_acc_hidx).
    #[arg(long)]
    pub head_index: Option<usize>,
    /// Feature options the classifier was trained with (default: recorded in our linear
    /// checkpoints; else the official 4 and 0), checked against its width.
    #[arg(long)]
    pub n_last_blocks: Option<usize>,
    #[arg(long)]
    pub avgpool_patchtokens: Option<u8>,
    /// Replace --output_file when it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: CombineArgs) -> Result<()> {
    let cfg = CombineConfig {
        checkpoint_backbone: a.checkpoint_backbone,
        checkpoint_linear: a.checkpoint_linear,
        output_file: a.output_file,
        checkpoint_key: a.checkpoint_key,
        arch: a.arch,
        num_heads: a.num_heads,
        head_index: a.head_index,
        n_last_blocks: a.n_last_blocks,
        avgpool_patchtokens: a.avgpool_patchtokens,
        force: a.force,
    };
    let info = combine::combine(&cfg)?;
    println!(
        "saved {}the classifier{} ({} classes, {} features: --n_last_blocks {} --avgpool_patchtokens {}) with the backbone to {}",
        info.head_index.map(|i| format!("head {i} of the sweep, ")).unwrap_or_default(),
        info.best_acc.map(|a| format!(" with acc {a}")).unwrap_or_default(),
        info.num_labels,
        info.feature_dim,
        info.n_last_blocks.unwrap_or(4),
        info.avgpool_patchtokens.unwrap_or(0),
        cfg.output_file.display()
    );
    Ok(())
}

/// `eval-linear --evaluate`: the classifier of --pretrained_linear (or the one stored in a
/// combined --pretrained_weights) on the images, top-1 / top-5 printed as the official
/// validate_network.
pub fn evaluate(a: super::eval_linear::LinearArgs) -> Result<()> {
    let device = a.device.select()?;
    let cfg = EvaluateConfig {
        pretrained_weights: a.pretrained_weights.clone(),
        pretrained_linear: a.pretrained_linear.clone(),
        checkpoint_key: a.checkpoint_key.as_str().to_string(),
        arch: a.arch.map(|x| x.as_str().to_string()),
        num_heads: a.num_heads,
        data_path: a.data_path.clone(),
        val_path: a.val_path.clone(),
        n_last_blocks: Some(a.n_last_blocks),
        avgpool_patchtokens: Some(a.avgpool_patchtokens),
        head_index: a.head_index,
        batch_size: a.batch_size_per_gpu,
        num_workers: a.num_workers,
        crop_size: a.crop_size,
        subset: a.subset,
    };
    let r = combine::evaluate(&cfg, device)?;
    match r.acc5 {
        Some(a5) => println!("* Acc@1 {:.3} Acc@5 {a5:.3} loss {:.3}", r.acc1, r.loss),
        None => println!("* Acc@1 {:.3} loss {:.3}", r.acc1, r.loss),
    }
    println!(
        "Accuracy of the network on the {} test images: {:.1}%",
        r.images, r.acc1
    );
    Ok(())
}
