//! `mlaserve bench`: a load generator for a running router. N concurrent streams (closed loop) or a
//! Poisson request rate (open loop), fixed or uniformly distributed prompt and output lengths,
//! warm-up; reports throughput, TTFT, TPOT and end-to-end latency percentiles and errors, as a table
//! (with a progress bar while it runs) or JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use mlaserve_proto::v1::generation_client::GenerationClient;
use mlaserve_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParameters, StoppingCriteria, TokenIds};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use super::util::runtime;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Router address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// Concurrent streams (closed loop: each starts its next request when one ends).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Open loop instead: Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured requests.
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    /// Requests run (and discarded) before measuring.
    #[arg(long, default_value_t = 8)]
    pub warmup: usize,
    /// Prompt length in tokens (random ids); with --prompt-len-max, uniform in [len, max].
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long)]
    pub prompt_len_max: Option<usize>,
    /// The first this many prompt tokens are the same in every request (a shared system prompt),
    /// counted within the prompt length.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Generated tokens per request (EOS ignored); with --output-len-max, uniform in [len, max].
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    #[arg(long)]
    pub output_len_max: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        Percentiles {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub requests: usize,
    pub completed: usize,
    pub errors: BTreeMap<String, usize>,
    pub duration_secs: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub output_tokens_per_sec: f64,
    pub total_tokens_per_sec: f64,
    pub requests_per_sec: f64,
    pub ttft_secs: Percentiles,
    pub tpot_secs: Percentiles,
    pub e2e_secs: Percentiles,
    /// MTP drafts verified during the run and how many were accepted (server counters).
    pub speculative_drafts: u64,
    pub speculative_accepted: u64,
    /// Prompt blocks found in the prefix cache during the run.
    pub prefix_cache_hits: u64,
    /// Sequences the server preempted (for lack of cache blocks) during the run.
    pub preemptions: u64,
}

struct Sample {
    prompt: u64,
    output: u64,
    ttft: f64,
    tpot: Option<f64>,
    e2e: f64,
}

#[derive(Default)]
struct Collected {
    samples: Vec<Sample>,
    errors: BTreeMap<String, usize>,
}

fn uniform(rng: &mut impl Rng, lo: usize, hi: Option<usize>) -> usize {
    match hi {
        Some(h) if h > lo => rng.random_range(lo..=h),
        _ => lo,
    }
}

