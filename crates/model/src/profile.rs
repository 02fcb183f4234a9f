//! Opt-in wall-clock breakdown of the forward pass (`MLASERVE_PROFILE=1`): where a step's time goes,
//! per model part. Off by default; when off, a section costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ENABLED: OnceLock<AtomicBool> = OnceLock::new();
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

fn enabled() -> bool {
    ENABLED
        .get_or_init(|| AtomicBool::new(std::env::var_os("MLASERVE_PROFILE").is_some_and(|v| v != "0")))
        .load(Ordering::Relaxed)
}

/// Times the enclosing scope under `name` when profiling is on.
pub struct Section {
    name: &'static str,
    start: Option<Instant>,
}

pub fn section(name: &'static str) -> Section {
    Section { name, start: enabled().then(Instant::now) }
}

impl Drop for Section {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let mut t = TOTALS.lock().expect("profile lock");
            let e = t.entry(self.name).or_default();
            e.0 += s.elapsed().as_secs_f64();
            e.1 += 1;
        }
    }
}

/// The accumulated breakdown, or None when profiling is off.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let t = TOTALS.lock().expect("profile lock");
    let mut out = String::from("section                      total ms     calls   us/call\n");
    for (name, (secs, n)) in t.iter() {
        out.push_str(&format!("{name:<26} {:>10.1} {:>9} {:>9.1}\n", secs * 1e3, n, secs * 1e6 / *n as f64));
    }
    for (s, k_us, l_us, e) in crate::gemm_choice::decisions() {
        out.push_str(&format!(
            "prefill gemm rows<={} n={} k={}: kernels {k_us:.0} us, libtorch {l_us:.0} us -> {}\n",
            s.rows_bucket,
            s.n,
            s.k,
            e.name()
        ));
    }
    Some(out)
}
