//! Opt-in wall-clock breakdown of the forward pass (`MLASERVE_PROFILE=1`): where a step's time goes,
//! per model part, and beside it the time a plain read of the step's weight bytes takes in the same
//! process ([`ReplayFloor`]). Off by default; when off, a section costs one relaxed atomic load.

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

/// Decode steps before the one whose weight reads are recorded (the first steps warm caches up).
const REPLAY_AFTER: usize = 8;

/// With profiling on: records the weight byte ranges of one decode step (after [`REPLAY_AFTER`]),
/// then, after every later decode step, reads those bytes again on the kernels' pool (see
/// `mlaserve_kernels::replay`), timed as section `replay`. A step's time over the replay's is its
/// share of the bandwidth floor measured at the same moment, from the same pages.
#[derive(Default)]
pub(crate) struct ReplayFloor {
    decode_steps: usize,
    armed: bool,
    recording: Option<mlaserve_kernels::replay::Recording>,
}

impl ReplayFloor {
    /// Before a step (`decode`: it only decodes).
    pub(crate) fn before_step(&mut self, decode: bool) {
        if enabled() && decode && self.recording.is_none() && self.decode_steps == REPLAY_AFTER {
            mlaserve_kernels::replay::start();
            self.armed = true;
        }
    }

    /// After a decode step's own time is counted.
    pub(crate) fn after_decode_step(&mut self) {
        self.decode_steps += 1;
        if std::mem::take(&mut self.armed) {
            self.recording = Some(mlaserve_kernels::replay::finish());
        } else if let Some(r) = &self.recording {
            let _s = section("replay");
            // SAFETY: the ranges are the loaded model's weights, alive and unmoved while the engine
            // that owns this (and the model) runs.
            std::hint::black_box(unsafe { r.read() });
        }
    }
}

impl Drop for ReplayFloor {
    fn drop(&mut self) {
        if self.armed {
            mlaserve_kernels::replay::finish();
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
            "prefill gemm rows<={} n={} k={}{}: kernels {k_us:.0} us, libtorch {l_us:.0} us -> {}\n",
            s.rows_bucket,
            s.n,
            s.k,
            if s.fp8 { " fp8" } else { "" },
            e.name()
        ));
    }
    Some(out)
}
