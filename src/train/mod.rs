//! One iBOT training step, piece by piece as the official `train_one_epoch`.

pub mod amp;
pub mod checkpoint;
pub mod interrupt;
pub mod optim;
pub mod plot;
pub mod precision_probe;
pub mod run;
pub mod tensorboard;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dist::Comm;
pub use crate::loss::IbotLossConfig;
use crate::loss::{IbotLoss, LossOutput, TeacherPatch};
use crate::models::{BackboneConfig, HeadConfig, MultiCropOutput, MultiCropWrapper};
use crate::params::{Param, ParamStore};
use amp::{GradScaler, Precision};
use optim::{Optimizer, OptimizerKind};

/// Everything that defines the student/teacher pair and its step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IbotConfig {
    /// Student backbone (its `drop_path_rate` and `masked_im_modeling` are the student's; the
    /// teacher uses the same shape with neither).
    pub backbone: BackboneConfig,
    /// Student head.
    pub head: HeadConfig,
    pub shared_head_teacher: bool,
    pub loss: IbotLossConfig,
    /// Per-tensor gradient-norm clip (0 disables).
    pub clip_grad: f64,
    /// Epochs during which the last layer's gradients are cancelled.
    pub freeze_last_layer: usize,
    pub optimizer: OptimizerKind,
}

impl IbotConfig {
    pub fn teacher_backbone(&self) -> BackboneConfig {
        self.backbone.without_training_parts()
    }

    /// The teacher head: the student's shape with `shared_head_teacher` (and, as in the official
    /// code, the default `norm_last_layer=True`, which does not matter for a frozen teacher).
    pub fn teacher_head(&self) -> HeadConfig {
        HeadConfig {
            shared_head: self.shared_head_teacher,
            norm_last_layer: true,
            ..self.head.clone()
        }
    }
}

/// A non-finite loss: training must stop (the official code exits).
#[derive(Debug, thiserror::Error)]
#[error("loss is {value} at epoch {epoch}, stopping training (last finite loss: {last_finite:?})")]
pub struct NonFiniteLoss {
    pub value: f64,
    pub epoch: usize,
    pub last_finite: Option<f64>,
    /// This rank's loss was finite; another rank's was not.
    pub other_rank: bool,
}

/// Forward results of one step.
#[derive(Debug)]
pub struct StepForward {
    pub teacher: MultiCropOutput,
    pub student: MultiCropOutput,
    pub student_local: Option<MultiCropOutput>,
    pub loss: LossOutput,
}

/// Scalars of one step.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub cls: f64,
    pub patch: f64,
    pub lr: f64,
    pub wd: f64,
    pub momentum: f64,
    /// Agreement of teacher argmax (global view 0) and student argmax (global view 1).
    pub acc: f64,
}

/// Wall time per phase of the training step, summed over the steps timed (`ibot bench train`
/// prints it). CUDA work is synchronised at each boundary so that it lands in its own phase.
#[derive(Debug, Default, Clone)]
pub struct PhaseTimes {
    /// (phase, seconds) in the order first seen.
    pub entries: Vec<(&'static str, f64)>,
}

impl PhaseTimes {
    pub fn add(&mut self, name: &'static str, secs: f64) {
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += secs,
            None => self.entries.push((name, secs)),
        }
    }
}

/// Student, teacher, loss (with its centres) and optimizer.
pub struct Ibot {
    pub cfg: IbotConfig,
    pub student_ps: ParamStore,
    pub teacher_ps: ParamStore,
    pub student: MultiCropWrapper,
    pub teacher: MultiCropWrapper,
    pub loss: IbotLoss,
    pub optimizer: Optimizer,
    pub device: Device,
    /// Arithmetic of the forward passes and the loss (float32 unless set, see [`amp`]).
    pub precision: Precision,
    /// Loss scaling for float16 (unused otherwise).
    pub scaler: GradScaler,
    /// When set, wall time per phase of every training step is added up here (benchmarks).
    pub phases: Option<PhaseTimes>,
    /// Run the student's head on every token in training steps, as the official code does,
    /// instead of only where the loss looks ([`Ibot::forward_train`]); same loss, slower. For
    /// benchmarks.
    pub full_head: bool,
}

impl Ibot {
    /// Ends phase `name` (when timing): adds the time since `t` and restarts `t`.
    fn lap(&mut self, name: &'static str, t: &mut std::time::Instant) {
        if let Some(p) = self.phases.as_mut() {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            p.add(name, t.elapsed().as_secs_f64());
            *t = std::time::Instant::now();
        }
    }

