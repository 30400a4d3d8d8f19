//! The `ibot` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::Device;

use ibot::eval::features::{self, FeatureKind, FeatureSpec};
use ibot::eval::knn::knn_classifier;
use ibot::train::args::{expand_config_args, DistArgs, TrainArgs, PRESETS};
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
    /// Takes every `train` option (defaults: --preset fmnist_tiny on the Debian package's files,
    /// listed at the end of `ibot demo --help`).
    #[command(args_override_self = true, after_help = demo_help())]
    Demo(DemoArgs),
    /// iBOT pre-training (the official main_ibot.py). Resumes from <output_dir>/checkpoint.safetensors.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Starts N data-parallel worker processes of an ibot command on this node, like torchrun
    /// (no Python needed): `ibot launch --nproc_per_node 2 train --data_path DIR ...`.
    /// Several nodes: the same command on each with --nnodes, --node_rank and --master_addr.
    #[command(args_override_self = true)]
    Launch(ibot::dist::launch::LaunchArgs),
    /// Weighted k-NN accuracy of [CLS] features (eval_knn.py; Swin: the average-pooled token).
    /// Reads `ibot train` checkpoints, exported backbones and official .pth files, ViT or Swin.
    EvalKnn(KnnArgs),
    /// Linear probe on frozen features (eval_linear.py): SGD on a linear layer over the [CLS]
    /// tokens of the last blocks (Swin: their average-pooled tokens), validation each epoch,
    /// checkpointed and resumable.
    EvalLinear(ibot::eval::linear::LinearArgs),
    /// Unsupervised classification (unsup_cls.py): the teacher head's argmax on the validation
    /// images as cluster ids, scored against the labels with NMI, ARI, F and Hungarian accuracy.
    EvalUnsup(UnsupArgs),
    /// Image retrieval on revisited Oxford / Paris (eval_image_retrieval.py): features of every
    /// database image and query, cosine ranking, mAP and mP@1/5/10 (Easy, Medium, Hard).
    EvalRetrieval {
        #[command(flatten)]
        weights: WeightsArgs,
        #[command(flatten)]
        args: ibot::cli::eval_retrieval::EvalRetrievalArgs,
    },
    /// Copy detection on Copydays (eval_copy_detection.py): [CLS] + GeM-pooled patch features,
    /// optional whitening and distractors, mAP per block of copies.
    EvalCopydetection {
        #[command(flatten)]
        weights: WeightsArgs,
        #[command(flatten)]
        args: ibot::cli::eval_copydetection::EvalCopydetectionArgs,
    },
    /// Many linear probes at once on the same frozen features, one per learning rate of the
    /// official sweep (eval_linear_multi.py); the best top-1 and its settings are reported.
    EvalLinearMulti {
        #[command(flatten)]
        weights: WeightsArgs,
        #[command(flatten)]
        args: ibot::cli::eval_linear_multi::EvalLinearMultiArgs,
    },
    /// L2-regularised multinomial logistic regression on frozen, L2-normalised features
    /// (eval_logistic_regression.py), one fit per --lr_lambd, solved to the optimum.
    EvalLogreg {
        #[command(flatten)]
        weights: WeightsArgs,
        #[command(flatten)]
        args: ibot::cli::eval_logreg::EvalLogregArgs,
    },
    /// Backbone weights of a checkpoint (ours or official .pth) to a safetensors file under the
    /// official names, like extract_backbone_weights.py.
    ExtractBackbone(ExtractArgs),
    /// Features of every image of a data set to a safetensors file (`features` [N, D], `labels` [N]).
    ExtractFeatures(FeatureArgs),
    /// Self-attention maps of the [CLS] token in the last block, per head, for one image (ViT only)
    /// (visualize_attention.py): heat maps, the patches holding --threshold of each head's
    /// attention mass drawn over the image, and the raw maps as safetensors.
    VisualizeAttention(AttentionArgs),
    /// Lists the named recipes for --preset.
    Presets,
    /// Benchmarks (timings, not tests). Compare with bench/torch_step.py run with the same
    /// options on the same machine.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Compares this implementation with reference tensors from the official code. A one-step
    /// fixture (fixtures.json): forward outputs, attention, position-embedding interpolation,
    /// loss and centres, gradients after clipping/cancelling, one AdamW step, the EMA teacher,
    /// schedules and k-NN. A trajectory fixture (trajectory.json): its fixed batches run through
    /// the `ibot train` loop, compared step by step (schedules, loss terms, centres), epoch by
    /// epoch (statistics, every student and teacher tensor) and at the end (optimizer state).
    /// Prints one line per group and exits non-zero on any mismatch.
    VerifyFixture {
        /// Fixture directory holding fixtures.json and fixtures.safetensors (e.g.
        /// ../shared/fixtures/ibot-ref/visible_vit), or trajectory.json and
        /// trajectory.safetensors (e.g. ../shared/fixtures/ibot-ref/visible_traj).
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

/// Where the weights come from (shared by the evaluation commands).
#[derive(Args, Clone)]
#[command(rename_all = "snake_case")]
struct WeightsArgs {
    /// Weights to evaluate: an `ibot train` checkpoint, a backbone from `extract-backbone`, or an
    /// official .pth (full checkpoint.pth or backbone-only file).
    #[arg(long, alias = "checkpoint")]
    pretrained_weights: Option<PathBuf>,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, default_value = "teacher")]
    checkpoint_key: String,
    /// Architecture (vit_tiny/small/base/large, swin_tiny/small/base/large); only needed when a
    /// ViT's width is not a standard one (a Swin's shape is read off its tensors). Checked
    /// against the weights: an --arch whose width or depth differs is an error.
    #[arg(long)]
    arch: Option<String>,
    /// Number of attention heads, for weights of a width no standard ViT has (no tensor shape
    /// shows it); checked against the width and against --arch.
    #[arg(long)]
    num_heads: Option<i64>,
    /// Evaluation crop side, 1 to 4096 pixels and at least one patch (default: the resolution
    /// the position embedding was built for; Swin: the one the model was built for, 224 for
    /// official weights).
    #[arg(long)]
    crop_size: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct KnnArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// A folder with train/ and val/ image folders, or IDX files (train-* and t10k-*). Other
    /// layouts: give --train_path and --val_path.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// The memory (training) images, instead of <data_path>/train: an image folder, a folder
    /// of IDX files (train-* is read) or an IDX images file.
    #[arg(long)]
    train_path: Option<PathBuf>,
    /// The query (validation) images, instead of <data_path>/val: an image folder, a folder of
    /// IDX files (t10k-* is read) or an IDX images file.
    #[arg(long)]
    val_path: Option<PathBuf>,
    /// Numbers of nearest neighbours k, each at least 1; a k above the number of training
    /// (memory) images is lowered to that number, with a note.
    #[arg(long, num_args = 1.., default_values_t = vec![10, 20, 100, 200])]
    nb_knn: Vec<i64>,
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Concatenate the [CLS] tokens of the last n blocks (official default 1).
    #[arg(long, default_value_t = 1)]
    n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the last block's patch tokens (without the final norm, as
    /// the official mean-pooling ViT); 2: both. The features are L2-normalised either way.
    #[arg(long, default_value_t = 0)]
    avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 128)]
    batch_size_per_gpu: usize,
    /// Use at most this many training / test images.
    #[arg(long)]
    subset: Option<usize>,
    /// Save the computed (L2-normalised) features and labels to this folder (knn_features.safetensors).
    #[arg(long)]
    dump_features: Option<PathBuf>,
    /// Reuse features saved by --dump_features from this folder instead of computing them.
    #[arg(long)]
    load_features: Option<PathBuf>,
    /// Also write the accuracies as JSON to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Under torchrun / srun / `ibot launch`, every rank extracts a shard of the features.
    #[command(flatten)]
    dist: DistArgs,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct UnsupArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// A folder with a val/ image folder, or IDX files (the t10k-* split is used). Other
    /// layouts: give --val_path.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// The images to evaluate, instead of <data_path>/val: an image folder, a folder of IDX
    /// files (t10k-* is read) or an IDX images file.
    #[arg(long)]
    val_path: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    batch_size_per_gpu: usize,
    /// Use at most this many images.
    #[arg(long)]
    subset: Option<usize>,
    /// Also write the metrics as JSON to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct ExtractArgs {
    /// The checkpoint to read (ours or an official .pth).
    input: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// Network to take from full checkpoints: teacher or student.
    #[arg(long, default_value = "teacher")]
    checkpoint_key: String,
    /// Architecture, only needed when the width is not a standard one (checked against the
    /// weights).
    #[arg(long)]
    arch: Option<String>,
    /// Number of attention heads, for weights of a non-standard width.
    #[arg(long)]
    num_heads: Option<i64>,
    /// Names for timm's VisionTransformer (drops `masked_embed`, which timm does not have).
    /// ViT only: Swin backbones are written under the official iBOT names.
    #[arg(long)]
    timm: bool,
    /// Replace OUTPUT when it already exists (it may never be the input file).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct FeatureArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// An image folder (with or without class folders) or a folder of IDX files.
    #[arg(long)]
    data_path: PathBuf,
    /// IDX split to read (train or t10k); ignored for image folders.
    #[arg(long, default_value = "train")]
    split: String,
    /// The safetensors file to write.
    #[arg(long)]
    output: PathBuf,
    /// Concatenate the [CLS] tokens of the last n blocks (Swin: the average-pooled tokens of
    /// the last n blocks, over all stages).
    #[arg(long, default_value_t = 1)]
    n_last_blocks: usize,
    /// 0: [CLS] tokens; 1: mean of the patch tokens; 2: both. ViT only (a Swin needs 0).
    #[arg(long, default_value_t = 0)]
    avgpool_patchtokens: u8,
    #[arg(long, default_value_t = 128)]
    batch_size_per_gpu: usize,
    #[arg(long, default_value_t = 2)]
    num_workers: usize,
    /// Use at most this many images.
    #[arg(long)]
    subset: Option<usize>,
    /// Under torchrun / srun / `ibot launch`, every rank extracts a shard of the features.
    #[command(flatten)]
    dist: DistArgs,
}

