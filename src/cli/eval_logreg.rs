//! `ibot eval-logreg`: the official `eval_logistic_regression.py`.

use std::path::PathBuf;

use anyhow::Result;

use super::common::{open_splits, train_test_features, write_json, OpenBackbone};
use crate::eval::features::FeatureSpec;
use crate::eval::logreg::{self, LbfgsOptions, LogregConfig};

/// Options of `ibot eval-logreg` (names and defaults of eval_logistic_regression.py; the weight
/// options are the shared ones of the evaluation commands).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct EvalLogregArgs {
    #[command(flatten)]
    pub weights: super::WeightsArgs,
    /// Folder with train/ and val/ image folders (as the official script reads it), or IDX
    /// files train-* and t10k-*. Other layouts: --train_path and --val_path.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// Training images, instead of <data_path>/train.
    #[arg(long)]
    pub train_path: Option<PathBuf>,
    /// Test images, instead of <data_path>/val.
    #[arg(long)]
    pub val_path: Option<PathBuf>,
    /// Regularisation strengths λ of the objective 1/n Σ loss + λ/2 ‖W‖² (cyanure's `lambd`);
    /// one fit per value. The official script notes that 0.1 usually works best.
    #[arg(long, action = clap::ArgAction::Set, num_args = 1.., default_values_t = vec![0.01, 0.1, 1.0])]
    pub lr_lambd: Vec<f64>,
    /// Concatenate the [CLS] tokens of the last n blocks (official default 1).
    #[arg(long, default_value_t = 1)]
    pub n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both.
    #[arg(long, default_value_t = 0)]
    pub avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 128)]
    pub batch_size_per_gpu: usize,
    /// Use at most this many training and test images.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Save the (L2-normalised) features to DIR/knn_features.safetensors (eval-knn's layout).
    #[arg(long)]
    pub dump_features: Option<PathBuf>,
    /// Reuse features saved by --dump_features (here or by eval-knn) from DIR instead of
    /// computing them; no weights are needed then.
    #[arg(long)]
    pub load_features: Option<PathBuf>,
    /// L-BFGS iterations at most per λ (the official cyanure solver's budget is --epochs 100
    /// passes; L-BFGS runs to the optimum instead, which takes a few hundred iterations).
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Converged when no entry of the objective's gradient exceeds this.
    #[arg(long, default_value_t = 1e-6)]
    pub tol: f64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl EvalLogregArgs {
    pub fn config(&self) -> LogregConfig {
        LogregConfig {
            lr_lambd: self.lr_lambd.clone(),
            solver: LbfgsOptions {
                max_iter: self.max_iter,
                tol: self.tol,
                ..LbfgsOptions::default()
            },
        }
    }

    /// Extracts (or loads) the features and fits one model per λ; prints the accuracies.
    pub fn run(&self, open: OpenBackbone) -> Result<Vec<logreg::LogregResult>> {
        anyhow::ensure!(
            self.tol > 0.0 && self.max_iter > 0,
            "--tol and --max_iter must be positive"
        );
        if let Some(bad) = self.lr_lambd.iter().find(|l| !(**l > 0.0 && l.is_finite())) {
            anyhow::bail!("--lr_lambd values must be positive numbers (got {bad})");
        }
        let spec = FeatureSpec {
            n_last_blocks: self.n_last_blocks,
            avgpool: self.avgpool_patchtokens,
        };
        let [ftr, ltr, fte, lte] = train_test_features(
            open,
            spec,
            || {
                open_splits(
                    self.data_path.as_deref(),
                    self.train_path.as_deref(),
                    self.val_path.as_deref(),
                )
            },
            self.subset,
            self.batch_size_per_gpu,
            self.load_features.as_deref(),
            self.dump_features.as_deref(),
        )?;
        eprintln!(
            "Features are ready ({} training, {} test, dim {}). Start the logistic regression.",
            ftr.size()[0],
            fte.size()[0],
            ftr.size().get(1).copied().unwrap_or(0)
        );
        let results = logreg::run(&self.config(), (&ftr, &ltr), (&fte, &lte))?;
        if let Some(b) = logreg::best(&results) {
            println!("Best: lambda {} with Acc: {}", b.lambd, b.acc);
        }
        if let Some(out) = &self.output {
            write_json(
                out,
                &serde_json::json!({
                    "results": results,
                    "best": logreg::best(&results),
                    "n_last_blocks": self.n_last_blocks,
                    "avgpool_patchtokens": self.avgpool_patchtokens,
                }),
            )?;
        }
        Ok(results)
    }
}

/// `ibot eval-logreg`.
pub fn run(a: EvalLogregArgs) -> Result<()> {
    a.run(super::common::opener(&a.weights)).map(|_| ())
}
