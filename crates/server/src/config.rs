//! Server configuration, in layers: `configs/server.toml` (embedded in the binary), then a
//! configuration file that sets only what it changes (tables merge key by key), then
//! environment variables, then command-line flags (the last two at the binary's edge, by clap:
//! a flag beats its variable). Unknown keys are refused at every layer. Thread sizing is
//! resolved once, at load.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use vvlm_planner::CostMode;
use vvlm_video::MediaPolicy;

/// The configuration shipped in the repository and embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/server.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    /// The ledger: a SQLite file path (embedded, one server) or a `postgres://` URL (shared by
    /// replicas).
    pub db: String,
    /// Folder of model registry entries (`*.toml`).
    pub models_dir: PathBuf,
    /// Scaling model used for `caption` and `qa`.
    pub scaling_model: PathBuf,
    /// What a caption request without a prompt asks, for checkpoints whose registry entry
    /// names no `caption_prompt` of their own.
    #[serde(default = "default_caption_prompt")]
    pub caption_prompt: String,
    /// Extra named tasks with their own fitted models.
    #[serde(default)]
    pub task_models: BTreeMap<String, PathBuf>,
    /// Admin key for `/admin/*` (prefer the VVLM_ADMIN_KEY environment variable).
    #[serde(default)]
    pub admin_key: Option<String>,
    pub planner: PlannerConfig,
    pub limits: Limits,
    pub ledger: LedgerConfig,
    pub batch: BatchConfig,
    pub media: MediaPolicy,
    /// Folders `file://` URLs may read from (empty: `file://` is refused).
    #[serde(default)]
    pub file_allow: Vec<PathBuf>,
    /// URL prefixes (`https://host[:port]/path/`) that `http(s)://` video and image URLs may be
    /// fetched from (empty, the default: the server fetches nothing from the network).
    #[serde(default)]
    pub url_allow: Vec<String>,
    /// Allowed URLs may resolve to loopback, private or link-local addresses (an object store
    /// inside the cluster); off, such an address is refused (a name under an allowed prefix
    /// cannot point the server at its own network).
    #[serde(default)]
    pub url_private: bool,
    /// Seconds a media URL's fetch may take in all (connection, headers and body).
    #[serde(default = "default_url_timeout")]
    pub url_timeout_s: f64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto`, `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// CPU decode of GGUF Q4_1/Q8_0 matrices: `int8` (8-bit activations, integer dot products)
    /// or `off` (the dequantized f32 matrices).
    #[serde(default)]
    pub quantized_decode: vvlm_engine::QuantizedDecode,
    /// With `quantized_decode = "int8"`: prefill from the Q4_1/Q8_0 blocks too (8-bit
    /// activations, as llama.cpp) and never dequantize those matrices (SmolLM2-135M: 123 vs
    /// 637 MiB resident, load peak 235 vs 967, prefill ~1.4x). `false` prefills in exact f32.
    #[serde(default = "default_quantized_prefill")]
    pub quantized_prefill: bool,
    /// Prompt tokens prefilled per forward pass (0: whole prompts); decode steps of the other
    /// sequences run between chunks.
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
    /// What the LM's KV cache stores: `auto` (the model's dtype) or `f16` (an f32 LM on the
    /// CPU with F16C and a head size that is a multiple of 8: half the cache memory and half the
    /// bytes a decode step reads from it; keys and values rounded to f16, as llama.cpp's default
    /// cache). A checkpoint it cannot apply to keeps its own dtype, with a load note.
    #[serde(default)]
    pub kv_cache_dtype: vvlm_engine::KvCacheDtype,
    /// On CUDA: `fused` (the default) runs the engine's own kernels where they apply (flash and
    /// batched decode attention, KV append, RMSNorm, q/k/v split with RoPE, epilogues);
    /// `unfused` leaves candle's ops alone (same results up to rounding; slower): an escape
    /// hatch should one of ours misbehave on a GPU. No effect on the CPU.
    #[serde(default)]
    pub cuda_kernels: vvlm_engine::DeviceKernels,
    /// The CPU's integer kernels for quantized matrices: `auto` (the best this processor has,
    /// detected at run time) or `avx512_vnni`, `avx_vnni`, `avx2`, `portable` (the same results
    /// bit for bit; to compare them on one processor or avoid one). A set this CPU cannot run
    /// is a startup error.
    #[serde(default)]
    pub cpu_kernels: vvlm_engine::CpuKernels,
    /// Whether the other CPU threads of a worker stay awake through a forward pass, taking its
    /// short parallel ops as they come (and spinning between them), instead of sleeping between
    /// them and being woken for each (`true`, the default: an 8-sequence SmolLM2 step 13.8 ->
    /// 9.5-10 ms on a 2-vCPU VM). `false` where the cores are shared with other work.
    #[serde(default = "default_cpu_keep_warm")]
    pub cpu_keep_warm: bool,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// The video cache (decoded frames and vision features of recent videos).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes the cache may hold (0: no cache).
    pub max_bytes: usize,
    /// Share entries across tenants. Off by default: a hit's speed would tell a tenant that
    /// another sent the same video.
    #[serde(default)]
    pub shared: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 512 << 20,
            shared: false,
        }
    }
}

