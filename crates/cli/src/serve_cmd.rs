//! `vvlm serve` and `vvlm tenant`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use vvlm_cost::parse_si;
use vvlm_server::ledger::{now, LeaseSettings, Options, Period, TenantSettings};
use vvlm_server::ServerConfig;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Configuration file (default: the embedded configs/server.toml).
    #[arg(long, env = "VVLM_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "VVLM_BIND")]
    pub bind: Option<String>,
    /// The ledger: a SQLite file path, or a postgres:// URL shared by replicas.
    #[arg(long, env = "VVLM_DB", hide_env_values = true)]
    pub db: Option<String>,
    /// Seconds a reservation holds unless its replica renews it (every third of this).
    #[arg(long, env = "VVLM_LEASE_S")]
    pub lease_s: Option<i64>,
    /// This replica's journal of settlements made while the database was unreachable.
    #[arg(long, env = "VVLM_LEDGER_JOURNAL")]
    pub ledger_journal: Option<PathBuf>,
    #[arg(long, env = "VVLM_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    #[arg(long, env = "VVLM_SCALING_MODEL")]
    pub scaling_model: Option<PathBuf>,
    /// Admin API key (required for /admin/*).
    #[arg(long, env = "VVLM_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    #[arg(long, env = "VVLM_COST_MODE", value_enum)]
    pub cost_mode: Option<crate::eval_plan::CostModeArg>,
    #[arg(long, env = "VVLM_QUEUE_DEPTH")]
    pub queue_depth: Option<usize>,
    #[arg(long, env = "VVLM_WORKERS")]
    pub workers: Option<usize>,
    #[arg(long, env = "VVLM_THREADS_PER_WORKER")]
    pub threads_per_worker: Option<usize>,
    #[arg(long, env = "VVLM_REQUEST_TIMEOUT_S")]
    pub request_timeout_s: Option<f64>,
    #[arg(long, env = "VVLM_MAX_TOKENS")]
    pub max_tokens: Option<usize>,
    #[arg(long, env = "VVLM_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<u64>,
    #[arg(long, env = "VVLM_MAX_VIDEO_SECONDS")]
    pub max_video_seconds: Option<f64>,
    #[arg(long, env = "VVLM_MAX_FRAMES")]
    pub max_frames: Option<usize>,
    #[arg(long, env = "VVLM_DECODE_TIMEOUT_S")]
    pub decode_timeout_s: Option<f64>,
    /// Seconds to send a request's headers (and to stay idle between requests).
    #[arg(long, env = "VVLM_HEADER_TIMEOUT_S")]
    pub header_timeout_s: Option<f64>,
    /// Seconds for a request's body to arrive (then 408).
    #[arg(long, env = "VVLM_BODY_TIMEOUT_S")]
    pub body_timeout_s: Option<f64>,
    /// Connections served at once.
    #[arg(long, env = "VVLM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a request waits for a place in the queue before 429.
    #[arg(long, env = "VVLM_QUEUE_WAIT_S")]
    pub queue_wait_s: Option<f64>,
    /// Sequences each worker decodes together (continuous batching; 1: one at a time).
    #[arg(long, env = "VVLM_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Bytes the video cache may hold (0: no cache).
    #[arg(long, env = "VVLM_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<usize>,
    /// Where models run: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, env = "VVLM_DEVICE")]
    pub device: Option<String>,
    /// auto (bf16 on a GPU, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, env = "VVLM_DTYPE")]
    pub dtype: Option<String>,
    /// CPU decode of GGUF Q4_1/Q8_0 matrices: int8 (8-bit activations, integer dot products,
    /// fastest) or off (the dequantized f32 matrices, exact).
    #[arg(long, env = "VVLM_QUANTIZED_DECODE")]
    pub quantized_decode: Option<QuantizedDecodeArg>,
    /// With int8 quantized decode: prefill from the quantized blocks too and drop the f32
    /// copies of those matrices (less memory, faster prefill); false prefills in exact f32.
    #[arg(long, env = "VVLM_QUANTIZED_PREFILL", action = clap::ArgAction::Set)]
    pub quantized_prefill: Option<bool>,
    /// Prompt tokens prefilled per forward pass (0: whole prompts); the requests already
    /// decoding take a step between two chunks.
    #[arg(long, env = "VVLM_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// KV cache element type: auto (the model's dtype) or f16 (an f32 LM on the CPU: half the
    /// cache memory and half the bytes decode reads from it).
    #[arg(long, env = "VVLM_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<KvCacheDtypeArg>,
    /// On CUDA: fused (the engine's own kernels where they apply) or unfused (candle's ops
    /// alone: the escape hatch should one of ours misbehave on a GPU).
    #[arg(long, env = "VVLM_CUDA_KERNELS")]
    pub cuda_kernels: Option<CudaKernelsArg>,
    /// The CPU's integer kernels: auto (the best this processor has) or one by name (the same
    /// results; to compare them or avoid one). One the CPU cannot run is a startup error.
    #[arg(long, env = "VVLM_CPU_KERNELS", value_parser = vvlm_engine_bench::cpu_kernels_parser())]
    pub cpu_kernels: Option<vvlm_engine::CpuKernels>,
    /// Whether a worker's other CPU threads stay awake through a forward pass (spinning between
    /// its ops) instead of sleeping and being woken for each op: true (the default) or false.
    #[arg(long, env = "VVLM_CPU_KEEP_WARM")]
    pub cpu_keep_warm: Option<bool>,
    /// Folders file:// URLs may read from (repeatable).
    #[arg(long = "file-allow", env = "VVLM_FILE_ALLOW", value_delimiter = ',')]
    pub file_allow: Vec<PathBuf>,
    /// URL prefixes http(s):// video and image URLs may be fetched from (repeatable; none: the
    /// server fetches nothing from the network).
    #[arg(long = "url-allow", env = "VVLM_URL_ALLOW", value_delimiter = ',')]
    pub url_allow: Vec<String>,
    /// Allowed URLs may resolve to loopback, private or link-local addresses.
    #[arg(long, env = "VVLM_URL_PRIVATE")]
    pub url_private: bool,
    /// Seconds a media URL's fetch may take in all.
    #[arg(long, env = "VVLM_URL_TIMEOUT_S")]
    pub url_timeout_s: Option<f64>,
    /// Batch lines this replica runs at once (`[batch] concurrency`); 0 runs no batch here
    /// (the Files and Batch APIs still answer; another replica runs the batches).
    #[arg(long, env = "VVLM_BATCH_CONCURRENCY")]
    pub batch_concurrency: Option<usize>,
    /// Batch lines that take a decode step beside an interactive request's
    /// (`[batch] rows_beside_interactive`; the others wait their turn).
    #[arg(long, env = "VVLM_BATCH_ROWS_BESIDE_INTERACTIVE")]
    pub batch_rows_beside_interactive: Option<usize>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum QuantizedDecodeArg {
    Int8,
    Off,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KvCacheDtypeArg {
    Auto,
    F16,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CudaKernelsArg {
    Fused,
    Unfused,
}

pub fn config(a: &ServeArgs) -> Result<ServerConfig> {
    // Layers: embedded configs/server.toml <- the file's keys <- environment <- flags.
    let mut c = match &a.config {
        Some(p) => ServerConfig::layered(Some(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ))
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => ServerConfig::embedded(),
    };
    if let Some(v) = &a.bind {
        c.bind = v.clone();
    }
    if let Some(v) = &a.db {
        c.db = v.clone();
    }
    if let Some(v) = a.lease_s {
        c.ledger.lease_s = v;
    }
    if let Some(v) = &a.ledger_journal {
        c.ledger.journal = Some(v.clone());
    }
    if let Some(v) = &a.models_dir {
        c.models_dir = v.clone();
    }
    if let Some(v) = &a.scaling_model {
        c.scaling_model = v.clone();
    }
    if let Some(v) = &a.device {
        c.device = v.clone();
    }
    if let Some(v) = &a.dtype {
        c.dtype = v.clone();
    }
    if let Some(v) = a.prefill_chunk {
        c.prefill_chunk = v;
    }
    if let Some(v) = a.quantized_prefill {
        c.quantized_prefill = v;
    }
    if let Some(v) = a.quantized_decode {
        c.quantized_decode = match v {
            QuantizedDecodeArg::Int8 => vvlm_engine::QuantizedDecode::Int8,
            QuantizedDecodeArg::Off => vvlm_engine::QuantizedDecode::Off,
        };
    }
    if let Some(v) = a.kv_cache_dtype {
        c.kv_cache_dtype = match v {
            KvCacheDtypeArg::Auto => vvlm_engine::KvCacheDtype::Auto,
            KvCacheDtypeArg::F16 => vvlm_engine::KvCacheDtype::F16,
        };
    }
    if let Some(v) = a.cuda_kernels {
        c.cuda_kernels = match v {
            CudaKernelsArg::Fused => vvlm_engine::DeviceKernels::Fused,
            CudaKernelsArg::Unfused => vvlm_engine::DeviceKernels::Unfused,
        };
    }
    if let Some(v) = a.cpu_kernels {
        c.cpu_kernels = v;
    }
    if let Some(v) = a.cpu_keep_warm {
        c.cpu_keep_warm = v;
    }
    if let Some(v) = &a.admin_key {
        c.admin_key = Some(v.clone());
    }
    if let Some(v) = a.cost_mode {
        c.planner.cost_mode = match v {
            crate::eval_plan::CostModeArg::Theoretical => vvlm_planner::CostMode::Theoretical,
            crate::eval_plan::CostModeArg::Exact => vvlm_planner::CostMode::Exact,
        };
    }
    macro_rules! set {
        ($field:expr, $v:expr) => {
            if let Some(v) = $v {
                $field = v;
            }
        };
    }
    set!(c.limits.queue_depth, a.queue_depth);
    set!(c.limits.workers, a.workers);
    set!(c.limits.threads_per_worker, a.threads_per_worker);
    set!(c.limits.request_timeout_s, a.request_timeout_s);
    set!(c.limits.max_tokens, a.max_tokens);
    set!(c.media.max_bytes, a.max_upload_bytes);
    set!(c.media.max_duration_s, a.max_video_seconds);
    set!(c.media.max_sampled_frames, a.max_frames);
    set!(c.media.decode_timeout_s, a.decode_timeout_s);
    set!(c.limits.header_timeout_s, a.header_timeout_s);
    set!(c.limits.body_timeout_s, a.body_timeout_s);
    set!(c.limits.max_connections, a.max_connections);
    set!(c.limits.queue_wait_s, a.queue_wait_s);
    set!(c.limits.max_batch, a.max_batch);
    set!(c.cache.max_bytes, a.cache_max_bytes);
    if let Some(b) = a.max_upload_bytes {
        c.limits.max_body_bytes = c.limits.max_body_bytes.max(b as usize + 1024 * 1024);
    }
    if !a.file_allow.is_empty() {
        c.file_allow = a.file_allow.clone();
    }
    if !a.url_allow.is_empty() {
        c.url_allow = a.url_allow.clone();
    }
    c.url_private |= a.url_private;
    set!(c.url_timeout_s, a.url_timeout_s);
    set!(c.batch.concurrency, a.batch_concurrency);
    set!(
        c.batch.rows_beside_interactive,
        a.batch_rows_beside_interactive
    );
    Ok(c)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let mut c = config(&a)?;
    c.resolve_threads();
    // A bad device or dtype is a startup error, not a server that answers 503 forever.
    vvlm_engine::LoadOptions::parse(&c.device, &c.dtype)
        .with_context(|| format!("device {:?} / dtype {:?}", c.device, c.dtype))?;
    vvlm_engine::set_cpu_kernels(c.cpu_kernels).context("cpu_kernels")?;
    let threads = c.threads_per_worker();
    vvlm_engine::set_cpu_threads(threads);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let state = vvlm_server::build_state(c.clone())?;
        let listener = tokio::net::TcpListener::bind(&c.bind)
            .await
            .with_context(|| format!("binding {}", c.bind))?;
        tracing::info!(bind = %listener.local_addr()?, workers = state.pool.workers, threads, "vvlm listening (503 until models load)");
        let loader = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = vvlm_server::load_models(&loader) {
                tracing::error!("{e}");
            } else {
                tracing::info!("ready");
            }
        });
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
        };
        vvlm_server::serve(state, listener, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create a tenant and print its API key (shown once).
    Add {
        name: String,
        #[arg(long)]
        default_budget: Option<String>,
        #[arg(long)]
        per_request_max: Option<String>,
        #[arg(long)]
        quota: Option<String>,
        #[arg(long, default_value = "day")]
        period: String,
        /// Requests the tenant may have in flight on a server at once (default: the server's
        /// `[limits] tenant_max_in_flight`).
        #[arg(long)]
        max_in_flight: Option<u32>,
        /// Share of a server's places while other tenants wait too, relative to theirs
        /// (0.01-100; default 1).
        #[arg(long)]
        weight: Option<f64>,
        /// A URL prefix (`https://host/path/`, `file:///folder/`) its media may be read from,
        /// narrowing the server's url_allow and file_allow (repeatable; default: the server's).
        #[arg(long = "media-allow")]
        media_allow: Vec<String>,
    },
    /// List tenants with their usage.
    List,
    /// Usage of one tenant in its current period.
    Usage { name: String },
    /// Change a tenant's budgets (`--quota none` removes the quota).
    Set {
        name: String,
        #[arg(long)]
        default_budget: Option<String>,
        #[arg(long)]
        per_request_max: Option<String>,
        #[arg(long)]
        quota: Option<String>,
        #[arg(long)]
        period: Option<String>,
        /// Requests in flight at once (`none`: the server's default).
        #[arg(long)]
        max_in_flight: Option<String>,
        /// Share of a server's places under contention (`none`: 1).
        #[arg(long)]
        weight: Option<String>,
        /// Replaces its media prefixes (repeatable; `none`: the server's lists alone).
        #[arg(long = "media-allow")]
        media_allow: Vec<String>,
    },
    /// Remove a tenant (its key stops working; its accounting history is kept).
    Remove { name: String },
}

