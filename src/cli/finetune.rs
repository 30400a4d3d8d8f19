//! `ibot finetune`: the options of the official fine-tuning scripts, resolved against the
//! defaults of the chosen recipe into a [`FinetuneConfig`].

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use clap::{ArgAction, Args};

use super::DistArgs;

use crate::finetune::{cls, FinetuneConfig, Recipe};

/// Recipe defaults shown at the end of `ibot finetune --help`.
pub const RECIPES_HELP: &str = "\
Recipes (--recipe; every option given on the command line wins):

  imagenet_layer_decay  evaluation/classification_layer_decay/run_class_finetuning.py as
                        `run.sh imagenet_cls` runs it: --batch_size 128 --epochs 100
                        --lr 4e-3 (used as written: the official script does not scale it; it
                        assumed 8 GPUs x 128 = 1024 images per step) --layer_decay 0.65
                        (the README uses 0.75 for ViT-S/16, 0.65 for ViT-B/16) --warmup_epochs 20
                        (per-iteration warm-up from 0: the script's --warmup_lr is unused)
                        --min_lr 1e-6 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8
                        --cutmix 1.0 --smoothing 0.1 --reprob 0.25 --use_cls --init_scale 0.001
                        --model_ema false; skip list pos_embed, cls_token; ImageNet mean/std;
                        evaluation Resize(input_size / crop_pct, bilinear) + CenterCrop.
  deit_transfer         evaluation/eval_cls.py as `run.sh cifar_cls` runs it (DeiT's recipe):
                        --batch_size 96 --epochs 1000 --lr 7.5e-6 (scaled: lr x batch / 512)
                        --layer_decay 1.0 --warmup_epochs 5 --warmup_lr 1e-6 --min_lr 1e-5
                        --weight_decay 0.05 (cls_token and pos_embed decayed too: the official ViT
                        has no skip list) --drop_path 0.1 --mixup 0.8 --cutmix 1.0
                        --smoothing 0.1 --reprob 0.25 --model_ema true --model_ema_decay 0.99996
                        --repeated_aug true --init_scale 1.0; timm's cosine schedule per epoch,
                        stepped after each epoch (epochs 0 and 1 both use the first value);
                        evaluation Resize(256/224 x input_size, bicubic) + CenterCrop.
  semi                  evaluation/semi_supervised/eval_cls.py as the README runs it: the
                        deit_transfer defaults with --batch_size 128 --epochs 1000 --lr 5e-6
                        --finetune_head_layer 1 (the first layer of the projection head kept,
                        GELU, then the classifier); give the 1% / 10% subset with --split_file
                        or a folder holding only it.";

/// Options of `ibot finetune` (names of the official scripts).
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct FinetuneArgs {
    /// Official recipe whose defaults the other options start from (listed below).
    #[arg(long, value_enum, default_value = "imagenet_layer_decay")]
    pub recipe: Recipe,
    /// Pre-trained weights: an `ibot train` checkpoint, a backbone from `extract-backbone`, an
    /// official .pth (full checkpoint.pth, checkpoint_teacher.pth, extracted backbone) or a
    /// timm / fine-tuned ViT. Without it the model starts from random initialisation.
    #[arg(long, alias = "finetune")]
    pub pretrained_weights: Option<PathBuf>,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Architecture (vit_tiny/small/base/large): for random initialisation, or weights of a
    /// non-standard width (checked against them).
    #[arg(long, alias = "model")]
    pub arch: Option<String>,
    /// Number of attention heads, for weights of a non-standard width.
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Swin window size at fine-tuning (default: the pre-trained model's, 7 without weights).
    /// Another window (e.g. 12 at --input_size 384) resizes each pre-trained
    /// relative_position_bias_table bicubically, as the Swin code does.
    #[arg(long)]
    pub window_size: Option<i64>,
    /// Training data: a folder with train/ and val/ image folders (ImageNet layout), a folder of
    /// IDX files (train-* and t10k-*), or with --eval_data_path the training image folder itself.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// Validation images (the official `image_folder` data set), when --data_path holds only
    /// the training images.
    #[arg(long)]
    pub eval_data_path: Option<PathBuf>,
    /// CIFAR (CIFAR-100), CIFAR10 (their binary or python versions, in --data_path), IMNET or
    /// image_folder; default: CIFAR when --data_path holds its folders, else image folders / IDX.
    #[arg(long, alias = "data-set")]
    pub data_set: Option<String>,
    /// SimCLRv2-style split file (one image file name per line) selecting the training images
    /// of a semi-supervised run.
    #[arg(long)]
    pub split_file: Option<PathBuf>,
    /// Number of classes (default: the data set's). Fewer than the data set has is an error.
    #[arg(long)]
    pub nb_classes: Option<i64>,
    /// Input side in pixels (default 224). 32 or less: RandomCrop with padding 4 and no resize,
    /// as officially.
    #[arg(long, alias = "input-size")]
    pub input_size: Option<usize>,
    #[arg(long, alias = "batch-size")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value = "runs/finetune")]
    pub output_dir: PathBuf,
    /// Layer-wise lr decay: block i trains at lr x layer_decay^(depth + 1 - (i + 1)); 1 = off.
    #[arg(long)]
    pub layer_decay: Option<f64>,
    /// Stochastic depth rate of the last block.
    #[arg(long, alias = "drop-path")]
    pub drop_path: Option<f64>,
    /// Dropout rate after the position embedding, the attention projection and both MLP layers
    /// (training only; the official default 0).
    #[arg(long, default_value_t = 0.0)]
    pub drop: f64,
    /// Dropout rate of the attention probabilities (training only; default 0).
    #[arg(long, default_value_t = 0.0)]
    pub attn_drop_rate: f64,
    /// Optimizer, by timm's create_optimizer name: adamw (default); adam (L2 weight decay);
    /// sgd or nesterov (SGD with Nesterov momentum, timm's meaning of 'sgd'); momentum (SGD
    /// with plain momentum). timm's other optimizers are refused.
    #[arg(long, default_value = "adamw")]
    pub opt: String,
    /// Adam/AdamW epsilon (ignored by SGD, as timm drops it).
    #[arg(long, alias = "opt-eps", default_value_t = 1e-8)]
    pub opt_eps: f64,
    /// Adam/AdamW betas, two numbers (default PyTorch's 0.9 0.999).
    #[arg(long, alias = "opt-betas", action = ArgAction::Set, num_args = 1..)]
    pub opt_betas: Option<Vec<f64>>,
    /// SGD momentum (--opt sgd / momentum).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Learning rate as the recipe's script takes it: absolute for imagenet_layer_decay,
    /// multiplied by batch_size x world_size / 512 for deit_transfer and semi.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Absolute learning rate per 256 images instead of --lr: lr = blr x batch_size x
    /// update_freq x world_size / 256 (MAE's convention; not in the iBOT scripts).
    #[arg(long, conflicts_with = "lr")]
    pub blr: Option<f64>,
    #[arg(long, alias = "warmup-epochs")]
    pub warmup_epochs: Option<usize>,
    /// Warm-up length in iterations, overriding --warmup_epochs' length (imagenet_layer_decay's
    /// per-iteration schedule; as officially, it needs --warmup_epochs > 0). Values <= 0: off.
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_steps: Option<i64>,
    /// Warm-up start of the DeiT recipes' schedule (unused by imagenet_layer_decay, whose
    /// warm-up starts at 0 as the official script's does).
    #[arg(long, alias = "warmup-lr")]
    pub warmup_lr: Option<f64>,
    #[arg(long, alias = "min-lr")]
    pub min_lr: Option<f64>,
    #[arg(long, alias = "weight-decay")]
    pub weight_decay: Option<f64>,
    /// Final weight decay of a cosine schedule (imagenet_layer_decay; default: --weight_decay).
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Clip the total gradient norm to this value (default: no clipping).
    #[arg(long, alias = "clip-grad")]
    pub clip_grad: Option<f64>,
    /// Keep an EMA of the weights (timm ModelEma), evaluated alongside each epoch.
    #[arg(long, alias = "model-ema", num_args = 0..=1, default_missing_value = "true")]
    pub model_ema: Option<bool>,
    #[arg(long, alias = "model-ema-decay")]
    pub model_ema_decay: Option<f64>,
    /// Classify the [CLS] token (after the final norm).
    #[arg(long, conflicts_with = "use_mean_pooling")]
    pub use_cls: bool,
    /// Classify the mean of the patch tokens through a new fc_norm (replacing the final norm).
    #[arg(long)]
    pub use_mean_pooling: bool,
    /// Linear layers of the pre-trained projection head kept before the classifier (semi).
    #[arg(long)]
    pub finetune_head_layer: Option<usize>,
    /// The classifier's initial weights and bias are multiplied by this.
    #[arg(long)]
    pub init_scale: Option<f64>,
    /// Gradient accumulation: one update every this many batches.
    #[arg(long, default_value_t = 1)]
    pub update_freq: usize,
    /// Label smoothing (inside the Mixup targets when mixing).
    #[arg(long)]
    pub smoothing: Option<f64>,
    /// Mixup alpha (on when > 0).
    #[arg(long)]
    pub mixup: Option<f64>,
    /// CutMix alpha (on when > 0).
    #[arg(long)]
    pub cutmix: Option<f64>,
    /// CutMix box side bounds as fractions of the image side, two numbers (timm's
    /// rand_bbox_minmax): turns CutMix on with alpha 1 and boxes drawn uniformly in them.
    #[arg(long, alias = "cutmix-minmax", action = ArgAction::Set, num_args = 1..)]
    pub cutmix_minmax: Option<Vec<f64>>,
    /// Probability of mixing a batch at all.
    #[arg(long, alias = "mixup-prob", default_value_t = 1.0)]
    pub mixup_prob: f64,
    /// Probability of CutMix instead of Mixup when both are on.
    #[arg(long, alias = "mixup-switch-prob", default_value_t = 0.5)]
    pub mixup_switch_prob: f64,
    /// batch, pair or elem.
    #[arg(long, alias = "mixup-mode", default_value = "batch")]
    pub mixup_mode: String,
    /// RandAugment policy (timm string), or none.
    #[arg(long, default_value = "rand-m9-mstd0.5-inc1")]
    pub aa: String,
    /// Random-erasing probability.
    #[arg(long)]
    pub reprob: Option<f64>,
    /// Random-erasing fill: pixel, rand or const.
    #[arg(long, default_value = "pixel")]
    pub remode: String,
    #[arg(long, default_value_t = 1)]
    pub recount: usize,
    /// Colour-jitter strength (used when --aa is none).
    #[arg(long, alias = "color-jitter", default_value_t = 0.4)]
    pub color_jitter: f64,
    /// bicubic or bilinear.
    #[arg(long, alias = "train-interpolation", default_value = "bicubic")]
    pub train_interpolation: String,
    /// Evaluation crop fraction: Resize(input_size / crop_pct) then CenterCrop(input_size).
    #[arg(long)]
    pub crop_pct: Option<f64>,
    /// Repeated augmentation (each image 3 times per epoch, the DeiT recipes' RASampler).
    #[arg(long, alias = "repeated-aug", num_args = 0..=1, default_missing_value = "true")]
    pub repeated_aug: Option<bool>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads decoding and augmenting images.
    #[arg(long, default_value_t = 2)]
    pub num_workers: usize,
    // ---- accepted for compatibility with the official command lines (see the README's table
    // of official options): each selects what `ibot finetune` does anyway, or concerns only
    // PyTorch's data loading / placement.
    /// eval_cls.py's pooling switch: 1 = --use_mean_pooling, 0 = [CLS].
    #[arg(long, value_parser = ["0", "1"], help_heading = "Official options accepted for compatibility")]
    pub avgpool_patchtokens: Option<String>,
    /// run.sh imagenet_cls passes it: the iBOT ViT has absolute position embeddings.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub disable_rel_pos_bias: bool,
    /// run.sh imagenet_cls passes it: absolute (learned) position embeddings, as here.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub abs_pos_emb: bool,
    /// The default of run_class_finetuning.py: learned absolute position embeddings, as here.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub learned_abs_pos_emb: bool,
    /// run.sh imagenet_cls passes 0 (no LayerScale, as the iBOT ViT); other values are refused.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub layer_scale_init_value: Option<f64>,
    /// run.sh imagenet_cls passes it: ImageNet's mean and std, which every recipe here uses.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub imagenet_default_mean_and_std: bool,
    /// PyTorch DataLoader memory pinning (no effect here).
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub pin_mem: bool,
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub no_pin_mem: bool,
    /// Keeps timm's EMA on the CPU in the official scripts (no effect on its values; the EMA
    /// lives on --device here).
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub model_ema_force_cpu: bool,
    /// Declared but unused by the official scripts (never passed to create_transform).
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub resplit: bool,
    /// Resuming from <output_dir>/checkpoint.safetensors is always on here.
    #[arg(long, help_heading = "Official options accepted for compatibility")]
    pub auto_resume: bool,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Mixed precision as `ibot train`: float16 autocast with loss scaling (GradScaler) on
    /// CUDA, bfloat16 autocast on CPUs with AMX or where the start-up probe measures it to pay
    /// (AVX512-BF16 CPUs, cached per machine), else float32.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub use_fp16: bool,
    /// auto (follows --use_fp16), float32, bfloat16 or float16 (CUDA only).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::train::amp::PrecisionChoice,
    /// Resume from this checkpoint (default: <output_dir>/checkpoint.safetensors when it exists).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Only evaluate (the weights of --resume, or of --pretrained_weights).
    #[arg(long)]
    pub eval: bool,
    /// Start a new classifier when the weights carry one for another number of classes.
    #[arg(long)]
    pub reset_head: bool,
    /// Use at most this many training and validation images (not official).
    #[arg(long)]
    pub subset: Option<usize>,
    /// Take only the architecture from --pretrained_weights and start from the official random
    /// initialisation (a baseline for the same recipe).
    #[arg(long)]
    pub from_scratch: bool,
    /// Benchmark instead of training: time this many fine-tuning steps on random images
    /// (after one untimed step; --arch, default vit_small, or the weights' shape; --nb_classes
    /// default 1000) and print ms/iter and img/s. Compare with bench/torch_finetune_step.py
    /// (`bash bench/compare.sh finetune-step`).
    #[arg(long)]
    pub bench_steps: Option<usize>,
    /// Fine-tune the `ibot demo` model (runs/fmnist-demo) on Fashion-MNIST for a short budget and
    /// compare with the same recipe from random initialisation (see `ibot finetune --help`).
    #[arg(long)]
    pub demo: bool,
    // ---- data parallelism: launch with `ibot launch --nproc_per_node N ibot finetune ...`,
    // torchrun or srun; --batch_size is per rank, as the official scripts'.
    #[command(flatten)]
    pub dist: DistArgs,
    /// Data-parallel evaluation, as the official --dist_eval: each rank evaluates its
    /// DistributedSampler(shuffle=False) share of the validation set and the metrics are summed
    /// over the ranks. A set not divisible by the number of ranks is padded by repeating its
    /// first images (counted in the reported accuracy, with the official warning). Without it
    /// every rank evaluates the whole set.
    #[arg(long, help_heading = "Data parallelism")]
    pub dist_eval: bool,
}

impl FinetuneArgs {
    /// The configuration these options and the recipe's defaults give.
    pub fn to_config(&self) -> Result<FinetuneConfig> {
        let r = self.recipe;
        let deit = r.is_deit();
        let pick = |v: Option<f64>, ld: f64, dt: f64, semi: f64| {
            v.unwrap_or(match r {
                Recipe::ImagenetLayerDecay => ld,
                Recipe::DeitTransfer => dt,
                Recipe::Semi => semi,
            })
        };
        let pick_u = |v: Option<usize>, ld: usize, dt: usize, semi: usize| {
            v.unwrap_or(match r {
                Recipe::ImagenetLayerDecay => ld,
                Recipe::DeitTransfer => dt,
                Recipe::Semi => semi,
            })
        };
        let batch_size = pick_u(self.batch_size, 128, 96, 128);
        ensure!(batch_size > 0, "--batch_size must be positive");
        ensure!(self.update_freq > 0, "--update_freq must be at least 1");
        // The world the launcher set up (1 without one): the official scripts scale the
        // learning rate by the total batch, batch_size x update_freq x world_size.
        let world = crate::dist::DistEnv::detect(&self.dist.dist_url)
            .ok()
            .flatten()
            .map_or(1, |e| e.world_size);
        let total = (batch_size * self.update_freq * world) as f64;
        let lr = match (self.blr, self.lr) {
            (Some(b), _) => b * total / 256.0,
            (None, l) => {
                let l = pick(l, 4e-3, 7.5e-6, 5e-6);
                if deit {
                    // eval_cls.py: linear_scaled_lr = lr * batch_size * world_size / 512.
                    l * (batch_size * world) as f64 / 512.0
                } else {
                    l
                }
            }
        };
        let weight_decay = pick(self.weight_decay, 0.05, 0.05, 0.05);
        let input_size = self.input_size.unwrap_or(224);
        let mut aug = if deit {
            cls::ClsAugConfig::deit_transfer()
        } else {
            cls::ClsAugConfig::default()
        };
        aug.input_size = input_size;
        aug.color_jitter = self.color_jitter;
        aug.aa = Some(self.aa.clone()).filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("none"));
        aug.train_interpolation = cls::Interpolation::parse(&self.train_interpolation)?;
        aug.reprob = pick(self.reprob, 0.25, 0.25, 0.25);
        aug.remode = cls::EraseMode::parse(&self.remode)?;
        aug.recount = self.recount;
        if let Some(c) = self.crop_pct {
            ensure!(c > 0.0 && c <= 1.0, "--crop_pct must be in (0, 1]");
            aug.crop_pct = Some(c);
        }
        let smoothing = pick(self.smoothing, 0.1, 0.1, 0.1);
        let cutmix_minmax = match self.cutmix_minmax.as_deref() {
            None => None,
            Some(&[lo, hi]) => Some((lo, hi)),
            Some(v) => bail!(
                "--cutmix_minmax takes two numbers (min and max box side fractions), got {}",
                v.len()
            ),
        };
        let opt_betas = match self.opt_betas.as_deref() {
            None => None,
            Some(&[b1, b2]) => Some((b1, b2)),
            Some(v) => bail!(
                "--opt_betas takes two numbers (Adam's beta1 beta2), got {}",
                v.len()
            ),
        };
        let mixup = cls::MixupConfig {
            mixup_alpha: pick(self.mixup, 0.8, 0.8, 0.8),
            cutmix_alpha: pick(self.cutmix, 1.0, 1.0, 1.0),
            cutmix_minmax,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            mode: cls::MixupMode::parse(&self.mixup_mode)?,
            label_smoothing: smoothing,
            ..Default::default()
        };
        ensure!(
            mixup.mixup_alpha >= 0.0 && mixup.cutmix_alpha >= 0.0,
            "--mixup and --cutmix must be >= 0"
        );
        ensure!(
            (0.0..=1.0).contains(&mixup.prob) && (0.0..=1.0).contains(&mixup.switch_prob),
            "--mixup_prob and --mixup_switch_prob must be in [0, 1]"
        );
        if let Some(v) = self.layer_scale_init_value {
            ensure!(
                v == 0.0,
                "--layer_scale_init_value {v}: LayerScale (BEiT's gamma_1/gamma_2) is not \
                 implemented; the iBOT ViT has none (run.sh imagenet_cls passes 0.0)"
            );
        }
        let use_mean_pooling = match self.avgpool_patchtokens.as_deref() {
            Some("1") => {
                ensure!(
                    !self.use_cls,
                    "--avgpool_patchtokens 1 and --use_cls contradict each other"
                );
                true
            }
            Some(_) => {
                ensure!(
                    !self.use_mean_pooling,
                    "--avgpool_patchtokens 0 and --use_mean_pooling contradict each other"
                );
                false
            }
            None => self.use_mean_pooling,
        };
        let data_path = match (&self.data_path, self.demo) {
            (Some(p), _) => p.clone(),
            (None, true) => PathBuf::from(crate::finetune::DEMO_DATA),
            (None, false) => {
                bail!("--data_path is required (a folder with train/ and val/, or IDX files)")
            }
        };
        let cfg = FinetuneConfig {
            recipe: r,
            pretrained_weights: self.pretrained_weights.clone(),
            checkpoint_key: self.checkpoint_key.clone(),
            arch: self.arch.clone(),
            num_heads: self.num_heads,
            window_size: self.window_size,
            data_path,
            eval_data_path: self.eval_data_path.clone(),
            data_set: self.data_set.clone(),
            split_file: self.split_file.clone(),
            nb_classes: self.nb_classes,
            batch_size,
            epochs: pick_u(self.epochs, 100, 1000, 1000),
            output_dir: self.output_dir.clone(),
            layer_decay: pick(self.layer_decay, 0.65, 1.0, 1.0),
            drop_path: pick(self.drop_path, 0.1, 0.1, 0.1),
            lr,
            warmup_epochs: pick_u(self.warmup_epochs, 20, 5, 5),
            warmup_lr: pick(self.warmup_lr, 1e-6, 1e-6, 1e-6),
            min_lr: pick(self.min_lr, 1e-6, 1e-5, 1e-5),
            weight_decay,
            weight_decay_end: self.weight_decay_end.unwrap_or(weight_decay),
            clip_grad: self.clip_grad,
            model_ema: self.model_ema.unwrap_or(deit),
            model_ema_decay: pick(self.model_ema_decay, 0.9999, 0.99996, 0.99996),
            use_mean_pooling,
            finetune_head_layer: pick_u(self.finetune_head_layer, 0, 0, 1),
            init_scale: pick(self.init_scale, 0.001, 1.0, 1.0),
            update_freq: self.update_freq,
            smoothing,
            repeated_aug: self.repeated_aug.unwrap_or(deit),
            aug,
            mixup,
            seed: self.seed,
            num_workers: self.num_workers,
            device: self.device.clone(),
            use_fp16: self.use_fp16,
            precision: self.precision,
            resume: self.resume.clone(),
            eval: self.eval,
            reset_head: self.reset_head,
            subset: self.subset,
            progress: true,
            from_scratch: self.from_scratch,
            dist: self.dist.config(),
            dist_eval: self.dist_eval,
            opt: crate::finetune::OptConfig {
                opt: self.opt.clone(),
                opt_eps: self.opt_eps,
                opt_betas,
                momentum: self.momentum,
            },
            warmup_steps: self.warmup_steps.filter(|&s| s > 0).map(|s| s as usize),
            drop: self.drop,
            attn_drop_rate: self.attn_drop_rate,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `ibot finetune ...` (and `--demo`).
pub fn main(a: &FinetuneArgs) -> Result<()> {
    if a.demo {
        return crate::finetune::demo::demo(a);
    }
    if let Some(n) = a.bench_steps {
        let mut b = a.clone();
        b.data_path.get_or_insert_with(|| PathBuf::from("."));
        let cfg = b.to_config()?;
        let classes = cfg.nb_classes.unwrap_or(1000);
        let (ms, ips, cpu_ms) = crate::finetune::bench::step(&cfg, classes, n, 1)?;
        println!(
            "ibot finetune step ({:?}, {}{}, {} libtorch thread(s), batch {} at {} px, {} classes, mixup {}/{}): {ms:.1} ms/iter (CPU {cpu_ms:.1} ms/iter), {ips:.2} img/s",
            cfg.recipe,
            cfg.arch.as_deref().unwrap_or("vit_small"),
            cfg.window_size.map(|w| format!(" window {w}")).unwrap_or_default(),
            tch::get_num_threads(),
            cfg.batch_size,
            cfg.aug.input_size,
            classes,
            cfg.mixup.mixup_alpha,
            cfg.mixup.cutmix_alpha
        );
        return Ok(());
    }
    let cfg = a.to_config()?;
    let out = crate::finetune::run(&cfg)?;
    if !cfg.eval && out.rank == 0 {
        println!(
            "{} epoch(s) fine-tuned; max accuracy {:.2}%; log.txt and checkpoint.safetensors in {}",
            out.epochs_done,
            out.max_accuracy,
            cfg.output_dir.display()
        );
    }
    Ok(())
}
