//! Parallel, deterministic loader of multi-crop batches with masks.
//!
//! * Sample order per epoch like `DistributedSampler(shuffle=True)`: a permutation seeded by
//!   `seed + epoch`, padded to a multiple of the world size, every `world_size`-th index from
//!   `rank`; batches of `batch_size` (the last partial one dropped with `drop_last`).
//! * Every image draws its augmentations and masks from its own generator seeded by
//!   `(seed, epoch, index)`: the same seed and epoch give the same batches with any number of
//!   workers.
//! * Worker `w` builds batches `w, w + n, w + 2n, …` into a channel of depth `prefetch`, so memory
//!   is bounded by `num_workers · prefetch` batches whatever the data set size.
//! * Batches are view-major like the official collate: `views[v]` is `[B, 3, S, S]`,
//!   `masks[v]` is `[B, S/p, S/p]` (bool) for every crop, `labels` is `[B]` (-1 = unlabeled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::augment::{augment_crop, AugmentConfig};
use super::dataset::Dataset;
use super::masking::MaskConfig;
use super::ops;

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub augment: AugmentConfig,
    pub mask: MaskConfig,
    pub batch_size: usize,
    /// 0: build batches on the calling thread.
    pub num_workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub drop_last: bool,
    /// Skip unreadable images (counted in `Batch::skipped`) instead of failing.
    pub skip_corrupt: bool,
}

/// One batch, view-major.
#[derive(Debug)]
pub struct Batch {
    pub views: Vec<Tensor>,
    pub masks: Vec<Tensor>,
    pub labels: Tensor,
    /// Data-set indices of the rows.
    pub indices: Vec<usize>,
    /// Images of this batch that could not be read and were skipped.
    pub skipped: usize,
    /// Description of the first skipped image's error.
    pub skip_reason: Option<String>,
    /// The errors of every skipped image, in order (each names its file).
    pub skip_reasons: Vec<String>,
}

pub struct Loader {
    dataset: Arc<dyn Dataset>,
    pub cfg: LoaderConfig,
}

fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    // SplitMix64 finaliser over the three numbers: decorrelated, platform independent.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((epoch as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add((index as u64).wrapping_mul(0x94D0_49BB_1331_11EB));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Loader {
    pub fn new(dataset: Arc<dyn Dataset>, cfg: LoaderConfig) -> Result<Self> {
        cfg.augment.validate()?;
        cfg.mask.validate()?;
        ensure!(
            cfg.batch_size > 0,
            "--batch_size_per_gpu must be at least 1 (got 0)"
        );
        ensure!(
            cfg.world_size > 0 && cfg.rank < cfg.world_size,
            "rank {} is not below world size {}",
            cfg.rank,
            cfg.world_size
        );
        for i in 0..cfg.augment.num_crops() {
            let s = cfg.augment.crop_size(i);
            ensure!(
                s % cfg.mask.patch_size == 0,
                "{} {s} is not a multiple of the {}-px mask cell (--patch_size; Swin: 8 x --patch_size)",
                if i < cfg.augment.global_crops_number {
                    "--global_crops_size"
                } else {
                    "--local_crops_size"
                },
                cfg.mask.patch_size
            );
        }
        ensure!(
            !dataset.is_empty(),
            "no images to train on (an empty data set, or --subset 0?)"
        );
        Ok(Self { dataset, cfg })
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// This rank's sample indices for `epoch`.
    pub fn epoch_indices(&self, epoch: usize) -> Vec<usize> {
        let n = self.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        let ws = self.cfg.world_size;
        let total = n.div_ceil(ws) * ws;
        let padded: Vec<usize> = (0..total).map(|i| order[i % n]).collect();
        padded.into_iter().skip(self.cfg.rank).step_by(ws).collect()
    }

    /// Batches of `epoch` as lists of sample indices.
    pub fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let idx = self.epoch_indices(epoch);
        let mut batches: Vec<Vec<usize>> = idx
            .chunks(self.cfg.batch_size)
            .map(|c| c.to_vec())
            .collect();
        if self.cfg.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.cfg.batch_size)
        {
            batches.pop();
        }
        batches
    }

    /// Number of batches per epoch.
    pub fn len(&self) -> usize {
        self.epoch_batches(0).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over the batches of `epoch`, built by the worker threads.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let batches = Arc::new(self.epoch_batches(epoch));
        let n = self.cfg.num_workers;
        let stop = Arc::new(AtomicBool::new(false));
        let mut rxs = Vec::new();
        let mut handles = Vec::new();
        for w in 0..n {
            let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
            let (ds, cfg, batches, stop) = (
                self.dataset.clone(),
                self.cfg.clone(),
                batches.clone(),
                stop.clone(),
            );
            handles.push(std::thread::spawn(move || {
                for b in (w..batches.len()).step_by(n) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let res = build_batch(ds.as_ref(), &cfg, epoch, &batches[b]);
                    if tx.send(res).is_err() {
                        return;
                    }
                }
            }));
            rxs.push(rx);
        }
        EpochIter {
            dataset: self.dataset.clone(),
            cfg: self.cfg.clone(),
            epoch,
            batches,
            next: 0,
            rxs,
            handles,
            stop,
        }
    }
}

