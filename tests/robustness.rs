//! Bad inputs found by testing (issue 12): each is a clear error (exit code 2 from the binary,
//! never a panic or an abort) or the documented behaviour.

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

/// IDX images and labels for `split` (train / t10k): `n` images of `side` x `side`.
fn write_idx(dir: &Path, split: &str, n: usize, side: usize) {
    let mut img = vec![0, 0, 8, 3];
    for v in [n, side, side] {
        img.extend_from_slice(&(v as u32).to_be_bytes());
    }
    img.extend((0..n * side * side).map(|i| ((i * 37 + i / 7) % 256) as u8));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| (i % 3) as u8));
    std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), lab).unwrap();
}

/// Options of a tiny model (16-pixel images, 4-pixel patches) for `ibot train`.
const TINY: &[&str] = &[
    "--arch",
    "vit_tiny",
    "--patch_size",
    "4",
    "--img_size",
    "16",
    "--depth",
    "1",
    "--embed_dim",
    "24",
    "--num_heads",
    "2",
    "--global_crops_size",
    "16",
    "--local_crops_size",
    "8",
    "--local_crops_number",
    "2",
    "--out_dim",
    "32",
    "--patch_out_dim",
    "32",
    "--head_hidden_dim",
    "32",
    "--head_bottleneck_dim",
    "16",
    "--batch_size_per_gpu",
    "4",
    "--warmup_epochs",
    "0",
    "--warmup_teacher_temp_epochs",
    "0",
    "--num_workers",
    "0",
    "--device",
    "cpu",
    "--use_fp16",
    "false",
];

fn ibot(args: &[&str]) -> Output {
    Command::new(BIN)
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
        write_idx(&data, "train", 12, 16);
        write_idx(&data, "t10k", 12, 16);
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
        args.extend_from_slice(TINY);
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
    a.extend_from_slice(TINY);
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
    a.extend_from_slice(TINY);
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
    a.extend_from_slice(TINY);
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
