//! `ibot train`: the official `train_ibot` / `train_one_epoch` loop with checkpoints, exact
//! resume, `log.txt` and progress reporting.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use super::amp::{Precision, PrecisionChoice};
use super::{checkpoint, Ibot, IbotConfig, IbotLossConfig, NonFiniteLoss, StepStats};
use crate::config::TrainConfig;
use crate::data::augment::AugmentConfig;
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::masking::MaskConfig;
use crate::dist::Comm;
use crate::eval::cluster;
use crate::models::{BackboneConfig, HeadConfig, SwinConfig, VitConfig};
use crate::schedule::cosine_scheduler;

/// Device selection lives in [`crate::device`] and the subset wrapper in
/// [`crate::data::dataset`]; re-exported for code written against these paths.

/// The model/loss configuration the arguments describe.
pub fn ibot_config(a: &TrainConfig) -> Result<IbotConfig> {
    let backbone: BackboneConfig = if a.is_swin() {
        ensure!(
            a.model.depth.is_none() && a.model.num_heads.is_none(),
            "--depth and --num_heads describe a ViT; for Swin use --depths and --stage_heads (one value per stage)"
        );
        let mut c = SwinConfig::from_arch(a.model.arch.as_str(), a.model.window_size)?;
        c.img_size = a.model.img_size;
        if let Some(d) = a.model.embed_dim {
            c.embed_dim = d;
        }
        if let Some(d) = &a.model.depths {
            c.depths = d.clone();
        }
        if let Some(h) = &a.model.stage_heads {
            c.num_heads = h.clone();
        }
        c.masked_im_modeling = a.loss.use_masked_im_modeling;
        c.into()
    } else {
        ensure!(
            a.model.depths.is_none() && a.model.stage_heads.is_none(),
            "--depths and --stage_heads describe a Swin; for a ViT use --depth and --num_heads"
        );
        let mut c = VitConfig::from_arch(a.model.arch.as_str(), a.resolved_patch_size())?;
        c.img_size = a.model.img_size;
        if let Some(d) = a.model.embed_dim {
            c.embed_dim = d;
        }
        if let Some(d) = a.model.depth {
            c.depth = d;
        }
        if let Some(h) = a.model.num_heads {
            c.num_heads = h;
        }
        c.drop_path_rate = a.model.drop_path;
        c.masked_im_modeling = a.loss.use_masked_im_modeling;
        c.into()
    };
    backbone.validate()?;
    let head = HeadConfig {
        hidden_dim: a.head.head_hidden_dim,
        bottleneck_dim: a.head.head_bottleneck_dim,
        norm: a.head.norm_in_head,
        act: a.head.act_in_head,
        ..HeadConfig::new(
            backbone.embed_dim(),
            a.head.out_dim,
            a.head.patch_out_dim,
            a.head.norm_last_layer,
            a.head.shared_head,
        )
    };
    let same_dim = a.head.shared_head || a.head.shared_head_teacher;
    if !a.head.shared_head && a.head.shared_head_teacher && a.head.patch_out_dim != a.head.out_dim {
        bail!("--shared_head false with --shared_head_teacher true needs --patch_out_dim equal to --out_dim (the teacher's patch outputs have out_dim)");
    }
    let loss = IbotLossConfig {
        out_dim: a.head.out_dim,
        patch_out_dim: if same_dim {
            a.head.out_dim
        } else {
            a.head.patch_out_dim
        },
        ngcrops: a.data.global_crops_number,
        nlcrops: a.data.local_crops_number,
        warmup_teacher_temp: a.loss.warmup_teacher_temp,
        teacher_temp: a.loss.teacher_temp,
        warmup_teacher_temp2: a.loss.warmup_teacher_patch_temp,
        teacher_temp2: a.loss.teacher_patch_temp,
        warmup_teacher_temp_epochs: a.loss.warmup_teacher_temp_epochs,
        nepochs: a.schedule.epochs,
        student_temp: 0.1,
        center_momentum: 0.9,
        center_momentum2: 0.9,
        lambda1: a.loss.lambda1,
        lambda2: a.loss.lambda2,
        mim_start_epoch: a.loss.pred_start_epoch,
    };
    Ok(IbotConfig {
        backbone,
        head,
        shared_head_teacher: a.head.shared_head_teacher,
        loss,
        clip_grad: a.optim.clip_grad,
        freeze_last_layer: a.optim.freeze_last_layer,
        optimizer: a.optim.optimizer,
    })
}

