//! Linear probing on frozen features, as the official `eval_linear.py` (from DINO).
//!
//! Features: the normed [CLS] tokens of the last `n_last_blocks` blocks, concatenated
//! (`avgpool_patchtokens 0`), the mean of the last block's patch tokens without the final norm
//! (`1`, the official mean-pooling ViT), or both (`2`). A `nn.Linear` (weights N(0, 0.01), bias
//! 0) is trained with cross-entropy and SGD (momentum 0.9, no weight decay, lr scaled by
//! batch/256), the lr following `CosineAnnealingLR(epochs, eta_min=0)` stepped once per epoch.
//! Training images get `RandomResizedCrop(size)` (bilinear, scale 0.08..1) and a horizontal flip;
//! validation images `Resize(size·256/224)` + `CenterCrop(size)`.
//!
//! Swin backbones, as the official code runs them (`get_intermediate_layers` of its Swin): the
//! average-pooled tokens of each of the last `n_last_blocks` blocks, counted over all stages
//! (the final-stage ones after the final norm), concatenated; `--avgpool_patchtokens` must stay
//! 0 (the official code sizes the classifier for that case only).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

pub use super::features::FeatureSpec;
use super::features::{eval_view, view_batch};
use crate::config::{Arch, CheckpointKey};
use crate::data::augment::random_resized_crop_params;
use crate::data::dataset::Dataset;
use crate::data::ops::{self, Filter, Rgb8};
use crate::device::DeviceChoice;
use crate::models::BackboneRef;
use crate::params::{read_safetensors, write_safetensors, ParamStore};
use crate::schedule::cosine_annealing_lr;
use crate::train::optim::{Optimizer, OptimizerKind, ScaledGroup};

/// `LinearClassifier`: one `nn.Linear(dim, num_labels)` trained by SGD with momentum 0.9 (the
/// project's one SGD, [`crate::train::optim::Optimizer`]; LARS for eval_linear_multi's sweep).
pub struct LinearProbe {
    pub weight: Tensor,
    pub bias: Tensor,
    /// `linear.weight` and `linear.bias`, for the optimizer.
    ps: ParamStore,
    /// SGD with its momentum buffers (absent before the first step, as in PyTorch).
    opt: Optimizer,
}

impl std::fmt::Debug for LinearProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearProbe")
            .field("weight", &self.weight.size())
            .field("bias", &self.bias.size())
            .finish()
    }
}

pub const MOMENTUM: f64 = 0.9;

/// `eta` of the official `utils.LARS`.
pub const LARS_ETA: f64 = 0.001;

/// The optimisers of eval_linear_multi.py's sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optim {
    Sgd,
    Lars,
}

impl LinearProbe {
    /// Weights N(0, 0.01), bias 0, drawn from libtorch's generator (seed it with `tch::manual_seed`).
    pub fn new(dim: i64, num_labels: i64, device: Device) -> Self {
        let weight = Tensor::randn([num_labels, dim], (Kind::Float, device)) * 0.01;
        let bias = Tensor::zeros([num_labels], (Kind::Float, device));
        Self::from_weights(weight, bias)
    }

    /// Given weights (e.g. from a reference) and no momentum yet.
    pub fn from_weights(weight: Tensor, bias: Tensor) -> Self {
        let mut ps = ParamStore::new();
        let weight = ps.add("linear.weight", weight.detach().copy(), true);
        let bias = ps.add("linear.bias", bias.detach().copy(), true);
        let mut opt = Optimizer::new(OptimizerKind::Sgd, &ps);
        opt.momentum = MOMENTUM;
        Self {
            weight,
            bias,
            ps,
            opt,
        }
    }

    pub fn logits(&self, feats: &Tensor) -> Tensor {
        feats.flatten(1, -1).linear(&self.weight, Some(&self.bias))
    }

