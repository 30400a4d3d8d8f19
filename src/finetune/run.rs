//! The fine-tuning loop: the official `train_one_epoch` / `evaluate` of the three recipes, with
//! checkpoints that resume exactly, `log.txt` under the official keys and `finetune.png`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::cls;
use super::data::{self, epoch_order, load_batch, view_rng};
use super::groups::{get_parameter_groups_for, LayerIds};
use super::loss::Criterion;
use super::model::{Classifier, ClassifierConfig};
use super::schedule::{deit_epoch_lr, per_iteration_cosine_steps};
use super::{FinetuneConfig, Recipe};
use crate::data::dataset::Dataset;
use crate::dist::Comm;
use crate::interop::Pretrained;
use crate::models::{BackboneConfig, VitConfig};
use crate::params::{read_safetensors, read_safetensors_metadata, write_safetensors};
use crate::train::amp::{self, GradScaler, Precision};
use crate::train::optim::{Optimizer, ScaledGroup};

/// Metadata key of fine-tuning checkpoints.
pub const META_KEY: &str = "ibot_finetune";
const FORMAT: &str = "ibot-rs-finetune/1";

/// The official Swin's `no_weight_decay()`.
pub const SWIN_NO_WEIGHT_DECAY: &[&str] = &["absolute_pos_embed"];

/// Loss and accuracies on the validation set (percent), as the official `evaluate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    /// Mean of the per-batch cross-entropy losses (MetricLogger's unweighted average).
    pub loss: f64,
    pub acc1: f64,
    pub acc5: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneOutcome {
    pub max_accuracy: f64,
    pub last: Option<EvalStats>,
    pub ema_last: Option<EvalStats>,
    pub epochs_done: usize,
    pub n_parameters: i64,
    pub nb_classes: i64,
    /// This process's rank (0 without a launcher).
    #[serde(default)]
    pub rank: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointMeta {
    format: String,
    next_epoch: usize,
    max_accuracy: f64,
    classifier: ClassifierConfig,
    config: FinetuneConfig,
    /// The float16 loss scaler's state (the official checkpoints' `scaler`).
    #[serde(default)]
    scaler: Option<GradScaler>,
    /// The precision the run used (absent before it was stored): a run resumed with the same
    /// `--use_fp16` and `--precision auto` keeps it.
    #[serde(default)]
    precision: Option<Precision>,
}

/// The model, its EMA, the optimizer and the criterion: one optimisation step at a time.
pub struct Trainer {
    pub model: Classifier,
    pub ema: Option<Classifier>,
    pub opt: Optimizer,
    pub groups: Vec<ScaledGroup>,
    pub criterion: Criterion,
    pub clip_grad: Option<f64>,
    pub update_freq: usize,
    pub ema_decay: f64,
    pub precision: Precision,
    /// The loss scaler of float16 runs (`NativeScalerWithGradNormCount` / timm's
    /// `NativeScaler`: torch.cuda.amp.GradScaler with its defaults); unused otherwise.
    pub scaler: GradScaler,
    pub device: Device,
    /// Keep the (clipped) gradients of the last update in `last_grads` (for tests).
    pub keep_grads: bool,
    pub last_grads: Vec<Option<Tensor>>,
    accum: Vec<Option<Tensor>>,
    micro: usize,
}

/// What one micro-step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepOut {
    pub loss: f64,
    /// Total gradient norm before clipping, when this micro-step ended an update.
    pub grad_norm: Option<f64>,
    /// Share of correct argmax predictions (hard targets only).
    pub class_acc: Option<f64>,
}

impl Trainer {
    /// A trainer for `model` with the recipe's parameter groups: the official layer-decay
    /// grouping (skip list `pos_embed`, `cls_token`) for `imagenet_layer_decay`, timm's
    /// `add_weight_decay` (no skip list: the official ViT defines no `no_weight_decay`) for the
    /// DeiT recipes, with layer decay there too when `--layer_decay` < 1. A Swin takes the
    /// official `get_num_layer_for_swin` ids and its `no_weight_decay()` = {absolute_pos_embed}
    /// as skip list in every recipe (its `no_weight_decay_keywords`, relative_position_bias_table,
    /// is consulted by neither BEiT's `get_parameter_groups` nor timm's `add_weight_decay`, so
    /// the 2-D bias tables are decayed, as in the official runs).
    pub fn new(model: Classifier, cfg: &FinetuneConfig, device: Device) -> Result<Self> {
        let (skip, ids): (&[&str], LayerIds) = match &model.cfg.backbone {
            BackboneConfig::Vit(v) => (
                match cfg.recipe {
                    Recipe::ImagenetLayerDecay => &["pos_embed", "cls_token"],
                    _ => &[],
                },
                LayerIds::Vit {
                    depth: v.depth as usize,
                },
            ),
            BackboneConfig::Swin(s) => (
                SWIN_NO_WEIGHT_DECAY,
                LayerIds::Swin {
                    depths: s.depths.iter().map(|&d| d as usize).collect(),
                },
            ),
        };
        let groups = get_parameter_groups_for(&model.ps, skip, Some((cfg.layer_decay, ids)));
        let ema = if cfg.model_ema {
            let e = Classifier::new(&model.cfg, device)?;
            tch::no_grad(|| -> Result<()> {
                for (a, b) in e.ps.params().iter().zip(model.ps.params()) {
                    a.tensor.detach().copy_(&b.tensor);
                }
                Ok(())
            })?;
            Some(e)
        } else {
            None
        };
        let precision = Precision::resolve(cfg.use_fp16, cfg.precision, device)?;
        let n = model.ps.len();
        Ok(Self {
            opt: cfg.opt.build(&model.ps)?,
            model,
            ema,
            groups,
            criterion: Criterion::select(cfg.mixup.active(), cfg.smoothing),
            clip_grad: cfg.clip_grad,
            update_freq: cfg.update_freq,
            ema_decay: cfg.model_ema_decay,
            precision,
            scaler: GradScaler::default(),
            device,
            keep_grads: false,
            last_grads: Vec::new(),
            accum: (0..n).map(|_| None).collect(),
            micro: 0,
        })
    }

