//! Micro-benchmark: bf16-weight products through the kernel vs libtorch (bf16 and f32).
//! cargo run --release -p mlaserve-model --example kernel_bench
use std::time::Instant;

use mlaserve_model::kernels;
use tch::{Device, Kind, Tensor};

fn time<F: FnMut()>(mut f: F) -> f64 {
    for _ in 0..3 {
        f();
    }
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let _g = tch::no_grad_guard();
    if let Ok(t) = std::env::var("TORCH_THREADS") {
        tch::set_num_threads(t.parse().unwrap());
    }
    println!(
        "threads: torch {} kernels {}",
        tch::get_num_threads(),
        mlaserve_model::pool::global().threads()
    );
    for (m, n, k) in [(1, 4096, 1024), (1, 32768, 1024), (8, 4096, 1024), (16, 4096, 1024), (32, 4096, 1024)]
    {
        let x = Tensor::randn([m, k], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::BFloat16, Device::Cpu));
        let wf = w.to_kind(Kind::Float);
        let xf = x.to_kind(Kind::Float);
        let a = time(|| {
            let _ = kernels::linear(&x, &w);
        });
        let b = time(|| {
            let _ = x.linear::<Tensor>(&w, None);
        });
        let c = time(|| {
            let _ = xf.linear::<Tensor>(&wf, None);
        });
        let gb = (n * k * 2) as f64 / 1e9;
        println!(
            "m={m:>2} n={n:>5} k={k}: kernel {:>7.1} us ({:>5.1} GB/s)  torch bf16 {:>7.1} us  torch f32 {:>7.1} us",
            a * 1e6,
            gb / a,
            b * 1e6,
            c * 1e6
        );
    }
}
