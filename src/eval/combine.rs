//! A backbone and its trained linear classifier in one file (the official
//! `analysis/combine_ckpt.py`), and the evaluation of such a model, or of a backbone with a
//! linear checkpoint, on any image folder (`eval-linear --evaluate`, as the official
//! robustness scripts run the combined models on ImageNet-A/-C/-9 and the like).
//!
//! Linear checkpoints read: `ibot eval-linear`'s (`best_<key>_linear.safetensors`,
//! `checkpoint_<key>_linear.safetensors`, whose metadata records the feature options), the
//! official `eval_linear.py` `.pth` (`state_dict` with `module.linear.*`) and the official
//! `eval_linear_multi.py` `.pth` (`state_dict` with `<i>.module.linear.*` for every classifier
//! of the sweep: the official script picks `best_acc_hidx`, which this reads from
//! `--head_index`, or from a safetensors file's `best_acc_hidx` metadata). The combined file is
//! a safetensors file: the backbone under official names with its shape in the metadata, plus
//! `linear.weight` and `linear.bias` (the official combined names) and the feature options
//! under `ibot_linear_head`, so every command that takes `--pretrained_weights` reads it as a
//! backbone and `eval-linear --evaluate` finds the classifier in it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use super::features::{eval_view, view_batch, FeatureSpec};
use crate::data::ops::Rgb8;
use crate::interop::weights::{Pretrained, SWIN_CONFIG_KEY, VIT_CONFIG_KEY};
use crate::models::BackboneConfig;

/// Metadata key of a combined file's classifier description.
pub const LINEAR_HEAD_KEY: &str = "ibot_linear_head";

/// The feature options and origin of a classifier (stored under [`LINEAR_HEAD_KEY`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinearHeadInfo {
    pub n_last_blocks: Option<usize>,
    pub avgpool_patchtokens: Option<u8>,
    pub num_labels: i64,
    pub feature_dim: i64,
    pub best_acc: Option<f64>,
    pub head_index: Option<usize>,
    pub source: String,
}

/// A linear classifier `[num_labels, dim]` + `[num_labels]` and what is known about it.
#[derive(Debug)]
pub struct LinearHead {
    pub weight: Tensor,
    pub bias: Tensor,
    pub info: LinearHeadInfo,
}

fn is_safetensors(path: &Path) -> bool {
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head[8] == b'{'
}

/// The classifier of a linear checkpoint (see the module documentation for the formats).
/// `head_index` picks one classifier of a sweep.
pub fn read_linear_head(path: &Path, head_index: Option<usize>) -> Result<LinearHead> {
    ensure!(
        path.is_file(),
        "linear checkpoint {} not found",
        path.display()
    );
    let shown = path.display().to_string();
    let (tensors, md) = if is_safetensors(path) {
        (
            crate::params::read_safetensors(path)?,
            crate::params::read_safetensors_metadata(path)?,
        )
    } else {
        let f = crate::interop::read_pth(path)?;
        (f.tensors, HashMap::new())
    };
    // Classifier tensors by index (None: a single classifier), DDP's `module.` removed.
    let mut heads: BTreeMap<Option<usize>, HashMap<String, Tensor>> = BTreeMap::new();
    for (k, v) in tensors {
        let k = k
            .strip_prefix("state_dict.")
            .unwrap_or(&k)
            .replace("module.", "");
        let (idx, rest) = match k.split_once('.') {
            Some((i, r)) if i.parse::<usize>().is_ok() => (i.parse::<usize>().ok(), r.to_string()),
            _ => (None, k.clone()),
        };
        if let Some(s) = rest.strip_prefix("linear.") {
            if s == "weight" || s == "bias" {
                heads.entry(idx).or_default().insert(s.to_string(), v);
            }
        }
    }
    ensure!(
        !heads.is_empty(),
        "{shown} holds no linear classifier (linear.weight / linear.bias, as eval-linear writes)"
    );
    let meta_index = md
        .get("best_acc_hidx")
        .and_then(|v| v.parse::<usize>().ok());
    let key = if heads.len() == 1 {
        *heads.keys().next().unwrap_or(&None)
    } else {
        let Some(i) = head_index.or(meta_index) else {
            bail!(
                "{shown} holds {} classifiers (an eval_linear_multi sweep): give --head_index \
                 (the official best_acc_hidx, printed by the sweep)",
                heads.len()
            )
        };
        ensure!(
            heads.contains_key(&Some(i)),
            "{shown} has no classifier {i} (it has {:?})",
            heads.keys().flatten().collect::<Vec<_>>()
        );
        Some(i)
    };
    let h = heads.remove(&key).unwrap_or_default();
    let (Some(weight), Some(bias)) = (h.get("weight"), h.get("bias")) else {
        bail!("{shown}: the classifier lacks linear.weight or linear.bias")
    };
    let ws = weight.size();
    ensure!(
        ws.len() == 2 && bias.size() == [ws[0]],
        "{shown}: linear.weight {ws:?} and linear.bias {:?} do not form a classifier",
        bias.size()
    );
    let mut info = LinearHeadInfo {
        num_labels: ws[0],
        feature_dim: ws[1],
        head_index: key,
        source: shown.clone(),
        ..Default::default()
    };
    if let Some(raw) = md.get(LINEAR_HEAD_KEY) {
        let stored: LinearHeadInfo = serde_json::from_str(raw)
            .with_context(|| format!("{shown}: damaged {LINEAR_HEAD_KEY}"))?;
        info = LinearHeadInfo {
            source: stored.source.clone(),
            ..stored
        };
    } else if let Some(raw) = md.get("ibot_linear") {
        // An `ibot eval-linear` checkpoint: its arguments say how the features were made.
        let v: serde_json::Value =
            serde_json::from_str(raw).with_context(|| format!("{shown}: damaged metadata"))?;
        info.n_last_blocks = v["args"]["n_last_blocks"].as_u64().map(|n| n as usize);
        info.avgpool_patchtokens = v["args"]["avgpool_patchtokens"].as_u64().map(|n| n as u8);
        info.best_acc = v["best_acc"].as_f64();
    }
    Ok(LinearHead {
        weight: weight.to_kind(Kind::Float),
        bias: bias.to_kind(Kind::Float),
        info,
    })
}