    /// One micro-step of the official loop: forward with drop path, `loss / update_freq`
    /// backward (gradients summed over the micro-steps), and on every `update_freq`-th call the
    /// update: total-norm clipping (`clip_grad_norm_`) when `clip_grad` is set, AdamW with
    /// group g at `lr · lr_scale_g` and weight decay `wd` on the decayed groups, then the EMA.
    pub fn micro_step(
        &mut self,
        samples: &Tensor,
        targets: &Tensor,
        lr: f64,
        wd: f64,
    ) -> Result<StepOut> {
        self.micro_step_dist(&crate::dist::SingleProcess, samples, targets, lr, wd)
    }

    /// [`Trainer::micro_step`] as one rank of a data-parallel run: on an update the gradients
    /// are averaged over the ranks (DDP's all-reduce / world size) before clipping and the
    /// optimizer step, so every rank applies the same update.
    pub fn micro_step_dist(
        &mut self,
        comm: &dyn Comm,
        samples: &Tensor,
        targets: &Tensor,
        lr: f64,
        wd: f64,
    ) -> Result<StepOut> {
        let (x, y) = (
            samples.to_device(self.device),
            targets.to_device(self.device),
        );
        let (loss, class_acc) = amp::autocast(
            self.precision,
            self.device,
            || -> Result<(Tensor, Option<f64>)> {
                let logits = self.model.forward(&x, true)?;
                let loss = self.criterion.loss(&logits.to_kind(Kind::Float), &y)?;
                let acc = (y.dim() == 1).then(|| {
                    logits
                        .argmax(-1, false)
                        .eq_tensor(&y)
                        .to_kind(Kind::Float)
                        .mean(Kind::Float)
                        .double_value(&[])
                });
                Ok((loss, acc))
            },
        )?;
        let value = loss.double_value(&[]);
        ensure!(value.is_finite(), "Loss is {value}, stopping training");
        let params: Vec<&Tensor> = self.model.ps.params().iter().map(|p| &p.tensor).collect();
        let mut scaled = if self.update_freq > 1 {
            loss / self.update_freq as f64
        } else {
            loss
        };
        if self.precision == Precision::Fp16 {
            // NativeScalerWithGradNormCount: `scaler.scale(loss / update_freq).backward()` on
            // every micro-step with the scale of the moment (it only changes at an update), so
            // the accumulated gradients carry one common scale that the update divides out.
            scaled = self.scaler.scale_loss(&scaled);
        }
        let grads = Tensor::run_backward(&[&scaled], &params, false, false);
        tch::no_grad(|| {
            for (acc, g) in self.accum.iter_mut().zip(grads) {
                match acc {
                    Some(a) => {
                        let _ = a.g_add_(&g);
                    }
                    None => *acc = Some(g),
                }
            }
        });
        self.micro += 1;
        let mut grad_norm = None;
        if self.micro % self.update_freq == 0 {
            grad_norm = Some(self.update(comm, lr, wd)?);
        }
        Ok(StepOut {
            loss: value,
            grad_norm,
            class_acc,
        })
    }

    fn update(&mut self, comm: &dyn Comm, lr: f64, wd: f64) -> Result<f64> {
        let mut grads: Vec<Option<Tensor>> = std::mem::take(&mut self.accum);
        // DDP averages after every backward; the mean of sums equals the sum of means, so one
        // all-reduce per update gives the same gradients with update_freq times less traffic.
        crate::dist::average_gradients(comm, &mut grads).context("averaging gradients")?;
        // float16: `scaler.unscale_(optimizer)` before the norm and clipping (an overflow on any
        // rank reached every rank through the average, so all skip together).
        let found_inf = self.precision == Precision::Fp16 && self.scaler.unscale(&mut grads);
        let norm = tch::no_grad(|| -> f64 {
            // torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, coefficient
            // max_norm / (total + 1e-6) clamped to 1, every gradient multiplied by it.
            let norms: Vec<Tensor> = grads.iter().flatten().map(|g| g.norm()).collect();
            if norms.is_empty() {
                return 0.0;
            }
            let total = Tensor::stack(&norms, 0).norm();
            if let Some(max) = self.clip_grad {
                let coef = (total.shallow_clone() + 1e-6).reciprocal() * max;
                let coef = coef.clamp_max(1.0);
                for g in grads.iter_mut().flatten() {
                    let _ = g.g_mul_(&coef);
                }
            }
            total.double_value(&[])
        });
        if !found_inf {
            self.opt
                .step_groups(&self.model.ps, &grads, &self.groups, lr, wd)?;
        }
        if self.precision == Precision::Fp16 {
            // `scaler.step` skipped the step on inf/NaN; `scaler.update()` adapts the scale.
            // The official loop still updates the EMA after a skipped step.
            self.scaler.update(found_inf);
        }
        self.accum = (0..grads.len()).map(|_| None).collect();
        if self.keep_grads {
            self.last_grads = grads;
        }
        if let Some(e) = &self.ema {
            // timm ModelEma.update: ema = ema * decay + (1 - decay) * model, every entry.
            let d = self.ema_decay;
            tch::no_grad(|| {
                for (a, b) in e.ps.params().iter().zip(self.model.ps.params()) {
                    let v = &a.tensor * d + &b.tensor * (1.0 - d);
                    a.tensor.detach().copy_(&v);
                }
            });
        }
        Ok(norm)
    }
}

/// The meters of the official `evaluate` (a MetricLogger): `loss` updated once per batch with the
/// batch's mean cross-entropy, `acc1` / `acc5` updated with n = the batch size, each a
/// SmoothedValue's (count, total).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalMeters {
    pub loss_total: f64,
    pub loss_count: f64,
    /// Σ over batches of acc1 (percent) × batch size, i.e. 100 × the top-1 hits.
    pub acc1_total: f64,
    pub acc5_total: f64,
    /// Images seen (the acc meters' count).
    pub count: f64,
}

impl EvalMeters {
    /// MetricLogger.synchronize_between_processes: every meter's count and total summed over
    /// the ranks (float64 all-reduce). With --dist_eval the ranks saw different shards and the
    /// averages become the global ones, duplicated padding samples included; without it every
    /// rank saw the whole set and the averages are unchanged (totals and counts both × W).
    pub fn synchronize(&mut self, comm: &dyn Comm) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let flat = [
            self.loss_total,
            self.loss_count,
            self.acc1_total,
            self.acc5_total,
            self.count,
        ];
        let mut t = Tensor::from_slice(&flat).to_device(comm.device());
        comm.all_reduce_sum(&mut t)
            .context("synchronizing the evaluation metrics")?;
        let v = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        (
            self.loss_total,
            self.loss_count,
            self.acc1_total,
            self.acc5_total,
            self.count,
        ) = (v[0], v[1], v[2], v[3], v[4]);
        Ok(())
    }

    /// The meters' global averages (SmoothedValue.global_avg = total / count).
    pub fn stats(&self) -> Result<EvalStats> {
        ensure!(
            self.count > 0.0 && self.loss_count > 0.0,
            "the validation set is empty"
        );
        Ok(EvalStats {
            loss: self.loss_total / self.loss_count,
            acc1: self.acc1_total / self.count,
            acc5: self.acc5_total / self.count,
        })
    }
}

