//! The HTTP API: routes, validation, tenants and budgets (through `vvlm-ledger`: SQLite, or a
//! PostgreSQL shared by replicas), admission places shared fairly between tenants (`fair_gate`),
//! the queue (ordered fairly between tenants: `job_queue`) and the inference workers. Each request is
//! planned to the compute-optimal frontier within its tenant's budget before it is queued,
//! charged its planned FLOPs on admission, and settled to the FLOPs the engine measured when it
//! finishes.
//!
//! Media may also come by allow-listed `http(s)://` URL (`remote`, fetched before parsing), and
//! the served checkpoints' tokenizers are exposed as vLLM exposes them (`tokenize`). OpenAI's
//! Files and Batch APIs (`batch`) store JSONL requests in the ledger's database; a background
//! runner (`batch_runner`) runs their lines through these same routes at batch priority.
//!
//! Owns HTTP, authentication, accounting and the web console's embedded files (`console`). Must
//! not know how models compute or how videos are decoded beyond the engine's and the video
//! crate's APIs.

mod admission;
pub mod batch;
pub mod batch_runner;
pub mod cache;
mod chat;
mod completions;
pub mod config;
pub mod console;
pub mod error;
pub mod fair_gate;
pub mod job_queue;
pub mod metrics;
pub mod remote;
mod routes;
mod tokenize;
pub mod validation;
pub mod worker;

pub use config::ServerConfig;
/// The ledger crate, under the name the server has always used for it.
pub use vvlm_ledger as ledger;

use crate::ledger::{Leases, Ledger};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use vvlm_engine::{LoadOptions, VideoVlm};
use vvlm_planner::{Planner, Registry};
use vvlm_scaling::FittedModel;

/// Shared state of a running server.
pub struct AppState {
    pub config: ServerConfig,
    pub ledger: Arc<dyn Ledger>,
    /// This replica's live reservations (renewed every third of a lease) and its journal.
    pub leases: Arc<Leases>,
    pub metrics: Arc<metrics::Metrics>,
    pub pool: worker::Pool,
    /// Places of the requests admitted (decoding, queued or running): queue_depth + workers x
    /// max_batch, shared fairly between tenants.
    pub admission: fair_gate::FairGate,
    /// Decoded frames and vision features of recent videos.
    pub cache: Arc<cache::VideoCache>,
    /// Which `http(s)://` media URLs may be fetched (none unless `url_allow` is set).
    pub url_policy: remote::UrlPolicy,
    /// Set once at least one checkpoint is loaded and the planner built over the loaded ones.
    planner: RwLock<Option<Arc<Planner>>>,
    engines: RwLock<BTreeMap<String, Arc<VideoVlm>>>,
    ready: AtomicBool,
    load_error: RwLock<Option<String>>,
    admin_key_hash: Option<String>,
}

