//! The configuration of a training run, apart from the command line.
//!
//! [`TrainConfig`] is what the library's training entry points take
//! ([`crate::train::run::train`]); `ibot train`'s clap options ([`crate::cli::train::TrainArgs`])
//! fill it. Each section is a plain struct (serde, no clap) whose `Default` is the official
//! main_ibot.py default, and every string option with a fixed set of values is an enum, parsed
//! once where the command line (or a stored configuration) is read.
//!
//! Checkpoints and `args.json` store the configuration as one flat JSON map under the official
//! option names (the sections are flattened), read tolerantly: unknown keys are ignored and
//! missing keys take their defaults, so a checkpoint written before an option existed still
//! loads.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

pub use crate::data::masking::PredShape;
pub use crate::device::DeviceChoice;
pub use crate::dist::DistConfig;
pub use crate::models::{HeadAct, HeadNorm};
pub use crate::train::amp::PrecisionChoice;
pub use crate::train::optim::OptimizerKind;

/// A backbone architecture of main_ibot.py's `--arch` (deit_tiny / deit_small are the ViTs of
/// the same shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    VitTiny,
    VitSmall,
    VitBase,
    VitLarge,
    DeitTiny,
    DeitSmall,
    SwinTiny,
    SwinSmall,
    SwinBase,
    SwinLarge,
}

impl Arch {
    pub const ALL: [Arch; 10] = [
        Arch::VitTiny,
        Arch::VitSmall,
        Arch::VitBase,
        Arch::VitLarge,
        Arch::DeitTiny,
        Arch::DeitSmall,
        Arch::SwinTiny,
        Arch::SwinSmall,
        Arch::SwinBase,
        Arch::SwinLarge,
    ];

    /// The official name (`vit_small`, `swin_tiny`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::VitTiny => "vit_tiny",
            Arch::VitSmall => "vit_small",
            Arch::VitBase => "vit_base",
            Arch::VitLarge => "vit_large",
            Arch::DeitTiny => "deit_tiny",
            Arch::DeitSmall => "deit_small",
            Arch::SwinTiny => "swin_tiny",
            Arch::SwinSmall => "swin_small",
            Arch::SwinBase => "swin_base",
            Arch::SwinLarge => "swin_large",
        }
    }

    /// Whether this is a Swin Transformer.
    pub fn is_swin(self) -> bool {
        matches!(
            self,
            Arch::SwinTiny | Arch::SwinSmall | Arch::SwinBase | Arch::SwinLarge
        )
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match Arch::ALL.iter().find(|a| a.as_str() == s) {
            Some(a) => Ok(*a),
            None => bail!(
                "unknown architecture '{s}': expected one of {}",
                Arch::ALL.map(Arch::as_str).join(", ")
            ),
        }
    }
}

/// Which network of a full checkpoint to take (`--checkpoint_key`, official default teacher).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKey {
    #[default]
    Teacher,
    Student,
}

impl CheckpointKey {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKey::Teacher => "teacher",
            CheckpointKey::Student => "student",
        }
    }
}

impl std::fmt::Display for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CheckpointKey {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "teacher" => Ok(CheckpointKey::Teacher),
            "student" => Ok(CheckpointKey::Student),
            other => bail!("--checkpoint_key must be teacher or student, not '{other}'"),
        }
    }
}

/// The backbone (`--arch` and its overrides).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelOptions {
    pub arch: Arch,
    /// `None`: 16 for ViT, 4 for Swin.
    pub patch_size: Option<i64>,
    pub window_size: i64,
    pub img_size: i64,
    pub embed_dim: Option<i64>,
    pub depth: Option<i64>,
    pub num_heads: Option<i64>,
    pub depths: Option<Vec<i64>>,
    pub stage_heads: Option<Vec<i64>>,
    pub drop_path: f64,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            arch: Arch::VitSmall,
            patch_size: None,
            window_size: 7,
            img_size: 224,
            embed_dim: None,
            depth: None,
            num_heads: None,
            depths: None,
            stage_heads: None,
            drop_path: 0.1,
        }
    }
}

