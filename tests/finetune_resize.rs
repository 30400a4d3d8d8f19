//! Fine-tuning at another input size or window than pre-training: a Swin's
//! `relative_position_bias_table`s resized bicubically (the official Swin `init_weights` /
//! timm `resize_rel_pos_bias_table_simple` convention; the official run_class_finetuning.py has
//! no working Swin path, see README) and a ViT's `pos_embed` interpolated as
//! run_class_finetuning.py does. References from tests/py/finetune_swin_ref.py `resize`, run at
//! test time with timm and PyTorch in the venv.

mod common;

use std::collections::HashMap;
use std::path::Path;

use clap::Parser;
use ibot::finetune::model::resize_pos_embed;
use ibot::finetune::run::build_model;
use ibot::finetune::FinetuneConfig;
use ibot::models::swin::{relative_position_index, resize_rel_pos_bias_table};
use ibot::models::{SwinConfig, VitConfig};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ibot::cli::finetune::FinetuneArgs,
}

fn config(argv: &[&str]) -> FinetuneConfig {
    let mut v = vec!["x", "--data_path", "unused", "--device", "cpu"];
    v.extend_from_slice(argv);
    let mut c = Cli::parse_from(v).args.to_config().unwrap();
    c.progress = false;
    c
}

/// Runs `tests/py/finetune_swin_ref.py resize in.npz out.npz` on `inputs`.
fn reference(inputs: &[(String, Tensor)], dir: &Path) -> HashMap<String, Tensor> {
    let (inp, out) = (dir.join("in.npz"), dir.join("out.npz"));
    Tensor::write_npz(inputs, &inp).unwrap();
    let st = std::process::Command::new(common::venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/finetune_swin_ref.py"))
        .arg("resize")
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "finetune_swin_ref.py resize failed");
    Tensor::read_npz(&out).unwrap().into_iter().collect()
}

/// Exact equality (same libtorch bicubic kernel on the same float32 values in the same layout).
fn assert_equal(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let d = ibot::util::max_abs(&(got - want));
    assert!(
        d == 0.0,
        "{name}: max abs difference {d}, expected bit-for-bit"
    );
}

