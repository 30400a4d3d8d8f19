//! `ibot correspondence` (the official analysis/correspondence/visualize_correspondence.py).

use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgAction, Args, ValueEnum};

use super::model_args::{vit, ModelArgs};
use super::parse_bool;
use crate::analysis::correspondence::{self, CorrespondenceConfig, SampleType};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SampleTypeArg {
    /// Two images of the same class (needs class sub-folders).
    Class,
    /// Two augmented views of one image; also measures the matching accuracy.
    Instance,
}

/// Options, named as the official script's.
#[derive(Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct CorrespondenceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The images: an image folder (class sub-folders for --sample_type class).
    #[arg(long)]
    pub data_path: PathBuf,
    /// Images per batch; in class mode each image is paired with the next one of its batch.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Side of the square images (default: the resolution the model was built for).
    #[arg(long)]
    pub img_size: Option<usize>,
    /// Folder for the pictures and correspondence.json.
    #[arg(long, default_value = "pics/")]
    pub output_path: PathBuf,
    /// Matched pairs drawn per picture: the patches of the first image the [CLS] token attends
    /// to most.
    #[arg(long, default_value_t = 12)]
    pub topk: usize,
    /// Draw the pictures (true/false).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub show_pics: bool,
    /// Put the attention map (mean over heads) in front of the two images.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub show_with_attn: bool,
    /// Pictures drawn at most.
    #[arg(long, default_value_t = 100)]
    pub show_nums: usize,
    /// Pairs from the same class, or two views of one image (instance).
    #[arg(long, value_enum, default_value = "class")]
    pub sample_type: SampleTypeArg,
    /// Instance mode: a match is correct within this many patches (rows and columns) of the
    /// true one.
    #[arg(long, default_value_t = 0)]
    pub eval_radius: i64,
    /// Another model whose attention picks the patches drawn (the official script uses DINO's
    /// ViT-B/8 for that); default: the model analysed.
    #[arg(long)]
    pub attn_weights: Option<PathBuf>,
    /// Keep only mutual nearest neighbours (not in the official script).
    #[arg(long, default_value = "false", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub mutual: bool,
    /// Seed of the pairing order and of the augmentations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl CorrespondenceArgs {
    pub fn config(&self, model_img_size: usize) -> CorrespondenceConfig {
        CorrespondenceConfig {
            img_size: self.img_size.unwrap_or(model_img_size),
            topk: self.topk,
            show_pics: self.show_pics,
            show_with_attn: self.show_with_attn,
            show_nums: self.show_nums,
            sample_type: match self.sample_type {
                SampleTypeArg::Class => SampleType::Class,
                SampleTypeArg::Instance => SampleType::Instance,
            },
            eval_radius: self.eval_radius,
            batch_size: self.batch_size,
            output_path: self.output_path.clone(),
            mutual: self.mutual,
            seed: self.seed,
        }
    }
}

pub fn run(a: CorrespondenceArgs) -> Result<()> {
    let (p, backbone, device) = a.model.load("correspondence")?;
    let net = vit(&backbone)?;
    let attn_model = match &a.attn_weights {
        Some(w) => {
            let m = ModelArgs {
                pretrained_weights: w.clone(),
                arch: None,
                num_heads: None,
                patch_size: None,
                ..a.model.clone()
            };
            Some(m.load("the attention model")?.1)
        }
        None => None,
    };
    let attn_net = match &attn_model {
        Some(b) => vit(b)?,
        None => net,
    };
    let cfg = a.config(p.config.img_size() as usize);
    let ds = crate::data::dataset::open(&a.data_path, "train")?;
    let r = correspondence::run(&cfg, net, attn_net, ds.as_ref(), device)?;
    if let Some(acc) = r.accuracy {
        println!(
            "matching accuracy (eval_radius {}): {acc} (mean over {} batches)",
            cfg.eval_radius, r.batches_scored
        );
    }
    if cfg.show_pics {
        println!(
            "{} pictures and correspondence.json in {}",
            r.pairs.len(),
            cfg.output_path.display()
        );
    }
    Ok(())
}
