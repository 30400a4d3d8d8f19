//! `ibot train`'s options: the official `main_ibot.py` arguments under the same names and with
//! the same defaults, plus a few of our own (crop sizes, model overrides, device, presets). They
//! fill a [`TrainConfig`], which is what training runs with.

use std::path::PathBuf;

use clap::{ArgAction, Args};

use super::{parse_bool, DistArgs};
use crate::config::{
    Arch, DataOptions, DeviceChoice, HeadAct, HeadNorm, HeadOptions, LossOptions, ModelOptions,
    OptimOptions, OptimizerKind, PrecisionChoice, PredShape, RunOptions, ScheduleOptions,
    TrainConfig,
};

#[derive(Debug, Clone, Args, PartialEq)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    // ---- recipes (expanded into options before parsing; kept here for --help)
    /// A named recipe (see `ibot presets`): its options go before the command line's, so
    /// options given explicitly win.
    #[arg(long, value_name = "NAME", help_heading = "Recipes")]
    pub preset: Option<String>,
    /// A TOML file whose keys are option names (e.g. `epochs = 20`, `pred_ratio = [0, 0.3]`);
    /// its options go before the command line's, after a --preset's.
    #[arg(long, value_name = "FILE.toml", help_heading = "Recipes")]
    pub config: Option<PathBuf>,

    // ---- model
    /// Architecture: vit_tiny, vit_small, vit_base, vit_large (deit_tiny/deit_small are
    /// accepted as their ViT twins) or swin_tiny, swin_small, swin_base, swin_large.
    #[arg(long, value_enum, default_value = "vit_small", help_heading = "Model")]
    pub arch: Arch,
    /// Side of the square patches in pixels (default 16; 4 for Swin). Smaller patches see finer
    /// detail and cost more. Swin: as in main_ibot.py the network always embeds 4-px patches and
    /// this value only sets the mask cells, which are patch_size x 8 pixels (the official recipe
    /// passes 4: 32-px cells, a 7x7 mask grid on 224-px crops).
    #[arg(long, allow_hyphen_values = true, help_heading = "Model")]
    pub patch_size: Option<i64>,
    /// Swin window size (7 or 14 in the paper). Stages whose grid is not larger than the window
    /// (at --img_size) use one window over the whole grid and no shift, as the official code.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 7,
        help_heading = "Model"
    )]
    pub window_size: i64,
    /// Resolution the position-embedding table is built for. The official code always uses
    /// 224, so keep it to produce checkpoints of the official shapes; other crop sizes are
    /// served by bicubic interpolation of the table. Swin: the resolution that fixes each
    /// stage's window and shift (other crop sizes are padded to whole windows).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 224,
        help_heading = "Model"
    )]
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
    #[arg(long, action = ArgAction::Set, num_args = 1.., help_heading = "Model")]
    pub depths: Option<Vec<i64>>,
    /// Swin: override the number of attention heads of each stage (e.g. `--stage_heads 3 6 12 24`).
    #[arg(long, action = ArgAction::Set, num_args = 1.., help_heading = "Model")]
    pub stage_heads: Option<Vec<i64>>,
    /// Stochastic-depth rate of the student's last block (the teacher uses none). Swin: as in
    /// main_ibot.py the architecture's own rate is used (swin_tiny 0.1, the others 0.2).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.1,
        help_heading = "Model"
    )]
    pub drop_path: f64,
    /// Output width of the [CLS] head (number of "prototypes").
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 8192,
        help_heading = "Head"
    )]
    pub out_dim: i64,
    /// Output width of the patch head (used when the heads are not shared).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 8192,
        help_heading = "Head"
    )]
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
    pub norm_in_head: HeadNorm,
    /// Activation in the head: gelu or relu.
    #[arg(long, value_enum, default_value = "gelu", help_heading = "Head")]
    pub act_in_head: HeadAct,
    /// Hidden width of the head's MLP (official: 2048, no flag there).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 2048,
        help_heading = "Head"
    )]
    pub head_hidden_dim: i64,
    /// Bottleneck width before the last layer (official: 256, no flag there).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 256,
        help_heading = "Head"
    )]
    pub head_bottleneck_dim: i64,

    // ---- iBOT objective
    /// Starting EMA momentum of the teacher, raised to 1 by a cosine schedule. Small batches
    /// want it higher (e.g. 0.9995 at batch 256).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.996,
        help_heading = "Objective"
    )]
    pub momentum_teacher: f64,
    /// Mask patches of the student's global views and predict the teacher's patch tokens.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Objective")]
    pub use_masked_im_modeling: bool,
    /// Fraction of patches to mask; several values: one is drawn per image.
    #[arg(long, action = ArgAction::Set, allow_negative_numbers = true, num_args = 1.., default_values_t = vec![0.3], help_heading = "Objective")]
    pub pred_ratio: Vec<f64>,
    /// Half-width of the uniform jitter of each masking ratio (0: none); one value or one per ratio.
    #[arg(long, action = ArgAction::Set, allow_negative_numbers = true, num_args = 1.., default_values_t = vec![0.0], help_heading = "Objective")]
    pub pred_ratio_var: Vec<f64>,
    /// Mask shape: block (BEiT-style rectangles) or rand (independent patches).
    #[arg(long, value_enum, default_value = "block", help_heading = "Objective")]
    pub pred_shape: PredShape,
    /// Epoch from which images are masked (before it masks are empty).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0,
        help_heading = "Objective"
    )]
    pub pred_start_epoch: usize,
    /// Weight of the [CLS] self-distillation loss.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 1.0,
        help_heading = "Objective"
    )]
    pub lambda1: f64,
    /// Weight of the masked-patch loss.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 1.0,
        help_heading = "Objective"
    )]
    pub lambda2: f64,
    /// Teacher [CLS] temperature at the start of its warm-up.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.04,
        help_heading = "Objective"
    )]
    pub warmup_teacher_temp: f64,
    /// Teacher [CLS] temperature after the warm-up; above ~0.07 training tends to diverge.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.04,
        help_heading = "Objective"
    )]
    pub teacher_temp: f64,
    /// Teacher patch temperature at the start of its warm-up.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.04,
        help_heading = "Objective"
    )]
    pub warmup_teacher_patch_temp: f64,
    /// Teacher patch temperature after the warm-up.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.07,
        help_heading = "Objective"
    )]
    pub teacher_patch_temp: f64,
    /// Epochs of the linear teacher-temperature warm-up (official default 30). As in the
    /// official code it must not exceed --epochs: for shorter runs set it lower, e.g.
    /// `--warmup_teacher_temp_epochs 0`.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 30,
        help_heading = "Objective"
    )]
    pub warmup_teacher_temp_epochs: usize,

    // ---- optimisation
    /// Mixed precision (official default: on). On CUDA: float16 autocast for the forward passes
    /// and the loss, with dynamic loss scaling (GradScaler). On a CPU with AMX: bfloat16
    /// autocast, about twice as fast. On a CPU with AVX512-BF16 but no AMX: bfloat16 only if a
    /// sub-second start-up probe (cached per machine in ~/.cache/ibot/precision-probe.json)
    /// measures it at most 0.8x the float32 time. Other CPUs: float32. The choice and its reason
    /// are printed at start; a resumed run keeps the precision stored in its checkpoint.
    #[arg(long, default_value = "true", value_parser = parse_bool, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Optimisation")]
    pub use_fp16: bool,
    /// Force the arithmetic instead of letting --use_fp16 choose (auto): float32, bfloat16
    /// (autocast on any device; emulated, hence slower, on CPUs without native bfloat16) or
    /// float16 (CUDA only, with loss scaling). bfloat16 kernels on AMX CPUs are not bit-for-bit
    /// reproducible from run to run; float32 is.
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto, help_heading = "Optimisation")]
    pub precision: PrecisionChoice,
    /// Weight decay at the start of its cosine schedule.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.04,
        help_heading = "Optimisation"
    )]
    pub weight_decay: f64,
    /// Weight decay at the end of training.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.4,
        help_heading = "Optimisation"
    )]
    pub weight_decay_end: f64,
    /// Per-tensor gradient-norm clip (0 disables).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 3.0,
        help_heading = "Optimisation"
    )]
    pub clip_grad: f64,
    /// Images per step on each device.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 128,
        help_heading = "Optimisation"
    )]
    pub batch_size_per_gpu: usize,
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 100,
        help_heading = "Optimisation"
    )]
    pub epochs: usize,
    /// Epochs during which the head's last layer is not updated.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 1,
        help_heading = "Optimisation"
    )]
    pub freeze_last_layer: usize,
    /// Peak learning rate for a total batch of 256 (scaled linearly with the real batch).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0.0005,
        help_heading = "Optimisation"
    )]
    pub lr: f64,
    /// Epochs of linear learning-rate warm-up.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 10,
        help_heading = "Optimisation"
    )]
    pub warmup_epochs: usize,
    /// Learning rate at the end of the cosine schedule.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 1e-6,
        help_heading = "Optimisation"
    )]
    pub min_lr: f64,
    /// adamw (for ViTs), sgd or lars.
    #[arg(
        long,
        value_enum,
        default_value = "adamw",
        help_heading = "Optimisation"
    )]
    pub optimizer: OptimizerKind,
    /// Checkpoint to resume from (relative to --output_dir, like the official flag). Without
    /// it, training resumes from <output_dir>/checkpoint.safetensors when that exists.
    #[arg(long, help_heading = "Optimisation")]
    pub load_from: Option<PathBuf>,

    // ---- multi-crop
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 2,
        help_heading = "Multi-crop"
    )]
    pub global_crops_number: usize,
    /// Area range of the global crops relative to the image.
    #[arg(long, action = ArgAction::Set, allow_negative_numbers = true, num_args = 2, default_values_t = vec![0.14, 1.0], help_heading = "Multi-crop")]
    pub global_crops_scale: Vec<f64>,
    /// Number of small local views (0 disables multi-crop; the paper uses 10).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0,
        help_heading = "Multi-crop"
    )]
    pub local_crops_number: usize,
    /// Area range of the local crops.
    #[arg(long, action = ArgAction::Set, allow_negative_numbers = true, num_args = 2, default_values_t = vec![0.05, 0.4], help_heading = "Multi-crop")]
    pub local_crops_scale: Vec<f64>,
    /// Side of the global crops in pixels.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 224,
        help_heading = "Multi-crop"
    )]
    pub global_crops_size: usize,
    /// Side of the local crops in pixels.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 96,
        help_heading = "Multi-crop"
    )]
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
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 40,
        help_heading = "Data and output"
    )]
    pub saveckp_freq: usize,
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 0,
        help_heading = "Data and output"
    )]
    pub seed: u64,
    /// Data-loading threads.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value_t = 10,
        help_heading = "Data and output"
    )]
    pub num_workers: usize,
    /// cpu, cuda, cuda:N or auto (a GPU when there is one).
    #[arg(long, default_value = "auto", help_heading = "Data and output")]
    pub device: DeviceChoice,
    /// Stop after this many epochs of this run (the run resumes later from its checkpoint).
    #[arg(long, allow_hyphen_values = true, help_heading = "Data and output")]
    pub stop_after: Option<usize>,

    // ---- data parallelism (not part of the run's identity: a run may resume on another world)
    #[command(flatten)]
    pub dist: DistArgs,
}