fn make_request(a: &Args, vocab: u32, i: usize) -> GenerateRequest {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
    let plen = uniform(&mut rng, a.prompt_len.max(1), a.prompt_len_max);
    let olen = uniform(&mut rng, a.output_len.max(1), a.output_len_max);
    // Avoid the first ids (BOS, EOS and other specials in DeepSeek-style vocabularies).
    let lo = 2.min(vocab - 1);
    let mut shared = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ 0x5EED_50F7);
    let ids =
        (0..plen)
            .map(|j| {
                if j < a.shared_prefix {
                    shared.random_range(lo..vocab)
                } else {
                    rng.random_range(lo..vocab)
                }
            })
            .collect();
    GenerateRequest {
        input_ids: Some(TokenIds { ids }),
        sampling: Some(SamplingParameters {
            temperature: Some(a.temperature),
            seed: Some(a.seed.wrapping_add(i as u64)),
            ..Default::default()
        }),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(olen as u32),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn one(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
    timeout: Duration,
) -> Result<Sample, String> {
    let prompt = req.input_ids.as_ref().map(|t| t.ids.len() as u64).unwrap_or(0);
    let start = Instant::now();
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    let mut stream = client.generate(r).await.map_err(|e| format!("{:?}", e.code()))?.into_inner();
    let mut first = None;
    let mut output = 0u64;
    while let Some(m) = stream.message().await.map_err(|e| format!("{:?}", e.code()))? {
        if !m.token_ids.is_empty() && first.is_none() {
            first = Some(start.elapsed().as_secs_f64());
        }
        output += m.token_ids.len() as u64;
    }
    let e2e = start.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(e2e);
    let tpot = (output > 1).then(|| (e2e - ttft) / (output - 1) as f64);
    Ok(Sample { prompt, output, ttft, tpot, e2e })
}

async fn connect(target: &str) -> anyhow::Result<GenerationClient<Channel>> {
    let uri = if target.contains("://") { target.to_string() } else { format!("http://{target}") };
    let ch = tonic::transport::Endpoint::from_shared(uri.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    Ok(GenerationClient::new(ch).max_decoding_message_size(64 << 20))
}

pub async fn run_bench(a: &Args, quiet: bool) -> anyhow::Result<Report> {
    let mut client = connect(&a.target).await?;
    let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
    if !info.healthy {
        bail!("the router at {} reports an unhealthy pipeline", a.target);
    }
    let vocab = info.vocab_size.max(3);
    let timeout = Duration::from_secs(a.timeout_secs);
    // Warm-up, not measured.
    let warm: Vec<_> = (0..a.warmup)
        .map(|i| {
            let mut c = client.clone();
            let req = make_request(a, vocab, usize::MAX - i);
            tokio::spawn(async move { one(&mut c, req, timeout).await })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }

    let pb = if quiet || a.json {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(a.requests as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {pos}/{len} requests [{bar:30}] {per_sec} {msg}")
                .expect("static template"),
        );
        pb
    };
    let collected = Arc::new(Mutex::new(Collected::default()));
    let record = {
        let collected = collected.clone();
        let pb = pb.clone();
        move |r: Result<Sample, String>| {
            let mut c = collected.lock().expect("lock");
            match r {
                Ok(s) => c.samples.push(s),
                Err(code) => *c.errors.entry(code).or_default() += 1,
            }
            pb.inc(1);
        }
    };
    let before = client.model_info(ModelInfoRequest {}).await?.into_inner();
    let started = Instant::now();
    let mode;
    if let Some(rate) = a.rate {
        mode = format!("open loop, {rate} req/s");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        let mut tasks = Vec::with_capacity(a.requests);
        for i in 0..a.requests {
            let wait = -(1.0 - rng.random::<f64>()).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            let mut c = client.clone();
            let req = make_request(a, vocab, i);
            let rec = record.clone();
            tasks.push(tokio::spawn(async move { rec(one(&mut c, req, timeout).await) }));
        }
        for t in tasks {
            let _ = t.await;
        }
    } else {
        mode = format!("closed loop, {} streams", a.concurrency);
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..a.concurrency.max(1))
            .map(|_| {
                let mut c = client.clone();
                let next = next.clone();
                let rec = record.clone();
                let a = a.clone();
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= a.requests {
                            break;
                        }
                        let req = make_request(&a, vocab, i);
                        rec(one(&mut c, req, timeout).await);
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
    }
    let duration = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let after = client.model_info(ModelInfoRequest {}).await?.into_inner();
    let c = std::mem::take(&mut *collected.lock().expect("lock"));
    let prompt_tokens: u64 = c.samples.iter().map(|s| s.prompt).sum();
    let output_tokens: u64 = c.samples.iter().map(|s| s.output).sum();
    Ok(Report {
        target: a.target.clone(),
        mode,
        requests: a.requests,
        completed: c.samples.len(),
        errors: c.errors,
        duration_secs: duration,
        prompt_tokens,
        output_tokens,
        output_tokens_per_sec: output_tokens as f64 / duration,
        total_tokens_per_sec: (prompt_tokens + output_tokens) as f64 / duration,
        requests_per_sec: c.samples.len() as f64 / duration,
        ttft_secs: Percentiles::of(c.samples.iter().map(|s| s.ttft).collect()),
        tpot_secs: Percentiles::of(c.samples.iter().filter_map(|s| s.tpot).collect()),
        e2e_secs: Percentiles::of(c.samples.iter().map(|s| s.e2e).collect()),
        speculative_drafts: after.speculative_drafts - before.speculative_drafts,
        speculative_accepted: after.speculative_accepted - before.speculative_accepted,
        prefix_cache_hits: after.prefix_cache_hits - before.prefix_cache_hits,
        preemptions: after.preemptions - before.preemptions,
    })
}

fn print_table(r: &Report) {
    let ms = |p: &Percentiles| {
        format!("{:>9.1} {:>9.1} {:>9.1} {:>9.1}", p.mean * 1e3, p.p50 * 1e3, p.p90 * 1e3, p.p99 * 1e3)
    };
    println!("target {} ({}), {:.1} s", r.target, r.mode, r.duration_secs);
    println!(
        "requests {}/{} completed, errors {:?}, {:.2} req/s",
        r.completed, r.requests, r.errors, r.requests_per_sec
    );
    println!(
        "throughput: {:.1} output tokens/s, {:.1} total tokens/s ({} prompt + {} output tokens)",
        r.output_tokens_per_sec, r.total_tokens_per_sec, r.prompt_tokens, r.output_tokens
    );
    println!("{:<10} {:>9} {:>9} {:>9} {:>9}", "ms", "mean", "p50", "p90", "p99");
    println!("{:<10} {}", "TTFT", ms(&r.ttft_secs));
    println!("{:<10} {}", "TPOT", ms(&r.tpot_secs));
    println!("{:<10} {}", "end-to-end", ms(&r.e2e_secs));
    if r.preemptions > 0 {
        println!(
            "preemptions: {} (the cache pool was short; those sequences were recomputed)",
            r.preemptions
        );
    }
    if r.speculative_drafts > 0 {
        println!(
            "speculative: {}/{} drafts accepted ({:.1}%)",
            r.speculative_accepted,
            r.speculative_drafts,
            100.0 * r.speculative_accepted as f64 / r.speculative_drafts as f64
        );
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let report = runtime()?.block_on(run_bench(&a, false))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if report.completed == 0 {
        bail!("no request completed: {:?}", report.errors);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).map(|x| x as f64).collect());
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 90.0, 99.0));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(vec![]).p99, 0.0);
    }
}
