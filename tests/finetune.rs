//! `ibot finetune`: parameter groups and one optimisation step against the official code's
//! definitions in PyTorch (tests/py/finetune_ref.py), exact resume, log.txt keys, bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use ibot::finetune::groups::get_parameter_groups;
use ibot::finetune::model::{Classifier, ClassifierConfig};
use ibot::finetune::run::Trainer;
use ibot::finetune::FinetuneConfig;
use ibot::models::VitConfig;
use tch::{Device, Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ibot::cli::finetune::FinetuneArgs,
}

fn config(argv: &[&str]) -> FinetuneConfig {
    let mut v = vec!["x"];
    v.extend_from_slice(argv);
    let mut c = Cli::parse_from(v).args.to_config().unwrap();
    c.progress = false;
    c
}

use common::vit_config as vit;

fn classifier(v: VitConfig, nb_classes: i64, mean_pooling: bool, init_scale: f64) -> Classifier {
    Classifier::new(
        &ClassifierConfig {
            backbone: v.into(),
            nb_classes,
            use_mean_pooling: mean_pooling,
            finetune_head_layer: 0,
            head_hidden_dim: 0,
            init_scale,
        },
        Device::Cpu,
    )
    .unwrap()
}

/// The groups (name, weight decay, lr scale, parameter names) of the official
/// `get_parameter_groups` with `LayerDecayValueAssigner` and the skip list {pos_embed,
/// cls_token}, computed by tests/py/finetune_ref.py on a model with modeling_finetune's
/// parameter names and order, must equal ours exactly, lr scales bit for bit.
///
/// Mutations checked by hand (each made the test fail, then reverted): the exponent
/// `depth - i` instead of `depth + 1 - i` in `layer_scales` (lr_scale of layer_0_no_decay
/// 0.0317 vs 0.0238); weight decay on biases (`dim() == 1 && !name.ends_with(".bias")` as the
/// no-decay rule: blocks.0.attn.qkv.bias moves to layer_1_decay); no skip list (pos_embed and
/// cls_token move to layer_0_decay).
#[test]
fn layer_decay_groups_match_the_official_get_parameter_groups() {
    for (name, d, heads, mean_pooling, ld) in [
        ("ViT-S/16", 384, 6, false, 0.75),
        ("ViT-T/16", 192, 3, true, 0.65),
    ] {
        let m = classifier(vit(d, 12, heads, 16, 224), 10, mean_pooling, 0.001);
        let wd = 0.05;
        let ours = get_parameter_groups(&m.ps, &["pos_embed", "cls_token"], Some((ld, 12)));
        let cfg = serde_json::json!({"embed_dim": d, "depth": 12, "num_heads": heads,
            "nb_classes": 10, "mean_pooling": mean_pooling, "layer_decay": ld, "weight_decay": wd});
        let want: Vec<(String, f64, String, Vec<String>)> = serde_json::from_slice(
            &common::python_stdout("finetune_ref.py", &["groups", &cfg.to_string()]),
        )
        .unwrap();
        // lr scales as shortest round-trip text (Python's repr, Rust's {:?}): equal text is
        // equal bits.
        let got: Vec<(String, f64, String, Vec<String>)> = ours
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    if g.weight_decay { wd } else { 0.0 },
                    format!("{:?}", g.lr_scale),
                    g.indices
                        .iter()
                        .map(|&i| m.ps.params()[i].name.clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: number of groups");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{name}: group {}", w.0);
        }
        assert_eq!(got.len(), 2 * 14, "{name}: 14 layers x (decay, no_decay)");
    }
}

