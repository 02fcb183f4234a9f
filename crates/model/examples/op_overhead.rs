//! How long one small libtorch op takes through tch (dispatch overhead).
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() {
    let _g = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = Tensor::randn([1, 1024], (kind, Device::Cpu));
        let n = 20000;
        let t = Instant::now();
        for _ in 0..n {
            let _ = &x + &x;
        }
        let add = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let _ = x.to_kind(Kind::Float);
        }
        let conv = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let _ = x.narrow(1, 0, 512);
        }
        let view = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "{kind:?}: add {:.2} us, to_kind {:.2} us, narrow {:.2} us",
            add * 1e6,
            conv * 1e6,
            view * 1e6
        );
    }
}
