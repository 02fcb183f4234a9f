//! A fork-join pool for the CPU kernels whose helpers stay hot between the many small products of a
//! forward pass.
//!
//! A decode step runs dozens of products of a few hundred microseconds each, separated by small
//! single-threaded libtorch ops. Pools that put idle threads to sleep at once (rayon, OpenMP made
//! passive) pay a futex wake-up, tens to hundreds of microseconds on virtual machines, per product.
//! Here the calling thread takes part in the work and the helpers spin for a short while
//! ([`SPIN`]) before parking, so within a step every product starts at once, while an idle stage
//! still sleeps. A caller that knows no product follows soon (a worker between steps) says so with
//! [`Pool::rest`]: the helpers park at once instead of spinning on a core that the router, the
//! RPC threads and the client need (on 2 cores a spinning helper cost ~0.1-0.3 ms per step there).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A raw pointer that tasks of one parallel region share, each writing its own disjoint part.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: users give every task a disjoint range behind the pointer, alive for the region.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// A method, so that closures capture the wrapper (Sync), not its raw field.
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// How long a helper keeps polling for work before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// Most ranges one [`Pool::prefetch`] hint carries; more are dropped.
pub(crate) const HINT_RANGES: usize = 16;
/// Most bytes one hint streams: about what a helper's L2 and its share of L3 keep until the
/// product that reads them starts (a longer gap than that is rare in a decode step).
const HINT_BYTES: usize = 4 << 20;

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

struct Shared {
    /// The current job (a `Job` on the caller's stack), null between jobs.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every job, so helpers notice new work.
    epoch: AtomicU64,
    /// Helpers currently holding a reference to `job`.
    inside: AtomicUsize,
    sleepers: AtomicUsize,
    /// Set by [`Pool::rest`], cleared by the next job: helpers park without spinning.
    resting: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
    /// The memory the next product reads, posted by [`Pool::prefetch`]: (address, bytes) pairs.
    hint: [(AtomicUsize, AtomicUsize); HINT_RANGES],
    hint_count: AtomicUsize,
    /// The job the hint follows: helpers start on it once they have seen that job's epoch.
    hint_job: AtomicU64,
    /// Bumped for every hint; helpers that see it change while idle stream the ranges into cache.
    hint_epoch: AtomicU64,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One job at a time: callers on other threads queue here.
    running: Mutex<()>,
}

impl Pool {
    /// A pool running jobs on the caller plus `threads - 1` helpers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            inside: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            resting: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
            hint: std::array::from_fn(|_| (AtomicUsize::new(0), AtomicUsize::new(0))),
            hint_count: AtomicUsize::new(0),
            hint_job: AtomicU64::new(0),
            hint_epoch: AtomicU64::new(0),
        });
        for i in 1..threads.max(1) {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("mlaserve-kernel-{i}"))
                .spawn(move || helper(&s, i, threads))
                .expect("spawn kernel thread");
        }
        Pool { shared, threads: threads.max(1), running: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// No job is expected for a while: helpers park now rather than spin (the next job wakes them).
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::SeqCst);
    }

    /// Hints that the product after the next job reads `ranges` (address, bytes): helpers done
    /// with their part of that job stream the ranges into their caches until the following job
    /// arrives, so the single-threaded work between two products (norms, rotary, routing: ~20 µs
    /// each at decode) overlaps the next product's memory reads instead of leaving the memory
    /// bus idle. A hint replaces the previous one; one whose job ran inline (one task) applies
    /// after the next published job instead. Only a hint: the ranges are never dereferenced, just
    /// prefetched (prefetches do not fault), so a stale or torn range costs bandwidth, not
    /// safety. A no-op on one thread, or while the helpers sleep.
    pub fn prefetch(&self, ranges: &[(usize, usize)]) {
        if self.threads == 1 || ranges.is_empty() {
            return;
        }
        let s = &self.shared;
        if s.sleepers.load(Ordering::Relaxed) == self.threads - 1 {
            return;
        }
        let n = ranges.len().min(HINT_RANGES);
        for (slot, &(addr, len)) in s.hint.iter().zip(ranges) {
            slot.0.store(addr, Ordering::Relaxed);
            slot.1.store(len, Ordering::Relaxed);
        }
        s.hint_count.store(n, Ordering::Relaxed);
        s.hint_job.store(s.epoch.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        s.hint_epoch.fetch_add(1, Ordering::Release);
    }

    /// Calls `f(i)` for every `i < tasks`, spread over the pool; returns when all are done.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.threads == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { f, tasks, next: AtomicUsize::new(0), done: AtomicUsize::new(0) };
        let s = &self.shared;
        s.resting.store(false, Ordering::SeqCst);
        // SAFETY: the lifetime is erased only while `job` is published; it is unpublished and every
        // helper has let go of it (`inside` back to 0) before this function returns.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(&job);
        while job.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while s.inside.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

fn work(job: &Job) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        (job.f)(i);
        job.done.fetch_add(1, Ordering::Release);
    }
}