/// The feature options for a classifier over `backbone`: the given ones (missing ones from
/// what the classifier's file recorded, else the official defaults 4 and 0); when those do not
/// give the classifier's input width but the recorded ones do, the recorded ones (the command
/// line's defaults are then not what the user meant). Error when neither fits.
pub fn feature_spec_for(
    backbone: &crate::models::Backbone,
    head: &LinearHead,
    n_last_blocks: Option<usize>,
    avgpool: Option<u8>,
) -> Result<FeatureSpec> {
    let rec = (head.info.n_last_blocks, head.info.avgpool_patchtokens);
    let first = FeatureSpec {
        n_last_blocks: n_last_blocks.or(rec.0).unwrap_or(4),
        avgpool: avgpool.or(rec.1).unwrap_or(0),
    };
    let mut tried = vec![first];
    if let (Some(n), Some(a)) = rec {
        tried.push(FeatureSpec {
            n_last_blocks: n,
            avgpool: a,
        });
    }
    for spec in &tried {
        if spec.validate_for(backbone).is_ok() && spec.dim_for(backbone) == head.info.feature_dim {
            if spec != &first {
                eprintln!(
                    "note: using the classifier's recorded --n_last_blocks {} --avgpool_patchtokens {}",
                    spec.n_last_blocks, spec.avgpool
                );
            }
            return Ok(*spec);
        }
    }
    first.validate_for(backbone)?;
    bail!(
        "the classifier of {} takes {} features, but --n_last_blocks {} --avgpool_patchtokens {} \
         give {} for this backbone (width {}): pass the options the classifier was trained with",
        head.info.source,
        head.info.feature_dim,
        first.n_last_blocks,
        first.avgpool,
        first.dim_for(backbone),
        backbone.embed_dim()
    )
}

/// Options of `ibot combine` (the official `combine_ckpt.py` names, plus what our files need).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CombineConfig {
    pub checkpoint_backbone: PathBuf,
    pub checkpoint_linear: PathBuf,
    pub output_file: PathBuf,
    pub checkpoint_key: String,
    pub arch: Option<String>,
    pub num_heads: Option<i64>,
    pub head_index: Option<usize>,
    pub n_last_blocks: Option<usize>,
    pub avgpool_patchtokens: Option<u8>,
    pub force: bool,
}

