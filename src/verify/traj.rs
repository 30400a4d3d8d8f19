//! Trajectory fixtures: several epochs of the OFFICIAL `train_one_epoch` on fixed batches
//! (`trajectory.json` + `trajectory.safetensors`, documented in the fixture's README).
//!
//! The batches are fed to [`crate::train::run::train_loop`] — the loop `ibot train` runs, with
//! only the batch source swapped — from the official initial student, with the options built
//! by the real command line (`ibot train` flags) from the fixture's configuration. An
//! [`Observer`] compares every step and epoch as it happens:
//!
//! * per iteration: lr, weight decay and teacher momentum as set on the optimizer (1e-12), the
//!   epoch's teacher temperatures (1e-12), the loss terms (relative 1e-4: float32 noise grows
//!   over the steps), the [CLS] agreement `acc` (exact: a count of argmax matches), and the
//!   centres after the step, compared as their *updates* (after − before) against the reference
//!   updates, relative to the update's own scale (1e-3);
//! * per epoch: the statistics `train_one_epoch` returns (loss terms 1e-4; NMI/ARI/F 1e-6 —
//!   they only depend on the argmax predictions), and every student and teacher tensor, again as
//!   the update since the start of training relative to that update's scale (1e-3). One EMA step
//!   with momentum 0.9 moves the teacher by 10% of the student–teacher gap and weight decay
//!   moves a weight by lr·wd, far above these bounds, so a skipped EMA, another momentum, a
//!   dropped or misplaced weight decay or a different lr fails (`tests/reference.rs` checks);
//! * at the end: the AdamW moments of every parameter (relative to their scale, 1e-3) and the
//!   step count of each (the frozen last layer takes fewer steps).
//!
//! The attention key biases have a mathematically zero gradient (softmax ignores a constant
//! shift), so their computed gradient is float noise that Adam turns into updates of up to lr:
//! those elements (the middle third of every `qkv.bias`) are left out of the parameter and
//! moment comparisons, and the report says how many were.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::Report;
use crate::cli::train::TrainArgs;
use crate::config::TrainConfig;
use crate::data::loader::Batch;
use crate::dist::SingleProcess;
use crate::params::read_safetensors;
use crate::train::run::{self, BatchSource, EpochStats, Observer};
use crate::train::{Ibot, StepStats};

/// Schedules and temperatures.
const TOL_EXACT: f64 = 1e-12;
/// Loss terms and epoch averages, relative.
const TOL_LOSS: f64 = 1e-4;
/// Updates of centres, parameters and optimizer moments, relative to the update's scale.
const TOL_UPDATE: f64 = 2e-3;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("trajectory.json: '{k}' missing or not a number"))
}

fn list(v: &Value) -> Result<Vec<String>> {
    v.as_array()
        .ok_or_else(|| anyhow!("trajectory.json: expected a list, got {v}"))?
        .iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f.to_string())
                .ok_or_else(|| anyhow!("trajectory.json: non-number in {v}"))
        })
        .collect()
}