/// The data-loading configuration the arguments describe.
pub fn loader_config(a: &TrainConfig) -> Result<LoaderConfig> {
    let pair = |v: &[f64], name: &str| -> Result<(f64, f64)> {
        ensure!(v.len() == 2, "--{name} takes two numbers");
        Ok((v[0], v[1]))
    };
    let augment = AugmentConfig {
        global_crops_number: a.data.global_crops_number,
        local_crops_number: a.data.local_crops_number,
        global_crops_size: a.data.global_crops_size,
        local_crops_size: a.data.local_crops_size,
        global_crops_scale: pair(&a.data.global_crops_scale, "global_crops_scale")?,
        local_crops_scale: pair(&a.data.local_crops_scale, "local_crops_scale")?,
        ..AugmentConfig::default()
    };
    let mask = MaskConfig {
        patch_size: a.mask_patch_size() as usize,
        pred_ratio: a.loss.pred_ratio.clone(),
        pred_ratio_var: a.loss.pred_ratio_var.clone(),
        pred_shape: a.loss.pred_shape,
        pred_aspect_ratio: (0.3, 1.0 / 0.3),
        pred_start_epoch: a.loss.pred_start_epoch,
    };
    Ok(LoaderConfig {
        augment,
        mask,
        batch_size: a.optim.batch_size_per_gpu,
        num_workers: a.data.num_workers,
        prefetch: 2,
        seed: a.run.seed,
        rank: 0,
        world_size: 1,
        drop_last: true,
        skip_corrupt: a.data.skip_corrupt,
    })
}

/// Per-epoch averages, as the official log (`train_` + key).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EpochStats {
    pub loss: f64,
    pub cls: f64,
    pub patch: f64,
    pub lr: f64,
    pub wd: f64,
    pub acc: f64,
    pub nmi: f64,
    pub ari: f64,
    pub fscore: f64,
    pub adjacc: f64,
}

/// What a finished `train` call reports.
pub struct TrainOutcome {
    pub ibot: Ibot,
    pub epochs_done: usize,
    pub last: Option<EpochStats>,
    /// This process's rank (0 without data parallelism).
    pub rank: usize,
    /// The epoch the run started (or resumed) at.
    pub start_epoch: usize,
}

fn progress(n: u64, epoch: usize, epochs: usize) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(format!("{epoch}/{epochs}"));
    Some(pb)
}

/// The options every rank must share (the model, data and optimisation ones; paths, workers and
/// the device may differ between nodes), compared by [`crate::dist::check_same_options`].
fn shared_options(args: &TrainConfig) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(args)?;
    if let Some(m) = v.as_object_mut() {
        for k in [
            "output_dir",
            "data_path",
            "num_workers",
            "device",
            "load_from",
            "stop_after",
        ] {
            m.remove(k);
        }
    }
    Ok(v)
}

/// Runs (or resumes) training as the arguments say: one process, or one rank of a data-parallel
/// run when launched by torchrun, SLURM or `ibot launch`.
pub fn train(args: &TrainConfig) -> Result<TrainOutcome> {
    args.validate()?;
    let (comm, device, _env) = crate::dist::join_world(&args.dist, args.run.device)?;
    train_with(args, comm.as_ref(), device)
}

/// `ibot train`: [`train`] with Ctrl-C / SIGTERM handling, then one line on what was done
/// (rank 0).
pub fn train_and_report(cfg: &TrainConfig) -> Result<()> {
    super::interrupt::install()?;
    let out = train(cfg)?;
    if out.rank == 0 {
        let ckpt = cfg.run.output_dir.join("checkpoint.safetensors");
        if out.epochs_done == 0 {
            eprintln!(
                "no epoch was trained (the run was already at epoch {} of --epochs {}); {}",
                out.start_epoch,
                cfg.schedule.epochs,
                if ckpt.is_file() {
                    format!("{} is unchanged", ckpt.display())
                } else {
                    "no checkpoint was written".to_string()
                }
            );
        } else {
            eprintln!(
                "{} epoch(s) trained; checkpoint in {}",
                out.epochs_done,
                ckpt.display()
            );
        }
    }
    Ok(())
}

