//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod procs;

use ibot::loss::IbotLossConfig;
use ibot::models::{HeadConfig, VitConfig};
use ibot::train::optim::OptimizerKind;
use ibot::train::IbotConfig;

/// The reference fixtures of the official code (`../shared/fixtures/ibot-ref/<name>`), or the
/// directory named by IBOT_FIXTURES. A clone without `../shared` beside it has none: the test
/// is then skipped with a printed reason, unless IBOT_REQUIRE_FIXTURES is set (as CI does), which
/// makes a missing fixture a failure.
pub fn fixture_dir(name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("IBOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/ibot-ref")
        });
    let dir = root.join(name);
    if dir.join("fixtures.json").is_file() || dir.join("trajectory.json").is_file() {
        return Some(dir);
    }
    skip_or_fail(&format!(
        "reference fixtures not found at {} (clone the project next to shared/ or set IBOT_FIXTURES)",
        dir.display()
    ));
    None
}

/// The Pillow/torchvision outputs of `../shared/fixtures/augment` (or IBOT_AUGMENT_FIXTURES),
/// under the same rule as [`fixture_dir`].
pub fn augment_fixture_dir() -> Option<PathBuf> {
    let root = std::env::var_os("IBOT_AUGMENT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/augment")
        });
    if root.join("augment.json").is_file() {
        return Some(root);
    }
    skip_or_fail(&format!(
        "augment fixtures not found at {} (clone the project next to shared/ or set IBOT_AUGMENT_FIXTURES)",
        root.display()
    ));
    None
}

/// The project's benchmark photos (`../shared/bench/photos`: real JPEGs), under the same rule
/// as [`fixture_dir`].
pub fn bench_photos_dir() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/photos");
    if root.is_dir() {
        return Some(root);
    }
    skip_or_fail(&format!(
        "benchmark photos not found at {} (clone the project next to shared/)",
        root.display()
    ));
    None
}

fn skip_or_fail(why: &str) {
    assert!(
        std::env::var_os("IBOT_REQUIRE_FIXTURES").is_none(),
        "{why}; IBOT_REQUIRE_FIXTURES is set"
    );
    // Straight to the process's stderr, past the test harness's capture: a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// The Debian package's Fashion-MNIST directory, or `None` (the caller skips) when it is not
/// installed; with IBOT_REQUIRE_FMNIST set (as CI does) a missing data set fails the test.
pub fn fashion_mnist_dir() -> Option<PathBuf> {
    let dir = PathBuf::from("/usr/share/datasets/fashion-mnist");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("IBOT_REQUIRE_FMNIST").is_none(),
        "Fashion-MNIST is not installed"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipped: install the Debian package dataset-fashion-mnist"
    );
    None
}

/// The project venv's Python (with the torch wheel libtorch comes from), for reference values
/// computed by the official operations at test time.
pub fn venv_python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run `bash scripts/bootstrap.sh` first",
        p.display()
    );
    p
}

/// Runs `tests/py/<script>` with the venv's Python on `inputs` (written to `dir/in.npz`) and
/// returns the arrays it writes to `dir/out.npz`: reference values from the official
/// operations, computed at test time.
pub fn python_reference<T: AsRef<tch::Tensor>>(
    script: &str,
    inputs: &[(&str, T)],
    dir: &std::path::Path,
) -> std::collections::HashMap<String, tch::Tensor> {
    let (inp, out) = (dir.join("in.npz"), dir.join("out.npz"));
    tch::Tensor::write_npz(inputs, &inp).unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let st = std::process::Command::new(venv_python())
        .arg(&path)
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "{script} failed");
    tch::Tensor::read_npz(&out).unwrap().into_iter().collect()
}

/// Standard output of `tests/py/<script> ARGS...` run by the venv's Python (for references that
/// print JSON); a failing script fails the test with its stderr.
pub fn python_stdout(script: &str, args: &[&str]) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let out = std::process::Command::new(venv_python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A fresh scratch directory `ibot-<suite>-<pid>-<name>` under the system temp directory.
pub fn scratch_dir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ibot-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny configuration for fast tests.
pub fn tiny_config(shared_head: bool, shared_head_teacher: bool) -> IbotConfig {
    let backbone = VitConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 24,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 2.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: true,
    };
    let head = HeadConfig {
        hidden_dim: 32,
        bottleneck_dim: 8,
        ..HeadConfig::new(24, 40, 40, false, shared_head)
    };
    let loss = IbotLossConfig {
        out_dim: 40,
        patch_out_dim: 40,
        ngcrops: 2,
        nlcrops: 2,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.07,
        warmup_teacher_temp2: 0.04,
        teacher_temp2: 0.07,
        warmup_teacher_temp_epochs: 2,
        nepochs: 4,
        student_temp: 0.1,
        center_momentum: 0.9,
        center_momentum2: 0.9,
        lambda1: 1.0,
        lambda2: 1.0,
        mim_start_epoch: 0,
    };
    IbotConfig {
        backbone: backbone.into(),
        head,
        shared_head_teacher,
        loss,
        clip_grad: 3.0,
        freeze_last_layer: 1,
        optimizer: OptimizerKind::Adamw,
    }
}

