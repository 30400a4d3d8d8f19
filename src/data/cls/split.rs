//! SimCLRv2-style split files (the 1% / 10% ImageNet subsets of semi-supervised fine-tuning):
//! a text file with one image file name per line (`n01440764_10026.JPEG`), selecting images of
//! an ImageFolder training split.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::data::dataset::{ImageFolder, Subset};

/// The names of a split file: one per non-blank line, surrounding white space removed.
/// An empty file or a repeated name is an error.
pub fn read_split_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading split file {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    ensure!(
        !names.is_empty(),
        "split file {} lists no images (expected one image file name per line, e.g. \
         n01440764_10026.JPEG)",
        path.display()
    );
    let mut seen = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        if let Some(first) = seen.insert(n.as_str(), i) {
            bail!(
                "split file {} names {n} twice (lines {} and {})",
                path.display(),
                first + 1,
                i + 1
            );
        }
    }
    Ok(names)
}

/// The images of `folder` that the split file at `path` names: a name without `/` matches an
/// image's file name, a name with `/` its path relative to the folder. A name matching no image
/// (or two images with the same file name) is an error listing the first few. The subset keeps
/// the folder's order (as an ImageFolder of the subset's files would list them), its labels and
/// its classes.
pub fn subset_from_split_file(folder: ImageFolder, path: &Path) -> Result<Subset> {
    let names = read_split_file(path)?;
    let root = folder.root().to_path_buf();
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    let mut by_rel: HashMap<String, usize> = HashMap::new();
    for (i, (p, _)) in folder.samples().iter().enumerate() {
        if let Some(f) = p.file_name() {
            by_name
                .entry(f.to_string_lossy().into_owned())
                .or_default()
                .push(i);
        }
        if let Ok(rel) = p.strip_prefix(&root) {
            by_rel.insert(rel.to_string_lossy().replace('\\', "/"), i);
        }
    }
    let (mut indices, mut missing, mut ambiguous) = (Vec::new(), Vec::new(), Vec::new());
    for n in &names {
        if n.contains('/') {
            match by_rel.get(n.trim_start_matches("./")) {
                Some(&i) => indices.push(i),
                None => missing.push(n.clone()),
            }
        } else {
            match by_name.get(n).map(Vec::as_slice) {
                Some([i]) => indices.push(*i),
                Some(many) => ambiguous.push(format!("{n} ({} images)", many.len())),
                None => missing.push(n.clone()),
            }
        }
    }
    let show = |v: &[String]| {
        let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 5 {
            s.push_str(&format!(", ... ({} in all)", v.len()));
        }
        s
    };
    ensure!(
        missing.is_empty(),
        "split file {} names {} image(s) not found in {}: {}",
        path.display(),
        missing.len(),
        root.display(),
        show(&missing)
    );
    ensure!(
        ambiguous.is_empty(),
        "split file {} names file(s) present more than once in {} (write them as class/file): {}",
        path.display(),
        root.display(),
        show(&ambiguous)
    );
    indices.sort_unstable();
    Subset::new(Box::new(folder), indices)
}
