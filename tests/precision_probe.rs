//! `--use_fp16` with `--precision auto` on a CPU with AVX512-BF16 and no AMX: the probe's
//! decision rule, its per-machine cache (used without probing; a corrupt or implausible cache
//! re-probed; an unwritable one only noted), that the probe draws no random numbers, that a
//! resumed run keeps the stored precision, and that every rank of a data-parallel run takes
//! rank 0's choice. No test here runs the probe through the user's cache: the spawned runs set
//! `IBOT_PRECISION_PROBE` (which answers for the probe on any CPU) and `IBOT_CACHE_DIR`.

mod common;

use std::cell::Cell;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use ibot::train::amp::{decide_for_run, Precision, PrecisionChoice};
use ibot::train::precision_probe::{probe_cached, Source, Timings, THRESHOLD};
use tch::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

fn t(float32_ms: f64, bfloat16_ms: f64) -> Timings {
    Timings {
        float32_ms,
        bfloat16_ms,
    }
}

#[test]
fn bfloat16_is_chosen_only_at_or_below_the_threshold() {
    // Mutations tried by hand: `<` instead of `<=` fails the 8 ms case; a threshold of 1.0
    // fails the 9 ms case; dropping the validity check fails the NaN and zero cases (NaN
    // compares false, but a zero bfloat16 time gives ratio 0 <= 0.8).
    assert_eq!(THRESHOLD, 0.8);
    assert_eq!(t(10.0, 8.0).choice(), Precision::Bf16);
    assert_eq!(t(10.0, 4.0).choice(), Precision::Bf16);
    assert_eq!(t(10.0, 8.1).choice(), Precision::Fp32);
    assert_eq!(t(10.0, 9.0).choice(), Precision::Fp32);
    assert_eq!(t(10.0, 15.0).choice(), Precision::Fp32);
    assert_eq!(t(10.0, 0.0).choice(), Precision::Fp32);
    assert_eq!(t(f64::NAN, 1.0).choice(), Precision::Fp32);
    assert_eq!(t(0.0, 1.0).choice(), Precision::Fp32);
}

#[test]
fn the_cache_answers_without_probing_and_a_bad_cache_is_probed_again() {
    // Mutations tried by hand: always measuring (cache never read) fails the `probes == 1`
    // checks; returning an error for a corrupt file fails the `unwrap` after the garbage;
    // accepting an entry whose stored choice disagrees with its timings fails the
    // "implausible" case; an error on an unwritable directory fails its `unwrap`.
    let dir = common::scratch_dir("precision-probe", "cache");
    let file = dir.join("sub").join("precision-probe.json");
    let probes = Cell::new(0);
    let answer = Cell::new(t(10.0, 5.0));
    let mut measure = || -> Result<Timings> {
        probes.set(probes.get() + 1);
        Ok(answer.get())
    };
    // First time: measured, cached (the directory is created).
    let p = probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!(probes.get(), 1);
    assert_eq!(p.precision(), Precision::Bf16);
    assert_eq!(
        p.source,
        Source::Measured {
            saved: Ok(file.clone())
        }
    );
    assert!(p.reason().contains("measured now"), "{}", p.reason());
    // Second time: from the cache, even though the probe would now answer otherwise.
    answer.set(t(10.0, 12.0));
    let p = probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!(probes.get(), 1, "the cache was not used");
    assert_eq!((p.precision(), p.timings), (Precision::Bf16, t(10.0, 5.0)));
    assert_eq!(p.source, Source::Cache(file.clone()));
    assert!(
        p.reason().contains(&file.display().to_string()),
        "{}",
        p.reason()
    );
    // Another key (CPU, threads, libtorch...) is probed and added next to the first.
    let p = probe_cached(Some(&file), "machine B", false, &mut measure).unwrap();
    assert_eq!((probes.get(), p.precision()), (2, Precision::Fp32));
    let p = probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!((probes.get(), p.precision()), (2, Precision::Bf16));
    // `fresh` measures again and replaces the entry.
    let p = probe_cached(Some(&file), "machine A", true, &mut measure).unwrap();
    assert_eq!((probes.get(), p.precision()), (3, Precision::Fp32));
    // A corrupt file is ignored (with a note), re-probed and rewritten.
    std::fs::write(&file, "{\"entries\": {\"machine A\": tru").unwrap();
    answer.set(t(10.0, 6.0));
    let p = probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!((probes.get(), p.precision()), (4, Precision::Bf16));
    assert!(
        p.cache_note.as_deref().unwrap_or("").contains("ignored"),
        "{p:?}"
    );
    let p = probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!(probes.get(), 4, "the rewritten cache was not used");
    assert_eq!(p.source, Source::Cache(file.clone()));
    // An entry whose choice disagrees with its timings (hand-edited) is re-probed.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("\"bf16\"", "\"fp32\"")).unwrap();
    probe_cached(Some(&file), "machine A", false, &mut measure).unwrap();
    assert_eq!(probes.get(), 5, "an implausible entry was used");
    // An unwritable place (the cache "directory" is a file): answered, with the reason.
    let blocked = dir.join("a-file");
    std::fs::write(&blocked, "x").unwrap();
    let p = probe_cached(
        Some(&blocked.join("precision-probe.json")),
        "machine A",
        false,
        &mut measure,
    )
    .unwrap();
    assert_eq!((probes.get(), p.precision()), (6, Precision::Bf16));
    assert!(
        matches!(p.source, Source::Measured { saved: Err(_) }),
        "{p:?}"
    );
    assert!(p.reason().contains("not cached"), "{}", p.reason());
    // No cache directory at all: answered too.
    let p = probe_cached(None, "machine A", false, &mut measure).unwrap();
    assert!(
        matches!(p.source, Source::Measured { saved: Err(_) }),
        "{p:?}"
    );
}

