//! `cargo run --release -p mlaserve-kernels --example moe_bench -- [TOKENS] [THREADS]`: one MoE
//! layer's routed experts (`routed_experts`) on the benchmark shape (hidden 1024, 256-wide experts,
//! 8 of 32 active per token), bf16 activations, with the bf16 (fused gate/up) and FP8 (split,
//! 128 × 128 blocks) layouts the model uses, cycling layers so that weights come from memory.
use std::time::Instant;

use mlaserve_kernels::moe::{routed_experts, ExpertRun};
use mlaserve_kernels::{bf16_bits, bf16_to_f32, isa, pool, Fp8, Weights};

fn fp8<'a>(q: &'a [u8], scale: &'a [f32]) -> Weights<'a> {
    Weights::Fp8(Fp8 { q, scale, block_n: 128, block_k: 128 })
}

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("a number")).collect();
    let tokens = a.first().copied().unwrap_or(1);
    if let Some(&t) = a.get(1) {
        pool::init_global(t);
    }
    let (h, i, e, k, layers) = (1024usize, 256usize, 32usize, 8usize, 8usize);
    println!("cpu features: {}; {} threads; {tokens} tokens", isa::cpu_features(), pool::global().threads());
    let x: Vec<f32> =
        (0..tokens * h).map(|j| bf16_to_f32(bf16_bits(((j % 97) as f32 * 0.01 - 0.5) * 0.1))).collect();
    let bf: Vec<Vec<(Vec<u16>, Vec<u16>)>> = (0..layers)
        .map(|l| {
            (0..e)
                .map(|x| {
                    let v = |n: usize, s: usize| {
                        (0..n).map(|j| bf16_bits(((j + s) % 89) as f32 * 1e-3)).collect()
                    };
                    (v(2 * i * h, l + x), v(h * i, l * x))
                })
                .collect()
        })
        .collect();
    let q: Vec<Vec<[Vec<u8>; 3]>> = (0..layers)
        .map(|l| {
            (0..e)
                .map(|x| {
                    let v = |n: usize, s: usize| (0..n).map(|j| ((j * 7 + s) % 120) as u8).collect();
                    [v(i * h, l + x), v(i * h, l + 2 * x), v(h * i, l * x)]
                })
                .collect()
        })
        .collect();
    let scale = vec![0.01f32; (h / 128) * (i / 128).max(1) * 2];
    let mut out = vec![0f32; tokens * h];
    // Call c: token t picks the 8 experts (t·3 + c + j·4) mod 32: a new set each call, like a real
    // router, so the weights read are not the ones the last call left in cache.
    let picks_of = |c: usize| -> Vec<Vec<i64>> {
        (0..e)
            .map(|x| {
                (0..tokens)
                    .filter(|t| (0..k).any(|j| (t * 3 + c + j * 4) % e == x))
                    .map(|t| t as i64)
                    .collect()
            })
            .collect()
    };
    let calls: Vec<Vec<Vec<i64>>> = (0..64).map(picks_of).collect();
    let wts: Vec<f32> = vec![0.1; tokens];
    for name in ["bf16", "fp8", "bf16", "fp8"] {
        let run = |l: usize, out: &mut [f32]| {
            let picks = &calls[(l / layers) % calls.len()];
            let runs: Vec<ExpertRun> = (0..e)
                .filter(|&x| !picks[x].is_empty())
                .map(|x| {
                    let (gate_up, down) = if name == "bf16" {
                        (vec![Weights::Bf16(&bf[l % layers][x].0)], Weights::Bf16(&bf[l % layers][x].1))
                    } else {
                        let w = &q[l % layers][x];
                        (vec![fp8(&w[0], &scale), fp8(&w[1], &scale)], fp8(&w[2], &scale))
                    };
                    ExpertRun { tokens: &picks[x], weights: &wts[..picks[x].len()], gate_up, down }
                })
                .collect();
            routed_experts(&x, h, i, &runs, true, &[], out);
        };
        for l in 0..layers {
            run(l, &mut out);
        }
        let picks = &calls[0];
        let iters = 200;
        let t = Instant::now();
        for it in 0..iters {
            run(it, &mut out);
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        let active: usize = picks.iter().filter(|p| !p.is_empty()).count();
        let bytes = active * 3 * i * h * if name == "bf16" { 2 } else { 1 };
        println!(
            "{name:>5}: {:7.1} us per layer, {active} experts, {:5.1} GB/s",
            dt * 1e6,
            bytes as f64 / dt / 1e9
        );
    }
}
