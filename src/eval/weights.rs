//! The weights an evaluation command reads (`--pretrained_weights`, `--checkpoint_key`,
//! `--arch`, `--num_heads`, `--crop_size`, `--device`) and opening their backbone.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::config::{Arch, CheckpointKey};
use crate::device::DeviceChoice;
use crate::interop::Pretrained;
use crate::models::Backbone;

/// Where the weights come from (shared by the evaluation commands).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WeightsConfig {
    /// An `ibot train` checkpoint, an exported backbone or an official .pth.
    pub pretrained_weights: Option<PathBuf>,
    /// Network to take from full checkpoints.
    pub checkpoint_key: CheckpointKey,
    /// Checked against the weights; only needed for ViT widths no standard ViT has.
    pub arch: Option<Arch>,
    /// Attention heads, for weights of a width no standard ViT has.
    pub num_heads: Option<i64>,
    /// Evaluation crop side (default: the resolution the weights were built for).
    pub crop_size: Option<usize>,
    pub device: DeviceChoice,
}

impl WeightsConfig {
    /// The weights and their backbone on `device` (no crop: visualize-attention sizes its
    /// image itself).
    pub fn load(&self, device: Device) -> Result<(Pretrained, Backbone)> {
        let Some(path) = &self.pretrained_weights else {
            bail!("--pretrained_weights is required")
        };
        let p = crate::interop::load_pretrained_with(
            path,
            self.checkpoint_key.as_str(),
            self.arch.map(Arch::as_str),
            self.num_heads,
        )?;
        eprintln!("weights: {}", p.description);
        let (_, backbone) = p.backbone_model(device)?;
        Ok((p, backbone))
    }

    /// The backbone (and the raw weights, for the head) on the `--device`, with the crop side
    /// to use.
    pub fn open_backbone(&self) -> Result<(Pretrained, Backbone, usize, Device)> {
        self.open_backbone_on(self.device.select()?)
    }

    /// [`WeightsConfig::open_backbone`] on a given device (a data-parallel rank's).
    pub fn open_backbone_on(
        &self,
        device: Device,
    ) -> Result<(Pretrained, Backbone, usize, Device)> {
        let (p, backbone) = self.load(device)?;
        let size = super::resolve_crop(
            self.crop_size,
            p.config.img_size() as usize,
            p.config.patch_size() as usize,
        )?;
        Ok((p, backbone, size, device))
    }
}
