//! The engine's CPU thread pool. A forward pass runs *inside* the pool (`install`), so the
//! thread that drives the model is one of the workers: each parallel op is shared by the driver
//! and the other workers through work stealing, instead of the driver injecting every op into
//! the pool and sleeping until it is done. For decode, hundreds of small ops per token, that
//! wake-up per op was ~10% of the time (perf: scheduler and futex symbols).
//!
//! Pools: a thread that called [`use_own_pool`] (a server worker) runs on its own pool, so
//! workers never share cores; any other thread uses the process-wide pool, sized by
//! `RAYON_NUM_THREADS` (what [`crate::set_cpu_threads`] sets) or all cores.

use std::cell::RefCell;
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
}
