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
//! * gradients: 1e-4
//! * schedules (f64): 1e-12; k-NN accuracies: exact.
//!
//! The optimizer step and the EMA move a tensor by ~1e-4 (Adam's first step, about lr) and
//! ~1e-6 (one EMA step; weight decay's share of the step), far below any useful bound on the
//! tensor itself, so they are compared as UPDATES (after − before) against the reference's
//! updates, relative to the update's own scale ([`Report::update`]): [`TOL_STEP_UPDATE`] for the
//! optimizer on the reference gradients and for the EMA towards the reference's updated
//! student, [`TOL_E2E_UPDATE`] for the whole step on our own gradients. The optimizer and EMA
//! are parameters ([`Steps`], [`verify_one_step_with`]) so that tests can show a wrong one fails.
//!
//! A tensor or key the configuration needs that the fixture lacks is a failed check, never a
//! skip, and a fixture tensor that no check looked at fails the `coverage` check.

pub mod traj;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::eval::knn::knn_classifier;
use crate::loss::{teacher_temp_schedules, IbotLossConfig, SingleProcess};
use crate::models::{BackboneConfig, HeadAct, HeadConfig, HeadNorm, SwinConfig, VitConfig};
use crate::params::{read_safetensors, ParamStore};
use crate::schedule::cosine_scheduler;
use crate::train::optim::{get_params_groups, Optimizer, OptimizerKind};
use crate::train::{ema_pairs, ema_update, Ibot, IbotConfig, StepForward};

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

    /// Compares an UPDATE rather than a state: `ours − start` against `reference − start`,
    /// relative to the reference update's own scale (`max|reference − start|`), so that `tol`
    /// bounds the error as a fraction of the update however small the update is (one EMA step
    /// or a weight-decay term moves a tensor by ~1e-6, far below any useful bound on the
    /// tensor itself), and never tighter than 4 float32 units in the last place of the tensor's
    /// values (the resolution of a difference of two float32 states). `keep` restricts the
    /// comparison to some elements; the note counts the others as `left_out` says.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        group: &'static str,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        start: &Tensor,
        keep: Option<&Tensor>,
        tol: f64,
        left_out: &str,
    ) {
        let ours = ours.detach().to_device(Device::Cpu).to_kind(Kind::Double);
        let reference = reference.to_kind(Kind::Double);
        let start = start.detach().to_device(Device::Cpu).to_kind(Kind::Double);
        if ours.size() != reference.size() || start.size() != reference.size() {
            return self.tensor(group, name, &ours, &reference, tol);
        }
        let (mut du, mut dr) = (&ours - &start, &reference - &start);
        if let Some(k) = keep {
            if du.size() == k.size() {
                du = du.masked_select(k);
                dr = dr.masked_select(k);
            }
        }
        let scale = crate::util::max_abs(&dr).max(1e-30);
        // The update is the difference of two float32 states: it cannot be known better than a
        // few of their units in the last place, which for a small update of a large value (one
        // EMA step of a LayerNorm weight near 1) is a visible fraction of it.
        let resolution = 4.0 * f64::from(f32::EPSILON) * crate::util::max_abs(&reference) / scale;
        // Report::tensor scales its tolerance by max(1, scale): normalise first so that the bound
        // is relative to the update.
        self.tensor(
            group,
            name,
            &(du / scale),
            &(dr / scale),
            tol.max(resolution),
        );
        if let (Some(k), Some(c)) = (keep, self.checks.last_mut()) {
            let left = k.numel() as i64 - k.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
            if left > 0 {
                c.note = format!("{left} {left_out}");
            }
        }
    }

    pub(crate) fn scalar(
        &mut self,
        group: &'static str,
        name: &str,
        ours: f64,
        reference: f64,
        tol: f64,
    ) {
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

/// The optimizer step and the teacher EMA that [`verify_one_step_with`] runs and compares with
/// the reference's. They are parameters so that a test can hand in a deliberately wrong one
/// (another eps, no bias correction, decay on the wrong group, other EMA pairs) and see the
/// comparison fail; [`Steps::ours`] holds the ones `ibot train` uses.
pub struct Steps<'a> {
    /// One step from a fresh optimizer state: (student, gradients by parameter, lr for both
    /// groups, weight decay for group 0).
    pub optimizer: &'a dyn Fn(&ParamStore, &[Option<Tensor>], f64, f64) -> Result<()>,
    /// The teacher EMA: (teacher, student, momentum).
    pub ema: &'a dyn Fn(&ParamStore, &ParamStore, f64),
}

