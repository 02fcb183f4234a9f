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
        });
        for i in 1..threads.max(1) {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("mlaserve-kernel-{i}"))
                .spawn(move || helper(&s))
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

fn helper(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
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