/// Where the batches of each epoch come from: the data loader, or the fixed batches of a
/// trajectory fixture (`ibot verify-fixture`), which then runs this very loop.
pub trait BatchSource {
    /// Batches per epoch (the schedules' `niter_per_ep`).
    fn iters_per_epoch(&self) -> usize;
    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_>;
}

impl BatchSource for Loader {
    fn iters_per_epoch(&self) -> usize {
        self.len()
    }
    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        Box::new(self.epoch(epoch))
    }
}

/// Sees the run as it goes (verification compares every step with the official loop's).
pub trait Observer {
    /// After the step of global iteration `it` (epoch × iters_per_epoch + iteration).
    fn step(&mut self, _it: usize, _stats: &StepStats, _ibot: &Ibot) -> Result<()> {
        Ok(())
    }
    /// After the epoch's statistics, before its checkpoint.
    fn epoch_end(&mut self, _epoch: usize, _stats: &EpochStats, _ibot: &Ibot) -> Result<()> {
        Ok(())
    }
}

/// Observes nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// [`train`] inside an existing world.
pub fn train_with(args: &TrainConfig, comm: &dyn Comm, device: Device) -> Result<TrainOutcome> {
    let main = comm.is_main();
    let mut lcfg = loader_config(args)?;
    lcfg.rank = comm.rank();
    lcfg.world_size = comm.world_size();
    crate::dist::check_same_options(comm, &shared_options(args)?, "training options")?;
    crate::util::create_output_dir(&args.run.output_dir)?;
    // One run per output directory: rank 0 holds an exclusive lock until it returns.
    let _lock = if main {
        Some(crate::util::lock_dir(&args.run.output_dir)?)
    } else {
        None
    };
    let ds = crate::data::dataset::open_subset(
        &args.data.data_path,
        "train",
        args.data.subset,
        args.run.seed,
    )?;
    if main {
        eprintln!("data: {}", ds.describe());
    }
    let loader = Loader::new(ds.clone(), lcfg)?;
    ensure!(
        !loader.is_empty(),
        "{} images give no full batch of {} per process over {} process(es) (drop_last): lower --batch_size_per_gpu",
        ds.len(),
        args.optim.batch_size_per_gpu,
        comm.world_size()
    );
    let ibot = Ibot::seeded(ibot_config(args)?, device, args.run.seed)?;
    train_loop(args, comm, ibot, &loader, &mut NoObserver)
}

/// The official `train_ibot` loop from a built model: precision, schedules (lr scaled by the
/// total batch), resume, then per epoch the steps, the synchronised statistics and rank 0's
/// checkpoint and log line.
pub fn train_loop(
    args: &TrainConfig,
    comm: &dyn Comm,
    mut ibot: Ibot,
    source: &dyn BatchSource,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    let main = comm.is_main();
    let niter = source.iters_per_epoch();
    ensure!(niter > 0, "no batches to train on");
    crate::util::create_output_dir(&args.run.output_dir)?;
    let ckpt_path = args.run.output_dir.join("checkpoint.safetensors");
    set_precision(args, comm, &mut ibot, &ckpt_path)?;
    let schedules = Schedules::new(args, niter, comm.world_size())?;
    let start_epoch = resume(args, comm, &mut ibot, &ckpt_path)?;
    if main {
        let args_json = serde_json::to_string_pretty(args)?;
        crate::util::atomic_write(&args.run.output_dir.join("args.json"), args_json.as_bytes())?;
    }
    let stop_at = args
        .run
        .stop_after
        .map(|n| start_epoch + n)
        .unwrap_or(args.schedule.epochs)
        .min(args.schedule.epochs);
    super::interrupt::set_run(&args.run.output_dir, main);
    let mut run = RunState::new(
        args,
        main,
        (stop_at.saturating_sub(start_epoch) * niter) / 4000,
    );
    let mut last = None;
    let mut done = 0;
    for epoch in start_epoch..stop_at {
        let t0 = Instant::now();
        let sums = train_epoch(
            args, comm, &mut ibot, source, observer, &schedules, &mut run, epoch, &ckpt_path,
        )?;
        let st = epoch_stats(comm, sums, epoch)?;
        observer.epoch_end(epoch, &st.stats, &ibot)?;
        end_epoch(
            args, comm, &ibot, &schedules, &mut run, epoch, &ckpt_path, &st.stats,
        )?;
        if main {
            let s = &st.stats;
            eprintln!(
                "epoch {epoch}: loss {:.4} cls {:.4} patch {:.4} acc {:.3} nmi {:.3} ari {:.3} ({:.0}s{})",
                s.loss,
                s.cls,
                s.patch,
                s.acc,
                s.nmi,
                s.ari,
                t0.elapsed().as_secs_f64(),
                if st.skipped > 0 {
                    format!(", {} unreadable images skipped", st.skipped)
                } else {
                    String::new()
                }
            );
        }
        last = Some(st.stats);
        done += 1;
    }
    Ok(TrainOutcome {
        ibot,
        epochs_done: done,
        last,
        rank: comm.rank(),
        start_epoch,
    })
}