impl TrainArgs {
    /// [`TrainArgs::into_config`] without giving the options up.
    pub fn to_config(&self) -> TrainConfig {
        self.clone().into_config()
    }

    /// The configuration these options describe.
    pub fn into_config(self) -> TrainConfig {
        TrainConfig {
            model: ModelOptions {
                arch: self.arch,
                patch_size: self.patch_size,
                window_size: self.window_size,
                img_size: self.img_size,
                embed_dim: self.embed_dim,
                depth: self.depth,
                num_heads: self.num_heads,
                depths: self.depths,
                stage_heads: self.stage_heads,
                drop_path: self.drop_path,
            },
            head: HeadOptions {
                out_dim: self.out_dim,
                patch_out_dim: self.patch_out_dim,
                shared_head: self.shared_head,
                shared_head_teacher: self.shared_head_teacher,
                norm_last_layer: self.norm_last_layer,
                norm_in_head: self.norm_in_head,
                act_in_head: self.act_in_head,
                head_hidden_dim: self.head_hidden_dim,
                head_bottleneck_dim: self.head_bottleneck_dim,
            },
            loss: LossOptions {
                use_masked_im_modeling: self.use_masked_im_modeling,
                pred_ratio: self.pred_ratio,
                pred_ratio_var: self.pred_ratio_var,
                pred_shape: self.pred_shape,
                pred_start_epoch: self.pred_start_epoch,
                lambda1: self.lambda1,
                lambda2: self.lambda2,
                warmup_teacher_temp: self.warmup_teacher_temp,
                teacher_temp: self.teacher_temp,
                warmup_teacher_patch_temp: self.warmup_teacher_patch_temp,
                teacher_patch_temp: self.teacher_patch_temp,
                warmup_teacher_temp_epochs: self.warmup_teacher_temp_epochs,
            },
            optim: OptimOptions {
                optimizer: self.optimizer,
                use_fp16: self.use_fp16,
                precision: self.precision,
                clip_grad: self.clip_grad,
                batch_size_per_gpu: self.batch_size_per_gpu,
                freeze_last_layer: self.freeze_last_layer,
            },
            schedule: ScheduleOptions {
                epochs: self.epochs,
                lr: self.lr,
                warmup_epochs: self.warmup_epochs,
                min_lr: self.min_lr,
                weight_decay: self.weight_decay,
                weight_decay_end: self.weight_decay_end,
                momentum_teacher: self.momentum_teacher,
            },
            data: DataOptions {
                data_path: self.data_path,
                subset: self.subset,
                skip_corrupt: self.skip_corrupt,
                num_workers: self.num_workers,
                global_crops_number: self.global_crops_number,
                global_crops_scale: self.global_crops_scale,
                local_crops_number: self.local_crops_number,
                local_crops_scale: self.local_crops_scale,
                global_crops_size: self.global_crops_size,
                local_crops_size: self.local_crops_size,
            },
            run: RunOptions {
                output_dir: self.output_dir,
                saveckp_freq: self.saveckp_freq,
                seed: self.seed,
                device: self.device,
                load_from: self.load_from,
                stop_after: self.stop_after,
            },
            dist: self.dist.config(),
        }
    }
}