/// One optimisation step of `imagenet_layer_decay` (Mixup targets with smoothing, layer decay
/// 0.75, weight decay 0.3, clipping to a norm the gradient exceeds) equals the same step in
/// PyTorch (official forward, timm's mixup targets and SoftTargetCrossEntropy, clip_grad_norm_,
/// AdamW over the official groups) on the same weights and images: loss and gradient norm to
/// 1e-5 relative, every clipped gradient to 1e-5 of its largest element, every parameter after
/// the step to 1e-5 absolute (all parameters moved off their initial values first, so that
/// weight decay shows on biases and norms too). The key bias of every
/// attention layer is left out: its gradient is mathematically zero (softmax ignores a constant
/// shift), float noise of ~1e-9 that Adam's first step turns into updates of up to lr in either
/// implementation (see README, Faithfulness).
///
/// Mutations checked by hand (each failed, then reverted): lr scale exponent `depth - i`
/// (cls_token differs by 1.4e-4), weight decay on biases (patch_embed.proj.bias differs by
/// 1.1e-4), clipping skipped (Adam's first step hardly sees a gradient's scale; the clipped
/// gradients catch it: 4.8 apart relative to their largest element).
#[test]
fn one_step_equals_pytorch() {
    let _g = tch::no_grad_guard();
    drop(_g);
    for mean_pooling in [false, true] {
        tch::manual_seed(7);
        let (d, depth, heads, patch, ncls, b) = (24i64, 2i64, 2i64, 4i64, 5i64, 6i64);
        let model = classifier(vit(d, depth, heads, patch, 16), ncls, mean_pooling, 1.0);
        // Move every parameter off its initial value (biases start at 0, norms at 1, where
        // weight decay would be invisible).
        tch::no_grad(|| {
            for p in model.ps.params() {
                let n = p.tensor.randn_like() * if p.tensor.dim() == 1 { 0.5 } else { 0.02 };
                let _ = p.tensor.detach().g_add_(&n);
            }
        });
        let x = Tensor::randn([b, 3, 16, 16], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 3, 1, 4, 2, 1]);
        let (lam, smoothing, ld, lr, wd, clip) = (0.7f64, 0.1, 0.75, 1e-3, 0.3, 0.5);
        let mut inputs: Vec<(String, Tensor)> = model
            .ps
            .state_dict()
            .map(|(k, t)| (format!("p.{k}"), t.detach().copy()))
            .collect();
        inputs.push(("x".into(), x.copy()));
        inputs.push(("y".into(), y.copy()));
        let cfgv = [
            d as f64,
            depth as f64,
            heads as f64,
            patch as f64,
            ncls as f64,
            lam,
            smoothing,
            ld,
            lr,
            wd,
            clip,
            mean_pooling as i32 as f64,
        ];
        inputs.push(("cfg".into(), Tensor::from_slice(&cfgv)));
        let dir = common::scratch_dir("finetune", &format!("step{mean_pooling}"));
        let (inp, out) = (dir.join("in.npz"), dir.join("out.npz"));
        Tensor::write_npz(&inputs, &inp).unwrap();
        let st = std::process::Command::new(common::venv_python())
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/finetune_ref.py"))
            .args(["step".as_ref(), inp.as_os_str(), out.as_os_str()])
            .status()
            .unwrap();
        assert!(st.success());
        let r: HashMap<String, Tensor> = Tensor::read_npz(&out).unwrap().into_iter().collect();

        // Batch-mode Mixup with lambda `lam` and timm's targets (one_hot on/off values).
        let xm = &x * lam + x.flip([0]) * (1.0 - lam);
        let (off, on) = (
            smoothing / ncls as f64,
            1.0 - smoothing + smoothing / ncls as f64,
        );
        let oh = |t: &Tensor| t.one_hot(ncls).to_kind(Kind::Float) * (on - off) + off;
        let target = oh(&y) * lam + oh(&y.flip([0])) * (1.0 - lam);
        common::assert_close("mixed images", &xm, &r["x_mixed"], 1e-6);
        common::assert_close("soft targets", &target, &r["target"], 1e-7);

        let cfg = config(&[
            "--data_path",
            "/nonexistent",
            "--layer_decay",
            "0.75",
            "--weight_decay",
            "0.3",
            "--clip_grad",
            "0.5",
            "--smoothing",
            "0.1",
            "--drop_path",
            "0",
        ]);
        let mut t = Trainer::new(model, &cfg, Device::Cpu).unwrap();
        t.keep_grads = true;
        let s = t.micro_step(&xm, &target, lr, wd).unwrap();
        common::assert_finetune_step_matches("", &s, &t, &r, clip);
    }
}

/// A tiny pre-trained backbone (width 24, two blocks, 4-px patches on 16 px) saved as
/// `extract-backbone` writes it, optionally with a classifier of `head_classes` rows.
fn tiny_backbone(path: &Path, head_classes: Option<i64>) {
    let cfg = VitConfig {
        mlp_ratio: 2.0,
        ..vit(24, 2, 2, 4, 16)
    };
    let head = head_classes.map_or(vec![], |k| {
        vec![
            (
                "head.weight".into(),
                Tensor::zeros([k, 24], (Kind::Float, Device::Cpu)),
            ),
            (
                "head.bias".into(),
                Tensor::zeros([k], (Kind::Float, Device::Cpu)),
            ),
        ]
    });
    common::save_vit_backbone(path, &cfg, 3, head);
}

