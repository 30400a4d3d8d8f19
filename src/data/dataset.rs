//! Data sets: torchvision-style image folders, flat folders of unlabeled images, and the
//! MNIST / Fashion-MNIST IDX format.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::ops::Rgb8;

/// File extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp"];

/// A labelled image source. Label -1 means "no label".
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The image (as RGB) and its label. Errors name the offending file or record.
    fn get(&self, index: usize) -> Result<(Rgb8, i64)>;
    fn label(&self, index: usize) -> i64;
    /// Class names (empty when unlabeled).
    fn classes(&self) -> &[String];
    fn describe(&self) -> String;
}

/// Decodes an image file and converts it to RGB as PIL's `convert('RGB')` does (gray replicated,
/// alpha dropped).
pub fn load_rgb(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// [`load_rgb`] on the bytes of an image file; `name` (the file's path) is used in the errors.
/// JPEG data cut before its end-of-image marker is refused (see [`jpeg_is_complete`]).
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<Rgb8> {
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
        bail!(
            "cannot decode image {name}: the JPEG file is truncated (its data ends before the \
             end-of-image marker; Pillow refuses it as 'image file is truncated')"
        );
    }
    let img =
        image::load_from_memory(bytes).map_err(|e| anyhow!("cannot decode image {name}: {e}"))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    ensure!(w > 0 && h > 0, "image {name} is empty");
    Ok(Rgb8::new(w as usize, h as usize, rgb.into_raw()))
}

