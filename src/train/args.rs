//! `ibot train` options: the official `main_ibot.py` arguments under the same names and with
//! the same defaults, plus a few of our own (crop sizes, model overrides, device, presets).

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use clap::{ArgAction, Args};
use serde::{Deserialize, Serialize};

use crate::models::{HeadAct, HeadNorm};
use crate::train::amp::PrecisionChoice;

/// Parses `true/false/on/off/1/0` like the official `utils.bool_flag`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!(
            "invalid value '{s}' for a boolean flag (use true or false)"
        )),
    }
}

fn default_window_size() -> i64 {
    7
}

impl TrainArgs {
    /// Whether `--arch` names a Swin Transformer.
    pub fn is_swin(&self) -> bool {
        self.arch.starts_with("swin")
    }

    /// `--patch_size`, or its default: 16 for ViT, 4 for Swin (the official Swin recipe's).
    pub fn resolved_patch_size(&self) -> i64 {
        self.patch_size
            .unwrap_or(if self.is_swin() { 4 } else { 16 })
    }

    /// Side of a mask cell in pixels: the patch size for ViT, patch_size x 8 for Swin (the
    /// official `pred_size`; masks are repeated up to Swin's 4-px patch grid).
    pub fn mask_patch_size(&self) -> i64 {
        let p = self.resolved_patch_size();
        if self.is_swin() {
            p * 8
        } else {
            p
        }
    }
}