fn our_adamw(ps: &ParamStore, grads: &[Option<Tensor>], lr: f64, wd: f64) -> Result<()> {
    Optimizer::new(OptimizerKind::Adamw, ps).step(ps, grads, lr, wd)
}

impl Steps<'static> {
    /// The AdamW step and EMA of training.
    pub fn ours() -> Self {
        Self {
            optimizer: &our_adamw,
            ema: &ema_update,
        }
    }
}

/// Optimizer step and EMA, compared as updates (after − before) relative to the reference
/// update's scale. Measured: the EMA is bit-identical, the AdamW step on the reference gradients
/// within 1.5e-5 of its update (a float32 unit in the last place of the updated weights).
pub const TOL_STEP_UPDATE: f64 = 1e-4;
/// The end-to-end step (our own gradients), as an update relative to its scale.
pub const TOL_E2E_UPDATE: f64 = 2e-3;
/// At most this fraction of the gradient elements, besides the attention key biases (whose
/// gradient is zero in exact arithmetic), may be left out of the end-to-end step as
/// ill-conditioned (reference gradient below 1e-6 of its tensor's scale); more is a failure.
pub const MAX_LEFT_OUT: f64 = 5e-3;

/// Runs the whole comparison for one fixture directory: a one-step fixture
/// (`fixtures.json`) or a trajectory of the official training loop (`trajectory.json`, see
/// [`traj`]).
pub fn verify_fixture(dir: &Path) -> Result<Report> {
    if dir.join("trajectory.json").is_file() {
        return traj::verify_trajectory(dir, &|_| {});
    }
    verify_one_step_with(dir, &Steps::ours())
}

/// `ibot verify-fixture`: runs [`verify_fixture`] on `dir` and prints the report, one line per
/// group and a verdict; `Ok(false)` on any mismatch.
pub fn run(dir: &Path) -> Result<bool> {
    let report = verify_fixture(dir).with_context(|| format!("verifying {}", dir.display()))?;
    print!("{}", report.render());
    let ok = report.passed();
    println!(
        "{}",
        if ok {
            "all checks passed"
        } else {
            "MISMATCH against the reference"
        }
    );
    Ok(ok)
}

/// The one-step fixture comparison with the given optimizer step and EMA (see [`Steps`]).
/// A tensor or key the configuration needs that the fixture lacks is a failed check, and so is
/// a fixture tensor that nothing compared.
pub fn verify_one_step_with(dir: &Path, steps: &Steps) -> Result<Report> {
    let fx = Fixture::open(dir)?;
    let j = fx.json();
    let pos_rows = fx.opt("student.backbone.pos_embed").map(|p| p.size()[1]);
    let cfg = config_from_json(&j, pos_rows)?;
    let epoch = j.usize("config.epoch")?;
    let mut report = Report::default();
    let mut ibot = Ibot::new(cfg.clone(), Device::Cpu)?;
    let ours_tsd = check_structure(&fx, &ibot, &mut report)?;
    let student_init = load_initial_weights(&fx, &mut ibot, &ours_tsd, &mut report)?;
    let (images, masks) = inputs(&fx, &mut ibot, &mut report)?;
    let fwd = check_forward_and_loss(&fx, &mut ibot, &images, &masks, epoch, &mut report)?;
    let lean_grads = check_training_path(&fx, &mut ibot, &images, &masks, epoch, &mut report)?;
    let grads = check_gradients(&fx, &ibot, &fwd, lean_grads, epoch, &mut report)?;
    let (ref_grads, student_after_ref) =
        check_optimizer_step(&fx, &ibot, steps, &student_init, &mut report)?;
    check_ema(&fx, &ibot, steps, &student_after_ref, &mut report)?;
    check_end_to_end_step(
        &fx,
        &ibot,
        steps,
        (&grads, &ref_grads),
        (&student_init, &student_after_ref),
        &mut report,
    )?;
    check_schedules(&fx, &cfg, &mut report)?;
    check_knn(&fx, &mut report)?;
    check_coverage(&fx, &mut report);
    Ok(report)
}

