//! Benchmarks (not tests): a full iBOT training step, alone or fed by the data loader, and
//! the data pipeline alone.

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::dist::Comm;
use crate::loss::IbotLossConfig;
use crate::models::{BackboneConfig, HeadConfig, SwinConfig, VitConfig};
use crate::train::optim::OptimizerKind;
use crate::train::{Ibot, IbotConfig};

/// What `ibot bench train` measures (its command-line options).
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct StepBench {
    /// vit_tiny/small/base/large or swin_tiny/small/base/large.
    #[arg(long, default_value = "vit_small")]
    pub arch: String,
    /// Patch side (default 16; 4 for Swin, whose masks then have 8x8-patch cells as in
    /// `ibot train`).
    #[arg(long)]
    pub patch_size: Option<i64>,
    /// Swin window size (7 or 14 in the paper); ignored for a ViT.
    #[arg(long, default_value_t = 7)]
    pub window_size: i64,
    /// Images per step (each gives 2 global + local_crops_number local views).
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 224)]
    pub global_crops_size: i64,
    #[arg(long, default_value_t = 96)]
    pub local_crops_size: i64,
    #[arg(long, default_value_t = 2)]
    pub local_crops_number: usize,
    #[arg(long, default_value_t = 8192)]
    pub out_dim: i64,
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Take the batches from the data loader over this image folder (e.g.
    /// ../shared/bench/photos); each timed step then includes waiting for its batch.
    #[arg(long)]
    pub data_path: Option<std::path::PathBuf>,
    /// Loader worker threads (with --data_path).
    #[arg(long, default_value_t = 1)]
    pub num_workers: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Mixed precision as in `ibot train --use_fp16` (bfloat16 autocast on CPUs with native
    /// bfloat16, float16 with loss scaling on CUDA). Compare with `torch_step.py --autocast bf16`.
    #[arg(long, default_value = "false", value_parser = crate::train::args::parse_bool, action = clap::ArgAction::Set)]
    pub use_fp16: bool,
    /// Force the arithmetic as `ibot train --precision` (auto follows --use_fp16).
    #[arg(long, value_enum, default_value_t = crate::train::amp::PrecisionChoice::Auto)]
    pub precision: crate::train::amp::PrecisionChoice,
    /// Run the student's head on every token as the official code does (false: only on the
    /// masked tokens and the local views' [CLS], which is what `ibot train` does).
    #[arg(long, default_value = "false", value_parser = crate::train::args::parse_bool, action = clap::ArgAction::Set)]
    pub full_head: bool,
    /// Under torchrun / srun / `ibot launch`, every rank runs the step on its own batch and the
    /// gradients are averaged as in training (img/s then counts every rank's images).
    #[command(flatten)]
    pub dist: crate::train::args::DistArgs,
}

impl StepBench {
    pub fn is_swin(&self) -> bool {
        self.arch.starts_with("swin")
    }

    /// `--patch_size` or its default (16 for ViT, 4 for Swin).
    pub fn patch(&self) -> i64 {
        self.patch_size
            .unwrap_or(if self.is_swin() { 4 } else { 16 })
    }

    /// Side of a mask cell in pixels (the patch for ViT, 8 patches for Swin, as `ibot train`).
    pub fn mask_cell(&self) -> i64 {
        if self.is_swin() {
            self.patch() * 8
        } else {
            self.patch()
        }
    }

    /// The student backbone benchmarked (masked image modeling on, `--drop_path`).
    pub fn backbone(&self) -> Result<BackboneConfig> {
        let c: BackboneConfig = if self.is_swin() {
            let mut c = SwinConfig::from_arch(&self.arch, self.window_size)?;
            c.drop_path_rate = self.drop_path;
            c.masked_im_modeling = true;
            c.into()
        } else {
            let mut c = VitConfig::from_arch(&self.arch, self.patch())?;
            c.drop_path_rate = self.drop_path;
            c.masked_im_modeling = true;
            c.into()
        };
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug, Clone)]
pub struct StepTiming {
    pub ms_per_iter: f64,
    pub images_per_s: f64,
    /// The arithmetic the step ran in.
    pub precision: crate::train::amp::Precision,
    /// Milliseconds per timed step in each phase (waiting for the loader's batch first, when
    /// there is a loader); what the phases do not cover is reported as "other".
    pub phases: Vec<(&'static str, f64)>,
}

/// The same step as `bench/torch_step.py`: teacher on 2 global views, student on the masked
/// global views and the local views, loss, backward, clipping, AdamW, EMA. Without
/// `b.data_path`, data loading is excluded (views are random tensors made before the clock starts
/// for each step); with it, each timed step includes getting its batch from the loader.
pub fn step(b: &StepBench, device: Device, comm: &dyn Comm) -> Result<StepTiming> {
    tch::manual_seed(0);
    let backbone = b.backbone()?;
    let head = HeadConfig::new(backbone.embed_dim(), b.out_dim, b.out_dim, true, false);
    let loss = IbotLossConfig {
        out_dim: b.out_dim,
        patch_out_dim: b.out_dim,
        ngcrops: 2,
        nlcrops: b.local_crops_number,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.04,
        warmup_teacher_temp2: 0.04,
        teacher_temp2: 0.07,
        warmup_teacher_temp_epochs: 1,
        nepochs: 1,
        student_temp: 0.1,
        center_momentum: 0.9,
        center_momentum2: 0.9,
        lambda1: 1.0,
        lambda2: 1.0,
        mim_start_epoch: 0,
    };
    let cfg = IbotConfig {
        backbone,
        head,
        shared_head_teacher: true,
        loss,
        clip_grad: 3.0,
        freeze_last_layer: 0,
        optimizer: OptimizerKind::Adamw,
    };
    let cell = b.mask_cell();
    anyhow::ensure!(
        !b.is_swin() || b.global_crops_size % cell == 0,
        "--global_crops_size {} is not a multiple of the {cell}-px mask cell of a Swin",
        b.global_crops_size
    );
    let grid = b.global_crops_size / cell;
    let mut ibot = Ibot::new(cfg, device)?;
    ibot.full_head = b.full_head;
    ibot.precision = crate::train::amp::Precision::resolve(b.use_fp16, b.precision, device)?;
    let opts = (Kind::Float, device);
    let mut batches = match &b.data_path {
        Some(path) => Some(BatchStream::new(path, b.num_workers, b)?),
        None => None,
    };
    let mut total = 0.0;
    let mut data_wait = 0.0;
    for it in 0..b.warmup + b.iters {
        let (views, masks, t0) = match batches.as_mut() {
            None => {
                let mut views: Vec<Tensor> = (0..2)
                    .map(|_| {
                        Tensor::randn([b.batch, 3, b.global_crops_size, b.global_crops_size], opts)
                    })
                    .collect();
                views.extend((0..b.local_crops_number).map(|_| {
                    Tensor::randn([b.batch, 3, b.local_crops_size, b.local_crops_size], opts)
                }));
                let masks: Vec<Tensor> = (0..2)
                    .map(|_| Tensor::rand([b.batch, grid, grid], opts).lt(0.3))
                    .collect();
                (views, masks, Instant::now())
            }
            Some(stream) => {
                let t0 = Instant::now();
                let (views, masks) = stream.next(device)?;
                if it >= b.warmup {
                    data_wait += t0.elapsed().as_secs_f64();
                }
                (views, masks, t0)
            }
        };
        // Phases are timed over the timed steps only.
        if it == b.warmup {
            ibot.phases = Some(crate::train::PhaseTimes::default());
        }
        let _ = ibot.train_step(&views, &masks, 0, 5e-4, 0.04, 0.996, comm)?;
        if it >= b.warmup {
            total += t0.elapsed().as_secs_f64();
        }
    }
    let n = b.iters.max(1) as f64;
    let dt = total / n;
    let mut phases = Vec::new();
    if batches.is_some() {
        phases.push(("waiting for the loader", data_wait / n * 1e3));
    }
    for (name, secs) in ibot.phases.take().unwrap_or_default().entries {
        phases.push((name, secs / n * 1e3));
    }
    let covered: f64 = phases.iter().map(|p| p.1).sum();
    phases.push(("other", (dt * 1e3 - covered).max(0.0)));
    Ok(StepTiming {
        ms_per_iter: dt * 1e3,
        images_per_s: (b.batch as usize * comm.world_size()) as f64 / dt,
        precision: ibot.precision,
        phases,
    })
}

/// Loader batches for the training benchmark, epoch after epoch.
struct BatchStream {
    loader: crate::data::loader::Loader,
    epoch: usize,
    iter: crate::data::loader::EpochIter,
}

impl BatchStream {
    fn new(path: &std::path::Path, num_workers: usize, b: &StepBench) -> Result<Self> {
        use crate::data::{augment::AugmentConfig, masking::MaskConfig};
        let augment = AugmentConfig {
            global_crops_size: b.global_crops_size as usize,
            local_crops_size: b.local_crops_size as usize,
            local_crops_number: b.local_crops_number,
            ..AugmentConfig::default()
        };
        let mask = MaskConfig {
            patch_size: b.mask_cell() as usize,
            ..MaskConfig::default()
        };
        let loader = loader_for(path, augment, mask, b.batch as usize, num_workers)?;
        anyhow::ensure!(
            !loader.is_empty(),
            "{} has fewer images than one batch",
            path.display()
        );
        let iter = loader.epoch(0);
        Ok(Self {
            loader,
            epoch: 0,
            iter,
        })
    }

    /// Views on `device` and the masks of the global views.
    fn next(&mut self, device: Device) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let batch = match self.iter.next() {
            Some(b) => b?,
            None => {
                self.epoch += 1;
                self.iter = self.loader.epoch(self.epoch);
                self.iter
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("the loader gave an empty epoch"))??
            }
        };
        let views = batch.views.iter().map(|v| v.to_device(device)).collect();
        let masks = batch.masks[..2]
            .iter()
            .map(|m| m.to_device(device))
            .collect();
        Ok((views, masks))
    }
}

