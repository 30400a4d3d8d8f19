//! Fine-tuning data: the training and validation sets, the samplers of the official scripts and
//! batches built on several threads.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use crate::data::dataset::{self, Dataset};
use crate::data::ops::Rgb8;

fn has_idx(dir: &Path, split: &str) -> bool {
    ["", ".gz"]
        .iter()
        .any(|z| dir.join(format!("{split}-images-idx3-ubyte{z}")).is_file())
}

/// The training and validation sets: CIFAR-10/100 (binary or python version, `--data_set
/// CIFAR10 / CIFAR` or found in `data_path`); `--eval_data_path` given → `--data_path` is the training
/// images and `--eval_data_path` the validation images (the official `image_folder` data set);
/// else `<data_path>/train` and `<data_path>/val` (ImageNet layout) or IDX files with `train-*`
/// and `t10k-*` in `data_path`.
pub fn open_sets(
    data_path: &Path,
    eval_data_path: Option<&Path>,
    data_set: Option<&str>,
) -> Result<(Box<dyn Dataset>, Box<dyn Dataset>)> {
    use crate::data::cls::{CifarDataset, CifarKind};
    ensure!(
        data_path.exists(),
        "--data_path {} does not exist",
        data_path.display()
    );
    let detected = || -> Option<CifarKind> {
        let has =
            |n: &str| data_path.join(n).is_dir() || data_path.file_name().is_some_and(|f| f == n);
        if has("cifar-10-batches-bin") || has("cifar-10-batches-py") {
            Some(CifarKind::Cifar10)
        } else if has("cifar-100-binary") || has("cifar-100-python") {
            Some(CifarKind::Cifar100)
        } else {
            None
        }
    };
    let cifar = match data_set {
        // The official names: CIFAR is CIFAR-100 (datasets.CIFAR100), CIFAR10 CIFAR-10.
        Some("CIFAR") | Some("CIFAR100") => Some(CifarKind::Cifar100),
        Some("CIFAR10") => Some(CifarKind::Cifar10),
        Some("IMNET") | Some("image_folder") => None,
        Some(other) => bail!("--data_set {other}: expected CIFAR, CIFAR10, IMNET or image_folder"),
        None => detected(),
    };
    if let Some(kind) = cifar {
        return Ok((
            Box::new(CifarDataset::open(data_path, kind, true)?),
            Box::new(CifarDataset::open(data_path, kind, false)?),
        ));
    }
    if let Some(v) = eval_data_path {
        ensure!(
            v.exists(),
            "--eval_data_path {} does not exist",
            v.display()
        );
        return Ok((
            dataset::open(data_path, "train")?,
            dataset::open(v, "t10k")?,
        ));
    }
    let (tr, va) = (data_path.join("train"), data_path.join("val"));
    if tr.is_dir() && va.is_dir() {
        return Ok((dataset::open(&tr, "train")?, dataset::open(&va, "t10k")?));
    }
    if data_path.is_dir() && has_idx(data_path, "train") && has_idx(data_path, "t10k") {
        return Ok((
            dataset::open(data_path, "train")?,
            dataset::open(data_path, "t10k")?,
        ));
    }
    bail!(
        "--data_path {} has neither train/ and val/ image folders nor IDX files train-* and \
         t10k-*; give the validation images with --eval_data_path",
        data_path.display()
    )
}

/// The training images named by a SimCLRv2-style split file.
pub fn apply_split_file(train_root: &Path, split: &Path) -> Result<Box<dyn Dataset>> {
    ensure!(
        train_root.is_dir(),
        "--split_file selects images of an image folder; {} is not one",
        train_root.display()
    );
    let folder = crate::data::dataset::ImageFolder::open(train_root)?;
    let sub = crate::data::cls::subset_from_split_file(folder, split)?;
    eprintln!("{}", sub.describe());
    Ok(Box::new(sub))
}

/// Where the training images of `data_path` live (for `--split_file`).
pub fn train_root(data_path: &Path, eval_data_path: Option<&Path>) -> PathBuf {
    if eval_data_path.is_some() {
        data_path.to_path_buf()
    } else {
        data_path.join("train")
    }
}

/// One epoch's training indices (before batching), as the official samplers give them on one
/// process: a permutation of the data set from (seed, epoch); with repeated augmentation (the
/// DeiT recipes' `RASampler`) every index three times in a row, cut to `len // 256 * 256`.
/// Each entry is (data-set index, repeat number), the repeat number telling the repeated views
/// of an image apart.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, repeated_aug: bool) -> Vec<(usize, usize)> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64);
    perm.shuffle(&mut rng);
    if !repeated_aug {
        return perm.into_iter().map(|i| (i, 0)).collect();
    }
    let keep = n / 256 * 256;
    perm.iter()
        .flat_map(|&i| (0..3).map(move |r| (i, r)))
        .take(keep)
        .collect()
}

/// The generator of one training view: (seed, epoch, image, repeat).
pub fn view_rng(seed: u64, epoch: usize, index: usize, repeat: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed ^ ((epoch as u64) << 40)
            ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ ((repeat as u64) << 56),
    )
}

/// `[N, 3, S, S]` float32 views of `items` (each `f(image, item)` gives 3·S·S CHW values) and
/// their labels, decoded and transformed on `workers` threads.
pub fn load_batch<T: Sync>(
    ds: &dyn Dataset,
    items: &[T],
    index_of: impl Fn(&T) -> usize + Sync,
    size: usize,
    workers: usize,
    f: &(dyn Fn(&Rgb8, &T) -> Result<Vec<f32>> + Sync),
) -> Result<(Tensor, Tensor)> {
    let n = 3 * size * size;
    let mut buf = vec![0f32; items.len() * n];
    let mut labels = vec![0i64; items.len()];
    let per = items.len().div_ceil(workers.max(1)).max(1);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks_mut(per * n)
            .zip(labels.chunks_mut(per))
            .zip(items.chunks(per))
            .map(|((out, lab), its)| {
                let index_of = &index_of;
                s.spawn(move || -> Result<()> {
                    for (k, it) in its.iter().enumerate() {
                        let i = index_of(it);
                        let (img, l) = ds.get(i)?;
                        let v = f(&img, it)
                            .with_context(|| format!("image {i} of {}", ds.describe()))?;
                        ensure!(v.len() == n, "a view has {} values, expected {n}", v.len());
                        out[k * n..(k + 1) * n].copy_from_slice(&v);
                        lab[k] = l;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a data worker panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let s = size as i64;
    let x = Tensor::from_slice(&buf).reshape([items.len() as i64, 3, s, s]);
    Ok((x, Tensor::from_slice(&labels)))
}