/// A one-step fixture: `fixtures.json`, `fixtures.safetensors`, and the tensors looked up so
/// far (to find at the end the fixture tensors nothing compared).
struct Fixture {
    value: Value,
    tensors: HashMap<String, Tensor>,
    used: RefCell<HashSet<String>>,
}

impl Fixture {
    fn open(dir: &Path) -> Result<Self> {
        let json_path = dir.join("fixtures.json");
        let raw = std::fs::read_to_string(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        let value: Value = serde_json::from_str(&raw)
            .with_context(|| format!("parsing {}", json_path.display()))?;
        let tensors = read_safetensors(&dir.join("fixtures.safetensors"))?;
        Ok(Self {
            value,
            tensors,
            used: RefCell::default(),
        })
    }

    fn json(&self) -> Json<'_> {
        Json(&self.value)
    }

    /// The tensor `k`, if the fixture has it (marked as looked at either way).
    fn opt(&self, k: &str) -> Option<&Tensor> {
        self.used.borrow_mut().insert(k.to_string());
        self.tensors.get(k)
    }

    /// The tensor `k`, which the fixture must have.
    fn t(&self, k: &str) -> Result<&Tensor> {
        self.opt(k)
            .ok_or_else(|| anyhow!("fixtures.safetensors has no tensor '{k}'"))
    }
}

/// Names, trainability, parameter groups and EMA pairs against the official model's; returns
/// the teacher's state-dict keys.
fn check_structure(fx: &Fixture, ibot: &Ibot, report: &mut Report) -> Result<Vec<String>> {
    let j = fx.json();
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
    let mut ours_pairs: Vec<(String, String)> = ema_pairs(&ibot.teacher_ps, &ibot.student_ps)
        .into_iter()
        .map(|(tp, sp)| (tp.name.clone(), sp.name.clone()))
        .collect();
    let mut ref_pairs: Vec<(String, String)> = j
        .get("ema_pairs")?
        .as_array()
        .ok_or_else(|| anyhow!("fixtures.json 'ema_pairs' is not a list"))?
        .iter()
        .map(|p| match p.as_array().map(|v| v.as_slice()) {
            Some([Value::String(a), Value::String(b)]) => Ok((a.clone(), b.clone())),
            _ => Err(anyhow!(
                "fixtures.json 'ema_pairs' holds {p}, not a name pair"
            )),
        })
        .collect::<Result<_>>()?;
    // The official pairs come from a set intersection: their order means nothing.
    ours_pairs.sort();
    ref_pairs.sort();
    report.fact(
        "structure",
        "EMA pairs",
        ours_pairs == ref_pairs,
        format!("ours {ours_pairs:?}"),
    );

    Ok(ours_tsd)
}

/// Loads the official initial student, initialises the teacher from it as
/// `load_state_dict(strict=False)` does and checks what that left; returns the initial student.
fn load_initial_weights(
    fx: &Fixture,
    ibot: &mut Ibot,
    ours_tsd: &[String],
    report: &mut Report,
) -> Result<HashMap<String, Tensor>> {
    let j = fx.json();
    let student_init: HashMap<String, Tensor> = fx
        .tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("student.").map(|n| {
                fx.used.borrow_mut().insert(k.clone());
                (n.to_string(), v.shallow_clone())
            })
        })
        .collect();
    ibot.student_ps.load_strict(&student_init, "")?;
    let (mut missing, mut unexpected) = ibot.init_teacher_from_student()?;
    for (what, ours, key) in [
        (
            "missing",
            &mut missing,
            "teacher_load_state_dict.missing_keys",
        ),
        (
            "unexpected",
            &mut unexpected,
            "teacher_load_state_dict.unexpected_keys",
        ),
    ] {
        let mut reference = j.strings(key)?;
        reference.sort();
        ours.sort();
        report.fact(
            "structure",
            &format!("teacher load_state_dict {what} keys"),
            *ours == reference,
            format!("ours {ours:?}, reference {reference:?}"),
        );
    }
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

    Ok(student_init)
}