#[derive(Args, Debug)]
pub struct TenantArgs {
    /// The ledger: a SQLite file path, or a postgres:// URL.
    #[arg(
        long,
        env = "VVLM_DB",
        default_value = "vvlm.db",
        hide_env_values = true
    )]
    pub db: String,
    #[command(subcommand)]
    pub cmd: TenantCmd,
}

fn flops(s: &Option<String>, what: &str) -> Result<Option<f64>> {
    s.as_ref()
        .map(|v| {
            parse_si(v)
                .with_context(|| format!("--{what} `{v}` is not a number of FLOPs (5e12, 5T)"))
        })
        .transpose()
}

/// A `set` flag's value: absent (unchanged), `none` (cleared) or a number.
fn set_or_clear<T: std::str::FromStr>(v: &Option<String>, flag: &str) -> Result<Option<Option<T>>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    Ok(match v.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(v) => Some(Some(v.parse::<T>().with_context(|| {
            format!("--{flag} `{v}` is not a number (or `none`)")
        })?)),
    })
}

/// `--media-allow` given: the prefixes, checked (`none` alone: back to the server's lists).
fn media_prefixes(given: Vec<String>) -> Result<Option<Option<Vec<String>>>> {
    match given.as_slice() {
        [] => Ok(None),
        [none] if none == "none" => Ok(Some(None)),
        _ => {
            vvlm_server::remote::check_media_allow(&given).map_err(anyhow::Error::msg)?;
            Ok(Some(Some(given)))
        }
    }
}

