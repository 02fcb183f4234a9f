//! CPU matrix products `y = x · Wᵀ` for the model's weights, parallel on a fork-join pool
//! ([`pool`]), with one kernel per instruction set ([`isa`]) chosen once at start-up.
//!
//! `W` is `[N, K]` row-major (the checkpoint layout) in f32, bf16 or block-scaled FP8 e4m3
//! ([`Weights`]); `x` is `[M, K]` f32 (and, where the activations are bf16, the same values as
//! bf16 for the `vdpbf16ps` path). Weights are widened in registers — bf16 by a 16-bit shift, FP8
//! through the f16 converter ([`fp8`]) with the block scale applied once per block of the
//! reduction — and accumulated in f32; each loaded weight vector serves several rows of `x`.
//!
//! Why hand-written: decode is a matrix-vector product that must stream weights at memory speed
//! in the checkpoint's own format (bf16, FP8 with block scales). GEMM libraries (libtorch/oneDNN,
//! the `gemm` crate) take f32/f16 operands, so they would need a converted copy of every weight
//! (twice or four times the bytes read per token); `pulp`/`multiversion` would only replace the
//! `target_feature` dispatch here, which is a dozen lines. `benches` in the model crate compares
//! these kernels with libtorch on the same shapes.

pub mod attention;
pub mod fp8;
pub mod isa;
pub mod moe;
pub mod pool;
pub mod replay;
pub mod rows;

/// The sweep of the AVX-512, AVX2 and NEON paths over a task's columns: one input row streams the
/// weight rows (`sweep_rows`); several use `tile`s of 4 weight rows × up to 3 input rows. Expands to
/// `sweep::<F>` calling the invoking module's own `tile` and `sweep_rows` (same loops, other
/// registers); without `own_rows`, also to a `sweep_rows` that calls the module's `row` a weight
/// row at a time.
macro_rules! four_by_three_sweep {
    () => {
        /// One input row over the task's columns, a weight row at a time.
        #[inline(always)]
        unsafe fn sweep_rows<F: Fmt>(c: &Cols, w: *const F::E, m: usize) {
            for n in c.n0..c.n1 {
                row::<F>(c, w, n, m);
            }
        }

        four_by_three_sweep!(own_rows);
    };
    (own_rows) => {
        #[inline(always)]
        unsafe fn sweep<F: Fmt>(c: &Cols, w: *const F::E, m0: usize, m1: usize) {
            if m1 - m0 == 1 {
                sweep_rows::<F>(c, w, m0);
                return;
            }
            let mut n = c.n0;
            while n < c.n1 {
                let r = if c.n1 - n >= 4 { 4 } else { 1 };
                let mut m = m0;
                while m < m1 {
                    let cols = (m1 - m).min(3);
                    match (r, cols) {
                        (4, 3) => tile::<F, 4, 3>(c, w, n, m),
                        (4, 2) => tile::<F, 4, 2>(c, w, n, m),
                        (4, _) => tile::<F, 4, 1>(c, w, n, m),
                        (_, 3) => tile::<F, 1, 3>(c, w, n, m),
                        (_, 2) => tile::<F, 1, 2>(c, w, n, m),
                        _ => tile::<F, 1, 1>(c, w, n, m),
                    }
                    m += cols;
                }
                n += r;
            }
        }
    };
}

mod avx2;
mod avx512;
mod latent_tiles;
mod mla_decode;
mod neon;
mod portable;
mod shares;

pub use isa::Isa;

/// Weights `[N, K]` in their stored format.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    Fp8(Fp8<'a>),
}

/// FP8 e4m3 weights with one f32 scale per `block_n × block_k` block (DeepSeek-V3:
/// `weight_scale_inv`, 128 × 128); edge blocks may be partial.
#[derive(Clone, Copy)]
pub struct Fp8<'a> {
    pub q: &'a [u8],
    /// `[ceil(N / block_n), ceil(K / block_k)]`, row-major.
    pub scale: &'a [f32],
    pub block_n: usize,
    pub block_k: usize,
}

