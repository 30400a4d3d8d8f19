//! End-to-end fine-tuning of a pre-trained backbone for classification (`ibot finetune`), with
//! the three official recipes:
//!
//! - `imagenet_layer_decay`: `evaluation/classification_layer_decay/run_class_finetuning.py` as
//!   `run.sh imagenet_cls` runs it (BEiT's script): AdamW with layer-wise lr decay, per-iteration
//!   cosine schedule, the lr used as written (no batch scaling), Mixup 0.8 / CutMix 1.0,
//!   smoothing 0.1, drop path 0.1, [CLS] pooling, classifier scaled by `init_scale` 0.001.
//! - `deit_transfer`: `evaluation/eval_cls.py` (DeiT's recipe for CIFAR, Cars, Flowers, iNat):
//!   AdamW without layer decay, lr × batch / 512, timm's per-epoch cosine (stepped after each
//!   epoch), repeated augmentation, model EMA 0.99996.
//! - `semi`: `evaluation/semi_supervised/eval_cls.py`: the DeiT recipe from the first
//!   `--finetune_head_layer` layers of the pre-trained projection head, on a 1% / 10% subset.
//!
//! The work is in [`run::run`] over a [`FinetuneConfig`] (the `ibot finetune` options resolved
//! against the recipe's defaults, see `ibot::cli::finetune`).

pub mod bench;
pub mod data;
pub mod demo;
pub mod groups;
pub mod loss;
pub mod model;
pub mod run;
pub mod schedule;

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// The data side: timm's transforms, Mixup/CutMix, CIFAR and split files.
pub use crate::data::cls;
pub use demo::DEMO_DATA;
pub use run::{run, FinetuneOutcome};

/// The official recipe whose defaults a run starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum Recipe {
    /// classification_layer_decay/run_class_finetuning.py (`run.sh imagenet_cls`).
    ImagenetLayerDecay,
    /// eval_cls.py (DeiT transfer recipe).
    DeitTransfer,
    /// semi_supervised/eval_cls.py.
    Semi,
}

impl Recipe {
    /// Whether the recipe follows eval_cls.py (DeiT): per-epoch timm schedule, lr scaled by
    /// batch/512, timm's weight-decay groups, repeated augmentation.
    pub fn is_deit(self) -> bool {
        !matches!(self, Recipe::ImagenetLayerDecay)
    }
}

/// Everything a fine-tuning run needs (serde; no clap).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub recipe: Recipe,
    /// Pre-trained weights (None: random initialisation).
    pub pretrained_weights: Option<PathBuf>,
    pub checkpoint_key: String,
    pub arch: Option<String>,
    pub num_heads: Option<i64>,
    /// `--window_size`: the Swin's window at fine-tuning (None: the pre-trained one).
    #[serde(default)]
    pub window_size: Option<i64>,
    pub data_path: PathBuf,
    pub eval_data_path: Option<PathBuf>,
    /// `--data_set`: CIFAR (CIFAR-100), CIFAR10, IMNET / image_folder, or None (found out).
    #[serde(default)]
    pub data_set: Option<String>,
    pub split_file: Option<PathBuf>,
    pub nb_classes: Option<i64>,
    pub batch_size: usize,
    pub epochs: usize,
    pub output_dir: PathBuf,
    pub layer_decay: f64,
    pub drop_path: f64,
    /// The base learning rate after the recipe's scaling (what the schedule peaks at).
    pub lr: f64,
    pub warmup_epochs: usize,
    pub warmup_lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub clip_grad: Option<f64>,
    pub model_ema: bool,
    pub model_ema_decay: f64,
    pub use_mean_pooling: bool,
    pub finetune_head_layer: usize,
    pub init_scale: f64,
    pub update_freq: usize,
    pub smoothing: f64,
    pub repeated_aug: bool,
    pub aug: cls::ClsAugConfig,
    pub mixup: cls::MixupConfig,
    pub seed: u64,
    pub num_workers: usize,
    pub device: String,
    pub use_fp16: bool,
    pub precision: crate::train::amp::PrecisionChoice,
    pub resume: Option<PathBuf>,
    pub eval: bool,
    /// Start a new classifier when the weights carry one for another number of classes.
    pub reset_head: bool,
    /// Use at most this many training / validation images (not official; demos and tests).
    pub subset: Option<usize>,
    /// Draw the progress bars.
    pub progress: bool,
    /// Take only the architecture from `pretrained_weights` and start from the official random
    /// initialisation (the demo's baseline).
    #[serde(default)]
    pub from_scratch: bool,
    /// How the ranks of a data-parallel run find each other (`--dist_url`, `--dist_timeout`);
    /// not part of the run's identity (a run may resume on another world).
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
    /// Evaluate on each rank's DistributedSampler(shuffle=False) share of the validation set
    /// instead of the whole set on every rank (the official --dist_eval).
    #[serde(default)]
    pub dist_eval: bool,
    /// `--opt`, `--opt_eps`, `--opt_betas`, `--momentum`.
    #[serde(default)]
    pub opt: OptConfig,
    /// `--warmup_steps` (run_class_finetuning.py): warm-up iterations overriding
    /// `warmup_epochs × iterations per epoch` (None: the official -1).
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// `--drop`: dropout after the position embedding, the attention projection and both MLP
    /// layers (the official `pos_drop`, `proj_drop`, `Mlp.drop`).
    #[serde(default)]
    pub drop: f64,
    /// `--attn_drop_rate`: dropout on the attention probabilities.
    #[serde(default)]
    pub attn_drop_rate: f64,
}

