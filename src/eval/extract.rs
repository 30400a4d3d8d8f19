//! `ibot extract-features`: the features of every image of a data set to a safetensors file
//! (`features` [N, D], `labels` [N]).

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::features::{self, FeatureSpec};
use super::split::first_n;
use super::weights::WeightsConfig;

/// Options of `ibot extract-features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FeatureConfig {
    pub weights: WeightsConfig,
    /// An image folder (with or without class folders) or a folder of IDX files.
    pub data_path: PathBuf,
    /// IDX split to read (train or t10k); ignored for image folders.
    pub split: String,
    /// The safetensors file to write.
    pub output: PathBuf,
    pub n_last_blocks: usize,
    pub avgpool_patchtokens: u8,
    pub batch_size_per_gpu: usize,
    pub num_workers: usize,
    pub subset: Option<usize>,
    pub dist: crate::dist::DistConfig,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self {
            weights: WeightsConfig::default(),
            data_path: PathBuf::new(),
            split: "train".into(),
            output: PathBuf::new(),
            n_last_blocks: 1,
            avgpool_patchtokens: 0,
            batch_size_per_gpu: 128,
            num_workers: 2,
            subset: None,
            dist: Default::default(),
        }
    }
}

/// Extracts the features (every rank its shard) and writes them (rank 0).
pub fn run(f: &FeatureConfig) -> Result<()> {
    let (comm, device, _) = crate::dist::join_world(&f.dist, f.weights.device)?;
    let comm = comm.as_ref();
    // Only the main rank writes (on several nodes, the folder may exist on its node only).
    if comm.is_main() {
        crate::util::check_output_file(&f.output, "--output")?;
    }
    let (_, vit, size, device) = f.weights.open_backbone_on(device)?;
    let spec = FeatureSpec {
        n_last_blocks: f.n_last_blocks,
        avgpool: f.avgpool_patchtokens,
    };
    spec.validate_for(&vit)?;
    let ds = crate::data::dataset::open(&f.data_path, &f.split)?;
    if comm.is_main() {
        super::warn_upsampling(ds.as_ref(), size, f.weights.crop_size.is_some());
    }
    let all = first_n(ds.len(), f.subset.unwrap_or(usize::MAX));
    anyhow::ensure!(!all.is_empty(), "no images to extract features from");
    let idx = crate::dist::shard(&all, comm.rank(), comm.world_size());
    let bs = f.batch_size_per_gpu.max(1);
    let bar = if comm.is_main() {
        crate::util::progress_bar(idx.len().div_ceil(bs) as u64, "features")
    } else {
        crate::util::Progress::hidden()
    };
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(bs) {
        let (x, l) = features::view_batch(
            ds.as_ref(),
            chunk,
            size,
            f.num_workers,
            &|img: &crate::data::ops::Rgb8, _| features::eval_view(img, size),
        )?;
        feats.push(
            spec.features_of(&vit, &x.to_device(device))?
                .to_device(Device::Cpu),
        );
        labels.push(l);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let feats = crate::dist::unshard(comm, &tch::Tensor::cat(&feats, 0), all.len())?;
    let labels = crate::dist::unshard(comm, &tch::Tensor::cat(&labels, 0), all.len())?;
    if !comm.is_main() {
        return Ok(());
    }
    let named = vec![
        ("features".to_string(), feats),
        ("labels".to_string(), labels),
    ];
    let shape = named[0].1.size();
    crate::params::write_safetensors(&f.output, &named, None)?;
    println!(
        "features {shape:?} of {} written to {}",
        ds.describe(),
        f.output.display()
    );
    Ok(())
}
