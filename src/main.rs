//! The `ibot` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tch::{Device, Kind, Tensor};

use ibot::loss::{IbotLossConfig, SingleProcess};
use ibot::models::{HeadConfig, VitConfig};
use ibot::train::optim::OptimizerKind;
use ibot::train::{Ibot, IbotConfig};

#[derive(Parser)]
#[command(name = "ibot", version, about = "iBOT self-supervised pre-training of Vision Transformers, on libtorch", long_about = None)]
struct Cli {
    /// Number of CPU threads libtorch may use (default: all cores).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a small iBOT model on random views for a few steps and prints the losses
    /// (a smoke test of the whole step: teacher, masked student, local views, loss, AdamW, EMA).
    Demo {
        /// Number of training steps.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
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

#[derive(Subcommand)]
enum BenchCmd {
    /// Milliseconds per full training step (teacher + masked student + local views + loss +
    /// backward + clipping + AdamW + EMA), data loading excluded.
    Step {
        #[arg(long, default_value = "vit_small")]
        arch: String,
        #[arg(long, default_value_t = 16)]
        patch_size: i64,
        /// Images per step (each gives 2 global + local_crops_number local views).
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 224)]
        global_crops_size: i64,
        #[arg(long, default_value_t = 96)]
        local_crops_size: i64,
        #[arg(long, default_value_t = 2)]
        local_crops_number: usize,
        #[arg(long, default_value_t = 8192)]
        out_dim: i64,
        #[arg(long, default_value_t = 0.1)]
        drop_path: f64,
        /// Timed steps (after the warm-up steps).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
    },
}

fn demo(steps: usize, seed: i64) -> Result<()> {
    tch::manual_seed(seed);
    let backbone = VitConfig {
        img_size: 32,
        patch_size: 4,
        depth: 4,
        embed_dim: 96,
        num_heads: 3,
        drop_path_rate: 0.1,
        masked_im_modeling: true,
        ..VitConfig::from_arch("vit_tiny", 4)?
    };
    let head = HeadConfig { hidden_dim: 256, bottleneck_dim: 64, ..HeadConfig::new(96, 512, 512, false, false) };
    let loss = IbotLossConfig {
        out_dim: 512,
        patch_out_dim: 512,
        ngcrops: 2,
        nlcrops: 4,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.04,
        warmup_teacher_temp2: 0.04,
        teacher_temp2: 0.07,
        warmup_teacher_temp_epochs: 1,
        nepochs: 1,
        student_temp: 0.1,
        center_momentum: 0.9,
        center_momentum2: 0.9,
        lambda1: 1.0,
        lambda2: 1.0,
        mim_start_epoch: 0,
    };
    let cfg = IbotConfig {
        backbone,
        head,
        shared_head_teacher: true,
        loss,
        clip_grad: 3.0,
        freeze_last_layer: 0,
        optimizer: OptimizerKind::Adamw,
    };
    let mut ibot = Ibot::new(cfg, Device::Cpu)?;
    let b = 8;
    let opts = (Kind::Float, Device::Cpu);
    println!("demo: ViT depth 4 dim 96 patch 4, 2 global 32px + 4 local 16px views, batch {b}, random data");
    for step in 0..steps {
        let mut views: Vec<Tensor> = (0..2).map(|_| Tensor::randn([b, 3, 32, 32], opts)).collect();
        views.extend((0..4).map(|_| Tensor::randn([b, 3, 16, 16], opts)));
        let masks: Vec<Tensor> = (0..2).map(|_| Tensor::rand([b, 8, 8], opts).lt(0.3)).collect();
        let s = ibot.train_step(&views, &masks, 0, 5e-4, 0.04, 0.996, &SingleProcess)?;
        println!("step {step}: loss {:.4}  cls {:.4}  patch {:.4}", s.loss, s.cls, s.patch);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<bool> {
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match cli.cmd {
        Cmd::Demo { steps, seed } => demo(steps, seed).map(|_| true),
        Cmd::Bench(BenchCmd::Step {
            arch,
            patch_size,
            batch,
            global_crops_size,
            local_crops_size,
            local_crops_number,
            out_dim,
            drop_path,
            iters,
            warmup,
        }) => {
            let b = ibot::bench::StepBench {
                arch,
                patch_size,
                batch,
                global_crops_size,
                local_crops_size,
                local_crops_number,
                out_dim,
                drop_path,
                iters,
                warmup,
            };
            let t = ibot::bench::step(&b, Device::Cpu)?;
            println!(
                "ibot (tch, libtorch threads {}): {}/{} batch {} 2x{} + {}x{}: {:.1} ms/iter, {:.2} img/s",
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
            let report = ibot::verify::verify_fixture(&dir).with_context(|| format!("verifying {}", dir.display()))?;
            print!("{}", report.render());
            let ok = report.passed();
            println!("{}", if ok { "all checks passed" } else { "MISMATCH against the reference" });
            Ok(ok)
        }
    }
}

fn main() -> ExitCode {
    ibot::util::tune_allocator();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