/// The fixture's views and masks, and the centres it starts from.
fn inputs(
    fx: &Fixture,
    ibot: &mut Ibot,
    report: &mut Report,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let nlocal = ibot.cfg.loss.nlcrops;
    let mut images = views(fx.t("in.global_crops")?);
    if nlocal > 0 {
        images.extend(views(fx.t("in.local_crops")?));
    } else if fx.opt("in.local_crops").is_some() {
        report.fact(
            "structure",
            "local crops",
            false,
            "the fixture has local crops, its configuration none".into(),
        );
    }
    let _ = fx.opt("in.masks_local_unused"); // documented as produced and never used
    let masks: Vec<Tensor> = views(fx.t("in.masks_global")?)
        .into_iter()
        .map(|m| m.to_kind(Kind::Bool))
        .collect();
    ibot.loss.center = fx.t("loss.center_init")?.shallow_clone();
    ibot.loss.center2 = fx.t("loss.center2_init")?.shallow_clone();

    Ok((images, masks))
}

/// The full forward pass (teacher, student, local views, attention, position embeddings) and
/// the loss with its centres.
fn check_forward_and_loss(
    fx: &Fixture,
    ibot: &mut Ibot,
    images: &[Tensor],
    masks: &[Tensor],
    epoch: usize,
    report: &mut Report,
) -> Result<StepForward> {
    let j = fx.json();
    let (g, nlocal) = (ibot.cfg.loss.ngcrops, ibot.cfg.loss.nlcrops);
    let fwd = ibot.forward(images, masks, epoch, true, &SingleProcess)?;
    report.tensor(
        "forward",
        "teacher_cls",
        &fwd.teacher.cls,
        fx.t("out.teacher_cls")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "teacher_patch",
        fwd.teacher.patch.as_ref().unwrap_or(&Tensor::new()),
        fx.t("out.teacher_patch")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "student_cls",
        &fwd.student.cls,
        fx.t("out.student_cls")?,
        TOL_FORWARD,
    );
    report.tensor(
        "forward",
        "student_patch",
        fwd.student.patch.as_ref().unwrap_or(&Tensor::new()),
        fx.t("out.student_patch")?,
        TOL_FORWARD,
    );
    match (
        &fwd.student_local,
        fx.opt("out.student_local_cls"),
        nlocal > 0,
    ) {
        (Some(local), Some(r), true) => {
            report.tensor("forward", "student_local_cls", &local.cls, r, TOL_FORWARD)
        }
        (None, None, false) => {}
        (ours, r, _) => report.fact(
            "forward",
            "student_local_cls",
            false,
            format!(
                "{nlocal} local crop(s) configured; local output here: {}, in the fixture: {}",
                ours.is_some(),
                r.is_some()
            ),
        ),
    }
    report.tensor(
        "forward",
        "student_backbone_masked",
        &fwd.student.backbone[0],
        fx.t("out.student_backbone_masked")?,
        TOL_FORWARD,
    );
    let b = images[0].size()[0];
    report.tensor(
        "forward",
        "teacher_backbone_g0",
        &fwd.teacher.backbone[0].narrow(0, 0, b),
        fx.t("out.teacher_backbone_g0")?,
        TOL_FORWARD,
    );
    // ViT: get_last_selfattention; Swin: get_selfattention (last block, per window).
    let attn = tch::no_grad(|| ibot.teacher.backbone.last_selfattention(&images[0]))?;
    report.tensor(
        "forward",
        "teacher_last_attn_g0",
        &attn,
        fx.t("out.teacher_last_attn_g0")?,
        TOL_FORWARD,
    );
    // ViT: the interpolated position embeddings of a global and (with local crops) a local
    // view; a Swin has none, so the fixture must have none either.
    for (key, idx) in [
        ("out.pos_embed_interp_global", Some(0usize)),
        ("out.pos_embed_interp_local", (nlocal > 0).then_some(g)),
    ] {
        let name = key.trim_start_matches("out.");
        match (fx.opt(key), ibot.teacher.backbone.as_vit(), idx) {
            (Some(r), Some(vit), Some(idx)) => {
                let s = images[idx].size();
                let p = vit.cfg.patch_size;
                let pe = vit.interpolate_pos_encoding(s[2] / p, s[3] / p)?;
                report.tensor("pos_embed", name, &pe, r, TOL_FORWARD);
            }
            (None, None, _) | (None, Some(_), None) => {}
            (r, vit, _) => report.fact(
                "pos_embed",
                name,
                false,
                format!(
                    "in the fixture: {}, ViT: {}, view configured: {}",
                    r.is_some(),
                    vit.is_some(),
                    idx.is_some()
                ),
            ),
        }
    }
    report.scalar(
        "loss",
        "teacher_temp at the epoch",
        ibot.loss.teacher_temp_schedule[epoch],
        j.f64("loss_temps_at_epoch.teacher_temp")?,
        TOL_SCHED,
    );
    report.scalar(
        "loss",
        "teacher_temp2 at the epoch",
        ibot.loss.teacher_temp2_schedule[epoch],
        j.f64("loss_temps_at_epoch.teacher_temp2")?,
        TOL_SCHED,
    );
    report.tensor("loss", "cls", &fwd.loss.cls, fx.t("loss.cls")?, TOL_FORWARD);
    report.tensor(
        "loss",
        "patch",
        &fwd.loss.patch,
        fx.t("loss.patch")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "total",
        &fwd.loss.total,
        fx.t("loss.total")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "center_after",
        &ibot.loss.center,
        fx.t("loss.center_after")?,
        TOL_FORWARD,
    );
    report.tensor(
        "loss",
        "center2_after",
        &ibot.loss.center2,
        fx.t("loss.center2_after")?,
        TOL_FORWARD,
    );

    Ok(fwd)
}

