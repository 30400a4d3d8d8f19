//! The `ibot` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::Device;

use ibot::eval::features::{self, FeatureKind};
use ibot::eval::knn::knn_classifier;
use ibot::train::args::{expand_config_args, TrainArgs, PRESETS};
use ibot::train::run;

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

#[derive(Parser)]
#[command(
    name = "ibot",
    version,
    about = "iBOT self-supervised pre-training of Vision Transformers, on libtorch",
    long_about = "iBOT self-supervised pre-training of Vision Transformers, on libtorch.\n\n\
        Options of `ibot train` carry the names and defaults of the official main_ibot.py. \
        `--preset NAME` and `--config FILE.toml` (keys = option names) supply options; \
        options given on the command line win.",
    args_override_self = true
)]
struct Cli {
    /// Number of CPU threads libtorch may use (default: all cores).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pre-trains a small ViT on Fashion-MNIST for a few minutes, then compares the k-NN
    /// accuracy of its teacher with the same network at initialisation and with raw pixels.
    /// Takes every `train` option (defaults: --preset fmnist_tiny on the Debian package's files).
    #[command(args_override_self = true)]
    Demo(DemoArgs),
    /// iBOT pre-training (the official main_ibot.py). Resumes from <output_dir>/checkpoint.safetensors.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Weighted k-NN accuracy of a checkpoint's [CLS] features (eval_knn.py).
    EvalKnn(KnnArgs),
    /// Lists the named recipes for --preset.
    Presets,
    /// Benchmarks (timings, not tests). Compare with bench/torch_step.py run with the same
    /// options on the same machine.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Compares this implementation with reference tensors from the official code: forward
    /// outputs, attention, position-embedding interpolation, loss and centres, gradients after
    /// clipping/cancelling, one AdamW step, the EMA teacher, schedules and k-NN. Prints one
    /// line per group and exits non-zero on any mismatch.
    VerifyFixture {
        /// Fixture directory holding fixtures.json and fixtures.safetensors
        /// (e.g. ../shared/fixtures/ibot-ref/visible_vit).
        dir: PathBuf,
    },
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct DemoArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Training-split images whose features form the k-NN memory.
    #[arg(long, default_value_t = 10000)]
    knn_train: usize,
    /// Test-split images classified by k-NN.
    #[arg(long, default_value_t = 2000)]
    knn_test: usize,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct KnnArgs {
    /// A checkpoint written by `ibot train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// teacher or student.
    #[arg(long, default_value = "teacher")]
    checkpoint_key: String,
    /// A folder with train/ and val/ image folders, or IDX files (train-* and t10k-*).
    #[arg(long)]
    data_path: PathBuf,
    #[arg(long, num_args = 1.., default_values_t = vec![10, 20, 100, 200])]
    nb_knn: Vec<i64>,
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Evaluation crop side (default: the checkpoint's global crop size).
    #[arg(long)]
    crop_size: Option<usize>,
    #[arg(long, default_value_t = 128)]
    batch_size_per_gpu: usize,
    /// Use at most this many training / test images.
    #[arg(long)]
    subset: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
#[command(rename_all = "snake_case")]
enum BenchCmd {
    /// Images per second of the data pipeline (decode + 2x224 + N x96 crops with every
    /// augmentation + masks + batching). Compare with bench/torchvision_pipeline.py.
    #[command(rename_all = "snake_case")]
    Data {
        #[arg(long, default_value = "../shared/bench/photos")]
        data_path: PathBuf,
        #[arg(long, default_value_t = 1)]
        num_workers: usize,
        #[arg(long, default_value_t = 10)]
        local_crops_number: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Passes over the data set.
        #[arg(long, default_value_t = 2)]
        epochs: usize,
    },
    /// Milliseconds per full training step (teacher + masked student + local views + loss +
    /// backward + clipping + AdamW + EMA): on random tensors (data loading excluded, comparable
    /// with bench/torch_step.py), or fed by the loader with --data_path.
    #[command(rename_all = "snake_case", alias = "step")]
    Train(ibot::bench::StepBench),
}

/// Split folders for evaluation: (train, test) data sets.
fn eval_splits(path: &std::path::Path) -> Result<(PathBuf, &'static str, PathBuf, &'static str)> {
    if path.join("train").is_dir() && path.join("val").is_dir() {
        return Ok((path.join("train"), "train", path.join("val"), "train"));
    }
    Ok((path.to_path_buf(), "train", path.to_path_buf(), "t10k"))
}

fn knn_report(
    name: &str,
    backbone: Option<&ibot::models::VisionTransformer>,
    kind: FeatureKind,
    data: (
        &dyn ibot::data::dataset::Dataset,
        &[usize],
        &dyn ibot::data::dataset::Dataset,
        &[usize],
    ),
    size: usize,
    ks: &[i64],
    t: f64,
    device: Device,
) -> Result<Vec<(i64, f64, f64)>> {
    let (train_ds, train_idx, test_ds, test_idx) = data;
    let t0 = Instant::now();
    let (ftr, ltr) = features::extract(backbone, kind, train_ds, train_idx, size, 256, device)?;
    let (fte, lte) = features::extract(backbone, kind, test_ds, test_idx, size, 256, device)?;
    let nclass = ltr.max().int64_value(&[]).max(lte.max().int64_value(&[])) + 1;
    let mut out = Vec::new();
    for &k in ks {
        let r = knn_classifier(
            &ftr,
            &ltr,
            &fte,
            &lte,
            k.min(ftr.size()[0]),
            t,
            nclass.max(5),
        )?;
        out.push((k, r.top1, r.top5));
    }
    let best = out
        .iter()
        .map(|r| format!("{}-NN {:.2}%", r.0, r.1))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("k-NN {name}: {best} ({:.0}s)", t0.elapsed().as_secs_f64());
    Ok(out)
}

fn first_n(n: usize, limit: usize) -> Vec<usize> {
    (0..n.min(limit)).collect()
}

fn demo(d: DemoArgs) -> Result<()> {
    let a = &d.train;
    if !a.data_path.exists() {
        bail!(
            "{} not found. Install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (bash scripts/bootstrap.sh does it \
             when run as root), or point --data_path at any image folder",
            a.data_path.display()
        );
    }
    let t0 = Instant::now();
    eprintln!(
        "== iBOT demo: pre-training ({} epochs) into {}",
        a.epochs,
        a.output_dir.display()
    );
    let out = run::train(a)?;
    let device = out.ibot.device;
    let size = a.global_crops_size;
    let (train_path, train_split, test_path, test_split) = eval_splits(&a.data_path)?;
    let train_ds = ibot::data::dataset::open(&train_path, train_split)?;
    let test_ds = ibot::data::dataset::open(&test_path, test_split)?;
    let tr = first_n(train_ds.len(), d.knn_train);
    let te = first_n(test_ds.len(), d.knn_test);
    let data = (train_ds.as_ref(), &tr[..], test_ds.as_ref(), &te[..]);
    eprintln!(
        "== k-NN (k=20, T=0.07) on {} training and {} test images",
        tr.len(),
        te.len()
    );
    let ks = [20];
    let trained = knn_report(
        "iBOT teacher",
        Some(&out.ibot.teacher.backbone),
        FeatureKind::Cls,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    let init = ibot::train::Ibot::seeded(run::ibot_config(a)?, device, a.seed)?;
    let at_init = knn_report(
        "same network at initialisation",
        Some(&init.teacher.backbone),
        FeatureKind::Cls,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    let pixels = knn_report(
        "raw pixels",
        None,
        FeatureKind::Pixels,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    println!();
    println!("Fashion-MNIST k-NN top-1 (k=20, {} test images):", te.len());
    println!("  iBOT-pretrained teacher    {:6.2}%", trained[0].1);
    println!("  same ViT at initialisation {:6.2}%", at_init[0].1);
    println!("  raw pixels                 {:6.2}%", pixels[0].1);
    println!(
        "total time {:.0}s; checkpoint and log.txt in {}",
        t0.elapsed().as_secs_f64(),
        a.output_dir.display()
    );
    Ok(())
}

fn eval_knn(k: KnnArgs) -> Result<()> {
    let device = run::select_device(&k.device)?;
    let meta = ibot::train::checkpoint::read_meta(&k.checkpoint)?;
    let mut ibot = ibot::train::Ibot::new(meta.config.clone(), device)?;
    ibot::train::checkpoint::load(&k.checkpoint, &mut ibot)?;
    let backbone = match k.checkpoint_key.as_str() {
        "teacher" => &ibot.teacher.backbone,
        "student" => &ibot.student.backbone,
        other => bail!("--checkpoint_key must be teacher or student, not '{other}'"),
    };
    let size = k.crop_size.unwrap_or(meta.args.global_crops_size);
    let (trp, trs, tep, tes) = eval_splits(&k.data_path)?;
    let train_ds = ibot::data::dataset::open(&trp, trs)?;
    let test_ds = ibot::data::dataset::open(&tep, tes)?;
    let lim = k.subset.unwrap_or(usize::MAX);
    let tr = first_n(train_ds.len(), lim);
    let te = first_n(test_ds.len(), lim);
    let res = knn_report(
        &k.checkpoint_key,
        Some(backbone),
        FeatureKind::Cls,
        (train_ds.as_ref(), &tr[..], test_ds.as_ref(), &te[..]),
        size,
        &k.nb_knn,
        k.temperature,
        device,
    )?;
    for (kk, t1, t5) in res {
        println!("{kk}-NN classifier result: Top1: {t1}, Top5: {t5}");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<bool> {
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match cli.cmd {
        Cmd::Demo(d) => demo(d).map(|_| true),
        Cmd::Train(a) => {
            let out = run::train(&a)?;
            eprintln!(
                "{} epoch(s) trained; checkpoint in {}",
                out.epochs_done,
                a.output_dir.display()
            );
            Ok(true)
        }
        Cmd::EvalKnn(k) => eval_knn(k).map(|_| true),
        Cmd::Presets => {
            for (name, what, args) in PRESETS {
                println!("{name}: {what}\n    {}\n", args.join(" "));
            }
            Ok(true)
        }
        Cmd::Bench(BenchCmd::Data {
            data_path,
            num_workers,
            local_crops_number,
            batch_size,
            epochs,
        }) => {
            let (n, dt) = ibot::bench::data(
                &data_path,
                num_workers,
                local_crops_number,
                batch_size,
                epochs,
            )?;
            println!(
                "ibot pipeline, {num_workers} worker(s), 2x224 + {local_crops_number}x96 + masks: {:.1} img/s ({n} images in {dt:.1}s)",
                n as f64 / dt
            );
            Ok(true)
        }
        Cmd::Bench(BenchCmd::Train(b)) => {
            let t = ibot::bench::step(&b, ibot::train::run::select_device(&b.device)?)?;
            let feed = match &b.data_path {
                Some(p) => format!("loader on {} with {} worker(s)", p.display(), b.num_workers),
                None => "random tensors".to_string(),
            };
            println!(
                "ibot (tch, libtorch threads {}, {feed}): {}/{} batch {} 2x{} + {}x{}: {:.1} ms/iter, {:.2} img/s",
                tch::get_num_threads(),
                b.arch,
                b.patch_size,
                b.batch,
                b.global_crops_size,
                b.local_crops_number,
                b.local_crops_size,
                t.ms_per_iter,
                t.images_per_s
            );
            Ok(true)
        }
        Cmd::VerifyFixture { dir } => {
            let report = ibot::verify::verify_fixture(&dir)
                .with_context(|| format!("verifying {}", dir.display()))?;
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
    }
}

/// Defaults of `ibot demo`, placed before the user's own options.
fn demo_defaults(argv: Vec<String>) -> Vec<String> {
    let Some(pos) = argv.iter().position(|a| a == "demo") else {
        return argv;
    };
    let mut out = argv[..=pos].to_vec();
    for s in [
        "--preset",
        "fmnist_tiny",
        "--data_path",
        FMNIST,
        "--output_dir",
        "runs/fmnist-demo",
        "--subset",
        "20000",
        "--num_workers",
        "2",
    ] {
        out.push(s.to_string());
    }
    out.extend(argv[pos + 1..].iter().cloned());
    out
}

fn main() -> ExitCode {
    ibot::util::tune_allocator();
    let argv = demo_defaults(std::env::args().collect());
    let argv = match expand_config_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
