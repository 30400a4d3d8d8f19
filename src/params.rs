//! Named parameters under the official state-dict names.
//!
//! A [`ParamStore`] plays the role of a PyTorch module's `named_parameters()` /
//! `state_dict()`: tensors are registered in the official module-registration order, and a
//! shared module (iBOT's `shared_head`, where `last_layer2` IS `last_layer`) appears once among
//! the parameters but under both names in the state dict, exactly like PyTorch.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// One registered parameter.
#[derive(Debug)]
pub struct Param {
    /// Canonical name (the one `named_parameters()` reports).
    pub name: String,
    pub tensor: Tensor,
    /// `requires_grad` in the official model (false for a frozen `weight_g` and for the teacher).
    pub trainable: bool,
}

/// Where a state-dict key points: a parameter or a buffer (e.g. Swin's
/// `relative_position_index`), which is saved and loaded but never trained, averaged or decayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Param(usize),
    Buffer(usize),
}

/// Ordered parameters and buffers plus state-dict aliases.
#[derive(Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    buffers: Vec<Param>,
    /// State-dict keys in official order, each pointing at a parameter or a buffer.
    state_keys: Vec<(String, Slot)>,
    index: HashMap<String, Slot>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new parameter and returns a shallow handle sharing its storage.
    pub fn add(&mut self, name: impl Into<String>, tensor: Tensor, trainable: bool) -> Tensor {
        let name = name.into();
        assert!(
            !self.index.contains_key(&name),
            "parameter {name} registered twice"
        );
        let tensor = if trainable {
            tensor.set_requires_grad(true)
        } else {
            tensor
        };
        let handle = tensor.shallow_clone();
        let slot = Slot::Param(self.params.len());
        self.params.push(Param {
            name: name.clone(),
            tensor,
            trainable,
        });
        self.state_keys.push((name.clone(), slot));
        self.index.insert(name, slot);
        handle
    }

    /// Registers a buffer (`register_buffer`): part of the state dict, not of
    /// `named_parameters()`, never trainable.
    pub fn add_buffer(&mut self, name: impl Into<String>, tensor: Tensor) -> Tensor {
        let name = name.into();
        assert!(
            !self.index.contains_key(&name),
            "buffer {name} registered twice"
        );
        let handle = tensor.shallow_clone();
        let slot = Slot::Buffer(self.buffers.len());
        self.buffers.push(Param {
            name: name.clone(),
            tensor,
            trainable: false,
        });
        self.state_keys.push((name.clone(), slot));
        self.index.insert(name, slot);
        handle
    }

    /// `named_buffers()`.
    pub fn buffers(&self) -> &[Param] {
        &self.buffers
    }

    fn slot(&self, slot: Slot) -> &Param {
        match slot {
            Slot::Param(i) => &self.params[i],
            Slot::Buffer(i) => &self.buffers[i],
        }
    }

    /// Registers `alias` as a second state-dict key of the already registered `existing`.
    pub fn alias(&mut self, alias: impl Into<String>, existing: &str) {
        let alias = alias.into();
        let slot = *self
            .index
            .get(existing)
            .unwrap_or_else(|| panic!("alias target {existing} missing"));
        self.state_keys.push((alias.clone(), slot));
        self.index.insert(alias, slot);
    }

    /// `named_parameters()`: each tensor once, under its canonical name.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// `state_dict().keys()` with the tensor each refers to (shared tensors appear twice).
    pub fn state_dict(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.state_keys
            .iter()
            .map(move |(k, s)| (k.as_str(), &self.slot(*s).tensor))
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&s| &self.slot(s).tensor)
    }

    /// The canonical parameter (or buffer) behind a state-dict key.
    pub fn canonical(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&s| self.slot(s))
    }

    /// The parameter whose `named_parameters()` name is `name` (aliases and buffers do not
    /// count).
    pub fn named(&self, name: &str) -> Option<&Param> {
        match self.index.get(name) {
            Some(&Slot::Param(i)) => Some(&self.params[i]).filter(|p| p.name == name),
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn device(&self) -> Device {
        self.params
            .first()
            .map(|p| p.tensor.device())
            .unwrap_or(Device::Cpu)
    }

    /// Copies `value` into the parameter behind state-dict key `name`, checking its shape.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let Some(p) = self.canonical(name) else {
            bail!("unknown parameter '{name}'")
        };
        let want = p.tensor.size();
        let got = value.size();
        if want != got {
            bail!("parameter '{name}': expected shape {want:?}, the file has {got:?}");
        }
        tch::no_grad(|| {
            let mut t = p.tensor.shallow_clone();
            t.f_copy_(&value.to_kind(p.tensor.kind()).to_device(p.tensor.device()))
        })
        .with_context(|| format!("copying parameter '{name}'"))?;
        Ok(())
    }

    /// PyTorch's `load_state_dict(src, strict=False)`: visits `src` in its order and copies every
    /// key this store knows (so for a shared module the last of its names wins). Returns the
    /// `(missing, unexpected)` key lists.
    pub fn load_non_strict<'a>(
        &self,
        src: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut seen = std::collections::HashSet::new();
        let mut unexpected = Vec::new();
        for (k, v) in src {
            if self.contains(k) {
                self.set(k, v)?;
                seen.insert(k.to_string());
            } else {
                unexpected.push(k.to_string());
            }
        }
        let missing = self
            .state_keys
            .iter()
            .filter(|(k, _)| !seen.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        Ok((missing, unexpected))
    }

    /// Strict load: every state-dict key must be present with the right shape; extra keys are
    /// errors too. `prefix` is stripped from the source names (e.g. `"student."`).
    pub fn load_strict(&self, src: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        let mut missing = Vec::new();
        for (k, _) in &self.state_keys {
            match src.get(&format!("{prefix}{k}")) {
                Some(v) => self.set(k, v)?,
                None => missing.push(k.clone()),
            }
        }
        let unexpected: Vec<&String> = src
            .keys()
            .filter(|k| k.starts_with(prefix) && !self.contains(&k[prefix.len()..]))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            bail!(
                "weights do not match the model: {} missing key(s) {:?}{}, {} unexpected key(s) {:?}",
                missing.len(),
                &missing[..missing.len().min(8)],
                if missing.len() > 8 { " ..." } else { "" },
                unexpected.len(),
                &unexpected[..unexpected.len().min(8)]
            );
        }
        Ok(())
    }

    /// Loads a safetensors file saved under official names (optionally with a prefix).
    pub fn load_safetensors(&self, path: &Path, prefix: &str) -> Result<()> {
        let map = read_safetensors(path)?;
        self.load_strict(&map, prefix)
            .with_context(|| format!("loading {}", path.display()))
    }

    /// Writes the whole state dict (aliases included, as PyTorch's `state_dict()` does).
    pub fn save_safetensors(&self, path: &Path, prefix: &str) -> Result<()> {
        let named: Vec<(String, Tensor)> = self
            .state_dict()
            .map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone()))
            .collect();
        write_safetensors(path, &named, None)
    }
}