#[derive(Args)]
#[command(rename_all = "snake_case")]
struct AttentionArgs {
    #[command(flatten)]
    weights: WeightsArgs,
    /// The image to look at (any format the data loader reads).
    #[arg(long)]
    image_path: PathBuf,
    /// Resize to HEIGHT WIDTH (two numbers), or the shorter side to N keeping the aspect ratio
    /// (one number); the result is then cut to a multiple of the patch size.
    #[arg(long, num_args = 1..=2, default_values_t = [480, 480])]
    image_size: Vec<usize>,
    /// Share of each head's attention mass whose patches are drawn over the image (0 to 1;
    /// 0 draws no masks).
    #[arg(long, default_value_t = 0.6)]
    threshold: f64,
    /// Where the pictures go.
    #[arg(long, default_value = ".")]
    output_dir: PathBuf,
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
    /// Milliseconds and bandwidth of one all-reduce of a flat float32 gradient over the ranks
    /// of a data-parallel launch: `ibot launch --nproc_per_node 2 bench allreduce`. Compare with
    /// `torchrun --nproc_per_node 2 bench/torch_allreduce.py`.
    #[command(rename_all = "snake_case")]
    Allreduce {
        /// Elements of the tensor (ViT-S/16's gradient: about 22 million).
        #[arg(long, default_value_t = 22_000_000)]
        numel: i64,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        dist: DistArgs,
    },
}

