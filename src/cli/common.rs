//! Pieces shared by the frozen-feature protocol commands (eval-logreg, eval-linear-multi).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::WeightsArgs;
use tch::{Device, Tensor};

use crate::data::dataset::{self, Dataset};
use crate::eval::features::{self, FeatureKind, FeatureSpec};
use crate::models::Backbone;

/// What the dispatcher in `main.rs` hands a command: a way to open the backbone named by the
/// shared weight options (`--pretrained_weights`, `--checkpoint_key`, `--arch`, `--crop_size`,
/// `--device`), called only when features must really be computed. It returns the backbone,
/// the evaluation crop side and the device.
pub type OpenBackbone<'a> = Box<dyn FnOnce() -> Result<(Backbone, usize, Device)> + 'a>;

/// The training and test halves of an evaluation data set, opened: `--data_path` split as
/// every evaluation command splits it ([`crate::eval::split::eval_splits`]: `train/` and `val/`
/// image folders, or IDX `train-*` and `t10k-*`), or `--train_path` / `--val_path`.
pub fn open_splits(
    data_path: Option<&Path>,
    train_path: Option<&Path>,
    val_path: Option<&Path>,
) -> Result<(Box<dyn Dataset>, Box<dyn Dataset>)> {
    let (trp, trs, vap, vas) = crate::eval::split::eval_splits(data_path, train_path, val_path)?;
    Ok((dataset::open(&trp, trs)?, dataset::open(&vap, vas)?))
}

/// [`OpenBackbone`] for the shared weight options.
pub fn opener(weights: &WeightsArgs) -> OpenBackbone<'static> {
    let cfg = weights.config();
    Box::new(move || cfg.open_backbone().map(|(_, b, s, d)| (b, s, d)))
}

/// Features of both halves with the official evaluation view, L2-normalised, in the layout of
/// `eval-knn --dump_features` (`knn_features.safetensors`: train_features, train_labels,
/// test_features, test_labels); or those of such a file when `load` names its folder.
#[allow(clippy::too_many_arguments)]
pub fn train_test_features(
    open: OpenBackbone,
    spec: FeatureSpec,
    splits: impl FnOnce() -> Result<(Box<dyn Dataset>, Box<dyn Dataset>)>,
    subset: Option<usize>,
    batch: usize,
    load: Option<&Path>,
    dump: Option<&Path>,
) -> Result<[Tensor; 4]> {
    if let Some(dir) = load {
        let path = dir.join("knn_features.safetensors");
        let mut t = crate::params::read_safetensors(&path)?;
        let mut take = |n: &str| {
            t.remove(n)
                .with_context(|| format!("{} has no '{n}'", path.display()))
        };
        eprintln!("features loaded from {}", path.display());
        return Ok([
            take("train_features")?,
            take("train_labels")?,
            take("test_features")?,
            take("test_labels")?,
        ]);
    }
    let (backbone, size, device) = open()?;
    spec.validate_for(&backbone)?;
    let (train, test) = splits()?;
    crate::eval::warn_upsampling(train.as_ref(), size, false);
    let lim = subset.unwrap_or(usize::MAX);
    let tr: Vec<usize> = (0..train.len().min(lim)).collect();
    let te: Vec<usize> = (0..test.len().min(lim)).collect();
    eprintln!(
        "data: {} training ({}), {} test images",
        tr.len(),
        train.describe(),
        te.len()
    );
    let kind = FeatureKind::Backbone(spec);
    let b = batch.max(1);
    let (ftr, ltr) =
        features::extract(Some(&backbone), kind, train.as_ref(), &tr, size, b, device)?;
    let (fte, lte) = features::extract(Some(&backbone), kind, test.as_ref(), &te, size, b, device)?;
    if Vec::<i64>::try_from(&ltr)?
        .iter()
        .chain(&Vec::<i64>::try_from(&lte)?)
        .any(|&l| l < 0)
    {
        bail!("this evaluation needs labelled images (class folders or IDX labels)");
    }
    if let Some(dir) = dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let named = [
            ("train_features", &ftr),
            ("train_labels", &ltr),
            ("test_features", &fte),
            ("test_labels", &lte),
        ]
        .map(|(n, t)| (n.to_string(), t.shallow_clone()));
        let path = dir.join("knn_features.safetensors");
        crate::params::write_safetensors(&path, &named, None)?;
        eprintln!("features saved to {}", path.display());
    }
    Ok([ftr, ltr, fte, lte])
}

/// Writes `v` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    crate::util::atomic_write(path, serde_json::to_string_pretty(v)?.as_bytes())
}