    /// One SGD step on a batch; returns the (pre-step) cross-entropy loss.
    pub fn train_step(&mut self, feats: &Tensor, targets: &Tensor, lr: f64) -> Result<f64> {
        self.train_step_with(feats, targets, lr, 0.0, Optim::Sgd)
    }

    /// One step of `optim` with weight decay `wd` (eval_linear_multi.py's sweep): PyTorch's SGD
    /// (momentum 0.9, the decay added to every gradient, bias included) or the official
    /// `utils.LARS` (momentum 0.9, eta 0.001; decay and the trust ratio on the weight matrix
    /// only, the bias stepping with its plain gradient). Returns the (pre-step) loss.
    pub fn train_step_with(
        &mut self,
        feats: &Tensor,
        targets: &Tensor,
        lr: f64,
        wd: f64,
        optim: Optim,
    ) -> Result<f64> {
        let loss = self.logits(feats).cross_entropy_loss::<Tensor>(
            targets,
            None,
            Reduction::Mean,
            -100,
            0.0,
        );
        let value = loss.double_value(&[]);
        ensure!(value.is_finite(), "linear-probe loss is {value}");
        let grads = Tensor::run_backward(&[&loss], &[&self.weight, &self.bias], false, false);
        let grads: Vec<Option<Tensor>> = grads.into_iter().map(Some).collect();
        // PyTorch SGD: buf = g on the first step, then buf = momentum * buf + g; p -= lr * buf;
        // the decay on every gradient, bias included. LARS: the decay and trust ratio on the
        // weight matrix only (1-D tensors step with their plain gradient), buffer from zeros.
        self.opt.kind = match optim {
            Optim::Sgd => OptimizerKind::Sgd,
            Optim::Lars => OptimizerKind::Lars,
        };
        self.opt.lars_eta = LARS_ETA;
        let group = ScaledGroup {
            name: "linear".into(),
            indices: vec![0, 1],
            lr_scale: 1.0,
            weight_decay: true,
        };
        self.opt.step_groups(&self.ps, &grads, &[group], lr, wd)?;
        Ok(value)
    }

    /// Weights and momentum buffers under the names of the probe's checkpoints
    /// (`linear.{weight,bias}`, `momentum.{weight,bias}`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("linear.weight".to_string(), self.weight.detach()),
            ("linear.bias".to_string(), self.bias.detach()),
        ];
        for (k, t) in self.opt.state_tensors(&self.ps) {
            if let Some(p) = k.strip_suffix(".momentum_buffer") {
                v.push((p.replacen("linear.", "momentum.", 1), t));
            }
        }
        v
    }

    /// Restores momentum buffers saved by [`LinearProbe::state`].
    fn load_momentum(&mut self, weight: Tensor, bias: Tensor) -> Result<()> {
        let src: std::collections::HashMap<String, Tensor> = [
            ("linear.weight.momentum_buffer".to_string(), weight),
            ("linear.bias.momentum_buffer".to_string(), bias),
        ]
        .into_iter()
        .collect();
        self.opt.load_state(&self.ps, &src, "")
    }
}

