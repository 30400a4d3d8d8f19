//! Benchmarks (not tests): a full iBOT training step, alone or fed by the data loader, and
//! the data pipeline alone.

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::dist::Comm;
use crate::train::Ibot;

/// What `ibot bench train` measures (its options: [`crate::cli::bench::StepBench`]): the model
/// and loss `ibot train` would build from `train`, fed by random tensors or, with `data_path`,
/// by the data loader.
#[derive(Debug, Clone)]
pub struct StepBenchConfig {
    pub train: crate::config::TrainConfig,
    /// The image folder to load batches from; None: random views and masks.
    pub data_path: Option<std::path::PathBuf>,
    /// Timed steps (after the warm-up steps).
    pub iters: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Run the student's head on every token as the official code does.
    pub full_head: bool,
}

impl StepBenchConfig {
    /// The training configuration benchmarked.
    pub fn bench_config(&self) -> crate::config::TrainConfig {
        self.train.clone()
    }

    /// The image folder to load batches from, if one was given.
    pub fn data_path(&self) -> Option<&std::path::Path> {
        self.data_path.as_deref()
    }
}

#[derive(Debug, Clone)]
pub struct StepTiming {
    pub ms_per_iter: f64,
    /// CPU time of the whole process per timed step (every thread; on a shared machine this
    /// moves less than the wall time, which counts the waits for a core).
    pub cpu_ms_per_iter: f64,
    pub images_per_s: f64,
    /// The arithmetic the step ran in.
    pub precision: crate::train::amp::Precision,
    /// Milliseconds per timed step in each phase (waiting for the loader's batch first, when
    /// there is a loader); what the phases do not cover is reported as "other".
    pub phases: Vec<(&'static str, f64)>,
}

impl StepTiming {
    /// The lines `ibot bench train` prints: the configuration and the time per step (wall and
    /// CPU), then the phases.
    pub fn report(&self, b: &StepBenchConfig, world_size: usize) -> String {
        let a = b.bench_config();
        let feed = match b.data_path() {
            Some(p) => format!(
                "loader on {} with {} worker(s)",
                p.display(),
                a.data.num_workers
            ),
            None => "random tensors".to_string(),
        };
        let mut out = format!(
            "ibot (tch, {world_size} rank(s) x {} libtorch thread(s), {}, {feed}, matrix products: {}): {}/{} batch {} {}x{} + {}x{}: {:.1} ms/iter (CPU {:.1} ms/iter), {:.2} img/s\n",
            tch::get_num_threads(),
            self.precision.name(),
            crate::models::layers::CpuGemm::current().name(),
            a.model.arch.as_str(),
            a.resolved_patch_size(),
            a.optim.batch_size_per_gpu,
            a.data.global_crops_number,
            a.data.global_crops_size,
            a.data.local_crops_number,
            a.data.local_crops_size,
            self.ms_per_iter,
            self.cpu_ms_per_iter,
            self.images_per_s
        );
        out.push_str("where the time goes (ms per step):\n");
        for (name, ms) in &self.phases {
            out.push_str(&format!(
                "  {name:<46} {ms:9.1}  {:5.1}%\n",
                100.0 * ms / self.ms_per_iter.max(1e-9)
            ));
        }
        out
    }
}

/// CPU seconds used by this process so far (all threads).
pub fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The same step as `bench/torch_step.py`: teacher on the global views, student on the masked
/// global views and the local views, loss, backward, clipping, the optimizer, EMA, for the model
/// and loss `ibot train` would build from `b.train`. Without `--data_path`, data loading is
/// excluded (views are random tensors made before the clock starts for each step); with it,
/// each timed step includes getting its batch from the loader.
pub fn step(b: &StepBenchConfig, device: Device, comm: &dyn Comm) -> Result<StepTiming> {
    anyhow::ensure!(b.iters > 0, "--iters must be at least 1 (the timed steps)");
    let a = b.bench_config();
    tch::manual_seed(a.run.seed as i64);
    let cfg = crate::train::run::ibot_config(&a)?;
    let cell = a.mask_patch_size();
    let (g, l) = (
        a.data.global_crops_size as i64,
        a.data.local_crops_size as i64,
    );
    anyhow::ensure!(
        g % cell == 0,
        "--global_crops_size {g} is not a multiple of the {cell}-px mask cell"
    );
    let grid = g / cell;
    let batch = a.optim.batch_size_per_gpu as i64;
    let (ngc, nlc) = (a.data.global_crops_number, a.data.local_crops_number);
    let mut ibot = Ibot::new(cfg, device)?;
    ibot.full_head = b.full_head;
    let (precision, reason) = crate::train::amp::decide_for_run(
        a.optim.use_fp16,
        a.optim.precision,
        device,
        None,
        &crate::dist::SingleProcess,
    )?;
    eprintln!("precision: {} ({reason})", precision.name());
    ibot.precision = precision;
    let opts = (Kind::Float, device);
    let mut batches = match b.data_path() {
        Some(path) => Some(BatchStream::new(path, b)?),
        None => None,
    };
    let (mut total, mut cpu) = (0.0, 0.0);
    let mut data_wait = 0.0;
    for it in 0..b.warmup + b.iters {
        let (views, masks, t0, c0) = match batches.as_mut() {
            None => {
                let mut views: Vec<Tensor> = (0..ngc)
                    .map(|_| Tensor::randn([batch, 3, g, g], opts))
                    .collect();
                views.extend((0..nlc).map(|_| Tensor::randn([batch, 3, l, l], opts)));
                let masks: Vec<Tensor> = (0..ngc)
                    .map(|_| Tensor::rand([batch, grid, grid], opts).lt(0.3))
                    .collect();
                (views, masks, Instant::now(), process_cpu_seconds())
            }
            Some(stream) => {
                let (t0, c0) = (Instant::now(), process_cpu_seconds());
                let (views, masks) = stream.next(device, ngc)?;
                if it >= b.warmup {
                    data_wait += t0.elapsed().as_secs_f64();
                }
                (views, masks, t0, c0)
            }
        };
        // Phases are timed over the timed steps only.
        if it == b.warmup {
            ibot.phases = Some(crate::train::PhaseTimes::default());
        }
        let _ = ibot.train_step(&views, &masks, 0, 5e-4, 0.04, 0.996, comm)?;
        if it >= b.warmup {
            total += t0.elapsed().as_secs_f64();
            cpu += process_cpu_seconds() - c0;
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
        cpu_ms_per_iter: cpu / n * 1e3,
        images_per_s: (batch as usize * comm.world_size()) as f64 / dt,
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
    fn new(path: &std::path::Path, b: &StepBenchConfig) -> Result<Self> {
        let cfg = crate::train::run::loader_config(&b.bench_config())?;
        let loader = loader_for(path, cfg.augment, cfg.mask, cfg.batch_size, cfg.num_workers)?;
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

    /// Views on `device` and the masks of the `globals` global views.
    fn next(&mut self, device: Device, globals: usize) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
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
        let masks = batch.masks[..globals]
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
    anyhow::ensure!(
        iters > 0,
        "--iters must be at least 1 (the timed repetitions)"
    );
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
