//! `ibot eval-retrieval`: the official `eval_image_retrieval.py` (revisited Oxford / Paris).

use std::path::PathBuf;

use anyhow::Result;

use super::common::{write_json, OpenBackbone};
use crate::eval::features::FeatureSpec;
use crate::eval::retrieval::{self, RetrievalConfig, RetrievalResult, KS};

/// Options of `ibot eval-retrieval` (names and defaults of eval_image_retrieval.py; the weight
/// options are the shared ones of the evaluation commands, --crop_size excepted: images keep
/// their aspect ratio, shrunk to fit --imsize).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct EvalRetrievalArgs {
    #[command(flatten)]
    pub weights: super::WeightsArgs,
    /// The folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/*.jpg (the revisitop
    /// layout).
    #[arg(long)]
    pub data_path: PathBuf,
    /// roxford5k or rparis6k.
    #[arg(long, default_value = "roxford5k")]
    pub dataset: String,
    /// Average the features of scales 1, 1/√2 and 1/2 (official default false).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub multiscale: bool,
    /// Shrink every image to fit IMSIZE x IMSIZE keeping its aspect ratio (Pillow's thumbnail,
    /// Lanczos); 0 keeps the images as they are.
    #[arg(long, default_value_t = 224)]
    pub imsize: usize,
    /// Crop each query to its ground-truth bounding box first, as the revisited protocol
    /// prescribes (the official script uses whole query images: false).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub query_bbox: bool,
    /// Concatenate the [CLS] tokens of the last n blocks.
    #[arg(long, default_value_t = 1)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both.
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    /// Threads decoding and resizing images.
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
    /// Write the numbers as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Save the L2-normalised database and query features (`train_features`,
    /// `query_features`) to this safetensors file.
    #[arg(long)]
    pub dump_features: Option<PathBuf>,
}

impl EvalRetrievalArgs {
    pub fn config(&self) -> RetrievalConfig {
        RetrievalConfig {
            data_path: self.data_path.clone(),
            dataset: self.dataset.clone(),
            spec: FeatureSpec {
                n_last_blocks: self.n_last_blocks,
                avgpool: self.avgpool_patchtokens,
            },
            multiscale: self.multiscale,
            imsize: (self.imsize > 0).then_some(self.imsize),
            query_bbox: self.query_bbox,
            num_workers: self.num_workers,
        }
    }

    /// Opens the backbone, evaluates, prints the official lines (mAP and mP@k, in percent).
    pub fn run(&self, open: OpenBackbone) -> Result<RetrievalResult> {
        let cfg = self.config();
        anyhow::ensure!(
            retrieval::DATASETS.contains(&cfg.dataset.as_str()),
            "--dataset must be one of {:?}, not '{}'",
            retrieval::DATASETS,
            cfg.dataset
        );
        // Check the data before loading any weights.
        retrieval::read_gnd(
            &cfg.data_path
                .join(&cfg.dataset)
                .join(format!("gnd_{}.pkl", cfg.dataset)),
        )?;
        let (backbone, _, device) = open()?;
        let (r, db, q) = retrieval::run(&cfg, &backbone, device)?;
        let pct = |v: f64| (v * 10000.0).round() / 100.0;
        let pcts = |v: &[f64]| v.iter().map(|&x| pct(x)).collect::<Vec<_>>();
        println!(
            ">> {}: mAP M: {}, H: {}",
            r.dataset,
            pct(r.medium.map),
            pct(r.hard.map)
        );
        println!(
            ">> {}: mP@k{:?} M: {:?}, H: {:?}",
            r.dataset,
            KS,
            pcts(&r.medium.mp_at_k),
            pcts(&r.hard.mp_at_k)
        );
        println!(
            ">> {}: mAP E: {}, mP@k{:?} E: {:?}",
            r.dataset,
            pct(r.easy.map),
            KS,
            pcts(&r.easy.mp_at_k)
        );
        if let Some(path) = &self.dump_features {
            crate::params::write_safetensors(
                path,
                &[
                    ("train_features".to_string(), db),
                    ("query_features".to_string(), q),
                ],
                None,
            )?;
        }
        if let Some(out) = &self.output {
            write_json(out, &serde_json::to_value(&r)?)?;
        }
        Ok(r)
    }
}

/// `ibot eval-retrieval`.
pub fn run(a: EvalRetrievalArgs) -> Result<()> {
    a.run(super::common::opener(&a.weights)).map(|_| ())
}
