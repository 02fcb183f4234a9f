//! NCCL (through cudarc, loaded at run time) for summing the expert shards' partial outputs when
//! the shards are CUDA devices of one process.
//!
//! cudarc's loader looks for `libnccl.so` or `libnccl.so.<CUDA major>`, while the PyPI
//! `nvidia-nccl` wheel that libtorch itself depends on ships only `libnccl.so.2`. [`link_dir`]
//! finds that library (already mapped into this process by libtorch_cuda, or named by
//! `MLASERVE_NCCL_LIBRARY`) and makes a directory with a `libnccl.so` link to it; the binary puts
//! that directory on `LD_LIBRARY_PATH` and re-executes itself before anything touches NCCL.

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

fn nccl_err(what: &str, e: result::NcclError) -> ModelError {
    ModelError::Nccl(format!("{what}: {:?}", e.0))
}

/// Whether cudarc can open NCCL now (no panic: cudarc's own loader panics when it cannot).
pub fn loadable() -> bool {
    // SAFETY: only tries dlopen on cudarc's candidate names.
    unsafe { sys::is_culib_present() }
}

/// NCCL's version as "major.minor.patch"; errors instead of panicking when it cannot be opened.
pub fn version() -> Result<String> {
    if !loadable() {
        return Err(ModelError::Nccl("libnccl cannot be opened (see MLASERVE_NCCL_LIBRARY)".into()));
    }
    let v = result::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))?;
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// The NCCL library file to use: `MLASERVE_NCCL_LIBRARY`, else the `libnccl.so*` this process
/// already has mapped (libtorch_cuda links it), else the wheel's place beside libtorch.
pub fn find_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MLASERVE_NCCL_LIBRARY") {
        return Some(PathBuf::from(p));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    if let Some(p) = mapped_library(&maps, "libnccl.so") {
        return Some(p);
    }
    let torch_lib = mapped_library(&maps, "libtorch_cpu.so")?;
    let beside = torch_lib.parent()?.join("../../nvidia/nccl/lib/libnccl.so.2");
    beside.exists().then_some(beside)
}

/// The path of a mapped shared library whose file name starts with `stem`, from `/proc/*/maps`
/// text (path is the sixth column).
fn mapped_library(maps: &str, stem: &str) -> Option<PathBuf> {
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(PathBuf::from).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == stem || n.starts_with(&format!("{stem}.")))
    })
}

/// A directory holding `libnccl.so` -> `library`, for `LD_LIBRARY_PATH`; made once per library.
pub fn link_dir(library: &Path, base: &Path) -> Result<PathBuf> {
    let target = library
        .canonicalize()
        .map_err(|e| ModelError::Io { path: library.display().to_string(), source: e })?;
    let io = |e: std::io::Error| ModelError::Io { path: base.display().to_string(), source: e };
    // One directory per target so that two installs never share a stale link.
    let tag = target
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let dir = base.join(format!("mlaserve-nccl-{tag:016x}"));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let _ = std::fs::remove_file(&link);
        // Another process may win the race to create it; that link is equally good.
        if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
            if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                return Err(io(e));
            }
        }
    }
    Ok(dir)
}

/// One NCCL communicator per expert-shard device, created together (single process, many
/// devices). Used only from the stage's compute thread.
pub struct Comms {
    comms: Vec<sys::ncclComm_t>,
    devices: Vec<Device>,
}

// SAFETY: communicators are plain handles; the stage drives them from one thread at a time (the
// compute thread owns the model), which is all NCCL asks of a communicator.
unsafe impl Send for Comms {}
unsafe impl Sync for Comms {}