impl Weights<'_> {
    /// The memory behind the weights: (address, bytes) of the values and, for FP8, the scales.
    fn ranges(&self) -> [(usize, usize); 2] {
        fn of<T>(v: &[T]) -> (usize, usize) {
            (v.as_ptr() as usize, std::mem::size_of_val(v))
        }
        match self {
            Weights::F32(v) => [of(v), (0, 0)],
            Weights::Bf16(v) => [of(v), (0, 0)],
            Weights::Fp8(f) => [of(f.q), of(f.scale)],
        }
    }
}

/// Hints that the product after the one about to start reads `ws`: the pool's helpers stream
/// them into cache once they finish their part of that product, through the single-threaded
/// work between the two ([`pool::Pool::prefetch`]). A hint replaces the previous one.
pub fn prefetch(ws: &[Weights]) {
    let mut ranges = [(0, 0); pool::HINT_RANGES];
    let mut n = 0;
    for r in ws.iter().flat_map(|w| w.ranges()).filter(|r| r.1 > 0).take(ranges.len()) {
        ranges[n] = r;
        n += 1;
    }
    pool::global().prefetch(&ranges[..n]);
}

/// One product of a group: `y[m, n] = Σ_k x[m, k] · w[n, k]`.
pub struct Problem<'a> {
    /// `[M, K]` f32, row-major.
    pub x: &'a [f32],
    /// The same values as bf16, when they are exactly bf16 (bf16 activations): lets bf16 weights
    /// use `vdpbf16ps`. Must be None when `x` holds values bf16 cannot represent.
    pub x_bf16: Option<&'a [u16]>,
    pub w: Weights<'a>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Output rows per task of a prefill-sized group: enough to amortise scheduling, small enough to
/// spread over the cores; a multiple of every tile height.
const ROWS_PER_TASK: usize = 32;
/// Contiguous rows per task of a prefill-sized group (compute-bound): about four tasks per thread
/// from a shared queue, each reusing its input rows over all its weight rows.
fn rows_per_task(n: usize) -> usize {
    let threads = pool::global().threads();
    (n.div_ceil(4 * threads).div_ceil(4) * 4).clamp(ROWS_PER_TASK, 4096)
}

/// Weight bytes per unit of a decode-sized group (memory-bound, one pass over its input rows): a
/// unit's rows are a short stretch of its thread's stream (~1-3 µs), so a product ends within one
/// unit on every thread. A thread claims its own units in runs (see `shares::Shares::front`) and
/// sweeps a run's rows in one call.
const UNIT_BYTES: usize = 64 << 10;

fn unit_rows(p: &Problem) -> usize {
    let elem = match p.w {
        Weights::F32(_) => 4,
        Weights::Bf16(_) => 2,
        Weights::Fp8(_) => 1,
    };
    (UNIT_BYTES / (p.k * elem).max(1)).div_ceil(4).clamp(8, 1024) * 4
}

/// The group's pieces `(problem, n0, n1)` in order, each problem's output rows cut every
/// `rows(problem)` rows.
fn pieces(problems: &[Problem], rows: impl Fn(&Problem) -> usize) -> Vec<(usize, usize, usize)> {
    let live = || problems.iter().enumerate().filter(|(_, p)| p.m > 0 && p.n > 0);
    // Sized first: lm_head alone is ~1,000 units, which a growing vector copies ten times.
    let mut out = Vec::with_capacity(live().map(|(_, p)| p.n.div_ceil(rows(p))).sum());
    for (i, p) in live() {
        let r = rows(p);
        out.extend((0..p.n).step_by(r).map(|n0| (i, n0, (n0 + r).min(p.n))));
    }
    out
}

/// Input rows per pass over a task's weights: the pass's `x` stays in L2 while its weights stay in
/// L1/L2, so a long prompt does not stream `x` once per weight tile.
const ROWS_PER_PASS: usize = 48;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own rows of W, i.e. columns of y).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A task's share: output columns `n0..n1` of one problem, all its input rows.
pub(crate) struct Cols<'p, 'a> {
    pub p: &'p Problem<'a>,
    pub n0: usize,
    pub n1: usize,
    pub out: *mut f32,
}

