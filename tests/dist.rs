//! Data-parallel training on c10d (Gloo, loopback): 2 processes × batch 4 compute the step of
//! 1 process × batch 8, under `ibot launch`, torchrun and a two-"node" launch; a killed rank
//! stops the others and the run resumes; bad launch environments are clear errors.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::procs::{clean, free_port};
use ibot::dist::{first_slurm_host, parse_dist_url, DistEnv};
use ibot::params::read_safetensors;
use tch::{Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("dist", name)
}

/// 32 labelled 16x16 grey images in IDX files.
fn tiny_data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("data");
        common::write_idx(&dir, "train", 32, 16);
        dir
    })
}

/// `train` options of a tiny model in float32 without drop path, with SGD and a large lr so
/// that a wrong gradient average changes the update visibly.
fn train_args(out: &Path, batch: usize, epochs: usize) -> Vec<String> {
    let s = format!(
        "train --arch vit_tiny --patch_size 4 --img_size 16 --depth 1 --embed_dim 24 --num_heads 2 \
         --global_crops_size 16 --local_crops_size 8 --local_crops_number 2 --out_dim 32 \
         --patch_out_dim 32 --head_hidden_dim 32 --head_bottleneck_dim 16 --epochs {epochs} \
         --warmup_epochs 1 --warmup_teacher_temp_epochs 1 --num_workers 1 --device cpu \
         --drop_path 0 --optimizer sgd --lr 0.5 --use_fp16 false --saveckp_freq 0 \
         --batch_size_per_gpu {batch} --dist_timeout 60"
    );
    let mut v: Vec<String> = s.split_whitespace().map(String::from).collect();
    v.extend([
        "--data_path".into(),
        tiny_data().display().to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ]);
    v
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The checkpoint's student, teacher and centres.
fn state(dir: &Path) -> HashMap<String, Tensor> {
    read_safetensors(&dir.join("checkpoint.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("student.") || k.starts_with("teacher.") || k.starts_with("loss.")
        })
        .collect()
}

/// Largest |a − b| / (1e-4 + |b|_max) over every tensor: each tensor's error relative to its
/// own scale (a bias of 1e-3 and a weight of 1 are judged alike).
fn worst(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (String, f64) {
    assert_eq!(a.len(), b.len());
    let mut worst = (String::new(), 0.0);
    for (k, tb) in b {
        let ta = &a[k];
        let d = (ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        let scale = tb.abs().max().to_kind(Kind::Double).double_value(&[]);
        let r = d / (1e-4 + scale);
        if r > worst.1 {
            worst = (k.clone(), r);
        }
    }
    worst
}

/// Float32 summation order (two partial batch means averaged vs one mean of 8) over 8 SGD steps
/// with lr 0.5: measured 2.7e-7 relative (tolerance 1e-5); a real error (wrong average, lost shard, missing
/// all-reduce of the centres) is orders of magnitude larger, which `the_tolerance_rejects_*`
/// shows on a run that sees half the data per step.
const TOL: f64 = 1e-5;

/// The 1-process × batch 8 run every equivalence test compares with (run once).
fn reference() -> HashMap<String, Tensor> {
    static REF: OnceLock<PathBuf> = OnceLock::new();
    let dir = REF.get_or_init(|| {
        let out = scratch("ref8");
        run(clean(Command::new(BIN).args(train_args(&out, 8, 2))));
        out
    });
    state(dir)
}

#[test]
fn two_ranks_under_ibot_launch_compute_the_step_of_one_process_with_the_whole_batch() {
    let out = scratch("launch2");
    let port = free_port().to_string();
    let mut args = vec!["launch", "--nproc_per_node", "2", "--master_port", &port]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(train_args(&out, 4, 2));
    run(clean(Command::new(BIN).args(&args)));
    let (k, r) = worst(&state(&out), &reference());
    eprintln!("worst relative difference to the 1x8 run: {k} {r:e}");
    assert!(r < TOL, "{k}: relative difference {r:e} to the 1x8 run");
    // Rank 0 alone wrote the log: one line per epoch.
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
}

#[test]
fn two_ranks_under_torchrun_compute_the_step_of_one_process_with_the_whole_batch() {
    let torchrun = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(
        torchrun.is_file(),
        "{} missing: run scripts/bootstrap.sh",
        torchrun.display()
    );
    let out = scratch("torchrun2");
    let port = free_port().to_string();
    let mut cmd = Command::new(&torchrun);
    cmd.args([
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        &port,
        "--no-python",
        BIN,
    ])
    .args(train_args(&out, 4, 2));
    run(clean(&mut cmd));
    let (k, r) = worst(&state(&out), &reference());
    eprintln!("worst relative difference to the 1x8 run: {k} {r:e}");
    assert!(r < TOL, "{k}: relative difference {r:e} to the 1x8 run");
}

#[test]
fn two_nodes_of_one_process_each_compute_the_same_step() {
    let out = scratch("nodes2");
    common::procs::run_two_nodes(BIN, &train_args(&out, 4, 2), &[]);
    let (k, r) = worst(&state(&out), &reference());
    eprintln!("worst relative difference to the 1x8 run: {k} {r:e}");
    assert!(r < TOL, "{k}: relative difference {r:e} to the 1x8 run");
}

#[test]
fn the_tolerance_rejects_a_run_that_sees_half_the_batch() {
    let out = scratch("half");
    run(clean(Command::new(BIN).args(train_args(&out, 4, 2))));
    let (k, r) = worst(&state(&out), &reference());
    eprintln!("1x4 vs 1x8: {k} {r:e}");
    assert!(
        r > 100.0 * TOL,
        "{k}: a 1x4 run is only {r:e} from the 1x8 run"
    );
}

#[test]
fn a_killed_rank_stops_the_run_and_a_rerun_resumes_from_the_last_checkpoint() {
    let out = scratch("kill");
    let port = free_port().to_string();
    let mut args: Vec<String> = ["launch", "--nproc_per_node", "2", "--master_port", &port]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(train_args(&out, 4, 400));
    let mut launcher = clean(Command::new(BIN).args(&args))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = out.join("checkpoint.safetensors");
    let t0 = Instant::now();
    while !ckpt.is_file() || ibot::train::checkpoint::read_meta(&ckpt).map_or(true, |m| m.epoch < 2)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL rank 1 in the middle of an epoch.
    common::procs::kill_rank_1(&mut launcher);
    // The last checkpoint is intact and a 2-process rerun resumes from it.
    let meta = ibot::train::checkpoint::read_meta(&ckpt).unwrap();
    read_safetensors(&ckpt).unwrap();
    let port = free_port().to_string();
    let mut args: Vec<String> = ["launch", "--nproc_per_node", "2", "--master_port", &port]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(train_args(&out, 4, 400));
    args.extend(["--stop_after".into(), "1".into()]);
    let o = run(clean(Command::new(BIN).args(&args)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("at epoch {}", meta.epoch)),
        "the rerun did not resume at epoch {}:\n{err}",
        meta.epoch
    );
    assert_eq!(
        ibot::train::checkpoint::read_meta(&ckpt).unwrap().epoch,
        meta.epoch + 1
    );
}

/// Runs `ibot train` as one rank with the given launcher variables and returns its stderr.
fn rank_error(vars: &[(&str, &str)], extra: &[&str]) -> String {
    let out = scratch("bad");
    let mut c = Command::new(BIN);
    c.args(train_args(&out, 4, 1)).args(extra);
    clean(&mut c);
    for (k, v) in vars {
        c.env(k, v);
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success(), "{vars:?} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_launch_environments_are_clear_errors() {
    let e = rank_error(
        &[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1"),
        ],
        &[],
    );
    assert!(e.contains("rank 2 is not below the world size 2"), "{e}");
    let e = rank_error(&[("RANK", "1"), ("WORLD_SIZE", "2")], &[]);
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
    let e = rank_error(&[("RANK", "0")], &[]);
    assert!(e.contains("WORLD_SIZE is not"), "{e}");
    let e = rank_error(&[("RANK", "x"), ("WORLD_SIZE", "2")], &[]);
    assert!(e.contains("RANK=\"x\" is not a valid number"), "{e}");
    // The master's port is taken: rank 0 cannot host the store.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let e = rank_error(
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
        &["--dist_timeout", "5"],
    );
    assert!(e.contains("address already in use"), "{e}");
    // Nobody hosts the store: rank 1 gives up after the timeout with a message.
    let port = free_port().to_string();
    let t0 = Instant::now();
    let e = rank_error(
        &[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
        &["--dist_timeout", "2"],
    );
    assert!(
        e.contains("could not join the process group as rank 1 of 2"),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    let e = rank_error(&[], &["--dist_url", "tcp://nohost"]);
    assert!(e.contains("has no port"), "{e}");
}

#[test]
fn ranks_started_with_different_options_are_refused() {
    let out = scratch("mismatch");
    let port = free_port().to_string();
    let spawn = |rank: &str, batch: usize| {
        let mut c = Command::new(BIN);
        c.args(train_args(&out, batch, 1));
        clean(&mut c)
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0", 4), spawn("1", 2));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(!a.status.success() && !b.status.success());
    let e = String::from_utf8_lossy(&a.stderr);
    assert!(
        e.contains("rank 1 was started with different training options"),
        "{e}"
    );
    assert!(
        e.contains("--batch_size_per_gpu: 4 on rank 0, 2 on rank 1"),
        "the error does not name the option: {e}"
    );
}

#[test]
fn launcher_environments_are_read_as_torch_reads_them() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    // No launcher, or a world of one: a plain single process.
    assert_eq!(DistEnv::detect_with("env://", &env(&[])).unwrap(), None);
    assert_eq!(
        DistEnv::detect_with("env://", &env(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(),
        None
    );
    // torchrun with its agent store.
    let e = DistEnv::detect_with(
        "env://",
        &env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_RUN_ID", "x"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            e.rank,
            e.world_size,
            e.local_rank,
            e.local_world_size,
            e.master_port,
            e.agent_store,
            e.restart,
            e.launcher
        ),
        (3, 4, 1, 2, 29400, true, 2, "torchrun")
    );
    assert_eq!(e.master_addr, "10.1.2.3");
    // SLURM: master from the node list, port 29500 by default; --dist_url wins.
    let slurm: &'static [(&str, &str)] = &[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "4(x2)"),
        ("SLURM_JOB_NODELIST", "gpu[07-08,11],login1"),
    ];
    let e = DistEnv::detect_with("env://", &env(slurm))
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            e.rank,
            e.world_size,
            e.local_rank,
            e.local_world_size,
            e.master_addr.as_str(),
            e.master_port,
            e.launcher
        ),
        (5, 8, 1, 4, "gpu07", 29500, "SLURM")
    );
    let e = DistEnv::detect_with("tcp://head:1234", &env(slurm))
        .unwrap()
        .unwrap();
    assert_eq!((e.master_addr.as_str(), e.master_port), ("head", 1234));
    assert_eq!(first_slurm_host("n1,n2").as_deref(), Some("n1"));
    assert_eq!(
        first_slurm_host("a[001-004]-ib").as_deref(),
        Some("a001-ib")
    );
    assert_eq!(first_slurm_host("solo").as_deref(), Some("solo"));
    assert!(parse_dist_url("file:///tmp/x").is_err());
    assert!(parse_dist_url("tcp://h:99999").is_err());
    assert_eq!(parse_dist_url("env://").unwrap(), None);
    // Bad values are errors, never a silent single-process run.
    assert!(DistEnv::detect_with(
        "env://",
        &env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1")
        ])
    )
    .is_err());
    assert!(DistEnv::detect_with("env://", &env(&[("SLURM_PROCID", "0")])).is_err());
    assert!(DistEnv::detect_with(
        "env://",
        &env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000")
        ])
    )
    .is_err());
}