fn kind_from_dtype(d: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match d {
        D::F32 => Kind::Float,
        D::F64 => Kind::Double,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        other => bail!("unsupported tensor dtype {other:?}"),
    })
}

fn dtype_from_kind(k: Kind) -> Result<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Ok(match k {
        Kind::Float => D::F32,
        Kind::Double => D::F64,
        Kind::Half => D::F16,
        Kind::BFloat16 => D::BF16,
        Kind::Int64 => D::I64,
        Kind::Int => D::I32,
        Kind::Int16 => D::I16,
        Kind::Int8 => D::I8,
        Kind::Uint8 => D::U8,
        Kind::Bool => D::BOOL,
        other => bail!("cannot store tensors of kind {other:?}"),
    })
}

/// Metadata key under which [`write_safetensors`] stores a CRC-32 of every tensor's bytes (a
/// JSON object: tensor name → 8 hex digits), checked by [`read_safetensors`]. Distinct from the
/// keys the rest of the crate stores (`ibot`, `ibot_vit_config`, `ibot_linear`, `format`).
pub const CHECKSUM_KEY: &str = "ibot_tensor_crc32";

fn crc32_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(data))
}

/// Files already reported as carrying no checksums (the note is printed once per file).
static UNCHECKED_NOTED: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

fn note_unchecked(path: &Path) {
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let Ok(mut seen) = UNCHECKED_NOTED.lock() else {
        return;
    };
    if !seen.contains(&key) {
        eprintln!(
            "note: {} has no tensor checksums (written by an older ibot or another tool); its data is not verified",
            path.display()
        );
        seen.push(key);
    }
}