#[test]
fn the_probe_measures_both_precisions_without_touching_the_random_stream() {
    // A small probe (64 tokens, one repetition): both timings valid. Drawing from libtorch's
    // generator inside the probe (mutation tried by hand: `Tensor::rand` for the pattern)
    // changes the next draw after seeding, which would make a seeded run depend on whether the
    // probe ran or its answer came from the cache.
    let (timings, after) = ibot::train::seeded_init(11, || {
        let t = ibot::train::precision_probe::measure(64, 1).unwrap();
        (t, Tensor::randn([8], (tch::Kind::Float, Device::Cpu)))
    });
    assert!(timings.valid(), "{timings:?}");
    let plain =
        ibot::train::seeded_init(11, || Tensor::randn([8], (tch::Kind::Float, Device::Cpu)));
    assert!(after.equal(&plain), "the probe drew random numbers");
}

/// A rank > 0 of a two-rank world whose rank 0 holds `rank0`: `all_gather` returns rank 0's
/// tensor then this rank's (lengths first, then values, as `all_gather_i64` asks).
struct SecondRank {
    rank0: i64,
    calls: Cell<usize>,
}

impl ibot::dist::Comm for SecondRank {
    fn rank(&self) -> usize {
        1
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        unreachable!()
    }
    fn all_reduce_max(&self, _t: &mut Tensor) -> Result<()> {
        unreachable!()
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<()> {
        unreachable!()
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        let first = if call == 0 {
            t.copy()
        } else {
            Tensor::from_slice(&[self.rank0])
        };
        Ok(Tensor::cat(&[first, t.copy()], 0))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn every_rank_takes_rank_zeros_precision() {
    // Mutation tried by hand: deciding on every rank (no all-gather, or keeping this rank's own
    // value) gives rank 1 float32 in the first case. Rank 1 never probes: its own placeholder
    // is float32, so bfloat16 can only have come from rank 0.
    for (rank0, want) in [
        (Precision::Bf16, Precision::Bf16),
        (Precision::Fp32, Precision::Fp32),
    ] {
        let comm = SecondRank {
            rank0: rank0.code(),
            calls: Cell::new(0),
        };
        let (p, reason) =
            decide_for_run(true, PrecisionChoice::Auto, Device::Cpu, None, &comm).unwrap();
        assert_eq!(p, want);
        assert_eq!(reason, "rank 0's choice");
        assert_eq!(comm.calls.get(), 2);
    }
    // An explicit --precision is the same everywhere (the options are checked equal) and is
    // still taken from rank 0.
    let comm = SecondRank {
        rank0: Precision::Bf16.code(),
        calls: Cell::new(0),
    };
    let (p, _) = decide_for_run(true, PrecisionChoice::Bfloat16, Device::Cpu, None, &comm).unwrap();
    assert_eq!(p, Precision::Bf16);
}

fn train(data: &Path, out: &Path, probe: &str, extra: &[&str]) -> Output {
    let mut a: Vec<String> = vec!["--threads".into(), "1".into(), "train".into()];
    a.extend(common::TINY_VIT.iter().map(|s| s.to_string()));
    a.extend(
        [
            "--num_workers",
            "0",
            "--warmup_epochs",
            "0",
            "--warmup_teacher_temp_epochs",
            "0",
            "--data_path",
        ]
        .map(String::from),
    );
    a.push(data.display().to_string());
    a.push("--output_dir".into());
    a.push(out.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(BIN)
        .args(&a)
        .env("IBOT_PRECISION_PROBE", probe)
        .env("IBOT_CACHE_DIR", out.join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn precision_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .find(|l| l.starts_with("precision: "))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_resumed_auto_run_keeps_the_precision_stored_in_its_checkpoint() {
    // Mutation tried by hand: `stored_precision` returning None (deciding again on resume)
    // makes the second run say float32 (the probe override now answers fp32) and store it.
    let dir = common::scratch_dir("precision-probe", "resume");
    let (data, out) = (dir.join("data"), dir.join("out"));
    std::fs::create_dir_all(&data).unwrap();
    common::write_idx(&data, "train", 8, 16);
    let ckpt = out.join("checkpoint.safetensors");
    let stored = || ibot::train::checkpoint::read_meta(&ckpt).unwrap().precision;

    // The first run (default --use_fp16, --precision auto): the probe's answer, bfloat16.
    let o = train(&data, &out, "bf16", &["--epochs", "3", "--stop_after", "1"]);
    let line = precision_line(&o);
    assert!(
        line.starts_with("precision: bfloat16 autocast (--use_fp16, and IBOT_PRECISION_PROBE=bf16"),
        "{line}"
    );
    assert_eq!(stored(), Some(Precision::Bf16));

    // Resumed where the probe now says float32: the stored bfloat16 is kept, and said.
    let o = train(&data, &out, "fp32", &["--epochs", "3", "--stop_after", "1"]);
    let line = precision_line(&o);
    assert!(
        line.starts_with(
            "precision: bfloat16 autocast (--precision auto resumes with the precision stored in"
        ),
        "{line}"
    );
    assert_eq!(stored(), Some(Precision::Bf16));
    assert_eq!(ibot::train::checkpoint::read_meta(&ckpt).unwrap().epoch, 2);

    // An explicit --precision still wins on resume.
    let o = train(
        &data,
        &out,
        "fp32",
        &["--epochs", "3", "--precision", "float32"],
    );
    assert_eq!(precision_line(&o), "precision: float32 (--precision)");
    assert_eq!(stored(), Some(Precision::Fp32));

    // A fresh run with the same override decides float32: the second run's bfloat16 came
    // from the checkpoint, not from the override.
    let o = train(&data, &dir.join("fresh"), "fp32", &["--epochs", "1"]);
    assert!(precision_line(&o)
        .starts_with("precision: float32 (--use_fp16, and IBOT_PRECISION_PROBE=fp32"));
}

#[test]
fn a_resumed_auto_finetune_keeps_the_precision_stored_in_its_checkpoint() {
    // As the training test, for `ibot finetune --use_fp16` (its default is float32). Mutation
    // tried by hand: not passing the stored precision (`stored` = None) makes the second run
    // say float32.
    let dir = common::scratch_dir("precision-probe", "finetune");
    let (data, w, out) = (
        dir.join("data"),
        dir.join("backbone.safetensors"),
        dir.join("out"),
    );
    std::fs::create_dir_all(&data).unwrap();
    common::write_idx(&data, "train", 8, 16);
    common::write_idx(&data, "t10k", 4, 16);
    common::save_vit_backbone(&w, &common::vit_config(24, 1, 2, 4, 16), 3, vec![]);
    let run = |probe: &str, epochs: &str| {
        let (d, w, o) = (
            data.display().to_string(),
            w.display().to_string(),
            out.display().to_string(),
        );
        let a = [
            "--threads",
            "1",
            "finetune",
            "--pretrained_weights",
            &w,
            "--data_path",
            &d,
            "--output_dir",
            &o,
            "--input_size",
            "16",
            "--batch_size",
            "4",
            "--epochs",
            epochs,
            "--warmup_epochs",
            "0",
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--use_fp16",
        ];
        let o = Command::new(BIN)
            .args(a)
            .env("IBOT_PRECISION_PROBE", probe)
            .env("IBOT_CACHE_DIR", dir.join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        precision_line(&o)
    };
    let first = run("bf16", "1");
    assert!(
        first
            .starts_with("precision: bfloat16 autocast (--use_fp16, and IBOT_PRECISION_PROBE=bf16"),
        "{first}"
    );
    let second = run("fp32", "2");
    assert!(
        second.starts_with(
            "precision: bfloat16 autocast (--precision auto resumes with the precision stored in"
        ),
        "{second}"
    );
}
