//! The implementation against tensors produced by the official iBOT code.
//! Tolerances are those of `ibot::verify` (forward 1e-5, gradients and steps 1e-4, both scaled
//! by max(1, max|reference|); schedules 1e-12; k-NN exact).

mod common;

use std::path::Path;

use ibot::verify::verify_fixture;

#[test]
fn visible_vit_matches_the_official_code() {
    let report = verify_fixture(&common::fixture_dir("visible_vit")).expect("fixture runs");
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

/// A copy of the fixture whose configuration says something the reference did not do must
/// fail: the comparison is able to see a wrong loss weight, a wrong temperature and a wrong
/// clipping threshold.
#[test]
fn verification_detects_a_wrong_configuration() {
    let src = common::fixture_dir("visible_vit");
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
