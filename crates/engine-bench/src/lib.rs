//! Engine benchmarks and the GPU smoke check, shared by `vvlm bench engine|batch` and the
//! engine-only `vvlm-engine-bench` binary.
//!
//! Owns: timing the engine's hot paths at real shapes with random weights (SigLIP so400m/14,
//! bilinear pooling, a Llama-3.2-1B-shaped LM) and with the SmolLM2 GGUF; batched decode as
//! llama.cpp's `llama-batched-bench` measures it; the smoke check a GPU run starts with (one
//! cuBLAS matmul, our pooling kernel and attention, each against the CPU); the JSON they report.
//!
//! Must not know: HTTP, tenants, the planner, or video decoding. It depends on the engine and
//! the cost model only, so the binary links no FFmpeg and can be carried to a GPU machine that
//! has only the NVIDIA libraries (`scripts/gpu-bundle`, `scripts/gpu-run`). Errors are
//! `anyhow`: every caller is a command-line edge that prints them.

pub mod batch;
pub mod engine;
pub mod smoke;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::time::Instant;
use vvlm_engine::LoadOptions;

/// Where a command runs the model.
#[derive(Args, Debug, Clone)]
pub struct Placement {
    /// cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, env = "VVLM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// auto (bf16 on a GPU, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, env = "VVLM_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// The CUDA kernels: `fused` (the default: the engine's own in kernels/, flash and decode
    /// attention, KV append, RMSNorm, q/k/v split with RoPE, epilogues) or `unfused` (candle's
    /// ops alone), to compare the two or to rule ours out.
    #[arg(long, env = "VVLM_CUDA_KERNELS", value_enum, default_value_t = KernelChoice::Fused)]
    pub kernels: KernelChoice,
    /// The CPU's integer kernels for quantized matrices: auto (the best this processor has) or
    /// one by name (the same results), to compare them side by side on one machine.
    #[arg(long, env = "VVLM_CPU_KERNELS", default_value = "auto", value_parser = cpu_kernels_parser())]
    pub cpu_kernels: vvlm_engine::CpuKernels,
    /// Whether the other CPU threads stay awake through a forward pass (spinning between its
    /// ops) or sleep between them as rayon has them (`false`: to measure what holding them gains).
    #[arg(long, env = "VVLM_CPU_KEEP_WARM", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_keep_warm: bool,
}

/// Parses [`vvlm_engine::CpuKernels`] by its names (listed in `--help`).
pub fn cpu_kernels_parser() -> impl clap::builder::TypedValueParser<Value = vvlm_engine::CpuKernels>
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(vvlm_engine::CpuKernels::NAMES)
        .try_map(|s| s.parse::<vvlm_engine::CpuKernels>())
}

/// [`vvlm_engine::DeviceKernels`] on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    Fused,
    Unfused,
}

impl Placement {
    /// The engine's load options for this placement; also selects the process's CUDA kernels
    /// (`--kernels`), CPU kernels (`--cpu-kernels`; refused where this CPU cannot run them) and
    /// whether the CPU threads stay awake (`--cpu-keep-warm`).
    pub fn load_options(&self) -> Result<LoadOptions> {
        use vvlm_engine::{set_device_kernels, DeviceKernels};
        set_device_kernels(match self.kernels {
            KernelChoice::Fused => DeviceKernels::Fused,
            KernelChoice::Unfused => DeviceKernels::Unfused,
        });
        vvlm_engine::set_cpu_kernels(self.cpu_kernels)?;
        vvlm_engine::cpu_pool::set_keep_warm(self.cpu_keep_warm);
        Ok(LoadOptions::parse(&self.device, &self.dtype)?)
    }
}

/// Best of 3 `n^3` matmuls on a device at a dtype, synchronised, in GFLOP/s.
pub fn matmul_peak_gflops_on(n: usize, dev: &Device, dtype: DType) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// `sorted[q * (len - 1)]`, rounded to the nearest index; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_picks_the_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