#[derive(Debug, Clone, Args, Serialize, Deserialize, PartialEq)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    // ---- recipes (expanded into options before parsing; kept here for --help)
    /// A named recipe (see `ibot presets`): its options go before the command line's, so
    /// options given explicitly win.
    #[arg(long, value_name = "NAME", help_heading = "Recipes")]
    #[serde(skip)]
    pub preset: Option<String>,
    /// A TOML file whose keys are option names (e.g. `epochs = 20`, `pred_ratio = [0, 0.3]`);
    /// its options go before the command line's, after a --preset's.
    #[arg(long, value_name = "FILE.toml", help_heading = "Recipes")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // ---- model
    /// Architecture: vit_tiny, vit_small, vit_base, vit_large (deit_tiny/deit_small are
    /// accepted as their ViT twins) or swin_tiny, swin_small, swin_base, swin_large.
    #[arg(long, default_value = "vit_small", help_heading = "Model")]
    pub arch: String,
    /// Side of the square patches in pixels (default 16; 4 for Swin). Smaller patches see finer
    /// detail and cost more. Swin: as in main_ibot.py the network always embeds 4-px patches and
    /// this value only sets the mask cells, which are patch_size x 8 pixels (the official recipe
    /// passes 4: 32-px cells, a 7x7 mask grid on 224-px crops).
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    pub patch_size: Option<i64>,
    /// Swin window size (7 or 14 in the paper). Stages whose grid is not larger than the window
    /// (at --img_size) use one window over the whole grid and no shift, as the official code.
    #[arg(long, allow_hyphen_values = true, default_value_t = 7, help_heading = "Model")]
    #[serde(default = "default_window_size")]
    pub window_size: i64,
    /// Resolution the position-embedding table is built for. The official code always uses
    /// 224, so keep it to produce checkpoints of the official shapes; other crop sizes are
    /// served by bicubic interpolation of the table. Swin: the resolution that fixes each
    /// stage's window and shift (other crop sizes are padded to whole windows).
    #[arg(long, allow_hyphen_values = true, default_value_t = 224, help_heading = "Model")]
    pub img_size: i64,
    /// Override the preset's width (e.g. a small ViT for small images).
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    pub embed_dim: Option<i64>,
    /// Override the preset's number of blocks.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    pub depth: Option<i64>,
    /// Override the preset's number of attention heads.
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    pub num_heads: Option<i64>,
    /// Swin: override the number of blocks of each stage (e.g. `--depths 2 2 6 2`).
    #[arg(long, num_args = 1.., help_heading = "Model")]
    #[serde(default)]
    pub depths: Option<Vec<i64>>,
    /// Swin: override the number of attention heads of each stage (e.g. `--stage_heads 3 6 12 24`).
    #[arg(long, num_args = 1.., help_heading = "Model")]
    #[serde(default)]
    pub stage_heads: Option<Vec<i64>>,
    /// Stochastic-depth rate of the student's last block (the teacher uses none). Swin: as in
    /// main_ibot.py the architecture's own rate is used (swin_tiny 0.1, the others 0.2).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.1, help_heading = "Model")]
    pub drop_path: f64,
    /// Output width of the [CLS] head (number of "prototypes").
    #[arg(long, allow_hyphen_values = true, default_value_t = 8192, help_heading = "Head")]
    pub out_dim: i64,
    /// Output width of the patch head (used when the heads are not shared).
    #[arg(long, allow_hyphen_values = true, default_value_t = 8192, help_heading = "Head")]
    pub patch_out_dim: i64,
    /// Student: one head for [CLS] and patch tokens.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Head")]
    pub shared_head: bool,
    /// Teacher: one head for [CLS] and patch tokens.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Head")]
    pub shared_head_teacher: bool,
    /// Keep the last layer's weight-norm scale fixed at 1: more stable, slightly worse
    /// (the paper uses false for ViT-S, true for ViT-B).
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Head")]
    pub norm_last_layer: bool,
    /// Normalisation between the head's layers: none or ln.
    #[arg(long, default_value = "none", help_heading = "Head")]
    pub norm_in_head: String,
    /// Activation in the head: gelu or relu.
    #[arg(long, default_value = "gelu", help_heading = "Head")]
    pub act_in_head: String,
    /// Hidden width of the head's MLP (official: 2048, no flag there).
    #[arg(long, allow_hyphen_values = true, default_value_t = 2048, help_heading = "Head")]
    pub head_hidden_dim: i64,
    /// Bottleneck width before the last layer (official: 256, no flag there).
    #[arg(long, allow_hyphen_values = true, default_value_t = 256, help_heading = "Head")]
    pub head_bottleneck_dim: i64,

    // ---- iBOT objective
    /// Starting EMA momentum of the teacher, raised to 1 by a cosine schedule. Small batches
    /// want it higher (e.g. 0.9995 at batch 256).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.996, help_heading = "Objective")]
    pub momentum_teacher: f64,
    /// Mask patches of the student's global views and predict the teacher's patch tokens.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Objective")]
    pub use_masked_im_modeling: bool,
    /// Fraction of patches to mask; several values: one is drawn per image.
    #[arg(long, allow_negative_numbers = true, num_args = 1.., default_values_t = vec![0.3], help_heading = "Objective")]
    pub pred_ratio: Vec<f64>,
    /// Half-width of the uniform jitter of each masking ratio (0: none); one value or one per ratio.
    #[arg(long, allow_negative_numbers = true, num_args = 1.., default_values_t = vec![0.0], help_heading = "Objective")]
    pub pred_ratio_var: Vec<f64>,
    /// Mask shape: block (BEiT-style rectangles) or rand (independent patches).
    #[arg(long, default_value = "block", help_heading = "Objective")]
    pub pred_shape: String,
    /// Epoch from which images are masked (before it masks are empty).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0, help_heading = "Objective")]
    pub pred_start_epoch: usize,
    /// Weight of the [CLS] self-distillation loss.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, help_heading = "Objective")]
    pub lambda1: f64,
    /// Weight of the masked-patch loss.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1.0, help_heading = "Objective")]
    pub lambda2: f64,
    /// Teacher [CLS] temperature at the start of its warm-up.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.04, help_heading = "Objective")]
    pub warmup_teacher_temp: f64,
    /// Teacher [CLS] temperature after the warm-up; above ~0.07 training tends to diverge.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.04, help_heading = "Objective")]
    pub teacher_temp: f64,
    /// Teacher patch temperature at the start of its warm-up.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.04, help_heading = "Objective")]
    pub warmup_teacher_patch_temp: f64,
    /// Teacher patch temperature after the warm-up.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.07, help_heading = "Objective")]
    pub teacher_patch_temp: f64,
    /// Epochs of the linear teacher-temperature warm-up (official default 30). As in the
    /// official code it must not exceed --epochs: for shorter runs set it lower, e.g.
    /// `--warmup_teacher_temp_epochs 0`.
    #[arg(long, allow_hyphen_values = true, default_value_t = 30, help_heading = "Objective")]
    pub warmup_teacher_temp_epochs: usize,

    // ---- optimisation
    /// Mixed precision (official default: on). On CUDA: float16 autocast for the forward passes
    /// and the loss, with dynamic loss scaling (GradScaler). On a CPU with AMX: bfloat16
    /// autocast, about twice as fast. Other CPUs (AVX512-BF16 alone included, where bfloat16
    /// measured slower): float32. The choice and its reason are printed at start.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Optimisation")]
    pub use_fp16: bool,
    /// Force the arithmetic instead of letting --use_fp16 choose (auto): float32, bfloat16
    /// (autocast on any device; emulated, hence slower, on CPUs without native bfloat16) or
    /// float16 (CUDA only, with loss scaling). bfloat16 kernels on AMX CPUs are not bit-for-bit
    /// reproducible from run to run; float32 is.
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto, help_heading = "Optimisation")]
    #[serde(default)]
    pub precision: PrecisionChoice,
    /// Weight decay at the start of its cosine schedule.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.04, help_heading = "Optimisation")]
    pub weight_decay: f64,
    /// Weight decay at the end of training.
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.4, help_heading = "Optimisation")]
    pub weight_decay_end: f64,
    /// Per-tensor gradient-norm clip (0 disables).
    #[arg(long, allow_hyphen_values = true, default_value_t = 3.0, help_heading = "Optimisation")]
    pub clip_grad: f64,
    /// Images per step on each device.
    #[arg(long, allow_hyphen_values = true, default_value_t = 128, help_heading = "Optimisation")]
    pub batch_size_per_gpu: usize,
    #[arg(long, allow_hyphen_values = true, default_value_t = 100, help_heading = "Optimisation")]
    pub epochs: usize,
    /// Epochs during which the head's last layer is not updated.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1, help_heading = "Optimisation")]
    pub freeze_last_layer: usize,
    /// Peak learning rate for a total batch of 256 (scaled linearly with the real batch).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.0005, help_heading = "Optimisation")]
    pub lr: f64,
    /// Epochs of linear learning-rate warm-up.
    #[arg(long, allow_hyphen_values = true, default_value_t = 10, help_heading = "Optimisation")]
    pub warmup_epochs: usize,
    /// Learning rate at the end of the cosine schedule.
    #[arg(long, allow_hyphen_values = true, default_value_t = 1e-6, help_heading = "Optimisation")]
    pub min_lr: f64,
    /// adamw (for ViTs), sgd or lars.
    #[arg(long, default_value = "adamw", help_heading = "Optimisation")]
    pub optimizer: String,
    /// Checkpoint to resume from (relative to --output_dir, like the official flag). Without
    /// it, training resumes from <output_dir>/checkpoint.safetensors when that exists.
    #[arg(long, help_heading = "Optimisation")]
    pub load_from: Option<PathBuf>,

    // ---- multi-crop
    #[arg(long, allow_hyphen_values = true, default_value_t = 2, help_heading = "Multi-crop")]
    pub global_crops_number: usize,
    /// Area range of the global crops relative to the image.
    #[arg(long, allow_negative_numbers = true, num_args = 2, default_values_t = vec![0.14, 1.0], help_heading = "Multi-crop")]
    pub global_crops_scale: Vec<f64>,
    /// Number of small local views (0 disables multi-crop; the paper uses 10).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0, help_heading = "Multi-crop")]
    pub local_crops_number: usize,
    /// Area range of the local crops.
    #[arg(long, allow_negative_numbers = true, num_args = 2, default_values_t = vec![0.05, 0.4], help_heading = "Multi-crop")]
    pub local_crops_scale: Vec<f64>,
    /// Side of the global crops in pixels.
    #[arg(long, allow_hyphen_values = true, default_value_t = 224, help_heading = "Multi-crop")]
    pub global_crops_size: usize,
    /// Side of the local crops in pixels.
    #[arg(long, allow_hyphen_values = true, default_value_t = 96, help_heading = "Multi-crop")]
    pub local_crops_size: usize,

    // ---- misc
    /// Training images: an image folder (class sub-folders or flat) or MNIST-style IDX files.
    #[arg(
        long,
        default_value = "/path/to/imagenet/train/",
        help_heading = "Data and output"
    )]
    pub data_path: PathBuf,
    /// Use only this many images (a fixed random subset), e.g. for quick runs.
    #[arg(long, allow_hyphen_values = true, help_heading = "Data and output")]
    pub subset: Option<usize>,
    /// Skip unreadable images (and report how many) instead of stopping.
    #[arg(long, default_value = "false", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Data and output")]
    pub skip_corrupt: bool,
    /// Where log.txt, checkpoints and plots go.
    #[arg(long, default_value = ".", help_heading = "Data and output")]
    pub output_dir: PathBuf,
    /// Also keep checkpointNNNN.safetensors every this many epochs (0: never).
    #[arg(long, allow_hyphen_values = true, default_value_t = 40, help_heading = "Data and output")]
    pub saveckp_freq: usize,
    #[arg(long, allow_hyphen_values = true, default_value_t = 0, help_heading = "Data and output")]
    pub seed: u64,
    /// Data-loading threads.
    #[arg(long, allow_hyphen_values = true, default_value_t = 10, help_heading = "Data and output")]
    pub num_workers: usize,
    /// cpu, cuda, cuda:N or auto (a GPU when there is one).
    #[arg(long, default_value = "auto", help_heading = "Data and output")]
    pub device: String,
    /// Stop after this many epochs of this run (the run resumes later from its checkpoint).
    #[arg(long, allow_hyphen_values = true, help_heading = "Data and output")]
    pub stop_after: Option<usize>,

    // ---- data parallelism (not part of the run's identity: a run may resume on another world)
    #[command(flatten)]
    #[serde(skip)]
    pub dist: DistArgs,
}

