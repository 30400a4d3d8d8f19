//! Data-parallel training over processes, GPUs and nodes on libtorch's own c10d.
//!
//! * [`DistEnv::detect`] reads the launcher's environment the way torch does: torchrun /
//!   `ibot launch` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//!   `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE`) or SLURM (`SLURM_PROCID`, `SLURM_NTASKS`,
//!   `SLURM_LOCALID`, the master from `MASTER_ADDR` or the first host of the node list), with
//!   `--dist_url env://` or `tcp://host:port` as the official `init_distributed_mode`.
//! * [`ProcessGroup`] is c10d's TCPStore + ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL
//!   (CUDA tensors) behind the small C++ shim `csrc/dist.cpp`; every collective has a timeout
//!   and C++ exceptions come back as errors (a dead peer is "Connection closed by peer").
//! * [`Comm`] is what training needs from it; [`SingleProcess`] is the no-op world of one, so a
//!   run without a distributed environment creates no store and pays nothing.

pub mod launch;
mod world;

pub use world::{join_world, DistConfig};

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::params::ParamStore;

mod ffi {
    use std::ffi::{c_char, c_int, c_longlong, c_void};
    extern "C" {
        pub fn ibot_dist_has_gloo() -> c_int;
        pub fn ibot_dist_has_nccl() -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn ibot_dist_init(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            size: c_int,
            agent_store: c_int,
            prefix: *const c_char,
            timeout_ms: c_longlong,
            nccl: c_int,
            device: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn ibot_dist_free(g: *mut c_void);
        pub fn ibot_dist_free_error(s: *mut c_char);
        pub fn ibot_dist_all_reduce(
            g: *mut c_void,
            t: *mut c_void,
            op: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ibot_dist_broadcast(
            g: *mut c_void,
            t: *mut c_void,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ibot_dist_all_gather(
            g: *mut c_void,
            out: *mut c_void,
            input: *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn ibot_dist_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
    }
}

/// torch's default collective timeout (`default_pg_timeout`, 30 minutes).
pub const DEFAULT_TIMEOUT_SECS: u64 = 1800;

/// Where this process sits in a data-parallel run, as the launcher described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Every rank is a client of a store the launcher hosts (torchrun's agent store).
    pub agent_store: bool,
    /// Restart attempt of an elastic launcher (namespaces the store keys).
    pub restart: u32,
    /// Who launched us, for messages.
    pub launcher: &'static str,
}

fn env_var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name).filter(|v| !v.trim().is_empty())
}

fn parse_env<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>> {
    match env_var(get, name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| anyhow!("environment variable {name}={v:?} is not a valid number")),
    }
}

/// The first host of a SLURM node list such as `gpu[03-05,9],cpu1` (`gpu03`), as
/// `scontrol show hostnames | head -n1` prints it.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    let mut depth = 0;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let first = &list[..end];
    match first.find('[') {
        None => (!first.is_empty()).then(|| first.to_string()),
        Some(open) => {
            let prefix = &first[..open];
            let inner = first[open + 1..].trim_end_matches(|c| c != ']');
            let inner = inner.strip_suffix(']')?;
            let range = inner.split(',').next()?;
            let lo = range.split('-').next()?;
            let rest = first[open..].find(']').map(|j| &first[open + j + 1..])?;
            Some(format!("{prefix}{lo}{rest}"))
        }
    }
}