/// The fixture's configuration as `ibot train` options.
fn train_argv(c: &Value, img_size: i64, out: &Path) -> Result<Vec<String>> {
    let s = |k: &str| -> Result<String> { Ok(num(c, k)?.to_string()) };
    let b = &c["backbone"];
    let h = &c["head"];
    let flag = |v: &Value, k: &str| -> Result<String> {
        v.get(k)
            .and_then(Value::as_bool)
            .map(|x| x.to_string())
            .ok_or_else(|| anyhow!("trajectory.json: '{k}' missing or not a boolean"))
    };
    ensure!(
        c.get("arch").and_then(Value::as_str) == Some("vit"),
        "trajectory fixture of architecture {:?}: only ViT is implemented",
        c.get("arch")
    );
    let norm = match h.get("norm") {
        None | Some(Value::Null) => "none".to_string(),
        Some(Value::String(x)) => x.clone(),
        Some(other) => bail!("trajectory.json: head.norm {other}"),
    };
    let mut v: Vec<String> = vec!["train".into()];
    let mut push = |k: &str, val: String| {
        v.push(format!("--{k}"));
        v.push(val);
    };
    push("arch", "vit_small".into());
    push("patch_size", num(b, "patch_size")?.to_string());
    push("img_size", img_size.to_string());
    push("embed_dim", num(b, "embed_dim")?.to_string());
    push("depth", num(b, "depth")?.to_string());
    push("num_heads", num(b, "num_heads")?.to_string());
    push("drop_path", num(b, "drop_path_rate")?.to_string());
    push("out_dim", num(h, "out_dim")?.to_string());
    push("patch_out_dim", num(h, "patch_out_dim")?.to_string());
    push("head_hidden_dim", num(h, "hidden_dim")?.to_string());
    push("head_bottleneck_dim", num(h, "bottleneck_dim")?.to_string());
    push("norm_in_head", norm);
    push(
        "act_in_head",
        h.get("act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
            .to_string(),
    );
    push("norm_last_layer", flag(h, "norm_last_layer")?);
    push("shared_head", flag(h, "shared_head")?);
    push("shared_head_teacher", flag(h, "shared_head_teacher")?);
    push("use_masked_im_modeling", flag(c, "use_masked_im_modeling")?);
    push("pred_start_epoch", s("pred_start_epoch")?);
    push("lambda1", s("lambda1")?);
    push("lambda2", s("lambda2")?);
    push("warmup_teacher_temp", s("warmup_teacher_temp")?);
    push("teacher_temp", s("teacher_temp")?);
    push("warmup_teacher_patch_temp", s("warmup_teacher_patch_temp")?);
    push("teacher_patch_temp", s("teacher_patch_temp")?);
    push(
        "warmup_teacher_temp_epochs",
        s("warmup_teacher_temp_epochs")?,
    );
    push("epochs", s("epochs")?);
    push("freeze_last_layer", s("freeze_last_layer")?);
    push(
        "optimizer",
        c.get("optimizer")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("trajectory.json: optimizer missing"))?
            .to_string(),
    );
    push("lr", s("lr")?);
    push("min_lr", s("min_lr")?);
    push("warmup_epochs", s("warmup_epochs")?);
    push("weight_decay", s("weight_decay")?);
    push("weight_decay_end", s("weight_decay_end")?);
    push("clip_grad", s("clip_grad")?);
    push("momentum_teacher", s("momentum_teacher")?);
    push("batch_size_per_gpu", s("batch")?);
    push("global_crops_number", s("global_crops_number")?);
    push("local_crops_number", s("local_crops_number")?);
    push("global_crops_size", s("global_size")?);
    push("local_crops_size", s("local_size")?);
    push("use_fp16", "false".into());
    push("device", "cpu".into());
    push("saveckp_freq", "0".into());
    push("seed", "0".into());
    push("output_dir", out.display().to_string());
    v.push("--pred_ratio".into());
    v.extend(list(&c["pred_ratio"])?);
    v.push("--pred_ratio_var".into());
    v.extend(list(&c["pred_ratio_var"])?);
    Ok(v)
}

/// One fixed batch: views, masks of the global views, labels.
type FixedBatch = (Vec<Tensor>, Vec<Tensor>, Tensor);

/// The fixture's batches, in order.
struct FixedBatches {
    /// `[epoch][iteration]`
    batches: Vec<Vec<FixedBatch>>,
}

impl BatchSource for FixedBatches {
    fn iters_per_epoch(&self) -> usize {
        self.batches.first().map_or(0, Vec::len)
    }
    fn batches(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let Some(ep) = self.batches.get(epoch) else {
            return Box::new(std::iter::once(Err(anyhow!(
                "the fixture has no batches for epoch {epoch}"
            ))));
        };
        Box::new(ep.iter().map(|(views, masks, labels)| {
            Ok(Batch {
                views: views.iter().map(Tensor::shallow_clone).collect(),
                masks: masks.iter().map(Tensor::shallow_clone).collect(),
                labels: labels.shallow_clone(),
                indices: (0..labels.size()[0] as usize).collect(),
                skipped: 0,
                skip_reason: None,
                skip_reasons: Vec::new(),
            })
        }))
    }
}

/// The middle third of `qkv.bias` (the key biases): float-noise gradients, see the module doc.
fn noise_mask(name: &str, t: &Tensor) -> Tensor {
    let keep = Tensor::ones(t.size(), (Kind::Bool, Device::Cpu));
    if name.ends_with("attn.qkv.bias") {
        let d = t.size()[0] / 3;
        let _ = keep.narrow(0, d, d).fill_(0);
    }
    keep
}