/// Streams the posted hint's ranges into cache for pool thread `me` of `threads` (see
/// [`hint_chunks`]); stops as soon as a job is published (the epoch moves past `seen`).
fn prefetch_hint(s: &Shared, me: usize, threads: usize, seen: u64) {
    let n = s.hint_count.load(Ordering::Relaxed).min(HINT_RANGES);
    let mut ranges = [(0usize, 0usize); HINT_RANGES];
    for (r, slot) in ranges.iter_mut().zip(&s.hint[..n]) {
        *r = (slot.0.load(Ordering::Relaxed), slot.1.load(Ordering::Relaxed));
    }
    for (addr, len) in hint_chunks(&ranges[..n], me, threads, HINT_BYTES) {
        if s.epoch.load(Ordering::Relaxed) != seen {
            return;
        }
        prefetch_range::<TO_L1>(addr, len);
    }
}

/// Prefetch targets (x86 `_MM_HINT_T0` / `_MM_HINT_T1`); aarch64 prefetches into L2 for both.
pub(crate) const TO_L1: i32 = 3;
pub(crate) const TO_L2: i32 = 2;

/// Prefetches of every cache line of `[addr, addr + len)` towards `TO` ([`TO_L1`] or [`TO_L2`]);
/// never faults, whatever the range.
pub(crate) fn prefetch_range<const TO: i32>(addr: usize, len: usize) {
    for line in (0..len).step_by(64) {
        prefetch_line::<TO>(addr.wrapping_add(line));
    }
}

/// The order a helper streams a hint in: the `ranges` taken as one sequence of bytes (the order
/// the product reads them), cut into 4 KiB chunks, starting at the share that pool thread `me`
/// of `threads` reads first in a decode product ([`thread_index`], `crate::shares`), then on
/// to the end and round from the start to the others' shares; at most `cap` bytes in all.
fn hint_chunks(
    ranges: &[(usize, usize)],
    me: usize,
    threads: usize,
    cap: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    const CHUNK: usize = 4096;
    let total: usize = ranges.iter().map(|r| r.1).sum();
    let start = (total / threads.max(1)).saturating_mul(me) % total.max(1);
    let (mut at, mut left) = (start, total.min(cap));
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        // Byte `at` of the sequence: its range and the offset in it.
        let (mut r, mut off) = (0, at);
        while off >= ranges[r].1 {
            off -= ranges[r].1;
            r += 1;
        }
        let len = CHUNK.min(ranges[r].1 - off).min(left);
        left -= len;
        at = if at + len >= total { 0 } else { at + len };
        Some((ranges[r].0.wrapping_add(off), len))
    })
}

