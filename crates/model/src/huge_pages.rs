//! CPU weights and latent cache in memory backed by transparent huge pages.
//!
//! A decode step streams every active weight once. In 4 KiB pages that read crosses a page every
//! 4 KiB, where the hardware prefetchers stop and the TLB misses (a 200 MB step touches ~50,000
//! pages); in 2 MiB pages it crosses one every 2 MiB. On the Zen 4 VM of docs/PERFORMANCE.md a
//! plain two-thread read loop ran 1.27-1.45x faster from huge pages, and lm_head alone moved to them
//! made a batch-1 step 1.05x faster (in-process A/B).
//!
//! libtorch's allocator asks for huge pages only under `THP_MEM_ALLOC_ENABLE`, and then only for
//! allocations of 2 MiB or more, which leaves out most attention matrices and every shared expert
//! of the benchmark shape. So each layer's weights are packed here into one allocation instead,
//! back to back in the order a step reads them, starting on a 2 MiB boundary and advised
//! `MADV_HUGEPAGE`: that takes effect where transparent huge pages are `always` or `madvise` (the
//! usual defaults). Elsewhere (`never`, other systems) the packing happens and the pages stay small.
//! `MLASERVE_HUGE_PAGES=0` turns the packing off (for comparisons).

use tch::{Device, Kind, Tensor};

const HUGE_PAGE: usize = 2 << 20;
/// Offset alignment of each packed tensor: a cache line, so the kernels' rows start on one.
const ALIGN: usize = 64;

/// Whether weights and cache are packed into huge-page memory (on unless `MLASERVE_HUGE_PAGES=0`).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MLASERVE_HUGE_PAGES").map_or(true, |v| v != "0"))
}

/// An uninitialised `[bytes]` u8 CPU tensor whose data starts on a 2 MiB boundary, its whole
/// 2 MiB pages advised for huge pages.
fn huge_bytes(bytes: usize) -> Tensor {
    let raw = Tensor::empty([(bytes + 2 * HUGE_PAGE) as i64], (Kind::Uint8, Device::Cpu));
    let p = raw.data_ptr() as usize;
    let off = p.next_multiple_of(HUGE_PAGE) - p;
    advise_huge(p + off, bytes.next_multiple_of(HUGE_PAGE));
    raw.narrow(0, off as i64, bytes as i64)
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) lies inside an allocation this module made and owns (the raw
    // tensor above: `off < 2 MiB` and `len < bytes + 2 MiB`, so `off + len < bytes + 4 MiB`, its
    // size), page-aligned; MADV_HUGEPAGE changes how it is
    // backed, not its contents. A failure (THP compiled out) leaves small pages: nothing to handle.
    unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_addr: usize, _len: usize) {}

/// Moves the contiguous CPU tensors among `ts` into one huge-page allocation, in the given order,
/// each on a 64-byte boundary, values (bytes) unchanged; each `*t` becomes a view of it. Others
/// are left where they are. Returns the bytes packed.
pub(crate) fn pack(ts: Vec<&mut Tensor>) -> usize {
    if !enabled() {
        return 0;
    }
    let mut ts: Vec<&mut Tensor> =
        ts.into_iter().filter(|t| t.device() == Device::Cpu && t.is_contiguous() && t.numel() > 0).collect();
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let total: usize = ts.iter().map(|t| bytes(t).next_multiple_of(ALIGN)).sum();
    if total == 0 {
        return 0;
    }
    let arena = huge_bytes(total);
    let mut off = 0;
    for t in ts.iter_mut() {
        let n = bytes(t);
        let mut dst = arena.narrow(0, off as i64, n as i64);
        // As bytes: the same codes whatever the kind (FP8 included).
        dst.copy_(&t.view_dtype(Kind::Uint8).reshape([-1]));
        **t = dst.view_dtype(t.kind()).view(t.size().as_slice());
        off += n.next_multiple_of(ALIGN);
    }
    total
}

/// A zeroed CPU tensor of `size` and `kind` in huge-page memory (the latent cache: decode reads
/// its blocks all over it); elsewhere, or with packing off, a plain `Tensor::zeros`.
pub(crate) fn zeros(size: &[i64], kind: Kind, device: Device) -> Tensor {
    if device != Device::Cpu || !enabled() {
        return Tensor::zeros(size, (kind, device));
    }
    let n = size.iter().product::<i64>().max(0) as usize * kind.elt_size_in_bytes();
    if n == 0 {
        return Tensor::zeros(size, (kind, device));
    }
    let mut t = huge_bytes(n);
    let _ = t.zero_();
    t.view_dtype(kind).view(size)
}

/// The transparent-huge-page mode (`always`, `madvise`, `never`) and the process's anonymous
/// huge-page bytes, for the load log; None where the kernel does not say.
pub(crate) fn report() -> Option<(String, u64)> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let mode = mode.split_whitespace().find(|w| w.starts_with('['))?.trim_matches(['[', ']']).to_string();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let kb: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((mode, kb * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_bytes_unchanged_back_to_back_from_a_huge_page_boundary() {
        let _g = tch::no_grad_guard();
        let f = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([7, 9], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let q = Tensor::randint(256, [4, 33], (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Uint8)
            .view_dtype(Kind::Float8e4m3fn);
        let strided = Tensor::randn([4, 6], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let before: Vec<Tensor> = [&f, &b, &q].iter().map(|t| t.view_dtype(Kind::Uint8).copy()).collect();
        let (mut f2, mut b2, mut q2, mut s2) =
            (f.shallow_clone(), b.shallow_clone(), q.shallow_clone(), strided.shallow_clone());
        let packed = pack(vec![&mut f2, &mut b2, &mut q2, &mut s2]);
        if !enabled() {
            return;
        }
        assert_eq!(packed, 64 + 128 + 192);
        let ptr = |t: &Tensor| t.data_ptr() as usize;
        assert_eq!(ptr(&f2) % HUGE_PAGE, 0, "the first starts a huge page");
        assert_eq!(ptr(&b2), ptr(&f2) + 64, "15 f32 = 60 bytes, then the next cache line");
        assert_eq!(ptr(&q2), ptr(&b2) + 128, "63 bf16 = 126 bytes, then the next cache line");
        for (t, was) in [&f2, &b2, &q2].iter().zip(&before) {
            assert!(t.view_dtype(Kind::Uint8).equal(was), "bytes unchanged");
        }
        assert_eq!((f2.size(), b2.kind(), q2.kind()), (vec![3, 5], Kind::BFloat16, Kind::Float8e4m3fn));
        assert_eq!(ptr(&s2), ptr(&strided), "a strided view stays where it was");
    }

    #[test]
    fn zeros_are_zero_of_the_asked_shape() {
        let t = zeros(&[5, 576], Kind::BFloat16, Device::Cpu);
        assert_eq!((t.size(), t.kind()), (vec![5, 576], Kind::BFloat16));
        assert!(t.is_contiguous());
        assert_eq!(t.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(zeros(&[0, 4], Kind::Float, Device::Cpu).numel(), 0);
    }
}
