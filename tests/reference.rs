//! The implementation against tensors produced by the official iBOT code.
//! Tolerances are those of `ibot::verify` (forward 1e-5, gradients and steps 1e-4, both scaled
//! by max(1, max|reference|); schedules 1e-12; k-NN exact).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ibot::params::{read_safetensors, write_safetensors, ParamStore};
use ibot::train::ema_pairs;
use ibot::train::optim::{get_params_groups, Optimizer, OptimizerKind};
use ibot::verify::{verify_fixture, verify_one_step_with, Steps};
use tch::Tensor;

#[test]
fn visible_vit_matches_the_official_code() {
    let Some(dir) = common::fixture_dir("visible_vit") else {
        return;
    };
    let report = verify_fixture(&dir).expect("fixture runs");
    println!("{}", report.render());
    assert!(
        report.passed(),
        "mismatch against the official code:\n{}",
        report.render()
    );
    // Every group the fixture documents was actually compared.
    for group in [
        "structure",
        "forward",
        "train_path",
        "pos_embed",
        "loss",
        "grad",
        "grad_norm",
        "optim_step",
        "step_e2e",
        "ema",
        "schedules",
        "knn",
    ] {
        assert!(
            report.checks.iter().any(|c| c.group == group),
            "group {group} was not checked"
        );
    }
    assert!(
        report.checks.len() > 200,
        "only {} checks ran",
        report.checks.len()
    );
}

#[test]
fn visible_swin_matches_the_official_code() {
    let Some(dir) = common::fixture_dir("visible_swin") else {
        return;
    };
    let report = verify_fixture(&dir).expect("fixture runs");
    println!("{}", report.render());
    assert!(
        report.passed(),
        "mismatch against the official code:\n{}",
        report.render()
    );
    // Every group that applies to Swin was compared (no pos_embed: Swin has none).
    for group in [
        "structure",
        "forward",
        "loss",
        "grad",
        "grad_norm",
        "optim_step",
        "step_e2e",
        "ema",
        "schedules",
        "knn",
    ] {
        assert!(
            report.checks.iter().any(|c| c.group == group),
            "group {group} was not checked"
        );
    }
    assert!(
        report.checks.iter().all(|c| c.group != "pos_embed"),
        "a Swin has no position embedding to compare"
    );
    assert!(
        report.checks.len() > 400,
        "only {} checks ran",
        report.checks.len()
    );
}