/// Writes the combined file; returns what went into it.
pub fn combine(cfg: &CombineConfig) -> Result<LinearHeadInfo> {
    for input in [&cfg.checkpoint_backbone, &cfg.checkpoint_linear] {
        if let (Ok(a), Ok(b)) = (input.canonicalize(), cfg.output_file.canonicalize()) {
            ensure!(
                a != b,
                "--output_file {} is an input file: refusing to overwrite it",
                cfg.output_file.display()
            );
        }
    }
    ensure!(
        cfg.force || std::fs::symlink_metadata(&cfg.output_file).is_err(),
        "{} already exists; pass --force to replace it",
        cfg.output_file.display()
    );
    let p = crate::interop::load_pretrained_with(
        &cfg.checkpoint_backbone,
        &cfg.checkpoint_key,
        cfg.arch.as_deref(),
        cfg.num_heads,
    )?;
    let head = read_linear_head(&cfg.checkpoint_linear, cfg.head_index)?;
    let (_, backbone) = p.backbone_model(Device::Cpu)?;
    let spec = feature_spec_for(&backbone, &head, cfg.n_last_blocks, cfg.avgpool_patchtokens)?;
    let mut tensors = p.backbone_tensors(false)?;
    tensors.push(("linear.weight".into(), head.weight.shallow_clone()));
    tensors.push(("linear.bias".into(), head.bias.shallow_clone()));
    let info = LinearHeadInfo {
        n_last_blocks: Some(spec.n_last_blocks),
        avgpool_patchtokens: Some(spec.avgpool),
        ..head.info.clone()
    };
    let mut md = HashMap::new();
    md.insert(LINEAR_HEAD_KEY.to_string(), serde_json::to_string(&info)?);
    md.insert("format".to_string(), "pt".to_string());
    match &p.config {
        BackboneConfig::Vit(v) => md.insert(VIT_CONFIG_KEY.to_string(), serde_json::to_string(v)?),
        BackboneConfig::Swin(s) => {
            md.insert(SWIN_CONFIG_KEY.to_string(), serde_json::to_string(s)?)
        }
    };
    crate::params::write_safetensors(&cfg.output_file, &tensors, Some(md))
        .with_context(|| format!("writing {}", cfg.output_file.display()))?;
    Ok(info)
}

/// Options of `eval-linear --evaluate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluateConfig {
    pub pretrained_weights: PathBuf,
    /// A linear checkpoint; without it the classifier stored in `pretrained_weights`.
    pub pretrained_linear: Option<PathBuf>,
    pub checkpoint_key: String,
    pub arch: Option<String>,
    pub num_heads: Option<i64>,
    /// An image folder of classes, or a folder with val/ (read when there).
    pub data_path: Option<PathBuf>,
    pub val_path: Option<PathBuf>,
    pub n_last_blocks: Option<usize>,
    pub avgpool_patchtokens: Option<u8>,
    pub head_index: Option<usize>,
    pub batch_size: usize,
    pub num_workers: usize,
    pub crop_size: Option<usize>,
    pub subset: Option<usize>,
}

/// Accuracy of a classifier on a data set (percent; the loss is the mean of the batches'
/// mean losses, as the official MetricLogger averages it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluateResult {
    pub acc1: f64,
    pub acc5: Option<f64>,
    pub loss: f64,
    pub images: usize,
    pub num_labels: i64,
}

/// Top-1 / top-5 of `logits` against `labels`, as the official `utils.accuracy` (counts).
pub fn topk_hits(logits: &Tensor, labels: &Tensor) -> (i64, i64) {
    let k = 5.min(logits.size()[1]);
    let (_, top) = logits.topk(k, 1, true, true);
    let hit = top.eq_tensor(&labels.reshape([-1, 1]));
    (
        hit.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]),
        hit.sum(Kind::Int64).int64_value(&[]),
    )
}

/// Where `--evaluate` reads its images: `--val_path`, else `<data_path>/val` when it exists,
/// else `data_path` itself (an image folder of classes, as ImageNet-A/-R or a -C severity).
fn eval_images(cfg: &EvaluateConfig) -> Result<PathBuf> {
    if let Some(v) = &cfg.val_path {
        ensure!(v.exists(), "--val_path {} does not exist", v.display());
        return Ok(v.clone());
    }
    let d = cfg
        .data_path
        .as_ref()
        .context("--evaluate needs --data_path (an image folder of classes) or --val_path")?;
    ensure!(d.exists(), "--data_path {} does not exist", d.display());
    Ok(if d.join("val").is_dir() {
        d.join("val")
    } else {
        d.clone()
    })
}