impl Problem<'_> {
    fn check(&self, i: usize, out_len: usize) {
        let (m, n, k) = (self.m, self.n, self.k);
        assert!(out_len >= m * n, "problem {i}: output buffer too small");
        assert!(self.x.len() >= m * k, "problem {i}: x too small");
        if let Some(xb) = self.x_bf16 {
            assert!(xb.len() >= m * k, "problem {i}: x_bf16 too small");
        }
        let w_len = match self.w {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
            Weights::Fp8(f) => {
                assert!(f.block_n > 0 && f.block_k > 0, "problem {i}: empty FP8 block");
                let grid = n.div_ceil(f.block_n) * k.div_ceil(f.block_k);
                assert!(f.scale.len() >= grid, "problem {i}: FP8 scale grid too small");
                f.q.len()
            }
        };
        assert!(w_len >= n * k, "problem {i}: weights too small");
    }
}

/// Runs every problem into caller-provided `[M, N]` f32 outputs on the process's kernel path.
pub fn grouped_gemm_into(problems: &[Problem], outs: &mut [&mut [f32]]) {
    grouped_gemm_into_with(isa::selected(), problems, outs)
}

/// [`grouped_gemm_into`] on a given path (tests and benchmarks compare paths in one process).
///
/// # Panics
/// When `isa` is not supported by this CPU, or a buffer is smaller than its shape.
pub fn grouped_gemm_into_with(isa: Isa, problems: &[Problem], outs: &mut [&mut [f32]]) {
    assert!(isa.supported(), "kernel path {isa} is not supported by this CPU");
    assert_eq!(problems.len(), outs.len());
    for (i, (p, o)) in problems.iter().zip(outs.iter()).enumerate() {
        p.check(i, o.len());
    }
    replay::record(problems.iter().map(|p| p.w));
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let run = |&(i, n0, n1): &(usize, usize, usize)| {
        // SAFETY: columns n0..n1 of piece's problem output belong to that piece alone; the
        // buffers outlive the parallel region; sizes were checked above; `isa` is supported.
        unsafe { columns_on(isa, &problems[i], n0, n1, ptrs[i].0) }
    };
    let pool = pool::global();
    if problems.iter().all(|p| p.m <= ROWS_PER_PASS) {
        // Decode: each thread reads a contiguous share of the group's rows in small units (a
        // group of small matrices, a layer's routed experts, is a few whole matrices each: one
        // long read, not pieces whose every start waits on memory), then steals units from the
        // back of the others' shares.
        let units = pieces(problems, unit_rows);
        let shares = shares::Shares::new(units.len(), pool.threads());
        // Each thread starts on its own share (the one its prefetch hint streamed in), whichever
        // task it picked up: `work` drains every share, so a share taken twice is harmless.
        let parts = shares.parts();
        pool.for_each(parts.min(units.len()), &|_| {
            shares.work(pool::thread_index().min(parts - 1), &|r| {
                // Consecutive units of one product are one call: one sweep over their rows.
                let mut u = r.start;
                while u < r.end {
                    let (i, n0, mut n1) = units[u];
                    u += 1;
                    while u < r.end && units[u].0 == i && units[u].1 == n1 {
                        n1 = units[u].2;
                        u += 1;
                    }
                    run(&(i, n0, n1));
                }
            })
        });
    } else {
        // Prefill: tasks from a shared queue, sized from the whole group's rows.
        let rows = rows_per_task(problems.iter().filter(|p| p.m > 0).map(|p| p.n).sum());
        let tasks = pieces(problems, |_| rows);
        pool.for_each(tasks.len(), &|t| run(&tasks[t]));
    }
}

