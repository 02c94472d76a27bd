//! Server configuration: `configs/server.toml` (embedded as the default), overridden by CLI
//! flags and environment variables at the binary's edge.

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
    /// SQLite ledger path.
    pub db: PathBuf,
    /// Folder of model registry entries (`*.toml`).
    pub models_dir: PathBuf,
    /// Scaling model used for `caption` and `qa`.
    pub scaling_model: PathBuf,
    /// Extra named tasks with their own fitted models.
    #[serde(default)]
    pub task_models: BTreeMap<String, PathBuf>,
    /// Admin key for `/admin/*` (prefer the VVLM_ADMIN_KEY environment variable).
    #[serde(default)]
    pub admin_key: Option<String>,
    pub planner: PlannerConfig,
    pub limits: Limits,
    pub media: MediaPolicy,
    /// Folders `file://` URLs may read from (empty: `file://` is refused).
    #[serde(default)]
    pub file_allow: Vec<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto`, `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_device() -> String {
    "cpu".into()
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests waiting for a worker beyond which new ones get 429.
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
    /// Seconds a request waits for a place among the admitted (queue_depth + workers) before
    /// it is answered 429.
    #[serde(default = "default_queue_wait")]
    pub queue_wait_s: f64,
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

    pub fn workers(&self) -> usize {
        if self.limits.workers > 0 {
            return self.limits.workers;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / 2).max(1)
    }

    /// CPU threads of each worker's own pool (`threads_per_worker`, or cores / workers).
    pub fn threads_per_worker(&self) -> usize {
        if self.limits.threads_per_worker > 0 {
            return self.limits.threads_per_worker;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / self.workers()).max(1)
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
}