/// Options of `ibot eval-linear` (names and defaults of the official `eval_linear.py`). Stored
/// in the probe's checkpoints and read back tolerantly (missing keys take these defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinearConfig {
    /// An `ibot train` checkpoint, an exported backbone, or an official .pth.
    pub pretrained_weights: PathBuf,
    pub checkpoint_key: CheckpointKey,
    /// Checked against the weights; only needed for non-standard ViT widths.
    pub arch: Option<Arch>,
    pub num_heads: Option<i64>,
    pub data_path: Option<PathBuf>,
    pub train_path: Option<PathBuf>,
    pub val_path: Option<PathBuf>,
    pub n_last_blocks: usize,
    pub avgpool_patchtokens: u8,
    pub epochs: usize,
    /// Learning rate for a batch of 256.
    pub lr: f64,
    pub batch_size_per_gpu: usize,
    pub seed: u64,
    pub num_workers: usize,
    pub val_freq: usize,
    pub output_dir: PathBuf,
    /// Number of classes (`None`: read from the data set).
    pub num_labels: Option<i64>,
    pub load_from: Option<PathBuf>,
    pub crop_size: Option<usize>,
    pub subset: Option<usize>,
    /// Not the official protocol: train on the features of centre crops computed once.
    pub precompute_features: bool,
    pub device: DeviceChoice,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            pretrained_weights: PathBuf::new(),
            checkpoint_key: CheckpointKey::Teacher,
            arch: None,
            num_heads: None,
            data_path: None,
            train_path: None,
            val_path: None,
            n_last_blocks: 4,
            avgpool_patchtokens: 0,
            epochs: 100,
            lr: 0.001,
            batch_size_per_gpu: 128,
            seed: 0,
            num_workers: 2,
            val_freq: 1,
            output_dir: PathBuf::from("."),
            num_labels: None,
            load_from: None,
            crop_size: None,
            subset: None,
            precompute_features: false,
            device: DeviceChoice::Auto,
        }
    }
}

/// Outcome of a linear-probe run (also written to `<output_dir>/results_linear_<key>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearResult {
    pub best_acc1: f64,
    pub last_acc1: f64,
    pub last_acc5: Option<f64>,
    pub epochs: usize,
    pub feature_dim: i64,
    pub num_labels: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LinearCkptMeta {
    format: String,
    /// Next epoch to run.
    epoch: usize,
    best_acc: f64,
    args: LinearConfig,
}

const CKPT_FORMAT: &str = "ibot-rs-linear/1";

/// The augmented training view of dataset image `index` in `epoch` (its own random stream, so
/// batches do not depend on the number of workers).
pub fn training_view_of(img: &Rgb8, index: usize, size: usize, seed: u64, epoch: usize) -> Rgb8 {
    let mut r = ChaCha8Rng::seed_from_u64(
        seed ^ ((epoch as u64) << 40) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    training_view(img, size, &mut r)
}

/// The order in which `epoch` visits the training images.
pub fn epoch_order(train_idx: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train_idx.to_vec();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    order
}

fn training_view(img: &Rgb8, size: usize, rng: &mut impl Rng) -> Rgb8 {
    let (top, left, h, w) = random_resized_crop_params(
        img.height,
        img.width,
        (0.08, 1.0),
        (3.0 / 4.0, 4.0 / 3.0),
        rng,
    );
    let mut v = ops::resized_crop_with(img, top, left, h, w, size, size, Filter::Bilinear);
    if rng.gen::<f64>() < 0.5 {
        ops::hflip_in_place(&mut v);
    }
    v
}

/// Top-1 / top-5 accuracy (percent) and mean loss of `probe` on features `[N, F]`.
pub fn evaluate(
    probe: &LinearProbe,
    feats: &Tensor,
    labels: &Tensor,
    num_labels: i64,
) -> (f64, Option<f64>, f64) {
    let _g = tch::no_grad_guard();
    let logits = probe.logits(feats);
    let loss = logits
        .cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, 0.0)
        .double_value(&[]);
    let k = 5.min(num_labels);
    let (_, top) = logits.topk(k, 1, true, true);
    let hit = top.eq_tensor(&labels.reshape([-1, 1]));
    let n = labels.size()[0] as f64;
    let acc1 = hit.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]) * 100.0 / n;
    let acc5 = (num_labels >= 5).then(|| hit.sum(Kind::Float).double_value(&[]) * 100.0 / n);
    (acc1, acc5, loss)
}

/// What every linear probe (eval-linear, eval-linear-multi) settles before training: the image
/// indices (at most `subset` of each split), the number of classes (`--num_labels`, or one
/// past the largest label) and the crop side (`--crop_size`, or the resolution the backbone was
/// built for, which the command resolves and reports).
pub(crate) struct ProbeData {
    pub train_idx: Vec<usize>,
    pub val_idx: Vec<usize>,
    pub num_labels: i64,
    pub size: usize,
}

