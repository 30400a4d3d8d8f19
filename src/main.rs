//! The `ibot` command line.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use ibot::cli::{self, presets::expand_config_args};

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
    #[command(args_override_self = true, after_help = cli::demo::demo_help())]
    Demo(Box<cli::demo::DemoArgs>),
    /// iBOT pre-training (the official main_ibot.py). Resumes from <output_dir>/checkpoint.safetensors.
    #[command(args_override_self = true)]
    Train(Box<cli::train::TrainArgs>),
    /// Starts N data-parallel worker processes of an ibot command on this node, like torchrun
    /// (no Python needed): `ibot launch --nproc_per_node 2 train --data_path DIR ...`.
    /// Several nodes: the same command on each with --nnodes, --node_rank and --master_addr.
    #[command(args_override_self = true)]
    Launch(cli::launch::LaunchArgs),
    /// Weighted k-NN accuracy of [CLS] features (eval_knn.py; Swin: the average-pooled token).
    /// Reads `ibot train` checkpoints, exported backbones and official .pth files, ViT or Swin.
    EvalKnn(cli::eval_knn::KnnArgs),
    /// Linear probe on frozen features (eval_linear.py): SGD on a linear layer over the [CLS]
    /// tokens of the last blocks (Swin: their average-pooled tokens), validation each epoch,
    /// checkpointed and resumable.
    EvalLinear(cli::eval_linear::LinearArgs),
    /// Unsupervised classification (unsup_cls.py): the teacher head's argmax on the validation
    /// images as cluster ids, scored against the labels with NMI, ARI, F and Hungarian accuracy.
    EvalUnsup(cli::eval_unsup::UnsupArgs),
    /// End-to-end fine-tuning for classification with the official recipes (layer-wise decay
    /// on ImageNet, DeiT transfer, semi-supervised from the projection head); `--demo`
    /// fine-tunes the `ibot demo` model on Fashion-MNIST next to a random initialisation.
    #[command(after_help = cli::finetune::RECIPES_HELP)]
    Finetune(Box<cli::finetune::FinetuneArgs>),
    /// L2-regularised multinomial logistic regression on frozen, L2-normalised features
    /// (eval_logistic_regression.py), one fit per --lr_lambd, solved to the optimum.
    EvalLogreg(cli::eval_logreg::EvalLogregArgs),
    /// Many linear probes at once on the same frozen features, one per learning rate of the
    /// official sweep (eval_linear_multi.py); the best top-1 and its settings are reported.
    EvalLinearMulti(cli::eval_linear_multi::EvalLinearMultiArgs),
    /// Image retrieval on revisited Oxford / Paris (eval_image_retrieval.py): features of every
    /// database image and query, cosine ranking, mAP and mP@1/5/10 (Easy, Medium, Hard).
    EvalRetrieval(cli::eval_retrieval::EvalRetrievalArgs),
    /// Copy detection on Copydays (eval_copy_detection.py): [CLS] + GeM-pooled patch features,
    /// optional whitening and distractors, mAP per block of copies.
    EvalCopydetection(cli::eval_copydetection::EvalCopydetectionArgs),
    /// Video object segmentation on DAVIS-2017 by label propagation (eval_video_segmentation.py):
    /// palette PNGs per frame for the DAVIS evaluator.
    EvalVideoSeg(cli::eval_video_seg::EvalVideoSegArgs),
    /// Backbone weights of a checkpoint (ours or official .pth) to a safetensors file under the
    /// official names, like extract_backbone_weights.py.
    ExtractBackbone(cli::extract_backbone::ExtractArgs),
    /// Features of every image of a data set to a safetensors file (`features` [N, D], `labels` [N]).
    ExtractFeatures(cli::extract_features::FeatureArgs),
    /// Self-attention maps of the [CLS] token in the last block, per head, for one image (ViT only)
    /// (visualize_attention.py): heat maps, the patches holding --threshold of each head's
    /// attention mass drawn over the image, and the raw maps as safetensors.
    VisualizeAttention(cli::visualize_attention::AttentionArgs),
    /// Dense patch correspondences between two images (visualize_correspondence.py): matches
    /// of patch features drawn as lines between pairs from one class or two views of an image,
    /// and in instance mode the matching accuracy.
    Correspondence(cli::correspondence::CorrespondenceArgs),
    /// The teacher head's prototypes as part-level patterns (extract_topk_cluster.py): every
    /// patch or [CLS] token assigned to its prototype, grids of the best members of the most
    /// populated ones; memory-bounded and resumable. Needs weights with the head.
    Patterns(cli::patterns::PatternsArgs),
    /// Attention over a folder of video frames (video_generation.py): attention frames and an
    /// animated GIF.
    VideoGeneration(cli::video_generation::VideoArgs),
    /// A backbone and a trained linear classifier in one file (combine_ckpt.py), for
    /// `eval-linear --evaluate` and every --pretrained_weights.
    Combine(cli::combine::CombineArgs),
    /// Lists the named recipes for --preset.
    Presets,
    /// Benchmarks (timings, not tests). Compare with bench/torch_step.py run with the same
    /// options on the same machine.
    #[command(subcommand)]
    Bench(cli::bench::BenchCmd),
    /// Compares this implementation with reference tensors from the official code. A one-step
    /// fixture (fixtures.json): forward outputs, attention, position-embedding interpolation,
    /// loss and centres, gradients after clipping/cancelling, one AdamW step, the EMA teacher,
    /// schedules and k-NN. A trajectory fixture (trajectory.json): its fixed batches run through
    /// the `ibot train` loop, compared step by step (schedules, loss terms, centres), epoch by
    /// epoch (statistics, every student and teacher tensor) and at the end (optimizer state).
    /// Prints one line per group and exits non-zero on any mismatch.
    VerifyFixture(cli::verify_fixture::VerifyArgs),
}

