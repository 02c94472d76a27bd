//! The first thing a GPU run does: open the device, then run one of each kind of kernel the
//! engine needs and compare it with the CPU, so a missing library, a PTX the driver cannot load
//! or a broken kernel fails in seconds with a named check instead of minutes into a benchmark.
//!
//! Checks: a cuBLAS matmul in f32 and bf16, our two kernels (`kernels/`: bilinear pooling and the
//! scaled causal softmax), and attention as the GPU runs it (batched matmuls around that
//! softmax), each against the CPU engine with a stated tolerance. On `--device cpu` every check compares the CPU with
//! itself: that run only exercises the plumbing (used by CI to test the run script).

use crate::Placement;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::attention::{attention, decode_attention_batch, Masking};

/// One kernel compared with the CPU.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    /// Max abs difference from the CPU, divided by the CPU result's max abs when `relative`.
    pub error: f32,
    pub tolerance: f32,
    pub relative: bool,
    pub ok: bool,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub cuda_compiled: bool,
    pub seconds_to_open_device: f64,
    pub checks: Vec<Check>,
    pub ok: bool,
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn compare(cpu: &Tensor, dev: &Tensor, relative: bool) -> Result<f32> {
    let cpu = cpu.to_dtype(DType::F32)?;
    let dev = dev.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    anyhow::ensure!(
        cpu.dims() == dev.dims(),
        "shapes differ: {:?} vs {:?}",
        cpu.dims(),
        dev.dims()
    );
    let e = max_abs(&(&cpu - &dev)?)?;
    Ok(if relative {
        e / max_abs(&cpu)?.max(1e-30)
    } else {
        e
    })
}

