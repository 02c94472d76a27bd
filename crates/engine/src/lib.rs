//! The inference core on candle: SigLIP frame encoding, the 2-layer MLP projector, bilinear
//! token pooling (g x g -> s x s), Llama/Qwen2 prefill and decode with a KV cache, generation,
//! and a measured-FLOPs count of every matrix product executed (see `vvlm_cost`'s conventions).
//!
//! Owns checkpoint loading (HF safetensors + config.json in LLaVA-OneVision layouts, LMs from
//! GGUF) and numerics. Must not know about HTTP, tenants, budgets, planning or video containers:
//! it takes preprocessed pixels and text.

pub mod config;
pub mod demo;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod model;
pub mod nn;
pub mod pool;
pub mod siglip;
pub mod template;

pub use config::{LlavaOnevisionConfig, SiglipVisionConfig, TextConfig};
pub use generate::{FinishReason, GenerateRequest, Generation, SamplingParams, Timings};
pub use model::{LoadOptions, VideoVlm};
pub use nn::Ctx;

use std::path::Path;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("bad request: {0}")]
    Request(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        EngineError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// Sets the number of CPU threads candle's kernels use (call before the first tensor op).
pub fn set_cpu_threads(n: usize) {
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
