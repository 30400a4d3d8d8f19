//! Evaluation protocols.

pub mod cluster;
pub mod combine;
pub mod copydetection;
pub mod extract;
pub mod features;
pub mod knn;
pub mod linear;
pub mod linear_multi;
pub mod logreg;
pub mod retrieval;
pub mod split;
pub mod unsup;
pub mod video_seg;
pub mod weights;

use anyhow::{ensure, Result};

use crate::data::dataset::Dataset;

/// Largest evaluation crop side (`--crop_size`).
pub const MAX_CROP: usize = 4096;

/// The evaluation crop side: `--crop_size` when given, else the resolution the checkpoint was
/// trained at (its position-embedding grid: 224 for the official models, 32 for the demo's).
/// Says which and why on stderr.
pub fn resolve_crop(explicit: Option<usize>, trained: usize, patch: usize) -> Result<usize> {
    let size = explicit.unwrap_or(trained);
    ensure!(
        (1..=MAX_CROP).contains(&size),
        "--crop_size must be between 1 and {MAX_CROP} pixels (got {size})"
    );
    ensure!(
        size >= patch,
        "--crop_size {size} is smaller than one {patch}-pixel patch of this model"
    );
    match explicit {
        Some(_) => eprintln!("crop {size} (--crop_size; this checkpoint was trained at {trained})"),
        None => eprintln!("crop {size}: the resolution this checkpoint was trained at"),
    }
    Ok(size)
}

/// Warns when evaluation views of side `size` blow the data set's images (judged by the first
/// one) up more than twice: slower, hungrier, and usually not what the model saw in training.
pub fn warn_upsampling(ds: &dyn Dataset, size: usize, explicit: bool) {
    if ds.is_empty() {
        return;
    }
    let Ok((img, _)) = ds.get(0) else {
        return;
    };
    let short = img.width.min(img.height).max(1);
    if size > 2 * short {
        eprintln!(
            "warning: crop {size} upsamples the {}x{} images {:.1}x ({}){}",
            img.width,
            img.height,
            size as f64 / short as f64,
            ds.describe(),
            if explicit {
                "; a smaller --crop_size is faster and needs less memory"
            } else {
                " (the checkpoint's resolution); --crop_size sets another"
            }
        );
    }
}