fn default_caption_prompt() -> String {
    "Describe the video.".into()
}

fn default_device() -> String {
    "cpu".into()
}

fn default_cpu_keep_warm() -> bool {
    true
}

fn default_quantized_prefill() -> bool {
    vvlm_engine::LoadOptions::default().quantized_prefill
}

fn default_prefill_chunk() -> usize {
    vvlm_engine::model::DEFAULT_PREFILL_CHUNK
}

fn default_dtype() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    pub cost_mode: CostMode,
    pub data_size_m: f64,
    /// Generated tokens priced by the exact cost mode when a request does not say.
    pub expected_decode_tokens: usize,
}

/// The Batch API: limits on files and how a replica runs batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Off: `/v1/files` and `/v1/batches` answer 404 and no batch runs here.
    pub enabled: bool,
    /// Lines this replica runs at once (0: it runs no batch; the APIs still answer and other
    /// replicas run them). A line starts only while no request waits at the door (batches take
    /// the capacity interactive requests leave).
    pub concurrency: usize,
    /// Batch lines' sequences that advance in a decode step while an interactive request's
    /// sequence is in the same worker's batch; the others wait their turn (their KV kept), so
    /// a batch costs an interactive request at most this many rows a step. They take turns,
    /// none waits more than 64 steps in a row (`vvlm_engine::batch::DEFAULT_BACKGROUND_MAX_WAIT`),
    /// and all advance again once no interactive sequence is left.
    pub rows_beside_interactive: usize,
    /// The fraction of each worker's batch (its `max_batch` sequences and `max_batch_tokens`
    /// KV positions) batch lines may hold while it runs; the rest is kept for interactive
    /// requests (a line that does not fit waits in the queue; an idle worker takes any).
    pub worker_share: f64,
    /// The largest uploaded file (the route's body limit).
    pub max_file_bytes: usize,
    /// Requests in one batch file.
    pub max_lines: usize,
    /// Batches one tenant may have open (in progress or cancelling) at once; one more is a 409.
    pub max_open_per_tenant: i64,
    /// A tenant's uploaded files in all (a batch's output and error files are not counted).
    pub tenant_storage_bytes: i64,
    /// Seconds between an idle replica's looks for a batch to run.
    pub poll_s: f64,
    /// Seconds a replica runs one batch before offering it to another batch waiting (its lines
    /// in flight finish first); the batches waiting take turns, least recently run first.
    pub slice_s: f64,
    /// Days closed batches and files (uploads, outputs) are kept; older ones are deleted,
    /// except an open batch's input (0: kept until deleted through the API).
    pub retention_days: f64,
}