/// The training path (`forward_train`: the student's patch head on masked tokens only, local
/// views' [CLS] only, the teacher's patch last layer only at the masked positions and on each
/// sample's mean bottleneck output for the centre) must give the official teacher [CLS]
/// outputs, loss and centres, and the full forward's gradients (checked by hand on
/// visible_vit: the teacher's patch rows taken from the other view fail `patch`, `total` and
/// the gradients; the centre's token mean over the [CLS] token too fails `center2_after`);
/// returns its gradients (the centres are left as the full forward left them).
fn check_training_path(
    fx: &Fixture,
    ibot: &mut Ibot,
    images: &[Tensor],
    masks: &[Tensor],
    epoch: usize,
    report: &mut Report,
) -> Result<Vec<Option<Tensor>>> {
    let centres = (
        ibot.loss.center.shallow_clone(),
        ibot.loss.center2.shallow_clone(),
    );
    ibot.loss.center = fx.t("loss.center_init")?.shallow_clone();
    ibot.loss.center2 = fx.t("loss.center2_init")?.shallow_clone();
    let lean = ibot.forward_train(images, masks, epoch, &SingleProcess)?;
    for (name, ours, key) in [
        ("teacher_cls", &lean.teacher.cls, "out.teacher_cls"),
        ("cls", &lean.loss.cls, "loss.cls"),
        ("patch", &lean.loss.patch, "loss.patch"),
        ("total", &lean.loss.total, "loss.total"),
        ("center_after", &ibot.loss.center, "loss.center_after"),
        ("center2_after", &ibot.loss.center2, "loss.center2_after"),
    ] {
        report.tensor("train_path", name, ours, fx.t(key)?, TOL_FORWARD);
    }
    let lean_grads = ibot.backward(&lean.loss.total);
    ibot.loss.center = centres.0;
    ibot.loss.center2 = centres.1;

    Ok(lean_grads)
}