/// `tcp://host:port` → (host, port); `env://` → None.
pub fn parse_dist_url(url: &str) -> Result<Option<(String, u16)>> {
    if url == "env://" || url.is_empty() {
        return Ok(None);
    }
    let Some(rest) = url.strip_prefix("tcp://") else {
        bail!("--dist_url {url:?}: use env:// (addresses from MASTER_ADDR/MASTER_PORT) or tcp://HOST:PORT")
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("--dist_url {url:?} has no port (tcp://HOST:PORT)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ensure!(!host.is_empty(), "--dist_url {url:?} has no host");
    let port: u16 = port.parse().map_err(|_| {
        anyhow!("--dist_url {url:?}: port {port:?} is not a number from 0 to 65535")
    })?;
    Ok(Some((host.to_string(), port)))
}

impl DistEnv {
    /// Reads the process environment. None: not launched for data parallelism (or a world of
    /// one), so training runs as a plain single process.
    pub fn detect(dist_url: &str) -> Result<Option<Self>> {
        Self::detect_with(dist_url, &|k| std::env::var(k).ok())
    }

    /// [`DistEnv::detect`] over any variable lookup (for tests).
    pub fn detect_with(
        dist_url: &str,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        let url = parse_dist_url(dist_url)?;
        let launched = env_var(get, "IBOT_LAUNCHED").is_some();
        let (rank, world, local_rank, local_world, launcher) =
            if let Some(rank) = parse_env::<usize>(get, "RANK")? {
                let world = parse_env::<usize>(get, "WORLD_SIZE")?.context(
                "RANK is set but WORLD_SIZE is not: launch with torchrun, srun or `ibot launch`, \
                     or set both",
            )?;
                let local_rank = parse_env::<usize>(get, "LOCAL_RANK")?.unwrap_or(rank);
                let local_world = parse_env::<usize>(get, "LOCAL_WORLD_SIZE")?.unwrap_or(world);
                let who = if launched {
                    "ibot launch"
                } else if env_var(get, "TORCHELASTIC_RUN_ID").is_some() {
                    "torchrun"
                } else {
                    "the environment (RANK/WORLD_SIZE)"
                };
                (rank, world, local_rank, local_world, who)
            } else if let Some(rank) = parse_env::<usize>(get, "SLURM_PROCID")? {
                let world = parse_env::<usize>(get, "SLURM_NTASKS")?
                    .context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
                let local_rank = parse_env::<usize>(get, "SLURM_LOCALID")?.unwrap_or(0);
                // "2(x3),1" → 2: the tasks on the first nodes; only used for thread counts.
                let local_world = env_var(get, "SLURM_NTASKS_PER_NODE")
                    .or_else(|| env_var(get, "SLURM_TASKS_PER_NODE"))
                    .and_then(|v| {
                        v.chars()
                            .take_while(|c| c.is_ascii_digit())
                            .collect::<String>()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(1)
                    .max(local_rank + 1);
                (rank, world, local_rank, local_world, "SLURM")
            } else {
                return Ok(None);
            };
        ensure!(world >= 1, "WORLD_SIZE must be at least 1");
        ensure!(
            rank < world,
            "rank {rank} is not below the world size {world} (launched by {launcher})"
        );
        ensure!(
            local_world >= 1 && local_rank < local_world,
            "LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_world} (launched by {launcher})"
        );
        if world == 1 {
            return Ok(None);
        }
        let (master_addr, master_port) = match url {
            Some((h, p)) => (h, p),
            None => {
                let addr = match env_var(get, "MASTER_ADDR") {
                    Some(a) => a,
                    None if launcher == "SLURM" => env_var(get, "SLURM_JOB_NODELIST")
                        .or_else(|| env_var(get, "SLURM_NODELIST"))
                        .and_then(|l| first_slurm_host(&l))
                        .context(
                            "SLURM run: neither MASTER_ADDR nor a readable SLURM_JOB_NODELIST names \
                             the master node; export MASTER_ADDR or pass --dist_url tcp://HOST:PORT",
                        )?,
                    None => bail!(
                        "MASTER_ADDR is not set (launched by {launcher}): export MASTER_ADDR and \
                         MASTER_PORT, or pass --dist_url tcp://HOST:PORT"
                    ),
                };
                let port = match env_var(get, "MASTER_PORT") {
                    Some(p) => p.trim().parse::<u16>().map_err(|_| {
                        anyhow!("MASTER_PORT={p:?} is not a port number (0 to 65535)")
                    })?,
                    None if launcher == "SLURM" => 29500,
                    None => bail!("MASTER_PORT is not set (launched by {launcher})"),
                };
                (addr, port)
            }
        };
        let agent_store = env_var(get, "TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let restart = parse_env::<u32>(get, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        Ok(Some(Self {
            rank,
            world_size: world,
            local_rank,
            local_world_size: local_world,
            master_addr,
            master_port,
            agent_store,
            restart,
            launcher,
        }))
    }
}

/// What data-parallel training needs from the other processes. World size 1: every call is a
/// no-op ([`SingleProcess`]).
pub trait Comm {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum over ranks.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// In-place maximum over ranks.
    fn all_reduce_max(&self, t: &mut Tensor) -> Result<()>;
    /// In-place copy of `root`'s tensor to every rank.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Every rank's `t` (same shape everywhere) concatenated along dimension 0, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Waits until every rank has reached it.
    fn barrier(&self) -> Result<()>;
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// Device of the tensors the collectives take (CUDA for NCCL groups).
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// The world of one process.
pub struct SingleProcess;

impl Comm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// 1 when this build can make Gloo groups (CPU), as decided by build.rs.
pub fn has_gloo() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { ffi::ibot_dist_has_gloo() != 0 }
}

/// 1 when this build can make NCCL groups (CUDA).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { ffi::ibot_dist_has_nccl() != 0 }
}

/// A c10d process group (TCPStore + Gloo or NCCL).
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    device: Device,
    what: String,
}

fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error in c10d".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string, freed right after copying.
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::ibot_dist_free_error(err) };
    s
}

impl ProcessGroup {
    /// Joins the group described by `env`: rank 0 hosts the TCPStore at MASTER_ADDR:MASTER_PORT
    /// (unless the launcher hosts one), then Gloo (CPU) or NCCL (`Device::Cuda`) connects the
    /// ranks. Every collective fails after `timeout` instead of hanging.
    pub fn new(env: &DistEnv, timeout: Duration, device: Device) -> Result<Self> {
        let nccl = matches!(device, Device::Cuda(_));
        let dev_index = match device {
            Device::Cuda(i) => i as c_int,
            _ => 0,
        };
        let host = CString::new(env.master_addr.as_str())
            .map_err(|_| anyhow!("MASTER_ADDR contains a NUL byte"))?;
        let prefix = CString::new(format!("ibot/{}/", env.restart)).expect("no NUL in prefix");
        let world = c_int::try_from(env.world_size).context("world size too large")?;
        let rank = c_int::try_from(env.rank).context("rank too large")?;
        let ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid C strings that outlive the call; `err` receives an owned string.
        let raw = unsafe {
            ffi::ibot_dist_init(
                host.as_ptr(),
                env.master_port as c_int,
                rank,
                world,
                env.agent_store as c_int,
                prefix.as_ptr(),
                ms,
                nccl as c_int,
                dev_index,
                &mut err,
            )
        };
        if raw.is_null() {
            bail!(
                "could not join the process group as rank {} of {} at {}:{} ({}): {}",
                env.rank,
                env.world_size,
                env.master_addr,
                env.master_port,
                if env.agent_store {
                    "store hosted by the launcher"
                } else if env.rank == 0 {
                    "this rank hosts the store"
                } else {
                    "store hosted by rank 0"
                },
                take_error(err)
            );
        }
        Ok(Self {
            raw,
            rank: env.rank,
            world_size: env.world_size,
            device,
            what: format!(
                "{} over {} processes",
                if nccl { "NCCL" } else { "Gloo" },
                env.world_size
            ),
        })
    }

    /// "Gloo over 4 processes".
    pub fn describe(&self) -> &str {
        &self.what
    }

    fn check(&self, rc: c_int, err: *mut c_char, op: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        bail!(
            "{op} failed on rank {} of {}: {} (another rank probably stopped; its own error says why)",
            self.rank,
            self.world_size,
            take_error(err)
        )
    }

    /// The tensor collectives run on: on this group's device, contiguous, without autograd
    /// history (c10d writes into its storage from its own threads).
    fn operand(&self, t: &Tensor) -> Result<Tensor> {
        ensure!(
            t.device() == self.device,
            "collective on a {:?} tensor in a {} group",
            t.device(),
            self.what
        );
        ensure!(t.is_contiguous(), "collectives need contiguous tensors");
        Ok(t.detach())
    }

    fn reduce(&self, t: &mut Tensor, op: c_int, name: &str) -> Result<()> {
        let mut d = self.operand(t)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: `d` is a live at::Tensor owned by tch for the duration of the call.
        let rc = unsafe {
            ffi::ibot_dist_all_reduce(self.raw, d.as_mut_ptr() as *mut c_void, op, &mut err)
        };
        self.check(rc, err, name)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ibot_dist_init and is freed once.
        unsafe { ffi::ibot_dist_free(self.raw) }
    }
}

impl Comm for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.reduce(t, 0, "all_reduce")
    }
    fn all_reduce_max(&self, t: &mut Tensor) -> Result<()> {
        self.reduce(t, 1, "all_reduce(max)")
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        ensure!(root < self.world_size, "broadcast root {root} out of range");
        let mut d = self.operand(t)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `reduce`.
        let rc = unsafe {
            ffi::ibot_dist_broadcast(
                self.raw,
                d.as_mut_ptr() as *mut c_void,
                root as c_int,
                &mut err,
            )
        };
        self.check(rc, err, "broadcast")
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mut input = self.operand(&t.contiguous())?;
        let mut shape = t.size();
        ensure!(!shape.is_empty(), "all_gather of a 0-d tensor");
        shape[0] *= self.world_size as i64;
        let mut out = Tensor::f_empty(&shape[..], (t.kind(), t.device()))?;
        let mut err = std::ptr::null_mut();
        // SAFETY: both tensors are live for the call; `out` is written in place.
        let rc = unsafe {
            ffi::ibot_dist_all_gather(
                self.raw,
                out.as_mut_ptr() as *mut c_void,
                input.as_mut_ptr() as *mut c_void,
                &mut err,
            )
        };
        self.check(rc, err, "all_gather")?;
        Ok(out)
    }
    fn device(&self) -> Device {
        self.device
    }
    fn barrier(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a plain call on the live group.
        let rc = unsafe { ffi::ibot_dist_barrier(self.raw, &mut err) };
        self.check(rc, err, "barrier")
    }
}

