//! The iBOT loss (official `main_ibot.py: iBOTLoss`).
//!
//! * [CLS] self-distillation: for every teacher global view q and student view v != q
//!   (local views included), cross-entropy between the centred, sharpened teacher softmax and
//!   the student log-softmax; averaged over the pairs, times `lambda1`.
//! * Masked image modeling: for v == q, the same on the patch tokens, averaged over the masked
//!   patches of each sample (`sum(loss·mask) / max(mask.sum(), 1)`), then over the batch and the
//!   global views, times `lambda2`.
//! * The centres (`center`, `center2`) move with momentum 0.9 towards the teacher batch means
//!   AFTER the loss is computed; the batch sums pass through a [`Comm`] (where the
//!   data-parallel all-reduce plugs in).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dist::Comm;
use crate::schedule::linspace;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IbotLossConfig {
    pub out_dim: i64,
    pub patch_out_dim: i64,
    pub ngcrops: usize,
    pub nlcrops: usize,
    pub warmup_teacher_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp2: f64,
    pub teacher_temp2: f64,
    pub warmup_teacher_temp_epochs: usize,
    pub nepochs: usize,
    pub student_temp: f64,
    pub center_momentum: f64,
    pub center_momentum2: f64,
    pub lambda1: f64,
    pub lambda2: f64,
    pub mim_start_epoch: usize,
}

pub use crate::dist::SingleProcess;

/// Loss values of one step (0-d tensors; `total` carries the graph).
#[derive(Debug)]
pub struct LossOutput {
    pub cls: Tensor,
    pub patch: Tensor,
    pub total: Tensor,
}

/// The teacher's patch outputs as [`IbotLoss::forward_masked`] takes them.
#[derive(Debug, Clone, Copy)]
pub enum TeacherPatch<'a> {
    /// At every position, `[G·B, N, pd]`.
    Full(&'a Tensor),
    /// Only where the loss reads them: `rows` `[M, pd]` at the masked positions (in the order
    /// of `masked`), and `token_mean` `[G·B, pd]`, each sample's mean over all its patch
    /// tokens (what the patch centre averages). See [`crate::models::IbotHead::forward_tokens_at`].
    Rows {
        rows: &'a Tensor,
        token_mean: &'a Tensor,
    },
}

#[derive(Debug)]
pub struct IbotLoss {
    pub cfg: IbotLossConfig,
    /// `[1, out_dim]`
    pub center: Tensor,
    /// `[1, 1, patch_out_dim]`
    pub center2: Tensor,
    pub teacher_temp_schedule: Vec<f64>,
    pub teacher_temp2_schedule: Vec<f64>,
}

/// The per-epoch teacher temperatures: a linear warm-up over `warmup_epochs` then constant;
/// for the patch temperature with `mim_start_epoch > 0`, held at the warm-up value until then.
pub fn teacher_temp_schedules(cfg: &IbotLossConfig) -> Result<(Vec<f64>, Vec<f64>)> {
    let w = cfg.warmup_teacher_temp_epochs;
    if w > cfg.nepochs {
        bail!(
            "--warmup_teacher_temp_epochs ({w}) is larger than --epochs ({}); set --warmup_teacher_temp_epochs to at most that",
            cfg.nepochs
        );
    }
    let mut t1 = linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, w);
    t1.extend(std::iter::repeat(cfg.teacher_temp).take(cfg.nepochs - w));
    let t2 = if cfg.mim_start_epoch == 0 {
        let mut t = linspace(cfg.warmup_teacher_temp2, cfg.teacher_temp2, w);
        t.extend(std::iter::repeat(cfg.teacher_temp2).take(cfg.nepochs - w));
        t
    } else {
        let s = cfg.mim_start_epoch;
        if w + s > cfg.nepochs {
            bail!("--pred_start_epoch ({s}) + --warmup_teacher_temp_epochs ({w}) exceeds --epochs ({}); lower --pred_start_epoch or --warmup_teacher_temp_epochs, or raise --epochs", cfg.nepochs);
        }
        let mut t = vec![cfg.warmup_teacher_temp2; s];
        t.extend(linspace(cfg.warmup_teacher_temp2, cfg.teacher_temp2, w));
        t.extend(std::iter::repeat(cfg.teacher_temp2).take(cfg.nepochs - w - s));
        t
    };
    Ok((t1, t2))
}

