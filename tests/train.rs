//! `ibot train` end to end on a tiny model: exact resume, checkpoint safety, logs, options.

mod common;

use std::path::{Path, PathBuf};

use ibot::cli::presets::expand_config_args;
use ibot::config::TrainConfig;
use ibot::params::read_safetensors;
use ibot::train::{checkpoint, run};

fn tiny_args(data: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut argv: Vec<String> = vec!["x".into()];
    argv.extend(common::TINY_VIT.iter().map(|s| s.to_string()));
    argv.extend(
        [
            "--epochs",
            "3",
            "--warmup_epochs",
            "1",
            "--warmup_teacher_temp_epochs",
            "1",
            "--num_workers",
            "2",
            "--drop_path",
            "0.1",
            "--pred_ratio_var",
            "0.1",
            "--saveckp_freq",
            "1",
            // Explicit: with the default `--precision auto`, `--use_fp16` (on by default) may
            // pick bfloat16 on a CPU whose probe says it pays (tests/precision_probe.rs); these
            // tests compare float32 runs. BF16_RUN's later `--precision bfloat16` overrides it.
            "--precision",
            "float32",
        ]
        .map(String::from),
    );
    argv.extend([
        "--data_path".into(),
        data.display().to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    common::train_config(argv)
}

fn tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<_> = read_safetensors(path).unwrap().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Trains the tiny model for 3 epochs straight through, and again stopped after epoch 1 and
/// resumed; returns the two output directories.
fn straight_and_resumed(tag: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let data = common::scratch_dir("train", &format!("{tag}-data"));
    common::write_idx(&data, "train", 20, 12);
    let straight = common::scratch_dir("train", &format!("{tag}-straight"));
    run::train(&tiny_args(&data, &straight, extra)).unwrap();

    let resumed = common::scratch_dir("train", &format!("{tag}-resumed"));
    let mut first_args = extra.to_vec();
    first_args.extend(["--stop_after", "1"]);
    let first = run::train(&tiny_args(&data, &resumed, &first_args)).unwrap();
    assert_eq!(first.epochs_done, 1);
    assert_eq!(
        checkpoint::read_meta(&resumed.join("checkpoint.safetensors"))
            .unwrap()
            .epoch,
        1
    );
    let second = run::train(&tiny_args(&data, &resumed, extra)).unwrap();
    assert_eq!(second.epochs_done, 2);
    (straight, resumed)
}

#[test]
fn an_interrupted_and_resumed_run_equals_an_uninterrupted_one() {
    // float32: libtorch's CPU kernels are reproducible run to run, so resume must be exact.
    let (straight, resumed) = straight_and_resumed("fp32", &["--use_fp16", "false"]);
    let a = tensors(&straight.join("checkpoint.safetensors"));
    let b = tensors(&resumed.join("checkpoint.safetensors"));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(k, _)| k.starts_with("optimizer.")));
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resume");
    }
    // The official log: one JSON object per epoch with the official keys.
    let log = std::fs::read_to_string(straight.join("log.txt")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for k in [
        "train_loss",
        "train_cls",
        "train_patch",
        "train_lr",
        "train_wd",
        "train_acc",
        "train_nmi",
        "train_ari",
        "train_fscore",
        "epoch",
    ] {
        assert!(lines[2].get(k).is_some(), "log.txt lacks {k}");
    }
    assert_eq!(
        log,
        std::fs::read_to_string(resumed.join("log.txt")).unwrap()
    );
    assert!(
        straight.join("checkpoint0001.safetensors").is_file()
            && straight.join("checkpoint0002.safetensors").is_file()
    );
    // The loss curve, redrawn each epoch: a real PNG with the three curves on it, and the
    // four schedule panels below them.
    let png = image::open(straight.join("loss.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (800, 780));
    let grey = png.pixels().filter(|p| p.0 == [150, 150, 150]).count();
    assert!(grey > 20, "no per-iteration curve ({grey} grey pixels)");
    let red = png
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60)
        .count();
    let blue = png
        .pixels()
        .filter(|p| p[2] > 200 && p[0] < 60 && p[1] < 60)
        .count();
    assert!(
        red > 100 && blue > 100,
        "curves missing from loss.png ({red} red, {blue} blue pixels)"
    );
}

#[test]
fn a_damaged_checkpoint_is_refused_and_a_failed_save_keeps_the_old_one() {
    let data = common::scratch_dir("train", "ckpt-data");
    common::write_idx(&data, "train", 12, 12);
    let out = common::scratch_dir("train", "ckpt-out");
    let out_run = run::train(&tiny_args(&data, &out, &["--stop_after", "1"])).unwrap();
    let ckpt = out.join("checkpoint.safetensors");
    let good = std::fs::read(&ckpt).unwrap();

    // A save that cannot create its temporary file fails and leaves the checkpoint untouched.
    let blocker = out.join(format!(".checkpoint.safetensors.tmp{}", std::process::id()));
    std::fs::create_dir_all(&blocker).unwrap();
    let args = tiny_args(&data, &out, &[]);
    assert!(checkpoint::save(&ckpt, &out_run.ibot, 5, &args).is_err());
    assert_eq!(std::fs::read(&ckpt).unwrap(), good);
    std::fs::remove_dir_all(&blocker).unwrap();

    // Truncated: a clear error, nothing overwritten.
    std::fs::write(&ckpt, &good[..good.len() / 3]).unwrap();
    let e = format!("{:#}", run::train(&args).err().unwrap());
    assert!(
        e.contains("checkpoint") && (e.contains("truncated") || e.contains("not a valid")),
        "{e}"
    );
    assert_eq!(std::fs::read(&ckpt).unwrap().len(), good.len() / 3);

    // A checkpoint of another model shape is refused with an explanation.
    std::fs::write(&ckpt, &good).unwrap();
    let other = tiny_args(&data, &out, &["--embed_dim", "32"]);
    let e = format!("{:#}", run::train(&other).err().unwrap());
    assert!(e.contains("different model"), "{e}");
}

#[test]
fn presets_and_config_files_supply_options_and_the_command_line_wins() {
    let dir = common::scratch_dir("train", "config");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "arch = \"vit_base\"\nepochs = 7\npred_ratio = [0.0, 0.3]\nshared_head = true\n",
    )
    .unwrap();
    let argv: Vec<String> = [
        "ibot",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--epochs",
        "9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let a = common::train_config(
        expand_config_args(argv.clone())
            .unwrap()
            .into_iter()
            .skip(1),
    );
    assert_eq!(
        (a.model.arch.as_str(), a.schedule.epochs, a.head.shared_head),
        ("vit_base", 9, true)
    );
    assert_eq!(a.loss.pred_ratio, vec![0.0, 0.3]);
    // Options of several values are replaced by the command line's, as argparse's nargs='+'
    // does, not appended to (appending gave [0.0, 0.3, 0.1, 0.5]).
    let mut over = argv;
    over.extend(["--pred_ratio", "0.1", "0.5"].map(String::from));
    let a = common::train_config(expand_config_args(over).unwrap().into_iter().skip(1));
    assert_eq!(a.loss.pred_ratio, vec![0.1, 0.5]);

    let argv: Vec<String> = ["ibot", "train", "--preset", "vit_small_800ep"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = common::train_config(
        expand_config_args(argv.clone())
            .unwrap()
            .into_iter()
            .skip(1),
    );
    assert_eq!(
        (
            a.schedule.epochs,
            a.data.local_crops_number,
            a.head.norm_last_layer
        ),
        (800, 10, false)
    );
    assert_eq!(a.loss.pred_ratio_var, vec![0.0, 0.2]);
    let mut over = argv;
    over.extend(
        [
            "--global_crops_scale",
            "0.25",
            "1",
            "--pred_ratio_var",
            "0.1",
            "--local_crops_scale",
            "0.1",
            "0.3",
        ]
        .map(String::from),
    );
    let a = common::train_config(expand_config_args(over).unwrap().into_iter().skip(1));
    assert_eq!(a.data.global_crops_scale, vec![0.25, 1.0]);
    assert_eq!(a.data.local_crops_scale, vec![0.1, 0.3]);
    assert_eq!(a.loss.pred_ratio_var, vec![0.1]);
    // The Swin-T recipes parse and describe an official Swin-T (4-px patches, masks on 32-px
    // cells), with the command line still winning.
    for (preset, window) in [("swin_tiny_7_300ep", 7), ("swin_tiny_14_300ep", 14)] {
        let argv: Vec<String> = ["ibot", "train", "--preset", preset, "--epochs", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = common::train_config(expand_config_args(argv).unwrap().into_iter().skip(1));
        assert_eq!(
            (
                a.model.arch.as_str(),
                a.model.window_size,
                a.schedule.epochs,
                a.optim.batch_size_per_gpu
            ),
            ("swin_tiny", window, 3, 26)
        );
        assert_eq!(
            (
                a.resolved_patch_size(),
                a.mask_patch_size(),
                a.loss.pred_start_epoch
            ),
            (4, 32, 50)
        );
        assert_eq!(
            (
                a.data.local_crops_number,
                a.head.out_dim,
                a.head.shared_head,
                a.head.norm_last_layer
            ),
            (10, 8192, true, false)
        );
        assert_eq!(
            (a.loss.teacher_temp, a.loss.warmup_teacher_temp_epochs),
            (0.07, 30)
        );
        assert_eq!(a.data.global_crops_scale, vec![0.25, 1.0]);
        assert_eq!(a.data.local_crops_scale, vec![0.05, 0.25]);
        let c = run::ibot_config(&a).unwrap();
        assert_eq!(
            c.backbone.embed_dim(),
            768,
            "{preset}: Swin-T's last stage is 768 wide"
        );
        assert_eq!(c.loss.mim_start_epoch, 50);
        run::loader_config(&a).unwrap();
    }
    // Official defaults where nothing is given.
    let a = common::train_config(["x"]);
    assert_eq!(
        (
            a.head.out_dim,
            a.optim.batch_size_per_gpu,
            a.schedule.lr,
            a.optim.clip_grad,
            a.schedule.momentum_teacher
        ),
        (8192, 128, 0.0005, 3.0, 0.996)
    );
    assert!(expand_config_args(vec![
        "ibot".into(),
        "train".into(),
        "--preset".into(),
        "nope".into()
    ])
    .is_err());
}

/// The bfloat16 resume test's run: 15 SGD steps at a learning rate that moves every trained
/// tensor well beyond the comparison's tolerance (see the test).
const BF16_RUN: &[&str] = &[
    "--precision",
    "bfloat16",
    "--optimizer",
    "sgd",
    "--lr",
    "1",
    "--momentum_teacher",
    "0.8",
];

#[test]
fn a_resumed_bfloat16_run_stays_with_the_uninterrupted_one() {
    // bfloat16 autocast (forced, so it runs on any CPU). oneDNN's AMX bfloat16 kernels are not
    // bit-reproducible from one run to the next (two uninterrupted runs already differ in the
    // 4th digit of the loss on such CPUs), so here the resumed run only has to stay within
    // bfloat16 noise of the straight one, and that tolerance is only worth something if it is
    // well below how far the run moved the weights: a tolerance wider than the movement would
    // pass a resume that restarted from the initial weights.
    //
    // So the run moves the weights far: SGD (momentum 0.9) at lr 1 x 4/256 = 0.016 per step, 15
    // steps, teacher momentum 0.8 (so that the teacher moves far too). SGD rather than the
    // default AdamW because Adam divides by the gradient's own scale: the attention key bias has
    // a zero gradient in exact arithmetic, so Adam turns its bfloat16 noise into steps of a full
    // lr, different in every run (at a rate that moves the weights far, more than any bfloat16
    // tolerance). SGD moves each element by lr x gradient, so run-to-run noise stays the
    // gradient's relative noise (~1e-3 judging by the loss's 4th digit) times the movement: for
    // the least-moving tensor (10x its tolerance) about 1e-2 of the tolerance. (This machine has
    // no AMX, so that margin is reasoned, not measured.)
    //
    // Tolerances, per tensor: weights max |a - b| <= 1e-3 max |b| + 1e-4; the centres and the
    // momentum buffers, which carry the bfloat16 outputs and gradients themselves,
    // 2e-2 max |b| + 2e-3. The test asserts that, for every parameter the run trains (student,
    // and teacher through the EMA), the weight tolerance is at most a fifth of the tensor's
    // movement max |b - init| from the seeded initialisation to the end (measured: 10x to 400x
    // below it); and that the straight run's own epoch-1 checkpoint fails the tolerances on most
    // trained weights, both centres and most momentum buffers, so a resume that lost state
    // (weights, momentum, centres, schedules, RNG) fails too. The epoch counters must match
    // exactly. Checked by hand: the run this test made before (AdamW at the default lr) moves
    // attn.proj.bias by 7e-5 in all, below even this tighter tolerance (the old one, 2e-3, was
    // 30 times the movement), and fails the movement assertion.
    //
    // One retry: under heavy concurrent load the test saw (once in several dozen runs) one
    // tensor beyond its tolerance, which a rerun did not repeat: bfloat16 kernels are not
    // reproducible from run to run. A resume that loses state drifts on every run, so it still
    // fails both attempts; the retry only absorbs a rare noise excursion.
    let weight = |k: &str| k.starts_with("student.") || k.starts_with("teacher.");
    let tol_of = |k: &str, b: &tch::Tensor| {
        let scale = b.abs().max().double_value(&[]);
        if weight(k) {
            1e-3 * scale + 1e-4
        } else {
            2e-2 * scale + 2e-3
        }
    };
    let tol = |b: &tch::Tensor| tol_of("student.", b);
    let dist = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    let close_k = |k: &str, a: &tch::Tensor, b: &tch::Tensor| dist(a, b) <= tol_of(k, b);
    let drift = |straight: &Path, resumed: &Path| -> Option<String> {
        let a = tensors(&straight.join("checkpoint.safetensors"));
        let b = tensors(&resumed.join("checkpoint.safetensors"));
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).find_map(|((ka, ta), (kb, tb))| {
            assert_eq!(ka, kb);
            (!close_k(ka, ta, tb)).then(|| {
                format!(
                    "{ka} drifts after a bfloat16 resume: max |a - b| = {:e}, tolerance {:e}",
                    dist(ta, tb),
                    tol_of(ka, tb)
                )
            })
        })
    };
    let (mut straight, mut resumed) = straight_and_resumed("bf16", BF16_RUN);
    if let Some(first) = drift(&straight, &resumed) {
        eprintln!("retrying once: {first}");
        (straight, resumed) = straight_and_resumed("bf16", BF16_RUN);
        if let Some(second) = drift(&straight, &resumed) {
            panic!("{second} (first attempt: {first})");
        }
    }
    let a = tensors(&straight.join("checkpoint.safetensors"));
    // The movement of every tensor from the seeded initialisation (as `ibot train` builds it).
    let cfg = tiny_args(Path::new("unused"), &straight, BF16_RUN);
    let init = ibot::train::Ibot::seeded(
        run::ibot_config(&cfg).unwrap(),
        tch::Device::Cpu,
        cfg.run.seed,
    )
    .unwrap();
    let mut start: std::collections::HashMap<String, tch::Tensor> =
        std::collections::HashMap::new();
    for (k, t) in init.student_ps.state_dict() {
        start.insert(format!("student.{k}"), t.detach().copy());
    }
    for (k, t) in init.teacher_ps.state_dict() {
        start.insert(format!("teacher.{k}"), t.detach().copy());
    }
    let trained: std::collections::HashSet<String> = init
        .student_ps
        .params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.name.clone())
        .collect();
    let mut weights = 0;
    for (k, t) in &a {
        let Some(t0) = start.get(k) else { continue };
        let moved = dist(t, t0);
        // Teacher tensors follow their student twin through the EMA.
        let name = k.split_once('.').map_or(k.as_str(), |(_, n)| n);
        if !trained.contains(name) {
            continue;
        }
        weights += 1;
        assert!(
            tol(t) <= moved / 5.0,
            "{k} moved only {moved:e} over the run: the tolerance {:e} is not well below it",
            tol(t)
        );
    }
    assert!(
        weights > 20,
        "only {weights} trained tensors compared with their movement"
    );
    let earlier = tensors(&straight.join("checkpoint0001.safetensors"));
    let apart = |pred: &dyn Fn(&str) -> bool| {
        let n = a.iter().filter(|(k, _)| pred(k)).count();
        let apart = a
            .iter()
            .zip(&earlier)
            .filter(|((k, t), (_, e))| pred(k) && !close_k(k, e, t))
            .count();
        (apart, n)
    };
    let is_trained = |k: &str| {
        k.split_once('.')
            .is_some_and(|(_, n)| trained.contains(n) && start.contains_key(k))
    };
    let (weights_apart, weights_n) = apart(&is_trained);
    let (centres_apart, _) = apart(&|k| k.starts_with("loss.center"));
    let (moments_apart, moments) = apart(&|k| k.ends_with(".momentum_buffer"));
    assert!(
        centres_apart == 2 && 2 * moments_apart > moments && 2 * weights_apart > weights_n,
        "the tolerance cannot tell epoch 1 from epoch 3: {weights_apart}/{weights_n} weights, \
         {centres_apart}/2 centres and {moments_apart}/{moments} momentum buffers differ"
    );
    let meta = |d: &Path| checkpoint::read_meta(&d.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta(&straight).epoch, meta(&resumed).epoch);
}

