//! `ibot bench`'s subcommands (timings, not tests) and their reports.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

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
    #[command(rename_all = "snake_case", alias = "step")]
    Train(crate::bench::StepBench),
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
            let (comm, device, _) = crate::dist::join_world(&b.dist.config(), b.device.parse()?)?;
            let t = crate::bench::step(&b, device, comm.as_ref())?;
            if !comm.is_main() {
                return Ok(());
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
            Ok(())
        }
    }
}