/// Loss, top-1 and top-5 of `model` on `idx` of `ds` (eval mode, batches of `bs`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Classifier,
    ds: &dyn Dataset,
    idx: &[usize],
    transform: &cls::EvalTransform,
    size: usize,
    bs: usize,
    workers: usize,
    progress: bool,
    device: Device,
) -> Result<EvalStats> {
    evaluate_meters(
        model, ds, idx, transform, size, bs, workers, progress, device,
    )?
    .stats()
}

/// [`evaluate`]'s meters before averaging: one rank's part of a data-parallel evaluation.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_meters(
    model: &Classifier,
    ds: &dyn Dataset,
    idx: &[usize],
    transform: &cls::EvalTransform,
    size: usize,
    bs: usize,
    workers: usize,
    progress: bool,
    device: Device,
) -> Result<EvalMeters> {
    let bar = if progress {
        crate::util::progress_bar(idx.len().div_ceil(bs) as u64, "Test")
    } else {
        crate::util::Progress::hidden()
    };
    let k = 5.min(model.cfg.nb_classes);
    let mut m = EvalMeters::default();
    for chunk in idx.chunks(bs) {
        let (x, y) = load_batch(ds, chunk, |&i| i, size, workers, &|img, _| {
            transform.apply(img)
        })?;
        let (x, y) = (x.to_device(device), y.to_device(device));
        let _g = tch::no_grad_guard();
        let logits = model.forward(&x, false)?;
        let loss = logits.cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0);
        m.loss_total += loss.double_value(&[]);
        m.loss_count += 1.0;
        let (_, top) = logits.topk(k, 1, true, true);
        let hit = top.eq_tensor(&y.reshape([-1, 1]));
        // timm's accuracy() × n: hits × 100 (exact here; the official float32 acc × n rounds
        // at the 1e-7 level).
        m.acc1_total += 100.0 * hit.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]);
        m.acc5_total += 100.0 * hit.sum(Kind::Float).double_value(&[]);
        m.count += chunk.len() as f64;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(m)
}

/// The classifier rows of a weights file, when it has a classifier (`head.weight` of a timm or
/// fine-tuned model, with `model.` / `module.` prefixes allowed).
fn pretrained_classifier(path: &Path) -> Result<Option<(Tensor, Tensor)>> {
    let norm = |k: &str| {
        k.replace("module.", "")
            .trim_start_matches("model.")
            .to_string()
    };
    let all: HashMap<String, Tensor> = if crate::params::read_safetensors_metadata(path).is_ok() {
        read_safetensors(path)?
    } else {
        crate::interop::read_pth_subset(path, |name, _| {
            name.ends_with("head.weight") || name.ends_with("head.bias")
        })?
        .tensors
    };
    let mut w = None;
    let mut b = None;
    for (k, t) in all {
        match norm(&k).as_str() {
            "head.weight" if t.dim() == 2 => w = Some(t),
            "head.bias" => b = Some(t),
            _ => {}
        }
    }
    Ok(match (w, b) {
        (Some(w), Some(b)) => Some((w, b)),
        _ => None,
    })
}

