//! Every kernel path this CPU has, against a float64 reference of the same product; paths the CPU
//! lacks are reported as skipped.
//!
//! A plain `main` rather than libtest (`harness = false`): libtest runs each test on a thread of
//! its own, and the aarch64 build of these checks runs under qemu-user, whose threads hang on this
//! project's machines, so `make test-aarch64` runs them on the main thread with a one-thread pool
//! (`MLASERVE_TEST_THREADS=1`).

use mlaserve_kernels::{
    bf16_bits, bf16_to_f32, fp8, grouped_gemm_into_with, isa, pool, Fp8, Isa, Problem, Weights,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A weight matrix in each stored format plus its exact float64 values.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    x: Vec<f32>,
    xb: Vec<u16>,
    f32w: Vec<f32>,
    bf16w: Vec<u16>,
    q: Vec<u8>,
    scale: Vec<f32>,
    block: (usize, usize),
}

fn case(rng: &mut ChaCha8Rng, m: usize, n: usize, k: usize, block: (usize, usize)) -> Case {
    // bf16-exact activations, so that all paths (vdpbf16ps included) see the same x.
    let xb: Vec<u16> = (0..m * k).map(|_| bf16_bits(rng.random_range(-2.0f32..2.0))).collect();
    let x: Vec<f32> = xb.iter().map(|&b| bf16_to_f32(b)).collect();
    let f32w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let bf16w: Vec<u16> = (0..n * k).map(|_| bf16_bits(rng.random_range(-1.0f32..1.0))).collect();
    // Every byte except the NaN codes, subnormals included.
    let q: Vec<u8> = (0..n * k)
        .map(|_| loop {
            let b: u8 = rng.random();
            if b & 0x7F != 0x7F {
                break b;
            }
        })
        .collect();
    let grid = n.div_ceil(block.0) * k.div_ceil(block.1);
    let scale: Vec<f32> = (0..grid).map(|_| rng.random_range(1e-4f32..2e-3)).collect();
    Case { m, n, k, x, xb, f32w, bf16w, q, scale, block }
}

impl Case {
    fn weights(&self, format: usize) -> Weights<'_> {
        match format {
            0 => Weights::F32(&self.f32w),
            1 => Weights::Bf16(&self.bf16w),
            _ => Weights::Fp8(Fp8 {
                q: &self.q,
                scale: &self.scale,
                block_n: self.block.0,
                block_k: self.block.1,
            }),
        }
    }

    /// (value, Σ|x·w|) of output (m, n) in float64.
    fn reference(&self, format: usize, m: usize, n: usize) -> (f64, f64) {
        let kblocks = self.k.div_ceil(self.block.1);
        let (mut s, mut mag) = (0f64, 0f64);
        for k in 0..self.k {
            let w = match format {
                0 => self.f32w[n * self.k + k] as f64,
                1 => bf16_to_f32(self.bf16w[n * self.k + k]) as f64,
                _ => {
                    fp8::reference(self.q[n * self.k + k])
                        * self.scale[(n / self.block.0) * kblocks + k / self.block.1] as f64
                }
            };
            let v = self.x[m * self.k + k] as f64 * w;
            s += v;
            mag += v.abs();
        }
        (s, mag)
    }

    fn check(&self, isa: Isa, format: usize, with_bf16_x: bool) {
        let p = Problem {
            x: &self.x,
            x_bf16: with_bf16_x.then_some(self.xb.as_slice()),
            w: self.weights(format),
            m: self.m,
            n: self.n,
            k: self.k,
        };
        let mut out = vec![f32::NAN; self.m * self.n];
        grouped_gemm_into_with(isa, std::slice::from_ref(&p), &mut [out.as_mut_slice()]);
        for m in 0..self.m {
            for n in 0..self.n {
                let (want, mag) = self.reference(format, m, n);
                let got = out[m * self.n + n] as f64;
                assert!(
                    (got - want).abs() <= 2e-6 * mag + 1e-30,
                    "{isa} format {format} bf16x {with_bf16_x} m={} n={} k={} block {:?} at ({m},{n}): {got} vs {want}",
                    self.m,
                    self.n,
                    self.k,
                    self.block
                );
            }
        }
    }
}

