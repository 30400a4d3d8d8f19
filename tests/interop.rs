//! Official PyTorch checkpoints: built at test time with the venv's `torch` from the parameters of
//! the reference fixture (tests/py/make_official_pth.py), in every layout the official code and
//! its releases use, then loaded without Python and run. Outputs must match the official outputs
//! stored in the fixture (tolerance 1e-5 absolute, float32 on CPU), and the same weights read
//! from safetensors must give bit-identical outputs. A pickle that would call `os.system` must be
//! refused without the call happening, and damaged files must give errors, never panics.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ibot::interop::{export_backbone, load_pretrained, read_pth};
use ibot::params::read_safetensors;
use rand::{Rng, SeedableRng};
use tch::{Device, Tensor};

const TOL: f64 = 1e-5;

/// Whether the reference fixture is here (else the test is skipped, see common::fixture_dir).
fn have_fixture() -> bool {
    common::fixture_dir("visible_vit").is_some()
}

/// The fixture's tensors (read per call: tensors cannot be shared between test threads).
fn fixture() -> std::collections::HashMap<String, Tensor> {
    let dir = common::fixture_dir("visible_vit").expect("guarded by have_fixture()");
    read_safetensors(&dir.join("fixtures.safetensors")).unwrap()
}

fn fx(k: &str) -> Tensor {
    fixture()
        .remove(k)
        .unwrap_or_else(|| panic!("fixture has no {k}"))
}

/// Directory with the .pth files written by the official-layout script (built once).
fn pth_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ibot-interop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let named: Vec<(String, Tensor)> = fixture()
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("student.").map(|n| (n.to_string(), v)))
            .collect();
        assert!(named.len() > 30, "fixture student parameters missing");
        common::make_official_pth(&named, &dir, None);
        dir
    })
}

fn global_crop(v: i64) -> Tensor {
    fx("in.global_crops").get(v)
}

#[test]
fn every_official_layout_loads_and_reproduces_the_official_outputs() {
    if !have_fixture() {
        return;
    }
    let dir = pth_dir();
    let want = fx("out.teacher_backbone_g0");
    for file in [
        "full.pth",
        "legacy.pth",
        "teacher_state.pth",
        "teacher_bare.pth",
    ] {
        let p = load_pretrained(&dir.join(file), "teacher", None)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let c = p.vit().expect("a ViT");
        assert_eq!(
            (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size),
            (192, 2, 3, 16, 224),
            "{file}"
        );
        assert!(
            c.qkv_bias && !c.masked_im_modeling && c.mlp_ratio == 4.0,
            "{file}: {c:?}"
        );
        let (_, vit) = p.backbone_model(Device::Cpu).unwrap();
        let got = tch::no_grad(|| vit.forward(&global_crop(0), None, false)).unwrap();
        common::assert_close(file, &got, &want, TOL);
    }
}

#[test]
fn the_full_checkpoint_gives_teacher_head_and_masked_student() {
    if !have_fixture() {
        return;
    }
    let path = pth_dir().join("full.pth");
    let f = read_pth(&path).unwrap();
    assert!(
        f.skipped.iter().any(|s| s.contains("argparse.Namespace")),
        "args should be recorded: {:?}",
        f.skipped
    );
    for k in [
        "student",
        "teacher",
        "optimizer",
        "epoch",
        "args",
        "ibot_loss",
        "fp16_scaler",
    ] {
        assert!(
            f.top_keys.iter().any(|t| t == k),
            "top-level key {k} missing: {:?}",
            f.top_keys
        );
    }
    // Teacher: backbone + [CLS] head output of the first global view.
    let t = load_pretrained(&path, "teacher", None).unwrap();
    let (_, vit) = t.backbone_model(Device::Cpu).unwrap();
    let (_, head) = t
        .head_model(Device::Cpu)
        .unwrap()
        .expect("the teacher has a head");
    assert_eq!(
        (
            head.cfg.out_dim,
            head.cfg.hidden_dim,
            head.cfg.bottleneck_dim,
            head.cfg.nlayers
        ),
        (1024, 256, 64, 3)
    );
    let b = global_crop(0).size()[0];
    let cls = tch::no_grad(|| {
        head.forward_cls(
            &vit.forward(&global_crop(0), None, false)
                .unwrap()
                .select(1, 0),
        )
    });
    common::assert_close(
        "teacher [CLS] head",
        &cls,
        &fx("out.teacher_cls").narrow(0, 0, b),
        TOL,
    );
    // Student: `module.` prefixes, masked_embed, masked forward of both global views.
    let s = load_pretrained(&path, "student", None).unwrap();
    assert!(s.vit().expect("a ViT").masked_im_modeling);
    let (_, svit) = s.backbone_model(Device::Cpu).unwrap();
    let views = Tensor::cat(&[global_crop(0), global_crop(1)], 0);
    let m = fx("in.masks_global");
    let masks = Tensor::cat(&[m.get(0), m.get(1)], 0).to_kind(tch::Kind::Bool);
    let got = tch::no_grad(|| svit.forward(&views, Some(&masks), false)).unwrap();
    common::assert_close(
        "student masked backbone",
        &got,
        &fx("out.student_backbone_masked"),
        TOL,
    );
}

