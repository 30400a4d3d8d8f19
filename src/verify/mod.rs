//! Comparison of this implementation with reference tensors produced by the official code.
//!
//! A fixture directory holds `fixtures.json` (configuration, scalars, name lists) and
//! `fixtures.safetensors` (tensors); `../shared/fixtures/ibot-ref/*/README.md` documents the
//! keys. [`verify_fixture`] rebuilds the configuration, loads the official initial weights,
//! runs forward, loss, backward, clipping, cancelling, one optimizer step, the EMA, the
//! schedules and the k-NN classifier, and compares every tensor.
//!
//! Tolerances (absolute, scaled by `max(1, max|reference|)`):
//! * forward outputs, losses, centres: 1e-5
//! * gradients and parameters after the optimizer step / EMA: 1e-4
//! * schedules (f64): 1e-12; k-NN accuracies: exact.

pub mod traj;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::eval::knn::knn_classifier;
use crate::loss::{teacher_temp_schedules, IbotLossConfig, SingleProcess};
use crate::models::{BackboneConfig, HeadAct, HeadConfig, HeadNorm, SwinConfig, VitConfig};
use crate::params::read_safetensors;
use crate::train::optim::{get_params_groups, Optimizer, OptimizerKind};
use crate::train::schedule::cosine_scheduler;
use crate::train::{Ibot, IbotConfig};

pub const TOL_FORWARD: f64 = 1e-5;
pub const TOL_GRAD: f64 = 1e-4;
pub const TOL_SCHED: f64 = 1e-12;

/// One compared quantity.
#[derive(Debug, Clone)]
pub struct Check {
    pub group: &'static str,
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
    /// Allowed max_abs.
    pub tol: f64,
    pub pass: bool,
    pub note: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.pass).collect()
    }

    pub(crate) fn tensor(
        &mut self,
        group: &'static str,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        tol: f64,
    ) {
        let ours = ours.detach().to_device(Device::Cpu).to_kind(Kind::Double);
        let reference = reference.to_kind(Kind::Double);
        if ours.size() != reference.size() {
            self.checks.push(Check {
                group,
                name: name.to_string(),
                max_abs: f64::INFINITY,
                max_rel: f64::INFINITY,
                tol,
                pass: false,
                note: format!("shape {:?}, reference {:?}", ours.size(), reference.size()),
            });
            return;
        }
        let scale = crate::util::max_abs(&reference).max(1.0);
        let diff = crate::util::max_abs(&(&ours - &reference));
        let denom = reference.abs().clamp_min(1e-12);
        let rel = if reference.numel() == 0 {
            0.0
        } else {
            crate::util::max_abs(&((&ours - &reference) / denom))
        };
        let tol = tol * scale;
        self.checks.push(Check {
            group,
            name: name.to_string(),
            max_abs: diff,
            max_rel: rel,
            tol,
            pass: diff <= tol && diff.is_finite(),
            note: String::new(),
        });
    }

    /// Like [`Report::tensor`] on the elements where `keep` is true; the note counts the rest.
    pub(crate) fn tensor_where(
        &mut self,
        group: &'static str,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        keep: &Tensor,
        tol: f64,
    ) {
        let left_out =
            keep.numel() as i64 - keep.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let ours = ours.detach().to_device(Device::Cpu);
        if ours.size() != reference.size() {
            return self.tensor(group, name, &ours, reference, tol);
        }
        self.tensor(
            group,
            name,
            &ours.masked_select(keep),
            &reference.masked_select(keep),
            tol,
        );
        if left_out > 0 {
            if let Some(c) = self.checks.last_mut() {
                c.note = format!("{left_out} ill-conditioned element(s) left out");
            }
        }
    }

    pub(crate) fn scalar(&mut self, group: &'static str, name: &str, ours: f64, reference: f64, tol: f64) {
        let diff = (ours - reference).abs();
        self.checks.push(Check {
            group,
            name: name.to_string(),
            max_abs: diff,
            max_rel: diff / reference.abs().max(1e-12),
            tol,
            pass: diff <= tol,
            note: format!("ours {ours}, reference {reference}"),
        });
    }

    pub(crate) fn fact(&mut self, group: &'static str, name: &str, pass: bool, note: String) {
        self.checks.push(Check {
            group,
            name: name.to_string(),
            max_abs: if pass { 0.0 } else { f64::INFINITY },
            max_rel: if pass { 0.0 } else { f64::INFINITY },
            tol: 0.0,
            pass,
            note,
        });
    }

    /// One line per group, then the failing checks.
    pub fn render(&self) -> String {
        let mut groups: BTreeMap<&str, (usize, f64, f64, bool, usize)> = BTreeMap::new();
        let mut order = Vec::new();
        for c in &self.checks {
            let e = groups.entry(c.group).or_insert_with(|| {
                order.push(c.group);
                (0, 0.0, 0.0, true, 0)
            });
            e.0 += 1;
            if c.max_abs.is_finite() {
                e.1 = e.1.max(c.max_abs);
                e.2 = e.2.max(c.max_rel);
            } else {
                e.1 = f64::INFINITY;
                e.2 = f64::INFINITY;
            }
            e.3 &= c.pass;
            e.4 += usize::from(!c.pass);
        }
        let mut s = format!(
            "{:<14} {:>6} {:>12} {:>12}  result\n",
            "group", "checks", "max |diff|", "max rel"
        );
        for g in order {
            let (n, a, r, ok, nf) = groups[g];
            let verdict = if ok {
                "PASS".to_string()
            } else {
                format!("FAIL ({nf} of {n})")
            };
            s += &format!("{g:<14} {n:>6} {a:>12.3e} {r:>12.3e}  {verdict}\n");
        }
        for c in self.failures() {
            s += &format!(
                "  FAIL {}/{}: max |diff| {:.3e} > tol {:.3e} {}\n",
                c.group, c.name, c.max_abs, c.tol, c.note
            );
        }
        s
    }
}

