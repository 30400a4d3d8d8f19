//! Data for fine-tuning classifiers (issue 15): timm's training transform (RandomResizedCrop,
//! flip, RandAugment, random erasing), the official evaluation transform, Mixup/CutMix with
//! label smoothing, and the data sets of the fine-tuning recipes (CIFAR-10/100 files,
//! SimCLRv2-style split files for semi-supervised subsets).
//!
//! Every random decision goes through [`Draws`], so each op can be run on the draws the
//! official code made and compared bit for bit (tests/cls_data.rs records timm's draws in
//! Python and replays them here).

pub mod cifar;
pub mod config;
pub mod draws;
pub mod mixup;
pub mod pickle;
pub mod pil;
pub mod rand_augment;
pub mod random_erasing;
pub mod split;
pub mod transforms;

pub use cifar::{CifarDataset, CifarKind};
pub use config::{ClsAugConfig, EraseMode, Interpolation};
pub use draws::{Draws, Replay, RngDraws};
pub use mixup::{mix_with, mixup_target, rand_bbox_with, Lam, Mixup, MixupConfig, MixupMode};
pub use rand_augment::{rand_augment_op, RandAugment, RandAugmentConfig, RandOp};
pub use random_erasing::{random_erasing_with, RandomErasing};
pub use split::{read_split_file, subset_from_split_file};
pub use transforms::{rrc_params, EvalTransform, TrainTransform};
