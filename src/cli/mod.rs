//! The command line: one module per `ibot` subcommand holding its clap options, which fill the
//! library's plain configuration structs (see [`crate::config`]). Parsing happens here and only
//! here: string options with a fixed set of values become enums at this boundary, with the
//! spellings and defaults of the official scripts. `src/main.rs` only dispatches.

pub mod bench;
pub mod combine;
pub mod common;
pub mod correspondence;
pub mod demo;
pub mod eval_copydetection;
pub mod eval_knn;
pub mod eval_linear;
pub mod eval_linear_multi;
pub mod eval_logreg;
pub mod eval_retrieval;
pub mod eval_unsup;
pub mod eval_video_seg;
pub mod extract_backbone;
pub mod extract_features;
pub mod finetune;
pub mod launch;
pub mod model_args;
pub mod patterns;
pub mod presets;
pub mod train;
pub mod verify_fixture;
pub mod video_generation;
pub mod visualize_attention;
pub mod weights;

use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};

pub use model_args::ModelArgs;
pub use weights::WeightsArgs;

use crate::config::{Arch, CheckpointKey, HeadAct, OptimizerKind, PredShape};
use crate::dist::DistConfig;

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
        let d = DistConfig::default();
        Self {
            dist_url: d.dist_url,
            dist_timeout: d.dist_timeout,
            local_rank: None,
        }
    }
}

impl DistArgs {
    pub fn config(&self) -> DistConfig {
        DistConfig {
            dist_url: self.dist_url.clone(),
            dist_timeout: self.dist_timeout,
        }
    }
}

/// `clap::ValueEnum` for a library enum (the library types stay free of clap): the variants
/// and the names the command line accepts, first name canonical, others aliases.
macro_rules! value_enum {
    ($t:ty { $($v:expr => $name:literal $(| $alias:literal)*),+ $(,)? }) => {
        impl ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($v),+]
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                $(if *self == $v {
                    return Some(PossibleValue::new($name)$(.alias($alias))*);
                })+
                None
            }
        }
    };
}

value_enum!(OptimizerKind {
    OptimizerKind::Adamw => "adamw",
    OptimizerKind::Sgd => "sgd",
    OptimizerKind::Lars => "lars",
});

value_enum!(PredShape {
    PredShape::Block => "block",
    PredShape::Rand => "rand",
});

value_enum!(HeadAct {
    HeadAct::Gelu => "gelu",
    HeadAct::Relu => "relu",
});

value_enum!(CheckpointKey {
    CheckpointKey::Teacher => "teacher",
    CheckpointKey::Student => "student",
});

value_enum!(Arch {
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
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant has a command-line name, and it is the name the library parses and prints.
    #[test]
    fn value_enums_name_every_variant_as_the_library_does() {
        for a in Arch::value_variants() {
            let n = a.to_possible_value().unwrap();
            assert_eq!(n.get_name(), a.as_str());
            assert_eq!(n.get_name().parse::<Arch>().unwrap(), *a);
        }
        for k in CheckpointKey::value_variants() {
            assert_eq!(k.to_possible_value().unwrap().get_name(), k.as_str());
        }
        for o in OptimizerKind::value_variants() {
            let n = o.to_possible_value().unwrap();
            assert_eq!(n.get_name().parse::<OptimizerKind>().unwrap(), *o);
        }
        for p in PredShape::value_variants() {
            let n = p.to_possible_value().unwrap();
            assert_eq!(n.get_name().parse::<PredShape>().unwrap(), *p);
        }
        for h in HeadAct::value_variants() {
            let n = h.to_possible_value().unwrap();
            assert_eq!(n.get_name().parse::<HeadAct>().unwrap(), *h);
        }
    }
}
