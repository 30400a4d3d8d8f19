//! Bad inputs found by testing (issue 12): each is a clear error (exit code 2 from the binary,
//! never a panic or an abort) or the documented behaviour.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ibot-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Options of a tiny model (16-pixel images, 4-pixel patches) for `ibot train`.
/// The tiny ViT of tests/common, quick to train: no warm-ups, loading on the calling thread,
/// float32.
fn tiny() -> Vec<&'static str> {
    let mut v = common::TINY_VIT.to_vec();
    v.extend([
        "--warmup_epochs",
        "0",
        "--warmup_teacher_temp_epochs",
        "0",
        "--num_workers",
        "0",
        "--use_fp16",
        "false",
    ]);
    v
}

fn ibot(args: &[&str]) -> Output {
    Command::new(BIN)
        // No bfloat16 probe (nor a write to the user's cache) in runs with --use_fp16.
        .env("IBOT_PRECISION_PROBE", "off")
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that `o` failed cleanly (exit code 2, "error:" on stderr) with `needle` in the message.
fn assert_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected a clean error, got {:?}: {e}",
        o.status
    );
    assert!(
        e.contains("error:") && e.contains(needle),
        "expected '{needle}' in: {e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

/// A data folder (12 train + 12 t10k IDX images of 16x16) and a one-epoch checkpoint of the
/// tiny model trained on it, made once for all tests.
fn trained() -> &'static (PathBuf, PathBuf) {
    static T: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        let data = tempdir("data");
        common::write_idx(&data, "train", 12, 16);
        common::write_idx(&data, "t10k", 12, 16);
        let out = tempdir("run");
        let (d, o) = (data.display().to_string(), out.display().to_string());
        let mut args = vec![
            "train",
            "--data_path",
            &d,
            "--output_dir",
            &o,
            "--epochs",
            "1",
        ];
        args.extend_from_slice(&tiny());
        let r = ibot(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        (data, out.join("checkpoint.safetensors"))
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn eval_crop_size_zero_and_no_images_are_errors() {
    let (data, ckpt) = trained();
    let (d, w) = (s(data), s(ckpt));
    let out = tempdir("feat");
    let feats = s(&out.join("f.safetensors"));
    let base = [
        "--pretrained_weights",
        &w,
        "--data_path",
        &d,
        "--device",
        "cpu",
    ];
    let with = |cmd: &str, extra: &[&str]| {
        let mut a = vec![cmd];
        a.extend_from_slice(&base);
        a.extend_from_slice(extra);
        if cmd == "extract-features" {
            a.extend(["--output", &feats]);
        }
        ibot(&a)
    };
    for cmd in ["eval-knn", "extract-features", "eval-unsup"] {
        assert_error(
            &with(cmd, &["--crop_size", "0"]),
            "--crop_size must be between 1",
        );
        assert_error(
            &with(cmd, &["--crop_size", "2"]),
            "smaller than one 4-pixel patch",
        );
    }
    assert_error(
        &with("eval-knn", &["--subset", "0"]),
        "no images to extract features from",
    );
    assert_error(&with("extract-features", &["--subset", "0"]), "no images");
    // eval-unsup printed "NMI: 1, ARI: 1" for zero images.
    let r = with("eval-unsup", &["--subset", "0"]);
    assert_error(&r, "no images to evaluate");
    assert!(!String::from_utf8_lossy(&r.stdout).contains("NMI"));
    // The same commands work on valid input.
    let r = with("extract-features", &["--subset", "5"]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn nb_knn_must_be_at_least_one_and_is_lowered_to_the_memory_size() {
    let (data, ckpt) = trained();
    let (d, w) = (s(data), s(ckpt));
    let base = [
        "eval-knn",
        "--pretrained_weights",
        &w,
        "--data_path",
        &d,
        "--device",
        "cpu",
    ];
    let mut a = base.to_vec();
    a.extend(["--nb_knn", "5", "0"]);
    assert_error(&ibot(&a), "every k must be at least 1");
    let mut a = base.to_vec();
    a.push("--nb_knn=-3");
    assert_error(&ibot(&a), "at least 1");
    // 12 memory images: k = 1000 runs as k = 12, and says so.
    let mut a = base.to_vec();
    a.extend(["--nb_knn", "1000", "12"]);
    let r = ibot(&a);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("k = 1000 is more than the 12 training images; using k = 12"));
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("NN classifier"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    // Lowered to the memory size, k = 1000 gives exactly the k = 12 result.
    assert_eq!(
        lines[0].split_once(':').unwrap().1,
        lines[1].split_once(':').unwrap().1
    );
    let help = String::from_utf8_lossy(&ibot(&["eval-knn", "--help"]).stdout).into_owned();
    assert!(help.contains("at least 1"), "{help}");
}

#[test]
fn visualize_attention_bounds_the_image_size_before_allocating() {
    let (_, ckpt) = trained();
    let w = s(ckpt);
    let dir = tempdir("attn");
    let img = dir.join("img.png");
    image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 100])
    })
    .save(&img)
    .unwrap();
    let (i, o) = (s(&img), s(&dir.join("out")));
    let run = |size: &[&str]| {
        let mut a = vec![
            "visualize-attention",
            "--pretrained_weights",
            &w,
            "--image_path",
            &i,
        ];
        a.extend(["--output_dir", &o, "--device", "cpu", "--image_size"]);
        a.extend_from_slice(size);
        ibot(&a)
    };
    // Was a libtorch out-of-memory abort (exit code 134).
    assert_error(&run(&["100000", "100000"]), "at most 4096 pixels per side");
    // One number keeps the aspect ratio: the long side is checked too.
    assert_error(&run(&["4000"]), "at most 4096 pixels per side");
    // Within the side limit, but 1024x1024 patches of 4 pixels.
    assert_error(&run(&["4096", "4096"]), "patches");
    let r = run(&["64", "48"]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn extract_backbone_never_overwrites_its_input_and_needs_force_to_replace() {
    let (_, ckpt) = trained();
    let dir = tempdir("extract");
    let input = dir.join("checkpoint.safetensors");
    std::fs::copy(ckpt, &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let i = s(&input);
    assert_error(&ibot(&["extract-backbone", &i, &i]), "is the input file");
    assert_error(
        &ibot(&["extract-backbone", &i, &i, "--force"]),
        "is the input file",
    );
    // The same file under another name (a symbolic link, a path with ..).
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    assert_error(
        &ibot(&["extract-backbone", &i, &s(&link), "--force"]),
        "is the input file",
    );
    let dotted = format!(
        "{}/../{}/checkpoint.safetensors",
        i.rsplit_once('/').unwrap().0,
        dir.file_name().unwrap().to_string_lossy()
    );
    assert_error(
        &ibot(&["extract-backbone", &i, &dotted, "--force"]),
        "is the input file",
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);

    let out = dir.join("backbone.safetensors");
    let o = s(&out);
    let r = ibot(&["extract-backbone", &i, &o]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_error(
        &ibot(&["extract-backbone", &i, &o]),
        "already exists; pass --force",
    );
    let r = ibot(&["extract-backbone", &i, &o, "--force", "--timm"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!ibot::params::read_safetensors(&out)
        .unwrap()
        .contains_key("masked_embed"));
}

/// Offset of the first byte of tensor `name`'s data in a safetensors file.
fn data_offset(bytes: &[u8], name: &str) -> usize {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize
}

#[test]
fn flipped_bytes_in_tensor_data_are_refused_by_every_reader() {
    let (data, ckpt) = trained();
    let dir = tempdir("flip");
    let bad = dir.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(ckpt).unwrap();
    // The checksums sit next to, not in place of, the checkpoint's own metadata.
    let md = ibot::params::read_safetensors_metadata(ckpt).unwrap();
    assert!(md.contains_key("ibot") && !md.contains_key(ibot::params::CHECKSUM_KEY));
    assert_ne!(ibot::params::CHECKSUM_KEY, "ibot");
    ibot::train::checkpoint::read_meta(ckpt).unwrap();
    let name = "teacher.backbone.blocks.0.attn.qkv.weight";
    let at = data_offset(&bytes, name) + 17;
    bytes[at] ^= 0x10;
    std::fs::write(&bad, &bytes).unwrap();

    let e = format!("{:#}", ibot::params::read_safetensors(&bad).unwrap_err());
    assert!(e.contains(name) && e.contains("damaged"), "{e}");
    let b = s(&bad);
    // extract-backbone, eval-knn and resuming all refuse it, naming the tensor.
    let r = ibot(&["extract-backbone", &b, &s(&dir.join("bb.safetensors"))]);
    assert_error(&r, name);
    assert!(!dir.join("bb.safetensors").exists());
    let d = s(data);
    assert_error(
        &ibot(&[
            "eval-knn",
            "--pretrained_weights",
            &b,
            "--data_path",
            &d,
            "--device",
            "cpu",
        ]),
        name,
    );
    let o = s(&dir);
    let mut a = vec![
        "train",
        "--data_path",
        &d,
        "--output_dir",
        &o,
        "--epochs",
        "2",
    ];
    a.extend_from_slice(&tiny());
    let r = ibot(&a);
    assert_error(&r, name);
    assert!(stderr(&r).contains("resuming"), "{}", stderr(&r));
    // A flip in the header's checksum table is caught as well.
    let mut bytes = std::fs::read(ckpt).unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let key = format!("\\\"{name}\\\":\\\"");
    let pos = text
        .find(&key)
        .expect("checksum of the tensor in the header")
        + key.len();
    bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
    std::fs::write(&bad, &bytes).unwrap();
    let e = format!("{:#}", ibot::params::read_safetensors(&bad).unwrap_err());
    assert!(e.contains(name), "{e}");
}

#[test]
fn files_without_checksums_still_load() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempdir("legacy");
    let path = dir.join("old.safetensors");
    let raw: Vec<u8> = [1.5f32, -2.0, 3.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::F32, vec![3], &raw).unwrap();
    let bytes = safetensors::serialize([("t", view)], None).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let t = ibot::params::read_safetensors(&path).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t["t"]).unwrap(), [1.5, -2.0, 3.25]);
    // Ours carry them and round-trip.
    let ours = dir.join("new.safetensors");
    ibot::params::write_safetensors(&ours, &[("t".into(), t["t"].shallow_clone())], None).unwrap();
    let md_raw = {
        let b = std::fs::read(&ours).unwrap();
        String::from_utf8_lossy(&b).into_owned()
    };
    assert!(md_raw.contains(ibot::params::CHECKSUM_KEY));
    ibot::params::read_safetensors(&ours).unwrap();
    // The key is reserved.
    let md = [(ibot::params::CHECKSUM_KEY.to_string(), "{}".to_string())].into();
    assert!(ibot::params::write_safetensors(
        &ours,
        &[("t".into(), t["t"].shallow_clone())],
        Some(md)
    )
    .is_err());
}

#[test]
fn skip_corrupt_with_every_image_unreadable_is_an_error() {
    let data = tempdir("corrupt");
    for c in ["a", "b"] {
        std::fs::create_dir_all(data.join(c)).unwrap();
        for i in 0..4 {
            std::fs::write(
                data.join(c).join(format!("{i}.png")),
                b"not an image at all",
            )
            .unwrap();
        }
    }
    let out = tempdir("corrupt-out");
    let (d, o) = (s(&data), s(&out));
    let mut a = vec![
        "train",
        "--data_path",
        &d,
        "--output_dir",
        &o,
        "--epochs",
        "2",
    ];
    a.extend_from_slice(&tiny());
    a.extend(["--skip_corrupt", "true"]);
    let r = ibot(&a);
    assert_error(&r, "every image of epoch 0 was unreadable");
    let e = stderr(&r);
    // The first skipped file is named in the error, the first few on their own lines.
    assert!(
        e.contains("; the first: cannot decode image ") && e.contains(&d),
        "{e}"
    );
    assert!(e.matches("skipped an unreadable image").count() >= 4, "{e}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

#[test]
fn a_second_run_on_the_same_output_dir_is_refused_and_the_lock_dies_with_its_process() {
    let (data, _) = trained();
    let out = tempdir("locked");
    let (d, o) = (s(data), s(&out));
    // Another process holds the directory: a long run, killed with SIGKILL below.
    let mut a = vec![
        "train",
        "--data_path",
        &d,
        "--output_dir",
        &o,
        "--epochs",
        "100000",
    ];
    a.extend_from_slice(&tiny());
    /// Kills the run (SIGKILL) however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(BIN)
            .args(["--threads", "1"])
            .args(&a)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let lock = out.join(".ibot.lock");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default() != pid {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the first run never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = ibot(&a);
    assert_error(&r, &format!("another ibot run (pid {pid}) is using {o}"));
    // In-process too: the lock is exclusive.
    assert!(ibot::util::lock_dir(&out).is_err());
    // kill -9 leaves no stale lock.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let held = ibot::util::lock_dir(&out).unwrap();
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        std::process::id().to_string()
    );
    let e = format!("{:#}", ibot::util::lock_dir(&out).unwrap_err());
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    drop(held);
    ibot::util::lock_dir(&out).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Issue 12, second half.

/// `ibot train` on the shared tiny data set into a fresh output directory, with `extra` options.
fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    let (data, _) = trained();
    let (d, o) = (s(data), s(out));
    let mut a = vec!["train", "--data_path", &d, "--output_dir", &o];
    a.extend_from_slice(&tiny());
    a.extend_from_slice(extra);
    ibot(&a)
}

#[test]
fn evaluation_needs_a_real_split_or_explicit_paths() {
    let (data, ckpt) = trained();
    let w = s(ckpt);
    // IDX files of the training split only: memory and queries would be the same images.
    let only_train = tempdir("only-train");
    common::write_idx(&only_train, "train", 12, 16);
    // An image folder whose only sub-folder is train/.
    let only_dir = tempdir("only-dir");
    std::fs::create_dir_all(only_dir.join("train/a")).unwrap();
    image::RgbImage::from_pixel(16, 16, image::Rgb([10, 20, 30]))
        .save(only_dir.join("train/a/0.png"))
        .unwrap();
    let run = |cmd: &str, extra: &[&str]| {
        let mut a = vec![cmd, "--pretrained_weights", &w, "--device", "cpu"];
        a.extend_from_slice(extra);
        if cmd == "eval-linear" {
            a.extend(["--epochs", "1", "--crop_size", "16", "--n_last_blocks", "1"]);
        }
        ibot(&a)
    };
    let (ot, od) = (s(&only_train), s(&only_dir));
    for cmd in ["eval-knn", "eval-linear"] {
        let r = run(cmd, &["--data_path", &ot]);
        assert_error(&r, "IDX files train-* but no t10k-*");
        assert!(
            stderr(&r).contains("--train_path and --val_path"),
            "{}",
            stderr(&r)
        );
        assert_error(
            &run(cmd, &["--data_path", &od]),
            "it has train/ but no val/",
        );
    }
    assert_error(&run("eval-unsup", &["--data_path", &ot]), "no t10k-*");
    assert_error(&run("eval-knn", &[]), "give --data_path");
    // Explicit sets work, with or without --data_path.
    let d = s(data);
    let r = run(
        "eval-knn",
        &["--train_path", &ot, "--val_path", &d, "--nb_knn", "5"],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let r = run("eval-unsup", &["--val_path", &d]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_error(
        &run(
            "eval-knn",
            &["--data_path", &d, "--val_path", "/nonexistent/x"],
        ),
        "--val_path /nonexistent/x does not exist",
    );
    // A proper split still works as before.
    let r = run("eval-knn", &["--data_path", &d, "--nb_knn", "5"]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn arch_and_num_heads_are_checked_against_the_weights() {
    let (data, ckpt) = trained();
    let (d, w) = (s(data), s(ckpt));
    let knn = |w: &str, extra: &[&str]| {
        let mut a = vec![
            "eval-knn",
            "--pretrained_weights",
            w,
            "--data_path",
            &d,
            "--device",
            "cpu",
            "--nb_knn",
            "5",
        ];
        a.extend_from_slice(extra);
        ibot(&a)
    };
    // Our checkpoint states its shape: a contradicting --arch was silently ignored.
    assert_error(
        &knn(&w, &["--arch", "vit_small"]),
        "--arch vit_small has width 384, the weights have width 24",
    );
    assert_error(
        &knn(&w, &["--num_heads", "3"]),
        "was written for 2 attention heads, not 3",
    );
    let r = knn(&w, &["--num_heads", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    // Bare tensors of a non-standard width (24): the heads come from --num_heads.
    let dir = tempdir("heads");
    let bare = dir.join("bare.safetensors");
    let t = ibot::params::read_safetensors(ckpt).unwrap();
    let named: Vec<(String, tch::Tensor)> = t
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("teacher.backbone.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    ibot::params::write_safetensors(&bare, &named, None).unwrap();
    let b = s(&bare);
    let r = knn(&b, &[]);
    assert_error(&r, "give --num_heads");
    assert!(!stderr(&r).contains("give --arch"), "{}", stderr(&r));
    assert_error(
        &knn(&b, &["--num_heads", "5"]),
        "does not divide the width 24",
    );
    let r = knn(&b, &["--num_heads", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = s(&dir.join("bb.safetensors"));
    let r = ibot(&["extract-backbone", &b, &out, "--num_heads", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn epochs_zero_says_that_nothing_was_trained() {
    let out = tempdir("epochs0");
    let r = train_tiny(&out, &["--epochs", "0"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let e = stderr(&r);
    assert!(
        e.contains("no epoch was trained") && e.contains("no checkpoint was written"),
        "{e}"
    );
    assert!(!e.contains("checkpoint in"), "{e}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

#[test]
fn a_non_finite_loss_reports_the_checkpoint_that_really_exists() {
    // An absurd learning rate overflows the weights within a few steps.
    let out = tempdir("nan");
    let r = train_tiny(&out, &["--epochs", "3", "--lr", "1e30"]);
    assert_error(&r, "stopping (last finite loss");
    assert!(
        stderr(&r).contains("no checkpoint was written in"),
        "{}",
        stderr(&r)
    );
    // After a good epoch, the message names the file and its epoch.
    let out = tempdir("nan2");
    let r = train_tiny(&out, &["--epochs", "3", "--stop_after", "1"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = train_tiny(&out, &["--epochs", "3", "--lr", "1e30"]);
    assert_error(&r, "(epoch 0 finished), is intact");
}

#[test]
fn demo_is_only_the_subcommand_never_an_option_value_or_file_name() {
    let cwd = tempdir("demo-word");
    let (data, ckpt) = trained();
    let d = s(data);
    // `--output_dir demo` trains into ./demo (it turned `train` into the demo).
    let mut a = vec![
        "--threads",
        "1",
        "train",
        "--data_path",
        &d,
        "--output_dir",
        "demo",
        "--epochs",
        "1",
    ];
    a.extend_from_slice(&tiny());
    let r = Command::new(BIN)
        .args(&a)
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!stderr(&r).contains("iBOT demo"), "{}", stderr(&r));
    assert!(cwd.join("demo/checkpoint.safetensors").exists());
    // A checkpoint file named `demo`.
    std::fs::copy(ckpt, cwd.join("demo.bin")).unwrap();
    std::fs::rename(cwd.join("demo.bin"), cwd.join("demo2")).unwrap();
    std::fs::remove_dir_all(cwd.join("demo")).unwrap();
    std::fs::rename(cwd.join("demo2"), cwd.join("demo")).unwrap();
    let r = Command::new(BIN)
        .args(["extract-backbone", "demo", "bb.safetensors"])
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    // The demo itself still gets its defaults, after global options too; the user's win.
    let r = ibot(&["demo", "--data_path", "/nonexistent/fmnist"]);
    assert_error(&r, "/nonexistent/fmnist not found");
    // Its help lists the defaults it uses.
    let help = String::from_utf8_lossy(&ibot(&["demo", "--help"]).stdout).into_owned();
    for s in ibot_demo_defaults() {
        assert!(help.contains(s), "'{s}' missing from demo --help: {help}");
    }
    // Presets: only in train/demo's own arguments; launch leaves them to its workers.
    use ibot::cli::presets::expand_config_args;
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = expand_config_args(v(&[
        "ibot",
        "--threads",
        "1",
        "train",
        "--output_dir",
        "x",
        "--preset",
        "fmnist_tiny",
    ]))
    .unwrap();
    assert_eq!(
        &e[..6],
        &v(&["ibot", "--threads", "1", "train", "--arch", "vit_tiny"])[..]
    );
    assert_eq!(&e[e.len() - 2..], &v(&["--output_dir", "x"])[..]);
    let keep = v(&[
        "ibot",
        "eval-knn",
        "--data_path",
        "train",
        "--preset",
        "nope",
    ]);
    assert_eq!(expand_config_args(keep.clone()).unwrap(), keep);
    let launch = v(&[
        "ibot",
        "launch",
        "--nproc_per_node",
        "2",
        "train",
        "--preset",
        "fmnist_tiny",
    ]);
    assert_eq!(expand_config_args(launch.clone()).unwrap(), launch);
    // ... and each worker, which runs `ibot train --preset fmnist_tiny`, expands it.
    let w = expand_config_args(v(&["ibot", "train", "--preset", "fmnist_tiny"])).unwrap();
    assert!(w.contains(&"vit_tiny".to_string()) && !w.contains(&"--preset".to_string()));
}

fn ibot_demo_defaults() -> [&'static str; 5] {
    [
        "--preset fmnist_tiny",
        "--data_path /usr/share/datasets/fashion-mnist",
        "--output_dir runs/fmnist-demo",
        "--subset 20000",
        "--num_workers 2",
    ]
}

#[test]
fn negative_and_out_of_range_training_options_name_the_flag() {
    let out = tempdir("neg");
    for (flag, value, msg) in [
        ("--lr", "-0.001", "--lr must be a number >= 0 (got -0.001)"),
        ("--min_lr", "-1e-6", "--min_lr must be a number >= 0"),
        (
            "--weight_decay",
            "-0.04",
            "--weight_decay must be a number >= 0",
        ),
        ("--weight_decay_end", "-1", "--weight_decay_end must be"),
        ("--clip_grad", "-3", "--clip_grad must be"),
        (
            "--momentum_teacher",
            "1.5",
            "--momentum_teacher must be between 0 and 1",
        ),
        (
            "--momentum_teacher",
            "-0.5",
            "--momentum_teacher must be between 0 and 1",
        ),
        ("--teacher_temp", "0", "--teacher_temp must be > 0"),
        (
            "--warmup_teacher_patch_temp",
            "-0.04",
            "--warmup_teacher_patch_temp must be > 0",
        ),
        (
            "--pred_ratio",
            "1.0",
            "--pred_ratio values must be in [0, 1)",
        ),
        (
            "--pred_ratio",
            "-0.3",
            "--pred_ratio values must be in [0, 1)",
        ),
        ("--out_dim", "0", "--out_dim must be at least 1"),
        (
            "--patch_out_dim",
            "-5",
            "--patch_out_dim must be at least 1",
        ),
        // main_ibot.py accepts batch norms in the head; here they are refused, not ignored.
        (
            "--norm_in_head",
            "bn",
            "'bn' (batch norm in the head) is not supported: use none or ln",
        ),
        (
            "--norm_in_head",
            "syncbn",
            "'syncbn' (batch norm in the head) is not supported",
        ),
        (
            "--norm_in_head",
            "gn",
            "unknown head norm 'gn': expected none or ln",
        ),
        (
            "--act_in_head",
            "tanh",
            "invalid value 'tanh' for '--act_in_head",
        ),
    ] {
        let r = train_tiny(&out, &["--epochs", "1", flag, value]);
        assert_error(&r, msg);
        // Refused where the command line is parsed, the message names the flag.
        assert!(
            stderr(&r).contains(flag),
            "{flag} not named in: {}",
            stderr(&r)
        );
    }
    // A negative integer is a parse error naming the flag, not "unexpected argument".
    let r = train_tiny(&out, &["--epochs", "-1"]);
    let e = stderr(&r);
    assert!(
        e.contains("--epochs") && !e.contains("unexpected argument"),
        "{e}"
    );
    assert!(!out.join("checkpoint.safetensors").exists());
}

#[test]
fn boolean_options_take_a_value_or_stand_alone() {
    let out = tempdir("bools");
    let r = train_tiny(
        &out,
        &[
            "--epochs",
            "0",
            "--skip_corrupt",
            "--shared_head",
            "--norm_last_layer",
            "false",
            "--use_fp16",
        ],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["skip_corrupt"], true);
    assert_eq!(args["shared_head"], true);
    assert_eq!(args["norm_last_layer"], false);
    assert_eq!(args["use_fp16"], true);
    let r = train_tiny(
        &out,
        &[
            "--epochs",
            "0",
            "--use_fp16",
            "false",
            "--shared_head=false",
        ],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["use_fp16"], false);
    assert_eq!(args["shared_head"], false);
    assert_error(
        &train_tiny(&out, &["--epochs", "0", "--use_fp16", "maybe"]),
        "use true or false",
    );
}

#[test]
fn resume_mismatch_lists_the_differences_and_damaged_safetensors_say_so() {
    let out = tempdir("mismatch");
    let r = train_tiny(&out, &["--epochs", "1"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = train_tiny(
        &out,
        &["--epochs", "2", "--out_dim", "16", "--patch_out_dim", "16"],
    );
    assert_error(&r, "head.out_dim 32 vs 16");
    let e = stderr(&r);
    assert!(e.contains("loss.out_dim 32 vs 16"), "{e}");
    assert!(e.len() < 900, "{} bytes: {e}", e.len());
    // A truncated safetensors file.
    let (data, ckpt) = trained();
    let bad = out.join("cut.safetensors");
    let bytes = std::fs::read(ckpt).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let (b, d) = (s(&bad), s(data));
    let r = ibot(&[
        "eval-knn",
        "--pretrained_weights",
        &b,
        "--data_path",
        &d,
        "--device",
        "cpu",
    ]);
    assert_error(&r, "is a damaged safetensors file");
    assert!(!stderr(&r).contains("PyTorch"), "{}", stderr(&r));
}

#[test]
fn train_help_documents_presets_config_and_the_warmup_flag() {
    let help = String::from_utf8_lossy(&ibot(&["train", "--help"]).stdout).into_owned();
    assert!(
        help.contains("--preset <NAME>") && help.contains("--config <FILE.toml>"),
        "{help}"
    );
    assert!(help.contains("--warmup_teacher_temp_epochs 0"), "{help}");
    // The official default (30) with a shorter run: the error names the flag to set.
    let out = tempdir("warm");
    let (data, _) = trained();
    let (d, o) = (s(data), s(&out));
    let mut a = vec!["train", "--data_path", &d, "--output_dir", &o];
    a.extend_from_slice(&tiny());
    a.extend(["--warmup_teacher_temp_epochs", "30", "--epochs", "5"]);
    assert_error(&ibot(&a), "pass --warmup_teacher_temp_epochs 5");
    // --preset and --config are still accepted where clap sees them.
    let cfg = out.join("c.toml");
    std::fs::write(&cfg, "epochs = 0\n").unwrap();
    let c = s(&cfg);
    let mut a = vec!["train", "--data_path", &d, "--output_dir", &o];
    a.extend_from_slice(&tiny());
    a.extend(["--config", &c]);
    let r = ibot(&a);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("no epoch was trained"),
        "{}",
        stderr(&r)
    );
}

/// Starts a long tiny training run in the background; killed however the test ends.
struct Background(std::process::Child);
impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn background_run(out: &Path, launch: bool) -> Background {
    let (data, _) = trained();
    let (d, o) = (s(data), s(out));
    let mut a: Vec<&str> = vec!["--threads", "1"];
    if launch {
        a.extend(["launch", "--nproc_per_node", "1", "--master_port", "29871"]);
    }
    a.extend([
        "train",
        "--data_path",
        &d,
        "--output_dir",
        &o,
        "--epochs",
        "100000",
    ]);
    a.extend_from_slice(&tiny());
    Background(
        Command::new(BIN)
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn wait_for(path: &Path, what: &str) {
    let t0 = std::time::Instant::now();
    while !path.exists() {
        assert!(t0.elapsed().as_secs() < 120, "{what} never appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `sig` and returns the exit code, stderr and how long the process took to end.
fn signal_and_wait(mut b: Background, sig: i32) -> (Option<i32>, String, f64) {
    let t0 = std::time::Instant::now();
    unsafe {
        libc::kill(b.0.id() as i32, sig);
    }
    let mut err = String::new();
    use std::io::Read;
    b.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = b.0.wait().unwrap();
    (status.code(), err, t0.elapsed().as_secs_f64())
}

#[test]
fn sigint_and_sigterm_stop_training_with_a_message_and_128_plus_the_signal() {
    // SIGINT after the first epoch: the checkpoint of epoch 0 is named.
    let out = tempdir("sigint");
    let b = background_run(&out, false);
    wait_for(&out.join("log.txt"), "the first epoch");
    let (code, err, dt) = signal_and_wait(b, libc::SIGINT);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("SIGINT received: interrupted at epoch"),
        "{err}"
    );
    let ckpt = s(&out.join("checkpoint.safetensors"));
    let meta = ibot::train::checkpoint::read_meta(&out.join("checkpoint.safetensors")).unwrap();
    assert!(
        err.contains(&format!(
            "the last finished epoch ({}) is in {ckpt}",
            meta.epoch - 1
        )),
        "{err}"
    );
    assert!(err.contains("rerun the same command to resume"), "{err}");
    assert!(dt < 10.0, "took {dt}s to stop");
    // SIGTERM before any epoch finished: nothing to name.
    let out = tempdir("sigterm");
    let b = background_run(&out, false);
    wait_for(&out.join("args.json"), "the start of training");
    let (code, err, _) = signal_and_wait(b, libc::SIGTERM);
    assert_eq!(code, Some(143), "{err}");
    if !out.join("checkpoint.safetensors").exists() {
        assert!(err.contains("no epoch had finished"), "{err}");
    }
    // Under `ibot launch` the launcher forwards the signal; it still exits with 130.
    let out = tempdir("sigint-launch");
    let b = background_run(&out, true);
    wait_for(&out.join("log.txt"), "the first epoch under launch");
    let (code, err, _) = signal_and_wait(b, libc::SIGINT);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted at epoch"), "{err}");
}

#[test]
fn tensorboard_reads_the_event_files() {
    let out = tempdir("tb");
    let r = train_tiny(&out, &["--epochs", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let dir = out.join("tf_logs");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let have = |py: &Path| {
        Command::new(py)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have(&py) {
        let _ = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "tensorboard",
            ])
            .output();
    }
    if !have(&py) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: TensorBoard is not installed in {} and could not be installed",
            py.display()
        );
        return;
    }
    let script = r#"
import sys, json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
out = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let o = Command::new(&py)
        .args(["-c", script, &s(&dir)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 12 images, batch 4: 3 iterations per epoch, 2 epochs.
    let loss = v["iter/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 6, "{v}");
    assert_eq!(loss[5][0], 5);
    assert_eq!(v["iter/lr"].as_array().unwrap().len(), 6);
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.txt"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for key in [
        "train_loss",
        "train_cls",
        "train_patch",
        "train_lr",
        "train_wd",
        "train_acc",
        "train_nmi",
    ] {
        let pts = v[key].as_array().unwrap_or_else(|| panic!("no {key}: {v}"));
        assert_eq!(pts.len(), 2);
        for (e, p) in pts.iter().enumerate() {
            assert_eq!(p[0], e as i64);
            let want = log[e][key].as_f64().unwrap();
            let got = p[1].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{key} {got} vs {want}"
            );
        }
    }
}

#[test]
fn loss_png_shows_a_single_epoch_and_flat_curves() {
    use ibot::train::plot::{write_loss_png, EpochLoss};
    let dir = tempdir("plot");
    let count = |path: &Path, rgb: [u8; 3]| {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels().filter(|p| p.0 == rgb).count()
    };
    // One epoch: markers make it visible (it was an empty chart).
    let one = dir.join("one.png");
    let p = EpochLoss {
        epoch: 0.0,
        loss: 9.4,
        cls: 3.8,
        patch: 5.6,
    };
    write_loss_png(&[p], &one).unwrap();
    assert!(count(&one, [0, 0, 255]) > 20, "no blue marker");
    assert!(count(&one, [255, 0, 0]) > 20, "no red marker");
    // All zero: still drawn, in a padded range.
    let zero = dir.join("zero.png");
    let z = |e| EpochLoss {
        epoch: e,
        loss: 0.0,
        cls: 0.0,
        patch: 0.0,
    };
    write_loss_png(&[z(0.0), z(1.0), z(2.0)], &zero).unwrap();
    assert!(count(&zero, [255, 0, 0]) > 20);
    // With the per-iteration loss and the schedules: a grey curve and four panels below.
    use ibot::train::plot::{write_training_png, Curves};
    let full = dir.join("full.png");
    let iters: Vec<(f64, f64)> = (0..40)
        .map(|i| (i as f64 / 20.0 - 0.5, 9.0 - i as f64 * 0.1))
        .collect();
    let ramp = |a: f64, b: f64| {
        (0..40)
            .map(|i| (i as f64 / 20.0 - 0.5, a + (b - a) * i as f64 / 40.0))
            .collect::<Vec<_>>()
    };
    let schedules = [
        ("learning rate", ramp(0.0, 1e-3)),
        ("weight decay", ramp(0.04, 0.4)),
        ("teacher momentum", ramp(0.996, 1.0)),
        (
            "teacher temperature ([CLS])",
            vec![(0.0, 0.04), (1.0, 0.07)],
        ),
    ];
    let epochs = [p, EpochLoss { epoch: 1.0, ..p }];
    write_training_png(
        &Curves {
            epochs: &epochs,
            iters: &iters,
            schedules: &schedules,
        },
        &full,
    )
    .unwrap();
    let img = image::open(&full).unwrap().to_rgb8();
    assert!(
        img.height() > 600,
        "no schedule panels: {}x{}",
        img.width(),
        img.height()
    );
    assert!(count(&full, [150, 150, 150]) > 30, "no per-iteration curve");
    assert!(count(&full, [0, 255, 0]) > 30, "no momentum panel");
    assert!(count(&full, [255, 0, 255]) > 30, "no temperature panel");
    eprintln!("pictures in {}", dir.display());
}

/// `--device auto` loads libtorch's CUDA backend where a GPU may exist (here forced with
/// IBOT_LOAD_CUDA=1 on a machine without one): the library loads, no GPU is found, and the
/// evaluation runs on the CPU.
#[test]
fn the_cuda_backend_loads_and_a_machine_without_a_gpu_runs_on_the_cpu() {
    let (data, ckpt) = trained();
    let r = Command::new(BIN)
        .args([
            "eval-knn",
            "--pretrained_weights",
            &s(ckpt),
            "--data_path",
            &s(data),
        ])
        .args(["--nb_knn", "2", "--device", "auto"])
        .env("IBOT_LOAD_CUDA", "1")
        .output()
        .unwrap();
    let e = stderr(&r);
    assert!(r.status.success(), "{e}");
    assert!(!e.contains("could not be loaded"), "{e}");
}

/// `expand_config_args` over `ibot <sub...> --config FILE` with `toml` as FILE's text.
fn expand_with_config(sub: &[&str], name: &str, toml: &str) -> anyhow::Result<Vec<String>> {
    let dir = tempdir("toml");
    let cfg = dir.join(name);
    std::fs::write(&cfg, toml).unwrap();
    let mut argv = vec!["ibot".to_string()];
    argv.extend(sub.iter().map(|s| s.to_string()));
    argv.extend(["--config".to_string(), s(&cfg)]);
    ibot::cli::presets::expand_config_args(argv)
}

/// Config-file keys are checked against the command's options, naming the file. Before (each
/// line shown failing by running this test without the check in `config_file_args`):
/// `epochs = [1, 2]` gave clap's "unexpected argument '2' found", an unknown key "unexpected
/// argument '--epochz'", neither naming the file; `preset = "..."` was silently ignored (clap
/// accepts --preset and drops it), and `config = "..."` too.
#[test]
fn config_file_keys_are_checked_and_a_preset_key_applies() {
    let err = |sub: &[&str], toml: &str| {
        format!(
            "{:#}",
            expand_with_config(sub, "bad.toml", toml).unwrap_err()
        )
    };
    for (sub, toml, msg) in [
        (
            &["train"][..],
            "epochs = [1, 2]\n",
            "bad.toml: option 'epochs' takes one value, not a list of 2",
        ),
        (
            &["train"],
            "global_crops_scale = []\n",
            "bad.toml: option 'global_crops_scale' is given an empty list",
        ),
        (
            &["train"],
            "epochz = 3\n",
            "bad.toml: unknown option 'epochz' (keys are the names of `ibot train` options",
        ),
        (
            &["train"],
            "config = \"other.toml\"\n",
            "bad.toml: a config file cannot include another",
        ),
        (
            &["train"],
            "preset = \"nope\"\n",
            "bad.toml: preset: unknown preset 'nope'",
        ),
        (
            &["demo"],
            "knn_test = [1, 2]\n",
            "bad.toml: option 'knn_test' takes one value",
        ),
        (
            &["bench", "train"],
            "iters = [1, 2]\n",
            "bad.toml: option 'iters' takes one value",
        ),
    ] {
        let e = err(sub, toml);
        assert!(e.contains(msg), "{toml}: expected '{msg}' in: {e}");
    }
    // Keys of the subcommand's own options, several values where allowed, and --threads.
    for (sub, toml) in [
        (&["demo"][..], "knn_train = 100\nthreads = 1\n"),
        (&["bench", "train"], "iters = 1\nwarmup = 0\n"),
        (&["train"], "pred_ratio = [0.0, 0.3]\nshared_head = true\n"),
    ] {
        expand_with_config(sub, "ok.toml", toml).unwrap();
    }
    // `preset = NAME` in a file applies the preset; the file's other keys win over it, and the
    // command line over both.
    let mut argv = expand_with_config(
        &["train"],
        "p.toml",
        "epochs = 9\npreset = \"vit_small_800ep\"\n",
    )
    .unwrap();
    let a = common::train_config(argv.clone().into_iter().skip(1));
    assert_eq!(
        (
            a.schedule.epochs,
            a.data.local_crops_number,
            a.head.norm_last_layer
        ),
        (9, 10, false)
    );
    argv.extend(["--epochs".to_string(), "3".to_string()]);
    assert_eq!(
        common::train_config(argv.into_iter().skip(1))
            .schedule
            .epochs,
        3
    );
}

/// --pred_start_epoch past the end of the run: the error told to "lower
/// --warmup_teacher_temp_epochs" even when that was already 0 (shown failing with the old
/// message); it now names --pred_start_epoch first.
#[test]
fn pred_start_epoch_past_the_run_names_that_flag() {
    let out = tempdir("predstart");
    let r = train_tiny(&out, &["--epochs", "1", "--pred_start_epoch", "5"]);
    assert_error(
        &r,
        "lower --pred_start_epoch or --warmup_teacher_temp_epochs",
    );
}

/// eval-knn's --temperature must be > 0: 0 gave NaN votes and a printed (meaningless) accuracy
/// with exit code 0, and a negative value clap's "unexpected argument '-1' found". A result file
/// that cannot be written is refused before any feature is computed: the error came after the
/// whole evaluation and named the temporary file ("creating /nonexist/.x.json.tmpPID"; "renaming
/// /.tmp.tmpPID to /tmp: Is a directory"). Each case shown failing without the checks.
#[test]
fn knn_temperature_and_unwritable_outputs_are_refused_before_the_work() {
    let (data, ckpt) = trained();
    let (d, w) = (s(data), s(ckpt));
    let dir = tempdir("outputs");
    let dir_s = s(&dir);
    let missing = s(&dir.join("no-such-folder").join("r.json"));
    let base = |cmd: &'static str| {
        vec![
            cmd,
            "--pretrained_weights",
            w.as_str(),
            "--data_path",
            d.as_str(),
            "--device",
            "cpu",
        ]
    };
    for (cmd, extra, msg) in [
        (
            "eval-knn",
            ["--temperature", "0"],
            "--temperature must be > 0 (got 0)",
        ),
        (
            "eval-knn",
            ["--temperature", "-1"],
            "--temperature must be > 0 (got -1)",
        ),
        (
            "eval-knn",
            ["--output", &dir_s],
            "is a directory; give a file name",
        ),
        (
            "eval-knn",
            ["--output", &missing],
            "no-such-folder does not exist",
        ),
        (
            "eval-unsup",
            ["--output", &missing],
            "no-such-folder does not exist",
        ),
        (
            "extract-features",
            ["--output", &dir_s],
            "is a directory; give a file name",
        ),
    ] {
        let mut a = base(cmd);
        a.extend(extra);
        let r = ibot(&a);
        assert_error(&r, msg);
        let e = stderr(&r);
        assert!(
            e.contains(extra[0]),
            "{cmd}: {} not named in: {e}",
            extra[0]
        );
        // Refused before the weights are read (and so before any feature).
        assert!(
            !e.contains("weights:") && !e.contains("features"),
            "{cmd}: {e}"
        );
    }
    assert!(!dir.join("no-such-folder").exists());
}

/// An --output_dir that names a file gave "creating FILE: File exists"; a --data_path that is
/// one picture gave "X is not an IDX image file (bad magic)". Both now say what is wrong (each
/// shown failing with the old messages).
#[test]
fn output_dir_a_file_and_data_path_a_single_image_say_so() {
    let (data, ckpt) = trained();
    let dir = tempdir("files");
    let file = dir.join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let f = s(&file);
    let r = train_tiny(&file, &["--epochs", "1"]);
    assert_error(&r, &format!("--output_dir {f} is a file, not a folder"));
    let (d, w) = (s(data), s(ckpt));
    let r = ibot(&[
        "eval-linear",
        "--pretrained_weights",
        &w,
        "--data_path",
        &d,
        "--n_last_blocks",
        "1",
        "--epochs",
        "1",
        "--output_dir",
        &f,
    ]);
    assert_error(&r, &format!("--output_dir {f} is a file, not a folder"));
    // visualize-attention's --output_dir and eval-knn's --dump_features (a folder) too, the
    // latter before any feature is computed.
    let pic = dir.join("pic.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([90, 120, 200]))
        .save(&pic)
        .unwrap();
    let r = ibot(&[
        "visualize-attention",
        "--pretrained_weights",
        &w,
        "--image_path",
        &s(&pic),
        "--output_dir",
        &f,
    ]);
    assert_error(&r, &format!("--output_dir {f} is a file, not a folder"));
    let r = ibot(&[
        "eval-knn",
        "--pretrained_weights",
        &w,
        "--data_path",
        &d,
        "--dump_features",
        &f,
    ]);
    assert_error(&r, &format!("--dump_features {f} is a file, not a folder"));
    assert!(!stderr(&r).contains("features of"), "{}", stderr(&r));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // Only the extension is looked at, before the bytes.
    let img = dir.join("cat.png");
    std::fs::write(&img, "not even a png").unwrap();
    let (i, o) = (s(&img), s(&dir.join("run")));
    let mut a = vec!["train", "--data_path", &i, "--output_dir", &o];
    a.extend_from_slice(&tiny());
    assert_error(
        &ibot(&a),
        &format!("{i} is a single image, not a data set: give the folder"),
    );
}

/// Training options refused where the data loader and the model are built named no flag
/// ("batch size must be positive", "crop size 16 is not a multiple of the mask patch size 5",
/// "embed_dim 26 is not divisible by num_heads 4", "the data set is empty" for --subset 0...).
/// Shown failing with the old messages.
#[test]
fn training_options_refused_at_the_loader_or_model_name_the_flag() {
    let out = tempdir("flagnames");
    for (extra, msg) in [
        (
            &["--batch_size_per_gpu", "0"][..],
            "--batch_size_per_gpu must be at least 1",
        ),
        (
            &["--local_crops_size", "6"],
            "--local_crops_size 6 is not a multiple of the 4-px mask cell (--patch_size",
        ),
        (
            &["--global_crops_scale", "0.9", "0.2"],
            "--global_crops_scale must satisfy 0 < min <= max <= 1",
        ),
        (
            &["--local_crops_size", "0"],
            "--global_crops_size and --local_crops_size must be at least 1",
        ),
        (
            &["--embed_dim", "25"],
            "--embed_dim 25 is not divisible by --num_heads 2",
        ),
        (
            &["--subset", "0"],
            "no images to train on (an empty data set, or --subset 0?)",
        ),
    ] {
        let mut a = vec!["--epochs", "1"];
        a.extend_from_slice(extra);
        assert_error(&train_tiny(&out, &a), msg);
    }
    assert!(!out.join("checkpoint.safetensors").exists());
}