/// Opens the placement's device and runs every check (a failed check does not stop the others).
pub fn run(p: &Placement) -> Result<Report> {
    let t = Instant::now();
    let opts = p.load_options()?;
    let dev = opts.device.clone();
    let x = Tensor::zeros(4, DType::F32, &dev)?; // first allocation: context creation
    dev.synchronize()?;
    drop(x);
    let seconds_to_open_device = t.elapsed().as_secs_f64();
    let mut checks = vec![];
    let mut check =
        |name: &'static str, tolerance: f32, relative: bool, f: &dyn Fn() -> Result<f32>| {
            let t = Instant::now();
            let (error, ok) = match f() {
                Ok(e) => (e, e <= tolerance),
                Err(err) => {
                    eprintln!("[smoke] {name}: {err:#}");
                    (f32::NAN, false)
                }
            };
            checks.push(Check {
                name,
                error,
                tolerance,
                relative,
                ok,
                seconds: t.elapsed().as_secs_f64(),
            });
        };
    let to = |t: &Tensor| t.to_device(&dev);
    // cuBLAS (f32 may run in TF32 when the engine allows it: relative 1e-3 covers 10-bit
    // mantissas over a 512-long random dot product).
    check("matmul_f32_cublas", 1e-3, true, &|| {
        let a = Tensor::randn(0f32, 1.0, (256, 512), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (512, 384), &Device::Cpu)?;
        compare(&a.matmul(&b)?, &to(&a)?.matmul(&to(&b)?)?, true)
    });
    // bf16 inputs: both sides round the inputs the same way; the GPU accumulates in f32, the CPU
    // in its own order, and the output is rounded to bf16 (2^-8 relative).
    check("matmul_bf16_cublas", 1e-2, true, &|| {
        let a = Tensor::randn(0f32, 1.0, (256, 512), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 1.0, (512, 384), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let want = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
        compare(&want, &to(&a)?.matmul(&to(&b)?)?, true)
    });
    check("bilinear_pool_kernel", 1e-6, false, &|| {
        let x = Tensor::randn(0f32, 1.0, (2, 729, 64), &Device::Cpu)?;
        let cpu = vvlm_engine::pool::pool(&x, 27, 14)?;
        compare(&cpu, &vvlm_engine::pool::pool(&to(&x)?, 27, 14)?, false)
    });
    // kernels/scaled_softmax.cu against its CPU reference (bf16: one rounding of values <= 1).
    check("scaled_softmax_kernel", 4e-3, false, &|| {
        let x = Tensor::randn(0f32, 3.0, (2, 48, 300), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let op = vvlm_engine::attention::ScaledSoftmax {
            scale: 0.125,
            causal: Some((48, 252)),
        };
        compare(
            &x.apply_op1_no_bwd(&op)?,
            &to(&x)?.apply_op1_no_bwd(&op)?,
            false,
        )
    });
    check("attention_causal", 1e-4, false, &|| {
        let flops = FlopCounter::new();
        let ctx = vvlm_engine::Ctx::new(&flops, Component::LmPrefill);
        let q = Tensor::randn(0f32, 1.0, (1, 8, 33, 64), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &Device::Cpu)?;
        let m = Masking::Causal { past: 7 };
        let cpu = attention(&q, &k, &v, 0.125, m, &ctx)?;
        let got = attention(&to(&q)?, &to(&k)?, &to(&v)?, 0.125, m, &ctx)?;
        compare(&cpu, &got, false)
    });
    // A prompt-sized bf16 attention: on a GPU kernels/flash_attention.cu (two 64-row blocks,
    // grouped heads, a past, a head size padded 72 -> 80), against the CPU's f32 kernel on the
    // same bf16-rounded inputs; P and the output are rounded to bf16 (2^-8 relative of values
    // up to ~3).
    check("attention_bf16_prompt", 2e-2, false, &|| {
        let flops = FlopCounter::new();
        let ctx = vvlm_engine::Ctx::new(&flops, Component::LmPrefill);
        // Queries of half the keys' spread keep the scores' bf16 rounding (on the CPU's unfused
        // path, which materialises them) well inside the bound.
        let r = |s: (usize, usize, usize, usize), std: f32| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std, s, &Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?)
        };
        let (q, k, v) = (
            r((1, 6, 100, 72), 0.5)?,
            r((1, 2, 109, 72), 1.0)?,
            r((1, 2, 109, 72), 1.0)?,
        );
        let m = Masking::Causal { past: 9 };
        let cpu = attention(&q, &k, &v, 0.125, m, &ctx)?;
        let b = |t: &Tensor| -> Result<Tensor> { Ok(to(&t.to_dtype(DType::BF16)?)?) };
        let got = attention(&b(&q)?, &b(&k)?, &b(&v)?, 0.125, m, &ctx)?;
        compare(&cpu, &got.to_dtype(DType::F32)?, false)
    });
    // A decode step of three sequences (1, 40 and 300 cached positions; on a GPU
    // kernels/decode_attention.cu, all three in one launch) against the CPU's decode kernel.
    check("attention_decode_batch", 2e-2, false, &|| {
        let flops = FlopCounter::new();
        let ctxs: Vec<_> = (0..3)
            .map(|_| vvlm_engine::Ctx::new(&flops, Component::LmDecode))
            .collect();
        let r = |s: (usize, usize, usize, usize), std: f32| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std, s, &Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?)
        };
        let q = r((1, 8, 3, 64), 0.5)?;
        let kvs = [1usize, 40, 300]
            .iter()
            .map(|&n| Ok((r((1, 2, n, 64), 1.0)?, r((1, 2, n, 64), 1.0)?)))
            .collect::<Result<Vec<_>>>()?;
        let cpu = decode_attention_batch(&q, &kvs, 0.125, &ctxs)?;
        let b = |t: &Tensor| -> Result<Tensor> { Ok(to(&t.to_dtype(DType::BF16)?)?) };
        let dkvs = kvs
            .iter()
            .map(|(k, v)| Ok((b(k)?, b(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let got = decode_attention_batch(&b(&q)?, &dkvs, 0.125, &ctxs)?;
        compare(&cpu, &got.to_dtype(DType::F32)?, false)
    });
    let ok = checks.iter().all(|c| c.ok);
    Ok(Report {
        device: p.device.clone(),
        cuda_compiled: candle_core::utils::cuda_is_available(),
        seconds_to_open_device,
        checks,
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_relative_and_absolute_differences() {
        let a = Tensor::new(&[1f32, -4.0, 2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, -3.0, 2.5], &Device::Cpu).unwrap();
        assert_eq!(compare(&a, &b, false).unwrap(), 1.0);
        assert_eq!(compare(&a, &b, true).unwrap(), 0.25);
        let c = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(compare(&a, &c, false).is_err());
    }

    #[test]
    fn every_check_runs_on_the_cpu_placement() {
        let r = run(&Placement {
            device: "cpu".into(),
            dtype: "f32".into(),
            kernels: crate::KernelChoice::Fused,
            cpu_kernels: vvlm_engine::CpuKernels::Auto,
            cpu_keep_warm: true,
        })
        .unwrap();
        let names: Vec<_> = r.checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "matmul_f32_cublas",
                "matmul_bf16_cublas",
                "bilinear_pool_kernel",
                "scaled_softmax_kernel",
                "attention_causal",
                "attention_bf16_prompt",
                "attention_decode_batch"
            ]
        );
        assert!(r.ok, "{r:?}");
    }
}
