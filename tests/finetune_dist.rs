//! Data-parallel `ibot finetune`: 2 ranks × batch 4 under `ibot launch` end where 1 process ×
//! batch 8 ends (weights, AdamW state, and the synchronized log.txt meters), as the official
//! scripts under torch.distributed (DistributedSampler + DDP's gradient average + MetricLogger's
//! synchronize_between_processes).
//!
//! Mixup/CutMix are off here: the official Mixup pairs image i with image B-1-i of the *local*
//! batch and draws lambda per rank, so 2 × 4 cannot reproduce the pairs of 1 × 8 (the official
//! code cannot either); drop path is off for the same reason (per-rank masks). RandAugment,
//! random erasing and the crops are drawn per image and stay on.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ibot::models::{VisionTransformer, VitConfig};
use ibot::params::{read_safetensors, ParamStore};
use tch::{Device, Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A 2-block ViT (dim 24, patch 4, 16 px) saved with its configuration.
fn tiny_backbone(path: &Path) {
    tch::manual_seed(3);
    let cfg = VitConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 24,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 2.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    };
    let mut ps = ParamStore::new();
    let _m = VisionTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
    let named: Vec<(String, Tensor)> = ps
        .state_dict()
        .map(|(k, t)| (k.to_string(), t.shallow_clone()))
        .collect();
    let mut md = HashMap::new();
    md.insert(
        ibot::interop::VIT_CONFIG_KEY.to_string(),
        serde_json::to_string(&cfg).unwrap(),
    );
    ibot::params::write_safetensors(path, &named, Some(md)).unwrap();
}

fn setup() -> (PathBuf, PathBuf, PathBuf) {
    let root = common::scratch_dir("finetune_dist", "run");
    let (data, w) = (root.join("data"), root.join("backbone.safetensors"));
    std::fs::create_dir_all(&data).unwrap();
    common::write_idx(&data, "train", 32, 16);
    common::write_idx(&data, "t10k", 24, 16);
    tiny_backbone(&w);
    (root, data, w)
}

/// imagenet_layer_decay with mixup, cutmix and drop path off, float32, no clipping (clipping
/// would hide a gradient of the wrong scale), 2 epochs of 4 steps.
fn args(data: &Path, w: &Path, out: &Path, batch: usize, epochs: usize) -> Vec<String> {
    let s = format!(
        "finetune --input_size 16 --batch_size {batch} --epochs {epochs} --warmup_epochs 1 --lr 5e-3 \
         --mixup 0 --cutmix 0 --drop_path 0 --layer_decay 0.75 --device cpu --num_workers 1 \
         --precision float32 --dist_timeout 60"
    );
    let mut v: Vec<String> = s.split_whitespace().map(String::from).collect();
    for (k, p) in [
        ("--data_path", data),
        ("--pretrained_weights", w),
        ("--output_dir", out),
    ] {
        v.push(k.into());
        v.push(p.display().to_string());
    }
    v
}

/// `ibot launch --nproc_per_node 2 --master_port <free> <args>`.
fn launch(args: Vec<String>) -> Vec<String> {
    let port = free_port().to_string();
    let mut a: Vec<String> = ["launch", "--nproc_per_node", "2", "--master_port", &port]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(args);
    a
}