/// Which half of an evaluation split.
#[derive(Clone, Copy, PartialEq)]
enum Half {
    Train,
    Val,
}

/// True when `dir` holds `<split>-images-idx3-ubyte[.gz]`.
fn has_idx(dir: &std::path::Path, split: &str) -> bool {
    ["", ".gz"]
        .iter()
        .any(|z| dir.join(format!("{split}-images-idx3-ubyte{z}")).is_file())
}

/// One half of an evaluation split: `explicit` (--train_path / --val_path) when given, else
/// `<data_path>/train` / `<data_path>/val` image folders, or IDX files with both `train-*` and
/// `t10k-*` in `data_path`. Anything else is an error: evaluating on the images the memory (or
/// classifier) was built from would report a meaningless accuracy.
fn eval_split(
    data_path: Option<&std::path::Path>,
    explicit: Option<&std::path::Path>,
    half: Half,
) -> Result<(PathBuf, &'static str)> {
    let (flag, dir, idx) = match half {
        Half::Train => ("--train_path", "train", "train"),
        Half::Val => ("--val_path", "val", "t10k"),
    };
    if let Some(p) = explicit {
        anyhow::ensure!(p.exists(), "{flag} {} does not exist", p.display());
        return Ok((p.to_path_buf(), idx));
    }
    let Some(path) = data_path else {
        bail!("give --data_path (a folder with train/ and val/ image folders, or IDX files train-* and t10k-*), or {flag}");
    };
    anyhow::ensure!(path.exists(), "--data_path {} does not exist", path.display());
    let (tr, va) = (path.join("train"), path.join("val"));
    if tr.is_dir() && va.is_dir() {
        return Ok((path.join(dir), "train"));
    }
    if path.is_dir() && has_idx(path, "train") && has_idx(path, "t10k") {
        return Ok((path.to_path_buf(), idx));
    }
    let found = if tr.is_dir() {
        "it has train/ but no val/".to_string()
    } else if va.is_dir() {
        "it has val/ but no train/".to_string()
    } else if path.is_dir() && has_idx(path, "train") {
        "it has IDX files train-* but no t10k-*".to_string()
    } else if path.is_dir() && has_idx(path, "t10k") {
        "it has IDX files t10k-* but no train-*".to_string()
    } else if path.is_file() {
        "it is a single file".to_string()
    } else {
        "it has neither".to_string()
    };
    bail!(
        "--data_path {} is not split into training and validation images ({found}): evaluation \
         needs train/ and val/ image folders, or IDX files with both train-* and t10k-*; or give \
         the two sets explicitly with --train_path and --val_path",
        path.display()
    )
}

