//! `cargo run --release -p mlaserve-kernels --example kernel_bench -- M N K [THREADS]`: time of one
//! `[M, K] x [N, K]ᵀ` product per kernel path and weight format, with the weights cycled through
//! copies larger than the last-level cache (decode reads its weights from memory), beside a plain
//! read of the same bytes on the same pool, the two alternating. `MLASERVE_KERNEL=avx2` (say) times
//! one path only.
use std::time::Instant;

use mlaserve_kernels::{bf16_bits, grouped_gemm_into_with, isa, pool, replay, Fp8, Problem, Weights};

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("a number")).collect();
    let (m, n, k) = (a[0], a[1], a[2]);
    if let Some(&t) = a.get(3) {
        pool::init_global(t);
    }
    println!("cpu features: {}; {} threads", isa::cpu_features(), pool::global().threads());
    let x: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 0.01 - 0.5).collect();
    let xb: Vec<u16> = x.iter().map(|&v| bf16_bits(v)).collect();
    let x: Vec<f32> = xb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    // Enough copies to exceed a 64 MiB cache.
    let copies = (256usize << 20).div_ceil(n * k).clamp(1, 64);
    let f32w: Vec<Vec<f32>> =
        (0..copies).map(|c| (0..n * k).map(|i| ((i + c) % 89) as f32 * 0.01).collect()).collect();
    let bf16w: Vec<Vec<u16>> = f32w.iter().map(|w| w.iter().map(|&v| bf16_bits(v)).collect()).collect();
    let q: Vec<Vec<u8>> =
        (0..copies).map(|c| (0..n * k).map(|i| ((i * 7 + c) % 120) as u8).collect()).collect();
    let scale = vec![0.01f32; n.div_ceil(128) * k.div_ceil(128)];
    let mut out = vec![0f32; m * n];
    // `MLASERVE_KERNEL=<path>` times that path alone.
    let only = std::env::var(isa::ENV).ok().and_then(|v| isa::Isa::parse(&v));
    for isa in isa::ALL.into_iter().filter(|i| i.supported() && only.is_none_or(|o| o == *i)) {
        for (name, bytes) in [("f32", 4), ("bf16", 2), ("fp8", 1)] {
            for with_xb in [false, true] {
                if with_xb && name == "f32" {
                    continue;
                }
                let run = |c: usize, out: &mut [f32]| {
                    let w = match name {
                        "f32" => Weights::F32(&f32w[c]),
                        "bf16" => Weights::Bf16(&bf16w[c]),
                        _ => Weights::Fp8(Fp8 { q: &q[c], scale: &scale, block_n: 128, block_k: 128 }),
                    };
                    let p = Problem { x: &x, x_bf16: with_xb.then_some(xb.as_slice()), w, m, n, k };
                    grouped_gemm_into_with(isa, std::slice::from_ref(&p), &mut [out]);
                };
                // Warm-up, recording each copy's bytes for a plain read of them on the same pool
                // (`replay`): product and read alternate every 3 calls, so that both see the same
                // moments of a host whose memory speed moves.
                let recs: Vec<replay::Recording> = (0..copies)
                    .map(|c| {
                        replay::start();
                        run(c, &mut out);
                        replay::finish()
                    })
                    .collect();
                let iters = (copies * 3).max(20).next_multiple_of(6);
                let mut spent = [0f64; 2];
                for i in 0..2 * iters {
                    let read = (i / 3) % 2 == 1;
                    let t = Instant::now();
                    if read {
                        // SAFETY: the recorded weights are alive until the end of main.
                        std::hint::black_box(unsafe { recs[i % copies].read() });
                    } else {
                        run(i % copies, &mut out);
                    }
                    spent[read as usize] += t.elapsed().as_secs_f64();
                }
                let (dt, dr) = (spent[0] / iters as f64, spent[1] / iters as f64);
                println!(
                    "{isa:>10} {name:>4}{} m={m} n={n} k={k}: {:8.1} us {:6.1} GB/s {:7.1} GFLOP/s; \
                     a plain read of the bytes {:6.1} GB/s (product / read {:.3})",
                    if with_xb { "·bf16x" } else { "      " },
                    dt * 1e6,
                    (n * k * bytes) as f64 / dt / 1e9,
                    2.0 * (m * n * k) as f64 / dt / 1e9,
                    (n * k * bytes) as f64 / dr / 1e9,
                    dt / dr
                );
            }
        }
    }
}