    /// The number of global views, after checking that `images` and `masks` cover them.
    fn global_views(&self, images: &[Tensor], masks: &[Tensor]) -> Result<usize> {
        let g = self.cfg.loss.ngcrops;
        ensure!(
            images.len() >= g,
            "{} views given, {g} global views expected",
            images.len()
        );
        ensure!(
            masks.len() >= g,
            "{} masks given for {g} global views",
            masks.len()
        );
        Ok(g)
    }

    /// Builds both networks; the teacher starts from the student's state dict loaded the way the
    /// official `load_state_dict(strict=False)` does it.
    pub fn new(cfg: IbotConfig, device: Device) -> Result<Self> {
        let mut student_ps = ParamStore::new();
        let student =
            MultiCropWrapper::new(&mut student_ps, &cfg.backbone, &cfg.head, true, device)?;
        let mut teacher_ps = ParamStore::new();
        let teacher = MultiCropWrapper::new(
            &mut teacher_ps,
            &cfg.teacher_backbone(),
            &cfg.teacher_head(),
            false,
            device,
        )?;
        teacher_ps.load_non_strict(student_ps.state_dict())?;
        let loss = IbotLoss::new(cfg.loss.clone(), device)?;
        let optimizer = Optimizer::new(cfg.optimizer, &student_ps);
        Ok(Self {
            cfg,
            student_ps,
            teacher_ps,
            student,
            teacher,
            loss,
            optimizer,
            device,
            precision: Precision::Fp32,
            scaler: GradScaler::default(),
            full_head: false,
            phases: None,
        })
    }

    /// [`Ibot::new`] with libtorch's generator seeded by `seed` for the initialisation. The
    /// generator is process-wide, so construction holds a lock: concurrent constructions (e.g.
    /// parallel tests) cannot interleave their draws.
    pub fn seeded(cfg: IbotConfig, device: Device, seed: u64) -> Result<Self> {
        seeded_init(seed, || Self::new(cfg, device))
    }

    /// Re-initialises the teacher from the current student (after loading student weights), as
    /// `load_state_dict(student.state_dict(), strict=False)`; returns its `(missing,
    /// unexpected)` key lists.
    pub fn init_teacher_from_student(&self) -> Result<(Vec<String>, Vec<String>)> {
        self.teacher_ps
            .load_non_strict(self.student_ps.state_dict())
    }

    /// Teacher on the global views, student on the masked global views and on the local views,
    /// then the loss (which updates the centres).
    pub fn forward(
        &mut self,
        images: &[Tensor],
        masks: &[Tensor],
        epoch: usize,
        train: bool,
        reduce: &dyn Comm,
    ) -> Result<StepForward> {
        let g = self.global_views(images, masks)?;
        let globals = &images[..g];
        let teacher = tch::no_grad(|| self.teacher.forward(globals, None, false))?;
        let mim = self.cfg.backbone.masked_im_modeling();
        let student = self
            .student
            .forward(globals, mim.then_some(&masks[..g]), train)?;
        let student_local = if images.len() > g {
            Some(self.student.forward(&images[g..], None, train)?)
        } else {
            None
        };
        let (Some(t_patch), Some(s_patch)) = (&teacher.patch, &student.patch) else {
            bail!("all global views must have the same resolution")
        };
        let loss = self.loss.forward(
            &student.cls,
            s_patch,
            &teacher.cls,
            t_patch,
            student_local.as_ref().map(|o| &o.cls),
            &masks[..g],
            epoch,
            reduce,
        )?;
        Ok(StepForward {
            teacher,
            student,
            student_local,
            loss,
        })
    }