/// The optimizer of timm's `create_optimizer` as the official fine-tuning scripts call it
/// (`--opt`, `--opt_eps`, `--opt_betas`, `--momentum`), restricted to the update rules
/// implemented here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    /// timm's name: adamw, adam, sgd / nesterov (SGD with Nesterov momentum), momentum (SGD with
    /// plain momentum).
    pub opt: String,
    /// Adam's epsilon (`--opt_eps`; timm drops it for SGD).
    pub opt_eps: f64,
    /// Adam's betas (`--opt_betas`; None: PyTorch's (0.9, 0.999)).
    pub opt_betas: Option<(f64, f64)>,
    /// SGD momentum (`--momentum`).
    pub momentum: f64,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            opt: "adamw".into(),
            opt_eps: 1e-8,
            opt_betas: None,
            momentum: 0.9,
        }
    }
}

/// The optimizers of timm's `create_optimizer` (the list of BEiT's `optim_factory` and timm's
/// legacy factory) that are not implemented here.
pub const UNSUPPORTED_OPTS: &[&str] = &[
    "nadam",
    "radam",
    "adamp",
    "sgdp",
    "adadelta",
    "adafactor",
    "adahessian",
    "rmsprop",
    "rmsproptf",
    "novograd",
    "nvnovograd",
    "lamb",
    "lars",
    "fusedsgd",
    "fusedmomentum",
    "fusedadam",
    "fusedadamw",
    "fusedlamb",
    "fusednovograd",
];

impl OptConfig {
    /// The update rule `--opt` names, as timm's `create_optimizer` reads it: lower-cased, the
    /// part after the last `_` (a `lookahead_` prefix wraps the optimizer in Lookahead, which
    /// is not implemented; other prefixes are ignored, as timm ignores them). Returns the kind
    /// and whether SGD uses Nesterov momentum.
    pub fn kind(&self) -> Result<(crate::train::optim::OptimizerKind, bool)> {
        use crate::train::optim::OptimizerKind as K;
        const SUPPORTED: &str = "adamw (default), adam, sgd (= nesterov: SGD with Nesterov \
                                 momentum, as timm), momentum (SGD without Nesterov)";
        let lower = self.opt.to_lowercase();
        let parts: Vec<&str> = lower.split('_').collect();
        if parts.len() > 1 && parts[0] == "lookahead" {
            bail!(
                "--opt {}: the Lookahead wrapper is not implemented; supported: {SUPPORTED}",
                self.opt
            );
        }
        let name = parts.last().copied().unwrap_or_default();
        let (kind, nesterov) = match name {
            "adamw" => (K::Adamw, false),
            "adam" => (K::Adam, false),
            "sgd" | "nesterov" => (K::Sgd, true),
            "momentum" => (K::Sgd, false),
            n if UNSUPPORTED_OPTS.contains(&n) => bail!(
                "--opt {}: timm's {n} is not implemented in `ibot finetune`; supported: \
                 {SUPPORTED}",
                self.opt
            ),
            _ => bail!(
                "--opt {}: unknown optimizer (timm would fail with 'Invalid optimizer'); \
                 supported: {SUPPORTED}",
                self.opt
            ),
        };
        if kind == K::Sgd {
            ensure!(
                self.opt_betas.is_none(),
                "--opt_betas does not apply to SGD (PyTorch's SGD takes no betas)"
            );
            ensure!(
                self.momentum >= 0.0 && self.momentum.is_finite(),
                "--momentum must be >= 0"
            );
            ensure!(
                !nesterov || self.momentum > 0.0,
                "--opt {} is SGD with Nesterov momentum, which needs --momentum > 0 (PyTorch \
                 refuses Nesterov without momentum); use --opt momentum --momentum 0 for plain SGD",
                self.opt
            );
        } else {
            ensure!(
                self.opt_eps > 0.0 && self.opt_eps.is_finite(),
                "--opt_eps must be positive"
            );
            if let Some((b1, b2)) = self.opt_betas {
                ensure!(
                    (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2),
                    "--opt_betas must be two numbers in [0, 1) (got {b1} {b2})"
                );
            }
        }
        Ok((kind, nesterov))
    }

