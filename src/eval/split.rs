//! Which images an evaluation uses: `--data_path` split into training (memory) and validation
//! images, or `--train_path` / `--val_path` given explicitly.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Which half of an evaluation split.
#[derive(Clone, Copy, PartialEq)]
pub enum Half {
    Train,
    Val,
}

/// True when `dir` holds `<split>-images-idx3-ubyte[.gz]`.
pub fn has_idx(dir: &std::path::Path, split: &str) -> bool {
    ["", ".gz"]
        .iter()
        .any(|z| dir.join(format!("{split}-images-idx3-ubyte{z}")).is_file())
}

/// One half of an evaluation split: `explicit` (--train_path / --val_path) when given, else
/// `<data_path>/train` / `<data_path>/val` image folders, or IDX files with both `train-*` and
/// `t10k-*` in `data_path`. Anything else is an error: evaluating on the images the memory (or
/// classifier) was built from would report a meaningless accuracy.
pub fn eval_split(
    data_path: Option<&std::path::Path>,
    explicit: Option<&std::path::Path>,
    half: Half,
) -> Result<(PathBuf, &'static str)> {
    let (flag, dir, idx) = match half {
        Half::Train => ("--train_path", "train", "train"),
        Half::Val => ("--val_path", "val", "t10k"),
    };
    if let Some(p) = explicit {
        anyhow::ensure!(p.exists(), "{flag} {} does not exist", p.display());
        return Ok((p.to_path_buf(), idx));
    }
    let Some(path) = data_path else {
        bail!("give --data_path (a folder with train/ and val/ image folders, or IDX files train-* and t10k-*), or {flag}");
    };
    anyhow::ensure!(
        path.exists(),
        "--data_path {} does not exist",
        path.display()
    );
    let (tr, va) = (path.join("train"), path.join("val"));
    if tr.is_dir() && va.is_dir() {
        return Ok((path.join(dir), "train"));
    }
    if path.is_dir() && has_idx(path, "train") && has_idx(path, "t10k") {
        return Ok((path.to_path_buf(), idx));
    }
    let found = if tr.is_dir() {
        "it has train/ but no val/".to_string()
    } else if va.is_dir() {
        "it has val/ but no train/".to_string()
    } else if path.is_dir() && has_idx(path, "train") {
        "it has IDX files train-* but no t10k-*".to_string()
    } else if path.is_dir() && has_idx(path, "t10k") {
        "it has IDX files t10k-* but no train-*".to_string()
    } else if path.is_file() {
        "it is a single file".to_string()
    } else {
        "it has neither".to_string()
    };
    bail!(
        "--data_path {} is not split into training and validation images ({found}): evaluation \
         needs train/ and val/ image folders, or IDX files with both train-* and t10k-*; or give \
         the two sets explicitly with --train_path and --val_path",
        path.display()
    )
}

/// Both halves of an evaluation split (see [`eval_split`]).
pub fn eval_splits(
    data_path: Option<&std::path::Path>,
    train_path: Option<&std::path::Path>,
    val_path: Option<&std::path::Path>,
) -> Result<(PathBuf, &'static str, PathBuf, &'static str)> {
    let (trp, trs) = eval_split(data_path, train_path, Half::Train)?;
    let (vap, vas) = eval_split(data_path, val_path, Half::Val)?;
    Ok((trp, trs, vap, vas))
}

/// The first `min(n, limit)` indices (`--subset` of the evaluation commands).
pub fn first_n(n: usize, limit: usize) -> Vec<usize> {
    (0..n.min(limit)).collect()
}
