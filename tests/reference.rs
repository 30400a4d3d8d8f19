//! The implementation against tensors produced by the official iBOT code.
//! Tolerances are those of `ibot::verify` (forward 1e-5, gradients and steps 1e-4, both scaled
//! by max(1, max|reference|); schedules 1e-12; k-NN exact).

mod common;

use std::path::Path;

use ibot::verify::verify_fixture;

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

/// A copy of the fixture whose configuration says something the reference did not do must
/// fail: the comparison is able to see a wrong loss weight, a wrong temperature and a wrong
/// clipping threshold.
#[test]
fn verification_detects_a_wrong_configuration() {
    let Some(src) = common::fixture_dir("visible_vit") else {
        return;
    };
    let raw = std::fs::read_to_string(src.join("fixtures.json")).unwrap();
    for (key, value, expect_group) in [
        ("lambda1", serde_json::json!(0.5), "loss"),
        ("warmup_teacher_temp", serde_json::json!(0.05), "loss"),
        ("clip_grad", serde_json::json!(100.0), "grad"),
    ] {
        let mut j: serde_json::Value = serde_json::from_str(&raw).unwrap();
        j["config"][key] = value;
        let dir = tempdir(&format!("wrong-{key}"));
        std::fs::write(
            dir.join("fixtures.json"),
            serde_json::to_string(&j).unwrap(),
        )
        .unwrap();
        link(
            &src.join("fixtures.safetensors"),
            &dir.join("fixtures.safetensors"),
        );
        let report = verify_fixture(&dir).expect("fixture runs");
        assert!(!report.passed(), "changing {key} went unnoticed");
        assert!(
            report.failures().iter().any(|c| c.group == expect_group),
            "changing {key} did not fail group {expect_group}:\n{}",
            report.render()
        );
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ibot-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
    use ibot::train::args::TrainArgs;
    use ibot::verify::traj::verify_trajectory;
    let Some(dir) = common::fixture_dir("visible_traj") else {
        return;
    };
    type Tweak = fn(&mut TrainArgs);
    let cases: [(&str, Tweak, &str); 7] = [
        ("EMA skipped (momentum 1)", |a| a.momentum_teacher = 1.0, "parameters"),
        ("teacher momentum 0.99 instead of 0.9", |a| a.momentum_teacher = 0.99, "parameters"),
        ("weight decay dropped", |a| {
            a.weight_decay = 0.0;
            a.weight_decay_end = 0.0;
        }, "parameters"),
        ("lr 1% high", |a| a.lr *= 1.01, "schedules"),
        ("last layer not frozen in epoch 0", |a| a.freeze_last_layer = 0, "optimizer"),
        ("no gradient clipping", |a| a.clip_grad = 0.0, "parameters"),
        ("teacher temperature warm-up from 0.05", |a| a.warmup_teacher_temp = 0.05, "schedules"),
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
