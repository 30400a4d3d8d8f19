//! Reading PyTorch `.pth` / `.pt` files without running anything they contain.
//!
//! The container and pickle parsing is the `pytorch-reader` crate's (a hardened stack-machine
//! unpickler that never imports or calls anything: tensor rebuilds and dictionaries are
//! interpreted, every other call is kept as an opaque name; sizes are checked against the file
//! before anything is allocated). On top of it this module applies a policy: a file may hold
//! tensors, plain data and a short list of known harmless objects (the `argparse.Namespace` of
//! the official checkpoints, devices, dtypes, numpy scalars). Any other object, for instance a
//! `__reduce__` to `os.system`, makes the file refused with the object's name; it was never
//! executed, but a checkpoint that tries to call functions is not one to trust.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use pytorch_reader::{DType, PickleValue, PytorchReader};
use tch::{Kind, Tensor};

/// Python objects a checkpoint may hold besides tensors and plain data. They are recorded by
/// name only; their contents are skipped.
const HARMLESS: &[&str] = &[
    "argparse.Namespace",
    "torch.device",
    "torch.Size",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
];

/// `torch.float32` and friends appear as bare class references in optimizer / scaler states.
const TORCH_DTYPES: &[&str] = &[
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
    "int32", "int64", "uint8", "bool", "long", "int",
];

/// The tensors of a `.pth` file (flattened names, nested dictionaries joined with `.`) and what
/// else it holds.
#[derive(Debug)]
pub struct PthFile {
    pub tensors: HashMap<String, Tensor>,
    /// Keys of the top-level dictionary (empty when the root is not a dictionary).
    pub top_keys: Vec<String>,
    /// Non-data objects found, as `key.path: python.type` (skipped, not executed).
    pub skipped: Vec<String>,
}

fn is_tensor_like(name: &str) -> bool {
    name == "torch.Tensor" || name.ends_with("Storage")
}

fn is_harmless(name: &str) -> bool {
    if HARMLESS.contains(&name) {
        return true;
    }
    name.strip_prefix("torch.")
        .is_some_and(|d| TORCH_DTYPES.contains(&d))
}

/// Walks the pickled structure and sorts the opaque objects into harmless and refused ones.
fn audit(
    v: &PickleValue,
    path: &mut Vec<String>,
    skipped: &mut Vec<String>,
    refused: &mut BTreeSet<String>,
) {
    match v {
        PickleValue::Dict(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                path.push(k.clone());
                audit(&m[k], path, skipped, refused);
                path.pop();
            }
        }
        PickleValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                audit(item, path, skipped, refused);
                path.pop();
            }
        }
        PickleValue::Unsupported(name) if is_tensor_like(name) => {}
        PickleValue::Unsupported(name) if is_harmless(name) => {
            skipped.push(format!("{}: {name}", path.join(".")))
        }
        PickleValue::Unsupported(name) => {
            refused.insert(format!(
                "{name} (at '{}')",
                if path.is_empty() {
                    "<root>".to_string()
                } else {
                    path.join(".")
                }
            ));
        }
        _ => {}
    }
}

fn kind_of(d: DType) -> Result<Kind> {
    Ok(match d {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
        other => bail!("tensors of type {other:?} are not supported"),
    })
}

/// Reads every tensor of a PyTorch file onto the CPU, refusing files that contain objects other
/// than tensors, plain data and [`HARMLESS`] ones. Errors name the file and never panic.
pub fn read_pth(path: &Path) -> Result<PthFile> {
    read_pth_subset(path, |_, _| true)
}

/// [`read_pth`] reading only the tensors for which `keep(name, all_names)` holds (the others'
/// bytes are never read, e.g. the optimizer state of a full checkpoint).
pub fn read_pth_subset(path: &Path, keep: impl Fn(&str, &[String]) -> bool) -> Result<PthFile> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("opening {shown}"))?;
    if !meta.is_file() {
        bail!("{shown} is not a file");
    }
    let not_pth = |e: pytorch_reader::PytorchError| {
        anyhow!("{shown} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}")
    };
    let tree = PytorchReader::read_pickle_data(path, None).map_err(not_pth)?;
    let (mut skipped, mut refused) = (Vec::new(), BTreeSet::new());
    audit(&tree, &mut Vec::new(), &mut skipped, &mut refused);
    if !refused.is_empty() {
        let list: Vec<&String> = refused.iter().take(5).collect();
        bail!(
            "refusing {shown}: it contains objects that would call Python code when loaded with torch.load: {}{} \
             (nothing was executed; only tensors, plain data and known harmless objects such as {} are accepted)",
            list.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if refused.len() > 5 { ", ..." } else { "" },
            HARMLESS[0]
        );
    }
    let top_keys = match &tree {
        PickleValue::Dict(m) => {
            let mut k: Vec<String> = m.keys().cloned().collect();
            k.sort();
            k
        }
        _ => Vec::new(),
    };
    drop(tree);
    let reader = PytorchReader::new(path).map_err(not_pth)?;
    let names = reader.keys();
    let mut tensors = HashMap::new();
    for (name, t) in reader.into_tensors() {
        if !keep(&name, &names) {
            continue;
        }
        let kind = kind_of(t.dtype()).with_context(|| format!("tensor '{name}' in {shown}"))?;
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let bytes = t
            .read()
            .with_context(|| format!("reading tensor '{name}' from {shown} (truncated file?)"))?;
        let want = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        if bytes.len() != want {
            bail!(
                "tensor '{name}' in {shown}: {} bytes for shape {shape:?}, expected {want}",
                bytes.len()
            );
        }
        let tensor = Tensor::f_from_data_size(&bytes, &shape, kind)
            .with_context(|| format!("tensor '{name}' in {shown}"))?;
        tensors.insert(name, tensor);
    }
    Ok(PthFile {
        tensors,
        top_keys,
        skipped,
    })
}