impl TrainArgs {
    /// Checks the values no run can use, naming the flag: negative rates and decays,
    /// temperatures that are not positive, ratios outside their range, empty heads.
    pub fn validate(&self) -> Result<()> {
        let nonneg = [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("weight_decay_end", self.weight_decay_end),
            ("clip_grad", self.clip_grad),
            ("lambda1", self.lambda1),
            ("lambda2", self.lambda2),
        ];
        for (name, v) in nonneg {
            ensure!(v >= 0.0 && v.is_finite(), "--{name} must be a number >= 0 (got {v})");
        }
        for (name, v) in [
            ("warmup_teacher_temp", self.warmup_teacher_temp),
            ("teacher_temp", self.teacher_temp),
            ("warmup_teacher_patch_temp", self.warmup_teacher_patch_temp),
            ("teacher_patch_temp", self.teacher_patch_temp),
        ] {
            ensure!(v > 0.0 && v.is_finite(), "--{name} must be > 0 (got {v})");
        }
        ensure!(
            (0.0..=1.0).contains(&self.momentum_teacher),
            "--momentum_teacher must be between 0 and 1 (got {})",
            self.momentum_teacher
        );
        ensure!(
            (0.0..1.0).contains(&self.drop_path),
            "--drop_path must be in [0, 1) (got {})",
            self.drop_path
        );
        for &r in &self.pred_ratio {
            ensure!(
                (0.0..1.0).contains(&r),
                "--pred_ratio values must be in [0, 1) (got {r})"
            );
        }
        for &r in &self.pred_ratio_var {
            ensure!(
                (0.0..1.0).contains(&r),
                "--pred_ratio_var values must be in [0, 1) (got {r})"
            );
        }
        for (name, v) in [
            ("global_crops_scale", &self.global_crops_scale),
            ("local_crops_scale", &self.local_crops_scale),
        ] {
            ensure!(
                v.iter().all(|&x| x > 0.0 && x <= 1.0),
                "--{name} values must be in (0, 1] (got {v:?})"
            );
        }
        // The head options main_ibot.py passes on (its other iBOTHead arguments, such as
        // last_norm, have no flag there); values it accepts that are not implemented here are
        // refused, never ignored.
        if let Err(e) = self.norm_in_head.parse::<HeadNorm>() {
            bail!("--norm_in_head: {e}");
        }
        if let Err(e) = self.act_in_head.parse::<HeadAct>() {
            bail!("--act_in_head: {e}");
        }
        for (name, v) in [
            ("out_dim", self.out_dim),
            ("patch_out_dim", self.patch_out_dim),
            ("head_hidden_dim", self.head_hidden_dim),
            ("head_bottleneck_dim", self.head_bottleneck_dim),
            ("patch_size", self.resolved_patch_size()),
            ("img_size", self.img_size),
        ] {
            ensure!(v >= 1, "--{name} must be at least 1 (got {v})");
        }
        for (name, v) in [
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
        ] {
            if let Some(v) = v {
                ensure!(v >= 1, "--{name} must be at least 1 (got {v})");
            }
        }
        ensure!(
            self.warmup_teacher_temp_epochs <= self.epochs,
            "--warmup_teacher_temp_epochs ({}) is larger than --epochs ({}); as in the official code \
             the teacher-temperature warm-up must fit in the run: pass --warmup_teacher_temp_epochs {} \
             (or fewer)",
            self.warmup_teacher_temp_epochs,
            self.epochs,
            self.epochs
        );
        Ok(())
    }
}