/// The arithmetic of the run (`--use_fp16`, `--precision`) on the model's device, said on
/// stderr with the reason. With `--precision auto`: a run resuming from a checkpoint written
/// with the same `--use_fp16` and `--precision auto` keeps the precision stored there (an exact
/// resume must not change arithmetic because the probe answers differently today); otherwise
/// rank 0 decides ([`amp::auto`], which may probe) and every rank takes its answer.
fn set_precision(
    args: &TrainConfig,
    comm: &dyn Comm,
    ibot: &mut Ibot,
    ckpt_path: &Path,
) -> Result<()> {
    let device = ibot.device;
    let o = &args.optim;
    let stored = stored_precision(args, ckpt_path);
    let (precision, reason) =
        super::amp::decide_for_run(o.use_fp16, o.precision, device, stored, comm)?;
    ibot.precision = precision;
    if comm.is_main() {
        eprintln!("precision: {} ({reason})", precision.name());
    }
    Ok(())
}

/// The precision stored in the checkpoint this run resumes from, when that run chose it with
/// `--use_fp16` and `--precision auto` as this one does. Unreadable checkpoints give `None` here;
/// resuming reports them.
fn stored_precision(args: &TrainConfig, ckpt_path: &Path) -> Option<(Precision, PathBuf)> {
    let path = crate::util::resume_path(
        &args.run.output_dir,
        args.run.load_from.as_deref(),
        ckpt_path,
    )
    .ok()??;
    let meta = checkpoint::read_meta(&path).ok()?;
    let same = args.optim.use_fp16
        && meta.args.optim.use_fp16
        && meta.args.optim.precision == PrecisionChoice::Auto;
    let p = meta.precision?;
    same.then_some((p, path))
}

/// The per-iteration schedules of the whole run.
struct Schedules {
    lr: Vec<f64>,
    wd: Vec<f64>,
    momentum: Vec<f64>,
    niter: usize,
}

impl Schedules {
    fn new(args: &TrainConfig, niter: usize, world_size: usize) -> Result<Self> {
        let s = &args.schedule;
        // lr scaled by the total batch, as the official `args.lr * batch_size_per_gpu * world / 256`.
        let world = world_size as f64;
        let lr = cosine_scheduler(
            s.lr * args.optim.batch_size_per_gpu as f64 * world / 256.0,
            s.min_lr,
            s.epochs,
            niter,
            s.warmup_epochs,
            0.0,
        )?;
        let wd = cosine_scheduler(s.weight_decay, s.weight_decay_end, s.epochs, niter, 0, 0.0)?;
        let momentum = cosine_scheduler(s.momentum_teacher, 1.0, s.epochs, niter, 0, 0.0)?;
        Ok(Self {
            lr,
            wd,
            momentum,
            niter,
        })
    }
}