/// Builds the classifier of `cfg` for `nb_classes` classes and loads the pre-trained weights
/// into it (None: random initialisation, the official one). Seeds libtorch's generator with
/// `cfg.seed` first.
pub fn build_model(
    cfg: &FinetuneConfig,
    nb_classes: i64,
    device: Device,
) -> Result<(Classifier, Option<Pretrained>)> {
    tch::manual_seed(cfg.seed as i64);
    if let Some(model) = resumed_architecture(cfg, nb_classes, device)? {
        return Ok((model, None));
    }
    let pre = match &cfg.pretrained_weights {
        Some(p) => {
            ensure!(
                p.exists(),
                "--pretrained_weights {} does not exist",
                p.display()
            );
            let w = crate::interop::load_pretrained_with(
                p,
                &cfg.checkpoint_key,
                cfg.arch.as_deref(),
                cfg.num_heads,
            )?;
            eprintln!("weights: {}", w.description);
            Some(w)
        }
        None => None,
    };
    let mut backbone: BackboneConfig = match &pre {
        Some(p) => p.config.clone(),
        None if cfg.arch.as_deref().is_some_and(|a| a.starts_with("swin")) => {
            crate::models::SwinConfig::from_arch(
                cfg.arch.as_deref().unwrap_or_default(),
                cfg.window_size.unwrap_or(7),
            )?
            .into()
        }
        None => {
            let arch = cfg.arch.as_deref().unwrap_or("vit_small");
            let mut v = VitConfig::from_arch(arch, 16)?;
            if let Some(h) = cfg.num_heads {
                v.num_heads = h;
            }
            v.into()
        }
    };
    let size = cfg.aug.input_size as i64;
    ensure!(
        size % backbone.patch_size() == 0,
        "--input_size {size} is not a multiple of the model's patch size {}",
        backbone.patch_size()
    );
    match &mut backbone {
        BackboneConfig::Vit(v) => {
            ensure!(
                cfg.window_size.is_none(),
                "--window_size is a Swin option; this model is a ViT"
            );
            v.img_size = size;
            v.drop_path_rate = cfg.drop_path;
            v.masked_im_modeling = false;
        }
        BackboneConfig::Swin(s) => {
            // The official create_model(img_size=input_size, drop_path_rate=drop_path): the
            // windows and shifts follow the fine-tuning resolution.
            // --window_size replaces the pre-trained window; load_pretrained then resizes the
            // relative position bias tables to the new per-stage windows.
            s.img_size = size;
            if let Some(w) = cfg.window_size {
                s.window_size = w;
            }
            s.drop_path_rate = cfg.drop_path;
            s.masked_im_modeling = false;
            s.validate()
                .context("the Swin at --input_size and --window_size")?;
        }
    }
    let mut head_hidden_dim = 0;
    if cfg.finetune_head_layer > 0 {
        let Some(p) = &pre else {
            bail!(
                "--finetune_head_layer {} needs pre-trained weights with a projection head",
                cfg.finetune_head_layer
            )
        };
        ensure!(
            !p.head.is_empty(),
            "--finetune_head_layer {}: {} has no projection head (a backbone-only file?); the \
             semi-supervised recipe starts from a full checkpoint",
            cfg.finetune_head_layer,
            p.description
        );
        let hc = crate::interop::infer_head_config(&p.head, backbone.embed_dim())?
            .context("the projection head could not be read")?;
        ensure!(
            hc.norm == crate::models::HeadNorm::None,
            "the projection head has LayerNorms (--norm_in_head ln), which the official \
             ClassProjHead cannot rebuild"
        );
        ensure!(
            (cfg.finetune_head_layer as i64) < hc.nlayers,
            "--finetune_head_layer {} must be below the head's {} layers (keeping the whole head \
             with its weight-normed last layer is not implemented)",
            cfg.finetune_head_layer,
            hc.nlayers
        );
        head_hidden_dim = hc.hidden_dim;
    }
    let ccfg = ClassifierConfig {
        backbone,
        nb_classes,
        use_mean_pooling: cfg.use_mean_pooling,
        finetune_head_layer: cfg.finetune_head_layer,
        head_hidden_dim,
        init_scale: cfg.init_scale,
    };
    let mut model = Classifier::new(&ccfg, device)?;
    model.set_dropout(cfg.drop, cfg.attn_drop_rate)?;
    if (pre.is_none() || cfg.from_scratch) && cfg.recipe == Recipe::ImagenetLayerDecay {
        // modeling_finetune's fix_init_weight: attn.proj and mlp.fc2 of block i divided by
        // sqrt(2 (i + 1)).
        // (The official Swin has no fix_init_weight.)
        tch::no_grad(|| {
            for (i, b) in model
                .vit()
                .map(|v| &v.blocks[..])
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                let s = (2.0 * (i + 1) as f64).sqrt();
                let _ = b.attn.proj.weight.detach().g_div_scalar_(s);
                let _ = b.mlp.fc2.weight.detach().g_div_scalar_(s);
            }
        });
    }
    if cfg.from_scratch {
        eprintln!("--from_scratch: the architecture of the weights, randomly initialised");
    }
    if let (Some(p), Some(path), false) = (&pre, &cfg.pretrained_weights, cfg.from_scratch) {
        let mut src: HashMap<String, Tensor> = p
            .backbone
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        for l in 0..cfg.finetune_head_layer {
            for s in ["weight", "bias"] {
                let k = format!("mlp.{}.{s}", 2 * l);
                let t = p
                    .head
                    .get(&k)
                    .with_context(|| format!("the projection head has no '{k}'"))?;
                src.insert(format!("head.{k}"), t.shallow_clone());
            }
        }
        if cfg.finetune_head_layer == 0 {
            if let Some((w, b)) = pretrained_classifier(path)? {
                let rows = w.size()[0];
                if rows != nb_classes {
                    ensure!(
                        cfg.reset_head,
                        "{} holds a classifier for {rows} classes but this run has {nb_classes} \
                         (--nb_classes or the data set); pass --reset_head to start a new \
                         classifier (the official scripts silently drop a mismatched head)",
                        path.display()
                    );
                    eprintln!("Removing key head.weight, head.bias from pretrained checkpoint ({rows} classes)");
                } else if w.size()[1] == ccfg.backbone.embed_dim() {
                    src.insert("head.weight".into(), w);
                    src.insert("head.bias".into(), b);
                }
            }
        }
        let (missing, unexpected) = model.load_pretrained(&src)?;
        eprintln!(
            "Weights of VisionTransformer not initialized from pretrained model: {missing:?}\n\
             Weights from pretrained model not used in VisionTransformer: {unexpected:?}"
        );
        let backbone_missing: Vec<_> = missing
            .iter()
            .filter(|k| !k.starts_with("head") && !k.starts_with("fc_norm"))
            .collect();
        ensure!(
            backbone_missing.is_empty(),
            "the pre-trained weights lack backbone tensors {backbone_missing:?}"
        );
    }
    Ok((model, pre))
}

fn save_checkpoint(
    path: &Path,
    t: &Trainer,
    next_epoch: usize,
    max_accuracy: f64,
    cfg: &FinetuneConfig,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = t
        .model
        .ps
        .state_dict()
        .map(|(k, v)| (format!("model.{k}"), v.detach()))
        .collect();
    if let Some(e) = &t.ema {
        named.extend(
            e.ps.state_dict()
                .map(|(k, v)| (format!("model_ema.{k}"), v.detach())),
        );
    }
    named.extend(
        t.opt
            .state_tensors(&t.model.ps)
            .into_iter()
            .map(|(k, v)| (format!("optimizer.{k}"), v)),
    );
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        next_epoch,
        max_accuracy,
        classifier: t.model.cfg.clone(),
        config: cfg.clone(),
        scaler: (t.precision == Precision::Fp16).then(|| t.scaler.clone()),
        precision: Some(t.precision),
    };
    let mut md = HashMap::new();
    md.insert(META_KEY.to_string(), serde_json::to_string(&meta)?);
    write_safetensors(path, &named, Some(md))
}

/// The metadata of a fine-tuning checkpoint.
fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    let md = read_safetensors_metadata(path)?;
    let raw = md
        .get(META_KEY)
        .with_context(|| format!("{} is not an `ibot finetune` checkpoint", path.display()))?;
    serde_json::from_str(raw).with_context(|| format!("{}: damaged metadata", path.display()))
}