/// `resize_rel_pos_bias_table` equals timm 1.0.31's `resize_rel_pos_bias_table_simple` and the
/// official Swin `init_weights` formula bit for bit, up (7 → 12, the Swin fine-tuning at 384
/// px; 4 → 6) and down (7 → 3, 4 → 2), and keeps a table of the same window unchanged; each new
/// window's `relative_position_index` equals the official one. `resize_pos_embed` equals
/// run_class_finetuning.py's pos_embed interpolation bit for bit (14² → 24², 4² → 7², 7² → 3²).
///
/// Mutations checked by hand (each failed, then reverted): `align_corners = true` in
/// `resize_rel_pos_bias_table` (table 0, 7 -> 12, 0.955 apart from timm); the table reshaped to
/// `[1, heads, S, S]` without first transposing it to heads-major (4.9 apart).
#[test]
fn resize_functions_match_timm_and_the_official_formulas() {
    tch::manual_seed(1);
    let tables = [
        (7i64, 3i64, 12i64),
        (7, 2, 3),
        (4, 1, 6),
        (4, 4, 2),
        (5, 2, 5),
    ];
    let grids = [(14i64, 24i64, 8i64), (4, 7, 6), (7, 3, 4)];
    let mut inputs = Vec::new();
    for (i, &(w0, heads, w1)) in tables.iter().enumerate() {
        let s = 2 * w0 - 1;
        inputs.push((
            format!("table.{i}"),
            Tensor::randn([s * s, heads], (Kind::Float, Device::Cpu)),
        ));
        inputs.push((format!("window.{i}"), Tensor::from(w1)));
    }
    for (i, &(g0, g1, d)) in grids.iter().enumerate() {
        inputs.push((
            format!("pos.{i}"),
            Tensor::randn([1, 1 + g0 * g0, d], (Kind::Float, Device::Cpu)),
        ));
        inputs.push((format!("grid.{i}"), Tensor::from(g1)));
    }
    let dir = common::scratch_dir("finetune_resize", "functions");
    let r = reference(&inputs, &dir);
    let inp: HashMap<String, Tensor> = inputs.into_iter().collect();
    for (i, &(w0, _, w1)) in tables.iter().enumerate() {
        let t = &inp[&format!("table.{i}")];
        let got = resize_rel_pos_bias_table(t, w1).unwrap();
        let name = format!("table {i} ({w0} -> {w1})");
        assert_equal(&format!("{name} vs timm"), &got, &r[&format!("timm.{i}")]);
        if w0 != w1 {
            assert_equal(
                &format!("{name} vs the official init_weights"),
                &got,
                &r[&format!("official.{i}")],
            );
        } else {
            assert_equal(&format!("{name} unchanged"), &got, t);
        }
        assert_equal(
            &format!("relative_position_index of window {w1}"),
            &relative_position_index(w1, Device::Cpu),
            &r[&format!("index.{i}")],
        );
    }
    for (i, &(g0, g1, d)) in grids.iter().enumerate() {
        let got = resize_pos_embed(&inp[&format!("pos.{i}")], &[1, 1 + g1 * g1, d]).unwrap();
        assert_equal(
            &format!("pos_embed {g0} -> {g1}"),
            &got,
            &r[&format!("pos.{i}")],
        );
    }
    // Bad tables are refused with a message.
    let e = resize_rel_pos_bias_table(&Tensor::zeros([10, 2], (Kind::Float, Device::Cpu)), 3)
        .unwrap_err();
    assert!(e.to_string().contains("not (2w-1)²"), "{e}");
}

/// A tiny pre-trained Swin (2-px patches on 16 px, window 4: stage windows 4 and 4) saved with
/// its configuration, as `extract-backbone` writes it.
fn tiny_swin(path: &Path) -> HashMap<String, Tensor> {
    let cfg = SwinConfig {
        img_size: 16,
        patch_size: 2,
        in_chans: 3,
        embed_dim: 12,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 4,
        mlp_ratio: 4.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    };
    common::save_swin_backbone(path, &cfg, 5)
}