/// Typed access to `fixtures.json` with errors that name the missing key.
struct Json<'a>(&'a Value);

impl<'a> Json<'a> {
    fn get(&self, path: &str) -> Result<&'a Value> {
        let mut v = self.0;
        for k in path.split('.') {
            v = v
                .get(k)
                .ok_or_else(|| anyhow!("fixtures.json has no '{path}'"))?;
        }
        Ok(v)
    }
    fn f64(&self, path: &str) -> Result<f64> {
        self.get(path)?
            .as_f64()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not a number"))
    }
    fn i64(&self, path: &str) -> Result<i64> {
        self.get(path)?
            .as_i64()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not an integer"))
    }
    fn usize(&self, path: &str) -> Result<usize> {
        Ok(usize::try_from(self.i64(path)?)?)
    }
    fn bool(&self, path: &str) -> Result<bool> {
        self.get(path)?
            .as_bool()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not a boolean"))
    }
    fn str(&self, path: &str) -> Result<&'a str> {
        self.get(path)?
            .as_str()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not a string"))
    }
    fn i64s(&self, path: &str) -> Result<Vec<i64>> {
        self.get(path)?
            .as_array()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not a list"))?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| anyhow!("fixtures.json '{path}' holds a non-integer"))
            })
            .collect()
    }
    fn strings(&self, path: &str) -> Result<Vec<String>> {
        self.get(path)?
            .as_array()
            .ok_or_else(|| anyhow!("fixtures.json '{path}' is not a list"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow!("fixtures.json '{path}' holds a non-string"))
            })
            .collect()
    }
}

