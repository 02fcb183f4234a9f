//! Process-level CUDA set-up of a worker, done before anything touches NCCL.

/// Set when this process is the re-executed one, so a library that still fails cannot loop.
#[cfg(feature = "cuda")]
const REEXEC: &str = "MLASERVE_NCCL_REEXEC";

/// Makes NCCL loadable for `expert_shards` CUDA shards and returns its version (None with one
/// shard, which needs no NCCL). cudarc only opens `libnccl.so`/`libnccl.so.<CUDA major>` while the
/// wheel ships `libnccl.so.2`: when that fails, link it under a temp directory, put that on
/// `LD_LIBRARY_PATH` (read by the loader only at start) and re-execute this process.
#[cfg(feature = "cuda")]
pub fn prepare(expert_shards: usize) -> anyhow::Result<Option<String>> {
    use mlaserve_model::nccl;
    use std::os::unix::process::CommandExt;

    if expert_shards < 2 {
        return Ok(None);
    }
    if !nccl::loadable() {
        if std::env::var_os(REEXEC).is_some() {
            anyhow::bail!("NCCL cannot be opened even through {:?}", std::env::var_os("LD_LIBRARY_PATH"));
        }
        let lib = nccl::find_library().ok_or_else(|| {
            anyhow::anyhow!(
                "no libnccl found: install the nvidia-nccl wheel beside torch or set MLASERVE_NCCL_LIBRARY"
            )
        })?;
        let dir = nccl::link_dir(&lib, &std::env::temp_dir())?;
        let mut path = std::ffi::OsString::from(&dir);
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(old);
        }
        tracing::info!(library = %lib.display(), dir = %dir.display(), "re-executing with NCCL on LD_LIBRARY_PATH");
        let err = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env("LD_LIBRARY_PATH", path)
            .env(REEXEC, "1")
            .exec();
        return Err(anyhow::anyhow!("re-executing with NCCL on LD_LIBRARY_PATH: {err}"));
    }
    Ok(Some(nccl::version()?))
}

#[cfg(not(feature = "cuda"))]
pub fn prepare(_expert_shards: usize) -> anyhow::Result<Option<String>> {
    anyhow::bail!("--device cuda needs a binary built with `--features cuda`; this one is CPU-only")
}