/// Leases, the journal, and what happens when the database is down or slow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Seconds a reservation holds without renewal; its replica renews it every third of this.
    /// A replica killed mid-request holds its reservations at most this long (at least 2).
    pub lease_s: i64,
    /// The durable journal of settlements made while the database was unreachable (one per
    /// replica). Default: next to a SQLite file (`<db>.settle-journal`), or
    /// `vvlm-ledger.journal` in the working directory with PostgreSQL.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// PostgreSQL connections per replica.
    pub pool_size: usize,
    /// Seconds to get a connection before the database counts as unavailable.
    pub connect_timeout_s: f64,
    /// Seconds a statement may take before the database counts as unavailable.
    pub statement_timeout_s: f64,
    /// What new work gets while the database is unavailable: `refuse` (503
    /// `ledger_unavailable`, with Retry-After) is the only policy; admitting work that cannot
    /// be reserved could overrun any quota without bound.
    pub on_unavailable: OnUnavailable,
    /// The Retry-After of a 503 `ledger_unavailable`.
    pub retry_after_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    Refuse,
}

impl LedgerConfig {
    /// The ledger's options, with a fresh random replica id.
    pub fn options(&self) -> vvlm_ledger::Options {
        let mut o = vvlm_ledger::Options::new(vvlm_ledger::LeaseSettings::new(self.lease_s));
        o.pool_size = self.pool_size.max(1);
        o.connect_timeout_s = self.connect_timeout_s;
        o.statement_timeout_s = self.statement_timeout_s;
        o
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests that may wait for a worker beyond those the workers' batches hold: the server
    /// admits `queue_depth + workers x max_batch` at once (decoding, queued or running); more
    /// wait at the door up to `queue_wait_s`, then get 429.
    pub queue_depth: usize,
    /// Inference workers (0: one per 2 cores, at least 1).
    pub workers: usize,
    /// CPU threads each worker's kernels use (0: all cores / workers).
    pub threads_per_worker: usize,
    pub request_timeout_s: f64,
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_prompt_chars: usize,
    /// Largest request body, bytes (uploads included).
    pub max_body_bytes: usize,
    /// Seconds to finish in-flight requests on shutdown.
    pub shutdown_grace_s: f64,
    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests; then it is closed (slow or idle sockets cannot pile up).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_s: f64,
    /// Seconds a request's body may take to arrive; then 408.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_s: f64,
    /// Open connections served at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a request waits for a place among the admitted (queue_depth + workers x max_batch) before
    /// it is answered 429.
    #[serde(default = "default_queue_wait")]
    pub queue_wait_s: f64,
    /// Places (of queue_depth + workers x max_batch) one tenant may hold at once, for tenants
    /// without a limit of their own (`max_in_flight`); 0: no limit but the places. Whatever
    /// the limits, a freed place goes to the waiting tenant holding the fewest.
    #[serde(default)]
    pub tenant_max_in_flight: usize,
    /// Sequences each worker decodes together (continuous batching; 1 runs one at a time).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// KV positions (prompt + max_tokens of each sequence) a worker's batch may reserve
    /// before new requests wait in the queue.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Requests a busy worker admits between two decode steps. 0 (the default): every queued
    /// request that fits joins before the next step (a burst is prefilled before anyone
    /// decodes: even streams, and every request of the burst waits for all its prompts). k > 0:
    /// at most k joins a step, so the first arrivals stream while the others are prefilled:
    /// time to first token p50 falls (8 streaming clients, SmolLM2, 2 vCPU: 279 -> 78-90 ms)
    /// but tokens already streaming wait on each join's prefill (inter-token p99 16-17 ->
    /// 45-53 ms) and the last joiner's first token comes later (281-287 -> 345-356 ms).
    #[serde(default)]
    pub joins_per_step: usize,
    /// Milliseconds a joining video's encoding runs at most (give or take one tower layer)
    /// before the running batch takes a decode step (CPU; 0: a step after every tower layer).
    /// Lower: steadier streams while videos join; higher: a joining video's first token a
    /// little sooner.
    #[serde(default = "default_encode_quantum_ms")]
    pub encode_quantum_ms: u64,
    /// Prompts one `/v1/completions` request may send (a list of texts or of token-id
    /// lists). Each is planned, reserved and charged as its own request would be, and they
    /// are decoded together; the request holds one admission place.
    #[serde(default = "default_max_prompts")]
    pub max_prompts: usize,
}

fn default_url_timeout() -> f64 {
    30.0
}

fn default_max_prompts() -> usize {
    64
}

fn default_encode_quantum_ms() -> u64 {
    vvlm_engine::batch::DEFAULT_ENCODE_QUANTUM.as_millis() as u64
}

fn default_max_batch() -> usize {
    16
}
fn default_max_batch_tokens() -> usize {
    65536
}

fn default_queue_wait() -> f64 {
    2.0
}

fn default_header_timeout() -> f64 {
    30.0
}
fn default_body_timeout() -> f64 {
    300.0
}
fn default_max_connections() -> usize {
    1024
}

impl ServerConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn embedded() -> Self {
        Self::from_toml(DEFAULT_CONFIG).expect("the embedded configs/server.toml is valid")
    }