fn loader_for(
    path: &std::path::Path,
    augment: crate::data::augment::AugmentConfig,
    mask: crate::data::masking::MaskConfig,
    batch_size: usize,
    num_workers: usize,
) -> Result<crate::data::loader::Loader> {
    use crate::data::{
        dataset,
        loader::{Loader, LoaderConfig},
    };
    let ds: std::sync::Arc<dyn dataset::Dataset> =
        std::sync::Arc::from(dataset::open(path, "train")?);
    let cfg = LoaderConfig {
        augment,
        mask,
        batch_size,
        num_workers,
        prefetch: 2,
        seed: 0,
        rank: 0,
        world_size: 1,
        drop_last: true,
        skip_corrupt: false,
    };
    Loader::new(ds, cfg)
}

/// Images per second of the full multi-crop pipeline (decode, 2 global + `local_crops_number`
/// local crops with every augmentation, masks, view-major batches) over a data set.
pub fn data(
    path: &std::path::Path,
    num_workers: usize,
    local_crops_number: usize,
    batch_size: usize,
    epochs: usize,
) -> Result<(usize, f64)> {
    use crate::data::{augment::AugmentConfig, masking::MaskConfig};
    let augment = AugmentConfig {
        local_crops_number,
        ..AugmentConfig::default()
    };
    let loader = loader_for(
        path,
        augment,
        MaskConfig::default(),
        batch_size,
        num_workers,
    )?;
    let t0 = Instant::now();
    let mut n = 0;
    for e in 0..epochs {
        for b in loader.epoch(e) {
            n += b?.indices.len();
        }
    }
    Ok((n, t0.elapsed().as_secs_f64()))
}

/// Milliseconds per in-place sum all-reduce of a flat float32 tensor of `numel` elements
/// (a ViT-S gradient is about 22M), the median over `iters` timed calls after `warmup`.
/// Compare with `bench/torch_allreduce.py` under torchrun: the same Gloo underneath.
pub fn allreduce(comm: &dyn Comm, numel: i64, iters: usize, warmup: usize) -> Result<f64> {
    anyhow::ensure!(numel > 0, "--numel must be positive");
    let mut t = Tensor::f_ones([numel], (Kind::Float, comm.device()))?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        comm.barrier()?;
        let t0 = Instant::now();
        comm.all_reduce_sum(&mut t)?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
}
