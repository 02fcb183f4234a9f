//! `cargo run --release -p mlaserve-model --example vs_libtorch -- M N K`: the kernels (process
//! path, bf16 weights, f32 and bf16 activations) against libtorch's f32 and bf16 `mm` (MKL/oneDNN)
//! on 1 and 2 threads, on the same shape; the weights cycle through four copies.
use std::time::Instant;

use mlaserve_model::kernels;
use mlaserve_model::linear::Weight;
use tch::{Device, Kind, Tensor};

fn time(iters: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..3 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let a: Vec<i64> = std::env::args().skip(1).map(|s| s.parse().expect("a number")).collect();
    let (m, n, k) = (a[0], a[1], a[2]);
    let flop = 2.0 * (m * n * k) as f64;
    println!(
        "kernel path {} ({}), m={m} n={n} k={k}",
        kernels::isa::selected(),
        kernels::isa::cpu_features()
    );
    let ws: Vec<Weight> = (0..4)
        .map(|_| Weight::Dense(Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)))
        .collect();
    let iters = 20;
    for xk in [Kind::Float, Kind::BFloat16] {
        let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(xk);
        let dt = time(iters, |i| drop(kernels::linear(&x, &ws[i % 4])));
        println!("  mlaserve bf16 weights, {xk:?} x: {:9.1} us {:7.1} GFLOP/s", dt * 1e6, flop / dt / 1e9);
    }
    for (wk, label) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        let wt: Vec<Tensor> = ws.iter().map(|w| w.to_dense(wk).tr().contiguous().tr()).collect();
        let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(wk);
        for th in [1, 2] {
            tch::set_num_threads(th);
            let dt = time(iters, |i| drop(x.mm(&wt[i % 4].tr())));
            println!(
                "  libtorch {label} mm, {th} threads:      {:9.1} us {:7.1} GFLOP/s",
                dt * 1e6,
                flop / dt / 1e9
            );
        }
    }
}