    /// The embedded configuration with a file's settings merged over it.
    pub fn layered(file: Option<&str>) -> Result<Self, String> {
        let mut base: toml::Value = toml::from_str(DEFAULT_CONFIG).map_err(|e| e.to_string())?;
        if let Some(text) = file {
            let over: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
            merge(&mut base, over);
        }
        base.try_into().map_err(|e: toml::de::Error| e.to_string())
    }

    /// Fills `workers` and `threads_per_worker` (0: from the machine's cores) once, so every
    /// reader sees the same figures.
    pub fn resolve_threads(&mut self) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if self.limits.workers == 0 {
            self.limits.workers = (cores / 2).max(1);
        }
        if self.limits.threads_per_worker == 0 {
            self.limits.threads_per_worker = (cores / self.limits.workers).max(1);
        }
    }

    /// The settlement journal's path (see [`LedgerConfig::journal`]).
    pub fn journal_path(&self) -> PathBuf {
        match &self.ledger.journal {
            Some(p) => p.clone(),
            None if vvlm_ledger::is_postgres_url(&self.db) => PathBuf::from("vvlm-ledger.journal"),
            None => PathBuf::from(format!("{}.settle-journal", self.db)),
        }
    }

    /// Inference workers (after [`Self::resolve_threads`]; at least 1).
    pub fn workers(&self) -> usize {
        self.limits.workers.max(1)
    }

    /// CPU threads of each worker's own pool (after [`Self::resolve_threads`]; at least 1).
    pub fn threads_per_worker(&self) -> usize {
        self.limits.threads_per_worker.max(1)
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) if bv.is_table() && v.is_table() => merge(bv, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_parses() {
        let c = ServerConfig::embedded();
        assert!(c.limits.queue_depth > 0);
        assert!(c.media.max_bytes > 0);
        assert!(ServerConfig::from_toml("bind = 1").is_err());
    }

    #[test]
    fn a_file_sets_only_what_it_changes() {
        let c =
            ServerConfig::layered(Some("db = \"/tmp/x.db\"\n[limits]\nqueue_depth = 3\n")).unwrap();
        assert_eq!(c.limits.queue_depth, 3);
        assert_eq!(c.db, "/tmp/x.db");
        assert_eq!(
            c.journal_path(),
            std::path::PathBuf::from("/tmp/x.db.settle-journal")
        );
        // Everything else is the shipped configuration's.
        let e = ServerConfig::embedded();
        assert_eq!(c.limits.max_tokens, e.limits.max_tokens);
        assert_eq!(c.media.max_bytes, e.media.max_bytes);
        assert_eq!(c.task_models, e.task_models);
        // Typos are refused at any depth, naming the key.
        let c = ServerConfig::layered(Some(
            "db = \"postgres://vvlm@db/vvlm\"\n[ledger]\nlease_s = 9\n",
        ))
        .unwrap();
        assert_eq!(
            (c.ledger.lease_s, c.ledger.pool_size),
            (9, e.ledger.pool_size)
        );
        assert_eq!(c.ledger.on_unavailable, OnUnavailable::Refuse);
        assert_eq!(
            c.journal_path(),
            std::path::PathBuf::from("vvlm-ledger.journal")
        );
        assert!(ServerConfig::layered(Some("[ledger]\non_unavailable = \"serve\"\n")).is_err());
        let err = ServerConfig::layered(Some("[limits]\nqueue_dept = 3\n")).unwrap_err();
        assert!(err.contains("queue_dept"), "{err}");
        assert!(ServerConfig::layered(Some("[limits]\nqueue_depth = \"many\"\n")).is_err());
    }

    #[test]
    fn cpu_keep_warm_is_on_unless_turned_off() {
        assert!(ServerConfig::embedded().cpu_keep_warm);
        let c = ServerConfig::layered(Some("cpu_keep_warm = false\n")).unwrap();
        assert!(!c.cpu_keep_warm);
        let err = ServerConfig::layered(Some("cpu_keep_warm = \"sometimes\"\n")).unwrap_err();
        assert!(err.contains("cpu_keep_warm"), "{err}");
    }

    #[test]
    fn the_cpu_kernels_are_named_or_refused() {
        assert_eq!(
            ServerConfig::embedded().cpu_kernels,
            vvlm_engine::CpuKernels::Auto
        );
        let c = ServerConfig::layered(Some("cpu_kernels = \"avx512_vnni\"\n")).unwrap();
        assert_eq!(c.cpu_kernels, vvlm_engine::CpuKernels::Avx512Vnni);
        let c = ServerConfig::layered(Some("cpu_kernels = \"portable\"\n")).unwrap();
        assert_eq!(c.cpu_kernels, vvlm_engine::CpuKernels::Portable);
        let err = ServerConfig::layered(Some("cpu_kernels = \"avx1024\"\n")).unwrap_err();
        assert!(err.to_string().contains("avx1024"), "{err}");
    }

    #[test]
    fn the_cuda_kernels_are_fused_unfused_or_refused() {
        assert_eq!(
            ServerConfig::embedded().cuda_kernels,
            vvlm_engine::DeviceKernels::Fused
        );
        let c = ServerConfig::layered(Some("cuda_kernels = \"unfused\"\n")).unwrap();
        assert_eq!(c.cuda_kernels, vvlm_engine::DeviceKernels::Unfused);
        let err = ServerConfig::layered(Some("cuda_kernels = \"fast\"\n")).unwrap_err();
        assert!(err.to_string().contains("fast"), "{err}");
    }

    #[test]
    fn the_kv_cache_dtype_is_auto_f16_or_refused() {
        assert_eq!(
            ServerConfig::embedded().kv_cache_dtype,
            vvlm_engine::KvCacheDtype::Auto
        );
        let c = ServerConfig::layered(Some("kv_cache_dtype = \"f16\"\n")).unwrap();
        assert_eq!(c.kv_cache_dtype, vvlm_engine::KvCacheDtype::F16);
        let err = ServerConfig::layered(Some("kv_cache_dtype = \"fp8\"\n")).unwrap_err();
        assert!(err.contains("fp8"), "{err}");
    }

    #[test]
    fn encode_quantum_is_50_ms_unless_configured() {
        assert_eq!(ServerConfig::embedded().limits.encode_quantum_ms, 50);
        let c = ServerConfig::layered(Some("[limits]\nencode_quantum_ms = 0\n")).unwrap();
        assert_eq!(c.limits.encode_quantum_ms, 0);
        let err = ServerConfig::layered(Some("[limits]\nencode_quantum_ms = -5\n")).unwrap_err();
        assert!(err.contains("encode_quantum_ms"), "{err}");
    }

    #[test]
    fn joins_per_step_is_all_that_fit_unless_configured() {
        assert_eq!(ServerConfig::embedded().limits.joins_per_step, 0);
        let c = ServerConfig::layered(Some("[limits]\njoins_per_step = 1\n")).unwrap();
        assert_eq!(c.limits.joins_per_step, 1);
        let err = ServerConfig::layered(Some("[limits]\njoins_per_step = -1\n")).unwrap_err();
        assert!(err.contains("joins_per_step"), "{err}");
    }

    #[test]
    fn threads_are_resolved_once() {
        let mut c = ServerConfig::embedded();
        c.limits.workers = 0;
        c.limits.threads_per_worker = 0;
        c.resolve_threads();
        assert!(c.limits.workers >= 1 && c.limits.threads_per_worker >= 1);
        c.limits.workers = 3;
        c.limits.threads_per_worker = 2;
        c.resolve_threads();
        assert_eq!((c.workers(), c.threads_per_worker()), (3, 2));
    }
}