/// Backward, clipping and cancelling: the gradients, the norms `clip_gradients` saw and
/// returned, which were clipped and which parameters have none; the training path's gradients
/// against the full forward's. Returns the full forward's processed gradients.
fn check_gradients(
    fx: &Fixture,
    ibot: &Ibot,
    fwd: &StepForward,
    mut lean_grads: Vec<Option<Tensor>>,
    epoch: usize,
    report: &mut Report,
) -> Result<Vec<Option<Tensor>>> {
    let j = fx.json();
    let mut grads = ibot.backward(&fwd.loss.total);
    let clips = ibot.process_grads(&mut grads, epoch);
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
    let ref_clipped = j
        .get("grad.clipped")?
        .as_object()
        .ok_or_else(|| anyhow!("grad.clipped is not a map"))?;
    let ours_clips: Vec<(&str, crate::train::GradClip)> = ibot
        .student_ps
        .params()
        .iter()
        .zip(clips.iter())
        .filter_map(|(p, c)| c.map(|c| (p.name.as_str(), c)))
        .collect();
    report.fact(
        "grad",
        "pre-clip norm count",
        ours_clips.len() == ref_norms.len() && ours_clips.len() == ref_clipped.len(),
        format!(
            "{} norms, reference {} norms and {} clip decisions",
            ours_clips.len(),
            ref_norms.len(),
            ref_clipped.len()
        ),
    );
    // What `clip_gradients` returned: the norms in parameter order.
    let ref_returned: Vec<f64> = j
        .get("grad.clip_gradients_returned_norms")?
        .as_array()
        .ok_or_else(|| anyhow!("grad.clip_gradients_returned_norms is not a list"))?
        .iter()
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| anyhow!("grad.clip_gradients_returned_norms holds {v}"))
        })
        .collect::<Result<_>>()?;
    let ours_returned: Vec<f64> = ours_clips.iter().map(|(_, c)| c.norm).collect();
    report.tensor(
        "grad_norm",
        "clip_gradients returned norms",
        &Tensor::from_slice(&ours_returned),
        &Tensor::from_slice(&ref_returned),
        TOL_GRAD,
    );
    let mut n_clipped = 0usize;
    for (name, c) in &ours_clips {
        match ref_norms.get(*name).and_then(Value::as_f64) {
            Some(r) => report.scalar("grad_norm", name, c.norm, r, TOL_GRAD * r.abs().max(1.0)),
            None => report.fact("grad_norm", name, false, "no reference norm".into()),
        }
        n_clipped += usize::from(c.clipped);
        let r = ref_clipped.get(*name).and_then(Value::as_bool);
        report.fact(
            "grad_clipped",
            name,
            r == Some(c.clipped),
            format!("clipped here: {}, in the reference: {r:?}", c.clipped),
        );
    }
    report.fact(
        "grad_clipped",
        "number clipped",
        Some(n_clipped as i64) == j.get("grad.n_clipped")?.as_i64(),
        format!("{n_clipped} clipped here"),
    );
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
    report.fact(
        "grad",
        "last layer cancelled",
        Some(ours_none.iter().any(|n| n.contains("last_layer")))
            == j.get("grad.last_layer_cancelled")?.as_bool(),
        String::new(),
    );
    for (p, gr) in ibot.student_ps.params().iter().zip(grads.iter()) {
        let key = format!("grad.{}", p.name);
        match (gr, fx.opt(&key)) {
            (Some(gr), Some(r)) => report.tensor("grad", &p.name, gr, r, TOL_GRAD),
            (None, None) => {}
            (gr, r) => report.fact(
                "grad",
                &p.name,
                false,
                format!(
                    "gradient here: {}, in the fixture: {}",
                    gr.is_some(),
                    r.is_some()
                ),
            ),
        }
    }

    Ok(grads)
}