/// Bytes per gradient bucket (DDP's default `bucket_cap_mb`).
const BUCKET_BYTES: i64 = 25 << 20;

/// Averages the gradients over ranks, as DDP does after backward: the defined gradients are
/// packed into flat buckets of about 25 MiB, each summed over ranks in one all-reduce and
/// divided by the world size. Every rank must hold the same set of defined gradients (the same
/// model and step do).
pub fn average_gradients(comm: &dyn Comm, grads: &mut [Option<Tensor>]) -> Result<()> {
    let ws = comm.world_size();
    if ws == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let defined: Vec<&mut Tensor> = grads.iter_mut().filter_map(|g| g.as_mut()).collect();
    let mut buckets: Vec<Vec<&mut Tensor>> = Vec::new();
    let mut bytes = 0;
    for g in defined {
        let b = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
        let fits = buckets.last().is_some_and(|last: &Vec<&mut Tensor>| {
            last[0].kind() == g.kind() && bytes + b <= BUCKET_BYTES
        });
        if !fits {
            buckets.push(Vec::new());
            bytes = 0;
        }
        bytes += b;
        if let Some(last) = buckets.last_mut() {
            last.push(g);
        }
    }
    for bucket in buckets {
        let flat: Vec<Tensor> = bucket.iter().map(|g| g.reshape([-1])).collect();
        let mut flat = Tensor::f_cat(&flat, 0)?;
        comm.all_reduce_sum(&mut flat)?;
        let _ = flat.f_div_scalar_(ws as f64)?;
        let mut off = 0;
        for g in bucket {
            let n = g.numel() as i64;
            let src = flat.narrow(0, off, n).view_(g.size());
            g.f_copy_(&src)?;
            off += n;
        }
    }
    Ok(())
}

/// Copies rank 0's parameters into every rank (DDP's start-up broadcast), then checks that the
/// ranks agree on a checksum of every tensor.
pub fn broadcast_params(comm: &dyn Comm, ps: &ParamStore) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    for p in ps.params() {
        let mut t = p.tensor.shallow_clone();
        comm.broadcast(&mut t, 0)
            .with_context(|| format!("broadcasting {}", p.name))?;
    }
    let sums: Vec<Tensor> = ps
        .params()
        .iter()
        .map(|p| {
            p.tensor
                .detach()
                .to_kind(Kind::Double)
                .sum(Kind::Double)
                .reshape([1])
        })
        .collect();
    let mine = Tensor::f_cat(&sums, 0)?;
    let all = comm.all_gather(&mine)?.view([comm.world_size() as i64, -1]);
    let spread = (all.max_dim(0, false).0 - all.min_dim(0, false).0)
        .abs()
        .max()
        .double_value(&[]);
    ensure!(
        spread == 0.0,
        "ranks disagree on the model after the start-up broadcast (checksum spread {spread})"
    );
    Ok(())
}

/// Fails unless every rank passes the same `fingerprint` (e.g. a hash of the configuration),
/// naming the first rank that differs from rank 0.
pub fn check_same(comm: &dyn Comm, fingerprint: u64, what: &str) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    // Two 32-bit halves: exact in int64 whatever the sign.
    let mine = Tensor::from_slice(&[
        (fingerprint >> 32) as i64,
        (fingerprint & 0xFFFF_FFFF) as i64,
    ]);
    let all = Vec::<i64>::try_from(
        comm.all_gather(&mine.to_device(comm.device()))?
            .to_device(Device::Cpu),
    )?;
    for r in 1..comm.world_size() {
        if all[2 * r..2 * r + 2] != all[0..2] {
            bail!("rank {r} was started with different {what} than rank 0: every rank must get the same options");
        }
    }
    Ok(())
}