    /// A new optimizer over `ps` with these options.
    pub fn build(&self, ps: &crate::params::ParamStore) -> Result<crate::train::optim::Optimizer> {
        let (kind, nesterov) = self.kind()?;
        let mut o = crate::train::optim::Optimizer::new(kind, ps);
        o.eps = self.opt_eps;
        if let Some((b1, b2)) = self.opt_betas {
            o.beta1 = b1;
            o.beta2 = b2;
        }
        o.momentum = self.momentum;
        o.nesterov = nesterov;
        Ok(o)
    }
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "--batch_size must be positive");
        ensure!(self.update_freq > 0, "--update_freq must be at least 1");
        ensure!(
            self.lr >= 0.0 && self.lr.is_finite(),
            "--lr must be a finite number >= 0"
        );
        ensure!(
            self.min_lr >= 0.0 && self.warmup_lr >= 0.0,
            "--min_lr and --warmup_lr must be >= 0"
        );
        ensure!(self.weight_decay >= 0.0, "--weight_decay must be >= 0");
        ensure!(
            self.layer_decay > 0.0 && self.layer_decay <= 1.0,
            "--layer_decay must be in (0, 1] (got {})",
            self.layer_decay
        );
        ensure!(
            (0.0..1.0).contains(&self.drop_path),
            "--drop_path must be in [0, 1) (got {})",
            self.drop_path
        );
        ensure!(
            (0.0..1.0).contains(&self.smoothing),
            "--smoothing must be in [0, 1) (got {})",
            self.smoothing
        );
        ensure!(
            (0.0..=1.0).contains(&self.model_ema_decay),
            "--model_ema_decay must be in [0, 1]"
        );
        if let Some(c) = self.clip_grad {
            ensure!(
                c > 0.0,
                "--clip_grad must be positive (leave it out for no clipping)"
            );
        }
        // With --warmup_steps the warm-up is that many iterations (checked against the run's
        // length when the schedule is built), whatever --warmup_epochs says.
        ensure!(
            self.warmup_epochs <= self.epochs
                || self.eval
                || self.warmup_steps.is_some_and(|s| s > 0),
            "--warmup_epochs {} is longer than --epochs {}",
            self.warmup_epochs,
            self.epochs
        );
        if let Some((lo, hi)) = self.mixup.cutmix_minmax {
            // timm's rand_bbox_minmax draws the box sides with np.random.randint(int(size * min),
            // int(size * max)), which refuses an empty range.
            let size = self.aug.input_size as f64;
            let (a, b) = ((size * lo) as i64, (size * hi) as i64);
            ensure!(
                a < b || self.eval,
                "--cutmix_minmax {lo} {hi} leaves no box size at --input_size {}: the sides are \
                 drawn from [{a}, {b}) pixels; widen the range",
                self.aug.input_size
            );
        }
        if !["teacher", "student"].contains(&self.checkpoint_key.as_str()) {
            bail!(
                "--checkpoint_key must be teacher or student, not '{}'",
                self.checkpoint_key
            );
        }
        ensure!(
            !self.mixup.active() || self.batch_size % 2 == 0 || self.eval,
            "--batch_size {} is odd: Mixup/CutMix pairs each image with the batch flipped and \
             needs an even batch (as timm's Mixup asserts); or turn them off with --mixup 0 --cutmix 0",
            self.batch_size
        );
        if self.subset == Some(0) {
            bail!("--subset 0 leaves no images");
        }
        self.opt.kind()?;
        ensure!(
            (0.0..1.0).contains(&self.drop) && (0.0..1.0).contains(&self.attn_drop_rate),
            "--drop and --attn_drop_rate must be in [0, 1) (got {} and {})",
            self.drop,
            self.attn_drop_rate
        );
        if let Some(s) = self.warmup_steps {
            ensure!(
                !self.recipe.is_deit(),
                "--warmup_steps is an option of run_class_finetuning.py (--recipe \
                 imagenet_layer_decay); eval_cls.py's timm scheduler warms up per epoch \
                 (--warmup_epochs)"
            );
            ensure!(
                s == 0 || self.warmup_epochs > 0 || self.eval,
                "--warmup_steps {s} with --warmup_epochs 0: the official cosine_scheduler only \
                 builds a warm-up when warmup_epochs > 0 (and then fails its length check); give \
                 --warmup_epochs 1 or more with --warmup_steps"
            );
        }
        self.aug.validate()
    }
}