/// `ibot finetune` builds the Swin for `--input_size` / `--window_size` and loads every
/// pre-trained table resized to its block's new window, equal bit for bit to timm's
/// `resize_rel_pos_bias_table_simple` of the pre-trained table; the other tensors load
/// unchanged. Settings: `--input_size 24 --window_size 6` (stage grids 12 and 6: windows 6 and
/// 6, tables 7² → 11²), `--input_size 8` (grids 4 and 2: stage 1 clamps its window to 2, its
/// tables 7² → 3², stage 0 keeps 7²), and `--window_size 12` at 16 px (windows clamp to the
/// grids 8 and 4: 7² → 15² and unchanged). A ViT refuses `--window_size`.
///
/// Mutations checked by hand (each failed, then reverted): `align_corners = true` in
/// `resize_rel_pos_bias_table` (the first table of `--input_size 24 --window_size 6` 1.3e-2
/// off); the model's window taken as `sqrt(rows)` instead of `(sqrt(rows) + 1) / 2` in
/// `Classifier::load_pretrained` (the load fails on a shape mismatch).
#[test]
fn swin_finetune_at_another_window_or_size_loads_resized_tables() {
    let root = common::scratch_dir("finetune_resize", "swin");
    let w = root.join("swin.safetensors");
    let pre = tiny_swin(&w);
    for (argv, windows) in [
        (vec!["--input_size", "24", "--window_size", "6"], [6i64, 6]),
        (vec!["--input_size", "8"], [4, 2]),
        (vec!["--input_size", "16", "--window_size", "12"], [8, 4]),
    ] {
        let mut a = vec!["--pretrained_weights", w.to_str().unwrap()];
        a.extend_from_slice(&argv);
        let cfg = config(&a);
        let (model, _) = build_model(&cfg, 3, Device::Cpu).unwrap();
        let mut inputs = Vec::new();
        let mut names = Vec::new();
        for (k, t) in &pre {
            if !k.ends_with("relative_position_bias_table") {
                continue;
            }
            let stage: usize = k.split('.').nth(1).unwrap().parse().unwrap();
            let i = names.len();
            inputs.push((format!("table.{i}"), t.shallow_clone()));
            inputs.push((format!("window.{i}"), Tensor::from(windows[stage])));
            names.push(k.clone());
        }
        let dir = common::scratch_dir("finetune_resize", &format!("swin{}", argv.join("")));
        let r = reference(&inputs, &dir);
        let sd: HashMap<String, Tensor> = model
            .ps
            .state_dict()
            .map(|(k, t)| (k.to_string(), t.detach()))
            .collect();
        for (i, k) in names.iter().enumerate() {
            assert_equal(&format!("{argv:?} {k}"), &sd[k], &r[&format!("timm.{i}")]);
            let ik = k.replace("relative_position_bias_table", "relative_position_index");
            assert_equal(
                &format!("{argv:?} {ik}"),
                &sd[&ik],
                &r[&format!("index.{i}")],
            );
        }
        for k in [
            "layers.1.blocks.1.mlp.fc1.weight",
            "patch_embed.proj.weight",
        ] {
            assert_equal(&format!("{argv:?} {k}"), &sd[k], &pre[k]);
        }
    }
}

/// `ibot finetune --input_size` on a ViT pre-trained at another size loads `pos_embed`
/// interpolated as run_class_finetuning.py does (bit for bit: 4x4 → 6x6 and → 2x2 patches),
/// the [CLS] row unchanged.
///
/// Mutation checked by hand (failed, then reverted): `align_corners = true` in
/// `resize_pos_embed` (pos_embed at 24 px 1.26e-2 off).
#[test]
fn vit_finetune_at_another_size_interpolates_pos_embed() {
    let root = common::scratch_dir("finetune_resize", "vit");
    let w = root.join("vit.safetensors");
    let vc = VitConfig {
        mlp_ratio: 2.0,
        ..common::vit_config(24, 2, 2, 4, 16)
    };
    let pre = common::save_vit_backbone(&w, &vc, 3, vec![]);
    for size in [24i64, 8] {
        let s = size.to_string();
        let cfg = config(&[
            "--pretrained_weights",
            w.to_str().unwrap(),
            "--input_size",
            &s,
        ]);
        let (model, _) = build_model(&cfg, 3, Device::Cpu).unwrap();
        let dir = common::scratch_dir("finetune_resize", &format!("vit{size}"));
        let r = reference(
            &[
                ("pos.0".to_string(), pre["pos_embed"].shallow_clone()),
                ("grid.0".to_string(), Tensor::from(size / 4)),
            ],
            &dir,
        );
        let sd: HashMap<String, Tensor> = model
            .ps
            .state_dict()
            .map(|(k, t)| (k.to_string(), t.detach()))
            .collect();
        assert_equal(
            &format!("pos_embed at {size} px"),
            &sd["pos_embed"],
            &r["pos.0"],
        );
        assert_equal(
            "cls row",
            &sd["pos_embed"].narrow(1, 0, 1),
            &pre["pos_embed"].narrow(1, 0, 1),
        );
    }
    let cfg = config(&[
        "--pretrained_weights",
        w.to_str().unwrap(),
        "--window_size",
        "7",
    ]);
    let e = build_model(&cfg, 3, Device::Cpu).unwrap_err();
    assert!(
        format!("{e:#}").contains("--window_size is a Swin option"),
        "{e:#}"
    );
}