/// Fails unless every rank was started with the same `options` (a JSON object of the options
/// that must agree: paths, devices and threads left out by the caller), naming each option that
/// differs and its value on both ranks, e.g. `--lr: 0.005 on rank 0, 0.001 on rank 1`.
///
/// The usual case costs one all-gather of a 64-bit hash (as [`check_same`]); only when the hashes
/// differ are the options themselves gathered (every rank sees the same hashes, so every rank
/// takes the same branch and the collectives stay matched).
pub fn check_same_options(comm: &dyn Comm, options: &serde_json::Value, what: &str) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let text = options.to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mine = Tensor::from_slice(&[(h >> 32) as i64, (h & 0xFFFF_FFFF) as i64]);
    let hashes = Vec::<i64>::try_from(
        comm.all_gather(&mine.to_device(comm.device()))
            .with_context(|| format!("comparing the {what} of the ranks"))?
            .to_device(Device::Cpu),
    )?;
    let Some(r) = (1..comm.world_size()).find(|&r| hashes[2 * r..2 * r + 2] != hashes[0..2]) else {
        return Ok(());
    };
    // Someone differs: gather every rank's options (bytes as int64) and name the differences
    // between rank 0 and the first rank that differs.
    let bytes: Vec<i64> = text.bytes().map(i64::from).collect();
    let lens = all_gather_i64(comm, &[bytes.len() as i64])?;
    let all = all_gather_i64(comm, &bytes)?;
    let text_of = |k: usize| -> String {
        let start: i64 = lens[..k].iter().sum();
        let b: Vec<u8> = all[start as usize..(start + lens[k]) as usize]
            .iter()
            .map(|&b| b as u8)
            .collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&text_of(0)).unwrap_or_default(),
        serde_json::from_str(&text_of(r)).unwrap_or_default(),
    );
    let mut diffs = Vec::new();
    option_diff(&a, &b, "", &mut diffs);
    let named: Vec<String> = diffs
        .iter()
        .map(|(path, x, y)| {
            let name = if path.contains('.') {
                path.clone()
            } else {
                format!("--{path}")
            };
            format!("{name}: {x} on rank 0, {y} on rank {r}")
        })
        .collect();
    bail!(
        "rank {r} was started with different {what} than rank 0 ({}): every rank must get the \
         same options",
        if named.is_empty() {
            "the option files differ".to_string()
        } else {
            named.join("; ")
        }
    )
}

/// The leaves (`a.b.c`) where two JSON values differ, with both values.
fn option_diff(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: &str,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let null = Value::Null;
                option_diff(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &join(k),
                    out,
                );
            }
        }
        (x, y) if x != y => out.push((path.to_string(), x.to_string(), y.to_string())),
        _ => {}
    }
}

/// Variable-length all-gather of int64 values (e.g. per-rank predictions when some images were
/// skipped): every rank's list, in rank order.
pub fn all_gather_i64(comm: &dyn Comm, values: &[i64]) -> Result<Vec<i64>> {
    if comm.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let dev = comm.device();
    let n = Tensor::from_slice(&[values.len() as i64]).to_device(dev);
    let lens = Vec::<i64>::try_from(comm.all_gather(&n)?.to_device(Device::Cpu))?;
    let max = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut padded = values.to_vec();
    padded.resize(max as usize, 0);
    let all = Vec::<i64>::try_from(
        comm.all_gather(&Tensor::from_slice(&padded).to_device(dev))?
            .to_device(Device::Cpu),
    )?;
    let mut out = Vec::new();
    for (r, &len) in lens.iter().enumerate() {
        let start = r * max as usize;
        out.extend_from_slice(&all[start..start + len as usize]);
    }
    Ok(out)
}

/// This rank's share of `items`, as `DistributedSampler(shuffle=False)`: positions r, r + W,
/// r + 2W, … of the list padded to a multiple of W by wrapping around.
pub fn shard<T: Copy>(items: &[T], rank: usize, world_size: usize) -> Vec<T> {
    if world_size <= 1 || items.is_empty() {
        return items.to_vec();
    }
    let per = items.len().div_ceil(world_size);
    (0..per)
        .map(|k| items[(k * world_size + rank) % items.len()])
        .collect()
}

/// The inverse of [`shard`]: every rank's rows (`t` holds this rank's shard, one row per item)
/// gathered and put back in the order of the `n` original items, on every rank (on the CPU).
pub fn unshard(comm: &dyn Comm, t: &Tensor, n: usize) -> Result<Tensor> {
    let ws = comm.world_size();
    if ws == 1 {
        return Ok(t.shallow_clone());
    }
    let per = n.div_ceil(ws);
    ensure!(
        t.size().first() == Some(&(per as i64)),
        "shard of {:?} rows, expected {per}",
        t.size()
    );
    let all = comm
        .all_gather(&t.to_device(comm.device()))?
        .to_device(Device::Cpu);
    // Position p was computed by rank p % W as its (p / W)-th row.
    let order: Vec<i64> = (0..n).map(|p| ((p % ws) * per + p / ws) as i64).collect();
    Ok(all.f_index_select(0, &Tensor::from_slice(&order))?)
}