/// Reference gradients and the student after the reference step, by name.
type RefStep = (Vec<Option<Tensor>>, HashMap<String, Tensor>);

/// One optimizer step on the REFERENCE gradients (isolates the optimizer), compared as the
/// update of every tensor; returns the reference gradients and the reference student after it.
fn check_optimizer_step(
    fx: &Fixture,
    ibot: &Ibot,
    steps: &Steps,
    student_init: &HashMap<String, Tensor>,
    report: &mut Report,
) -> Result<RefStep> {
    let j = fx.json();
    let (lr, wd) = (j.f64("config.lr")?, j.f64("config.weight_decay")?);
    let ref_grads: Vec<Option<Tensor>> = ibot
        .student_ps
        .params()
        .iter()
        .map(|p| {
            fx.opt(&format!("grad.{}", p.name))
                .map(|g| g.shallow_clone())
        })
        .collect();
    (steps.optimizer)(&ibot.student_ps, &ref_grads, lr, wd)?;
    let mut student_after_ref = HashMap::new();
    for (k, v) in ibot.student_ps.state_dict() {
        match (fx.opt(&format!("student_after.{k}")), student_init.get(k)) {
            (Some(r), Some(start)) => {
                report.update("optim_step", k, v, r, start, None, TOL_STEP_UPDATE, "");
                student_after_ref.insert(k.to_string(), r.shallow_clone());
            }
            _ => report.fact("optim_step", k, false, "no reference tensor".into()),
        }
    }

    Ok((ref_grads, student_after_ref))
}

/// The EMA, from the teacher's initial state towards the student as the reference's step left
/// it (isolates the EMA), compared as the teacher's update.
fn check_ema(
    fx: &Fixture,
    ibot: &Ibot,
    steps: &Steps,
    student_after_ref: &HashMap<String, Tensor>,
    report: &mut Report,
) -> Result<()> {
    let j = fx.json();
    let teacher_before: HashMap<String, Tensor> = ibot
        .teacher_ps
        .state_dict()
        .map(|(k, v)| (k.to_string(), v.detach().copy()))
        .collect();
    let momentum = j.f64("config.momentum_teacher")?;
    if student_after_ref.len() == ibot.student_ps.state_dict().count() {
        ibot.student_ps.load_strict(student_after_ref, "")?;
        (steps.ema)(&ibot.teacher_ps, &ibot.student_ps, momentum);
    }
    for (k, v) in ibot.teacher_ps.state_dict() {
        match fx.opt(&format!("teacher_after.{k}")) {
            Some(r) => report.update(
                "ema",
                k,
                v,
                r,
                &teacher_before[k],
                None,
                TOL_STEP_UPDATE,
                "",
            ),
            None => report.fact("ema", k, false, "no reference tensor".into()),
        }
    }

    Ok(())
}

