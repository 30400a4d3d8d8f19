//! Joining the data-parallel world a launcher set up (or the world of one process).

use std::time::Duration;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{Comm, DistEnv, ProcessGroup, SingleProcess};
use crate::device::DeviceChoice;

/// How the processes of a data-parallel run find each other (`--dist_url`, `--dist_timeout`).
/// The world itself (rank, world size, master) comes from the launcher: torchrun, `srun` or
/// `ibot launch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistConfig {
    /// `env://` or `tcp://HOST:PORT`, as the official `--dist_url`.
    pub dist_url: String,
    /// Seconds any collective (and joining the group) may wait for the other ranks.
    pub dist_timeout: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            dist_url: "env://".into(),
            dist_timeout: super::DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// This process's view of the data-parallel world: a c10d group when launched for one, with
/// this rank's device (see [`DeviceChoice::select_for_rank`]).
pub fn join_world(
    dist: &DistConfig,
    device: DeviceChoice,
) -> Result<(Box<dyn Comm>, Device, Option<DistEnv>)> {
    let env = DistEnv::detect(&dist.dist_url)?;
    let device = device.select_for_rank(env.as_ref().map(|e| e.local_rank))?;
    let comm: Box<dyn Comm> = match &env {
        None => Box::new(SingleProcess),
        Some(e) => {
            ensure!(
                dist.dist_timeout > 0,
                "--dist_timeout must be at least 1 second"
            );
            if e.local_world_size > 1
                && std::env::var_os("OMP_NUM_THREADS").is_none()
                && !crate::util::threads_set_explicitly()
            {
                // Share the node's cores among its ranks instead of oversubscribing them.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tch::set_num_threads((cores / e.local_world_size).max(1) as i32);
            }
            let pg = ProcessGroup::new(e, Duration::from_secs(dist.dist_timeout), device)?;
            if e.rank == 0 {
                eprintln!(
                    "data parallel: {} (launched by {}), master {}:{}, {} thread(s) per rank",
                    pg.describe(),
                    e.launcher,
                    e.master_addr,
                    e.master_port,
                    tch::get_num_threads()
                );
            }
            Box::new(pg)
        }
    };
    Ok((comm, device, env))
}