impl ProbeData {
    pub(crate) fn new(
        train: &dyn Dataset,
        val: &dyn Dataset,
        subset: Option<usize>,
        num_labels: Option<i64>,
        crop_size: Option<usize>,
        backbone: BackboneRef,
    ) -> Result<Self> {
        let lim = subset.unwrap_or(usize::MAX);
        let train_idx: Vec<usize> = (0..train.len().min(lim)).collect();
        let val_idx: Vec<usize> = (0..val.len().min(lim)).collect();
        ensure!(
            !train_idx.is_empty() && !val_idx.is_empty(),
            "the training or validation set is empty"
        );
        let tl: Vec<i64> = train_idx.iter().map(|&i| train.label(i)).collect();
        let vl: Vec<i64> = val_idx.iter().map(|&i| val.label(i)).collect();
        if tl.iter().chain(&vl).any(|&l| l < 0) {
            bail!("linear evaluation needs labelled images (class folders or IDX labels)");
        }
        let seen = tl.iter().chain(&vl).max().copied().unwrap_or(0) + 1;
        let num_labels = num_labels.unwrap_or(seen);
        ensure!(
            seen <= num_labels,
            "labels go up to {} but --num_labels is {num_labels}",
            seen - 1
        );
        let trained = match backbone {
            BackboneRef::Vit(v) => v.cfg.img_size,
            BackboneRef::Swin(s) => s.cfg.img_size,
        };
        Ok(Self {
            train_idx,
            val_idx,
            num_labels,
            size: crop_size.unwrap_or(trained as usize),
        })
    }
}