/// Whether a JPEG stream (starting with SOI) reaches its EOI marker: walks the marker
/// segments by their lengths and the entropy-coded data of every scan (where 0xFF is stuffed as
/// FF 00 or starts a restart marker), so the markers of an embedded thumbnail do not count.
///
/// The `image` crate's decoder fills the missing part of a truncated JPEG without an error,
/// where Pillow (without `LOAD_TRUNCATED_IMAGES`) raises "image file is truncated" as soon as
/// the decoder runs out of data; a file cut anywhere before its end-of-image marker is refused
/// here (Pillow would still accept a file missing only those last two bytes).
pub fn jpeg_is_complete(b: &[u8]) -> bool {
    let n = b.len();
    let mut i = 2;
    loop {
        // The next marker: skip anything up to its 0xFF and any fill bytes.
        match b.get(i..).and_then(|r| r.iter().position(|&x| x == 0xFF)) {
            Some(k) => i += k,
            None => return false,
        }
        while i < n && b[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = b.get(i) else {
            return false;
        };
        i += 1;
        match m {
            0xD9 => return true,
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = b
            .get(i..i + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
        else {
            return false;
        };
        if len < 2 || i + len > n {
            return false;
        }
        i += len;
        if m == 0xDA {
            // Entropy-coded data up to the next marker that is not stuffing or a restart.
            loop {
                match b.get(i..).and_then(|r| r.iter().position(|&x| x == 0xFF)) {
                    Some(k) => i += k,
                    None => return false,
                }
                match b.get(i + 1) {
                    None => return false,
                    Some(0x00) | Some(0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Images in class sub-folders (classes sorted by name, label = class index), like
/// torchvision's `ImageFolder`; or, when the folder has images but no sub-folders with images,
/// a flat unlabeled folder.
pub struct ImageFolder {
    root: PathBuf,
    samples: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
}

impl ImageFolder {
    pub fn open(root: &Path) -> Result<Self> {
        let entries = sorted_entries(root)?;
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        // Links are followed, but every real directory is read once: a link back to an
        // ancestor (a cycle) or to a folder already read is skipped with a warning.
        let mut visited = std::collections::HashSet::new();
        visited.insert(
            root.canonicalize()
                .with_context(|| format!("resolving {}", root.display()))?,
        );
        for d in entries.iter().filter(|p| p.is_dir()) {
            let mut files: Vec<PathBuf> = Vec::new();
            collect_images(d, &mut files, &mut visited)?;
            if files.is_empty() {
                continue;
            }
            let label = classes.len() as i64;
            classes.push(
                d.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            samples.extend(files.into_iter().map(|f| (f, label)));
        }
        if samples.is_empty() {
            samples = entries
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .map(|p| (p, -1))
                .collect();
        }
        ensure!(
            !samples.is_empty(),
            "no images found in {} (expected class sub-folders or image files with extensions {:?})",
            root.display(),
            IMAGE_EXTENSIONS
        );
        Ok(Self {
            root: root.to_path_buf(),
            samples,
            classes,
        })
    }
}

impl ImageFolder {
    /// The images (path, label) in data-set order.
    pub fn samples(&self) -> &[(PathBuf, i64)] {
        &self.samples
    }

    /// The folder the images were found in.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn collect_images(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    visited: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let real = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    if !visited.insert(real.clone()) {
        eprintln!(
            "warning: skipping {}: it leads to {}, a folder already read (a symbolic-link cycle or a duplicate)",
            dir.display(),
            real.display()
        );
        return Ok(());
    }
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            collect_images(&p, out, visited)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// The file of image `index`.
    pub fn path(&self, index: usize) -> &Path {
        &self.samples[index].0
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<(Rgb8, i64)> {
        let (p, l) = &self.samples[index];
        Ok((load_rgb(p)?, *l))
    }
    fn label(&self, index: usize) -> i64 {
        self.samples[index].1
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self) -> String {
        if self.classes.is_empty() {
            format!(
                "{} unlabeled images in {}",
                self.samples.len(),
                self.root.display()
            )
        } else {
            format!(
                "{} images in {} classes in {}",
                self.samples.len(),
                self.classes.len(),
                self.root.display()
            )
        }
    }
}

/// MNIST-style IDX files (`*-images-idx3-ubyte[.gz]` with `*-labels-idx1-ubyte[.gz]`).
pub struct IdxDataset {
    source: PathBuf,
    width: usize,
    height: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    classes: Vec<String>,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is a damaged gzip file", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize, path: &Path) -> Result<usize> {
    let s = b
        .get(at..at + 4)
        .ok_or_else(|| anyhow!("{} is truncated (header)", path.display()))?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

impl IdxDataset {
    /// Opens an images file and the labels file next to it (`images` → `labels` in the name).
    pub fn open(images: &Path) -> Result<Self> {
        // One picture given where a data set is expected: say so, not "bad magic".
        ensure!(
            !is_image(images),
            "{} is a single image, not a data set: give the folder that holds the images \
             (class sub-folders or image files) or an IDX images file",
            images.display()
        );
        let data = read_maybe_gz(images)?;
        ensure!(
            be_u32(&data, 0, images)? == 0x0803,
            "{} is not an IDX image file (bad magic)",
            images.display()
        );
        let (n, h, w) = (
            be_u32(&data, 4, images)?,
            be_u32(&data, 8, images)?,
            be_u32(&data, 12, images)?,
        );
        ensure!(
            n > 0 && h > 0 && w > 0,
            "{} holds {n} images of {h}x{w} pixels: every dimension must be at least 1",
            images.display()
        );
        let need = n
            .checked_mul(h)
            .and_then(|x| x.checked_mul(w))
            .and_then(|x| x.checked_add(16))
            .filter(|&x| x <= data.len())
            .ok_or_else(|| {
                anyhow!(
                    "{} is truncated or damaged: {} bytes for {n} images of {h}x{w}",
                    images.display(),
                    data.len()
                )
            })?;
        let name = images
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label_name = name.replace("images-idx3", "labels-idx1");
        let mut labels = Vec::new();
        let candidates = [
            label_name.clone(),
            label_name.trim_end_matches(".gz").to_string(),
            format!("{label_name}.gz"),
        ];
        if let Some(lp) = candidates
            .iter()
            .map(|c| images.with_file_name(c))
            .find(|p| p.is_file())
        {
            let l = read_maybe_gz(&lp)?;
            ensure!(
                be_u32(&l, 0, &lp)? == 0x0801,
                "{} is not an IDX label file (bad magic)",
                lp.display()
            );
            ensure!(
                be_u32(&l, 4, &lp)? == n,
                "{} has a different number of labels than images",
                lp.display()
            );
            ensure!(l.len() >= 8 + n, "{} is truncated", lp.display());
            labels = l[8..8 + n].to_vec();
        }
        let nclass = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        let classes = (0..nclass).map(|c| c.to_string()).collect();
        Ok(Self {
            source: images.to_path_buf(),
            width: w,
            height: h,
            pixels: data[16..need].to_vec(),
            labels,
            classes,
        })
    }

    /// Finds `<split>-images-idx3-ubyte[.gz]` in a folder (`train` or `t10k`).
    pub fn open_dir(dir: &Path, split: &str) -> Result<Self> {
        for name in [
            format!("{split}-images-idx3-ubyte.gz"),
            format!("{split}-images-idx3-ubyte"),
        ] {
            let p = dir.join(name);
            if p.is_file() {
                return Self::open(&p);
            }
        }
        bail!("no {split}-images-idx3-ubyte[.gz] in {}", dir.display())
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.pixels.len() / (self.width * self.height)
    }
    fn get(&self, index: usize) -> Result<(Rgb8, i64)> {
        let n = self.width * self.height;
        let g = &self.pixels[index * n..(index + 1) * n];
        Ok((
            Rgb8::from_gray(self.width, self.height, g),
            self.label(index),
        ))
    }
    fn label(&self, index: usize) -> i64 {
        self.labels.get(index).map(|&l| l as i64).unwrap_or(-1)
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self) -> String {
        format!(
            "{} {}x{} images from {}",
            self.len(),
            self.width,
            self.height,
            self.source.display()
        )
    }
}

/// Opens `--data_path`: an IDX images file, a folder holding IDX files (`split` = train/t10k),
/// or an image folder (class sub-folders or flat).
pub fn open(path: &Path, split: &str) -> Result<Box<dyn Dataset>> {
    ensure!(path.exists(), "data path {} does not exist", path.display());
    if path.is_file() {
        return Ok(Box::new(IdxDataset::open(path)?));
    }
    let has_idx = std::fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("-images-idx3-ubyte")
        });
    if has_idx {
        return Ok(Box::new(IdxDataset::open_dir(path, split)?));
    }
    Ok(Box::new(ImageFolder::open(path)?))
}

/// A fixed selection of a data set's images (in the order of `indices`).
pub struct Subset {
    inner: Box<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// The images `indices` of `inner`; each index must be below `inner.len()`.
    pub fn new(inner: Box<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            bail!(
                "subset index {bad} is past the {} images of {}",
                inner.len(),
                inner.describe()
            );
        }
        Ok(Self { inner, indices })
    }

    /// Indices into the underlying data set.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, i: usize) -> Result<(Rgb8, i64)> {
        self.inner.get(self.indices[i])
    }
    fn label(&self, i: usize) -> i64 {
        self.inner.label(self.indices[i])
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn describe(&self) -> String {
        format!(
            "{} images drawn from {}",
            self.indices.len(),
            self.inner.describe()
        )
    }
}

/// Opens `path` (split `split`), keeping a seeded random subset of `n` images if asked (the
/// subset `ibot train --subset` trains on).
pub fn open_subset(
    path: &Path,
    split: &str,
    subset: Option<usize>,
    seed: u64,
) -> Result<std::sync::Arc<dyn Dataset>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let ds = open(path, split)?;
    Ok(match subset {
        Some(n) if n < ds.len() => {
            let mut idx: Vec<usize> = (0..ds.len()).collect();
            idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5EED));
            idx.truncate(n);
            idx.sort_unstable();
            std::sync::Arc::new(Subset::new(ds, idx)?)
        }
        _ => std::sync::Arc::from(ds),
    })
}
