//! `ibot finetune --demo`: fine-tunes the model `ibot demo` pre-trained on Fashion-MNIST for a
//! short budget and prints its top-1 beside the same recipe from random initialisation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};

use crate::cli::finetune::FinetuneArgs;

/// Where the demo's data set lives (the Debian package `dataset-fashion-mnist`).
pub const DEMO_DATA: &str = "/usr/share/datasets/fashion-mnist";
/// The checkpoint `ibot demo` writes.
pub const DEMO_CHECKPOINT: &str = "runs/fmnist-demo/checkpoint.safetensors";

/// Options the demo sets unless given (the official recipe's heavy regularisation is made for
/// 100 epochs on ImageNet; in two short epochs it mostly hides what pre-training gave): 40-pixel
/// inputs (the official transform does not resize at 32 pixels or less, and Fashion-MNIST's
/// images are 28 pixels), 4,000 training and 4,000 test images, 2 epochs of batch 64 at lr 1e-3
/// without warm-up, layer decay 0.75, no Mixup/CutMix, no RandAugment (ColorJitter 0.4
/// instead), no random erasing.
pub fn demo_args(a: &FinetuneArgs) -> FinetuneArgs {
    let mut d = a.clone();
    d.input_size.get_or_insert(40);
    d.subset.get_or_insert(4_000);
    d.epochs.get_or_insert(2);
    d.batch_size.get_or_insert(64);
    if d.blr.is_none() {
        d.lr.get_or_insert(1e-3);
    }
    d.warmup_epochs.get_or_insert(0);
    d.layer_decay.get_or_insert(0.75);
    d.mixup.get_or_insert(0.0);
    d.cutmix.get_or_insert(0.0);
    d.reprob.get_or_insert(0.0);
    if a.aa == "rand-m9-mstd0.5-inc1" {
        d.aa = "none".into();
    }
    d.pretrained_weights
        .get_or_insert_with(|| PathBuf::from(DEMO_CHECKPOINT));
    if d.output_dir == std::path::Path::new("runs/finetune") {
        d.output_dir = PathBuf::from("runs/fmnist-finetune");
    }
    d.data_path.get_or_insert_with(|| PathBuf::from(DEMO_DATA));
    d.demo = false;
    d
}

/// Runs the demo: the same recipe twice, from the pre-trained weights and from scratch.
pub fn demo(a: &FinetuneArgs) -> Result<()> {
    let d = demo_args(a);
    let w = d.pretrained_weights.clone().unwrap_or_default();
    ensure!(
        w.is_file(),
        "{} not found: run `ibot demo` first (it pre-trains the model this demo fine-tunes), or \
         point --pretrained_weights at another checkpoint",
        w.display()
    );
    let base = d.output_dir.clone();
    let t0 = Instant::now();
    let mut pre = d.clone();
    pre.output_dir = base.join("pretrained");
    let mut cfg = pre.to_config()?;
    cfg.progress = true;
    eprintln!(
        "== fine-tuning the iBOT-pretrained ViT ({}) into {}",
        w.display(),
        cfg.output_dir.display()
    );
    let p = super::run(&cfg)?;
    let mut scratch = cfg.clone();
    scratch.output_dir = base.join("scratch");
    scratch.from_scratch = true;
    eprintln!(
        "== the same recipe from random initialisation into {}",
        scratch.output_dir.display()
    );
    let s = super::run(&scratch)?;
    let n = cfg.subset.unwrap_or(0);
    println!();
    println!(
        "Fashion-MNIST fine-tuning, {} epochs on {} training images, top-1 on {} test images ({:?} recipe):",
        cfg.epochs, n, n.min(10_000), cfg.recipe
    );
    let acc = |o: &super::FinetuneOutcome| o.last.map(|e| e.acc1).unwrap_or(f64::NAN);
    println!("  iBOT-pretrained ViT      {:6.2}%", acc(&p));
    println!("  same ViT from scratch    {:6.2}%", acc(&s));
    println!(
        "total time {:.0}s; logs and checkpoints in {}",
        t0.elapsed().as_secs_f64(),
        base.display()
    );
    Ok(())
}