/// Features of `idx` under the evaluation view (as the probe takes them: not normalised) and
/// their labels, in batches of `bs` with a progress bar, gathered on the CPU and then moved to
/// `device`: the fixed validation set, and the training set with `--precompute_features`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_features(
    ds: &dyn Dataset,
    idx: &[usize],
    size: usize,
    bs: usize,
    num_workers: usize,
    feats_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    device: Device,
    what: &str,
) -> Result<(Tensor, Tensor)> {
    let bar = crate::util::progress_bar(idx.len().div_ceil(bs) as u64, what);
    let mut f = Vec::new();
    let mut l = Vec::new();
    for chunk in idx.chunks(bs) {
        let (x, y) = view_batch(ds, chunk, size, num_workers, &|img: &Rgb8, _| {
            eval_view(img, size)
        })?;
        f.push(feats_of(&x)?.to_device(Device::Cpu));
        l.push(y);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((
        Tensor::cat(&f, 0).to_device(device),
        Tensor::cat(&l, 0).to_device(device),
    ))
}

/// Runs the linear evaluation of `backbone` on `train`/`val`.
pub fn run<'a>(
    a: &LinearConfig,
    backbone: impl Into<BackboneRef<'a>>,
    train: &dyn Dataset,
    val: &dyn Dataset,
    device: Device,
) -> Result<LinearResult> {
    let spec = FeatureSpec {
        n_last_blocks: a.n_last_blocks,
        avgpool: a.avgpool_patchtokens,
    };
    let backbone = backbone.into();
    spec.validate_for(backbone)?;
    ensure!(
        a.epochs > 0 && a.batch_size_per_gpu > 0 && a.val_freq > 0,
        "--epochs, --batch_size_per_gpu and --val_freq must be positive"
    );
    let ProbeData {
        train_idx,
        val_idx,
        num_labels,
        size,
    } = ProbeData::new(train, val, a.subset, a.num_labels, a.crop_size, backbone)?;
    let dim = spec.dim_for(backbone);
    let feats_of = |x: &Tensor| spec.features_of(backbone, &x.to_device(device));

    crate::util::create_output_dir(&a.output_dir)?;
    let ckpt_path = a.output_dir.join(format!(
        "checkpoint_{}_linear.safetensors",
        a.checkpoint_key
    ));
    tch::manual_seed(a.seed as i64);
    let mut probe = LinearProbe::new(dim, num_labels, device);
    let (mut start, mut best) = (0, 0.0f64);
    let resume = crate::util::resume_path(&a.output_dir, a.load_from.as_deref(), &ckpt_path)?;
    if let Some(p) = resume {
        let (e, b) = load_probe(&p, &mut probe, dim, num_labels)?;
        eprintln!(
            "resuming the linear probe from {} at epoch {e} (best so far {b:.2}%)",
            p.display()
        );
        (start, best) = (e, b);
    }

    // Validation features never change (frozen backbone, fixed views): compute them once.
    let bs = a.batch_size_per_gpu;
    let eval_feats = |ds: &dyn Dataset, idx: &[usize], what: &str| {
        probe_features(ds, idx, size, bs, a.num_workers, &feats_of, device, what)
    };
    let (val_f, val_l) = eval_feats(val, &val_idx, "validation features")?;
    let cached_train = if a.precompute_features {
        Some(eval_feats(train, &train_idx, "training features")?)
    } else {
        None
    };

    let base_lr = a.lr * bs as f64 / 256.0;
    let log_path = a.output_dir.join("log.txt");
    let (mut last1, mut last5) = (0.0, None);
    for epoch in start..a.epochs {
        let lr = cosine_annealing_lr(base_lr, epoch, a.epochs);
        let order = epoch_order(&train_idx, a.seed, epoch);
        let bar =
            crate::util::progress_bar(order.len().div_ceil(bs) as u64, &format!("epoch {epoch}"));
        let (mut loss_sum, mut steps) = (0.0, 0usize);
        for (b, chunk) in order.chunks(bs).enumerate() {
            let (feats, y) = match &cached_train {
                Some((f, l)) => {
                    let pos: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
                    let pos = Tensor::from_slice(&pos).to_device(device);
                    (f.index_select(0, &pos), l.index_select(0, &pos))
                }
                None => {
                    let seed = a.seed;
                    let view =
                        move |img: &Rgb8, i: usize| training_view_of(img, i, size, seed, epoch);
                    let (x, y) = view_batch(train, chunk, size, a.num_workers, &view)?;
                    (feats_of(&x)?, y.to_device(device))
                }
            };
            let loss = probe
                .train_step(&feats, &y, lr)
                .with_context(|| format!("epoch {epoch}, batch {b}"))?;
            loss_sum += loss;
            steps += 1;
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let mut log = serde_json::json!({ "train_loss": loss_sum / steps.max(1) as f64, "train_lr": lr, "epoch": epoch });
        if epoch % a.val_freq == 0 || epoch + 1 == a.epochs {
            let (acc1, acc5, vloss) = evaluate(&probe, &val_f, &val_l, num_labels);
            (last1, last5) = (acc1, acc5);
            log["test_loss"] = vloss.into();
            log["test_acc1"] = acc1.into();
            if let Some(a5) = acc5 {
                log["test_acc5"] = a5.into();
            }
            if acc1 >= best {
                save_probe(
                    &a.output_dir
                        .join(format!("best_{}_linear.safetensors", a.checkpoint_key)),
                    &probe,
                    epoch + 1,
                    acc1,
                    a,
                )?;
            }
            best = best.max(acc1);
            eprintln!(
                "epoch {epoch}: train loss {:.4}, lr {lr:.3e}, val acc@1 {acc1:.2}%{} (best {best:.2}%)",
                loss_sum / steps.max(1) as f64,
                acc5.map(|v| format!(", acc@5 {v:.2}%")).unwrap_or_default()
            );
        }
        append_line(&log_path, &log.to_string())?;
        save_probe(&ckpt_path, &probe, epoch + 1, best, a)?;
    }
    let res = LinearResult {
        best_acc1: best,
        last_acc1: last1,
        last_acc5: last5,
        epochs: a.epochs,
        feature_dim: dim,
        num_labels,
    };
    let out = a
        .output_dir
        .join(format!("results_linear_{}.json", a.checkpoint_key));
    crate::util::atomic_write(&out, serde_json::to_string_pretty(&res)?.as_bytes())?;
    Ok(res)
}

/// Appends one line to a log file.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))
}