/// The projection heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeadOptions {
    pub out_dim: i64,
    pub patch_out_dim: i64,
    pub shared_head: bool,
    pub shared_head_teacher: bool,
    pub norm_last_layer: bool,
    pub norm_in_head: HeadNorm,
    pub act_in_head: HeadAct,
    pub head_hidden_dim: i64,
    pub head_bottleneck_dim: i64,
}

impl Default for HeadOptions {
    fn default() -> Self {
        Self {
            out_dim: 8192,
            patch_out_dim: 8192,
            shared_head: false,
            shared_head_teacher: true,
            norm_last_layer: true,
            norm_in_head: HeadNorm::None,
            act_in_head: HeadAct::Gelu,
            head_hidden_dim: 2048,
            head_bottleneck_dim: 256,
        }
    }
}

/// The iBOT objective: masking, loss weights and teacher temperatures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossOptions {
    pub use_masked_im_modeling: bool,
    pub pred_ratio: Vec<f64>,
    pub pred_ratio_var: Vec<f64>,
    pub pred_shape: PredShape,
    pub pred_start_epoch: usize,
    pub lambda1: f64,
    pub lambda2: f64,
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_patch_temp: f64,
    pub teacher_patch_temp: f64,
    pub warmup_teacher_temp_epochs: usize,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self {
            use_masked_im_modeling: true,
            pred_ratio: vec![0.3],
            pred_ratio_var: vec![0.0],
            pred_shape: PredShape::Block,
            pred_start_epoch: 0,
            lambda1: 1.0,
            lambda2: 1.0,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_patch_temp: 0.04,
            teacher_patch_temp: 0.07,
            warmup_teacher_temp_epochs: 30,
        }
    }
}

/// The optimizer, its arithmetic and the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimOptions {
    pub optimizer: OptimizerKind,
    pub use_fp16: bool,
    pub precision: PrecisionChoice,
    pub clip_grad: f64,
    pub batch_size_per_gpu: usize,
    pub freeze_last_layer: usize,
}

impl Default for OptimOptions {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Adamw,
            use_fp16: true,
            precision: PrecisionChoice::Auto,
            clip_grad: 3.0,
            batch_size_per_gpu: 128,
            freeze_last_layer: 1,
        }
    }
}

/// The schedules: length of the run, learning rate, weight decay, teacher momentum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleOptions {
    pub epochs: usize,
    /// Peak learning rate for a total batch of 256.
    pub lr: f64,
    pub warmup_epochs: usize,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 0.0005,
            warmup_epochs: 10,
            min_lr: 1e-6,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
        }
    }
}

/// The training images and their multi-crop augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    pub data_path: PathBuf,
    pub subset: Option<usize>,
    pub skip_corrupt: bool,
    pub num_workers: usize,
    pub global_crops_number: usize,
    pub global_crops_scale: Vec<f64>,
    pub local_crops_number: usize,
    pub local_crops_scale: Vec<f64>,
    pub global_crops_size: usize,
    pub local_crops_size: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            data_path: PathBuf::from("/path/to/imagenet/train/"),
            subset: None,
            skip_corrupt: false,
            num_workers: 10,
            global_crops_number: 2,
            global_crops_scale: vec![0.14, 1.0],
            local_crops_number: 0,
            local_crops_scale: vec![0.05, 0.4],
            global_crops_size: 224,
            local_crops_size: 96,
        }
    }
}

/// Where the run writes, how it starts and stops, and on which device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunOptions {
    pub output_dir: PathBuf,
    pub saveckp_freq: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub load_from: Option<PathBuf>,
    pub stop_after: Option<usize>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("."),
            saveckp_freq: 40,
            seed: 0,
            device: DeviceChoice::Auto,
            load_from: None,
            stop_after: None,
        }
    }
}

/// Everything `ibot train` runs with (see the module documentation). Serialised flat, under the
/// official option names.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub model: ModelOptions,
    #[serde(flatten)]
    pub head: HeadOptions,
    #[serde(flatten)]
    pub loss: LossOptions,
    #[serde(flatten)]
    pub optim: OptimOptions,
    #[serde(flatten)]
    pub schedule: ScheduleOptions,
    #[serde(flatten)]
    pub data: DataOptions,
    #[serde(flatten)]
    pub run: RunOptions,
    /// How the processes of a data-parallel run meet: not part of the run's identity (a run may
    /// resume on another world), so never stored.
    #[serde(skip)]
    pub dist: DistConfig,
}