fn load_checkpoint(path: &Path, t: &mut Trainer) -> Result<(usize, f64)> {
    let md = read_safetensors_metadata(path)?;
    let raw = md
        .get(META_KEY)
        .with_context(|| format!("{} is not an `ibot finetune` checkpoint", path.display()))?;
    let meta: CheckpointMeta = serde_json::from_str(raw)
        .with_context(|| format!("{}: damaged metadata", path.display()))?;
    ensure!(
        meta.format == FORMAT,
        "{}: unsupported format {}",
        path.display(),
        meta.format
    );
    ensure!(
        meta.classifier.nb_classes == t.model.cfg.nb_classes,
        "{} was trained for {} classes, this run has {}",
        path.display(),
        meta.classifier.nb_classes,
        t.model.cfg.nb_classes
    );
    let all = read_safetensors(path)?;
    t.model
        .ps
        .load_strict(
            &all.iter()
                .filter(|(k, _)| k.starts_with("model."))
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
            "model.",
        )
        .with_context(|| format!("resuming from {}", path.display()))?;
    if let Some(e) = &t.ema {
        let src: HashMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| k.starts_with("model_ema."))
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        if src.is_empty() {
            eprintln!(
                "note: {} has no EMA model; the EMA restarts from the model",
                path.display()
            );
            tch::no_grad(|| {
                for (a, b) in e.ps.params().iter().zip(t.model.ps.params()) {
                    a.tensor.detach().copy_(&b.tensor);
                }
            });
        } else {
            e.ps.load_strict(&src, "model_ema.")?;
        }
    }
    t.opt.load_state(&t.model.ps, &all, "optimizer.")?;
    if let (Some(sc), Precision::Fp16) = (meta.scaler, t.precision) {
        t.scaler = sc;
    }
    Ok((meta.next_epoch, meta.max_accuracy))
}

/// The number of classes of a fine-tuning checkpoint (for `--eval` without data-set classes).
pub fn checkpoint_classes(path: &Path) -> Result<Option<i64>> {
    let md = read_safetensors_metadata(path)?;
    Ok(match md.get(META_KEY) {
        Some(raw) => Some(
            serde_json::from_str::<CheckpointMeta>(raw)?
                .classifier
                .nb_classes,
        ),
        None => None,
    })
}

/// The checkpoint a run resumes from: `--resume`, else `checkpoint.safetensors` in
/// `--output_dir` when it exists.
fn resume_path(cfg: &FinetuneConfig) -> Option<PathBuf> {
    match &cfg.resume {
        Some(p) => Some(p.clone()),
        None => Some(cfg.output_dir.join("checkpoint.safetensors")).filter(|p| p.is_file()),
    }
}

/// When neither `--pretrained_weights` nor `--arch` names an architecture but the run resumes
/// (e.g. `--eval --resume CKPT`), the classifier the checkpoint was written by, with this
/// run's drop path, dropout and input size (the official scripts take the architecture from
/// `--model`; the checkpoint already says it). None otherwise.
fn resumed_architecture(
    cfg: &FinetuneConfig,
    nb_classes: i64,
    device: Device,
) -> Result<Option<Classifier>> {
    if cfg.pretrained_weights.is_some() || cfg.arch.is_some() {
        return Ok(None);
    }
    let Some(path) = resume_path(cfg).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let md = read_safetensors_metadata(&path)?;
    let raw = md.get(META_KEY).with_context(|| {
        format!(
            "{} is not an `ibot finetune` checkpoint (give --pretrained_weights or --arch for \
             the architecture)",
            path.display()
        )
    })?;
    let meta: CheckpointMeta = serde_json::from_str(raw)
        .with_context(|| format!("{}: damaged metadata", path.display()))?;
    let mut c = meta.classifier;
    // Options that would build another classifier than the checkpoint's are refused here
    // rather than silently ignored.
    let mean_pooling = c.use_mean_pooling;
    ensure!(
        cfg.use_mean_pooling == mean_pooling,
        "{} was written with {} pooling; leave out --use_mean_pooling/--use_cls or give \
         --pretrained_weights or --arch to build another classifier",
        path.display(),
        if mean_pooling { "mean" } else { "[CLS]" }
    );
    match &c.backbone {
        BackboneConfig::Vit(v) => ensure!(
            cfg.window_size.is_none() && cfg.num_heads.is_none_or(|h| h == v.num_heads),
            "--window_size/--num_heads do not apply when the architecture comes from {} (a ViT \
             with {} heads); give --pretrained_weights or --arch to build another one",
            path.display(),
            v.num_heads
        ),
        BackboneConfig::Swin(s) => ensure!(
            cfg.window_size.is_none_or(|w| w == s.window_size) && cfg.num_heads.is_none(),
            "--window_size/--num_heads do not apply when the architecture comes from {} (a Swin \
             with window {}); give --pretrained_weights or --arch to build another one",
            path.display(),
            s.window_size
        ),
    }
    ensure!(
        c.nb_classes == nb_classes,
        "{} classifies {} classes but the data has {nb_classes} (--nb_classes)",
        path.display(),
        c.nb_classes
    );
    let size = cfg.aug.input_size as i64;
    match &mut c.backbone {
        BackboneConfig::Vit(v) => {
            v.img_size = size;
            v.drop_path_rate = cfg.drop_path;
        }
        BackboneConfig::Swin(s) => {
            s.img_size = size;
            s.drop_path_rate = cfg.drop_path;
            s.validate().context("the Swin at --input_size")?;
        }
    }
    let mut model = Classifier::new(&c, device)?;
    model.set_dropout(cfg.drop, cfg.attn_drop_rate)?;
    eprintln!("architecture: the classifier of {}", path.display());
    Ok(Some(model))
}

/// The fine-tuned classifier of an `ibot finetune` checkpoint (the `model.` tensors, not the EMA)
/// with the configuration of the run that wrote it, e.g. to predict with it from a program.
pub fn load_finetuned(path: &Path, device: Device) -> Result<(Classifier, FinetuneConfig)> {
    let md = read_safetensors_metadata(path)?;
    let raw = md
        .get(META_KEY)
        .with_context(|| format!("{} is not an `ibot finetune` checkpoint", path.display()))?;
    let meta: CheckpointMeta = serde_json::from_str(raw)
        .with_context(|| format!("{}: damaged metadata", path.display()))?;
    let model = Classifier::new(&meta.classifier, device)?;
    let all = read_safetensors(path)?;
    model
        .ps
        .load_strict(
            &all.into_iter()
                .filter(|(k, _)| k.starts_with("model."))
                .collect(),
            "model.",
        )
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((model, meta.config))
}

fn append_log(path: &Path, entries: &[(String, serde_json::Value)]) -> Result<()> {
    use std::io::Write;
    // Keys in the official order (serde_json's map would sort them).
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap_or_default(), v))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{{{}}}", body.join(", ")).with_context(|| format!("writing {}", path.display()))
}

/// Averages of the official MetricLogger over an epoch.
#[derive(Default)]
struct Meters {
    sums: Vec<(String, f64, usize)>,
}

