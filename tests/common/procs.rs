//! Processes of the data-parallel tests: ports, a clean launcher environment, the workers of a
//! launcher, and killing one of them.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `cmd` without the launcher variables of the environment the tests run in (a test run under
/// torchrun or SLURM must not make its children ranks of that job).
pub fn clean(cmd: &mut Command) -> &mut Command {
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "TORCHELASTIC_USE_AGENT_STORE",
    ] {
        cmd.env_remove(k);
    }
    cmd
}

/// Pids of the direct children of `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

pub fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// SIGKILLs rank 1 (the second child) of a 2-worker `ibot launch` whose stderr is piped, then
/// asserts that the launcher stops within 60 s with a failure naming rank 1 and no worker left
/// running. Returns the launcher's stderr.
pub fn kill_rank_1(launcher: &mut Child) -> String {
    let workers = children(launcher.id());
    assert_eq!(workers.len(), 2, "workers {workers:?}");
    unsafe { libc::kill(workers[1] as i32, libc::SIGKILL) };
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = launcher.kill();
            panic!("the launcher did not stop within 60 s of a dead rank");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    launcher
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success(),
        "launcher exited 0 after a rank was killed"
    );
    assert!(
        err.contains("rank 1"),
        "the launcher does not name the dead rank:\n{err}"
    );
    for p in &workers {
        assert!(!alive(*p), "worker {p} is still running");
    }
    err
}

/// Runs `bin launch --nnodes 2 --node_rank 0|1 --nproc_per_node 1` on loopback with `args`
/// (one process per "node", `envs` set on both) and asserts that both nodes succeed.
pub fn run_two_nodes(bin: &str, args: &[String], envs: &[(&str, &str)]) {
    let port = free_port().to_string();
    let node = |rank: &str| {
        let mut c = Command::new(bin);
        c.args([
            "launch",
            "--nnodes",
            "2",
            "--node_rank",
            rank,
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            &port,
        ])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        clean(&mut c).spawn().unwrap()
    };
    let (n0, n1) = (node("0"), node("1"));
    for (i, n) in [n0, n1].into_iter().enumerate() {
        let o = n.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "node {i}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