/// How the processes of a data-parallel run find each other. The world itself (rank, world
/// size, master) comes from the launcher: torchrun, `srun` or `ibot launch`; see README.
#[derive(Debug, Clone, Args, PartialEq)]
#[command(rename_all = "snake_case")]
pub struct DistArgs {
    /// Rendezvous, as the official --dist_url: env:// reads MASTER_ADDR and MASTER_PORT (set by
    /// torchrun and `ibot launch`; under SLURM the first node of the job by default, port
    /// 29500); tcp://HOST:PORT names the master directly. Rank and world size always come from
    /// RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS.
    #[arg(long, default_value = "env://", help_heading = "Data parallelism")]
    pub dist_url: String,
    /// Seconds any collective (and joining the group) may wait for the other ranks before the
    /// run stops with an error, like torch's init_process_group(timeout=...).
    #[arg(long, allow_hyphen_values = true, default_value_t = crate::dist::DEFAULT_TIMEOUT_SECS, help_heading = "Data parallelism")]
    pub dist_timeout: u64,
    /// Accepted for `python -m torch.distributed.launch`, which passes it; LOCAL_RANK is read
    /// from the environment.
    #[arg(long, allow_hyphen_values = true, alias = "local-rank", hide = true)]
    pub local_rank: Option<usize>,
}

