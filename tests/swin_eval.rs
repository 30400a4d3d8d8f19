//! Swin backbones in every command that loads weights: official-layout `.pth` files built at
//! test time from the `visible_swin` reference fixture (tests/py/make_official_pth.py) must load
//! with the shape read off their tensors and reproduce the official outputs (1e-5); a tiny
//! `ibot train` Swin run must go through eval-knn, eval-unsup, eval-linear, extract-features
//! and extract-backbone (whose output loads back with identical outputs), while --timm and
//! visualize-attention are refused with a reason; `ibot bench train` runs a Swin step.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use clap::Parser;
use ibot::cli::train::TrainArgs;
use ibot::eval::features::{self, FeatureKind};
use ibot::interop::{export_backbone, load_pretrained, read_pth};
use ibot::models::{Backbone, BackboneConfig, SwinConfig};
use ibot::params::read_safetensors;
use ibot::train::run;
use tch::{Device, Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");
const TOL: f64 = 1e-5;

fn fixture() -> Option<std::collections::HashMap<String, Tensor>> {
    let dir = common::fixture_dir("visible_swin")?;
    Some(read_safetensors(&dir.join("fixtures.safetensors")).unwrap())
}

fn fx(k: &str) -> Tensor {
    fixture()
        .expect("guarded")
        .remove(k)
        .unwrap_or_else(|| panic!("fixture has no {k}"))
}

/// The official layouts of the fixture's student, written by the venv's torch (built once).
fn pth_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::scratch_dir("swin-eval", "pth");
        let named: Vec<(String, Tensor)> = fixture()
            .expect("guarded")
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("student.").map(|n| (n.to_string(), v)))
            .collect();
        assert!(
            named
                .iter()
                .any(|(k, _)| k.contains("relative_position_bias_table")),
            "fixture student parameters missing"
        );
        common::make_official_pth(&named, &dir, Some("swin_tiny"));
        dir
    })
}

fn swin_of(p: &ibot::interop::Pretrained) -> SwinConfig {
    p.swin()
        .unwrap_or_else(|| panic!("not read as a Swin: {}", p.description))
        .clone()
}

#[test]
fn every_official_swin_layout_loads_and_reproduces_the_official_outputs() {
    if fixture().is_none() {
        return;
    }
    let dir = pth_dir();
    let x = fx("in.global_crops").get(0);
    let want = fx("out.teacher_backbone_g0");
    for file in [
        "full.pth",
        "legacy.pth",
        "teacher_state.pth",
        "teacher_bare.pth",
    ] {
        let p = load_pretrained(&dir.join(file), "teacher", None)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let c = swin_of(&p);
        assert_eq!(
            (
                c.embed_dim,
                c.depths.clone(),
                c.num_heads.clone(),
                c.window_size,
                c.patch_size,
                c.img_size
            ),
            (24, vec![2, 2, 2, 2], vec![3, 6, 12, 24], 14, 4, 224),
            "{file}"
        );
        assert!(
            c.qkv_bias && !c.masked_im_modeling && c.mlp_ratio == 4.0,
            "{file}: {c:?}"
        );
        let (_, m) = p.backbone_model(Device::Cpu).unwrap();
        assert!(matches!(m, Backbone::Swin(_)));
        let got = tch::no_grad(|| m.forward(&x, None, false)).unwrap();
        common::assert_close(file, &got, &want, TOL);
        // --arch is checked against the shapes; --num_heads is a ViT option.
        assert!(load_pretrained(&dir.join(file), "teacher", Some("swin_tiny")).is_err());
        assert!(load_pretrained(&dir.join(file), "teacher", Some("vit_small")).is_err());
        assert!(
            ibot::interop::load_pretrained_with(&dir.join(file), "teacher", None, Some(3)).is_err()
        );
    }
}