/// Resume: --load_from (relative to output_dir), else output_dir/checkpoint.safetensors; every
/// rank reads the checkpoint itself, and in a data-parallel run all must be at the same epoch
/// and then hold rank 0's weights. Returns the epoch to start at.
fn resume(args: &TrainConfig, comm: &dyn Comm, ibot: &mut Ibot, ckpt_path: &Path) -> Result<usize> {
    let resume = crate::util::resume_path(
        &args.run.output_dir,
        args.run.load_from.as_deref(),
        ckpt_path,
    )?;
    let mut start_epoch = 0;
    if let Some(p) = &resume {
        let meta =
            checkpoint::load(p, ibot).with_context(|| format!("resuming from {}", p.display()))?;
        start_epoch = meta.epoch;
        if comm.is_main() {
            eprintln!("resumed from {} at epoch {start_epoch}", p.display());
        }
    }
    if comm.world_size() > 1 {
        let epochs = crate::dist::all_gather_i64(comm, &[start_epoch as i64])?;
        if let Some(r) = epochs.iter().position(|&e| e != start_epoch as i64) {
            bail!(
                "rank {r} would resume at epoch {} but rank {} at epoch {start_epoch}: every rank must \
                 see the same checkpoint (put --output_dir on a file system all nodes share)",
                epochs[r],
                comm.rank()
            );
        }
        // As DDP at construction: rank 0's weights everywhere, checked.
        crate::dist::broadcast_params(comm, &ibot.student_ps).context("student")?;
        crate::dist::broadcast_params(comm, &ibot.teacher_ps).context("teacher")?;
        let _guard = tch::no_grad_guard();
        comm.broadcast(&mut ibot.loss.center, 0)?;
        comm.broadcast(&mut ibot.loss.center2, 0)?;
    }
    Ok(start_epoch)
}

/// What the loop keeps across epochs: the loss curve of this run, the last finite loss, the
/// unreadable images named so far, TensorBoard's writer.
struct RunState {
    main: bool,
    /// Per-iteration loss for loss.png, averaged in buckets of `bucket` steps so that a long
    /// run keeps a few thousand points.
    iter_curve: Vec<(f64, f64)>,
    bucket: usize,
    bucket_sum: (f64, f64, usize),
    last_finite: Option<f64>,
    /// Unreadable images skipped so far (--skip_corrupt): the first few are named on stderr.
    listed_skips: usize,
    /// TensorBoard scalars (rank 0): a convenience, so a failure only turns them off.
    tb: Option<super::tensorboard::EventWriter>,
}

const LIST_SKIPS: usize = 5;