/// The whole chain: from the same initial weights, one step on our own gradients.
fn check_end_to_end_step(
    fx: &Fixture,
    ibot: &Ibot,
    steps: &Steps,
    (grads, ref_grads): (&[Option<Tensor>], &[Option<Tensor>]),
    (student_init, student_after_ref): (&HashMap<String, Tensor>, &HashMap<String, Tensor>),
    report: &mut Report,
) -> Result<()> {
    let j = fx.json();
    let (lr, wd) = (j.f64("config.lr")?, j.f64("config.weight_decay")?);
    // Adam's first update is lr·g/(|g|+eps): where the true gradient is zero (e.g. the key bias
    // of attention, to which softmax is invariant) float noise of ~1e-9 in g becomes an update
    // of up to lr. Those elements (|g_ref| < 1e-6·max(1, max|g_ref|)) are ill-conditioned and
    // left out, up to MAX_LEFT_OUT of all gradient elements; the optimizer itself is checked
    // above on every element.
    ibot.student_ps.load_strict(student_init, "")?;
    (steps.optimizer)(&ibot.student_ps, grads, lr, wd)?;
    // (left out, of which attention key biases, all gradient elements)
    let (mut left_out, mut key_bias, mut total) = (0i64, 0i64, 0i64);
    for (p, rg) in ibot.student_ps.params().iter().zip(ref_grads.iter()) {
        let (Some(r), Some(start)) = (student_after_ref.get(&p.name), student_init.get(&p.name))
        else {
            report.fact("step_e2e", &p.name, false, "no reference tensor".into());
            continue;
        };
        let keep = rg.as_ref().map(|g| {
            let g = g.abs();
            let floor = 1e-6 * crate::util::max_abs(&g).max(1.0);
            let keep = g.ge(floor);
            let n = keep.numel() as i64;
            let kept = keep.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
            total += n;
            left_out += n - kept;
            if p.name.ends_with("qkv.bias") && n % 3 == 0 {
                let k = keep.narrow(0, n / 3, n / 3);
                key_bias += n / 3 - k.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
            }
            keep
        });
        report.update(
            "step_e2e",
            &p.name,
            &p.tensor,
            r,
            start,
            keep.as_ref(),
            TOL_E2E_UPDATE,
            "ill-conditioned element(s) left out",
        );
    }
    // The key biases' gradient is zero in exact arithmetic: those may all go. Of the others at
    // most MAX_LEFT_OUT.
    let others = left_out - key_bias;
    report.fact(
        "step_e2e",
        "elements left out",
        others as f64 <= MAX_LEFT_OUT * total as f64,
        format!(
            "{left_out} of {total} gradient elements left out as ill-conditioned: {key_bias} attention key-bias elements and {others} others (at most {} may be)",
            (MAX_LEFT_OUT * total as f64) as i64
        ),
    );

    Ok(())
}

/// The lr, weight-decay and momentum schedules and the teacher temperatures (also with
/// masking from a later epoch).
fn check_schedules(fx: &Fixture, cfg: &IbotConfig, report: &mut Report) -> Result<()> {
    let j = fx.json();
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
            fx.t(&format!("sched.{key}"))?,
            TOL_SCHED,
        );
    }
    let (t1, t2) = teacher_temp_schedules(&cfg.loss)?;
    report.tensor(
        "schedules",
        "teacher_temp",
        &Tensor::from_slice(&t1),
        fx.t("sched.teacher_temp")?,
        TOL_SCHED,
    );
    report.tensor(
        "schedules",
        "teacher_temp2",
        &Tensor::from_slice(&t2),
        fx.t("sched.teacher_temp2")?,
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
        fx.t("sched.teacher_temp_mim_start")?,
        TOL_SCHED,
    );
    report.tensor(
        "schedules",
        "teacher_temp2_mim_start",
        &Tensor::from_slice(&v2),
        fx.t("sched.teacher_temp2_mim_start")?,
        TOL_SCHED,
    );

    Ok(())
}

/// The weighted k-NN classifier on the fixture's features.
fn check_knn(fx: &Fixture, report: &mut Report) -> Result<()> {
    let j = fx.json();
    let knn = knn_classifier(
        fx.t("knn.train_features")?,
        fx.t("knn.train_labels")?,
        fx.t("knn.test_features")?,
        fx.t("knn.test_labels")?,
        j.i64("knn.k")?,
        j.f64("knn.T")?,
        j.i64("knn.num_classes")?,
    )?;
    report.scalar("knn", "top1", knn.top1, j.f64("knn.top1")?, 0.0);
    report.scalar("knn", "top5", knn.top5, j.f64("knn.top5")?, 0.0);

    Ok(())
}

/// Every fixture tensor was compared (or is documented as unused).
fn check_coverage(fx: &Fixture, report: &mut Report) {
    let unused: Vec<&String> = {
        let used = fx.used.borrow();
        let mut u: Vec<&String> = fx.tensors.keys().filter(|k| !used.contains(*k)).collect();
        u.sort();
        u
    };
    report.fact(
        "coverage",
        "every fixture tensor compared",
        unused.is_empty(),
        format!("not compared: {unused:?}"),
    );
}