impl AppState {
    pub fn planner(&self) -> Option<Arc<Planner>> {
        self.planner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn engine(&self, name: &str) -> Option<Arc<VideoVlm>> {
        self.engines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
    pub fn engines(&self) -> BTreeMap<String, Arc<VideoVlm>> {
        self.engines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Runs a ledger call on a blocking thread: the ledger is synchronous (SQLite on disk
    /// behind a lock, or PostgreSQL over the network), and the async runtime's threads must
    /// not wait on it. A database that cannot be reached is a 503 `ledger_unavailable`.
    pub async fn ledger_call<T, F>(&self, f: F) -> Result<T, error::ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Ledger) -> Result<T, ledger::LedgerError> + Send + 'static,
    {
        let l = self.ledger.clone();
        tokio::task::spawn_blocking(move || f(l.as_ref()))
            .await
            .map_err(|e| error::ApiError::Internal(format!("ledger task: {e}")))?
            .map_err(|e| error::ApiError::from_ledger(e, self.config.ledger.retry_after_s))
    }
}

/// Errors of start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("ledger: {0}")]
    Ledger(#[from] ledger::LedgerError),
    #[error("scaling model: {0}")]
    Scaling(#[from] vvlm_scaling::ScalingError),
    #[error("planner: {0}")]
    Planner(#[from] vvlm_planner::PlanError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the state: opens the ledger (applying its migrations) and the settlement journal,
/// and starts the workers. Reservations a crashed process left open are not touched here:
/// their leases run out (any replica can be running). Checkpoints load in the background: call
/// [`load_models`]; [`serve`] renews leases.
pub fn build_state(mut config: ServerConfig) -> Result<Arc<AppState>, StartError> {
    config.resolve_threads();
    let url_policy = remote::UrlPolicy::new(
        &config.url_allow,
        config.url_private,
        config.url_timeout_s,
        config.media.max_bytes,
    )
    .map_err(StartError::Config)?;
    let options = config.ledger.options();
    let ledger = ledger::open(&config.db, &options)?;
    let journal = config.journal_path();
    let leases = Arc::new(Leases::new(ledger.clone(), &journal)?);
    tracing::info!(
        backend = ledger.backend(),
        db = %ledger::redact(&config.db),
        owner = %options.lease.owner,
        lease_s = options.lease.lease_s,
        journal = %journal.display(),
        "ledger open"
    );
    let metrics = Arc::new(metrics::Metrics::default());
    let places = config.limits.queue_depth + config.workers() * config.limits.max_batch.max(1);
    let admission = fair_gate::FairGate::new(places);
    // The queue holds every admitted request (the places bound it): one that has a place is
    // never refused later for room in the queue (when batches were bounded by their KV tokens
    // before their sequences, a queue of `queue_depth` filled while places were left, and
    // requests already planned and reserved got 429).
    let pool = worker::Pool::start(
        config.workers(),
        config.threads_per_worker(),
        worker::BatchLimits {
            max_sequences: config.limits.max_batch.max(1),
            max_tokens: config.limits.max_batch_tokens,
            joins_per_step: config.limits.joins_per_step,
            encode_quantum: std::time::Duration::from_millis(config.limits.encode_quantum_ms),
            background_rows: config.batch.rows_beside_interactive,
            background_share: config.batch.worker_share,
        },
        metrics.clone(),
    );
    let admin_key_hash = config
        .admin_key
        .as_deref()
        .filter(|k| !k.is_empty())
        .map(ledger::hash_key);
    let video_cache = Arc::new(cache::VideoCache::new(config.cache.max_bytes));
    metrics.watch_cache(video_cache.clone());
    metrics.watch_admission(admission.clone());
    Ok(Arc::new(AppState {
        cache: video_cache,
        url_policy,
        config,
        ledger,
        leases,
        metrics,
        admission,
        pool,
        planner: RwLock::new(None),
        engines: RwLock::new(BTreeMap::new()),
        ready: AtomicBool::new(false),
        load_error: RwLock::new(None),
        admin_key_hash,
    }))
}

/// Loads every registered checkpoint that exists on disk and builds the planner over them.
/// Blocking: run it on a blocking thread. The server answers 503 until it finishes.
pub fn load_models(state: &AppState) -> Result<(), StartError> {
    let r = (|| {
        let registry = Registry::load_dir(&state.config.models_dir)?;
        let default = Arc::new(FittedModel::load(&state.config.scaling_model)?);
        let mut tasks = BTreeMap::new();
        tasks.insert("caption".to_string(), default.clone());
        tasks.insert("qa".to_string(), default);
        for (name, path) in &state.config.task_models {
            tasks.insert(name.clone(), Arc::new(FittedModel::load(path)?));
        }
        let mut load_options = LoadOptions::parse(&state.config.device, &state.config.dtype)
            .map_err(|e| StartError::Config(e.to_string()))?;
        load_options.quantized_decode = state.config.quantized_decode;
        load_options.prefill_chunk = state.config.prefill_chunk;
        load_options.quantized_prefill = state.config.quantized_prefill;
        load_options.kv_cache = state.config.kv_cache_dtype;
        vvlm_engine::set_device_kernels(state.config.cuda_kernels);
        vvlm_engine::set_cpu_kernels(state.config.cpu_kernels)
            .map_err(|e| StartError::Config(e.to_string()))?;
        vvlm_engine::cpu_pool::set_keep_warm(state.config.cpu_keep_warm);
        tracing::info!(
            device = %state.config.device,
            dtype = ?load_options.dtype,
            cpu_kernels = vvlm_engine::qdot::Isa::best().name(),
            "engine placement"
        );
        let mut loaded = Registry::default();
        let mut engines = BTreeMap::new();
        for entry in &registry.models {
            if !entry.path.join("config.json").exists() {
                tracing::warn!(model = %entry.name, path = %entry.path.display(), "checkpoint not found; not served");
                continue;
            }
            let t = std::time::Instant::now();
            match VideoVlm::load(&entry.path, &load_options) {
                Ok(m) => {
                    for note in &m.notes {
                        tracing::warn!(model = %entry.name, "{note}");
                    }
                    tracing::info!(model = %entry.name, seconds = t.elapsed().as_secs_f64(), "loaded");
                    engines.insert(entry.name.clone(), Arc::new(m));
                    loaded.models.push(entry.clone());
                }
                Err(e) => tracing::error!(model = %entry.name, "failed to load: {e}"),
            }
        }
        if loaded.models.is_empty() {
            return Err(StartError::Config(format!(
                "no checkpoint in {} could be loaded (run scripts/setup-models)",
                state.config.models_dir.display()
            )));
        }
        let mut planner = Planner::new(loaded, tasks)?;
        planner.cost_mode = state.config.planner.cost_mode;
        planner.data_size_m = state.config.planner.data_size_m;
        for (name, m) in &engines {
            planner.set_arch(name, m.arch());
            if let Some(n) = m.cfg.text_config.max_position_embeddings {
                planner.set_context(name, n);
            }
        }
        *state.engines.write().unwrap_or_else(|p| p.into_inner()) = engines;
        *state.planner.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(planner));
        state.ready.store(true, Ordering::Release);
        Ok(())
    })();
    if let Err(e) = &r {
        *state.load_error.write().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
    r
}

pub use routes::router;

/// Serves until `shutdown` resolves, then finishes in-flight requests (bounded by the grace
/// period). HTTP/1.1 with connection limits: headers (and idle keep-alive) within
/// `header_timeout_s`, bodies within `body_timeout_s`, at most `max_connections` at once, and
/// accept errors (e.g. out of file descriptors) waited out rather than fatal.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::time::Duration;
    use tower::ServiceExt as _;
    let renewer = tokio::spawn(renew_leases(state.clone()));
    let (stop_batches, batches_stopped) = tokio::sync::watch::channel(false);
    let runs_batches = state.config.batch.enabled && state.config.batch.concurrency > 0;
    let batches =
        runs_batches.then(|| tokio::spawn(batch_runner::run(state.clone(), batches_stopped)));
    let limits = &state.config.limits;
    let grace = Duration::from_secs_f64(limits.shutdown_grace_s.max(0.0));
    let header_timeout = Duration::from_secs_f64(limits.header_timeout_s.max(0.1));
    let app = router(state.clone()).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        Duration::from_secs_f64(limits.body_timeout_s.max(0.1)),
    ));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accept: {e}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone().map_request(
            |r: axum::http::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
        ));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    // Batches start no new line; the lines running finish with the connections.
    let _ = stop_batches.send(true);
    let batches = async {
        if let Some(b) = batches {
            let _ = b.await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), batches) } => {},
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over; exiting with requests still in flight");
        }
    }
    renewer.abort();
    // A last journal replay, for at most 3 s (the database may be down); what is still
    // journaled is replayed by the next process that opens the same journal.
    let leases = state.leases.clone();
    let last = tokio::task::spawn_blocking(move || leases.tick(ledger::now()));
    match tokio::time::timeout(Duration::from_secs(3), last).await {
        Ok(Ok(t)) if t.pending == 0 => {}
        _ => tracing::warn!(
            pending = state.leases.journal().pending().map_or(0, |p| p.len()),
            journal = %state.leases.journal().path().display(),
            "settlements still journaled at exit; the next process on this journal replays them"
        ),
    }
    Ok(())
}

/// Every third of a lease: renews this replica's leases, replays the journal, expires dead
/// leases of any replica, and records whether the database answered.
async fn renew_leases(state: Arc<AppState>) {
    let every = std::time::Duration::from_secs_f64(state.config.ledger.lease_s.max(2) as f64 / 3.0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leases = state.leases.clone();
        match tokio::task::spawn_blocking(move || leases.tick(ledger::now())).await {
            Ok(t) => state.metrics.ledger_tick(t.available, t.pending),
            Err(e) => tracing::error!("lease renewal task: {e}"),
        }
    }
}