impl RunState {
    fn new(args: &TrainConfig, main: bool, bucket: usize) -> Self {
        let tb = if main {
            match super::tensorboard::EventWriter::create(&args.run.output_dir.join("tf_logs")) {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("note: no TensorBoard logs: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            main,
            iter_curve: Vec::new(),
            bucket: bucket.max(1),
            bucket_sum: (0.0, 0.0, 0),
            last_finite: None,
            listed_skips: 0,
            tb,
        }
    }

    fn tb_write(&mut self, points: &[(&str, f64, i64)]) {
        if let Some(w) = self.tb.as_mut() {
            let r = points
                .iter()
                .try_for_each(|(t, v, s)| w.scalar(t, *v, *s))
                .and_then(|_| w.flush());
            if let Err(e) = r {
                eprintln!("note: TensorBoard logs stopped: {e:#}");
                self.tb = None;
            }
        }
    }

    /// Names the first few unreadable images on stderr.
    fn list_skips(&mut self, reasons: &[String]) {
        for r in reasons {
            if self.listed_skips < LIST_SKIPS {
                eprintln!("skipped an unreadable image: {r}");
            } else if self.listed_skips == LIST_SKIPS {
                eprintln!("(further unreadable images are skipped without being listed)");
            }
            self.listed_skips += 1;
        }
    }

    /// Adds step `it` of `epoch` to the loss curve (rank 0).
    fn add_to_curve(&mut self, epoch: usize, it: usize, niter: usize, loss: f64) {
        if !self.main {
            return;
        }
        // Epoch e's iterations span [e - 0.5, e + 0.5]: its average sits in the middle.
        self.bucket_sum.0 += epoch as f64 + (it as f64 + 0.5) / niter as f64 - 0.5;
        self.bucket_sum.1 += loss;
        self.bucket_sum.2 += 1;
        if self.bucket_sum.2 == self.bucket {
            let n = self.bucket_sum.2 as f64;
            self.iter_curve
                .push((self.bucket_sum.0 / n, self.bucket_sum.1 / n));
            self.bucket_sum = (0.0, 0.0, 0);
        }
    }
}

/// One rank's sums over the steps of an epoch.
#[derive(Default)]
struct EpochSums {
    stats: EpochStats,
    steps: usize,
    skipped: usize,
    first_skip: Option<String>,
    preds: Vec<i64>,
    labels: Vec<i64>,
}

/// The steps of one epoch, with the progress bar (or a line every 10 steps).
#[allow(clippy::too_many_arguments)]
fn train_epoch(
    args: &TrainConfig,
    comm: &dyn Comm,
    ibot: &mut Ibot,
    source: &dyn BatchSource,
    observer: &mut dyn Observer,
    sch: &Schedules,
    run: &mut RunState,
    epoch: usize,
    ckpt_path: &Path,
) -> Result<EpochSums> {
    let (main, niter, device) = (comm.is_main(), sch.niter, ibot.device);
    super::interrupt::set_position(epoch, 0);
    if let Some(sig) = super::interrupt::pending() {
        return Err(super::interrupt::interrupted(sig));
    }
    // Per-epoch seeding makes an interrupted-and-resumed run identical to a straight one.
    ibot.student
        .backbone
        .reseed_drop_path(args.run.seed.wrapping_add(epoch as u64));
    let t0 = Instant::now();
    let pb = if main {
        progress(niter as u64, epoch, args.schedule.epochs)
    } else {
        None
    };
    let mut sums = EpochSums::default();
    for (it, batch) in source.batches(epoch).enumerate() {
        super::interrupt::set_position(epoch, it);
        if let Some(sig) = super::interrupt::pending() {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            return Err(super::interrupt::interrupted(sig));
        }
        let batch = batch.with_context(|| format!("loading batch {it} of epoch {epoch}"))?;
        sums.skipped += batch.skipped;
        if sums.first_skip.is_none() {
            sums.first_skip = batch.skip_reason.clone();
        }
        run.list_skips(&batch.skip_reasons);
        // With --skip_corrupt a batch may lose every image; in a data-parallel run all
        // ranks then skip the step together (a collective must be entered by everyone).
        let mut empty = batch.indices.is_empty();
        if comm.world_size() > 1 && args.data.skip_corrupt {
            let mut flag =
                Tensor::from_slice(&[f32::from(u8::from(empty))]).to_device(comm.device());
            comm.all_reduce_max(&mut flag)?;
            empty = flag.double_value(&[0]) > 0.0;
        }
        if empty {
            continue;
        }
        let g = niter * epoch + it;
        let views: Vec<Tensor> = batch.views.iter().map(|v| v.to_device(device)).collect();
        let masks: Vec<Tensor> = batch.masks.iter().map(|m| m.to_device(device)).collect();
        let step = ibot.train_step(
            &views,
            &masks,
            epoch,
            sch.lr[g],
            sch.wd[g],
            sch.momentum[g],
            comm,
        );
        let (s, pred) = match step {
            Ok(x) => x,
            Err(e) => return Err(step_failure(e, args, ckpt_path, epoch, it, run.last_finite)),
        };
        observer.step(g, &s, ibot)?;
        run.add_to_curve(epoch, it, niter, s.loss);
        run.tb_write(&[("iter/loss", s.loss, g as i64), ("iter/lr", s.lr, g as i64)]);
        run.last_finite = Some(s.loss);
        let st = &mut sums.stats;
        st.loss += s.loss;
        st.cls += s.cls;
        st.patch += s.patch;
        st.lr += s.lr;
        st.wd += s.wd;
        st.acc += s.acc;
        sums.steps += 1;
        sums.preds.extend(Vec::<i64>::try_from(
            pred.to_device(Device::Cpu).to_kind(Kind::Int64),
        )?);
        sums.labels
            .extend(Vec::<i64>::try_from(batch.labels.to_kind(Kind::Int64))?);
        let msg = format!(
            "loss {:.4} (cls {:.4} patch {:.4}) lr {:.2e}",
            s.loss, s.cls, s.patch, s.lr
        );
        match &pb {
            Some(pb) => {
                pb.set_message(msg);
                pb.inc(1);
            }
            None if main && (it % 10 == 0 || it + 1 == niter) => {
                eprintln!(
                    "Epoch: [{epoch}/{}] [{it}/{niter}] {msg} ({:.1}s)",
                    args.schedule.epochs,
                    t0.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(sums)
}

/// The error a failed step ends the run with: the signal that broke a collective, or a
/// non-finite loss with what is on disk, or the step's own error.
fn step_failure(
    e: anyhow::Error,
    args: &TrainConfig,
    ckpt_path: &Path,
    epoch: usize,
    it: usize,
    last_finite: Option<f64>,
) -> anyhow::Error {
    if let Some(sig) = super::interrupt::pending() {
        // A peer that stopped on the signal breaks the collective.
        return super::interrupt::interrupted(sig);
    }
    let Some(nf) = e.downcast_ref::<NonFiniteLoss>() else {
        return e;
    };
    let whose = if nf.other_rank {
        "on another rank".to_string()
    } else {
        format!("{}", nf.value)
    };
    // What is on disk, not what should be there.
    let kept = match checkpoint::read_meta(ckpt_path) {
        Ok(m) => format!(
            "the last checkpoint, {} (epoch {} finished), is intact",
            ckpt_path.display(),
            m.epoch.saturating_sub(1)
        ),
        Err(_) if ckpt_path.exists() => format!("{} is left as it was", ckpt_path.display()),
        Err(_) => format!(
            "no checkpoint was written in {}",
            args.run.output_dir.display()
        ),
    };
    anyhow::anyhow!(
        "loss is {whose} at epoch {epoch}, iteration {it}: stopping (last finite loss {:?}); {kept}",
        last_finite
    )
}

/// An epoch's statistics over every rank, and the images skipped on all of them.
struct SyncedStats {
    stats: EpochStats,
    skipped: usize,
}

/// As MetricLogger.synchronize_between_processes: averages over every rank's steps; NMI, ARI,
/// F and the Hungarian accuracy of the predictions of all ranks.
fn epoch_stats(comm: &dyn Comm, sums: EpochSums, epoch: usize) -> Result<SyncedStats> {
    let s = &sums.stats;
    let mut totals = Tensor::from_slice(&[
        s.loss,
        s.cls,
        s.patch,
        s.lr,
        s.wd,
        s.acc,
        sums.steps as f64,
        sums.skipped as f64,
    ])
    .to_device(comm.device());
    comm.all_reduce_sum(&mut totals)?;
    let t = Vec::<f64>::try_from(totals.to_device(Device::Cpu))?;
    let skipped = t[7] as usize;
    if t[6] == 0.0 {
        // Not one step: every image of the epoch was skipped (--skip_corrupt).
        bail!(
            "every image of epoch {epoch} was unreadable ({skipped} skipped, no batch left to train on){}; \
             the last checkpoint is left as it was",
            match &sums.first_skip {
                Some(r) => format!("; the first: {r}"),
                None => String::new(),
            }
        );
    }
    let n = t[6];
    let mut st = EpochStats {
        loss: t[0] / n,
        cls: t[1] / n,
        patch: t[2] / n,
        lr: t[3] / n,
        wd: t[4] / n,
        acc: t[5] / n,
        adjacc: -1.0,
        ..Default::default()
    };
    // As the official concat_all_gather of predictions and labels.
    let preds = crate::dist::all_gather_i64(comm, &sums.preds)?;
    let labels = crate::dist::all_gather_i64(comm, &sums.labels)?;
    if !labels.is_empty() && labels.iter().all(|&l| l >= 0) {
        // The official log leaves `adjacc` at -1 (eval_pred without calc_acc); the
        // Hungarian-matched accuracy is cheap enough to report.
        (st.nmi, st.ari, st.fscore, st.adjacc) = cluster::eval_pred(&labels, &preds, true);
    }
    Ok(SyncedStats { stats: st, skipped })
}

/// Rank 0 saves between two barriers (nobody runs ahead of a checkpoint being written, and a
/// failed save stops every rank), then the epoch's scalars go to TensorBoard.
#[allow(clippy::too_many_arguments)]
fn end_epoch(
    args: &TrainConfig,
    comm: &dyn Comm,
    ibot: &Ibot,
    sch: &Schedules,
    run: &mut RunState,
    epoch: usize,
    ckpt_path: &Path,
    st: &EpochStats,
) -> Result<()> {
    comm.barrier().context("before saving the checkpoint")?;
    if comm.is_main() {
        let _saving = super::interrupt::Saving::begin();
        let schedules = schedule_curves(
            &sch.lr,
            &sch.wd,
            &sch.momentum,
            &ibot.loss.teacher_temp_schedule,
            sch.niter,
            epoch,
        );
        let curves = super::plot::Curves {
            epochs: &[],
            iters: &run.iter_curve,
            schedules: &schedules,
        };
        save_epoch(args, ibot, epoch, ckpt_path, st, curves)?;
    }
    comm.barrier().context("after saving the checkpoint")?;
    if run.tb.is_some() {
        let mut pts: Vec<(String, f64)> = Vec::new();
        if let Some(m) = serde_json::to_value(st)?.as_object() {
            for (k, v) in m {
                if let Some(x) = v.as_f64() {
                    pts.push((format!("train_{k}"), x));
                }
            }
        }
        let pts: Vec<(&str, f64, i64)> = pts
            .iter()
            .map(|(k, v)| (k.as_str(), *v, epoch as i64))
            .collect();
        run.tb_write(&pts);
    }
    Ok(())
}

/// The schedules of epochs `0..=epoch` for loss.png: per iteration (at most ~2000 points
/// each) for lr, weight decay and teacher momentum, per epoch for the teacher temperature.
fn schedule_curves(
    lr: &[f64],
    wd: &[f64],
    mom: &[f64],
    teacher_temp: &[f64],
    niter: usize,
    epoch: usize,
) -> Vec<(&'static str, Vec<(f64, f64)>)> {
    let upto = ((epoch + 1) * niter)
        .min(lr.len())
        .min(wd.len())
        .min(mom.len());
    let step = (upto / 2000).max(1);
    let per_iter = |v: &[f64]| -> Vec<(f64, f64)> {
        (0..upto)
            .step_by(step)
            .map(|g| ((g as f64 + 0.5) / niter as f64 - 0.5, v[g]))
            .collect()
    };
    let temps = teacher_temp
        .iter()
        .take(epoch + 1)
        .enumerate()
        .map(|(e, &t)| (e as f64, t))
        .collect();
    vec![
        ("learning rate", per_iter(lr)),
        ("weight decay", per_iter(wd)),
        ("teacher momentum", per_iter(mom)),
        ("teacher temperature ([CLS])", temps),
    ]
}

/// Rank 0's end of an epoch: the checkpoint(s), then the log line that refers to them, then
/// the curve.
fn save_epoch(
    args: &TrainConfig,
    ibot: &Ibot,
    epoch: usize,
    ckpt_path: &Path,
    st: &EpochStats,
    curves: super::plot::Curves,
) -> Result<()> {
    checkpoint::save(ckpt_path, ibot, epoch + 1, args)?;
    if args.run.saveckp_freq > 0 && epoch % args.run.saveckp_freq == 0 && epoch > 0 {
        checkpoint::save(
            &args
                .run
                .output_dir
                .join(format!("checkpoint{epoch:04}.safetensors")),
            ibot,
            epoch + 1,
            args,
        )?;
    }
    let mut line = serde_json::Map::new();
    for (k, v) in serde_json::to_value(st)?
        .as_object()
        .cloned()
        .unwrap_or_default()
    {
        line.insert(format!("train_{k}"), v);
    }
    line.insert("epoch".into(), epoch.into());
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.run.output_dir.join("log.txt"))
        .context("opening log.txt")?;
    writeln!(log, "{}", serde_json::Value::Object(line)).context("writing log.txt")?;
    drop(log);
    // The curve is a convenience: failing to draw it never stops training.
    let curve = super::plot::read_log(&args.run.output_dir.join("log.txt")).and_then(|pts| {
        let curves = super::plot::Curves {
            epochs: &pts,
            ..curves
        };
        super::plot::write_training_png(&curves, &args.run.output_dir.join("loss.png"))
    });
    if let Err(e) = curve {
        eprintln!("note: could not draw loss.png: {e:#}");
    }
    Ok(())
}