impl IbotLoss {
    pub fn new(cfg: IbotLossConfig, dev: Device) -> Result<Self> {
        ensure!(cfg.ngcrops >= 1, "at least one global crop is needed");
        ensure!(
            cfg.ngcrops + cfg.nlcrops >= 2,
            "the [CLS] loss needs at least two views (global_crops_number + local_crops_number >= 2)"
        );
        let (t1, t2) = teacher_temp_schedules(&cfg)?;
        Ok(Self {
            center: Tensor::zeros([1, cfg.out_dim], (Kind::Float, dev)),
            center2: Tensor::zeros([1, 1, cfg.patch_out_dim], (Kind::Float, dev)),
            teacher_temp_schedule: t1,
            teacher_temp2_schedule: t2,
            cfg,
        })
    }

    /// Computes the loss and then updates the centres.
    ///
    /// * `student_cls` `[G·B, out]`, `student_patch` `[G·B, N, pd]`: student on masked globals.
    /// * `teacher_cls`, `teacher_patch`: teacher on the globals (no gradient is taken through them).
    /// * `student_local_cls` `[L·B, out]` or None.
    /// * `masks`: one `[B, h, w]` mask per global view (extra entries are ignored).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        student_cls: &Tensor,
        student_patch: &Tensor,
        teacher_cls: &Tensor,
        teacher_patch: &Tensor,
        student_local_cls: Option<&Tensor>,
        masks: &[Tensor],
        epoch: usize,
        reduce: &dyn Comm,
    ) -> Result<LossOutput> {
        self.check_call(masks, epoch)?;
        let cfg = &self.cfg;
        let g = cfg.ngcrops;
        ensure!(
            teacher_patch.size().last() == Some(&cfg.patch_out_dim) && student_patch.size().last() == Some(&cfg.patch_out_dim),
            "patch outputs must have dim {} (teacher {:?}, student {:?}); with shared_head on either side it must equal out_dim",
            cfg.patch_out_dim,
            teacher_patch.size(),
            student_patch.size()
        );
        let cls = self.cls_term(student_cls, teacher_cls, student_local_cls, epoch)?;
        // Masked image modeling: view q of the student against view q of the teacher.
        let s_patch = (student_patch / cfg.student_temp).chunk(g as i64, 0);
        let t_patch = ((teacher_patch - &self.center2) / self.teacher_temp2_schedule[epoch])
            .softmax(-1, Kind::Float)
            .detach()
            .chunk(g as i64, 0);
        ensure!(
            s_patch.len() == g && t_patch.len() == g,
            "patch rows do not split evenly into {g} views"
        );
        let mut loss2: Option<Tensor> = None;
        for (q, (tq, sq)) in t_patch.iter().zip(&s_patch).enumerate() {
            let l = (-tq * sq.log_softmax(-1, Kind::Float)).sum_dim_intlist(-1, false, Kind::Float);
            let m = masks[q]
                .flatten(-2, -1)
                .to_kind(Kind::Float)
                .to_device(l.device());
            ensure!(
                m.size() == l.size(),
                "mask of view {q} has {:?} patches, the output {:?}",
                m.size(),
                l.size()
            );
            let l = ((l * &m).sum_dim_intlist(-1, false, Kind::Float)
                / m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0))
            .mean(Kind::Float);
            loss2 = Some(match loss2.take() {
                Some(a) => a + l,
                None => l,
            });
        }
        let Some(loss2) = loss2 else {
            bail!("no patch loss terms (no global view)")
        };
        let patch = loss2 / g as f64 * cfg.lambda2;
        let total = &cls + &patch;
        self.update_center(teacher_cls, teacher_patch, reduce)?;
        Ok(LossOutput { cls, patch, total })
    }

    /// What every loss call needs: a mask per global view and a temperature for the epoch.
    fn check_call(&self, masks: &[Tensor], epoch: usize) -> Result<()> {
        let g = self.cfg.ngcrops;
        ensure!(
            masks.len() >= g,
            "{} masks given for {g} global views",
            masks.len()
        );
        ensure!(
            epoch < self.teacher_temp_schedule.len(),
            "epoch {epoch} is past the end of the temperature schedule ({} epochs)",
            self.teacher_temp_schedule.len()
        );
        Ok(())
    }

    /// The same loss as [`IbotLoss::forward`] when the student's patch head ran only where the
    /// loss looks: `student_patch_rows` `[M, pd]` are the student's patch outputs at the masked
    /// positions `masked` (flat indices `row · N + patch` into the `[G·B, N]` grid of the global
    /// views, ascending). The teacher's patch outputs come at every position
    /// ([`TeacherPatch::Full`]) or only at the same positions `masked` plus each sample's token
    /// mean for the centre ([`TeacherPatch::Rows`]); either way teacher view q meets student
    /// view q only (the official `v == q` of the patch term), since row `row · N + patch` of
    /// both grids is the same view, sample and patch. Per sample, the masked-patch
    /// cross-entropy is summed over its masked patches and divided by their number (at least
    /// 1), then averaged over the samples of each view and over the views — the official
    /// reduction without ever forming the unmasked rows. Equal to `forward` up to float
    /// summation order (`tests/model.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_masked(
        &mut self,
        student_cls: &Tensor,
        student_patch_rows: &Tensor,
        masked: &Tensor,
        teacher_cls: &Tensor,
        teacher_patch: TeacherPatch<'_>,
        student_local_cls: Option<&Tensor>,
        masks: &[Tensor],
        epoch: usize,
        reduce: &dyn Comm,
    ) -> Result<LossOutput> {
        self.check_call(masks, epoch)?;
        let cfg = &self.cfg;
        let g = cfg.ngcrops;
        let pd = cfg.patch_out_dim;
        let m: Vec<Tensor> = masks[..g].iter().map(|m| m.flatten(-2, -1)).collect();
        let m = Tensor::cat(&m, 0).to_device(student_patch_rows.device());
        ensure!(
            m.dim() == 2 && student_patch_rows.size().last() == Some(&pd),
            "masks must be [B, h, w] and the student's patch rows of dim {pd} (rows {:?})",
            student_patch_rows.size()
        );
        let (rows, n) = (m.size()[0], m.size()[1]);
        let (t_rows, t_mean) = match teacher_patch {
            TeacherPatch::Full(t) => {
                ensure!(
                    t.size() == [rows, n, pd],
                    "teacher patch outputs {:?}, expected [{rows}, {n}, {pd}] (masks and patch_out_dim; with shared_head on either side it must equal out_dim)",
                    t.size()
                );
                (
                    t.reshape([rows * n, pd]).index_select(0, masked),
                    t.detach().mean_dim(1, false, Kind::Float),
                )
            }
            TeacherPatch::Rows {
                rows: r,
                token_mean,
            } => {
                ensure!(
                    r.size() == [masked.size()[0], pd] && token_mean.size() == [rows, pd],
                    "teacher patch rows {:?} and token means {:?}, expected [{}, {pd}] and [{rows}, {pd}]",
                    r.size(),
                    token_mean.size(),
                    masked.size()[0]
                );
                (r.shallow_clone(), token_mean.shallow_clone())
            }
        };
        let cls = self.cls_term(student_cls, teacher_cls, student_local_cls, epoch)?;

        let temp2 = self.teacher_temp2_schedule[epoch];
        let t = ((t_rows - self.center2.reshape([1, pd])) / temp2)
            .softmax(-1, Kind::Float)
            .detach();
        let ce = (-t * (student_patch_rows / cfg.student_temp).log_softmax(-1, Kind::Float))
            .sum_dim_intlist(-1, false, Kind::Float);
        let sample = masked.divide_scalar_mode(n, "floor");
        let per_row = Tensor::zeros([rows], (Kind::Float, ce.device())).index_add(0, &sample, &ce);
        let count = m
            .to_kind(Kind::Float)
            .sum_dim_intlist(-1, false, Kind::Float)
            .clamp_min(1.0);
        let patch = (per_row / count).mean(Kind::Float) * cfg.lambda2;
        let total = &cls + &patch;
        self.update_center_from_means(teacher_cls, &t_mean, reduce)?;
        Ok(LossOutput { cls, patch, total })
    }

    /// The [CLS] self-distillation term: every teacher global view against every other student
    /// view (local views included), averaged over the pairs, times `lambda1`.
    fn cls_term(
        &self,
        student_cls: &Tensor,
        teacher_cls: &Tensor,
        student_local_cls: Option<&Tensor>,
        epoch: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let g = cfg.ngcrops;
        let ncrops = g + if student_local_cls.is_some() {
            cfg.nlcrops
        } else {
            0
        };
        ensure!(
            teacher_cls.size().last() == Some(&cfg.out_dim)
                && student_cls.size().last() == Some(&cfg.out_dim),
            "[CLS] outputs must have out_dim {} (teacher {:?}, student {:?})",
            cfg.out_dim,
            teacher_cls.size(),
            student_cls.size()
        );
        let all = match student_local_cls {
            Some(l) => Tensor::cat(&[student_cls, l], 0),
            None => student_cls.shallow_clone(),
        };
        ensure!(
            all.size()[0] % ncrops as i64 == 0 && teacher_cls.size()[0] % g as i64 == 0,
            "batch rows do not split evenly into views"
        );
        let s_cls = (all / cfg.student_temp).chunk(ncrops as i64, 0);
        let t_cls = ((teacher_cls - &self.center) / self.teacher_temp_schedule[epoch])
            .softmax(-1, Kind::Float)
            .detach()
            .chunk(g as i64, 0);
        let mut total: Option<Tensor> = None;
        let mut pairs = 0usize;
        for (q, tq) in t_cls.iter().enumerate() {
            for (v, sv) in s_cls.iter().enumerate() {
                if v == q {
                    continue;
                }
                let l = (-tq * sv.log_softmax(-1, Kind::Float))
                    .sum_dim_intlist(-1, false, Kind::Float)
                    .mean(Kind::Float);
                total = Some(match total.take() {
                    Some(a) => a + l,
                    None => l,
                });
                pairs += 1;
            }
        }
        let Some(total) = total else {
            bail!("no [CLS] loss terms (need two views)")
        };
        Ok(total / pairs as f64 * cfg.lambda1)
    }

    /// EMA of the teacher's batch means (the official `update_center`): `center2` uses the mean
    /// over ALL patch tokens of each sample.
    pub fn update_center(
        &mut self,
        teacher_cls: &Tensor,
        teacher_patch: &Tensor,
        reduce: &dyn Comm,
    ) -> Result<()> {
        let token_mean = tch::no_grad(|| teacher_patch.detach().mean_dim(1, false, Kind::Float));
        self.update_center_from_means(teacher_cls, &token_mean, reduce)
    }

    /// [`IbotLoss::update_center`] given each sample's mean over its patch tokens
    /// (`teacher_patch.mean(1)`, `[G·B, pd]`): the official
    /// `sum(teacher_patch.mean(1), dim=0)`, all-reduced, over `len(teacher_patch) · world_size`.
    pub fn update_center_from_means(
        &mut self,
        teacher_cls: &Tensor,
        patch_token_mean: &Tensor,
        reduce: &dyn Comm,
    ) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let ws = reduce.world_size() as f64;
            let mut c = teacher_cls.detach().sum_dim_intlist(0, true, Kind::Float);
            reduce.all_reduce_sum(&mut c)?;
            let c = c / (teacher_cls.size()[0] as f64 * ws);
            let m = self.cfg.center_momentum;
            self.center = &self.center * m + c * (1.0 - m);

            let mut c2 = patch_token_mean
                .detach()
                .sum_dim_intlist(0, true, Kind::Float);
            reduce.all_reduce_sum(&mut c2)?;
            let c2 = c2 / (patch_token_mean.size()[0] as f64 * ws);
            let m2 = self.cfg.center_momentum2;
            self.center2 = &self.center2 * m2 + c2 * (1.0 - m2);
            Ok(())
        })
    }
}