/// IDX images and labels for `split` (train / t10k) in `dir`: `n` grey images of `side` x
/// `side` with a fixed pattern, labels cycling through 0, 1, 2.
pub fn write_idx(dir: &std::path::Path, split: &str, n: usize, side: usize) {
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

/// `ibot train`'s options alone, parsed as the command line does (later options win).
#[derive(clap::Parser)]
#[command(args_override_self = true)]
pub struct TrainCli {
    #[command(flatten)]
    pub args: ibot::cli::train::TrainArgs,
}

/// The training configuration `argv` (program name first, then `ibot train` options) describes.
#[allow(dead_code)]
pub fn train_config<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(
    argv: I,
) -> ibot::config::TrainConfig {
    <TrainCli as clap::Parser>::parse_from(argv)
        .args
        .into_config()
}

/// A tiny Swin: width 24, two stages of two blocks (the second of each shifted), window 3 on a
/// model built for 32 px, so 32-px global crops (8x8 patches) and 16-px local crops (4x4) are
/// padded to whole windows at both stages. `--patch_size 1` makes 8-px mask cells (1 x 8).
pub fn tiny_swin_args(
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> ibot::config::TrainConfig {
    let mut argv: Vec<String> = [
        "x",
        "--arch",
        "swin_tiny",
        "--window_size",
        "3",
        "--patch_size",
        "1",
        "--img_size",
        "32",
        "--embed_dim",
        "24",
        "--depths",
        "2",
        "2",
        "--stage_heads",
        "1",
        "2",
        "--global_crops_size",
        "32",
        "--local_crops_size",
        "16",
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
        "--epochs",
        "3",
        "--warmup_epochs",
        "1",
        "--warmup_teacher_temp_epochs",
        "1",
        "--num_workers",
        "2",
        "--device",
        "cpu",
        "--pred_ratio",
        "0.3",
        "--pred_ratio_var",
        "0.1",
        "--saveckp_freq",
        "1",
        "--use_fp16",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend([
        "--data_path".into(),
        data.display().to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    train_config(argv)
}

/// The tiny ViT every end-to-end test trains: width 24, one block, 4-pixel patches on 16-pixel
/// global and 8-pixel local crops, a small head; batches of 4 on the CPU. Tests add or
/// override options after it (the later one wins).
pub const TINY_VIT: &[&str] = &[
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
    "--device",
    "cpu",
];

/// Writes official-layout `.pth` files (bare, `state_dict`, full checkpoint with `module.`
/// prefixes and an `args` Namespace, …) of the student parameters `named` into `dir`, with the
/// venv's torch (`tests/py/make_official_pth.py`; `arch` names a non-ViT architecture).
pub fn make_official_pth(
    named: &[(String, tch::Tensor)],
    dir: &std::path::Path,
    arch: Option<&str>,
) {
    let npz = dir.join("params.npz");
    tch::Tensor::write_npz(named, &npz).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/make_official_pth.py");
    let mut cmd = std::process::Command::new(venv_python());
    cmd.arg(script).arg(&npz).arg(dir);
    if let Some(a) = arch {
        cmd.arg(a);
    }
    assert!(
        cmd.status().unwrap().success(),
        "make_official_pth.py failed"
    );
}

/// `got` equals `want` in shape and within `tol` (max absolute difference).
pub fn assert_close(name: &str, got: &tch::Tensor, want: &tch::Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let d = ibot::util::max_abs(&(got - want));
    assert!(d <= tol, "{name}: max abs difference {d} > {tol}");
}

/// A ViT configuration for tests: MLP ratio 4, qkv bias, no drop path, no masked embedding.
pub fn vit_config(embed_dim: i64, depth: i64, num_heads: i64, patch: i64, img: i64) -> VitConfig {
    VitConfig {
        img_size: img,
        patch_size: patch,
        in_chans: 3,
        embed_dim,
        depth,
        num_heads,
        mlp_ratio: 4.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    }
}

/// A ViT initialised from libtorch's generator seeded with `seed`, saved to `path` with its
/// configuration as `extract-backbone` writes it, plus the `extra` tensors (e.g. a classifier).
/// Returns the backbone's tensors. Callers whose tests draw from the generator on parallel
/// threads hold their own lock around it.
pub fn save_vit_backbone(
    path: &std::path::Path,
    cfg: &VitConfig,
    seed: i64,
    extra: Vec<(String, tch::Tensor)>,
) -> std::collections::HashMap<String, tch::Tensor> {
    tch::manual_seed(seed);
    let mut ps = ibot::params::ParamStore::new();
    let _m =
        ibot::models::VisionTransformer::new(&mut ps, "", cfg, false, tch::Device::Cpu).unwrap();
    let backbone: Vec<(String, tch::Tensor)> = ps
        .state_dict()
        .map(|(k, t)| (k.to_string(), t.copy()))
        .collect();
    let named: Vec<(String, tch::Tensor)> = backbone
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .chain(extra)
        .collect();
    let md = std::collections::HashMap::from([(
        ibot::interop::VIT_CONFIG_KEY.to_string(),
        serde_json::to_string(cfg).unwrap(),
    )]);
    ibot::params::write_safetensors(path, &named, Some(md)).unwrap();
    backbone.into_iter().collect()
}

/// Asserts that one fine-tuning micro-step (`s`, from `t.micro_step` with `t.keep_grads`)
/// equals the PyTorch reference `r` (keys `loss`, `grad_norm`, `g.<param>` clipped gradients and
/// `p.<param>` parameters after the step): loss and gradient norm to 1e-5 relative, the
/// reference must clip at `clip`, every clipped gradient to 1e-5 of its scale and every
/// parameter to 1e-5 (the attention key bias excepted: its gradient is zero in exact arithmetic,
/// so AdamW turns float noise into steps of a full lr). `what` prefixes the messages. Returns
/// how many parameters were compared.
pub fn assert_finetune_step_matches(
    what: &str,
    s: &ibot::finetune::run::StepOut,
    t: &ibot::finetune::run::Trainer,
    r: &std::collections::HashMap<String, tch::Tensor>,
    clip: f64,
) -> usize {
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let want_loss = r["loss"].double_value(&[]);
    assert!(
        rel(s.loss, want_loss) < 1e-5,
        "{what}loss {} vs {want_loss}",
        s.loss
    );
    let want_norm = r["grad_norm"].double_value(&[]);
    assert!(want_norm > clip, "the test must clip (norm {want_norm})");
    let got_norm = s.grad_norm.unwrap();
    assert!(
        rel(got_norm, want_norm) < 1e-5,
        "{what}grad norm {got_norm} vs {want_norm}"
    );
    let mut n = 0;
    for (p, g) in t.model.ps.params().iter().zip(&t.last_grads) {
        let g = g.as_ref().unwrap();
        let gw = &r[&format!("g.{}", p.name)];
        let scale = ibot::util::max_abs(gw).max(1e-12);
        assert_close(
            &format!("{what}clipped gradient of {}", p.name),
            &(g / scale),
            &(gw / scale),
            1e-5,
        );
        let want = &r[&format!("p.{}", p.name)];
        let (mut got, mut want) = (p.tensor.detach(), want.shallow_clone());
        if p.name.ends_with("attn.qkv.bias") {
            // q and v biases only.
            let d = got.size()[0] / 3;
            got = tch::Tensor::cat(&[got.narrow(0, 0, d), got.narrow(0, 2 * d, d)], 0);
            want = tch::Tensor::cat(&[want.narrow(0, 0, d), want.narrow(0, 2 * d, d)], 0);
        }
        assert_close(&format!("{what}{}", p.name), &got, &want, 1e-5);
        n += 1;
    }
    n
}

/// A Swin initialised from libtorch's generator seeded with `seed`, saved to `path` with its
/// configuration as `extract-backbone` writes it; returns its tensors. Callers whose tests draw
/// from the generator on parallel threads hold their own lock around it.
pub fn save_swin_backbone(
    path: &std::path::Path,
    cfg: &ibot::models::SwinConfig,
    seed: i64,
) -> std::collections::HashMap<String, tch::Tensor> {
    tch::manual_seed(seed);
    let mut ps = ibot::params::ParamStore::new();
    let _m = ibot::models::SwinTransformer::new(&mut ps, "", cfg, false, tch::Device::Cpu).unwrap();
    let named: Vec<(String, tch::Tensor)> = ps
        .state_dict()
        .map(|(k, t)| (k.to_string(), t.copy()))
        .collect();
    let mut md = std::collections::HashMap::new();
    md.insert(
        ibot::interop::SWIN_CONFIG_KEY.to_string(),
        serde_json::to_string(cfg).unwrap(),
    );
    ibot::params::write_safetensors(path, &named, Some(md)).unwrap();
    named.into_iter().collect()
}