impl TrainConfig {
    /// Reads a stored configuration (a checkpoint's or `args.json`) tolerantly: unknown keys are
    /// ignored, missing keys take their defaults.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        Ok(serde_json::from_value(v.clone())?)
    }

    /// Whether `--arch` names a Swin Transformer.
    pub fn is_swin(&self) -> bool {
        self.model.arch.is_swin()
    }

    /// `--patch_size`, or its default: 16 for ViT, 4 for Swin (the official Swin recipe's).
    pub fn resolved_patch_size(&self) -> i64 {
        self.model
            .patch_size
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

    /// Checks the values no run can use, naming the flag: negative rates and decays,
    /// temperatures that are not positive, ratios outside their range, empty heads.
    pub fn validate(&self) -> Result<()> {
        let (s, l, h, m) = (&self.schedule, &self.loss, &self.head, &self.model);
        let nonneg = [
            ("lr", s.lr),
            ("min_lr", s.min_lr),
            ("weight_decay", s.weight_decay),
            ("weight_decay_end", s.weight_decay_end),
            ("clip_grad", self.optim.clip_grad),
            ("lambda1", l.lambda1),
            ("lambda2", l.lambda2),
        ];
        for (name, v) in nonneg {
            ensure!(
                v >= 0.0 && v.is_finite(),
                "--{name} must be a number >= 0 (got {v})"
            );
        }
        for (name, v) in [
            ("warmup_teacher_temp", l.warmup_teacher_temp),
            ("teacher_temp", l.teacher_temp),
            ("warmup_teacher_patch_temp", l.warmup_teacher_patch_temp),
            ("teacher_patch_temp", l.teacher_patch_temp),
        ] {
            ensure!(v > 0.0 && v.is_finite(), "--{name} must be > 0 (got {v})");
        }
        ensure!(
            (0.0..=1.0).contains(&s.momentum_teacher),
            "--momentum_teacher must be between 0 and 1 (got {})",
            s.momentum_teacher
        );
        ensure!(
            (0.0..1.0).contains(&m.drop_path),
            "--drop_path must be in [0, 1) (got {})",
            m.drop_path
        );
        for &r in &l.pred_ratio {
            ensure!(
                (0.0..1.0).contains(&r),
                "--pred_ratio values must be in [0, 1) (got {r})"
            );
        }
        for &r in &l.pred_ratio_var {
            ensure!(
                (0.0..1.0).contains(&r),
                "--pred_ratio_var values must be in [0, 1) (got {r})"
            );
        }
        for (name, v) in [
            ("global_crops_scale", &self.data.global_crops_scale),
            ("local_crops_scale", &self.data.local_crops_scale),
        ] {
            ensure!(
                v.iter().all(|&x| x > 0.0 && x <= 1.0),
                "--{name} values must be in (0, 1] (got {v:?})"
            );
        }
        for (name, v) in [
            ("out_dim", h.out_dim),
            ("patch_out_dim", h.patch_out_dim),
            ("head_hidden_dim", h.head_hidden_dim),
            ("head_bottleneck_dim", h.head_bottleneck_dim),
            ("patch_size", self.resolved_patch_size()),
            ("img_size", m.img_size),
        ] {
            ensure!(v >= 1, "--{name} must be at least 1 (got {v})");
        }
        for (name, v) in [
            ("embed_dim", m.embed_dim),
            ("depth", m.depth),
            ("num_heads", m.num_heads),
        ] {
            if let Some(v) = v {
                ensure!(v >= 1, "--{name} must be at least 1 (got {v})");
            }
        }
        ensure!(
            l.warmup_teacher_temp_epochs <= s.epochs,
            "--warmup_teacher_temp_epochs ({}) is larger than --epochs ({}); as in the official code \
             the teacher-temperature warm-up must fit in the run: pass --warmup_teacher_temp_epochs {} \
             (or fewer)",
            l.warmup_teacher_temp_epochs,
            s.epochs,
            s.epochs
        );
        Ok(())
    }
}