/// Iterator over one epoch's batches.
pub struct EpochIter {
    dataset: Arc<dyn Dataset>,
    cfg: LoaderConfig,
    epoch: usize,
    batches: Arc<Vec<Vec<usize>>>,
    next: usize,
    rxs: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl EpochIter {
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.next;
        if b >= self.batches.len() {
            return None;
        }
        self.next += 1;
        if self.rxs.is_empty() {
            return Some(build_batch(
                self.dataset.as_ref(),
                &self.cfg,
                self.epoch,
                &self.batches[b],
            ));
        }
        let rx = &self.rxs[b % self.rxs.len()];
        Some(
            rx.recv()
                .map_err(|_| anyhow!("a data-loading worker stopped unexpectedly"))
                .and_then(|r| r),
        )
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rxs.clear(); // unblocks workers waiting to send
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A contiguous CPU float32 tensor being filled from Rust.
///
/// `Tensor::from_slice` zero-fills a tensor (on libtorch's thread pool, costly from loader
/// threads) and then copies a second buffer into it; writing the pixels straight into the
/// tensor's own storage saves the copy and the extra buffer.
pub(crate) struct FloatTensorBuf {
    tensor: Tensor,
    len: usize,
}

impl FloatTensorBuf {
    /// A zeroed tensor of `shape`.
    pub(crate) fn zeros(shape: &[i64]) -> Self {
        let tensor = Tensor::empty(shape, (Kind::Float, tch::Device::Cpu));
        let len = tensor.numel();
        let buf = Self { tensor, len };
        // SAFETY: the storage holds `len` float32 elements, contiguous, owned by `buf.tensor`
        // only; viewed as `MaybeUninit` it may be uninitialised, and it is fully initialised
        // here before any `&mut [f32]` to it is made.
        let raw = unsafe {
            std::slice::from_raw_parts_mut(
                buf.tensor.data_ptr() as *mut std::mem::MaybeUninit<f32>,
                len,
            )
        };
        raw.fill(std::mem::MaybeUninit::new(0.0));
        buf
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: initialised in `zeros`; the borrow of `self` keeps the storage alive and
        // unaliased (the tensor is private until `into_tensor`).
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut f32, self.len) }
    }

    pub(crate) fn into_tensor(self) -> Tensor {
        self.tensor
    }
}

/// Decodes, augments and masks the images of one batch and stacks them view-major.
pub fn build_batch(
    ds: &dyn Dataset,
    cfg: &LoaderConfig,
    epoch: usize,
    indices: &[usize],
) -> Result<Batch> {
    let aug = &cfg.augment;
    let ncrops = aug.num_crops();
    let n = indices.len() as i64;
    let mut views: Vec<FloatTensorBuf> = (0..ncrops)
        .map(|c| {
            let s = aug.crop_size(c) as i64;
            FloatTensorBuf::zeros(&[n, 3, s, s])
        })
        .collect();
    let mut masks: Vec<Vec<u8>> = (0..ncrops).map(|_| Vec::new()).collect();
    let mut labels = Vec::with_capacity(indices.len());
    let mut kept = Vec::with_capacity(indices.len());
    let mut skipped = 0;
    let mut skip_reasons = Vec::new();
    for &i in indices {
        let (img, label) = match ds.get(i) {
            Ok(x) => x,
            Err(e) if cfg.skip_corrupt => {
                skipped += 1;
                skip_reasons.push(format!("{e:#}"));
                continue;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "sample {i} (pass --skip_corrupt to skip unreadable images)"
                )))
            }
        };
        let mut rng = ChaCha8Rng::seed_from_u64(sample_seed(cfg.seed, epoch, i));
        let row = kept.len();
        for c in 0..ncrops {
            let crop = augment_crop(&img, aug, c, &mut rng);
            let s = aug.crop_size(c);
            let len = 3 * s * s;
            ops::to_tensor_normalize_into(
                &crop,
                aug.mean,
                aug.std,
                &mut views[c].as_mut_slice()[row * len..(row + 1) * len],
            );
            let g = s / cfg.mask.patch_size;
            let ratio = cfg.mask.draw_ratio(epoch, &mut rng);
            masks[c].extend(
                cfg.mask
                    .mask(g, g, ratio, &mut rng)
                    .into_iter()
                    .map(u8::from),
            );
        }
        labels.push(label);
        kept.push(i);
    }
    let b = kept.len() as i64;
    // Skipped images leave unused rows at the end.
    let views = views
        .into_iter()
        .map(|v| v.into_tensor())
        .map(|v| {
            if b < n {
                v.narrow(0, 0, b).contiguous()
            } else {
                v
            }
        })
        .collect();
    let masks = (0..ncrops)
        .map(|c| {
            let g = (aug.crop_size(c) / cfg.mask.patch_size) as i64;
            Tensor::from_slice(&masks[c])
                .view([b, g, g])
                .to_kind(Kind::Bool)
        })
        .collect();
    Ok(Batch {
        views,
        masks,
        labels: Tensor::from_slice(&labels),
        indices: kept,
        skipped,
        skip_reason: skip_reasons.first().cloned(),
        skip_reasons,
    })
}