impl Default for DistArgs {
    fn default() -> Self {
        Self {
            dist_url: "env://".into(),
            dist_timeout: crate::dist::DEFAULT_TIMEOUT_SECS,
            local_rank: None,
        }
    }
}

/// Named recipes, as argument lists.
pub const PRESETS: &[(&str, &str, &[&str])] = &[
    (
        "vit_small_800ep",
        "ViT-S/16, 800 epochs, 2x224 + 10x96 crops: the official README recipe (75.2% k-NN on ImageNet)",
        &[
            "--arch", "vit_small", "--patch_size", "16", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs", "30",
            "--norm_last_layer", "false", "--epochs", "800", "--batch_size_per_gpu", "64", "--shared_head", "true",
            "--out_dim", "8192", "--local_crops_number", "10", "--global_crops_scale", "0.25", "1",
            "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2",
        ],
    ),
    (
        "swin_tiny_14_300ep",
        "Swin-T/14 (4-px patches, window 14), 300 epochs, 2x224 + 10x96 crops, masking from epoch 50: the official README recipe (76.2% k-NN on ImageNet; run there on 40 GPUs, so 26 per GPU was 1040 per step)",
        &[
            "--arch", "swin_tiny", "--patch_size", "4", "--window_size", "14", "--teacher_temp", "0.07",
            "--warmup_teacher_temp_epochs", "30", "--norm_last_layer", "false", "--epochs", "300",
            "--batch_size_per_gpu", "26", "--shared_head", "true", "--out_dim", "8192", "--local_crops_number", "10",
            "--global_crops_scale", "0.25", "1", "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3",
            "--pred_ratio_var", "0", "0.2", "--pred_start_epoch", "50",
        ],
    ),
    (
        "swin_tiny_7_300ep",
        "Swin-T/7 (4-px patches, window 7), 300 epochs: the README gives only `swin_tiny teacher 16 --patch_size 4 --window_size 7` (16 GPUs) for it, its full arguments being in a linked args file, so this is the Swin-T/14 recipe with window 7 (the README's model reached 75.3% k-NN)",
        &[
            "--arch", "swin_tiny", "--patch_size", "4", "--window_size", "7", "--teacher_temp", "0.07",
            "--warmup_teacher_temp_epochs", "30", "--norm_last_layer", "false", "--epochs", "300",
            "--batch_size_per_gpu", "26", "--shared_head", "true", "--out_dim", "8192", "--local_crops_number", "10",
            "--global_crops_scale", "0.25", "1", "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3",
            "--pred_ratio_var", "0", "0.2", "--pred_start_epoch", "50",
        ],
    ),
    (
        "fmnist_tiny",
        "a 4-block, 128-wide ViT with 8-pixel patches on 32-pixel crops: Fashion-MNIST in minutes on a CPU",
        &[
            "--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--depth", "4", "--embed_dim", "128",
            "--num_heads", "4", "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "4",
            "--global_crops_scale", "0.4", "1", "--local_crops_scale", "0.1", "0.4", "--out_dim", "512",
            "--patch_out_dim", "512", "--head_hidden_dim", "512", "--head_bottleneck_dim", "128", "--shared_head",
            "true", "--norm_last_layer", "true", "--batch_size_per_gpu", "128", "--epochs", "4", "--warmup_epochs",
            "1", "--warmup_teacher_temp_epochs", "1", "--teacher_temp", "0.04", "--lr", "0.003", "--min_lr", "1e-5",
            "--momentum_teacher", "0.95", "--drop_path", "0.0", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2",
            "--freeze_last_layer", "0", "--saveckp_freq", "0", "--use_fp16", "false",
        ],
    ),
];

