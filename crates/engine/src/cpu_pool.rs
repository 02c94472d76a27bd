//! The engine's CPU thread pool. A forward pass runs *inside* the pool (`install`), so the
//! thread that drives the model is one of the workers: each parallel op is shared by the driver
//! and the other workers through work stealing, instead of the driver injecting every op into
//! the pool and sleeping until it is done. For decode, hundreds of small ops per token, that
//! wake-up per op was ~10% of the time (perf: scheduler and futex symbols).
//!
//! Size: `RAYON_NUM_THREADS` (what [`crate::set_cpu_threads`] sets) or all cores.

use std::sync::OnceLock;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

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
    pool().install(f)
}

/// Threads of the pool.
pub fn threads() -> usize {
    pool().current_num_threads()
}