/// A prefetch of the cache line at `addr` (see [`prefetch_range`]); never faults, whatever `addr` is.
#[inline(always)]
fn prefetch_line<const TO: i32>(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it does not fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<TO>(addr as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (PRFM never faults).
    unsafe {
        std::arch::asm!("prfm pldl2keep, [{0}]", in(reg) addr, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = addr;
}

fn helper(s: &Shared, me: usize, threads: usize) {
    INDEX.with(|i| i.set(me));
    let mut seen = s.epoch.load(Ordering::SeqCst);
    let mut hint_seen = s.hint_epoch.load(Ordering::Acquire);
    loop {
        // Spin for new work, then park.
        let since = Instant::now();
        let mut polls = 0u32;
        loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            let h = s.hint_epoch.load(Ordering::Acquire);
            if h != hint_seen && s.hint_job.load(Ordering::Relaxed) == seen {
                hint_seen = h;
                prefetch_hint(s, me, threads, seen);
                continue;
            }
            // The clock is read every 64 polls: a read per poll was ~5% of a decode step's CPU
            // samples (perf), time a sibling hyperthread could use.
            polls = polls.wrapping_add(1);
            if !s.resting.load(Ordering::Relaxed) && (!polls.is_multiple_of(64) || since.elapsed() < SPIN) {
                std::hint::spin_loop();
                continue;
            }
            let g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            // Re-check under the lock: a job published before we counted ourselves asleep.
            let g = if s.epoch.load(Ordering::SeqCst) == seen {
                s.wake.wait_timeout(g, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0
            } else {
                g
            };
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(g);
        }
        s.inside.fetch_add(1, Ordering::SeqCst);
        let p = s.job.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: the caller keeps the job alive until `inside` drops to zero (see for_each).
            work(unsafe { &*p });
        }
        s.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    /// This thread's place in its pool: helpers 1.., every other thread 0.
    static INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The calling thread's index in the pool it helps (0 for callers): which share of a decode
/// product it reads first, the same share its prefetches fetched (see [`Pool::prefetch`]).
pub(crate) fn thread_index() -> usize {
    INDEX.with(|i| i.get())
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// Sets the size of the global pool; only the first call (before any kernel runs) has an effect.
pub fn init_global(threads: usize) -> bool {
    GLOBAL.set(Pool::new(threads)).is_ok()
}

/// The pool the kernels use (all cores unless [`init_global`] chose otherwise).
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| Pool::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefetch targets are x86's hint values, and a prefetch of any range (unmapped, past the
    /// end of the address space) does not fault.
    #[test]
    fn prefetch_targets_and_ranges() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!((TO_L1, TO_L2), (std::arch::x86_64::_MM_HINT_T0, std::arch::x86_64::_MM_HINT_T1));
        let v = vec![1u8; 4096];
        prefetch_range::<TO_L2>(v.as_ptr() as usize, v.len());
        prefetch_range::<TO_L1>(usize::MAX - 100, 4096);
        prefetch_range::<TO_L2>(0, 0);
    }

    /// A hint covers every byte of its ranges once (up to the cap), in chunks inside one range,
    /// starting at the caller's share of the sequence.
    #[test]
    fn hint_chunks_cover_each_byte_once_from_the_own_share() {
        let ranges = [(1000, 5000), (50_000, 0), (90_000, 9000), (200_000, 100)];
        let total = 14_100;
        for threads in 1..4 {
            for me in 0..threads {
                let chunks: Vec<(usize, usize)> = hint_chunks(&ranges, me, threads, usize::MAX).collect();
                let mut bytes: Vec<usize> = chunks.iter().flat_map(|&(a, l)| a..a + l).collect();
                let first = chunks[0].0;
                bytes.sort_unstable();
                let want: Vec<usize> = ranges.iter().flat_map(|&(a, l)| a..a + l).collect();
                assert_eq!(bytes, want, "{me} of {threads}");
                assert!(chunks.iter().all(|&(_, l)| l > 0 && l <= 4096));
                // The first chunk starts at byte total/threads·me of the sequence.
                let mut at = total / threads * me;
                let start = ranges.iter().find_map(|&(a, l)| {
                    if at < l {
                        Some(a + at)
                    } else {
                        at -= l;
                        None
                    }
                });
                assert_eq!(Some(first), start, "{me} of {threads}");
            }
        }
        let capped: usize = hint_chunks(&ranges, 1, 2, 6000).map(|c| c.1).sum();
        assert_eq!(capped, 6000);
        assert_eq!(hint_chunks(&[], 0, 2, 100).count(), 0);
        assert_eq!(hint_chunks(&[(5, 0)], 1, 2, 100).count(), 0);
    }

    /// Hints naming memory that is not mapped (prefetches never fault) or torn by a concurrent
    /// hint, posted around jobs from several threads: every job still runs each task once.
    #[test]
    fn jobs_after_any_hint() {
        let pool = Arc::new(Pool::new(3));
        let buf = vec![1u8; 1 << 20];
        let good = (buf.as_ptr() as usize, buf.len());
        let hs: Vec<_> = (0..2)
            .map(|t| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    for round in 0..200usize {
                        let bad = (usize::MAX - 4095, 1 << 30);
                        let ranges =
                            if (round + t) % 2 == 0 { vec![bad, (8, 1 << 20)] } else { vec![good; 20] };
                        p.prefetch(&ranges);
                        let hits: Vec<AtomicUsize> = (0..9).map(|_| AtomicUsize::new(0)).collect();
                        p.for_each(9, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        drop(buf);
    }

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = Pool::new(3);
        for tasks in [0usize, 1, 2, 7, 100] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn jobs_after_the_helpers_parked() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.for_each(4, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 3);
        pool.for_each(4, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }

    /// Jobs after `rest` (helpers parked at once, or still finishing their spin) all run.
    #[test]
    fn jobs_after_rest() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        for round in 0..50 {
            pool.for_each(8, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            pool.rest();
            if round % 10 == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        assert_eq!(sum.load(Ordering::Relaxed), 50 * 28);
    }

    #[test]
    fn callers_on_several_threads() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (p, t) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        p.for_each(5, &|_| {
                            t.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 5);
    }
}