impl Meters {
    fn update(&mut self, k: &str, v: Option<f64>) {
        let Some(v) = v else { return };
        match self.sums.iter_mut().find(|(n, _, _)| n == k) {
            Some(e) => {
                e.1 += v;
                e.2 += 1;
            }
            None => self.sums.push((k.to_string(), v, 1)),
        }
    }
    /// MetricLogger.synchronize_between_processes: every meter's total and count summed over
    /// the ranks (every rank updates the same meters in the same order), so the averages are
    /// the global ones.
    fn synchronize(&mut self, comm: &dyn Comm) -> Result<()> {
        if comm.world_size() == 1 || self.sums.is_empty() {
            return Ok(());
        }
        let flat: Vec<f64> = self
            .sums
            .iter()
            .flat_map(|(_, s, n)| [*s, *n as f64])
            .collect();
        let mut t = Tensor::from_slice(&flat).to_device(comm.device());
        comm.all_reduce_sum(&mut t)
            .context("synchronizing the metrics")?;
        let all = Vec::<f64>::try_from(t.to_device(Device::Cpu))?;
        for (e, v) in self.sums.iter_mut().zip(all.chunks(2)) {
            e.1 = v[0];
            e.2 = v[1].round() as usize;
        }
        Ok(())
    }
    fn averages(&self) -> Vec<(String, f64)> {
        self.sums
            .iter()
            .map(|(k, s, n)| (k.clone(), s / *n as f64))
            .collect()
    }
}

/// The options every rank must share, compared across the ranks by
/// [`crate::dist::check_same_options`]: not the device, threads, progress bars or rendezvous,
/// nor where each node reads its data and weights (nodes may hold local copies; the output
/// directory is compared, as resuming needs one that all ranks share).
fn shared_options(cfg: &FinetuneConfig) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(cfg)?;
    if let Some(m) = v.as_object_mut() {
        for k in [
            "device",
            "num_workers",
            "progress",
            "dist",
            "data_path",
            "eval_data_path",
            "pretrained_weights",
            "split_file",
        ] {
            m.remove(k);
        }
    }
    Ok(v)
}

/// Runs fine-tuning (or, with `eval`, only the evaluation) as configured: one process, or one
/// rank of a data-parallel run when launched by `ibot launch`, torchrun or SLURM.
pub fn run(cfg: &FinetuneConfig) -> Result<FinetuneOutcome> {
    cfg.validate()?;
    let choice: crate::device::DeviceChoice = cfg.device.parse()?;
    let (comm, device, _env) = crate::dist::join_world(&cfg.dist, choice)?;
    run_with(cfg, comm.as_ref(), device)
}