/// Index in `argv` (program name first) of the subcommand: the first argument that is not an
/// option or the value of a global option (`--threads N`). `None` when there is none.
pub fn subcommand_position(argv: &[String]) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        if a == "--threads" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

/// Expands `--preset NAME` and `--config FILE` (TOML with the option names as keys) of `ibot
/// train` / `ibot demo` / `ibot bench train` into arguments placed right after the subcommand, before the remaining
/// command-line arguments, so that explicit options win. Only the arguments of those two
/// subcommands are looked at (a value such as `--output_dir train` is never taken for the
/// subcommand); `ibot launch ... train --preset X` is left alone: each worker expands its own
/// command line.
pub fn expand_config_args(args: Vec<String>) -> Result<Vec<String>> {
    let Some(mut sub) = subcommand_position(&args) else {
        return Ok(args);
    };
    // `bench train` (alias `bench step`) takes every train option, presets included.
    if args[sub] == "bench" && matches!(args.get(sub + 1).map(String::as_str), Some("train" | "step")) {
        sub += 1;
    } else if args[sub] != "train" && args[sub] != "demo" {
        return Ok(args);
    }
    let mut out: Vec<String> = args[..=sub].to_vec();
    let mut front: Vec<String> = Vec::new();
    let mut i = sub + 1;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            out.extend(args[i..].iter().cloned());
            break;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if flag == "--preset" || flag == "--config" {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .with_context(|| format!("{flag} needs a value"))?
                }
            };
            if flag == "--preset" {
                let Some((_, _, list)) = PRESETS.iter().find(|(n, _, _)| *n == value) else {
                    bail!(
                        "unknown preset '{value}'; available: {}",
                        PRESETS
                            .iter()
                            .map(|(n, _, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                front.extend(list.iter().map(|s| s.to_string()));
            } else {
                front.extend(config_file_args(&PathBuf::from(&value))?);
            }
        } else {
            out.push(a.clone());
        }
        i += 1;
    }
    let at = sub + 1;
    out.splice(at..at, front);
    Ok(out)
}

fn config_file_args(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {} as TOML", path.display()))?;
    let mut out = Vec::new();
    for (k, v) in table {
        out.push(format!("--{k}"));
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "{}: option '{k}' has an unsupported value {other}",
                    path.display()
                ),
            })
        };
        match &v {
            toml::Value::Array(items) => {
                for it in items {
                    out.push(scalar(it)?);
                }
            }
            other => out.push(scalar(other)?),
        }
    }
    Ok(out)
}