#[test]
fn the_full_swin_checkpoint_gives_teacher_head_and_masked_student() {
    if fixture().is_none() {
        return;
    }
    let path = pth_dir().join("full.pth");
    let f = read_pth(&path).unwrap();
    assert!(f.skipped.iter().any(|s| s.contains("argparse.Namespace")));
    let t = load_pretrained(&path, "teacher", None).unwrap();
    let (_, m) = t.backbone_model(Device::Cpu).unwrap();
    let (_, head) = t
        .head_model(Device::Cpu)
        .unwrap()
        .expect("the teacher has a head");
    assert_eq!(head.cfg.in_dim, 192);
    let x = fx("in.global_crops").get(0);
    let b = x.size()[0];
    let cls = tch::no_grad(|| head.forward_cls(&m.forward(&x, None, false).unwrap().select(1, 0)));
    common::assert_close(
        "teacher [CLS] head",
        &cls,
        &fx("out.teacher_cls").narrow(0, 0, b),
        TOL,
    );
    // The student: `module.` prefixes, masked_embed, masked forward of both global views.
    let s = load_pretrained(&path, "student", None).unwrap();
    assert!(swin_of(&s).masked_im_modeling);
    let (_, sm) = s.backbone_model(Device::Cpu).unwrap();
    let g = fx("in.global_crops");
    let views = Tensor::cat(&[g.get(0), g.get(1)], 0);
    let mk = fx("in.masks_global");
    let masks = Tensor::cat(&[mk.get(0), mk.get(1)], 0).to_kind(Kind::Bool);
    let got = tch::no_grad(|| sm.forward(&views, Some(&masks), false)).unwrap();
    common::assert_close(
        "student masked backbone",
        &got,
        &fx("out.student_backbone_masked"),
        TOL,
    );
}

#[test]
fn swin_pth_and_exported_safetensors_give_identical_outputs() {
    if fixture().is_none() {
        return;
    }
    let dir = pth_dir();
    let p = load_pretrained(&dir.join("teacher_state.pth"), "teacher", None).unwrap();
    let out = dir.join("exported.safetensors");
    export_backbone(&p, &out, false).unwrap();
    let q = load_pretrained(&out, "teacher", None).unwrap();
    assert_eq!(p.config, q.config);
    let t = read_safetensors(&out).unwrap();
    assert!(t.contains_key("layers.3.blocks.1.attn.relative_position_bias_table"));
    assert!(t.contains_key("layers.0.blocks.0.attn.relative_position_index"));
    let (_, a) = p.backbone_model(Device::Cpu).unwrap();
    let (_, b) = q.backbone_model(Device::Cpu).unwrap();
    let x = fx("in.global_crops").get(1);
    let (ya, yb) = tch::no_grad(|| {
        (
            a.forward(&x, None, false).unwrap(),
            b.forward(&x, None, false).unwrap(),
        )
    });
    assert!(ya.equal(&yb), "outputs differ between .pth and safetensors");
    let e = export_backbone(&p, &dir.join("timm.safetensors"), true).unwrap_err();
    assert!(format!("{e:#}").contains("timm"), "{e:#}");
    // A bare state dict without the (constant) relative_position_index buffers still loads.
    let stripped: Vec<(String, Tensor)> = t
        .iter()
        .filter(|(k, _)| !k.ends_with("relative_position_index"))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let bare = dir.join("no_index.safetensors");
    ibot::params::write_safetensors(&bare, &stripped, None).unwrap();
    let r = load_pretrained(&bare, "teacher", None).unwrap();
    assert_eq!(r.config, p.config);
    let (_, c) = r.backbone_model(Device::Cpu).unwrap();
    assert!(tch::no_grad(|| c.forward(&x, None, false))
        .unwrap()
        .equal(&ya));
}

// ---- a tiny `ibot train` Swin run through the commands -------------------------------------

#[derive(Parser)]
#[command(args_override_self = true)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

/// IDX images (`train-*` and the same as `t10k-*`) with labels 0..3.
fn write_idx(dir: &Path, n: usize, side: usize) {
    let mut img = vec![0, 0, 8, 3];
    for v in [n, side, side] {
        img.extend_from_slice(&(v as u32).to_be_bytes());
    }
    img.extend(
        (0..n * side * side).map(|i| ((i * 37 + i / 7 + (i / (side * side)) * 11) % 256) as u8),
    );
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| (i % 3) as u8));
    for split in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), &img).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), &lab).unwrap();
    }
}

