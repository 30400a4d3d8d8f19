//! `ibot launch`: the command-line options of [`crate::dist::launch::LaunchConfig`].

use crate::dist::launch::LaunchConfig;

const LAUNCH_HELP: &str = "\
Each worker runs this executable with COMMAND and the environment torchrun gives its workers:
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_NAME,
ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT=0,
TORCHELASTIC_MAX_RESTARTS=0 and IBOT_LAUNCHED=1, plus OMP_NUM_THREADS = cores / nproc_per_node
unless it is set already. The worker with LOCAL_RANK 0 writes to the terminal; the others'
output is prefixed with [rank R]. If a worker fails, the others get SIGTERM, then SIGKILL after
--grace_seconds, and the launcher exits with the failed worker's code. SIGINT/SIGTERM sent to
the launcher are passed on to the workers the same way.

One machine, 2 workers:
  ibot launch --nproc_per_node 2 train --data_path DATA --output_dir OUT

Two machines with 4 workers each (8 in all), the first one reachable at 10.0.0.1:
  on 10.0.0.1:  ibot launch --nnodes 2 --node_rank 0 --nproc_per_node 4 \\
                  --master_addr 10.0.0.1 --master_port 29500 train --data_path DATA --output_dir OUT
  on the other: ibot launch --nnodes 2 --node_rank 1 --nproc_per_node 4 \\
                  --master_addr 10.0.0.1 --master_port 29500 train --data_path DATA --output_dir OUT";

/// Starts data-parallel workers of this executable, like `torchrun` (examples below).
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case", after_help = LAUNCH_HELP)]
pub struct LaunchArgs {
    /// Worker processes to start on this node, typically one per GPU (torchrun's
    /// --nproc_per_node). Their LOCAL_RANK runs from 0 to nproc_per_node - 1.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines taking part (torchrun's --nnodes); each runs its own `ibot launch` with the same
    /// options but its own --node_rank. WORLD_SIZE = nnodes × nproc_per_node. E.g. two machines
    /// with 4 GPUs each: `--nnodes 2 --nproc_per_node 4` on both, 8 workers in all.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// Index of this machine among the --nnodes, from 0 (torchrun's --node_rank, GROUP_RANK).
    /// Its workers get RANK = node_rank × nproc_per_node + LOCAL_RANK; with 2 nodes of 4
    /// workers, node 0 runs ranks 0-3 and node 1 ranks 4-7.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the machine with --node_rank 0 (torchrun's --master_addr, MASTER_ADDR): the
    /// worker of rank 0 hosts the TCP store every worker meets at. Must be reachable from every
    /// node and given identically on all of them, e.g. `--master_addr 10.0.0.1` on both nodes.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Free TCP port on --master_addr for that store (torchrun's --master_port, MASTER_PORT);
    /// the same on every node. Two jobs on one master need different ports.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds to wait for the other workers to exit after one failed or a signal arrived, before
    /// killing them.
    #[arg(long, default_value_t = 30)]
    pub grace_seconds: u64,
    /// The ibot subcommand and its options, given to every worker as is, e.g. `train --data_path
    /// DATA --output_dir OUT`. Everything after the first word that is not a launch option
    /// belongs to it.
    #[arg(
        required = true,
        allow_hyphen_values = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    pub command: Vec<String>,
}

impl From<LaunchArgs> for LaunchConfig {
    fn from(a: LaunchArgs) -> Self {
        Self {
            nproc_per_node: a.nproc_per_node,
            nnodes: a.nnodes,
            node_rank: a.node_rank,
            master_addr: a.master_addr,
            master_port: a.master_port,
            grace_seconds: a.grace_seconds,
            command: a.command,
        }
    }
}

/// Starts the workers and waits for them; exits with the first failing worker's code.
/// `threads` (`ibot --threads N launch ...`) is passed on to the workers.
pub fn run(mut l: LaunchArgs, threads: Option<i32>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        l.command
            .splice(1..1, ["--threads".to_string(), n.to_string()]);
    }
    let code = crate::dist::launch::launch(&l.into())?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LaunchArgs;

    /// Mimics main.rs: a global option and `launch` as a subcommand.
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        threads: Option<i32>,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Cmd {
        Launch(LaunchArgs),
    }

    #[test]
    fn command_line_parses_like_torchrun() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "ibot",
            "launch",
            "--nproc_per_node",
            "2",
            "--nnodes",
            "2",
            "--node_rank",
            "1",
            "--master_addr",
            "10.0.0.1",
            "train",
            "--data_path",
            "x",
            "--threads",
            "3",
            "-h",
        ])
        .unwrap();
        let Cmd::Launch(a) = cli.cmd;
        assert_eq!((a.nproc_per_node, a.nnodes, a.node_rank), (2, 2, 1));
        assert_eq!(
            (a.master_addr.as_str(), a.master_port, a.grace_seconds),
            ("10.0.0.1", 29500, 30)
        );
        assert_eq!(
            a.command,
            ["train", "--data_path", "x", "--threads", "3", "-h"]
        );
        assert_eq!(cli.threads, None);
        assert!(Cli::try_parse_from(["ibot", "launch", "--nproc_per_node", "2"]).is_err());
    }
}