impl Comms {
    /// Communicators over `devices` (all CUDA).
    pub fn new(devices: &[Device]) -> Result<Comms> {
        let ids: Vec<i32> = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(i) => Ok(*i as i32),
                other => Err(ModelError::Nccl(format!("NCCL shards must be CUDA devices, got {other:?}"))),
            })
            .collect::<Result<_>>()?;
        if !loadable() {
            return Err(ModelError::Nccl("libnccl cannot be opened (see MLASERVE_NCCL_LIBRARY)".into()));
        }
        let mut comms = vec![std::ptr::null_mut(); ids.len()];
        // SAFETY: `comms` has room for one handle per listed device.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), ids.len() as i32, ids.as_ptr()) }
            .map_err(|e| nccl_err("ncclCommInitAll", e))?;
        Ok(Comms { comms, devices: devices.to_vec() })
    }

    /// Sums `partials[i]` (each on `devices[i]`, same shape and dtype) into `partials[root]`,
    /// which it returns. Enqueued on each device's default stream, the stream libtorch uses, so
    /// later tensor operations see the result without an explicit synchronisation.
    pub fn reduce(&self, mut partials: Vec<Tensor>, root: usize) -> Result<Tensor> {
        if partials.len() != self.comms.len() || root >= partials.len() {
            return Err(ModelError::Nccl(format!(
                "{} partials for {} communicators (root {root})",
                partials.len(),
                self.comms.len()
            )));
        }
        let dtype = match partials[root].kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            Kind::Double => sys::ncclDataType_t::ncclFloat64,
            k => return Err(ModelError::Nccl(format!("no NCCL type for {k:?}"))),
        };
        let (shape, kind) = (partials[root].size(), partials[root].kind());
        for (p, d) in partials.iter_mut().zip(&self.devices) {
            if p.size() != shape || p.kind() != kind || p.device() != *d {
                return Err(ModelError::Nccl(format!(
                    "partial {:?} {:?} on {:?}, expected {shape:?} {kind:?} on {d:?}",
                    p.size(),
                    p.kind(),
                    p.device()
                )));
            }
            *p = p.contiguous();
        }
        let count = partials[root].numel();
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        for (i, (p, &comm)) in partials.iter().zip(&self.comms).enumerate() {
            let ptr = p.data_ptr();
            // SAFETY: each buffer is a live contiguous tensor of `count` elements on the
            // communicator's device; in-place reduce (send == recv) is allowed by NCCL.
            let r = unsafe {
                result::reduce(
                    ptr as *const c_void,
                    ptr,
                    count,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    root as i32,
                    comm,
                    std::ptr::null_mut(),
                )
            };
            if let Err(e) = r {
                let _ = result::group_end();
                return Err(nccl_err(&format!("ncclReduce (rank {i})"), e));
            }
        }
        result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        Ok(partials.swap_remove(root))
    }
}

impl Drop for Comms {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: created by ncclCommInitAll and destroyed once.
            let _ = unsafe { result::comm_destroy(c) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mapped_library_by_stem() {
        let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/libc.so.6\n\
                    7f02-7f03 r-xp 00000000 08:01 2 /venv/nvidia/nccl/lib/libnccl.so.2\n\
                    7f04-7f05 rw-p 00000000 00:00 0\n";
        assert_eq!(
            mapped_library(maps, "libnccl.so"),
            Some(PathBuf::from("/venv/nvidia/nccl/lib/libnccl.so.2"))
        );
        assert_eq!(mapped_library(maps, "libcudart.so"), None);
        // A name that merely starts with the stem's letters is not the library.
        assert_eq!(mapped_library("1-2 r 0 0 0 /x/libnccl.sox\n", "libnccl.so"), None);
    }

    #[test]
    fn link_dir_points_libnccl_so_at_the_library() {
        let base = std::env::temp_dir().join(format!("mlaserve-nccl-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let lib = base.join("libnccl.so.2");
        std::fs::write(&lib, b"not really a library").unwrap();
        let dir = link_dir(&lib, &base).unwrap();
        let link = dir.join("libnccl.so");
        assert_eq!(std::fs::read_link(&link).unwrap(), lib.canonicalize().unwrap());
        // Idempotent: a second call keeps the same directory and link.
        assert_eq!(link_dir(&lib, &base).unwrap(), dir);
        assert_eq!(std::fs::read(&link).unwrap(), b"not really a library");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