/// A copy of the fixture at `src` in a scratch directory, with `edit` applied to its
/// `fixtures.json` and `edit_tensors` to its tensors (None: the tensors are linked, not copied).
fn mutated_fixture(
    src: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    edit_tensors: Option<&dyn Fn(&mut HashMap<String, Tensor>)>,
) -> PathBuf {
    let raw = std::fs::read_to_string(src.join("fixtures.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&raw).unwrap();
    edit(&mut j);
    let dir = common::scratch_dir("reference", name);
    std::fs::write(
        dir.join("fixtures.json"),
        serde_json::to_string(&j).unwrap(),
    )
    .unwrap();
    match edit_tensors {
        None => link(
            &src.join("fixtures.safetensors"),
            &dir.join("fixtures.safetensors"),
        ),
        Some(f) => {
            let mut t = read_safetensors(&src.join("fixtures.safetensors")).unwrap();
            f(&mut t);
            let named: Vec<(String, Tensor)> = t.into_iter().collect();
            write_safetensors(&dir.join("fixtures.safetensors"), &named, None).unwrap();
        }
    }
    dir
}

fn assert_fails_in(report: &ibot::verify::Report, what: &str, group: &str) {
    assert!(!report.passed(), "{what} went unnoticed");
    assert!(
        report.failures().iter().any(|c| c.group == group),
        "{what} did not fail group {group}:\n{}",
        report.render()
    );
}

/// A copy of the fixture whose configuration says something the reference did not do must
/// fail: the comparison is able to see a wrong loss weight, a wrong temperature, a wrong
/// clipping threshold, a skipped EMA, another EMA momentum and a dropped weight decay. The
/// last three move a tensor by ~1e-6 in one step: they are seen because the optimizer step and
/// the EMA are compared as updates relative to their own scale.
#[test]
fn verification_detects_a_wrong_configuration() {
    let Some(src) = common::fixture_dir("visible_vit") else {
        return;
    };
    for (key, value, expect_group) in [
        ("lambda1", serde_json::json!(0.5), "loss"),
        ("warmup_teacher_temp", serde_json::json!(0.05), "loss"),
        ("clip_grad", serde_json::json!(100.0), "grad"),
        ("momentum_teacher", serde_json::json!(1.0), "ema"),
        ("momentum_teacher", serde_json::json!(0.99), "ema"),
        ("weight_decay", serde_json::json!(0.0), "optim_step"),
    ] {
        let dir = mutated_fixture(
            &src,
            &format!("wrong-{key}"),
            |j| j["config"][key] = value.clone(),
            None,
        );
        let report = verify_fixture(&dir).expect("fixture runs");
        assert_fails_in(&report, &format!("{key} = {value}"), expect_group);
    }
    // The fixture's EMA pairs without one pair: our pairs no longer match them.
    let dir = mutated_fixture(
        &src,
        "wrong-ema-pairs",
        |j| {
            j["ema_pairs"].as_array_mut().unwrap().pop();
        },
        None,
    );
    assert_fails_in(
        &verify_fixture(&dir).unwrap(),
        "an EMA pair fewer",
        "structure",
    );
}

type Opt = dyn Fn(&ParamStore, &[Option<Tensor>], f64, f64) -> anyhow::Result<()>;
type Ema = dyn Fn(&ParamStore, &ParamStore, f64);

/// Our AdamW with one setting changed.
fn adam_with(
    tweak: fn(&mut Optimizer),
) -> impl Fn(&ParamStore, &[Option<Tensor>], f64, f64) -> anyhow::Result<()> {
    move |ps, g, lr, wd| {
        let mut o = Optimizer::new(OptimizerKind::Adamw, ps);
        tweak(&mut o);
        o.step(ps, g, lr, wd)
    }
}

/// `t = m·t + (1-m)·s` over the given pairs.
fn ema_over<'a>(pairs: impl IntoIterator<Item = (&'a Tensor, &'a Tensor)>, m: f64) {
    let _g = tch::no_grad_guard();
    for (t, s) in pairs {
        let mut x = t.shallow_clone();
        let _ = x.g_mul_scalar_(m);
        let _ = x.g_add_(&(s.detach() * (1.0 - m)));
    }
}

/// The optimizer step and the EMA that verify-fixture runs are parameters
/// (`verify_one_step_with`): each deliberately wrong one here must fail the check that looks
/// at it, and nothing unrelated. (Adam's betas cannot show in one step from a fresh state: the
/// bias correction cancels them; tests/train.rs checks several steps against torch.)
#[test]
fn verification_detects_a_wrong_optimizer_or_ema() {
    let Some(dir) = common::fixture_dir("visible_vit") else {
        return;
    };
    let ours = Steps::ours();
    let eps = adam_with(|o| o.eps = 1e-6);
    let swapped = adam_with(|o| {
        let g = &mut o.groups;
        std::mem::swap(&mut g.regularized, &mut g.not_regularized)
    });
    let all_decayed = adam_with(|o| {
        let g = &mut o.groups;
        let rest = std::mem::take(&mut g.not_regularized);
        g.regularized.extend(rest);
    });
    // AdamW without bias correction (one step from a fresh state: m = (1-b1)g, v = (1-b2)g²).
    let no_bias_correction =
        |ps: &ParamStore, grads: &[Option<Tensor>], lr: f64, wd: f64| -> anyhow::Result<()> {
            let groups = get_params_groups(ps);
            let _g = tch::no_grad_guard();
            for (idx, decay) in [(&groups.regularized, wd), (&groups.not_regularized, 0.0)] {
                for &i in idx {
                    let Some(g) = &grads[i] else { continue };
                    let mut p = ps.params()[i].tensor.shallow_clone();
                    let _ = p.g_mul_scalar_(1.0 - lr * decay);
                    let m = g * 0.1;
                    let v = (g * g) * 0.001;
                    let _ = p.g_add_(&(m * (-lr) / (v.sqrt() + 1e-8)));
                }
            }
            Ok(())
        };
    let skip_ema = |_: &ParamStore, _: &ParamStore, _: f64| {};
    // DINO's positional pairing (a zip of the two parameter lists): the student's masked_embed
    // shifts every pair after it (pairs of different shapes are skipped here).
    let positional = |t: &ParamStore, s: &ParamStore, m: f64| {
        let pairs = t.params().iter().zip(s.params());
        ema_over(
            pairs
                .filter(|(a, b)| a.tensor.size() == b.tensor.size())
                .map(|(a, b)| (&a.tensor, &b.tensor)),
            m,
        )
    };
    let backbone_only = |t: &ParamStore, s: &ParamStore, m: f64| {
        ema_over(
            ema_pairs(t, s)
                .into_iter()
                .filter(|(a, _)| a.name.starts_with("backbone."))
                .map(|(a, b)| (&a.tensor, &b.tensor)),
            m,
        )
    };
    let cases: [(&str, &Opt, &Ema, &str); 7] = [
        ("Adam eps 1e-6", &eps, ours.ema, "optim_step"),
        (
            "no bias correction",
            &no_bias_correction,
            ours.ema,
            "optim_step",
        ),
        (
            "weight decay on the other group",
            &swapped,
            ours.ema,
            "optim_step",
        ),
        (
            "weight decay on every parameter",
            &all_decayed,
            ours.ema,
            "optim_step",
        ),
        ("EMA skipped", ours.optimizer, &skip_ema, "ema"),
        ("EMA pairs by position", ours.optimizer, &positional, "ema"),
        (
            "EMA of the backbone only",
            ours.optimizer,
            &backbone_only,
            "ema",
        ),
    ];
    for (what, optimizer, ema, group) in cases {
        let report = verify_one_step_with(&dir, &Steps { optimizer, ema }).expect("fixture runs");
        assert_fails_in(&report, what, group);
        // A wrong optimizer shows in the steps, a wrong EMA in the EMA only.
        for c in report.failures() {
            assert!(
                [group, "step_e2e"].contains(&c.group),
                "{what} failed an unrelated check {}/{}",
                c.group,
                c.name
            );
        }
    }
}

/// A tensor the configuration needs that the fixture lacks fails the check instead of skipping
/// it, and so does a fixture tensor that nothing compares.
#[test]
fn verification_fails_on_missing_or_unexamined_fixture_tensors() {
    let Some(src) = common::fixture_dir("visible_vit") else {
        return;
    };
    for (key, group) in [
        ("out.student_local_cls", "forward"),
        ("out.pos_embed_interp_local", "pos_embed"),
        ("out.pos_embed_interp_global", "pos_embed"),
        ("grad.backbone.blocks.0.attn.qkv.weight", "grad"),
        ("student_after.backbone.norm.weight", "optim_step"),
        ("teacher_after.head.mlp.0.bias", "ema"),
    ] {
        let drop = |t: &mut HashMap<String, Tensor>| {
            assert!(t.remove(key).is_some(), "the fixture has no {key}");
        };
        let dir = mutated_fixture(&src, "missing", |_| {}, Some(&drop));
        let report = verify_fixture(&dir).expect("fixture runs");
        assert_fails_in(&report, &format!("{key} missing"), group);
    }
    let extra = |t: &mut HashMap<String, Tensor>| {
        let z = Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        t.insert("out.something_new".into(), z);
    };
    let dir = mutated_fixture(&src, "extra", |_| {}, Some(&extra));
    assert_fails_in(
        &verify_fixture(&dir).unwrap(),
        "an uncompared tensor",
        "coverage",
    );
}

fn link(src: &Path, dst: &Path) {
    std::os::unix::fs::symlink(std::fs::canonicalize(src).unwrap(), dst).unwrap();
}

/// Three epochs of the official training loop on fixed batches, fed through the loop
/// `ibot train` runs (see `ibot::verify::traj`).
#[test]
fn visible_traj_matches_the_official_training_loop() {
    let Some(dir) = common::fixture_dir("visible_traj") else {
        return;
    };
    let report = verify_fixture(&dir).expect("fixture runs");
    println!("{}", report.render());
    assert!(report.passed(), "mismatch:\n{}", report.render());
    for group in [
        "teacher init",
        "schedules",
        "loss terms",
        "centres",
        "epoch stats",
        "parameters",
        "optimizer",
        "coverage",
    ] {
        assert!(
            report.checks.iter().any(|c| c.group == group),
            "group {group} was not checked"
        );
    }
}

/// Each of these settings differs from what the official run did; the trajectory comparison
/// must notice every one, in the group that holds the evidence.
#[test]
fn the_trajectory_check_fails_on_a_wrong_setting() {
    use ibot::config::TrainConfig;
    use ibot::verify::traj::verify_trajectory;
    let Some(dir) = common::fixture_dir("visible_traj") else {
        return;
    };
    type Tweak = fn(&mut TrainConfig);
    let cases: [(&str, Tweak, &str); 7] = [
        (
            "EMA skipped (momentum 1)",
            |a| a.schedule.momentum_teacher = 1.0,
            "parameters",
        ),
        (
            "teacher momentum 0.99 instead of 0.9",
            |a| a.schedule.momentum_teacher = 0.99,
            "parameters",
        ),
        (
            "weight decay dropped",
            |a| {
                a.schedule.weight_decay = 0.0;
                a.schedule.weight_decay_end = 0.0;
            },
            "parameters",
        ),
        ("lr 1% high", |a| a.schedule.lr *= 1.01, "schedules"),
        (
            "last layer not frozen in epoch 0",
            |a| a.optim.freeze_last_layer = 0,
            "optimizer",
        ),
        (
            "no gradient clipping",
            |a| a.optim.clip_grad = 0.0,
            "parameters",
        ),
        (
            "teacher temperature warm-up from 0.05",
            |a| a.loss.warmup_teacher_temp = 0.05,
            "schedules",
        ),
    ];
    for (what, tweak, group) in cases {
        let report = verify_trajectory(&dir, &tweak).expect("fixture runs");
        assert!(!report.passed(), "{what} went unnoticed");
        assert!(
            report.failures().iter().any(|c| c.group == group),
            "{what} did not fail group {group}:\n{}",
            report.render()
        );
    }
}
