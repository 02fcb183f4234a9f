//! A read of the same weight bytes a decode step read, in the same order and on the same pool,
//! without the arithmetic or the work between products: the in-process bandwidth floor that
//! `MLASERVE_PROFILE=1` sets beside each step.
//!
//! Why: on a host whose memory moves between phases (the VMs of docs/PERFORMANCE.md read 22-60
//! GB/s from one second to the next), a separate probe's bandwidth is another moment's. A read of
//! the step's own bytes right after the step, from the same pages, is the floor that step had.
//!
//! [`start`] arms recording for the calling thread; every product that thread then runs on the
//! kernels ([`crate::grouped_gemm_into_with`], the absorbed decode core's per-head form) appends
//! its weights' byte ranges until [`finish`]. Off, a product pays one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{pool, Weights};

static RECORDING: AtomicBool = AtomicBool::new(false);
/// Each product's weight byte ranges (address, bytes).
type Ranges = Vec<(usize, usize)>;
/// The recording thread and what it recorded so far.
static PRODUCTS: Mutex<(Option<std::thread::ThreadId>, Vec<Ranges>)> = Mutex::new((None, Vec::new()));

/// The weight byte ranges of the products run between [`start`] and [`finish`], one list per
/// product in the order they ran.
#[derive(Debug, Default)]
pub struct Recording {
    products: Vec<Ranges>,
}

/// Starts recording the weight ranges of the products this thread runs (a recording another
/// thread had not finished is dropped).
pub fn start() {
    *PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()) = (Some(std::thread::current().id()), Vec::new());
    RECORDING.store(true, Ordering::Relaxed);
}

/// Stops recording and returns what was recorded.
pub fn finish() -> Recording {
    RECORDING.store(false, Ordering::Relaxed);
    let (_, products) = std::mem::take(&mut *PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()));
    Recording { products }
}

/// Called by each product, on the thread that runs it, with the weights it reads.
pub(crate) fn record<'a>(ws: impl IntoIterator<Item = Weights<'a>>) {
    if RECORDING.load(Ordering::Relaxed) {
        let mut g = PRODUCTS.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == Some(std::thread::current().id()) {
            g.1.push(ws.into_iter().flat_map(|w| w.ranges()).filter(|r| r.1 > 0).collect());
        }
    }
}

impl Recording {
    /// Products recorded.
    pub fn products(&self) -> usize {
        self.products.len()
    }

    /// Weight bytes over all products.
    pub fn bytes(&self) -> usize {
        self.products.iter().flatten().map(|r| r.1).sum()
    }

    /// Reads every recorded byte, product by product, each product's bytes cut into one contiguous
    /// share per pool thread (as a decode product is); returns the sum of the bytes (so that the
    /// reads are not optimised away).
    ///
    /// # Safety
    /// Every recorded range must still be readable memory: the weights recorded are alive and not
    /// moved (a loaded model's are, until it is dropped).
    pub unsafe fn read(&self) -> u64 {
        let pool = pool::global();
        let acc = AtomicU64::new(0);
        let t = pool.threads();
        for p in &self.products {
            let total: usize = p.iter().map(|r| r.1).sum();
            pool.for_each(t, &|i| {
                let (lo, hi) = (total * i / t, total * (i + 1) / t);
                let (mut at, mut sum) = (0, 0u64);
                for &(addr, len) in p {
                    let (b, e) = (at.max(lo), (at + len).min(hi));
                    if b < e {
                        // SAFETY: [addr, addr + len) is readable (the caller's contract), and
                        // [b - at, e - at) lies inside it.
                        sum = sum.wrapping_add(byte_sum(unsafe {
                            std::slice::from_raw_parts((addr + b - at) as *const u8, e - b)
                        }));
                    }
                    at += len;
                }
                acc.fetch_add(sum, Ordering::Relaxed);
            });
        }
        acc.into_inner()
    }
}

/// The sum of `bytes`, however they are split between threads. The reads must run at memory
/// speed, not be bound by the adds: `vpsadbw` where AVX2 is present (32 bytes an instruction),
/// else a loop the compiler vectorises.
fn byte_sum(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::Isa::Avx2.supported() {
        // SAFETY: the CPU has AVX2.
        return unsafe { byte_sum_avx2(bytes) };
    }
    byte_sum_portable(bytes)
}

fn byte_sum_portable(bytes: &[u8]) -> u64 {
    // u32 partial sums of chunks small enough not to overflow (65,536 · 255 < 2³²).
    bytes.chunks(1 << 16).map(|c| c.iter().map(|&b| b as u32).sum::<u32>() as u64).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn byte_sum_avx2(bytes: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let mut acc = [zero; 4];
    let mut blocks = bytes.chunks_exact(128);
    for b in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `b` holds 128 bytes; this reads 32 of them (unaligned load).
            let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(32 * j) as *const __m256i) };
            // Four u64 lanes, each the sum of 8 bytes.
            *a = _mm256_add_epi64(*a, _mm256_sad_epu8(v, zero));
        }
    }
    let mut lanes = [0u64; 4];
    let all = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    // SAFETY: `lanes` holds 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, all) };
    lanes.iter().sum::<u64>() + byte_sum_portable(blocks.remainder())
}

/// Tests that arm the recording hold this (one recording at a time in the process).
#[cfg(test)]
pub(crate) static ARMING: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fp8, Problem};

    /// Products of other threads (the other tests) are not recorded.
    #[test]
    fn records_only_while_armed_and_reads_every_byte() {
        let _one = ARMING.lock().unwrap_or_else(|e| e.into_inner());
        let w1: Vec<u16> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761u32) >> 16) as u16).collect();
        let q: Vec<u8> = (0..256u32).map(|i| (i * 7 + 3) as u8).collect();
        let scale = vec![0.5f32; 1];
        let x = vec![1f32; 64];
        let run = || {
            let p = Problem { x: &x, x_bf16: None, w: Weights::Bf16(&w1), m: 1, n: 64, k: 64 };
            let mut out = vec![0f32; 64];
            crate::grouped_gemm_into(&[p], &mut [&mut out[..]]);
        };
        run();
        start();
        run();
        record([Weights::Fp8(Fp8 { q: &q, scale: &scale, block_n: 128, block_k: 128 })]);
        std::thread::scope(|s| s.spawn(run).join().expect("another thread's product"));
        let r = finish();
        run();
        assert_eq!(r.products(), 2, "the product and the FP8 record while armed, nothing after");
        assert_eq!(r.bytes(), w1.len() * 2 + q.len() + 4);
        let bf16: Vec<u8> = w1.iter().flat_map(|v| v.to_le_bytes()).collect();
        let want = byte_sum(&bf16) + byte_sum(&q) + byte_sum(&0.5f32.to_le_bytes());
        // SAFETY: the recorded slices are alive here.
        assert_eq!(unsafe { r.read() }, want, "every recorded byte read once");
        assert_eq!(unsafe { Recording::default().read() }, 0, "nothing recorded, nothing read");
    }

    #[test]
    fn byte_sum_counts_every_byte() {
        let b: Vec<u8> = (0..200_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let want: u64 = b.iter().map(|&v| v as u64).sum();
        // Both forms, on every length around the vector blocks (whichever form this CPU runs).
        for len in [0, 1, 31, 127, 128, 129, 1000, b.len()] {
            let want: u64 = b[..len].iter().map(|&v| v as u64).sum();
            assert_eq!(byte_sum(&b[..len]), want, "{len} bytes");
            assert_eq!(byte_sum_portable(&b[..len]), want, "{len} bytes, portable");
        }
        assert_eq!(byte_sum(&b), want);
    }
}