#[test]
fn pth_and_exported_safetensors_give_identical_outputs() {
    if !have_fixture() {
        return;
    }
    let dir = pth_dir();
    let p = load_pretrained(&dir.join("full.pth"), "teacher", None).unwrap();
    let out = dir.join("exported.safetensors");
    export_backbone(&p, &out, false).unwrap();
    let q = load_pretrained(&out, "teacher", None).unwrap();
    assert_eq!(p.config, q.config);
    let (_, a) = p.backbone_model(Device::Cpu).unwrap();
    let (_, b) = q.backbone_model(Device::Cpu).unwrap();
    let x = global_crop(1);
    let (ya, yb) = tch::no_grad(|| {
        (
            a.forward(&x, None, false).unwrap(),
            b.forward(&x, None, false).unwrap(),
        )
    });
    assert!(ya.equal(&yb), "outputs differ between .pth and safetensors");
    // timm naming: masked_embed dropped, every other name unchanged.
    let s = load_pretrained(&dir.join("full.pth"), "student", None).unwrap();
    let timm = dir.join("timm.safetensors");
    export_backbone(&s, &timm, true).unwrap();
    let t = read_safetensors(&timm).unwrap();
    assert!(
        !t.contains_key("masked_embed")
            && t.contains_key("blocks.1.mlp.fc2.bias")
            && t.contains_key("pos_embed")
    );
}

#[test]
fn a_pickle_that_calls_os_system_is_refused_without_running_it() {
    if !have_fixture() {
        return;
    }
    let dir = pth_dir();
    let err = load_pretrained(&dir.join("evil.pth"), "teacher", None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("system") && msg.contains("refusing"),
        "unexpected message: {msg}"
    );
    assert!(!dir.join("PWNED").exists(), "the payload ran");
}

#[test]
fn damaged_files_give_errors_not_panics() {
    if !have_fixture() {
        return;
    }
    let dir = pth_dir();
    let good = std::fs::read(dir.join("full.pth")).unwrap();
    let bad = dir.join("damaged.pth");
    // Truncations: a zip without its central directory must be an error.
    for frac in [0.0, 0.1, 0.5, 0.9, 0.99] {
        let n = (good.len() as f64 * frac) as usize;
        std::fs::write(&bad, &good[..n]).unwrap();
        assert!(
            load_pretrained(&bad, "teacher", None).is_err(),
            "truncated to {n} bytes but loaded"
        );
    }
    // Random corruption: never a panic, and never half a model: a load that succeeds (possible
    // when only tensor bytes changed) gives every backbone tensor with its shape and the same
    // architecture, and a load that fails says why.
    let reference = load_pretrained(&dir.join("full.pth"), "teacher", None).unwrap();
    let shapes = |p: &ibot::interop::Pretrained| {
        let mut v: Vec<(String, Vec<i64>)> = p
            .backbone
            .iter()
            .map(|(k, t)| (k.clone(), t.size()))
            .collect();
        v.sort();
        v
    };
    let want = shapes(&reference);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..200 {
        let mut b = good.clone();
        for _ in 0..rng.gen_range(1..8) {
            let i = rng.gen_range(0..b.len());
            b[i] = rng.gen();
        }
        std::fs::write(&bad, &b).unwrap();
        match load_pretrained(&bad, "teacher", None) {
            Ok(p) => {
                ok += 1;
                assert_eq!(shapes(&p), want, "a damaged file loaded as another model");
                assert_eq!(
                    p.config, reference.config,
                    "a damaged file changed the architecture"
                );
            }
            Err(e) => {
                err += 1;
                assert!(
                    !format!("{e:#}").trim().is_empty(),
                    "an error without a message"
                );
            }
        }
    }
    println!("random corruption: {ok} loaded whole, {err} refused");
    // Not a checkpoint at all.
    std::fs::write(&bad, b"hello").unwrap();
    assert!(load_pretrained(&bad, "teacher", None).is_err());
}
