//! The inference core on candle: SigLIP frame encoding, the 2-layer MLP projector, bilinear
//! token pooling (g x g -> s x s), Llama/Qwen2 prefill and decode with a KV cache, generation
//! (sampling controls, and output constraints: JSON, a JSON Schema subset, a choice of strings),
//! and a measured-FLOPs count of every matrix product executed (see `vvlm_cost`'s conventions).
//!
//! Owns checkpoint loading (HF safetensors + config.json in LLaVA-OneVision layouts, LMs from
//! GGUF) and numerics. Must not know about HTTP, tenants, budgets, planning or video containers:
//! it takes preprocessed pixels and text.

pub mod attention;
pub mod batch;
pub mod config;
pub mod constraint;
pub mod cpu_pool;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod gemv;
pub mod generate;
pub mod gguf;
pub mod huge_pages;
pub mod json_mode;
pub mod json_schema;
pub mod llama;
pub mod model;
pub mod nn;
pub mod pool;
pub mod profile;
pub mod qdot;
pub mod quant;
pub mod sampling;
pub mod score;
pub mod sequence;
pub mod siglip;
pub mod template;

pub use config::{LlavaOnevisionConfig, SiglipVisionConfig, TextConfig};
pub use generate::{
    FinishReason, FrameData, GenerateRequest, Generation, PromptForm, ResponseFormat,
    SamplingParams, StepLogprobs, Timings, TokenLogprob, VisionFeatures, VisualInput,
    MAX_TOP_LOGPROBS,
};
pub use model::{KvCacheDtype, LoadOptions, QuantizedDecode, VideoVlm};
pub use nn::Ctx;
pub use sequence::{KeptKv, PrefixKv, Suspended};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which kernels run on CUDA where the engine has its own (`kernels/`): the fused ones (the
/// default: flash and decode attention, the batched KV append, RMSNorm, the q/k/v split with
/// RoPE, the linear layers' epilogues) or candle's ops alone (`Unfused`: e.g. cuBLAS matmuls
/// around the softmax kernel for attention), to compare the two or to rule ours out. Results
/// differ only by rounding. A process setting, like candle's own precision switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKernels {
    #[default]
    Fused,
    Unfused,
}

static DEVICE_KERNELS_UNFUSED: AtomicBool = AtomicBool::new(false);

/// Chooses the CUDA kernels for this process (see [`DeviceKernels`]).
pub fn set_device_kernels(kernels: DeviceKernels) {
    DEVICE_KERNELS_UNFUSED.store(kernels == DeviceKernels::Unfused, Ordering::Relaxed);
}

/// The CUDA kernels in use.
pub fn device_kernels() -> DeviceKernels {
    if DEVICE_KERNELS_UNFUSED.load(Ordering::Relaxed) {
        DeviceKernels::Unfused
    } else {
        DeviceKernels::Fused
    }
}

/// CUDA device `ordinal` with one stream of its own, on which every thread's work is queued
/// in order. candle's `Device::new_cuda` uses the per-thread default stream instead: work
/// launched from the engine's pool thread (a forward runs inside [`cpu_pool::run`]) then ran on
/// that thread's stream while the calling thread made the inputs, dropped the outputs and
/// synchronized on its own. On an H200 that let a frame batch's output be freed while a kernel
/// still wrote it (an illegal address in the 32-frame vision tower) and let `synchronize`
/// return before the work ended (benchmarks timed the launches, not the work).
/// Every CUDA device the engine makes comes from here.
///
/// Freed device memory stays in the device's memory pool for the next allocation (see
/// [`cuda::keep_freed_memory`]) unless `VVLM_CUDA_POOL_RELEASE=1`.
///
/// cudarc tracks every buffer's reads and writes with events once its context has a stream of
/// its own (one or more `cuEventRecord` per argument of every launch), to order buffers shared
/// between streams. Here nothing is: each device's buffers are made and used on its one stream
/// (candle refuses to mix devices), so the tracking is turned off before anything is allocated.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda_with_stream(ordinal)?;
    #[cfg(feature = "cuda")]
    {
        // SAFETY: every allocation and launch of this device is queued on its one stream, in
        // order, so no buffer needs events to order its uses between streams.
        unsafe { device.as_cuda_device()?.disable_event_tracking() };
        if std::env::var("VVLM_CUDA_POOL_RELEASE").as_deref() != Ok("1") {
            cuda::keep_freed_memory(&device)?;
        }
    }
    Ok(device)
}

/// Whether the engine's fused CUDA kernels run for tensors on `device`.
pub(crate) fn fused_on(device: &candle_core::Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && device_kernels() == DeviceKernels::Fused
}

/// Which integer kernels the CPU's quantized products run: `Auto` (the best this processor
/// has: AVX-512 VNNI, AVX-VNNI, AVX2, or portable code, detected at run time) or one set by
/// name, to compare them on one processor or to avoid one. Every set gives the same results
/// bit for bit; only the speed differs. A process setting, fixed before any model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuKernels {
    #[default]
    Auto,
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Portable,
}

impl CpuKernels {
    /// The names settings and flags take, in the order of the variants.
    pub const NAMES: [&'static str; 5] = ["auto", "avx512_vnni", "avx_vnni", "avx2", "portable"];
    const ALL: [CpuKernels; 5] = [
        CpuKernels::Auto,
        CpuKernels::Avx512Vnni,
        CpuKernels::AvxVnni,
        CpuKernels::Avx2,
        CpuKernels::Portable,
    ];
}

impl std::str::FromStr for CpuKernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::NAMES
            .iter()
            .position(|&n| n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| {
                format!(
                    "unknown CPU kernels {s:?} (one of {})",
                    Self::NAMES.join(", ")
                )
            })
    }
}

/// Fixes the CPU's kernels for this process (see [`CpuKernels`]): refused, with the reason,
/// for a set this CPU cannot run or after the kernels were fixed otherwise. `Auto` fixes
/// nothing (the first product detects them).
pub fn set_cpu_kernels(kernels: CpuKernels) -> Result<(), EngineError> {
    use qdot::Isa;
    let isa = match kernels {
        CpuKernels::Auto => return Ok(()),
        CpuKernels::Avx512Vnni => Isa::Avx512Vnni,
        CpuKernels::AvxVnni => Isa::AvxVnni,
        CpuKernels::Avx2 => Isa::Avx2,
        CpuKernels::Portable => Isa::Portable,
    };
    isa.choose().map_err(EngineError::Unsupported)
}

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
    #[error("the request was cancelled")]
    Cancelled,
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

/// Hands the allocator's free memory back to the OS (glibc `malloc_trim`): after a load that
/// dropped large buffers (e.g. f32 copies of quantized matrices), resident memory shows what is
/// still held. [`tune_cpu_allocator`] keeps freed memory otherwise (1 GiB trim threshold).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel after
/// every op. glibc serves allocations above its mmap threshold (128 KiB, adapting upwards) with
/// fresh `mmap`s and trims the heap top eagerly, so each activation of a forward pass was paid
/// for again in page faults (zeroing) and `munmap`s: measured 25-30% of SigLIP so400m's frame
/// time on two cores. Raising both thresholds makes the heap reuse buffers, as PyTorch's caching
/// allocator does; resident memory then stays at the high-water mark of a forward pass.
/// Call once at start-up; no effect off glibc.
pub fn tune_cpu_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
