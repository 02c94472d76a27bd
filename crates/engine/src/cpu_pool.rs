//! The engine's CPU thread pool. A forward pass runs *inside* the pool (`install`), so the
//! thread that drives the model is one of the workers: each parallel op is shared by the driver
//! and the other workers through work stealing, instead of the driver injecting every op into
//! the pool and sleeping until it is done. For decode, hundreds of small ops per token, that
//! wake-up per op was ~10% of the time (perf: scheduler and futex symbols).
//!
//! Within a decode step the ops are many and short (at 8 sequences of SmolLM2, ~150 parallel
//! ops in ~10 ms), and the serial work between them (RoPE, cache appends) outlasts rayon's
//! spinning, so the other workers went to sleep and had to be woken by a futex for nearly every
//! op: in a VM an inter-processor interrupt each (perf on the 2-vCPU Xeon: 15% of samples in
//! `try_to_wake_up`, `futex_wait` and `sched_yield`; an 8-sequence step 13.8 ms, 10.3 ms with
//! rayon patched never to sleep). [`keep_warm`] holds the other workers awake, taking work as
//! it comes, for the span of a step.
//!
//! Pools: a thread that called [`use_own_pool`] (a server worker) runs on its own pool, so
//! workers never share cores; any other thread uses the process-wide pool, sized by
//! `RAYON_NUM_THREADS` (what [`crate::set_cpu_threads`] sets) or all cores.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

thread_local! {
    static OWN: RefCell<Option<Arc<rayon::ThreadPool>>> = const { RefCell::new(None) };
}

/// Gives the calling thread its own pool of `threads` threads for every later [`run`].
pub fn use_own_pool(threads: usize, name: &str) {
    let name = name.to_string();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-cpu-{i}"))
        .build()
        .expect("building a worker's CPU thread pool");
    OWN.with(|o| *o.borrow_mut() = Some(Arc::new(pool)));
}

fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("vvlm-cpu-{i}"))
            .build()
            .expect("building the CPU thread pool")
    })
}

/// Runs `f` on a worker of the engine's pool (directly when already on a rayon worker).
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    match OWN.with(|o| o.borrow().clone()) {
        Some(own) => own.install(f),
        None => pool().install(f),
    }
}

/// How long a worker held by [`keep_warm`] waits for work without finding any before it goes
/// back to rayon's own idling (and sleep): longer than the serial gaps of a decode step, and the
/// most a worker can be held from anything else if the step stalls.
const WARM_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_micros(500);

/// While the returned guard lives, the other workers of the calling thread's pool (when it runs
/// on one, [`run`]) stay awake, each running every job it can find ([`rayon::yield_now`]) and
/// spinning when there is none, instead of sleeping between the short parallel ops of a step
/// and being woken for each. A worker goes back to idling when the guard drops, or after
/// [`WARM_IDLE_LIMIT`] without work. The driving thread is not held. A no-op off a pool and in
/// a pool of one thread.
pub fn keep_warm() -> Warm {
    if !KEEP_WARM.load(Ordering::Relaxed) {
        return Warm(None);
    }
    let Some(driver) = rayon::current_thread_index() else {
        return Warm(None);
    };
    if rayon::current_num_threads() < 2 {
        return Warm(None);
    }
    let state = Arc::new(WarmState::default());
    let shared = state.clone();
    rayon::spawn_broadcast(move |b| {
        if b.index() == driver {
            return;
        }
        shared.held.fetch_add(1, Ordering::AcqRel);
        // Idle rounds in a row; the clock is read every 64th (it was 2% of a step's samples).
        let mut idle_rounds = 0u32;
        let mut idle_since = std::time::Instant::now();
        while !shared.done.load(Ordering::Acquire) {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => idle_rounds = 0,
                Some(rayon::Yield::Idle) => {
                    if idle_rounds == 0 {
                        idle_since = std::time::Instant::now();
                    } else if idle_rounds.is_multiple_of(64)
                        && idle_since.elapsed() > WARM_IDLE_LIMIT
                    {
                        break;
                    }
                    idle_rounds = idle_rounds.wrapping_add(1);
                    // Backing off to a poll every ~32 pauses (1-5 us) while nothing comes: with
                    // many workers held, each looking for work takes the deques' cache lines
                    // from the thread that pushes it.
                    for _ in 0..idle_rounds.min(32) {
                        std::hint::spin_loop();
                    }
                }
                None => break,
            }
        }
        shared.held.fetch_sub(1, Ordering::AcqRel);
    });
    Warm(Some(state))
}

/// Whether [`keep_warm`] holds workers ([`set_keep_warm`]).
static KEEP_WARM: AtomicBool = AtomicBool::new(true);

/// Turns [`keep_warm`] on (the default) or off for this process: off, a step's workers sleep
/// between its ops as rayon has them (for a host whose cores are shared with other work, where a
/// spinning worker takes time from it; or to measure what holding them gains).
pub fn set_keep_warm(on: bool) {
    KEEP_WARM.store(on, Ordering::Relaxed);
}

/// What a [`keep_warm`] guard shares with the workers it holds.
#[derive(Default)]
struct WarmState {
    /// Set when the guard drops: the workers go back to idling.
    done: AtomicBool,
    /// Workers held now.
    held: AtomicUsize,
}

/// Holds a pool's workers awake until dropped ([`keep_warm`]).
#[must_use = "the workers stay awake only while this lives"]
pub struct Warm(Option<Arc<WarmState>>);

impl Drop for Warm {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state.done.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_with_its_own_pool_runs_there() {
        std::thread::spawn(|| {
            super::use_own_pool(3, "t");
            let (n, named) = super::run(|| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                (rayon::current_num_threads(), name)
            });
            assert_eq!(n, 3);
            assert!(named.starts_with("t-cpu-"), "{named}");
        })
        .join()
        .unwrap();
    }

    /// While a step holds the other worker awake, the parallel work completes, all of it, and
    /// is shared (the held worker runs the jobs it steals); the worker is let go afterwards.
    #[test]
    fn warm_workers_take_the_work_and_are_let_go() {
        use rayon::prelude::*;
        std::thread::spawn(|| {
            super::use_own_pool(2, "w");
            // Until the held worker has taken a share (on a loaded machine it may not be
            // scheduled for a while; each pass's jobs sleep so the driver cannot finish alone
            // at once): every pass's work complete.
            let mut both = 0;
            let mut states = vec![];
            let start = std::time::Instant::now();
            while both == 0 && start.elapsed().as_secs() < 20 {
                let (sum, threads) = super::run(|| {
                    let warm = super::keep_warm();
                    states.push(warm.0.clone().expect("a pool of two holds one worker"));
                    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
                    let sum: usize = (0..200usize)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(|i| {
                            seen.lock().unwrap().insert(rayon::current_thread_index());
                            std::thread::sleep(std::time::Duration::from_micros(20));
                            i
                        })
                        .sum();
                    (sum, seen.into_inner().unwrap().len())
                });
                assert_eq!(sum, 200 * 199 / 2);
                both += usize::from(threads == 2);
            }
            // Let go once the guard dropped (or soon after, by the idle limit).
            let t = std::time::Instant::now();
            let held = || {
                states
                    .iter()
                    .map(|s| s.held.load(super::Ordering::Acquire))
                    .sum::<usize>()
            };
            while held() > 0 {
                assert!(t.elapsed().as_secs() < 5, "a worker still held");
                std::thread::yield_now();
            }
            assert!(both > 0, "the held worker never took a share");
        })
        .join()
        .unwrap();
    }
}
