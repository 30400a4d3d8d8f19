//! `ibot eval-unsup` (the official unsup_cls.py): the teacher head's argmax on the validation
//! images as cluster ids, scored against the labels with NMI, ARI, F and Hungarian accuracy.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::features;
use super::split::{eval_split, first_n, Half};
use super::weights::WeightsConfig;

/// Options of `ibot eval-unsup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnsupConfig {
    pub weights: WeightsConfig,
    pub data_path: Option<PathBuf>,
    pub val_path: Option<PathBuf>,
    pub batch_size_per_gpu: usize,
    pub subset: Option<usize>,
    /// Also write the metrics as JSON to this file.
    pub output: Option<PathBuf>,
}

impl Default for UnsupConfig {
    fn default() -> Self {
        Self {
            weights: WeightsConfig::default(),
            data_path: None,
            val_path: None,
            batch_size_per_gpu: 128,
            subset: None,
            output: None,
        }
    }
}

/// Runs the evaluation and prints the scores.
pub fn run(u: &UnsupConfig) -> Result<()> {
    if let Some(out) = &u.output {
        crate::util::check_output_file(out, "--output")?;
    }
    let (p, vit, size, device) = u.weights.open_backbone()?;
    let (_, head) = p
        .head_model(device)?
        .context("these weights have no projection head (a backbone-only file?); eval-unsup needs a full checkpoint")?;
    let (tep, tes) = eval_split(u.data_path.as_deref(), u.val_path.as_deref(), Half::Val)?;
    let ds = crate::data::dataset::open(&tep, tes)?;
    super::warn_upsampling(ds.as_ref(), size, u.weights.crop_size.is_some());
    let idx = first_n(ds.len(), u.subset.unwrap_or(usize::MAX));
    anyhow::ensure!(
        !idx.is_empty(),
        "no images to evaluate (an empty data set or --subset 0)"
    );
    let bar = crate::util::progress_bar(
        idx.len().div_ceil(u.batch_size_per_gpu.max(1)) as u64,
        "eval-unsup",
    );
    let (mut labels, mut preds) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(u.batch_size_per_gpu.max(1)) {
        let (x, l) = features::eval_batch(ds.as_ref(), chunk, size)?;
        let logits = tch::no_grad(|| -> Result<tch::Tensor> {
            Ok(head.forward_cls(&vit.forward(&x.to_device(device), None, false)?.select(1, 0)))
        })?;
        preds.extend(Vec::<i64>::try_from(
            logits.argmax(1, false).to_device(Device::Cpu),
        )?);
        labels.extend(Vec::<i64>::try_from(l)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if labels.iter().any(|&l| l < 0) {
        bail!("eval-unsup needs labelled images (class folders or IDX labels)");
    }
    let (nmi, ari, f, acc) = super::cluster::eval_pred(&labels, &preds, true);
    let used = preds.iter().collect::<std::collections::HashSet<_>>().len();
    println!("NMI: {nmi}, ARI: {ari}, F: {f}, ACC: {acc}");
    eprintln!(
        "{} images, {used} of {} clusters used",
        labels.len(),
        head.cfg.out_dim
    );
    if let Some(out) = &u.output {
        crate::util::write_json(
            out,
            &serde_json::json!({"nmi": nmi, "ari": ari, "f": f, "acc": acc, "images": labels.len(), "clusters_used": used}),
        )?;
    }
    Ok(())
}
