//! Times the individual libtorch ops of one decode attention core (B=1, 8 heads, 64 cached tokens).
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn time(name: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!("{name:<28} {:>8.2} us", t.elapsed().as_secs_f64() / n as f64 * 1e6);
}

fn main() {
    let _g = tch::no_grad_guard();
    let cpu = (Kind::Float, Device::Cpu);
    let cache = Tensor::randn([4096, 576], (Kind::BFloat16, Device::Cpu));
    let slots = Tensor::arange(64, (Kind::Int64, Device::Cpu)).view([1, 64]);
    let qc = Tensor::randn([1, 8, 576], cpu);
    let ctx = cache.index_select(0, &slots.view([-1])).view([1, 64, 576]).to_kind(Kind::Float);
    let allowed = Tensor::ones([1, 1, 1, 64], (Kind::Bool, Device::Cpu));
    let n = 2000;
    time("index_select", n, || {
        let _ = cache.index_select(0, &slots.view([-1]));
    });
    time("gather+to_f32", n, || {
        let _ = cache.index_select(0, &slots.view([-1])).view([1, 64, 576]).to_kind(Kind::Float);
    });
    time("bmm scores", n, || {
        let _ = qc.bmm(&ctx.transpose(1, 2));
    });
    let s = qc.bmm(&ctx.transpose(1, 2));
    time("round bf16", n, || {
        let _ = s.to_kind(Kind::BFloat16).to_kind(Kind::Float);
    });
    time("mul scale", n, || {
        let _ = &s * 0.1;
    });
    time("masked_fill", n, || {
        let _ = s.view([1, 1, 8, 64]).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    });
    time("softmax", n, || {
        let _ = s.softmax(-1, Kind::Float);
    });
    let p = s.softmax(-1, Kind::Float);
    time("bmm values", n, || {
        let _ = p.bmm(&ctx.narrow(2, 0, 512));
    });
}