/// `ibot train`: runs (or resumes) training, then says what was done.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    crate::train::run::train_and_report(&args.into_config())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    /// The command line's defaults are the configuration's: one set of official defaults.
    /// (Checked by hand: `epochs: 101` in `ScheduleOptions::default` fails it.)
    #[test]
    fn command_line_defaults_are_the_configuration_defaults() {
        let c = Cli::parse_from(["x"]).args.into_config();
        assert_eq!(c, TrainConfig::default());
        // A stored configuration without any key reads as the defaults too.
        assert_eq!(
            TrainConfig::from_json(&serde_json::json!({"unknown_future_option": 3})).unwrap(),
            TrainConfig::default()
        );
    }

    /// Every `ibot train` option that describes the run is stored in checkpoints and args.json
    /// under its own name, and nothing else is: the stored map and the command line cannot
    /// drift apart when an option is added. (Checked by hand: a serde rename of `min_lr` fails
    /// it.)
    #[test]
    fn every_run_option_is_stored_under_its_flag_name() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|f| {
                // Recipes are expanded before parsing; data parallelism is not the run's identity.
                !["preset", "config", "dist_url", "dist_timeout", "local_rank"]
                    .contains(&f.as_str())
            })
            .collect();
        flags.sort();
        let v = serde_json::to_value(TrainConfig::default()).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, flags);
    }
}