/// Compares `ours − start` with `reference − start`, relative to the reference update's scale.
fn update(
    report: &mut Report,
    group: &'static str,
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
    start: &Tensor,
    keep: Option<&Tensor>,
) {
    report.update(
        group,
        name,
        ours,
        reference,
        start,
        keep,
        TOL_UPDATE,
        "key-bias element(s) left out (noise gradient)",
    );
}

struct Compare<'a> {
    t: &'a HashMap<String, Tensor>,
    iters: &'a [Value],
    epoch_stats: &'a [Value],
    report: RefCell<Report>,
    /// Centres before the current step.
    prev_center: (Tensor, Tensor),
    steps_seen: usize,
    teacher_src: HashMap<String, String>,
}

impl Compare<'_> {
    fn get(&self, k: &str) -> Result<&Tensor> {
        self.t
            .get(k)
            .ok_or_else(|| anyhow!("trajectory.safetensors has no '{k}'"))
    }
}

impl Observer for Compare<'_> {
    fn step(&mut self, it: usize, s: &StepStats, ibot: &Ibot) -> Result<()> {
        let r = self
            .iters
            .get(it)
            .ok_or_else(|| anyhow!("trajectory.json has no iteration {it}"))?;
        let epoch = num(r, "epoch")? as usize;
        let mut rep = self.report.borrow_mut();
        rep.scalar(
            "schedules",
            &format!("lr[{it}]"),
            s.lr,
            num(r, "lr")?,
            TOL_EXACT,
        );
        rep.scalar(
            "schedules",
            &format!("wd[{it}]"),
            s.wd,
            num(r, "wd")?,
            TOL_EXACT,
        );
        rep.scalar(
            "schedules",
            &format!("momentum[{it}]"),
            s.momentum,
            num(r, "momentum")?,
            TOL_EXACT,
        );
        let temps = (
            ibot.loss.teacher_temp_schedule.get(epoch).copied(),
            ibot.loss.teacher_temp2_schedule.get(epoch).copied(),
        );
        let (Some(tt), Some(tt2)) = temps else {
            bail!("no teacher temperature for epoch {epoch}")
        };
        rep.scalar(
            "schedules",
            &format!("teacher_temp[{it}]"),
            tt,
            num(r, "teacher_temp")?,
            TOL_EXACT,
        );
        rep.scalar(
            "schedules",
            &format!("teacher_patch_temp[{it}]"),
            tt2,
            num(r, "teacher_patch_temp")?,
            TOL_EXACT,
        );
        for (k, ours) in [("loss", s.loss), ("cls", s.cls), ("patch", s.patch)] {
            let rf = num(r, k)?;
            rep.scalar(
                "loss terms",
                &format!("{k}[{it}]"),
                ours,
                rf,
                TOL_LOSS * rf.abs().max(1.0),
            );
        }
        rep.scalar(
            "loss terms",
            &format!("acc[{it}]"),
            s.acc,
            num(r, "acc")?,
            1e-9,
        );
        let (c, c2) = (
            self.get(&format!("traj.{it}.center"))?,
            self.get(&format!("traj.{it}.center2"))?,
        );
        update(
            &mut rep,
            "centres",
            &format!("center after {it}"),
            &ibot.loss.center,
            c,
            &self.prev_center.0,
            None,
        );
        update(
            &mut rep,
            "centres",
            &format!("center2 after {it}"),
            &ibot.loss.center2,
            c2,
            &self.prev_center.1,
            None,
        );
        // The next step's update starts from the reference centres' values as we computed them.
        self.prev_center = (
            ibot.loss.center.detach().to_device(Device::Cpu),
            ibot.loss.center2.detach().to_device(Device::Cpu),
        );
        self.steps_seen += 1;
        Ok(())
    }

    fn epoch_end(&mut self, epoch: usize, st: &EpochStats, ibot: &Ibot) -> Result<()> {
        let r = self
            .epoch_stats
            .get(epoch)
            .ok_or_else(|| anyhow!("trajectory.json has no epoch_stats[{epoch}]"))?;
        let mut rep = self.report.borrow_mut();
        for (k, ours, tol) in [
            ("loss", st.loss, TOL_LOSS),
            ("cls", st.cls, TOL_LOSS),
            ("patch", st.patch, TOL_LOSS),
            ("lr", st.lr, TOL_EXACT),
            ("wd", st.wd, TOL_EXACT),
            ("acc", st.acc, 1e-9),
            ("nmi", st.nmi, 1e-6),
            ("ari", st.ari, 1e-6),
            ("fscore", st.fscore, 1e-6),
        ] {
            let rf = num(r, k)?;
            rep.scalar(
                "epoch stats",
                &format!("{k}[{epoch}]"),
                ours,
                rf,
                tol * rf.abs().max(1.0),
            );
        }
        for (net, ps) in [("student", &ibot.student_ps), ("teacher", &ibot.teacher_ps)] {
            for (name, t) in ps.state_dict() {
                let key = format!("epoch{epoch}.{net}.{name}");
                let reference = self.get(&key)?;
                // Both networks start from the student's initial state (the teacher through the
                // official strict=False load, whose source tensor the json names).
                let src = if net == "teacher" {
                    self.teacher_source(name)?
                } else {
                    name.to_string()
                };
                let start = self.get(&format!("init.student.{src}"))?;
                let keep = noise_mask(name, reference);
                update(
                    &mut rep,
                    "parameters",
                    &key,
                    t,
                    reference,
                    start,
                    Some(&keep),
                );
            }
        }
        Ok(())
    }
}