pub fn tenant(a: TenantArgs) -> Result<()> {
    // The tenant commands never reserve: the lease settings are unused.
    let l = vvlm_server::ledger::open(&a.db, &Options::new(LeaseSettings::new(30)))?;
    match a.cmd {
        TenantCmd::Add {
            name,
            default_budget,
            per_request_max,
            quota,
            period,
            max_in_flight,
            weight,
            media_allow,
        } => {
            let s = TenantSettings {
                default_budget: flops(&default_budget, "default-budget")?,
                per_request_max: flops(&per_request_max, "per-request-max")?,
                quota: flops(&quota, "quota")?.map(Some),
                period: Some(Period::parse(&period)?),
                max_in_flight: max_in_flight.map(Some),
                weight: weight.map(Some),
                media_allow: media_prefixes(media_allow)?,
            };
            let (t, key) = l.create_tenant(&name, &s)?;
            eprintln!(
                "created tenant `{}` (the key is shown once; it is stored hashed)",
                t.name
            );
            println!("{key}");
        }
        TenantCmd::List => {
            for t in l.tenants()? {
                let u = l.usage(&t, now())?;
                println!(
                    "{:<20} default {:.3e}  max/request {:.3e}  quota {}  in flight {}  weight {}  media {}  used {:.3e} (+{:.3e} reserved)",
                    t.name,
                    t.default_budget,
                    t.per_request_max,
                    t.quota.map(|q| format!("{q:.3e}/{}", t.period.as_str())).unwrap_or_else(|| "unlimited".into()),
                    t.max_in_flight.map(|m| m.to_string()).unwrap_or_else(|| "server default".into()),
                    t.weight.unwrap_or(1.0),
                    t.media_allow.as_ref().map(|m| m.join(",")).unwrap_or_else(|| "server lists".into()),
                    u.charged_flops,
                    u.reserved_flops
                );
            }
        }
        TenantCmd::Usage { name } => {
            let t = l.tenant_by_name(&name)?;
            println!("{}", serde_json::to_string_pretty(&l.usage(&t, now())?)?);
        }
        TenantCmd::Set {
            name,
            default_budget,
            per_request_max,
            quota,
            period,
            max_in_flight,
            weight,
            media_allow,
        } => {
            let weight = set_or_clear::<f64>(&weight, "weight")?;
            let max_in_flight = set_or_clear::<u32>(&max_in_flight, "max-in-flight")?;
            let quota = match quota.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(_) => Some(flops(&quota, "quota")?),
            };
            let s = TenantSettings {
                default_budget: flops(&default_budget, "default-budget")?,
                per_request_max: flops(&per_request_max, "per-request-max")?,
                quota,
                period: period.as_deref().map(Period::parse).transpose()?,
                max_in_flight,
                weight,
                media_allow: media_prefixes(media_allow)?,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&l.update_tenant(&name, &s)?)?
            );
        }
        TenantCmd::Remove { name } => {
            l.remove_tenant(&name)?;
            println!("removed {name}");
        }
    }
    Ok(())
}
