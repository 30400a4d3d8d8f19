//! `ibot visualize-attention` (the official visualize_attention.py): the [CLS] token's
//! attention in the last block, per head, for one image.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::attention;
use crate::eval::weights::WeightsConfig;

/// Options of `ibot visualize-attention`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttentionConfig {
    pub weights: WeightsConfig,
    /// The image to look at, or a folder of images (each into its own sub-folder).
    pub image_path: PathBuf,
    /// HEIGHT WIDTH, or the shorter side N (aspect ratio kept).
    pub image_size: Vec<usize>,
    /// Share of each head's attention mass whose patches are drawn (0: no masks).
    pub threshold: f64,
    /// Where the pictures go.
    pub output_dir: PathBuf,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self {
            weights: WeightsConfig::default(),
            image_path: PathBuf::new(),
            image_size: vec![480, 480],
            threshold: 0.6,
            output_dir: PathBuf::from("."),
        }
    }
}

/// Heat maps, masks over the image and the raw maps, written to `output_dir`.
pub fn run(a: &AttentionConfig) -> Result<()> {
    let device = a.weights.device.select()?;
    let (_, backbone) = a.weights.load(device)?;
    let Some(vit) = backbone.as_vit() else {
        bail!(
            "visualize-attention needs a ViT: a Swin Transformer has no global [CLS] token, so \
             there is no [CLS] attention to show (its attention stays within local windows)"
        )
    };
    let threshold = (a.threshold > 0.0).then_some(a.threshold);
    let dirs = attention::visualize_path(
        vit,
        &a.image_path,
        &a.image_size,
        threshold,
        &a.output_dir,
        usize::MAX,
        device,
    )?;
    println!(
        "attention of {} image(s) in {}",
        dirs.len(),
        a.output_dir.display()
    );
    Ok(())
}