/// Our AdamW over six steps against `torch.optim.AdamW` run at test time (tests/py/adamw_ref.py)
/// with the official groups and per-step lr / weight decay: the parameters, both moments and the
/// step counts, with a parameter whose gradient is None in the first two steps (so its bias
/// correction runs two steps behind). The parameters are compared as updates relative to their
/// scale (1e-5), a bound that another eps, beta1 or beta2 exceeds many times.
#[test]
fn adamw_over_several_steps_matches_torch() {
    use ibot::params::ParamStore;
    use ibot::train::optim::{Optimizer, OptimizerKind};
    use tch::{Device, Kind, Tensor};
    let cpu = (Kind::Float, Device::Cpu);
    let steps = 6i64;
    // Drawn under the model-construction lock: the other tests of this binary seed libtorch's
    // process-wide generator to build their models and must not see these draws interleaved.
    let (w0, b0, v0, gw, gb, gv) = ibot::train::seeded_init(5, || {
        let scale = Tensor::from_slice(&[1.0f32, 1e-3, 1e-7]).reshape([1, 1, 3]);
        (
            Tensor::randn([4, 3], cpu),
            Tensor::randn([4], cpu),
            Tensor::randn([2, 3], cpu),
            // Gradients of very different sizes, some near eps, so that eps and bias
            // correction matter.
            Tensor::randn([steps, 4, 3], cpu) * scale,
            Tensor::randn([steps, 4], cpu) * 0.1,
            Tensor::randn([steps, 2, 3], cpu),
        )
    });
    let starts = [
        ("w", "w.weight", &w0),
        ("b", "w.bias", &b0),
        ("v", "v.weight", &v0),
    ];
    let mut ps = ParamStore::new();
    for (_, name, t0) in starts {
        let _ = ps.add(name, t0.copy(), true);
    }
    let v_has_grad = [0i64, 0, 1, 1, 1, 1];
    let lr = [1e-3, 2e-3, 3e-3, 2.5e-3, 1e-3, 5e-4];
    let wd = [0.04, 0.1, 0.2, 0.3, 0.4, 0.4];
    // Our AdamW, with `tweak` applied, from the initial values.
    let run = |tweak: &dyn Fn(&mut Optimizer)| {
        for (_, name, t0) in starts {
            ps.set(name, t0).unwrap();
        }
        let mut opt = Optimizer::new(OptimizerKind::Adamw, &ps);
        tweak(&mut opt);
        for s in 0..steps {
            let grads = vec![
                Some(gw.get(s)),
                Some(gb.get(s)),
                (v_has_grad[s as usize] == 1).then(|| gv.get(s)),
            ];
            opt.step(&ps, &grads, lr[s as usize], wd[s as usize])
                .unwrap();
        }
        opt
    };
    let r = common::python_reference(
        "adamw_ref.py",
        &[
            ("w", w0.shallow_clone()),
            ("b", b0.shallow_clone()),
            ("v", v0.shallow_clone()),
            ("gw", gw.shallow_clone()),
            ("gb", gb.shallow_clone()),
            ("gv", gv.shallow_clone()),
            ("v_has_grad", Tensor::from_slice(&v_has_grad)),
            ("lr", Tensor::from_slice(&lr)),
            ("wd", Tensor::from_slice(&wd)),
        ],
        &common::scratch_dir("train", "adamw"),
    );
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-30)
    };
    // The largest parameter-update error, relative to the update's scale.
    let worst_update = || {
        starts
            .iter()
            .map(|(n, name, start)| {
                let p = ps.get(name).unwrap().detach();
                rel(&(&p - *start), &(&r[*n] - *start))
            })
            .fold(0f64, f64::max)
    };
    let opt = run(&|_| {});
    let e = worst_update();
    assert!(
        e < 1e-5,
        "an update differs from torch by {e:e} of its scale"
    );
    let state: std::collections::HashMap<String, Tensor> =
        opt.state_tensors(&ps).into_iter().collect();
    for (n, name, _) in starts {
        for m in ["exp_avg", "exp_avg_sq"] {
            let e = rel(&state[&format!("{name}.{m}")], &r[&format!("{n}_{m}")]);
            assert!(
                e < 1e-5,
                "{name}.{m} differs from torch by {e:e} of its scale"
            );
        }
        let st = state[&format!("{name}.step")].int64_value(&[0]);
        let want = r[&format!("{n}_step")].double_value(&[]);
        assert_eq!(st as f64, want, "{name} steps");
    }
    assert_eq!(state["v.weight.step"].int64_value(&[0]), 4);
    let tweaks: [(&str, &dyn Fn(&mut Optimizer)); 3] = [
        ("eps 1e-7", &|o| o.eps = 1e-7),
        ("beta1 0.8", &|o| o.beta1 = 0.8),
        ("beta2 0.99", &|o| o.beta2 = 0.99),
    ];
    for (what, tweak) in tweaks {
        run(tweak);
        let e = worst_update();
        assert!(e > 1e-4, "AdamW with {what} is only {e:e} away from torch");
    }
}