fn run(cli: Cli) -> Result<bool> {
    if let Some(n) = cli.threads {
        if n < 1 {
            bail!("--threads must be at least 1 (got {n})");
        }
        ibot::util::set_threads_explicitly(n);
    }
    let done = |r: Result<()>| r.map(|_| true);
    match cli.cmd {
        Cmd::Demo(a) => done(cli::demo::run(*a)),
        Cmd::Train(a) => done(cli::train::run(*a)),
        Cmd::Launch(a) => done(cli::launch::run(a, cli.threads)),
        Cmd::EvalKnn(a) => done(cli::eval_knn::run(a)),
        Cmd::EvalLinear(a) => done(cli::eval_linear::run(a)),
        Cmd::EvalUnsup(a) => done(cli::eval_unsup::run(a)),
        Cmd::Finetune(a) => done(cli::finetune::main(&a)),
        Cmd::EvalLogreg(a) => done(cli::eval_logreg::run(a)),
        Cmd::EvalLinearMulti(a) => done(cli::eval_linear_multi::run(a)),
        Cmd::EvalRetrieval(a) => done(cli::eval_retrieval::run(a)),
        Cmd::EvalCopydetection(a) => done(cli::eval_copydetection::run(a)),
        Cmd::EvalVideoSeg(a) => done(cli::eval_video_seg::run(a)),
        Cmd::ExtractBackbone(a) => done(cli::extract_backbone::run(a)),
        Cmd::ExtractFeatures(a) => done(cli::extract_features::run(a)),
        Cmd::VisualizeAttention(a) => done(cli::visualize_attention::run(a)),
        Cmd::Correspondence(a) => done(cli::correspondence::run(a)),
        Cmd::Patterns(a) => done(cli::patterns::run(a)),
        Cmd::VideoGeneration(a) => done(cli::video_generation::run(a)),
        Cmd::Combine(a) => done(cli::combine::run(a)),
        Cmd::Presets => done(cli::presets::print()),
        Cmd::Bench(b) => done(cli::bench::run(b)),
        Cmd::VerifyFixture(a) => cli::verify_fixture::run(a),
    }
}

fn main() -> ExitCode {
    let argv = cli::demo::with_defaults(std::env::args().collect());
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
        Cmd::Train(_)
            | Cmd::Demo(_)
            | Cmd::Finetune(_)
            | Cmd::Bench(cli::bench::BenchCmd::Train(_))
    ) {
        ibot::util::tune_allocator();
    }
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e)
            if e.downcast_ref::<ibot::train::interrupt::Interrupted>()
                .is_some() =>
        {
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