/// The fixture's backbone. ViT: `pos_rows` is the number of rows of the reference `pos_embed`
/// (it fixes the grid the table was built for). Swin: built for `config.backbone.img_size`
/// (224, as main_ibot builds it, when the fixture does not say).
fn backbone_from_json(j: &Json, pos_rows: Option<i64>) -> Result<BackboneConfig> {
    let arch = j.str("config.arch")?;
    let masked_im_modeling = j.bool("config.use_masked_im_modeling")?;
    match arch {
        "vit" => {
            let Some(pos_rows) = pos_rows else {
                bail!("the ViT fixture has no student.backbone.pos_embed")
            };
            let p = j.i64("config.backbone.patch_size")?;
            let grid = ((pos_rows - 1) as f64).sqrt().round() as i64;
            if grid * grid != pos_rows - 1 {
                bail!(
                    "reference pos_embed has {} patch rows, not a square grid",
                    pos_rows - 1
                );
            }
            Ok(BackboneConfig::Vit(VitConfig {
                img_size: grid * p,
                patch_size: p,
                in_chans: 3,
                embed_dim: j.i64("config.backbone.embed_dim")?,
                depth: j.i64("config.backbone.depth")?,
                num_heads: j.i64("config.backbone.num_heads")?,
                mlp_ratio: j.f64("config.backbone.mlp_ratio")?,
                qkv_bias: j.bool("config.backbone.qkv_bias")?,
                drop_path_rate: j.f64("config.backbone.drop_path_rate")?,
                masked_im_modeling,
            }))
        }
        "swin" => Ok(BackboneConfig::Swin(SwinConfig {
            img_size: j.i64("config.backbone.img_size").unwrap_or(224),
            patch_size: j.i64("config.backbone.patch_size")?,
            in_chans: 3,
            embed_dim: j.i64("config.backbone.embed_dim")?,
            depths: j.i64s("config.backbone.depths")?,
            num_heads: j.i64s("config.backbone.num_heads")?,
            window_size: j.i64("config.backbone.window_size")?,
            mlp_ratio: j.f64("config.backbone.mlp_ratio")?,
            qkv_bias: j.bool("config.backbone.qkv_bias")?,
            drop_path_rate: j.f64("config.backbone.drop_path_rate")?,
            masked_im_modeling,
        })),
        other => bail!("fixture architecture '{other}' is not supported (vit or swin)"),
    }
}

/// The fixture's configuration as an [`IbotConfig`] (see [`backbone_from_json`]).
fn config_from_json(j: &Json, pos_rows: Option<i64>) -> Result<IbotConfig> {
    let backbone = backbone_from_json(j, pos_rows)?;
    let norm = match j.get("config.head.norm")? {
        Value::Null => HeadNorm::None,
        Value::String(s) => s.parse()?,
        other => bail!("config.head.norm: unexpected {other}"),
    };
    let head = HeadConfig {
        in_dim: backbone.embed_dim(),
        out_dim: j.i64("config.head.out_dim")?,
        patch_out_dim: j.i64("config.head.patch_out_dim")?,
        hidden_dim: j.i64("config.head.hidden_dim")?,
        bottleneck_dim: j.i64("config.head.bottleneck_dim")?,
        nlayers: j.i64("config.head.nlayers")?,
        norm,
        act: j.str("config.head.act")?.parse::<HeadAct>()?,
        norm_last_layer: j.bool("config.head.norm_last_layer")?,
        shared_head: j.bool("config.head.shared_head")?,
    };
    let shared_head_teacher = j.bool("config.head.shared_head_teacher")?;
    let same_dim = head.shared_head || shared_head_teacher;
    let loss = IbotLossConfig {
        out_dim: head.out_dim,
        patch_out_dim: if same_dim {
            head.out_dim
        } else {
            head.patch_out_dim
        },
        ngcrops: j.usize("config.global_crops_number")?,
        nlcrops: j.usize("config.local_crops_number")?,
        warmup_teacher_temp: j.f64("config.warmup_teacher_temp")?,
        teacher_temp: j.f64("config.teacher_temp")?,
        warmup_teacher_temp2: j.f64("config.warmup_teacher_patch_temp")?,
        teacher_temp2: j.f64("config.teacher_patch_temp")?,
        warmup_teacher_temp_epochs: j.usize("config.warmup_teacher_temp_epochs")?,
        nepochs: j.usize("config.epochs")?,
        student_temp: j.f64("config.student_temp")?,
        center_momentum: j.f64("config.center_momentum")?,
        center_momentum2: j.f64("config.center_momentum2")?,
        lambda1: j.f64("config.lambda1")?,
        lambda2: j.f64("config.lambda2")?,
        mim_start_epoch: j.usize("config.pred_start_epoch")?,
    };
    Ok(IbotConfig {
        backbone,
        head,
        shared_head_teacher,
        loss,
        clip_grad: j.f64("config.clip_grad")?,
        freeze_last_layer: j.usize("config.freeze_last_layer")?,
        optimizer: OptimizerKind::Adamw,
    })
}

