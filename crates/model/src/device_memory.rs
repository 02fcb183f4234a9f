//! Free and total memory of a CUDA device (driver API through cudarc, loaded at run time), for
//! sizing a stage's latent cache from what its weights left free.

/// (free, total) bytes of device `ordinal`.
pub fn cuda_mem_info(ordinal: usize) -> Result<(u64, u64), String> {
    let ctx =
        cudarc::driver::CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
    let (free, total) = ctx.mem_get_info().map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
    Ok((free as u64, total as u64))
}