/// A checkpoint written by the release of 2026-11-26 (`tests/data/checkpoint-2026-11-26.safetensors`,
/// a 1-layer ViT after 1 of 2 epochs; before tensor checksums, Swin, the data-parallel and
/// interrupt options) still resumes, evaluates and exports: checkpoints are read tolerantly.
#[test]
fn a_checkpoint_from_an_earlier_release_resumes_evaluates_and_exports() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/checkpoint-2026-11-26.safetensors");
    let dir = common::scratch_dir("train", "old-checkpoint");
    let (data, out) = (dir.join("data"), dir.join("out"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    common::write_idx(&data, "train", 32, 16);
    std::fs::copy(&src, out.join("checkpoint.safetensors")).unwrap();
    let meta = checkpoint::read_meta(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!((meta.epoch, meta.args.schedule.epochs), (1, 2));
    let mut args = meta.args.clone();
    args.run.output_dir = out.clone();
    args.data.data_path = data;
    args.data.num_workers = 1;
    // Float32 as the old checkpoint's run on a CPU without AMX (its metadata stores no
    // precision, so `auto` would decide again and could probe into the user's cache).
    args.optim.precision = ibot::config::PrecisionChoice::Float32;
    let o = run::train(&args).unwrap();
    assert_eq!(o.epochs_done, 1, "the old checkpoint was not resumed");
    assert_eq!(
        checkpoint::read_meta(&out.join("checkpoint.safetensors"))
            .unwrap()
            .epoch,
        2
    );
    let p = ibot::interop::load_pretrained(&src, "teacher", None).unwrap();
    let (_, backbone) = p.backbone_model(tch::Device::Cpu).unwrap();
    let x = tch::Tensor::zeros([1, 3, 16, 16], (tch::Kind::Float, tch::Device::Cpu));
    let tokens = backbone.forward(&x, None, false).unwrap();
    assert_eq!(tokens.size(), [1, 17, 24]);
    ibot::interop::export_backbone(&p, &dir.join("backbone.safetensors"), false).unwrap();
    assert!(
        ibot::interop::load_pretrained(&dir.join("backbone.safetensors"), "teacher", None).is_ok()
    );
}