/// Columns `n0..n1` of `p`'s output, all its input rows, on the calling thread.
///
/// # Safety
/// `out` holds `p.m · p.n` floats of which no other thread writes these columns; `p` was checked;
/// the CPU supports `isa`.
unsafe fn columns_on(isa: Isa, p: &Problem, n0: usize, n1: usize, out: *mut f32) {
    if p.k == 0 {
        portable::zero_columns(p, n0, n1, out);
        return;
    }
    if matches!(p.w, Weights::Fp8(_)) && p.m >= FP8_WIDEN_ROWS && isa == Isa::Avx2 {
        fp8_widened(isa, p, n0, n1, out);
        return;
    }
    for m0 in (0..p.m).step_by(ROWS_PER_PASS) {
        let m1 = (m0 + ROWS_PER_PASS).min(p.m);
        let c = Cols { p, n0, n1, out };
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 | Isa::Avx512 => avx512::columns(&c, m0, m1, isa == Isa::Avx512Bf16),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::columns(&c, m0, m1),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => neon::columns(&c, m0, m1),
            _ => portable::columns(&c, m0, m1),
        }
    }
}

/// Input rows from which an FP8 product on AVX2 widens its weight rows to f32 once, a group at a
/// time, and runs the f32 tiles over them. The FP8 tiles widen each weight vector again for every
/// tile of (up to 3) input rows: on Zen 3 that made FP8 prefill 1.6× slower than bf16's. Measured
/// there (one-process A/B): batch 16 and 32 decode 1.28× faster, batch 8 even (1.00), a 512-token
/// prefill 1.3-1.6×. Only AVX2, where it was measured: the AVX-512 paths (and their `vdpbf16ps`
/// FP8 tiles) are unchanged. bf16 weights gain nothing from it (batch 32 decode 20% slower,
/// prefill on the kernels 5-20% slower: their widening is one shift).
const FP8_WIDEN_ROWS: usize = 8;
/// f32 bytes of one widened group of weight rows: it stays in L2 beside a pass's input rows.
const FP8_WIDEN_BYTES: usize = 128 << 10;

thread_local! {
    /// A thread's widened weight rows and their outputs, reused from group to group.
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`columns_on`] of an FP8 product through f32 copies of its weight rows, group by group.
///
/// # Safety
/// As [`columns_on`].
unsafe fn fp8_widened(isa: Isa, p: &Problem, n0: usize, n1: usize, out: *mut f32) {
    let (m, k) = (p.m, p.k);
    let group = (FP8_WIDEN_BYTES / (4 * k)).clamp(4, 256);
    WIDENED.with(|bufs| {
        let (w, y) = &mut *bufs.borrow_mut();
        for g0 in (n0..n1).step_by(group) {
            let g = group.min(n1 - g0);
            w.resize(g * k, 0.0);
            y.resize(m * g, 0.0);
            match p.w {
                Weights::Fp8(f) => fp8::widen_rows(&f, k, g0, g0 + g, w),
                _ => unreachable!("only FP8 weights are widened"),
            }
            let q = Problem { x: p.x, x_bf16: None, w: Weights::F32(&w[..g * k]), m, n: g, k };
            columns_on(isa, &q, 0, g, y.as_mut_ptr());
            for (r, ys) in y.chunks_exact(g).enumerate() {
                std::ptr::copy_nonoverlapping(ys.as_ptr(), out.add(r * p.n + g0), g);
            }
        }
    });
}

/// One product on the calling thread, for code that already runs as a task of the pool.
///
/// # Panics
/// When `isa` is not supported by this CPU, or a buffer is smaller than the shape.
pub(crate) fn gemm_here(isa: Isa, p: &Problem, out: &mut [f32]) {
    assert!(isa.supported(), "kernel path {isa} is not supported by this CPU");
    p.check(0, out.len());
    if p.m > 0 && p.n > 0 {
        // SAFETY: checked above; `out` is this caller's alone.
        unsafe { columns_on(isa, p, 0, p.n, out.as_mut_ptr()) };
    }
}

/// bf16 bits of an f32, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