impl Compare<'_> {
    /// The student tensor the teacher's `name` was loaded from at the start.
    fn teacher_source(&self, name: &str) -> Result<String> {
        self.teacher_src
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("trajectory.json: teacher_init_from_student has no '{name}'"))
    }
}

/// Verifies a trajectory fixture; `tweak` changes the options before the run (mutation tests
/// use it to show that a wrong setting fails).
pub fn verify_trajectory(dir: &Path, tweak: &dyn Fn(&mut TrainConfig)) -> Result<Report> {
    let jp = dir.join("trajectory.json");
    let raw = std::fs::read_to_string(&jp).with_context(|| format!("reading {}", jp.display()))?;
    let j: Value =
        serde_json::from_str(&raw).with_context(|| format!("parsing {}", jp.display()))?;
    let t = read_safetensors(&dir.join("trajectory.safetensors"))?;
    let get = |k: &str| -> Result<&Tensor> {
        t.get(k)
            .ok_or_else(|| anyhow!("trajectory.safetensors has no '{k}'"))
    };
    let c = &j["config"];
    let pos = get("init.student.backbone.pos_embed")?;
    let rows = pos.size()[1] - 1;
    let grid = (rows as f64).sqrt().round() as i64;
    ensure!(
        grid * grid == rows,
        "pos_embed of {rows} patch rows is not a square grid"
    );
    let img_size = grid * num(&c["backbone"], "patch_size")? as i64;

    // The loop writes checkpoints: a directory of this call's own (never resumed from).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("ibot-verify-traj-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let argv = train_argv(c, img_size, &out)?;
    let mut args =
        Cli::try_parse_from(std::iter::once("ibot".to_string()).chain(argv.into_iter().skip(1)))
            .map_err(|e| anyhow!("fixture options rejected by `ibot train`: {e}"))?
            .args
            .into_config();
    tweak(&mut args);

    // The batches exactly as the official loop received them.
    let epochs = num(c, "epochs")? as usize;
    let iters = num(c, "iters_per_epoch")? as usize;
    let mut batches = Vec::new();
    for e in 0..epochs {
        let mut ep = Vec::new();
        for i in 0..iters {
            let p = format!("in.e{e}.i{i}");
            let g = get(&format!("{p}.global_crops"))?;
            let l = get(&format!("{p}.local_crops"))?;
            let mut views: Vec<Tensor> = (0..g.size()[0]).map(|v| g.get(v)).collect();
            views.extend((0..l.size()[0]).map(|v| l.get(v)));
            let m = get(&format!("{p}.masks_global"))?.to_kind(Kind::Bool);
            let masks: Vec<Tensor> = (0..m.size()[0]).map(|v| m.get(v)).collect();
            ep.push((
                views,
                masks,
                get(&format!("{p}.labels"))?.to_kind(Kind::Int64),
            ));
        }
        batches.push(ep);
    }
    let source = FixedBatches { batches };

    // The official initial student; the teacher from it as `load_state_dict(strict=False)`.
    let ibot = Ibot::new(run::ibot_config(&args)?, Device::Cpu)?;
    ibot.student_ps
        .load_strict(&t, "init.student.")
        .context("initial student")?;
    ibot.init_teacher_from_student()?;
    let mut report = Report::default();
    let map = j
        .get("teacher_init_from_student")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("trajectory.json has no teacher_init_from_student"))?;
    for (tk, sk) in map {
        let (Some(tt), Some(st)) = (
            ibot.teacher_ps.get(tk),
            t.get(&format!("init.student.{}", sk.as_str().unwrap_or(""))),
        ) else {
            report.fact(
                "teacher init",
                tk,
                false,
                format!("missing teacher tensor or init.student.{sk}"),
            );
            continue;
        };
        report.tensor("teacher init", tk, tt, st, 0.0);
    }
    let teacher_keys: Vec<String> = ibot
        .teacher_ps
        .state_dict()
        .map(|(k, _)| k.to_string())
        .collect();
    let extra: Vec<&String> = teacher_keys
        .iter()
        .filter(|k| !map.contains_key(*k))
        .collect();
    report.fact(
        "teacher init",
        "keys",
        extra.is_empty() && teacher_keys.len() == map.len(),
        format!(
            "{} teacher keys, {} in the reference map, unmapped {:?}",
            teacher_keys.len(),
            map.len(),
            extra
        ),
    );
    let teacher_src: HashMap<String, String> = map
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
        .collect();

    let iters_json = j["iterations"]
        .as_array()
        .ok_or_else(|| anyhow!("trajectory.json has no iterations"))?;
    let stats_json = j["epoch_stats"]
        .as_array()
        .ok_or_else(|| anyhow!("trajectory.json has no epoch_stats"))?;
    let mut cmp = Compare {
        t: &t,
        iters: iters_json,
        epoch_stats: stats_json,
        report: RefCell::new(report),
        prev_center: (
            ibot.loss.center.detach().to_device(Device::Cpu),
            ibot.loss.center2.detach().to_device(Device::Cpu),
        ),
        steps_seen: 0,
        teacher_src,
    };
    let outcome = run::train_loop(&args, &SingleProcess, ibot, &source, &mut cmp);
    let _ = std::fs::remove_dir_all(&out);
    let outcome = outcome?;
    let mut report = cmp.report.into_inner();
    report.fact(
        "coverage",
        "iterations",
        cmp.steps_seen == iters_json.len(),
        format!(
            "{} of {} reference iterations compared",
            cmp.steps_seen,
            iters_json.len()
        ),
    );
    // Final optimizer state.
    let ibot = outcome.ibot;
    let ours: HashMap<String, Tensor> = ibot
        .optimizer
        .state_tensors(&ibot.student_ps)
        .into_iter()
        .collect();
    let steps = j["optim_steps"]
        .as_object()
        .ok_or_else(|| anyhow!("trajectory.json has no optim_steps"))?;
    for p in ibot.student_ps.params() {
        let n = &p.name;
        for state in ["exp_avg", "exp_avg_sq"] {
            let key = format!("final.optim.{state}.{n}");
            let Some(reference) = t.get(&key) else {
                report.fact("optimizer", &key, false, "missing in the fixture".into());
                continue;
            };
            let Some(o) = ours.get(&format!("{n}.{state}")) else {
                report.fact("optimizer", &key, false, "no such state here".into());
                continue;
            };
            let keep = noise_mask(n, reference);
            let zero = reference.zeros_like();
            update(
                &mut report,
                "optimizer",
                &key,
                o,
                reference,
                &zero,
                Some(&keep),
            );
        }
        let ours_steps = ours
            .get(&format!("{n}.step"))
            .map(|s| s.int64_value(&[0]) as f64);
        let ref_steps = steps.get(n).and_then(Value::as_f64);
        report.fact(
            "optimizer",
            &format!("{n}.step"),
            ours_steps.is_some() && ours_steps == ref_steps,
            format!("ours {ours_steps:?}, reference {ref_steps:?}"),
        );
    }
    Ok(report)
}