    /// The forward pass of a training step: the same loss as [`Ibot::forward`] without the work
    /// whose result the loss discards (as DINOv2 does): the student's patch head runs only on
    /// the masked tokens of the global views (the patch loss is a masked mean) and the local
    /// views go through the head with their [CLS] token only (their patch outputs are never
    /// used). The teacher's patch last layer likewise runs only at those masked positions
    /// (teacher view q pairs with student view q in the patch loss) and on each sample's mean
    /// bottleneck output, which the patch centre needs: the last layer is linear without bias
    /// ([`crate::models::IbotHead::forward_tokens_at`]). Heads without a bottleneck run the
    /// teacher's head on every token. A ViT student also runs its last block past the attention
    /// (queries, `proj`, residual, MLP) and the final norm only on the rows the loss reads
    /// ([CLS] and the masked tokens of the global views, [CLS] of the local views;
    /// [`crate::models::VisionTransformer::forward_train_rows`]), with the drop-path draws of
    /// the full forward. `student.patch` and `teacher.patch` of the result are None
    /// (`teacher.patch` is kept for a head without bottleneck), and for a ViT `student.backbone`
    /// holds the [CLS] tokens alone, `[G·B, 1, D]`.
    pub fn forward_train(
        &mut self,
        images: &[Tensor],
        masks: &[Tensor],
        epoch: usize,
        comm: &dyn Comm,
    ) -> Result<StepForward> {
        let g = self.global_views(images, masks)?;
        let globals = &images[..g];
        let mut t = std::time::Instant::now();
        ensure!(
            globals
                .windows(2)
                .all(|w| w[0].size().last() == w[1].size().last()),
            "all global views must have the same resolution"
        );
        let x = Tensor::f_cat(globals, 0)?;
        let m = Tensor::f_cat(&masks[..g], 0)?.to_device(self.device);
        let t_tokens = tch::no_grad(|| self.teacher.backbone.forward(&x, None, false))?;
        let n = t_tokens.size()[1] - 1;
        ensure!(
            m.dim() == 3 && m.size()[0] == x.size()[0] && m.size()[1] * m.size()[2] == n,
            "masks of {:?} do not cover the {n} patches of the {} global view images",
            m.size(),
            x.size()[0]
        );
        let masked = m.flatten(0, -1).nonzero().squeeze_dim(1);
        let lean_teacher =
            tch::no_grad(|| self.teacher.head.forward_tokens_at(&t_tokens, &masked))?;
        let (cls, patch, t_rows) = match lean_teacher {
            Some((cls, rows, mean)) => (cls, None, Some((rows, mean))),
            None => {
                let (cls, patch) = tch::no_grad(|| self.teacher.head.forward_tokens(&t_tokens))?;
                (cls, Some(patch), None)
            }
        };
        let teacher = MultiCropOutput {
            cls,
            patch,
            backbone: vec![t_tokens],
        };
        self.lap("teacher forward (backbone + head)", &mut t);
        let mim = self.cfg.backbone.masked_im_modeling();
        let mim_mask = mim.then_some(&m);
        let (student_cls, student_patch, student_tokens) = match self.student.backbone.as_vit() {
            Some(vit) => {
                // Only [CLS] and the masked tokens leave the last block (its other rows are
                // never read): `rows` is [CLS] of every image, then the masked patches in the
                // order of `masked`.
                let gb = x.size()[0];
                let rows = vit.forward_train_rows(&x, mim_mask, Some(&m.reshape([gb, n])), true)?;
                self.lap("student backbone, global views", &mut t);
                let cls_rows = rows.narrow(0, 0, gb);
                let student_cls = self.student.head.forward_cls(&cls_rows);
                let student_patch =
                    self.student
                        .head
                        .forward_patch_rows(&rows.narrow(0, gb, rows.size()[0] - gb));
                (student_cls, student_patch, cls_rows.unsqueeze(1))
            }
            None => {
                let tokens = self.student.backbone.forward(&x, mim_mask, true)?;
                self.lap("student backbone, global views", &mut t);
                let d = tokens.size()[2];
                ensure!(
                    tokens.size()[1] - 1 == n,
                    "the student has {} patch tokens, the teacher {n}",
                    tokens.size()[1] - 1
                );
                let student_cls = self.student.head.forward_cls(&tokens.select(1, 0));
                let rows = tokens
                    .narrow(1, 1, n)
                    .reshape([-1, d])
                    .index_select(0, &masked);
                let student_patch = self.student.head.forward_patch_rows(&rows);
                (student_cls, student_patch, tokens)
            }
        };
        self.lap("student head, global views (masked tokens)", &mut t);
        let student_local = if images.len() > g {
            Some(self.student.forward_cls_only(&images[g..], true)?)
        } else {
            None
        };
        self.lap("student local views (backbone + [CLS] head)", &mut t);
        let t_patch = match (&t_rows, &teacher.patch) {
            (Some((rows, token_mean)), _) => TeacherPatch::Rows { rows, token_mean },
            (None, Some(p)) => TeacherPatch::Full(p),
            (None, None) => bail!("the teacher gave no patch outputs"),
        };
        let loss = self.loss.forward_masked(
            &student_cls,
            &student_patch,
            &masked,
            &teacher.cls,
            t_patch,
            student_local.as_ref().map(|o| &o.cls),
            &masks[..g],
            epoch,
            comm,
        )?;
        self.lap("loss and centres", &mut t);
        Ok(StepForward {
            teacher,
            student: MultiCropOutput {
                cls: student_cls,
                patch: None,
                backbone: vec![student_tokens],
            },
            student_local,
            loss,
        })
    }