fn run(cmd: &mut Command) -> Output {
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
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Largest |a − b| / (1e-4 + max|b|) over the tensors (each judged against its own scale).
fn worst(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (String, f64) {
    assert_eq!(a.len(), b.len());
    let mut worst = (String::new(), 0.0);
    for (k, tb) in b {
        let ta = &a[k];
        let d = (ta.to_kind(Kind::Double) - tb.to_kind(Kind::Double)).abs();
        if k.contains("attn.qkv.bias") && d.size() == [72] {
            // The key bias (entries dim..2 dim) has an analytically zero gradient (softmax is
            // shift-invariant); its float32 rounding noise is what AdamW normalises into
            // lr-sized steps, so those entries carry no signal (measured 9e-5 apart here).
            let _ = d.narrow(0, 24, 24).fill_(0.0);
        }
        let d = d.max().double_value(&[]);
        let scale = tb.abs().max().to_kind(Kind::Double).double_value(&[]);
        let r = d / (1e-4 + scale);
        if r > worst.1 {
            worst = (k.clone(), r);
        }
    }
    worst
}

/// log.txt's numbers, line by line, as (key, value).
fn log(dir: &Path) -> Vec<Vec<(String, f64)>> {
    std::fs::read_to_string(dir.join("log.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(l).unwrap();
            v.into_iter()
                .map(|(k, x)| (k, x.as_f64().unwrap()))
                .collect()
        })
        .collect()
}

/// Tolerance on the weights, EMA-free model and AdamW moments after 8 steps: float32 summation
/// order (two batch-4 means averaged vs one batch-8 mean, other thread counts); measured
/// 5.9e-6 (model.blocks.1.mlp.fc2.weight). Hand mutations of src/finetune/run.rs, each run
/// once on 2026-11-28 and reverted:
/// - no `average_gradients` (each rank steps on its own half batch): 18 relative
///   (optimizer.head.bias.exp_avg), FAILS;
/// - the sum instead of the mean (gradients x world size after averaging): AdamW's step is
///   nearly scale-blind, but its moments are not: 2.7 relative (head.weight.exp_avg_sq), FAILS;
/// - meters not synchronized (rank 0 logs its own half): train_class_acc 0.1875 vs 0.21875,
///   FAILS the log check.
///
/// The 2-rank resume check compares bit for bit; it was not mutation-tested beyond this: a
/// relaunch that ignored the checkpoint would train 2 more epochs and differ.
const TOL: f64 = 2e-5;

#[test]
fn two_ranks_of_batch_4_fine_tune_as_one_process_of_batch_8() {
    let (root, data, w) = setup();
    let (one, two) = (root.join("1x8"), root.join("2x4"));
    run(Command::new(BIN).args(args(&data, &w, &one, 8, 2)));
    let o = run(Command::new(BIN).args(launch(args(&data, &w, &two, 4, 2))));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.matches("epoch(s) fine-tuned").count(),
        1,
        "only rank 0 reports:\n{stdout}"
    );

    let ck = |d: &Path| read_safetensors(&d.join("checkpoint.safetensors")).unwrap();
    let (k, r) = worst(&ck(&two), &ck(&one));
    eprintln!("worst relative difference of the checkpoint tensors: {k} {r:e}");
    assert!(
        r < TOL,
        "{k}: relative difference {r:e} (tolerance {TOL:e})"
    );

    // MetricLogger synchronized over the ranks: the same epoch averages as one process (loss
    // and class accuracy averaged over both half batches, the averaged gradient's norm).
    let (l1, l2) = (log(&one), log(&two));
    assert_eq!(l1.len(), 2);
    assert_eq!(
        l2.len(),
        2,
        "rank 0 alone writes log.txt, one line per epoch"
    );
    for (e1, e2) in l1.iter().zip(&l2) {
        let keys1: Vec<&String> = e1.iter().map(|(k, _)| k).collect();
        let keys2: Vec<&String> = e2.iter().map(|(k, _)| k).collect();
        assert_eq!(keys1, keys2);
        for ((k, a), (_, b)) in e1.iter().zip(e2) {
            if k.starts_with("test_acc") {
                // Same weights to 1e-5 on the same 24 images: an argmax may flip on a near-tie.
                assert!((a - b).abs() <= 100.0 / 24.0 + 1e-9, "{k}: {a} vs {b}");
            } else {
                let rel = (a - b).abs() / (1e-6 + a.abs());
                assert!(rel < 1e-4, "{k}: {a} (1x8) vs {b} (2x4), relative {rel:e}");
            }
        }
    }
    assert!(l1[0].iter().any(|(k, _)| k == "train_grad_norm"));
    assert!(two.join("finetune.png").is_file() && two.join("args.json").is_file());

    // Resume on 2 ranks: stopped after epoch 1 and relaunched, both ranks read the checkpoint
    // and the run ends bit for bit where the uninterrupted 2-rank run ends.
    let resumed = root.join("2x4-resumed");
    run(Command::new(BIN).args(launch(args(&data, &w, &resumed, 4, 1))));
    run(Command::new(BIN).args(launch(args(&data, &w, &resumed, 4, 2))));
    let (a, b) = (ck(&resumed), ck(&two));
    assert_eq!(a.len(), b.len());
    for (k, t) in &b {
        assert!(t.equal(&a[k]), "{k} differs after resuming on 2 ranks");
    }
    assert_eq!(log(&resumed), l2, "log.txt of the resumed 2-rank run");
}