fn ibot(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = ibot(args);
    assert!(
        o.status.success(),
        "ibot {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(args: &[&str], why: &str) {
    let o = ibot(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ibot {args:?} should fail");
    assert!(
        err.contains(why),
        "ibot {args:?}: expected '{why}' in: {err}"
    );
}

#[test]
fn a_trained_swin_goes_through_the_evaluation_commands() {
    let data = common::scratch_dir("swin-eval", "data");
    write_idx(&data, 12, 40);
    let out = common::scratch_dir("swin-eval", "run");
    let r = run::train(&common::tiny_swin_args(
        &data,
        &out,
        &[
            "--epochs",
            "1",
            "--warmup_epochs",
            "0",
            "--warmup_teacher_temp_epochs",
            "0",
            "--num_workers",
            "1",
        ],
    ))
    .unwrap();
    assert_eq!(r.epochs_done, 1);
    let ckpt = out.join("checkpoint.safetensors");
    let ck = ckpt.to_str().unwrap();
    let d = data.to_str().unwrap();

    // The checkpoint's own configuration is used (no guessing): built for 32 px.
    let p = load_pretrained(&ckpt, "teacher", None).unwrap();
    let c = swin_of(&p);
    assert_eq!(
        (c.img_size, c.window_size, c.depths.clone()),
        (32, 3, vec![2, 2])
    );
    assert!(!c.masked_im_modeling);
    assert!(swin_of(&load_pretrained(&ckpt, "student", None).unwrap()).masked_im_modeling);
    let (_, m) = p.backbone_model(Device::Cpu).unwrap();

    // eval-knn: the features are the average-pooled token 0, L2-normalised.
    let feats = out.join("feats");
    let knn = out.join("knn.json");
    let o = ok(&[
        "eval-knn",
        "--pretrained_weights",
        ck,
        "--data_path",
        d,
        "--nb_knn",
        "3",
        "--device",
        "cpu",
        "--dump_features",
        feats.to_str().unwrap(),
        "--output",
        knn.to_str().unwrap(),
    ]);
    assert!(o.contains("3-NN classifier result"), "{o}");
    let dumped = read_safetensors(&feats.join("knn_features.safetensors")).unwrap();
    let ds = ibot::data::dataset::open(&data, "t10k").unwrap();
    let idx: Vec<usize> = (0..ds.len()).collect();
    let (want, _) = features::extract(
        Some(&m),
        FeatureKind::Backbone(ibot::eval::features::FeatureSpec::CLS),
        ds.as_ref(),
        &idx,
        32,
        5,
        Device::Cpu,
    )
    .unwrap();
    let (x, _) = features::eval_batch(ds.as_ref(), &idx, 32).unwrap();
    let pooled = tch::no_grad(|| m.forward(&x, None, false))
        .unwrap()
        .select(1, 0);
    let manual = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
    common::assert_close("token 0 features", &want, &manual, 1e-6);
    common::assert_close("eval-knn features", &dumped["test_features"], &want, 1e-5);

    // eval-unsup: the teacher head on token 0.
    let o = ok(&[
        "eval-unsup",
        "--pretrained_weights",
        ck,
        "--data_path",
        d,
        "--device",
        "cpu",
    ]);
    assert!(o.contains("NMI:"), "{o}");

    // extract-features: by default token 0 (unnormalised); --n_last_blocks 3 concatenates the
    // pooled outputs of the last 3 blocks (widths 24 + 48 + 48); --avgpool_patchtokens refused.
    let f1 = out.join("f1.safetensors");
    ok(&[
        "extract-features",
        "--pretrained_weights",
        ck,
        "--data_path",
        d,
        "--split",
        "t10k",
        "--output",
        f1.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    common::assert_close(
        "extract-features",
        &read_safetensors(&f1).unwrap()["features"],
        &pooled,
        1e-5,
    );
    let f3 = out.join("f3.safetensors");
    ok(&[
        "extract-features",
        "--pretrained_weights",
        ck,
        "--data_path",
        d,
        "--output",
        f3.to_str().unwrap(),
        "--n_last_blocks",
        "3",
        "--device",
        "cpu",
    ]);
    assert_eq!(read_safetensors(&f3).unwrap()["features"].size(), [12, 120]);
    refused(
        &[
            "extract-features",
            "--pretrained_weights",
            ck,
            "--data_path",
            d,
            "--output",
            out.join("f4.safetensors").to_str().unwrap(),
            "--avgpool_patchtokens",
            "1",
            "--device",
            "cpu",
        ],
        "ViT option",
    );

    // eval-linear: the official default --n_last_blocks 4 = every block of this tiny Swin.
    let lin = out.join("linear");
    ok(&[
        "eval-linear",
        "--pretrained_weights",
        ck,
        "--data_path",
        d,
        "--epochs",
        "1",
        "--crop_size",
        "32",
        "--batch_size_per_gpu",
        "6",
        "--output_dir",
        lin.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let res: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lin.join("results_linear_teacher.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(res["feature_dim"], 24 + 24 + 48 + 48);

    // extract-backbone: official names, configuration in the metadata, identical outputs.
    let bb = out.join("backbone.safetensors");
    ok(&["extract-backbone", ck, bb.to_str().unwrap()]);
    let q = load_pretrained(&bb, "teacher", None).unwrap();
    assert_eq!(q.config, p.config);
    assert!(matches!(q.config, BackboneConfig::Swin(_)));
    let (_, mq) = q.backbone_model(Device::Cpu).unwrap();
    let yq = tch::no_grad(|| mq.forward(&x, None, false)).unwrap();
    let yp = tch::no_grad(|| m.forward(&x, None, false)).unwrap();
    assert!(yq.equal(&yp), "the exported backbone gives other outputs");
    let names = read_safetensors(&bb).unwrap();
    assert!(!names.contains_key("layers.1.downsample.reduction.weight"));
    assert!(names.contains_key("layers.0.downsample.reduction.weight"));
    assert!(names.contains_key("norm.weight") && !names.contains_key("masked_embed"));
    refused(
        &[
            "extract-backbone",
            ck,
            out.join("timm.safetensors").to_str().unwrap(),
            "--timm",
        ],
        "timm",
    );

    // visualize-attention: no global [CLS] attention in a Swin.
    let img = out.join("img.png");
    image_png(&img);
    refused(
        &[
            "visualize-attention",
            "--pretrained_weights",
            ck,
            "--image_path",
            img.to_str().unwrap(),
            "--output_dir",
            out.join("attn").to_str().unwrap(),
            "--device",
            "cpu",
        ],
        "no global [CLS]",
    );
}

/// A small PNG for visualize-attention.
fn image_png(path: &Path) {
    let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([x as u8 * 6, y as u8 * 6, 128]));
    img.save(path).unwrap();
}

#[test]
fn pooled_block_outputs_end_with_the_forward_token_0() {
    let cfg = SwinConfig {
        img_size: 32,
        embed_dim: 24,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 3,
        drop_path_rate: 0.0,
        ..SwinConfig::from_arch("swin_tiny", 3).unwrap()
    };
    let (_ps, m) = ibot::train::seeded_init(4, || {
        let mut ps = ibot::params::ParamStore::new();
        let m = ibot::models::SwinTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
        (ps, m)
    });
    let x = ibot::train::seeded_init(5, || {
        Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    let y = m.forward(&x, None, false).unwrap();
    let f = m.intermediate_avgpool(&x, 4).unwrap();
    assert_eq!(f.len(), 4);
    assert_eq!(m.intermediate_widths(4), [24, 24, 48, 48]);
    assert_eq!(m.intermediate_widths(1), [48]);
    assert!(f[3].equal(&y.select(1, 0)));
    assert_eq!(f[0].size(), [2, 24]);
    assert!(m.intermediate_avgpool(&x, 5).is_err());
}

#[test]
fn the_training_benchmark_runs_a_swin() {
    let o = ok(&[
        "bench",
        "train",
        "--arch",
        "swin_tiny",
        "--window_size",
        "7",
        "--batch",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--global_crops_size",
        "64",
        "--local_crops_size",
        "32",
        "--local_crops_number",
        "1",
        "--out_dim",
        "64",
    ]);
    assert!(o.contains("swin_tiny/4 batch 1 2x64 + 1x32"), "{o}");
    // Swin masks are drawn on 8x8-patch cells: the crop must be whole cells.
    refused(
        &[
            "bench",
            "train",
            "--arch",
            "swin_tiny",
            "--global_crops_size",
            "48",
            "--iters",
            "1",
        ],
        "mask cell",
    );
}

#[test]
fn bare_swin_weights_of_another_resolution_are_refused_with_the_reason() {
    // Built for 32 px with window 7: stage 1 (4x4) clamps its window to 4, which a Swin built
    // for 224 px would not do; without stored metadata the shapes cannot say which model this is.
    let cfg = SwinConfig {
        img_size: 32,
        embed_dim: 24,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 7,
        drop_path_rate: 0.0,
        ..SwinConfig::from_arch("swin_tiny", 7).unwrap()
    };
    let mut ps = ibot::params::ParamStore::new();
    let _m = ibot::models::SwinTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
    let dir = common::scratch_dir("swin-eval", "resolution");
    let path = dir.join("bare.safetensors");
    ps.save_safetensors(&path, "").unwrap();
    let e = load_pretrained(&path, "teacher", None).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("stage 1 block 0 has a 4x4 window") && msg.contains("224"),
        "{msg}"
    );
    // The same model built for 224 px loads, with window 7 everywhere.
    let cfg224 = SwinConfig {
        img_size: 224,
        ..cfg
    };
    let mut ps = ibot::params::ParamStore::new();
    let _m = ibot::models::SwinTransformer::new(&mut ps, "", &cfg224, false, Device::Cpu).unwrap();
    ps.save_safetensors(&path, "").unwrap();
    let p = load_pretrained(&path, "teacher", None).unwrap();
    assert_eq!(p.config, BackboneConfig::Swin(cfg224));
}