fn tiny_data(dir: &Path, n_train: usize) {
    std::fs::create_dir_all(dir).unwrap();
    common::write_idx(dir, "train", n_train, 16);
    common::write_idx(dir, "t10k", 24, 16);
}

fn log_keys(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            // Keys in file order (serde_json's map would sort them).
            let mut keys = Vec::new();
            let mut rest = l;
            while let Some(i) = rest.find("\"") {
                let after = &rest[i + 1..];
                let j = after.find('"').unwrap();
                keys.push(after[..j].to_string());
                rest = &after[j + 1..];
                rest = &rest[rest.find([',', '}']).unwrap()..];
            }
            keys
        })
        .collect()
}

fn checkpoint_tensors(dir: &Path) -> HashMap<String, Tensor> {
    ibot::params::read_safetensors(&dir.join("checkpoint.safetensors")).unwrap()
}

/// A run stopped after epoch 1 and resumed ends bit for bit where an uninterrupted run ends
/// (float32 on the CPU: model, EMA and AdamW state, and log.txt's numbers), with drop path,
/// dropout (`--drop`, `--attn_drop_rate`), the EMA and gradient accumulation on. (Mutation
/// checked by hand: libtorch's generator seeded for dropout from a process-wide counter instead
/// of the per-epoch drop-path generator: model_ema.blocks.1.mlp.fc2.weight differs after
/// resuming.) log.txt carries the official keys in the official
/// order (run_class_finetuning.py's MetricLogger: lr, min_lr, loss, weight_decay, grad_norm;
/// `loss_scale` is absent, there being no loss scaler in float32), plus the EMA's evaluation.
#[test]
fn resume_equals_uninterrupted_and_log_keys() {
    let root = common::scratch_dir("finetune", "resume");
    let (data, w) = (root.join("data"), root.join("backbone.safetensors"));
    tiny_data(&data, 48);
    tiny_backbone(&w, None);
    let run = |out: &Path, epochs: &str| {
        let c = config(&[
            "--pretrained_weights",
            w.to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--input_size",
            "16",
            "--batch_size",
            "4",
            "--update_freq",
            "2",
            "--epochs",
            epochs,
            "--warmup_epochs",
            "1",
            "--model_ema",
            "--model_ema_decay",
            "0.9",
            "--lr",
            "1e-3",
            "--drop",
            "0.1",
            "--attn_drop_rate",
            "0.1",
            "--device",
            "cpu",
            "--num_workers",
            "2",
        ]);
        ibot::finetune::run(&c).unwrap()
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let full = run(&a, "3");
    assert_eq!(full.epochs_done, 3);
    assert_eq!(run(&b, "1").epochs_done, 1);
    let resumed = run(&b, "3");
    assert_eq!(resumed.epochs_done, 2, "the second run resumes at epoch 1");
    let (ta, tb) = (checkpoint_tensors(&a), checkpoint_tensors(&b));
    assert_eq!(ta.len(), tb.len());
    assert!(
        ta.keys().any(|k| k.starts_with("model_ema."))
            && ta.keys().any(|k| k.starts_with("optimizer."))
    );
    for (k, t) in &ta {
        assert!(t.equal(&tb[k]), "{k} differs after resuming");
    }
    let (la, lb) = (
        std::fs::read_to_string(a.join("log.txt")).unwrap(),
        std::fs::read_to_string(b.join("log.txt")).unwrap(),
    );
    assert_eq!(la, lb, "log.txt of the resumed run");
    let want = [
        "train_lr",
        "train_min_lr",
        "train_loss",
        "train_weight_decay",
        "train_grad_norm",
        "test_loss",
        "test_acc1",
        "test_acc5",
        "test_ema_loss",
        "test_ema_acc1",
        "test_ema_acc5",
        "epoch",
        "n_parameters",
    ];
    for keys in log_keys(&a.join("log.txt")) {
        assert_eq!(keys, want);
    }
    assert!(a.join("finetune.png").is_file() && a.join("args.json").is_file());

    // `--eval --resume CKPT` alone: the checkpoint names the architecture (a ViT-S built from
    // the defaults instead fails to load it), and the evaluation repeats the last epoch's.
    let c = config(&[
        "--eval",
        "--resume",
        a.join("checkpoint.safetensors").to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        root.join("c").to_str().unwrap(),
        "--input_size",
        "16",
        "--batch_size",
        "4",
        "--device",
        "cpu",
    ]);
    let e = ibot::finetune::run(&c).unwrap().last.unwrap();
    let last = la.lines().last().unwrap();
    let logged: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(e.acc1, logged["test_acc1"].as_f64().unwrap(), "{last}");
    let loss = logged["test_loss"].as_f64().unwrap();
    assert!(
        (e.loss - loss).abs() <= 1e-6 * loss.abs(),
        "{} vs {last}",
        e.loss
    );
    // An option that would build another classifier is refused, not ignored.
    let mut c2 = c.clone();
    c2.use_mean_pooling = true;
    let err = format!("{:#}", ibot::finetune::run(&c2).unwrap_err());
    assert!(err.contains("was written with [CLS] pooling"), "{err}");
}

/// eval_cls.py's log (DeiT transfer recipe): train_lr, train_loss, then the test keys; its
/// repeated augmentation keeps len // 256 * 256 views per epoch.
#[test]
fn deit_recipe_log_keys() {
    let root = common::scratch_dir("finetune", "deit");
    let (data, w) = (root.join("data"), root.join("backbone.safetensors"));
    tiny_data(&data, 100);
    tiny_backbone(&w, None);
    let out = root.join("out");
    let c = config(&[
        "--recipe",
        "deit_transfer",
        "--pretrained_weights",
        w.to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--input_size",
        "16",
        "--batch_size",
        "32",
        "--epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--model_ema",
        "false",
        "--device",
        "cpu",
    ]);
    assert!(c.repeated_aug && !c.model_ema);
    let e = ibot::finetune::run(&c).unwrap_err();
    assert!(format!("{e:#}").contains("len // 256 * 256"), "{e:#}");
    tiny_data(&data, 260);
    ibot::finetune::run(&c).unwrap();
    for keys in log_keys(&out.join("log.txt")) {
        assert_eq!(
            keys,
            [
                "train_lr",
                "train_loss",
                "test_loss",
                "test_acc1",
                "test_acc5",
                "epoch",
                "n_parameters"
            ]
        );
    }
}

fn ibot(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new(BIN).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Clear errors: a checkpoint whose classifier has another number of classes than the run, a
/// --nb_classes below the data set's classes, a missing weights file.
#[test]
fn bad_input_is_refused_with_a_message() {
    let root = common::scratch_dir("finetune", "bad");
    let data = root.join("data");
    tiny_data(&data, 24);
    let (w5, w3) = (
        root.join("head5.safetensors"),
        root.join("head3.safetensors"),
    );
    tiny_backbone(&w5, Some(5));
    tiny_backbone(&w3, Some(3));
    let common_args = |w: &Path, out: &str| -> Vec<String> {
        [
            "finetune",
            "--pretrained_weights",
            w.to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--input_size",
            "16",
            "--batch_size",
            "4",
            "--epochs",
            "1",
            "--warmup_epochs",
            "0",
            "--device",
            "cpu",
            "--output_dir",
            root.join(out).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |v: Vec<String>| ibot(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (ok, err) = run(common_args(&w5, "o1"));
    assert!(
        !ok && err.contains("classifier for 5 classes but this run has 3"),
        "{err}"
    );
    assert!(err.contains("--reset_head"), "{err}");
    // The same weights with --reset_head, and a classifier of the right size, train.
    let mut v = common_args(&w5, "o2");
    v.push("--reset_head".into());
    let (ok, err) = run(v);
    assert!(ok, "{err}");
    let (ok, err) = run(common_args(&w3, "o3"));
    assert!(
        ok && err.contains("not initialized from pretrained model: []"),
        "{err}"
    );

    let mut v = common_args(&w3, "o4");
    v.extend(["--nb_classes".into(), "2".into()]);
    let (ok, err) = run(v);
    assert!(
        !ok && err.contains("--nb_classes 2 is fewer than the 3 classes"),
        "{err}"
    );

    let (ok, err) = run(common_args(&root.join("missing.pth"), "o5"));
    assert!(!ok && err.contains("missing.pth does not exist"), "{err}");
}
