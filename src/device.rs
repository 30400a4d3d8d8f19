//! Device selection (`--device`): which libtorch device a command runs on.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// `--device`: `auto` (a GPU when libtorch sees one), `cpu`, `cuda` (the first GPU, or the
/// rank's in a data-parallel run) or `cuda:N`. Stored as that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
    CudaIndex(usize),
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda => f.write_str("cuda"),
            DeviceChoice::CudaIndex(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda,
            s if s.starts_with("cuda:") => DeviceChoice::CudaIndex(
                s[5..]
                    .parse()
                    .with_context(|| format!("bad device '{s}'"))?,
            ),
            other => bail!("unknown device '{other}' (cpu, cuda, cuda:N or auto)"),
        })
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl DeviceChoice {
    /// The libtorch device: `auto` is the first GPU when libtorch sees one; a named GPU must
    /// exist.
    pub fn select(self) -> Result<Device> {
        if self != DeviceChoice::Cpu {
            load_cuda_runtime();
        }
        Ok(match self {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => {
                ensure!(
                    tch::Cuda::is_available(),
                    "--device cuda: no CUDA device is available"
                );
                Device::Cuda(0)
            }
            DeviceChoice::CudaIndex(i) => {
                ensure!(
                    i < tch::Cuda::device_count() as usize,
                    "--device cuda:{i}: only {} CUDA device(s)",
                    tch::Cuda::device_count()
                );
                Device::Cuda(i)
            }
        })
    }

    /// The device of a process with local rank `local_rank` of a data-parallel run: with
    /// `auto` or `cuda`, the GPU named by LOCAL_RANK (as the official
    /// `torch.cuda.set_device(args.gpu)`); otherwise [`DeviceChoice::select`].
    pub fn select_for_rank(self, local_rank: Option<usize>) -> Result<Device> {
        let device = self.select()?;
        Ok(match (device, local_rank) {
            (Device::Cuda(_), Some(r))
                if matches!(self, DeviceChoice::Auto | DeviceChoice::Cuda) =>
            {
                let n = tch::Cuda::device_count() as usize;
                ensure!(
                    r < n,
                    "LOCAL_RANK {r} but only {n} CUDA device(s) on this node"
                );
                Device::Cuda(r)
            }
            _ => device,
        })
    }
}

/// Picks the device named by `name` (`--device` text): see [`DeviceChoice`].
pub fn select_device(name: &str) -> Result<Device> {
    name.parse::<DeviceChoice>()?.select()
}

/// Makes libtorch's CUDA backend available when this machine may have an NVIDIA GPU (or when
/// IBOT_LOAD_CUDA=1 asks for it). Its kernels live in libtorch_cuda.so, which the linker drops
/// from a binary that never calls into it by name; loading it registers CUDA with libtorch, as
/// `import torch` does. CPU-only machines never pay for loading it (about 0.1 s and 400 MB).
fn load_cuda_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let gpu_here =
            Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia").exists();
        let asked = std::env::var("IBOT_LOAD_CUDA").is_ok_and(|v| v == "1");
        if !gpu_here && !asked {
            return;
        }
        // Found through the binary's RUNPATH (build.rs puts libtorch's directory there).
        // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process's life.
        let handle = unsafe {
            libc::dlopen(
                c"libtorch_cuda.so".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message or null.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown error".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            eprintln!(
                "note: libtorch's CUDA backend could not be loaded ({why}); running on the CPU"
            );
        }
    });
}
