//! Weights from and for other tools: official PyTorch checkpoints (read without executing
//! anything), backbone export, layout detection.

pub mod extract;
pub mod pth;
pub mod weights;

pub use pth::{read_pth, read_pth_subset, PthFile};
pub use weights::{
    export_backbone, infer_backbone_config, infer_head_config, infer_swin_config, infer_vit_config,
    infer_vit_config_with, load_pretrained, load_pretrained_with, Pretrained, SWIN_CONFIG_KEY,
    SWIN_IMG_SIZE, VIT_CONFIG_KEY,
};