fn views(t: &Tensor) -> Vec<Tensor> {
    (0..t.size()[0]).map(|v| t.get(v)).collect()
}

/// Runs the whole comparison for one fixture directory: a one-step fixture
/// (`fixtures.json`) or a trajectory of the official training loop (`trajectory.json`, see
/// [`traj`]).
pub fn verify_fixture(dir: &Path) -> Result<Report> {
    if dir.join("trajectory.json").is_file() {
        return traj::verify_trajectory(dir, &|_| {});
    }
    let json_path = dir.join("fixtures.json");
    let raw = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let value: Value =
        serde_json::from_str(&raw).with_context(|| format!("parsing {}", json_path.display()))?;
    let j = Json(&value);
    let tensors = read_safetensors(&dir.join("fixtures.safetensors"))?;
    let t = |k: &str| -> Result<&Tensor> {
        tensors
            .get(k)
            .ok_or_else(|| anyhow!("fixtures.safetensors has no tensor '{k}'"))
    };

    let pos_rows = tensors
        .get("student.backbone.pos_embed")
        .map(|p| p.size()[1]);
    let cfg = config_from_json(&j, pos_rows)?;
    let epoch = j.usize("config.epoch")?;
    let device = Device::Cpu;
    let mut report = Report::default();

    let mut ibot = Ibot::new(cfg.clone(), device)?;

    // ---- structure: names, trainability, groups, teacher initialisation
    let ours_sd: Vec<String> = ibot
        .student_ps
        .state_dict()
        .map(|(k, _)| k.to_string())
        .collect();
    let ref_sd = j.strings("student_state_dict_keys")?;
    report.fact(
        "structure",
        "student state_dict keys",
        ours_sd == ref_sd,
        format!("ours {ours_sd:?}"),
    );
    let ours_np: Vec<String> = ibot
        .student_ps
        .params()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    report.fact(
        "structure",
        "student named_parameters",
        ours_np == j.strings("student_named_parameters")?,
        String::new(),
    );
    let ours_tr: Vec<String> = ibot
        .student_ps
        .params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.name.clone())
        .collect();
    report.fact(
        "structure",
        "student trainable",
        ours_tr == j.strings("student_trainable_parameters")?,
        String::new(),
    );
    let ours_tsd: Vec<String> = ibot
        .teacher_ps
        .state_dict()
        .map(|(k, _)| k.to_string())
        .collect();
    report.fact(
        "structure",
        "teacher state_dict keys",
        ours_tsd == j.strings("teacher_state_dict_keys")?,
        format!("ours {ours_tsd:?}"),
    );
    let ours_tnp: Vec<String> = ibot
        .teacher_ps
        .params()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    report.fact(
        "structure",
        "teacher named_parameters",
        ours_tnp == j.strings("teacher_named_parameters")?,
        String::new(),
    );
    let groups = get_params_groups(&ibot.student_ps);
    let names = |idx: &[usize]| -> Vec<String> {
        idx.iter()
            .map(|&i| ibot.student_ps.params()[i].name.clone())
            .collect()
    };
    report.fact(
        "structure",
        "param group 0 (decayed)",
        names(&groups.regularized) == j.strings("optim.group0_regularized")?,
        String::new(),
    );
    report.fact(
        "structure",
        "param group 1 (no decay)",
        names(&groups.not_regularized) == j.strings("optim.group1_not_regularized")?,
        String::new(),
    );

    // ---- official initial weights, teacher as load_state_dict(strict=False) leaves it
    let student_init: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("student.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    ibot.student_ps.load_strict(&student_init, "")?;
    ibot.init_teacher_from_student()?;
    let init_map = j
        .get("teacher_init_from_student")?
        .as_object()
        .ok_or_else(|| anyhow!("teacher_init_from_student is not a map"))?;
    let mut init_ok = init_map.len() == ours_tsd.len();
    for (tk, sk) in init_map {
        let sk = sk.as_str().unwrap_or_default();
        match (ibot.teacher_ps.get(tk), student_init.get(sk)) {
            (Some(a), Some(b)) => init_ok &= a.detach().equal(b),
            _ => init_ok = false,
        }
    }
    report.fact(
        "structure",
        "teacher init from student",
        init_ok,
        String::new(),
    );

    // ---- inputs
    let mut images = views(t("in.global_crops")?);
    if let Some(l) = tensors.get("in.local_crops") {
        images.extend(views(l));
    }
    let masks: Vec<Tensor> = views(t("in.masks_global")?)
        .into_iter()
        .map(|m| m.to_kind(Kind::Bool))
        .collect();
    ibot.loss.center = t("loss.center_init")?.shallow_clone();
    ibot.loss.center2 = t("loss.center2_init")?.shallow_clone();

    // ---- forward and loss
    let g = cfg.loss.ngcrops as i64;
    let fwd = ibot.forward(&images, &masks, epoch, true, &SingleProcess)?;
    report.tensor(
        "forward",
        "teacher_cls",
        &fwd.teacher.cls,
        t("out.teacher_cls")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "teacher_patch",
        fwd.teacher.patch.as_ref().unwrap_or(&Tensor::new()),
        t("out.teacher_patch")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "student_cls",
        &fwd.student.cls,
        t("out.student_cls")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "student_patch",
        fwd.student.patch.as_ref().unwrap_or(&Tensor::new()),
        t("out.student_patch")?,
        TOL_FORWARD,
    );
    if let (Some(local), Ok(r)) = (&fwd.student_local, t("out.student_local_cls")) {
        report.tensor("forward", "student_local_cls", &local.cls, r, TOL_FORWARD);
    }
    report.tensor(
        "forward",
        "student_backbone_masked",
        &fwd.student.backbone[0],
        t("out.student_backbone_masked")?,
        TOL_FORWARD,
    );
    let b = images[0].size()[0];
    report.tensor(
        "forward",
        "teacher_backbone_g0",
        &fwd.teacher.backbone[0].narrow(0, 0, b),
        t("out.teacher_backbone_g0")?,
        TOL_FORWARD,
    );
    // ViT: get_last_selfattention; Swin: get_selfattention (last block, per window).
    let attn = tch::no_grad(|| ibot.teacher.backbone.last_selfattention(&images[0]))?;
    report.tensor(
        "forward",
        "teacher_last_attn_g0",
        &attn,
        t("out.teacher_last_attn_g0")?,
        TOL_FORWARD,
    );
    for (key, idx) in [
        ("out.pos_embed_interp_global", 0usize),
        ("out.pos_embed_interp_local", g as usize),
    ] {
        if let (Some(r), Some(img)) = (tensors.get(key), images.get(idx)) {
            let s = img.size();
            let Some(vit) = ibot.teacher.backbone.as_vit() else {
                bail!("{key} is a ViT output but the backbone is not a ViT")
            };
            let p = vit.cfg.patch_size;
            let pe = vit.interpolate_pos_encoding(s[2] / p, s[3] / p)?;
            report.tensor(
                "pos_embed",
                key.trim_start_matches("out."),
                &pe,
                r,
                TOL_FORWARD,
            );
        }
    }
    report.tensor("loss", "cls", &fwd.loss.cls, t("loss.cls")?, TOL_FORWARD);
    report.tensor(
        "loss",
        "patch",
        &fwd.loss.patch,
        t("loss.patch")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "total",
        &fwd.loss.total,
        t("loss.total")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "center_after",
        &ibot.loss.center,
        t("loss.center_after")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "center2_after",
        &ibot.loss.center2,
        t("loss.center2_after")?,
        TOL_FORWARD,
    );

    // ---- the training path (`forward_train`: the student's patch head on masked tokens only,
    // local views' [CLS] only) must give the same loss, centres and gradients.
    let centres = (
        ibot.loss.center.shallow_clone(),
        ibot.loss.center2.shallow_clone(),
    );
    ibot.loss.center = t("loss.center_init")?.shallow_clone();
    ibot.loss.center2 = t("loss.center2_init")?.shallow_clone();
    let lean = ibot.forward_train(&images, &masks, epoch, &SingleProcess)?;
    for (name, ours, key) in [
        ("cls", &lean.loss.cls, "loss.cls"),
        ("patch", &lean.loss.patch, "loss.patch"),
        ("total", &lean.loss.total, "loss.total"),
        ("center_after", &ibot.loss.center, "loss.center_after"),
        ("center2_after", &ibot.loss.center2, "loss.center2_after"),
    ] {
        report.tensor("train_path", name, ours, t(key)?, TOL_FORWARD);
    }
    let mut lean_grads = ibot.backward(&lean.loss.total);
    ibot.loss.center = centres.0;
    ibot.loss.center2 = centres.1;

    // ---- backward, clipping, cancelling
    let mut grads = ibot.backward(&fwd.loss.total);
    let norms = ibot.process_grads(&mut grads, epoch);
    ibot.process_grads(&mut lean_grads, epoch);
    for ((p, full), lean) in ibot.student_ps.params().iter().zip(&grads).zip(&lean_grads) {
        match (full, lean) {
            (Some(f), Some(l)) => {
                report.tensor("train_path", &format!("grad.{}", p.name), l, f, TOL_GRAD)
            }
            (None, None) => {}
            _ => report.fact(
                "train_path",
                &format!("grad.{}", p.name),
                false,
                "a gradient on one path only".into(),
            ),
        }
    }
    let ref_norms = j
        .get("grad.preclip_norms")?
        .as_object()
        .ok_or_else(|| anyhow!("grad.preclip_norms is not a map"))?;
    let ours_norms: Vec<(&str, f64)> = ibot
        .student_ps
        .params()
        .iter()
        .zip(norms.iter())
        .filter_map(|(p, n)| n.map(|n| (p.name.as_str(), n)))
        .collect();
    report.fact(
        "grad",
        "pre-clip norm count",
        ours_norms.len() == ref_norms.len(),
        format!("{} norms, reference {}", ours_norms.len(), ref_norms.len()),
    );
    for (name, n) in ours_norms {
        match ref_norms.get(name).and_then(Value::as_f64) {
            Some(r) => report.scalar("grad_norm", name, n, r, TOL_GRAD * r.abs().max(1.0)),
            None => report.fact("grad_norm", name, false, "no reference norm".into()),
        }
    }
    let ref_none = j.strings("grad.grad_none")?;
    let ours_none: Vec<String> = ibot
        .student_ps
        .params()
        .iter()
        .zip(grads.iter())
        .filter(|(_, g)| g.is_none())
        .map(|(p, _)| p.name.clone())
        .collect();
    report.fact(
        "grad",
        "params without grad",
        ours_none == ref_none,
        format!("ours {ours_none:?}, reference {ref_none:?}"),
    );
    for (p, gr) in ibot.student_ps.params().iter().zip(grads.iter()) {
        if let (Some(gr), Some(r)) = (gr, tensors.get(&format!("grad.{}", p.name))) {
            report.tensor("grad", &p.name, gr, r, TOL_GRAD);
        }
    }

    // ---- one optimizer step. First on the REFERENCE gradients (isolates the optimizer), then,
    // from the same initial weights, on our own gradients (the whole chain).
    let lr = j.f64("config.lr")?;
    let wd = j.f64("config.weight_decay")?;
    let ref_grads: Vec<Option<Tensor>> = ibot
        .student_ps
        .params()
        .iter()
        .map(|p| {
            tensors
                .get(&format!("grad.{}", p.name))
                .map(|g| g.shallow_clone())
        })
        .collect();
    ibot.optimizer = Optimizer::new(cfg.optimizer, &ibot.student_ps);
    ibot.optimizer.step(&ibot.student_ps, &ref_grads, lr, wd)?;
    for (k, v) in ibot.student_ps.state_dict() {
        match tensors.get(&format!("student_after.{k}")) {
            Some(r) => report.tensor("optim_step", k, v, r, TOL_GRAD),
            None => report.fact("optim_step", k, false, "no reference tensor".into()),
        }
    }
    // Adam's first update is lr·g/(|g|+eps): where the true gradient is zero (e.g. the key bias
    // of attention, to which softmax is invariant) float noise of ~1e-9 in g becomes an update
    // of up to lr. Those elements (|g_ref| < 1e-6·max(1, max|g_ref|)) are ill-conditioned and
    // left out of the end-to-end comparison; the optimizer itself is checked above.
    ibot.student_ps.load_strict(&student_init, "")?;
    ibot.optimizer = Optimizer::new(cfg.optimizer, &ibot.student_ps);
    ibot.optimizer.step(&ibot.student_ps, &grads, lr, wd)?;
    for (p, rg) in ibot.student_ps.params().iter().zip(ref_grads.iter()) {
        let Some(r) = tensors.get(&format!("student_after.{}", p.name)) else {
            continue;
        };
        let keep = match rg {
            Some(g) => {
                let g = g.abs();
                let floor = 1e-6 * crate::util::max_abs(&g).max(1.0);
                g.ge(floor)
            }
            None => r.ones_like().to_kind(Kind::Bool),
        };
        report.tensor_where("step_e2e", &p.name, &p.tensor, r, &keep, TOL_GRAD);
    }
    ibot.update_teacher(j.f64("config.momentum_teacher")?);
    for (k, v) in ibot.teacher_ps.state_dict() {
        match tensors.get(&format!("teacher_after.{k}")) {
            Some(r) => report.tensor("ema", k, v, r, TOL_GRAD),
            None => report.fact("ema", k, false, "no reference tensor".into()),
        }
    }

    // ---- schedules
    for key in ["lr", "wd", "momentum"] {
        let base = format!("config.sched.{key}");
        let s = cosine_scheduler(
            j.f64(&format!("{base}.base_value"))?,
            j.f64(&format!("{base}.final_value"))?,
            j.usize(&format!("{base}.epochs"))?,
            j.usize(&format!("{base}.niter_per_ep"))?,
            j.usize(&format!("{base}.warmup_epochs"))?,
            0.0,
        )?;
        report.tensor(
            "schedules",
            key,
            &Tensor::from_slice(&s),
            t(&format!("sched.{key}"))?,
            TOL_SCHED,
        );
    }
    let (t1, t2) = teacher_temp_schedules(&cfg.loss)?;
    report.tensor(
        "schedules",
        "teacher_temp",
        &Tensor::from_slice(&t1),
        t("sched.teacher_temp")?,
        TOL_SCHED,
    );
    report.tensor(
        "schedules",
        "teacher_temp2",
        &Tensor::from_slice(&t2),
        t("sched.teacher_temp2")?,
        TOL_SCHED,
    );
    let variant = IbotLossConfig {
        mim_start_epoch: j.usize("config.sched.mim_start_epoch_variant")?,
        ..cfg.loss.clone()
    };
    let (v1, v2) = teacher_temp_schedules(&variant)?;
    report.tensor(
        "schedules",
        "teacher_temp_mim_start",
        &Tensor::from_slice(&v1),
        t("sched.teacher_temp_mim_start")?,
        TOL_SCHED,
    );
    report.tensor(
        "schedules",
        "teacher_temp2_mim_start",
        &Tensor::from_slice(&v2),
        t("sched.teacher_temp2_mim_start")?,
        TOL_SCHED,
    );

    // ---- k-NN
    let knn = knn_classifier(
        t("knn.train_features")?,
        t("knn.train_labels")?,
        t("knn.test_features")?,
        t("knn.test_labels")?,
        j.i64("knn.k")?,
        j.f64("knn.T")?,
        j.i64("knn.num_classes")?,
    )?;
    report.scalar("knn", "top1", knn.top1, j.f64("knn.top1")?, 0.0);
    report.scalar("knn", "top5", knn.top5, j.f64("knn.top5")?, 0.0);
    Ok(report)
}
