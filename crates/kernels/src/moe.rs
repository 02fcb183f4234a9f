//! The routed experts of one MoE layer on the CPU in one call: gather each expert's tokens, the
//! gate/up products of all experts as one grouped product, SwiGLU, the down products as another,
//! and the routing-weighted sum per token. Why here and not as tensor ops: at decode the tensor form
//! is ~100 small libtorch ops per layer (a select, copies and casts per expert and product, the
//! SwiGLU, the weighting and a scatter), which cost more than the products' own weight reads.

use crate::rows::{add_scaled_row, round_bf16, swiglu_row};
use crate::{grouped_gemm_into, Problem, Weights};

/// One active expert: its tokens (rows of `x`), their routing weights, and its matrices.
pub struct ExpertRun<'a> {
    pub tokens: &'a [i64],
    pub weights: &'a [f32],
    /// gate and up as one `[2I, H]` matrix (gate rows first) or as two `[I, H]` matrices.
    pub gate_up: Vec<Weights<'a>>,
    /// `[H, I]`.
    pub down: Weights<'a>,
}

/// `out [N, H] += Σ_runs weight · down(SwiGLU(gate_up(x[token])))` over `x [N, H]` (f32 values).
/// With `bf16`, every intermediate is rounded to bf16 where the tensor form computing in bf16 would
/// round it (the products' outputs, silu, the product with up, the weighting, each addition).
/// `then`: what the caller's next product reads, hinted to the pool (see [`crate::prefetch`]).
pub fn routed_experts(
    x: &[f32],
    hidden: usize,
    inter: usize,
    runs: &[ExpertRun],
    bf16: bool,
    then: &[Weights],
    out: &mut [f32],
) {
    let total: usize = runs.iter().map(|e| e.tokens.len()).sum();
    assert!(out.len() == x.len() && x.len().is_multiple_of(hidden));
    let n_tok = x.len() / hidden;
    for e in runs {
        assert_eq!(e.tokens.len(), e.weights.len());
        assert!(e.tokens.iter().all(|&t| t >= 0 && (t as usize) < n_tok), "expert token outside the batch");
        assert!(matches!(e.gate_up.len(), 1 | 2), "gate and up are one or two products");
    }
    // bf16 bits of each token's row, once (not once per expert it goes to).
    let mut xb_tok = vec![0u16; if bf16 { x.len() } else { 0 }];
    if bf16 {
        round_bf16(x, &mut xb_tok);
    }
    // A run of one token reads that token's row in place; longer runs get their rows side by side.
    let gathered: usize = runs.iter().filter(|e| e.tokens.len() > 1).map(|e| e.tokens.len()).sum();
    let (mut xs, mut xb) = (Vec::with_capacity(gathered * hidden), Vec::new());
    for e in runs.iter().filter(|e| e.tokens.len() > 1) {
        for &t in e.tokens {
            let row = t as usize * hidden..(t as usize + 1) * hidden;
            xs.extend_from_slice(&x[row.clone()]);
            if bf16 {
                xb.extend_from_slice(&xb_tok[row]);
            }
        }
    }
    // Gate/up products: one per matrix of each run.
    let mut problems = Vec::new();
    let mut sizes = Vec::new();
    let mut r0 = 0;
    for e in runs {
        let m = e.tokens.len();
        let n = if e.gate_up.len() == 1 { 2 * inter } else { inter };
        let (rows, xr, xbr): (_, &[f32], &[u16]) = if m == 1 {
            let t = e.tokens[0] as usize;
            (t * hidden..(t + 1) * hidden, x, &xb_tok)
        } else {
            r0 += m;
            ((r0 - m) * hidden..r0 * hidden, &xs, &xb)
        };
        for w in &e.gate_up {
            let x_bf16 = bf16.then(|| &xbr[rows.clone()]);
            problems.push(Problem { x: &xr[rows.clone()], x_bf16, w: *w, m, n, k: hidden });
            sizes.push(m * n);
        }
    }
    let mut gu = vec![0f32; sizes.iter().sum()];
    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(sizes.len());
    let mut rest = gu.as_mut_slice();
    for &s in &sizes {
        let (a, b) = rest.split_at_mut(s);
        outs.push(a);
        rest = b;
    }
    // The down matrices stream in while the helpers wait for SwiGLU.
    crate::prefetch(&runs.iter().map(|e| e.down).collect::<Vec<_>>());
    grouped_gemm_into(&problems, &mut outs);
    drop(outs);
    // SwiGLU per row: silu(gate) · up, with its bf16 bits for the down products.
    let mut act = vec![0f32; total * inter];
    let mut ab = vec![0u16; if bf16 { total * inter } else { 0 }];
    let (mut off, mut row) = (0, 0);
    for e in runs {
        let m = e.tokens.len();
        for i in 0..m {
            let (g, u): (&[f32], &[f32]) = if e.gate_up.len() == 1 {
                let base = off + i * 2 * inter;
                (&gu[base..base + inter], &gu[base + inter..base + 2 * inter])
            } else {
                (
                    &gu[off + i * inter..off + (i + 1) * inter],
                    &gu[off + (m + i) * inter..off + (m + i + 1) * inter],
                )
            };
            let a = &mut act[(row + i) * inter..(row + i + 1) * inter];
            let bits = if bf16 { &mut ab[(row + i) * inter..(row + i + 1) * inter] } else { &mut [] };
            swiglu_row(g, u, a, bits, bf16);
        }
        off += m * 2 * inter;
        row += m;
    }
    let mut problems = Vec::with_capacity(runs.len());
    let mut r0 = 0;
    for e in runs {
        let m = e.tokens.len();
        problems.push(Problem {
            x: &act[r0 * inter..(r0 + m) * inter],
            x_bf16: bf16.then(|| &ab[r0 * inter..(r0 + m) * inter]),
            w: e.down,
            m,
            n: hidden,
            k: inter,
        });
        r0 += m;
    }
    let mut ys = vec![0f32; total * hidden];
    // One output slice per run (its rows are contiguous).
    let mut run_outs: Vec<&mut [f32]> = Vec::with_capacity(runs.len());
    {
        let mut rest = ys.as_mut_slice();
        for e in runs {
            let (a, b) = rest.split_at_mut(e.tokens.len() * hidden);
            run_outs.push(a);
            rest = b;
        }
    }
    crate::prefetch(then);
    grouped_gemm_into(&problems, &mut run_outs);
    drop(run_outs);
    let mut row = 0;
    for e in runs {
        for (&t, &w) in e.tokens.iter().zip(e.weights) {
            let y = &ys[row * hidden..(row + 1) * hidden];
            add_scaled_row(&mut out[t as usize * hidden..(t as usize + 1) * hidden], y, w, bf16);
            row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bf16_bits, bf16_to_f32};

    /// Two experts (one fused gate/up, one split), shared tokens, in f32 against a float64 loop.
    #[test]
    fn matches_a_per_token_loop() {
        let (h, i, n) = (20usize, 6usize, 3usize);
        let f =
            |k: usize, s: f32| -> Vec<f32> { (0..k).map(|j| ((j as f32 * 0.37 + s).sin()) * 0.5).collect() };
        let x = f(n * h, 0.1);
        let (gu0, d0) = (f(2 * i * h, 0.2), f(h * i, 0.3));
        let (g1, u1, d1) = (f(i * h, 0.4), f(i * h, 0.5), f(h * i, 0.6));
        let runs = [
            ExpertRun {
                tokens: &[0, 2],
                weights: &[0.7, 1.3],
                gate_up: vec![Weights::F32(&gu0)],
                down: Weights::F32(&d0),
            },
            ExpertRun {
                tokens: &[2],
                weights: &[0.4],
                gate_up: vec![Weights::F32(&g1), Weights::F32(&u1)],
                down: Weights::F32(&d1),
            },
        ];
        let mut out = vec![0f32; n * h];
        routed_experts(&x, h, i, &runs, false, &[], &mut out);
        let mut want = vec![0f64; n * h];
        let mlp = |xt: &[f32],
                   g: &dyn Fn(usize, usize) -> f64,
                   u: &dyn Fn(usize, usize) -> f64,
                   d: &[f32]|
         -> Vec<f64> {
            let a: Vec<f64> = (0..i)
                .map(|r| {
                    let gv: f64 = (0..h).map(|k| g(r, k) * xt[k] as f64).sum();
                    let uv: f64 = (0..h).map(|k| u(r, k) * xt[k] as f64).sum();
                    gv / (1.0 + (-gv).exp()) * uv
                })
                .collect();
            (0..h).map(|o| (0..i).map(|r| d[o * i + r] as f64 * a[r]).sum()).collect()
        };
        for (t, w) in [(0usize, 0.7f64), (2, 1.3)] {
            let y = mlp(
                &x[t * h..(t + 1) * h],
                &|r, k| gu0[r * h + k] as f64,
                &|r, k| gu0[(i + r) * h + k] as f64,
                &d0,
            );
            for k in 0..h {
                want[t * h + k] += w * y[k];
            }
        }
        let y = mlp(&x[2 * h..3 * h], &|r, k| g1[r * h + k] as f64, &|r, k| u1[r * h + k] as f64, &d1);
        for k in 0..h {
            want[2 * h + k] += 0.4 * y[k];
        }
        for (a, b) in out.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        // bf16: runs, and every output is a bf16 value close to the f32 result.
        let xb: Vec<f32> = x.iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect();
        let mut ob = vec![0f32; n * h];
        routed_experts(&xb, h, i, &runs, true, &[], &mut ob);
        for (a, b) in ob.iter().zip(&out) {
            assert_eq!(*a, bf16_to_f32(bf16_bits(*a)));
            assert!((a - b).abs() < 0.02 + 0.02 * b.abs(), "{a} vs {b}");
        }
    }
}