fn save_probe(
    path: &Path,
    probe: &LinearProbe,
    next_epoch: usize,
    best: f64,
    a: &LinearConfig,
) -> Result<()> {
    let meta = LinearCkptMeta {
        format: CKPT_FORMAT.into(),
        epoch: next_epoch,
        best_acc: best,
        args: a.clone(),
    };
    let mut md = std::collections::HashMap::new();
    md.insert("ibot_linear".to_string(), serde_json::to_string(&meta)?);
    write_safetensors(path, &probe.state(), Some(md))
}

fn load_probe(
    path: &Path,
    probe: &mut LinearProbe,
    dim: i64,
    num_labels: i64,
) -> Result<(usize, f64)> {
    let md = crate::params::read_safetensors_metadata(path)?;
    let raw = md
        .get("ibot_linear")
        .with_context(|| format!("{} is not a linear-probe checkpoint", path.display()))?;
    let meta: LinearCkptMeta = serde_json::from_str(raw)
        .with_context(|| format!("{}: damaged metadata", path.display()))?;
    ensure!(
        meta.format == CKPT_FORMAT,
        "{}: unsupported format {}",
        path.display(),
        meta.format
    );
    let t = read_safetensors(path)?;
    let get = |k: &str| {
        t.get(k)
            .map(|v| v.shallow_clone())
            .with_context(|| format!("{} has no '{k}'", path.display()))
    };
    let (w, b) = (get("linear.weight")?, get("linear.bias")?);
    ensure!(
        w.size() == [num_labels, dim] && b.size() == [num_labels],
        "{}: the classifier is {:?}, this run needs [{num_labels}, {dim}] (other backbone or feature options?)",
        path.display(),
        w.size()
    );
    let dev = probe.weight.device();
    *probe = LinearProbe::from_weights(w.to_device(dev), b.to_device(dev));
    if let (Ok(bw), Ok(bb)) = (get("momentum.weight"), get("momentum.bias")) {
        probe.load_momentum(bw, bb)?;
    }
    Ok((meta.epoch, meta.best_acc))
}

/// `ibot eval-linear`: opens the weights and the two splits, then [`run`]s the probe and prints
/// the official closing line.
pub fn run_command(cfg: &LinearConfig) -> Result<LinearResult> {
    let mut a = cfg.clone();
    let device = a.device.select()?;
    let p = crate::interop::load_pretrained_with(
        &a.pretrained_weights,
        a.checkpoint_key.as_str(),
        a.arch.map(Arch::as_str),
        a.num_heads,
    )?;
    eprintln!("weights: {}", p.description);
    let (_, vit) = p.backbone_model(device)?;
    let size = super::resolve_crop(
        a.crop_size,
        p.config.img_size() as usize,
        p.config.patch_size() as usize,
    )?;
    let (trp, trs, tep, tes) = super::split::eval_splits(
        a.data_path.as_deref(),
        a.train_path.as_deref(),
        a.val_path.as_deref(),
    )?;
    let train_ds = crate::data::dataset::open(&trp, trs)?;
    let val_ds = crate::data::dataset::open(&tep, tes)?;
    super::warn_upsampling(train_ds.as_ref(), size, a.crop_size.is_some());
    a.crop_size = Some(size);
    eprintln!(
        "data: {} training ({}), {} validation images",
        train_ds.len(),
        train_ds.describe(),
        val_ds.len()
    );
    let r = run(&a, &vit, train_ds.as_ref(), val_ds.as_ref(), device)?;
    println!("Training of the linear classifier on frozen features completed. Top-1 test accuracy: {:.1}", r.best_acc1);
    Ok(r)
}