    /// Gradients of `loss` w.r.t. every student parameter (None: frozen or not reached).
    pub fn backward(&self, loss: &Tensor) -> Vec<Option<Tensor>> {
        let params = self.student_ps.params();
        let trainable: Vec<&Tensor> = params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| &p.tensor)
            .collect();
        let mut grads = Tensor::run_backward(&[loss], &trainable, false, false).into_iter();
        params
            .iter()
            .map(|p| {
                if p.trainable {
                    grads.next().filter(|g| g.defined())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Clipping (if enabled) then last-layer cancelling; returns the pre-clip norms per
    /// parameter and whether each was clipped (empty when clipping is off).
    pub fn process_grads(
        &self,
        grads: &mut [Option<Tensor>],
        epoch: usize,
    ) -> Vec<Option<GradClip>> {
        let norms = if self.cfg.clip_grad > 0.0 {
            clip_gradients(grads, self.cfg.clip_grad)
        } else {
            vec![]
        };
        cancel_gradients_last_layer(epoch, self.cfg.freeze_last_layer, &self.student_ps, grads);
        norms
    }

    /// EMA of the teacher towards the student: `t = m·t + (1-m)·s` over the parameter names
    /// both networks have (the official `names_common`).
    pub fn update_teacher(&self, m: f64) {
        ema_update(&self.teacher_ps, &self.student_ps, m)
    }

    /// One full training step. `lr` applies to both groups, `wd` to the first.
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &mut self,
        images: &[Tensor],
        masks: &[Tensor],
        epoch: usize,
        lr: f64,
        wd: f64,
        momentum: f64,
        comm: &dyn Comm,
    ) -> Result<(StepStats, Tensor)> {
        let (precision, device) = (self.precision, self.device);
        let mut t = std::time::Instant::now();
        // As the official loop: forward passes and loss under autocast, the rest outside.
        let fwd = amp::autocast(precision, device, || {
            if self.full_head {
                let f = self.forward(images, masks, epoch, true, comm);
                self.lap("forward and loss (head on every token)", &mut t);
                f
            } else {
                self.forward_train(images, masks, epoch, comm)
            }
        })?;
        t = std::time::Instant::now();
        let loss = fwd.loss.total.double_value(&[]);
        // Every rank stops together when any rank's loss is not finite (the official code
        // leaves the others waiting in the next collective).
        let any_nonfinite = if comm.world_size() > 1 {
            let mut flag = Tensor::from_slice(&[f32::from(u8::from(!loss.is_finite()))])
                .to_device(comm.device());
            comm.all_reduce_max(&mut flag)?;
            flag.double_value(&[0]) > 0.0
        } else {
            !loss.is_finite()
        };
        if any_nonfinite {
            return Err(NonFiniteLoss {
                value: loss,
                epoch,
                last_finite: None,
                other_rank: loss.is_finite(),
            }
            .into());
        }
        let acc = argmax_agreement(&fwd.teacher.cls, &fwd.student.cls, self.cfg.loss.ngcrops);
        if precision == Precision::Fp16 {
            // GradScaler: backward on the scaled loss, unscale before clipping, skip the
            // optimizer step when a gradient overflowed, then adapt the scale.
            let mut grads = self.backward(&self.scaler.scale_loss(&fwd.loss.total));
            // As DDP: gradients averaged over ranks as they leave backward (an overflow on any
            // rank reaches every rank, so all skip the step together).
            crate::dist::average_gradients(comm, &mut grads)?;
            let found_inf = self.scaler.unscale(&mut grads);
            self.process_grads(&mut grads, epoch);
            if !found_inf {
                self.optimizer.step(&self.student_ps, &grads, lr, wd)?;
            }
            self.scaler.update(found_inf);
        } else {
            let mut grads = self.backward(&fwd.loss.total);
            self.lap("backward", &mut t);
            crate::dist::average_gradients(comm, &mut grads)?;
            if comm.world_size() > 1 {
                self.lap("gradient all-reduce", &mut t);
            }
            self.process_grads(&mut grads, epoch);
            self.lap("clipping and last-layer freeze", &mut t);
            self.optimizer.step(&self.student_ps, &grads, lr, wd)?;
            self.lap("optimizer", &mut t);
        }
        self.update_teacher(momentum);
        self.lap("teacher EMA", &mut t);
        let b = fwd.teacher.cls.size()[0] / self.cfg.loss.ngcrops as i64;
        let teacher_pred = fwd.teacher.cls.narrow(0, 0, b).argmax(1, false);
        let stats = StepStats {
            loss,
            cls: fwd.loss.cls.double_value(&[]),
            patch: fwd.loss.patch.double_value(&[]),
            lr,
            wd,
            momentum,
            acc,
        };
        Ok((stats, teacher_pred))
    }
}

/// Runs `init` with libtorch's process-wide generator seeded by `seed`, holding the lock that
/// [`Ibot::seeded`] holds: model constructions in concurrent threads cannot interleave draws.
pub fn seeded_init<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _lock = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    init()
}

/// Fraction of samples where the teacher's argmax on global view 0 equals the student's on
/// global view 1 (0 with a single global view).
pub fn argmax_agreement(teacher_cls: &Tensor, student_cls: &Tensor, ngcrops: usize) -> f64 {
    if ngcrops < 2 {
        return 0.0;
    }
    let t = teacher_cls.chunk(ngcrops as i64, 0);
    let s = student_cls.chunk(ngcrops as i64, 0);
    let eq = t[0].argmax(1, false).eq_tensor(&s[1].argmax(1, false));
    eq.to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

/// One gradient's norm before clipping and whether clipping scaled it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradClip {
    pub norm: f64,
    pub clipped: bool,
}

/// The official per-tensor `clip_gradients`: for every gradient, `coef = clip / (‖g‖ + 1e-6)`
/// in float32, and `g *= coef` when `coef < 1`. Returns each gradient's norm before clipping
/// and whether it was scaled (None where there is no gradient).
pub fn clip_gradients(grads: &mut [Option<Tensor>], clip: f64) -> Vec<Option<GradClip>> {
    let _guard = tch::no_grad_guard();
    grads
        .iter_mut()
        .map(|g| {
            let g = g.as_mut()?;
            let norm = g.norm();
            // Python's `clip / t` is `t.reciprocal() * clip`.
            let coef = (&norm + 1e-6).reciprocal() * clip;
            let clipped = coef.double_value(&[]) < 1.0;
            if clipped {
                let _ = g.g_mul_(&coef);
            }
            Some(GradClip {
                norm: norm.double_value(&[]),
                clipped,
            })
        })
        .collect()
}

/// The official `cancel_gradients_last_layer`: during the first `freeze_last_layer` epochs the
/// gradients of every parameter whose name contains `last_layer` are dropped.
pub fn cancel_gradients_last_layer(
    epoch: usize,
    freeze_last_layer: usize,
    ps: &ParamStore,
    grads: &mut [Option<Tensor>],
) {
    if epoch >= freeze_last_layer {
        return;
    }
    for (p, g) in ps.params().iter().zip(grads.iter_mut()) {
        if p.name.contains("last_layer") {
            *g = None;
        }
    }
}

/// The (teacher, student) parameter pairs of the EMA: the official `names_common`, i.e. every
/// `named_parameters()` name the two networks share (so the student's `masked_embed` and, with
/// an unshared student head, its `last_layer2` have no teacher counterpart), in the teacher's
/// order.
pub fn ema_pairs<'a>(
    teacher: &'a ParamStore,
    student: &'a ParamStore,
) -> Vec<(&'a Param, &'a Param)> {
    teacher
        .params()
        .iter()
        .filter_map(|tp| student.named(&tp.name).map(|sp| (tp, sp)))
        .collect()
}

/// `t = m·t + (1-m)·s` over [`ema_pairs`], computed as the official
/// `param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)` (the same roundings) with
/// libtorch's multi-tensor operations: one call for all pairs.
pub fn ema_update(teacher: &ParamStore, student: &ParamStore, m: f64) {
    let _guard = tch::no_grad_guard();
    let (t, s): (Vec<Tensor>, Vec<Tensor>) = ema_pairs(teacher, student)
        .into_iter()
        .map(|(tp, sp)| (tp.tensor.shallow_clone(), sp.tensor.detach()))
        .unzip();
    // Pairs share shape, dtype and device by construction; a failure is a bug, not bad input.
    crate::fastops::foreach_ema(&t, &s, m).unwrap_or_else(|e| panic!("{e:#}"));
}