/// Runs the combined model (or backbone + linear checkpoint) over the images and reports the
/// accuracy, as the official `validate_network`.
pub fn evaluate(cfg: &EvaluateConfig, device: Device) -> Result<EvaluateResult> {
    let p: Pretrained = crate::interop::load_pretrained_with(
        &cfg.pretrained_weights,
        &cfg.checkpoint_key,
        cfg.arch.as_deref(),
        cfg.num_heads,
    )?;
    eprintln!("weights: {}", p.description);
    let head = match &cfg.pretrained_linear {
        Some(l) => read_linear_head(l, cfg.head_index)?,
        None => {
            let shown = cfg.pretrained_weights.display();
            let (Some(w), Some(b)) = (p.linear.get("weight"), p.linear.get("bias")) else {
                bail!(
                    "{shown} has no linear classifier: give --pretrained_linear (a linear \
                     checkpoint of eval-linear) or a file written by `ibot combine`"
                )
            };
            let mut info = LinearHeadInfo {
                num_labels: w.size()[0],
                feature_dim: *w.size().last().unwrap_or(&0),
                source: shown.to_string(),
                ..Default::default()
            };
            if is_safetensors(&cfg.pretrained_weights) {
                let md = crate::params::read_safetensors_metadata(&cfg.pretrained_weights)?;
                if let Some(raw) = md.get(LINEAR_HEAD_KEY) {
                    info = serde_json::from_str(raw)
                        .with_context(|| format!("{shown}: damaged {LINEAR_HEAD_KEY}"))?;
                }
            }
            LinearHead {
                weight: w.to_kind(Kind::Float),
                bias: b.to_kind(Kind::Float),
                info,
            }
        }
    };
    let (_, backbone) = p.backbone_model(device)?;
    let spec = feature_spec_for(&backbone, &head, cfg.n_last_blocks, cfg.avgpool_patchtokens)?;
    let size = super::resolve_crop(
        cfg.crop_size,
        p.config.img_size() as usize,
        p.config.patch_size() as usize,
    )?;
    let path = eval_images(cfg)?;
    let ds = crate::data::dataset::open(&path, "t10k")?;
    let n = ds.len().min(cfg.subset.unwrap_or(usize::MAX));
    ensure!(n > 0, "no images to evaluate in {}", path.display());
    let labels_ok = (0..n).all(|i| (0..head.info.num_labels).contains(&ds.label(i)));
    ensure!(
        labels_ok,
        "{} needs labels 0..{} (class folders, sorted as ImageFolder does) for a classifier of {} \
         classes",
        path.display(),
        head.info.num_labels - 1,
        head.info.num_labels
    );
    eprintln!("data: {} ({n} images)", ds.describe());
    let (w, b) = (head.weight.to_device(device), head.bias.to_device(device));
    let idx: Vec<usize> = (0..n).collect();
    let bs = cfg.batch_size.max(1);
    let bar = crate::util::progress_bar(n.div_ceil(bs) as u64, "evaluate");
    let (mut top1, mut top5, mut loss_sum, mut batches) = (0i64, 0i64, 0f64, 0usize);
    for chunk in idx.chunks(bs) {
        let (x, y) = view_batch(
            ds.as_ref(),
            chunk,
            size,
            cfg.num_workers,
            &|img: &Rgb8, _| eval_view(img, size),
        )?;
        let y = y.to_device(device);
        let logits = tch::no_grad(|| -> Result<Tensor> {
            let f = spec.features_of(&backbone, &x.to_device(device))?;
            Ok(f.flatten(1, -1).linear(&w, Some(&b)))
        })?;
        loss_sum += logits
            .cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)
            .double_value(&[]);
        let (h1, h5) = topk_hits(&logits, &y);
        top1 += h1;
        top5 += h5;
        batches += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(EvaluateResult {
        acc1: top1 as f64 * 100.0 / n as f64,
        acc5: (head.info.num_labels >= 5).then(|| top5 as f64 * 100.0 / n as f64),
        loss: loss_sum / batches as f64,
        images: n,
        num_labels: head.info.num_labels,
    })
}
