//! `ibot bench`'s subcommands (timings, not tests) and their reports.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::train::TrainArgs;
use super::DistArgs;

#[derive(Subcommand)]
#[command(rename_all = "snake_case")]
pub enum BenchCmd {
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
    #[command(rename_all = "snake_case", alias = "step", args_override_self = true)]
    Train(StepBench),
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

/// Runs one benchmark and prints its timings.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Data {
            data_path,
            num_workers,
            local_crops_number,
            batch_size,
            epochs,
        } => {
            let (n, dt) = crate::bench::data(
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
            Ok(())
        }
        BenchCmd::Allreduce {
            numel,
            iters,
            warmup,
            device,
            dist,
        } => {
            let (comm, _, _) = crate::dist::join_world(&dist.config(), device.parse()?)?;
            let ws = comm.world_size();
            anyhow::ensure!(
                ws > 1,
                "bench allreduce needs several processes: run it under `ibot launch --nproc_per_node 2` or torchrun"
            );
            let ms = crate::bench::allreduce(comm.as_ref(), numel, iters, warmup)?;
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
            Ok(())
        }
        BenchCmd::Train(b) => {
            let (comm, device, _) =
                crate::dist::join_world(&b.train.dist.config(), b.train.device)?;
            let cfg = b.config();
            let t = crate::bench::step(&cfg, device, comm.as_ref())?;
            if comm.is_main() {
                print!("{}", t.report(&cfg, comm.world_size()));
            }
            Ok(())
        }
    }
}

/// What `ibot bench train` measures: every model, head, crop and objective option of
/// `ibot train` (so any recipe can be timed), with benchmark defaults where `train`'s would
/// make a poor benchmark (batch 8, 2 local crops, float32, CPU, 1 loader worker, no frozen last
/// layer), plus the timing options.
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
#[command(
    mut_arg("batch_size_per_gpu", |a| a.default_value("8").visible_alias("batch")),
    mut_arg("local_crops_number", |a| a.default_value("2")),
    mut_arg("use_fp16", |a| a.default_value("false")),
    mut_arg("device", |a| a.default_value("cpu")),
    mut_arg("num_workers", |a| a.default_value("1")),
    mut_arg("freeze_last_layer", |a| a.default_value("0")),
    mut_arg("data_path", |a| a.default_value(RANDOM_TENSORS).help(
        "Take the batches from the data loader over this image folder (e.g. \
         ../shared/bench/photos), with the train options' augmentation and masks; each timed \
         step then includes waiting for its batch. Without it the views are random tensors \
         and the masks random (30% of the patches), made before each step's clock starts"
    )),
)]
pub struct StepBench {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed steps first (allocator and kernel caches warm up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Run the student's head on every token as the official code does (false: only on the
    /// masked tokens and the local views' [CLS], which is what `ibot train` does).
    #[arg(long, default_value = "false", value_parser = super::parse_bool, action = clap::ArgAction::Set)]
    pub full_head: bool,
}

/// `--data_path` of `bench train` when none is given: random tensors instead of a loader.
const RANDOM_TENSORS: &str = "random";

impl StepBench {
    /// The benchmark's configuration. With a shared teacher head (the default) the patch
    /// head's width must equal `--out_dim`, so here it follows `--out_dim` (`ibot train` asks
    /// for both flags instead).
    pub fn config(&self) -> crate::bench::StepBenchConfig {
        let mut c = self.train.to_config();
        if c.head.shared_head_teacher {
            c.head.patch_out_dim = c.head.out_dim;
        }
        crate::bench::StepBenchConfig {
            train: c,
            data_path: (self.train.data_path.as_os_str() != RANDOM_TENSORS)
                .then(|| self.train.data_path.clone()),
            iters: self.iters,
            warmup: self.warmup,
            full_head: self.full_head,
        }
    }
}