/// [`run`] inside an existing world, as the official scripts under torch.distributed: rank 0's
/// initial weights everywhere, the training set sharded per epoch as DistributedSampler
/// (shuffled with seed and epoch, padded by wrapping, rank r taking positions r, r + W, ...;
/// RASampler's share with repeated augmentation), gradients averaged over the ranks, the
/// MetricLogger's meters summed over the ranks, evaluation on every rank over the whole
/// validation set (the scripts' default) or, with --dist_eval, sharded as
/// DistributedSampler(shuffle=False) (padded by repeating the first images) with the meters
/// summed over the ranks, and only rank 0 writing.
pub fn run_with(cfg: &FinetuneConfig, comm: &dyn Comm, device: Device) -> Result<FinetuneOutcome> {
    cfg.validate()?;
    let (rank, ws, main) = (comm.rank(), comm.world_size(), comm.is_main());
    crate::dist::check_same_options(comm, &shared_options(cfg)?, "fine-tuning options")?;
    let progress = cfg.progress && main;
    let (train_ds, val_ds) = data::open_sets(
        &cfg.data_path,
        cfg.eval_data_path.as_deref(),
        cfg.data_set.as_deref(),
    )?;
    let train_ds: Box<dyn Dataset> = match &cfg.split_file {
        Some(s) => data::apply_split_file(
            &data::train_root(&cfg.data_path, cfg.eval_data_path.as_deref()),
            s,
        )?,
        None => train_ds,
    };
    let lim = cfg.subset.unwrap_or(usize::MAX);
    let n_train = train_ds.len().min(lim);
    let val_idx: Vec<usize> = (0..val_ds.len().min(lim)).collect();
    ensure!(
        !val_idx.is_empty(),
        "the validation set ({}) is empty",
        val_ds.describe()
    );
    // Classes: the data set's (class folders, or the largest label + 1).
    let labels_max = (0..n_train)
        .map(|i| train_ds.label(i))
        .chain(val_idx.iter().map(|&i| val_ds.label(i)))
        .max()
        .unwrap_or(-1);
    ensure!(
        (0..n_train).all(|i| train_ds.label(i) >= 0),
        "fine-tuning needs labelled images (class folders or IDX labels); {} has none",
        train_ds.describe()
    );
    let ds_classes = (train_ds.classes().len() as i64).max(labels_max + 1);
    let nb_classes = match cfg.nb_classes {
        Some(n) => {
            ensure!(
                n >= ds_classes,
                "--nb_classes {n} is fewer than the {ds_classes} classes of the data \
                 ({}; labels go up to {labels_max})",
                train_ds.describe()
            );
            if n > ds_classes {
                eprintln!("note: --nb_classes {n}, the data has {ds_classes} classes");
            }
            n
        }
        None => ds_classes,
    };
    let (model, _) = build_model(cfg, nb_classes, device)?;
    let n_parameters = model.n_parameters();
    eprintln!("number of params: {n_parameters}");
    let mut mcfg = cfg.mixup.clone();
    mcfg.num_classes = nb_classes as usize;
    mcfg.label_smoothing = cfg.smoothing;
    let mixup = if mcfg.active() {
        Some(cls::Mixup::new(&mcfg)?)
    } else {
        None
    };
    // The precision is decided once for every rank (rank 0 may probe; a resumed run keeps the
    // stored one) and handed to the trainer as an explicit choice.
    let stored = resume_path(cfg).and_then(|p| {
        let meta = read_meta(&p).ok()?;
        let same = cfg.use_fp16
            && meta.config.use_fp16
            && meta.config.precision == amp::PrecisionChoice::Auto;
        meta.precision.filter(|_| same).map(|pr| (pr, p))
    });
    let (precision, reason) =
        amp::decide_for_run(cfg.use_fp16, cfg.precision, device, stored, comm)?;
    let decided = FinetuneConfig {
        precision: match precision {
            Precision::Fp32 => amp::PrecisionChoice::Float32,
            Precision::Bf16 => amp::PrecisionChoice::Bfloat16,
            Precision::Fp16 => amp::PrecisionChoice::Float16,
        },
        ..cfg.clone()
    };
    let mut trainer = Trainer::new(model, &decided, device)?;
    eprintln!("criterion = {}", trainer.criterion.name());
    if main {
        eprintln!("precision: {} ({reason})", trainer.precision.name());
    }

    crate::util::create_output_dir(&cfg.output_dir)?;
    // One run per output directory: rank 0 holds the lock.
    let _lock = if main {
        Some(crate::util::lock_dir(&cfg.output_dir)?)
    } else {
        None
    };
    let ckpt = cfg.output_dir.join("checkpoint.safetensors");
    if let Some(p) = &cfg.resume {
        ensure!(p.is_file(), "--resume {} does not exist", p.display());
    }
    let resume = resume_path(cfg);
    let (mut start, mut max_accuracy) = (0usize, 0.0f64);
    if let Some(p) = &resume {
        (start, max_accuracy) = load_checkpoint(p, &mut trainer)?;
        if main {
            eprintln!(
                "Resume checkpoint {} (next epoch {start}, max accuracy {max_accuracy:.2}%)",
                p.display()
            );
        }
    }
    if ws > 1 {
        // Every rank read the same checkpoint (or none) ...
        let epochs = crate::dist::all_gather_i64(comm, &[start as i64])?;
        if let Some(r) = epochs.iter().position(|&e| e != start as i64) {
            bail!(
                "rank {r} would resume at epoch {} but rank {rank} at epoch {start}: every rank \
                 must see the same checkpoint (put --output_dir on a file system all nodes share)",
                epochs[r]
            );
        }
        // ... and, as DDP at construction, holds rank 0's weights (checked).
        crate::dist::broadcast_params(comm, &trainer.model.ps).context("model")?;
        if let Some(e) = &trainer.ema {
            crate::dist::broadcast_params(comm, &e.ps).context("EMA model")?;
        }
    }
    let size = cfg.aug.input_size;
    let eval_t = cls::EvalTransform::new(&cfg.aug)?;
    let eval_bs = ((1.5 * cfg.batch_size as f64) as usize).max(1);
    let workers = cfg.num_workers.max(1);
    // The validation pass of the model or of its EMA, as the official scripts: every rank on
    // the whole set (SequentialSampler), or with --dist_eval each rank on its
    // DistributedSampler(shuffle=False) share; the meters then summed over the ranks.
    let dist_eval = cfg.dist_eval && ws > 1;
    if dist_eval && val_idx.len() % ws != 0 && main {
        eprintln!(
            "Warning: Enabling distributed evaluation with an eval dataset not divisible by process \
             number. This will slightly alter validation results as extra duplicate entries are \
             added to achieve equal num of samples per-process."
        );
    }
    let eval_idx = if dist_eval {
        crate::dist::shard(&val_idx, rank, ws)
    } else {
        val_idx.clone()
    };
    // The official `evaluate` runs under autocast too (float16 on CUDA, bfloat16 here on AMX
    // CPUs; a plain call in float32).
    let precision = trainer.precision;
    let evaluate_on = |model: &Classifier| -> Result<EvalStats> {
        let mut m = amp::autocast(precision, device, || {
            evaluate_meters(
                model,
                val_ds.as_ref(),
                &eval_idx,
                &eval_t,
                size,
                eval_bs,
                workers,
                progress,
                device,
            )
        })?;
        m.synchronize(comm)?;
        m.stats()
    };
    if cfg.eval {
        let s = evaluate_on(&trainer.model)?;
        if main {
            println!(
            "* Acc@1 {:.3} Acc@5 {:.3} loss {:.3}\nAccuracy of the network on the {} test images: {:.1}%",
            s.acc1, s.acc5, s.loss, val_idx.len(), s.acc1
        );
        }
        return Ok(FinetuneOutcome {
            rank,
            max_accuracy: s.acc1,
            last: Some(s),
            ema_last: None,
            epochs_done: 0,
            n_parameters,
            nb_classes,
        });
    }

    let train_t = cls::TrainTransform::new(&cfg.aug)?;
    let total_batch = cfg.batch_size * cfg.update_freq;
    // This rank's images per epoch: DistributedSampler's ceil(n / W), or RASampler's
    // floor(n // 256 * 256 / W).
    let per_epoch_items = if cfg.repeated_aug {
        n_train / 256 * 256 / ws
    } else {
        n_train.div_ceil(ws)
    };
    let steps_per_epoch = per_epoch_items / total_batch;
    ensure!(
        steps_per_epoch > 0,
        "{} training images{}{} make no full step of {} images (--batch_size x --update_freq)",
        n_train,
        if ws > 1 {
            format!(" shared by {ws} ranks")
        } else {
            String::new()
        },
        if cfg.repeated_aug {
            " (repeated augmentation keeps len // 256 * 256 of them per epoch)"
        } else {
            ""
        },
        total_batch
    );
    let lr_sched = if cfg.recipe.is_deit() {
        None
    } else {
        Some(per_iteration_cosine_steps(
            cfg.lr,
            cfg.min_lr,
            cfg.epochs,
            steps_per_epoch,
            cfg.warmup_epochs,
            0.0,
            cfg.warmup_steps,
        )?)
    };
    let wd_sched = crate::schedule::cosine_scheduler(
        cfg.weight_decay,
        cfg.weight_decay_end,
        cfg.epochs,
        steps_per_epoch,
        0,
        0.0,
    )?;
    if main {
        crate::util::atomic_write(
            &cfg.output_dir.join("args.json"),
            serde_json::to_string_pretty(cfg)?.as_bytes(),
        )?;
    }
    let log_path = cfg.output_dir.join("log.txt");
    let (mut last, mut ema_last, mut done) = (None, None, 0);
    let mut iter_loss: Vec<(f64, f64)> = Vec::new();
    let mut iter_lr: Vec<(f64, f64)> = Vec::new();
    let mut acc_pts: Vec<(f64, f64)> = Vec::new();
    let mut tloss_pts: Vec<(f64, f64)> = Vec::new();
    let t0 = Instant::now();
    for epoch in start..cfg.epochs {
        if let Some(sig) = crate::train::interrupt::pending() {
            return Err(crate::train::interrupt::interrupted(sig));
        }
        trainer.model.backbone.reseed_drop_path(
            cfg.seed
                .wrapping_mul(31)
                .wrapping_add(epoch as u64)
                .wrapping_add((rank as u64) << 32),
        );
        // The same permutation on every rank (seed and epoch), this rank's share of it.
        let order = epoch_order(n_train, cfg.seed, epoch, cfg.repeated_aug);
        let mut order = crate::dist::shard(&order, rank, ws);
        order.truncate(per_epoch_items);
        let n_micro = steps_per_epoch * cfg.update_freq;
        let bar = if progress {
            crate::util::progress_bar(n_micro as u64, &format!("Epoch: [{epoch}]"))
        } else {
            crate::util::Progress::hidden()
        };
        let mut meters = Meters::default();
        let deit_lr = deit_epoch_lr(
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_lr,
            cfg.warmup_epochs,
            cfg.epochs,
            epoch,
        );
        for (b, chunk) in order.chunks(cfg.batch_size).take(n_micro).enumerate() {
            if chunk.len() < cfg.batch_size {
                break; // drop_last
            }
            let step = b / cfg.update_freq;
            let it = epoch * steps_per_epoch + step;
            let lr = match &lr_sched {
                Some(s) => s[it],
                None => deit_lr,
            };
            let wd = wd_sched[it];
            let (seed, ep) = (cfg.seed, epoch);
            let (x, y) = load_batch(
                train_ds.as_ref(),
                chunk,
                |&(i, _)| i,
                size,
                workers,
                &|img, &(i, r)| train_t.apply(img, &mut view_rng(seed, ep, i, r)),
            )?;
            let (x, y) = match &mixup {
                Some(m) => {
                    let mut r = ChaCha8Rng::seed_from_u64(
                        cfg.seed
                            ^ ((epoch as u64) << 32)
                            ^ (b as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)
                            ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    m.apply(&x, &y, &mut r)?
                }
                None => (x, y),
            };
            let out = trainer
                .micro_step_dist(comm, &x, &y, lr, wd)
                .with_context(|| format!("epoch {epoch}, iteration {b}"))?;
            let (max_lr, min_lr) = trainer.groups.iter().fold((0.0f64, 10.0f64), |(a, c), g| {
                (a.max(lr * g.lr_scale), c.min(lr * g.lr_scale))
            });
            meters.update("lr", Some(max_lr));
            if !cfg.recipe.is_deit() {
                meters.update("min_lr", Some(min_lr));
            }
            meters.update("loss", Some(out.loss));
            if !cfg.recipe.is_deit() {
                meters.update(
                    "class_acc",
                    if mixup.is_none() { out.class_acc } else { None },
                );
                // The scale after this micro-step (`loss_scaler.state_dict()["scale"]`).
                meters.update(
                    "loss_scale",
                    (trainer.precision == Precision::Fp16).then_some(trainer.scaler.scale),
                );
                meters.update("weight_decay", (cfg.weight_decay > 0.0).then_some(wd));
                meters.update("grad_norm", out.grad_norm);
            }
            let x_ep = epoch as f64 + (b as f64 + 0.5) / n_micro as f64 - 0.5;
            iter_loss.push((x_ep, out.loss));
            iter_lr.push((x_ep, max_lr));
            bar.set_message(format!("loss {:.4} lr {max_lr:.2e}", out.loss));
            bar.inc(1);
        }
        bar.finish_and_clear();
        meters.synchronize(comm)?;
        let test = evaluate_on(&trainer.model)?;
        let ema_test = match &trainer.ema {
            Some(e) => Some(evaluate_on(e)?),
            None => None,
        };
        if main {
            println!(
                "Accuracy of the network on the {} test images: {:.1}%{}",
                val_idx.len(),
                test.acc1,
                ema_test
                    .map(|e| format!(" (EMA model: {:.1}%)", e.acc1))
                    .unwrap_or_default()
            );
        }
        // Every rank evaluated the same weights on the same images: the same decision.
        let improved = test.acc1 > max_accuracy;
        if improved {
            max_accuracy = test.acc1;
        }
        if main {
            println!("Max accuracy: {max_accuracy:.2}%");
        }
        let mut entries: Vec<(String, serde_json::Value)> = meters
            .averages()
            .into_iter()
            .map(|(k, v)| (format!("train_{k}"), v.into()))
            .collect();
        entries.push(("test_loss".into(), test.loss.into()));
        entries.push(("test_acc1".into(), test.acc1.into()));
        entries.push(("test_acc5".into(), test.acc5.into()));
        if let Some(e) = ema_test {
            entries.push(("test_ema_loss".into(), e.loss.into()));
            entries.push(("test_ema_acc1".into(), e.acc1.into()));
            entries.push(("test_ema_acc5".into(), e.acc5.into()));
        }
        entries.push(("epoch".into(), epoch.into()));
        entries.push(("n_parameters".into(), n_parameters.into()));
        acc_pts.push((epoch as f64, test.acc1));
        tloss_pts.push((epoch as f64, test.loss));
        // Rank 0 writes between two barriers: nobody runs ahead of a checkpoint being written,
        // and no rank stops (or resumes) before it is complete.
        comm.barrier().context("before saving the checkpoint")?;
        if main {
            if improved {
                save_checkpoint(
                    &cfg.output_dir.join("checkpoint-best.safetensors"),
                    &trainer,
                    epoch + 1,
                    max_accuracy,
                    cfg,
                )?;
            }
            save_checkpoint(&ckpt, &trainer, epoch + 1, max_accuracy, cfg)?;
            append_log(&log_path, &entries)?;
            let curves = crate::train::plot::Curves {
                epochs: &[],
                iters: &iter_loss,
                schedules: &[
                    ("test acc@1 (%)", acc_pts.clone()),
                    ("test loss", tloss_pts.clone()),
                    ("learning rate (max over groups)", iter_lr.clone()),
                ],
            };
            if let Err(e) = crate::train::plot::write_training_png(
                &curves,
                &cfg.output_dir.join("finetune.png"),
            ) {
                eprintln!("warning: finetune.png not written: {e:#}");
            }
        }
        comm.barrier().context("after saving the checkpoint")?;
        (last, ema_last, done) = (Some(test), ema_test, done + 1);
    }
    if done > 0 && main {
        eprintln!("Training time {:.0}s", t0.elapsed().as_secs_f64());
    }
    Ok(FinetuneOutcome {
        max_accuracy,
        last,
        ema_last,
        epochs_done: done,
        n_parameters,
        nb_classes,
        rank,
    })
}

/// `<output_dir>/checkpoint.safetensors`.
pub fn checkpoint_path(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoint.safetensors")
}