fn supported_paths() -> Vec<Isa> {
    isa::ALL
        .into_iter()
        .filter(|i| {
            let on = i.supported();
            if !on {
                eprintln!("kernel path {i} skipped: this CPU lacks it ({})", isa::cpu_features());
            }
            on
        })
        .collect()
}

fn every_path_matches_float64_on_ragged_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shapes = [
        (1, 1, 1, (1, 1)),
        (1, 37, 13, (16, 8)),
        (2, 64, 256, (128, 128)),
        (3, 5, 8, (2, 2)),
        (7, 129, 1000, (128, 128)),
        (16, 96, 64, (32, 16)),
        (33, 70, 9, (4, 4)),
        (50, 40, 300, (128, 128)),
        (1, 300, 1030, (128, 128)),
        // One input row, reduction blocks a multiple of 64 (FP8 by byte lookup on avx512bf16):
        // whole and partial 64-chunks, blocks of 64 to 192.
        (1, 37, 200, (16, 64)),
        (1, 6, 64, (1, 64)),
        (1, 41, 1000, (128, 128)),
        (1, 9, 130, (128, 192)),
    ];
    for isa in supported_paths() {
        for &(m, n, k, block) in &shapes {
            let c = case(&mut rng, m, n, k, block);
            for format in 0..3 {
                c.check(isa, format, false);
                c.check(isa, format, true);
            }
        }
    }
}

/// Seeded random shapes, block sizes and groups on every path.
fn property_random_groups() {
    let mut rng = ChaCha8Rng::seed_from_u64(20261201);
    for isa in supported_paths() {
        for _ in 0..40 {
            let cases: Vec<(Case, usize, bool)> = (0..rng.random_range(1..4))
                .map(|_| {
                    let (m, n, k) =
                        (rng.random_range(0..20), rng.random_range(1..90), rng.random_range(0..300));
                    let block = (rng.random_range(1..70), rng.random_range(1..140));
                    (case(&mut rng, m, n, k, block), rng.random_range(0..3), rng.random_bool(0.5))
                })
                .collect();
            let problems: Vec<Problem> = cases
                .iter()
                .map(|(c, f, xb)| Problem {
                    x: &c.x,
                    x_bf16: xb.then_some(c.xb.as_slice()),
                    w: c.weights(*f),
                    m: c.m,
                    n: c.n,
                    k: c.k,
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = cases.iter().map(|(c, _, _)| vec![f32::NAN; c.m * c.n]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            grouped_gemm_into_with(isa, &problems, &mut views);
            for ((c, f, _), out) in cases.iter().zip(&outs) {
                for m in 0..c.m {
                    for n in 0..c.n {
                        let (want, mag) = c.reference(*f, m, n);
                        let got = out[m * c.n + n] as f64;
                        assert!(
                            (got - want).abs() <= 2e-6 * mag + 1e-30,
                            "{isa} f{f} {}x{}x{}",
                            c.m,
                            c.n,
                            c.k
                        );
                    }
                }
            }
        }
    }
}

fn bf16_rounding() {
    assert_eq!(bf16_bits(1.0), 0x3F80);
    assert_eq!(bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80, "ties to even, down");
    assert_eq!(bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82, "ties to even, up");
    assert_eq!(bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
}

fn main() {
    let threads = std::env::var("MLASERVE_TEST_THREADS").ok().and_then(|v| v.parse().ok());
    if let Some(t) = threads {
        pool::init_global(t);
    }
    println!(
        "kernel paths on {} ({}), {} pool threads",
        std::env::consts::ARCH,
        isa::cpu_features(),
        pool::global().threads()
    );
    let checks: [(&str, fn()); 3] = [
        ("bf16_rounding", bf16_rounding),
        ("every_path_matches_float64_on_ragged_shapes", every_path_matches_float64_on_ragged_shapes),
        ("property_random_groups", property_random_groups),
    ];
    for (name, check) in checks {
        check();
        println!("test {name} ... ok");
    }
}