/// Both halves of an evaluation split (see [`eval_split`]).
fn eval_splits(
    data_path: Option<&std::path::Path>,
    train_path: Option<&std::path::Path>,
    val_path: Option<&std::path::Path>,
) -> Result<(PathBuf, &'static str, PathBuf, &'static str)> {
    let (trp, trs) = eval_split(data_path, train_path, Half::Train)?;
    let (vap, vas) = eval_split(data_path, val_path, Half::Val)?;
    Ok((trp, trs, vap, vas))
}

fn knn_report(
    name: &str,
    backbone: Option<&ibot::models::Backbone>,
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
    let (train_path, train_split, test_path, test_split) =
        eval_splits(Some(&a.data_path), None, None)?;
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
        FeatureKind::Backbone(FeatureSpec::CLS),
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
        FeatureKind::Backbone(FeatureSpec::CLS),
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

/// The backbone (and the raw weights, for the head) named by `w`, with the crop side to use.
fn open_backbone(
    w: &WeightsArgs,
) -> Result<(
    ibot::interop::Pretrained,
    ibot::models::Backbone,
    usize,
    Device,
)> {
    open_backbone_on(w, run::select_device(&w.device)?)
}

/// [`open_backbone`] on a given device (a data-parallel rank's).
fn open_backbone_on(
    w: &WeightsArgs,
    device: Device,
) -> Result<(
    ibot::interop::Pretrained,
    ibot::models::Backbone,
    usize,
    Device,
)> {
    let (p, backbone) = load_weights(w, device)?;
    let size = ibot::eval::resolve_crop(
        w.crop_size,
        p.config.img_size() as usize,
        p.config.patch_size() as usize,
    )?;
    Ok((p, backbone, size, device))
}

/// The weights named by `w` and their backbone on `device` (no crop: visualize-attention sizes
/// its image itself).
fn load_weights(
    w: &WeightsArgs,
    device: Device,
) -> Result<(ibot::interop::Pretrained, ibot::models::Backbone)> {
    if !["teacher", "student"].contains(&w.checkpoint_key.as_str()) {
        bail!(
            "--checkpoint_key must be teacher or student, not '{}'",
            w.checkpoint_key
        );
    }
    let Some(path) = &w.pretrained_weights else {
        bail!("--pretrained_weights is required")
    };
    let p = ibot::interop::load_pretrained_with(
        path,
        &w.checkpoint_key,
        w.arch.as_deref(),
        w.num_heads,
    )?;
    eprintln!("weights: {}", p.description);
    let (_, backbone) = p.backbone_model(device)?;
    Ok((p, backbone))
}

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result<()> {
    ibot::util::atomic_write(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn eval_knn(k: KnnArgs) -> Result<()> {
    if let Some(bad) = k.nb_knn.iter().find(|&&x| x < 1) {
        bail!("--nb_knn: every k must be at least 1 (got {bad})");
    }
    let t0 = Instant::now();
    let (comm, device, _) = run::join_world(&k.dist, &k.weights.device)?;
    let comm = comm.as_ref();
    let main = comm.is_main();
    let (ftr, ltr, fte, lte) = if let Some(dir) = &k.load_features {
        let path = dir.join("knn_features.safetensors");
        let mut t = ibot::params::read_safetensors(&path)?;
        let mut take = |n: &str| {
            t.remove(n)
                .with_context(|| format!("{} has no '{n}'", path.display()))
        };
        (
            take("train_features")?,
            take("train_labels")?,
            take("test_features")?,
            take("test_labels")?,
        )
    } else {
        let (_, vit, size, device) = open_backbone_on(&k.weights, device)?;
        let spec = FeatureSpec {
            n_last_blocks: k.n_last_blocks,
            avgpool: k.avgpool_patchtokens,
        };
        spec.validate_for(&vit)?;
        let (trp, trs, tep, tes) = eval_splits(
            k.data_path.as_deref(),
            k.train_path.as_deref(),
            k.val_path.as_deref(),
        )?;
        let train_ds = ibot::data::dataset::open(&trp, trs)?;
        let test_ds = ibot::data::dataset::open(&tep, tes)?;
        if comm.is_main() {
            ibot::eval::warn_upsampling(train_ds.as_ref(), size, k.weights.crop_size.is_some());
        }
        let lim = k.subset.unwrap_or(usize::MAX);
        let tr = first_n(train_ds.len(), lim);
        let te = first_n(test_ds.len(), lim);
        let bs = k.batch_size_per_gpu;
        let (ftr, ltr) = features::extract_sharded(
            comm,
            Some(&vit),
            FeatureKind::Backbone(spec),
            train_ds.as_ref(),
            &tr,
            size,
            bs,
            device,
        )?;
        let (fte, lte) = features::extract_sharded(
            comm,
            Some(&vit),
            FeatureKind::Backbone(spec),
            test_ds.as_ref(),
            &te,
            size,
            bs,
            device,
        )?;
        if let (Some(dir), true) = (&k.dump_features, main) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let named = [
                ("train_features", &ftr),
                ("train_labels", &ltr),
                ("test_features", &fte),
                ("test_labels", &lte),
            ]
            .map(|(n, t)| (n.to_string(), t.shallow_clone()));
            ibot::params::write_safetensors(&dir.join("knn_features.safetensors"), &named, None)?;
            eprintln!(
                "features saved to {}",
                dir.join("knn_features.safetensors").display()
            );
        }
        (ftr, ltr, fte, lte)
    };
    // As the official eval_knn.py: every rank extracts, rank 0 classifies and reports.
    if !main {
        return Ok(());
    }
    eprintln!(
        "features of {} training and {} test images ({:.0}s{})",
        ftr.size()[0],
        fte.size()[0],
        t0.elapsed().as_secs_f64(),
        if comm.world_size() > 1 {
            format!(", {} ranks", comm.world_size())
        } else {
            String::new()
        }
    );
    let nclass = ltr.max().int64_value(&[]).max(lte.max().int64_value(&[])) + 1;
    let mut results = Vec::new();
    for &kk in &k.nb_knn {
        if kk > ftr.size()[0] {
            eprintln!(
                "note: k = {kk} is more than the {} training images; using k = {}",
                ftr.size()[0],
                ftr.size()[0]
            );
        }
        let r = knn_classifier(
            &ftr,
            &ltr,
            &fte,
            &lte,
            kk.min(ftr.size()[0]),
            k.temperature,
            nclass.max(5),
        )?;
        println!(
            "{kk}-NN classifier result: Top1: {}, Top5: {}",
            r.top1, r.top5
        );
        results.push(serde_json::json!({"k": kk, "top1": r.top1, "top5": r.top5}));
    }
    if let Some(out) = &k.output {
        write_json(
            out,
            &serde_json::json!({"pretrained_weights": k.weights.pretrained_weights, "checkpoint_key": k.weights.checkpoint_key, "temperature": k.temperature, "n_last_blocks": k.n_last_blocks, "avgpool_patchtokens": k.avgpool_patchtokens, "knn": results}),
        )?;
    }
    Ok(())
}

fn eval_unsup(u: UnsupArgs) -> Result<()> {
    let (p, vit, size, device) = open_backbone(&u.weights)?;
    let (_, head) = p
        .head_model(device)?
        .context("these weights have no projection head (a backbone-only file?); eval-unsup needs a full checkpoint")?;
    let (tep, tes) = eval_split(u.data_path.as_deref(), u.val_path.as_deref(), Half::Val)?;
    let ds = ibot::data::dataset::open(&tep, tes)?;
    ibot::eval::warn_upsampling(ds.as_ref(), size, u.weights.crop_size.is_some());
    let idx = first_n(ds.len(), u.subset.unwrap_or(usize::MAX));
    anyhow::ensure!(
        !idx.is_empty(),
        "no images to evaluate (an empty data set or --subset 0)"
    );
    let bar = ibot::util::progress_bar(
        idx.len().div_ceil(u.batch_size_per_gpu.max(1)) as u64,
        "eval-unsup",
    );
    let (mut labels, mut preds) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(u.batch_size_per_gpu.max(1)) {
        let (x, l) = features::eval_batch(ds.as_ref(), chunk, size)?;
        let logits = tch::no_grad(|| -> Result<tch::Tensor> {
            Ok(head.forward_cls(&vit.forward(&x.to_device(device), None, false)?.select(1, 0)))
        })?;
        preds.extend(Vec::<i64>::try_from(
            logits.argmax(1, false).to_device(Device::Cpu),
        )?);
        labels.extend(Vec::<i64>::try_from(l)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if labels.iter().any(|&l| l < 0) {
        bail!("eval-unsup needs labelled images (class folders or IDX labels)");
    }
    let (nmi, ari, f, acc) = ibot::eval::cluster::eval_pred(&labels, &preds, true);
    let used = preds.iter().collect::<std::collections::HashSet<_>>().len();
    println!("NMI: {nmi}, ARI: {ari}, F: {f}, ACC: {acc}");
    eprintln!(
        "{} images, {used} of {} clusters used",
        labels.len(),
        head.cfg.out_dim
    );
    if let Some(out) = &u.output {
        write_json(
            out,
            &serde_json::json!({"nmi": nmi, "ari": ari, "f": f, "acc": acc, "images": labels.len(), "clusters_used": used}),
        )?;
    }
    Ok(())
}

fn extract_backbone(e: ExtractArgs) -> Result<()> {
    if let (Ok(a), Ok(b)) = (e.input.canonicalize(), e.output.canonicalize()) {
        anyhow::ensure!(
            a != b,
            "the output {} is the input file: refusing to overwrite the checkpoint being read",
            e.output.display()
        );
    }
    anyhow::ensure!(
        e.force || std::fs::symlink_metadata(&e.output).is_err(),
        "{} already exists; pass --force to replace it",
        e.output.display()
    );
    let p = ibot::interop::load_pretrained_with(
        &e.input,
        &e.checkpoint_key,
        e.arch.as_deref(),
        e.num_heads,
    )?;
    let n = ibot::interop::export_backbone(&p, &e.output, e.timm)?;
    println!(
        "{n} backbone tensors of {} written to {}",
        p.description,
        e.output.display()
    );
    Ok(())
}

fn extract_features(f: FeatureArgs) -> Result<()> {
    let (comm, device, _) = run::join_world(&f.dist, &f.weights.device)?;
    let comm = comm.as_ref();
    let (_, vit, size, device) = open_backbone_on(&f.weights, device)?;
    let spec = FeatureSpec {
        n_last_blocks: f.n_last_blocks,
        avgpool: f.avgpool_patchtokens,
    };
    spec.validate_for(&vit)?;
    let ds = ibot::data::dataset::open(&f.data_path, &f.split)?;
    if comm.is_main() {
        ibot::eval::warn_upsampling(ds.as_ref(), size, f.weights.crop_size.is_some());
    }
    let all = first_n(ds.len(), f.subset.unwrap_or(usize::MAX));
    anyhow::ensure!(!all.is_empty(), "no images to extract features from");
    let idx = ibot::dist::shard(&all, comm.rank(), comm.world_size());
    let bs = f.batch_size_per_gpu.max(1);
    let bar = if comm.is_main() {
        ibot::util::progress_bar(idx.len().div_ceil(bs) as u64, "features")
    } else {
        ibot::util::Progress::hidden()
    };
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(bs) {
        let (x, l) = features::view_batch(
            ds.as_ref(),
            chunk,
            size,
            f.num_workers,
            &|img: &ibot::data::ops::Rgb8, _| features::eval_view(img, size),
        )?;
        feats.push(
            spec.features_of(&vit, &x.to_device(device))?
                .to_device(Device::Cpu),
        );
        labels.push(l);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let feats = ibot::dist::unshard(comm, &tch::Tensor::cat(&feats, 0), all.len())?;
    let labels = ibot::dist::unshard(comm, &tch::Tensor::cat(&labels, 0), all.len())?;
    if !comm.is_main() {
        return Ok(());
    }
    let named = vec![
        ("features".to_string(), feats),
        ("labels".to_string(), labels),
    ];
    let shape = named[0].1.size();
    ibot::params::write_safetensors(&f.output, &named, None)?;
    println!(
        "features {shape:?} of {} written to {}",
        ds.describe(),
        f.output.display()
    );
    Ok(())
}

fn visualize_attention(a: AttentionArgs) -> Result<()> {
    use ibot::analysis::attention;
    let device = run::select_device(&a.weights.device)?;
    let (_, backbone) = load_weights(&a.weights, device)?;
    let Some(vit) = backbone.as_vit() else {
        bail!(
            "visualize-attention needs a ViT: a Swin Transformer has no global [CLS] token, so \
             there is no [CLS] attention to show (its attention stays within local windows)"
        )
    };
    let patch = vit.cfg.patch_size as usize;
    let img = ibot::data::dataset::load_rgb(&a.image_path)?;
    let img = attention::prepare_image(&img, &a.image_size, patch)?;
    let threshold = (a.threshold > 0.0).then_some(a.threshold);
    let maps = attention::attention_of(vit, &img, threshold, device)?;
    let files = attention::save_pictures(&img, &maps, patch, threshold, &a.output_dir)?;
    println!(
        "{} heads over {}x{} patches of {}: {} files in {}",
        maps.attentions.size()[0],
        img.height / patch,
        img.width / patch,
        a.image_path.display(),
        files.len(),
        a.output_dir.display()
    );
    Ok(())
}

fn eval_linear(mut a: ibot::eval::linear::LinearArgs) -> Result<()> {
    let device = run::select_device(&a.device)?;
    let p = ibot::interop::load_pretrained_with(
        &a.pretrained_weights,
        &a.checkpoint_key,
        a.arch.as_deref(),
        a.num_heads,
    )?;
    eprintln!("weights: {}", p.description);
    let (_, vit) = p.backbone_model(device)?;
    let size = ibot::eval::resolve_crop(
        a.crop_size,
        p.config.img_size() as usize,
        p.config.patch_size() as usize,
    )?;
    let (trp, trs, tep, tes) = eval_splits(
        a.data_path.as_deref(),
        a.train_path.as_deref(),
        a.val_path.as_deref(),
    )?;
    let train_ds = ibot::data::dataset::open(&trp, trs)?;
    let val_ds = ibot::data::dataset::open(&tep, tes)?;
    ibot::eval::warn_upsampling(train_ds.as_ref(), size, a.crop_size.is_some());
    a.crop_size = Some(size);
    eprintln!(
        "data: {} training ({}), {} validation images",
        train_ds.len(),
        train_ds.describe(),
        val_ds.len()
    );
    let r = ibot::eval::linear::run(&a, &vit, train_ds.as_ref(), val_ds.as_ref(), device)?;
    println!("Training of the linear classifier on frozen features completed. Top-1 test accuracy: {:.1}", r.best_acc1);
    Ok(())
}

fn run(cli: Cli) -> Result<bool> {
    if let Some(n) = cli.threads {
        if n < 1 {
            bail!("--threads must be at least 1 (got {n})");
        }
        ibot::util::set_threads_explicitly(n);
    }
    match cli.cmd {
        Cmd::Demo(d) => demo(d).map(|_| true),
        Cmd::Train(a) => {
            ibot::train::interrupt::install()?;
            let out = run::train(&a)?;
            if out.rank == 0 {
                let ckpt = a.output_dir.join("checkpoint.safetensors");
                if out.epochs_done == 0 {
                    eprintln!(
                        "no epoch was trained (the run was already at epoch {} of --epochs {}); {}",
                        out.start_epoch,
                        a.epochs,
                        if ckpt.is_file() {
                            format!("{} is unchanged", ckpt.display())
                        } else {
                            "no checkpoint was written".to_string()
                        }
                    );
                } else {
                    eprintln!(
                        "{} epoch(s) trained; checkpoint in {}",
                        out.epochs_done,
                        ckpt.display()
                    );
                }
            }
            Ok(true)
        }
        Cmd::Launch(mut l) => {
            // `ibot --threads N launch ...`: the workers get the thread count too.
            if let Some(n) = cli.threads {
                l.command.splice(1..1, ["--threads".to_string(), n.to_string()]);
            }
            let code = ibot::dist::launch::launch(&l)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(true)
        }
        Cmd::EvalKnn(k) => eval_knn(k).map(|_| true),
        Cmd::EvalLinear(a) => eval_linear(a).map(|_| true),
        Cmd::EvalUnsup(u) => eval_unsup(u).map(|_| true),
        Cmd::EvalRetrieval { weights, args } => args.run(Box::new(move || open_backbone(&weights).map(|(_, b, s, d)| (b, s, d)))).map(|_| true),
        Cmd::EvalCopydetection { weights, args } => args.run(Box::new(move || open_backbone(&weights).map(|(_, b, s, d)| (b, s, d)))).map(|_| true),
        Cmd::EvalLinearMulti { weights, args } => args.run(&weights.checkpoint_key.clone(), Box::new(move || open_backbone(&weights).map(|(_, b, s, d)| (b, s, d)))).map(|_| true),
        Cmd::EvalLogreg { weights, args } => args.run(Box::new(move || open_backbone(&weights).map(|(_, b, s, d)| (b, s, d)))).map(|_| true),
        Cmd::ExtractBackbone(e) => extract_backbone(e).map(|_| true),
        Cmd::ExtractFeatures(f) => extract_features(f).map(|_| true),
        Cmd::VisualizeAttention(a) => visualize_attention(a).map(|_| true),
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
        Cmd::Bench(BenchCmd::Allreduce {
            numel,
            iters,
            warmup,
            device,
            dist,
        }) => {
            let (comm, _, _) = run::join_world(&dist, &device)?;
            let ws = comm.world_size();
            anyhow::ensure!(
                ws > 1,
                "bench allreduce needs several processes: run it under `ibot launch --nproc_per_node 2` or torchrun"
            );
            let ms = ibot::bench::allreduce(comm.as_ref(), numel, iters, warmup)?;
            if comm.is_main() {
                // nccl-tests' definitions: algorithm bandwidth = bytes / time; bus bandwidth
                // scales it by 2(n-1)/n, the bytes each rank really moves in a ring.
                let gb = numel as f64 * 4.0 / 1e9;
                let alg = gb / (ms / 1e3);
                println!(
                    "ibot all_reduce (c10d Gloo, {ws} ranks): {numel} float32 in {ms:.1} ms (median of {iters}): algbw {alg:.2} GB/s, busbw {:.2} GB/s",
                    alg * 2.0 * (ws as f64 - 1.0) / ws as f64
                );
            }
            Ok(true)
        }
        Cmd::Bench(BenchCmd::Train(b)) => {
            let (comm, device, _) = run::join_world(&b.dist, &b.device)?;
            let t = ibot::bench::step(&b, device, comm.as_ref())?;
            if !comm.is_main() {
                return Ok(true);
            }
            let feed = match &b.data_path {
                Some(p) => format!("loader on {} with {} worker(s)", p.display(), b.num_workers),
                None => "random tensors".to_string(),
            };
            println!(
                "ibot (tch, {} rank(s) x {} libtorch thread(s), {}, {feed}): {}/{} batch {} 2x{} + {}x{}: {:.1} ms/iter, {:.2} img/s",
                comm.world_size(),
                tch::get_num_threads(),
                t.precision.name(),
                b.arch,
                b.patch(),
                b.batch,
                b.global_crops_size,
                b.local_crops_number,
                b.local_crops_size,
                t.ms_per_iter,
                t.images_per_s
            );
            println!("where the time goes (ms per step):");
            for (name, ms) in &t.phases {
                println!(
                    "  {name:<46} {ms:9.1}  {:5.1}%",
                    100.0 * ms / t.ms_per_iter.max(1e-9)
                );
            }
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

/// Defaults of `ibot demo`, placed right after the subcommand, before the user's own options
/// (which therefore win).
const DEMO_DEFAULTS: &[&str] = &[
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
];

/// The end of `ibot demo --help`: the defaults it really runs with (the option list above it
/// shows `train`'s, which the demo's replace).
fn demo_help() -> String {
    let mut pairs = Vec::new();
    for p in DEMO_DEFAULTS.chunks(2) {
        pairs.push(format!("  {} {}", p[0], p[1]));
    }
    let preset = PRESETS
        .iter()
        .find(|(n, _, _)| *n == "fmnist_tiny")
        .map(|(_, _, a)| a.join(" "))
        .unwrap_or_default();
    format!(
        "The demo runs with these defaults in place of train's (options you give win):\n{}\n\n\
         --preset fmnist_tiny stands for:\n  {preset}",
        pairs.join("\n")
    )
}

/// Puts [`DEMO_DEFAULTS`] right after the subcommand when the subcommand is `demo` (the first
/// argument that is neither an option nor the value of `--threads`); any other command line,
/// including one where `demo` is only the value of an option or a file name, is left alone.
fn demo_defaults(argv: Vec<String>) -> Vec<String> {
    let Some(pos) = ibot::train::args::subcommand_position(&argv) else {
        return argv;
    };
    if argv[pos] != "demo" {
        return argv;
    }
    let mut out = argv[..=pos].to_vec();
    out.extend(DEMO_DEFAULTS.iter().map(|s| s.to_string()));
    out.extend(argv[pos + 1..].iter().cloned());
    out
}

fn main() -> ExitCode {
    let argv = demo_defaults(std::env::args().collect());
    let argv = match expand_config_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    // Only training steps profit from keeping freed memory (see tune_allocator); evaluation
    // would hold on to gigabytes of released feature batches.
    if matches!(
        cli.cmd,
        Cmd::Train(_) | Cmd::Demo(_) | Cmd::Bench(BenchCmd::Train(_))
    ) {
        ibot::util::tune_allocator();
    }
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if e.downcast_ref::<ibot::train::interrupt::Interrupted>().is_some() => {
            let i = e
                .downcast_ref::<ibot::train::interrupt::Interrupted>()
                .map(|i| (i.exit_code(), i.message.clone()))
                .unwrap_or((130, String::new()));
            if !i.1.is_empty() {
                eprintln!("{}", i.1);
            }
            ExitCode::from(i.0)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
