//! CIFAR-10 / CIFAR-100 in their distributed formats, as the transfer recipes read them
//! (eval_cls.py `--data_set CIFAR10 / CIFAR` through torchvision's CIFAR10 / CIFAR100):
//!
//! - binary version: `cifar-10-batches-bin/data_batch_{1..5}.bin`, `test_batch.bin`
//!   (records of label byte + 3072 pixel bytes) with `batches.meta.txt`;
//!   `cifar-100-binary/train.bin`, `test.bin` (coarse label byte + fine label byte + 3072) with
//!   `fine_label_names.txt` / `coarse_label_names.txt`;
//! - python version: `cifar-10-batches-py/data_batch_{1..5}`, `test_batch`, `batches.meta`;
//!   `cifar-100-python/train`, `test`, `meta` — pickled dicts read by [`super::pickle`] without
//!   running any pickled code.
//!
//! Pixels are stored per image as three 32x32 planes (R, G, B); labels are the fine labels
//! (CIFAR-100's coarse labels are kept beside them).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::pickle::{self, Value};
use crate::data::dataset::Dataset;
use crate::data::ops::Rgb8;

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    /// The official `--data_set` names: `CIFAR` (CIFAR-100, as eval_cls.py and
    /// run_class_finetuning.py read it) and `CIFAR10`; also `CIFAR100`.
    pub fn from_data_set(name: &str) -> Result<Self> {
        match name {
            "CIFAR" | "CIFAR100" => Ok(Self::Cifar100),
            "CIFAR10" => Ok(Self::Cifar10),
            other => bail!("'{other}' is not a CIFAR data set (CIFAR = CIFAR-100, CIFAR10)"),
        }
    }

    fn num_classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "CIFAR-10",
            Self::Cifar100 => "CIFAR-100",
        }
    }
}

pub struct CifarDataset {
    kind: CifarKind,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    coarse_labels: Option<Vec<u8>>,
    classes: Vec<String>,
    source: String,
}

impl CifarDataset {
    /// Opens the training or test split of `kind` under `root`: the binary or python folder
    /// (`cifar-10-batches-bin`, `cifar-10-batches-py`, `cifar-100-binary`, `cifar-100-python`)
    /// in `root`, or `root` itself when it is one.
    pub fn open(root: &Path, kind: CifarKind, train: bool) -> Result<Self> {
        let (bin, py) = match kind {
            CifarKind::Cifar10 => ("cifar-10-batches-bin", "cifar-10-batches-py"),
            CifarKind::Cifar100 => ("cifar-100-binary", "cifar-100-python"),
        };
        for dir in [root.join(bin), root.join(py), root.to_path_buf()] {
            if !dir.is_dir() {
                continue;
            }
            let (bin_files, py_files) = split_files(kind, train);
            let b: Vec<PathBuf> = bin_files.iter().map(|f| dir.join(f)).collect();
            if b.iter().all(|p| p.is_file()) {
                return Self::read_bin(kind, &b, &dir);
            }
            let p: Vec<PathBuf> = py_files.iter().map(|f| dir.join(f)).collect();
            if p.iter().all(|p| p.is_file()) {
                return Self::read_py(kind, &p, &dir);
            }
        }
        let (b, p) = split_files(kind, train);
        bail!(
            "no {} {} split under {}: expected {b:?} (binary version, in {bin}/) or {p:?} \
             (python version, in {py}/)",
            kind.name(),
            if train { "training" } else { "test" },
            root.display()
        )
    }

    /// Reads binary-version files (records of label byte(s) + 3072 pixel bytes), with the
    /// class names of the `.txt` files in `meta_dir` when present.
    pub fn read_bin(kind: CifarKind, files: &[PathBuf], meta_dir: &Path) -> Result<Self> {
        let rec = match kind {
            CifarKind::Cifar10 => 1 + PIXELS,
            CifarKind::Cifar100 => 2 + PIXELS,
        };
        let (mut pixels, mut labels, mut coarse) = (Vec::new(), Vec::new(), Vec::new());
        for f in files {
            let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            ensure!(
                !b.is_empty() && b.len() % rec == 0,
                "{} is truncated or not a {} binary batch: {} bytes is not a whole number of \
                 {rec}-byte records",
                f.display(),
                kind.name(),
                b.len()
            );
            for r in b.chunks_exact(rec) {
                match kind {
                    CifarKind::Cifar10 => labels.push(r[0]),
                    CifarKind::Cifar100 => {
                        coarse.push(r[0]);
                        labels.push(r[1]);
                    }
                }
                pixels.extend_from_slice(&r[rec - PIXELS..]);
            }
        }
        let names_file = match kind {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        };
        let classes = match std::fs::read_to_string(meta_dir.join(names_file)) {
            Ok(t) => t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => Vec::new(),
        };
        let coarse = (kind == CifarKind::Cifar100).then_some(coarse);
        Self::finish(kind, pixels, labels, coarse, classes, files)
    }