/// Checks every tensor of `st` against the checksums in its metadata (when it has them).
fn verify_checksums(path: &Path, st: &safetensors::SafeTensors<'_>, mmap: &[u8]) -> Result<()> {
    let shown = path.display();
    let (_, header) = safetensors::SafeTensors::read_metadata(mmap)
        .map_err(|e| anyhow::anyhow!("{shown} is not a valid safetensors file: {e}"))?;
    let Some(raw) = header.metadata().as_ref().and_then(|m| m.get(CHECKSUM_KEY)) else {
        note_unchecked(path);
        return Ok(());
    };
    let sums: HashMap<String, String> = serde_json::from_str(raw)
        .with_context(|| format!("{shown}: damaged header (the checksum table is not readable)"))?;
    for (name, view) in st.iter() {
        let Some(want) = sums.get(name) else {
            bail!("{shown}: tensor '{name}' has no checksum (damaged header?)");
        };
        let got = crc32_hex(view.data());
        if &got != want {
            bail!(
                "{shown} is damaged: the data of tensor '{name}' does not match its checksum \
                 (stored {want}, computed {got}); restore the file from a copy"
            );
        }
    }
    if let Some(missing) = sums.keys().find(|k| st.tensor(k).is_err()) {
        bail!("{shown} is damaged: tensor '{missing}' is listed in the checksums but missing");
    }
    Ok(())
}

/// The `__metadata__` strings of a safetensors file, reading only its header. The header must
/// parse and the file must be exactly as long as the header says (a truncated or extended file
/// is an error naming the file).
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let shown = path.display();
    let bad = |why: String| {
        anyhow::anyhow!("{shown} is not a valid safetensors file (truncated or corrupt?): {why}")
    };
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {shown}"))?;
    let file_len = f
        .metadata()
        .with_context(|| format!("reading {shown}"))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("no header ({e})")))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || n + 8 > file_len {
        return Err(bad(format!(
            "header length {n} does not fit a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("short header ({e})")))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON ({e})")))?;
    let mut data_end = 0u64;
    let mut metadata = HashMap::new();
    for (k, v) in &json {
        if k == "__metadata__" {
            let m = v
                .as_object()
                .ok_or_else(|| bad("__metadata__ is not an object".into()))?;
            for (mk, mv) in m {
                let s = mv
                    .as_str()
                    .ok_or_else(|| bad(format!("metadata '{mk}' is not a string")))?;
                if mk != CHECKSUM_KEY {
                    metadata.insert(mk.clone(), s.to_string());
                }
            }
            continue;
        }
        let end = v
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad(format!("tensor '{k}' has no data_offsets")))?;
        data_end = data_end.max(end);
    }
    if 8 + n + data_end != file_len {
        return Err(bad(format!(
            "the header describes {} bytes, the file has {file_len}",
            8 + n + data_end
        )));
    }
    Ok(metadata)
}

/// Reads every tensor of a safetensors file onto the CPU. A truncated or corrupt file is an
/// error naming the file, never a panic; a tensor whose bytes do not match the checksum stored
/// by [`write_safetensors`] is an error naming the tensor (files without checksums load, with
/// a note on stderr once per file).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the map is read-only and dropped before returning; tensors are copied out of it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    verify_checksums(path, &st, &mmap)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_from_dtype(view.dtype())
            .with_context(|| format!("tensor '{name}' in {}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("tensor '{name}' in {}", path.display()))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes tensors to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A failure (full disk, interruption) leaves any previous file at `path` untouched. A CRC-32 of
/// every tensor goes into the metadata under [`CHECKSUM_KEY`].
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    struct Owned {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &Owned {
        fn dtype(&self) -> safetensors::Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_from_kind(t.kind()).with_context(|| format!("tensor '{name}'"))?;
        let numel = t.numel();
        let nbytes = numel * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; nbytes];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), Owned { dtype, shape, data }));
    }
    let mut metadata = metadata.unwrap_or_default();
    if metadata.contains_key(CHECKSUM_KEY) {
        bail!("metadata key '{CHECKSUM_KEY}' is reserved for the tensor checksums");
    }
    let sums: std::collections::BTreeMap<&str, String> = owned
        .iter()
        .map(|(n, o)| (n.as_str(), crc32_hex(&o.data)))
        .collect();
    metadata.insert(CHECKSUM_KEY.to_string(), serde_json::to_string(&sums)?);
    let metadata = Some(metadata);
    let views: Vec<(&str, &Owned)> = owned.iter().map(|(n, o)| (n.as_str(), o)).collect();
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    crate::util::atomic_write(path, &bytes)
}