    /// Reads python-version files (pickled dicts with `data`, `labels` / `fine_labels`,
    /// `coarse_labels`), with the class names of the `batches.meta` / `meta` pickle in
    /// `meta_dir` when present. Nothing pickled is executed.
    pub fn read_py(kind: CifarKind, files: &[PathBuf], meta_dir: &Path) -> Result<Self> {
        let (mut pixels, mut labels, mut coarse) = (Vec::new(), Vec::new(), Vec::new());
        for f in files {
            let what = || {
                format!(
                    "{} is not a readable {} python batch",
                    f.display(),
                    kind.name()
                )
            };
            let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let v = pickle::parse(&b).with_context(what)?;
            let (data, n) = match v.get("data") {
                Some(Value::Array {
                    dtype, shape, data, fortran: false,
                }) if dtype.trim_start_matches('|') == "u1"
                    && shape.len() == 2
                    && shape[1] == PIXELS =>
                {
                    (data, shape[0])
                }
                Some(Value::Array { dtype, shape, .. }) => bail!(
                    "{}: 'data' is a {dtype} array of shape {shape:?}, expected uint8 [N, {PIXELS}]",
                    what()
                ),
                _ => bail!("{}: no 'data' array", what()),
            };
            let key = match kind {
                CifarKind::Cifar10 => "labels",
                CifarKind::Cifar100 => "fine_labels",
            };
            let ints = |key: &str| -> Result<Vec<u8>> {
                let l = v
                    .get(key)
                    .and_then(Value::as_list)
                    .ok_or_else(|| anyhow!("{}: no '{key}' list", what()))?;
                ensure!(
                    l.len() == n,
                    "{}: {} '{key}' for {n} images",
                    what(),
                    l.len()
                );
                l.iter()
                    .map(|x| {
                        x.as_int()
                            .filter(|&i| (0..256).contains(&i))
                            .map(|i| i as u8)
                            .ok_or_else(|| anyhow!("{}: bad label in '{key}'", what()))
                    })
                    .collect()
            };
            labels.extend(ints(key)?);
            if kind == CifarKind::Cifar100 {
                coarse.extend(ints("coarse_labels")?);
            }
            pixels.extend_from_slice(data);
        }
        let (meta, key) = match kind {
            CifarKind::Cifar10 => ("batches.meta", "label_names"),
            CifarKind::Cifar100 => ("meta", "fine_label_names"),
        };
        let mut classes = Vec::new();
        if let Ok(b) = std::fs::read(meta_dir.join(meta)) {
            let v = pickle::parse(&b).with_context(|| {
                format!(
                    "{} is not a readable meta file",
                    meta_dir.join(meta).display()
                )
            })?;
            if let Some(l) = v.get(key).and_then(Value::as_list) {
                classes = l.iter().filter_map(Value::as_text).collect();
            }
        }
        let coarse = (kind == CifarKind::Cifar100).then_some(coarse);
        Self::finish(kind, pixels, labels, coarse, classes, files)
    }

    fn finish(
        kind: CifarKind,
        pixels: Vec<u8>,
        labels: Vec<u8>,
        coarse_labels: Option<Vec<u8>>,
        mut classes: Vec<String>,
        files: &[PathBuf],
    ) -> Result<Self> {
        let nc = kind.num_classes();
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= nc) {
            bail!(
                "label {bad} in {} is not a {} class (0..{nc}): wrong --data_set or a damaged file",
                files
                    .first()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
                kind.name()
            );
        }
        if classes.len() != nc {
            classes = (0..nc).map(|c| c.to_string()).collect();
        }
        let source = match files.first().and_then(|f| f.parent()) {
            Some(d) => d.display().to_string(),
            None => String::new(),
        };
        Ok(Self {
            kind,
            pixels,
            labels,
            coarse_labels,
            classes,
            source,
        })
    }

    pub fn kind(&self) -> CifarKind {
        self.kind
    }

    /// CIFAR-100's coarse (super-class) label of an image.
    pub fn coarse_label(&self, index: usize) -> Option<i64> {
        self.coarse_labels.as_ref().map(|c| c[index] as i64)
    }

    /// The image's raw planes (R, G, B; 1024 bytes each).
    pub fn planes(&self, index: usize) -> &[u8] {
        &self.pixels[index * PIXELS..(index + 1) * PIXELS]
    }
}

fn split_files(kind: CifarKind, train: bool) -> (Vec<String>, Vec<String>) {
    match (kind, train) {
        (CifarKind::Cifar10, true) => (
            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (1..=5).map(|i| format!("data_batch_{i}")).collect(),
        ),
        (CifarKind::Cifar10, false) => (vec!["test_batch.bin".into()], vec!["test_batch".into()]),
        (CifarKind::Cifar100, true) => (vec!["train.bin".into()], vec!["train".into()]),
        (CifarKind::Cifar100, false) => (vec!["test.bin".into()], vec!["test".into()]),
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> Result<(Rgb8, i64)> {
        ensure!(
            index < self.len(),
            "image {index} of {} does not exist",
            self.len()
        );
        let p = self.planes(index);
        let n = SIDE * SIDE;
        let data = (0..n)
            .flat_map(|i| [p[i], p[n + i], p[2 * n + i]])
            .collect();
        Ok((Rgb8::new(SIDE, SIDE, data), self.labels[index] as i64))
    }
    fn label(&self, index: usize) -> i64 {
        self.labels[index] as i64
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self) -> String {
        format!(
            "{} {} images of 32x32 from {}",
            self.len(),
            self.kind.name(),
            self.source
        )
    }
}
