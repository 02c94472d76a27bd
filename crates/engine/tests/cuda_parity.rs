//! GPU parity (built with `--features cuda`, run by `scripts/gpu-check` on a machine with an
//! NVIDIA GPU; these tests fail without one). Every CUDA result is compared with the CPU engine,
//! which is itself checked against transformers by `parity.rs`:
//! - the bilinear pooling kernel against its CPU reference: f32 max abs error <= 1e-6, bf16
//!   within one bf16 rounding of the output (2^-8 relative);
//! - the tiny LLaVA-OneVision fixture end to end on the GPU in f32 (max abs error of every
//!   intermediate and the logits <= 1e-3: cuBLAS may reorder sums) and in bf16 (logits within
//!   5% of the logits' range);
//! - attention through candle's CUDA ops against the fused CPU kernel.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::attention::{attention, Masking};
use vvlm_engine::{LoadOptions, VideoVlm};

mod common;
use common::max_abs;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need an NVIDIA GPU and driver (see scripts/gpu-check)")
}

#[test]
fn pooling_kernel_matches_its_cpu_reference() {
    let dev = gpu();
    let x = Tensor::randn(0f32, 1.0, (3, 729, 1152), &Device::Cpu).unwrap();
    for side in [1, 2, 3, 5, 7, 13, 14, 20, 26] {
        let cpu = vvlm_engine::pool::pool(&x, 27, side).unwrap();
        let cuda = vvlm_engine::pool::pool(&x.to_device(&dev).unwrap(), 27, side).unwrap();
        assert!(cuda.device().is_cuda());
        let e = max_abs(&cpu, &cuda);
        assert!(e <= 1e-6, "f32 side {side}: {e}");
        let xb = x.to_dtype(DType::BF16).unwrap();
        let cpu = vvlm_engine::pool::pool(&xb, 27, side).unwrap();
        let cuda = vvlm_engine::pool::pool(&xb.to_device(&dev).unwrap(), 27, side).unwrap();
        let e = max_abs(&cpu, &cuda);
        assert!(e <= 4.0 * 2f32.powi(-8), "bf16 side {side}: {e}");
    }
}

#[test]
fn attention_on_the_gpu_matches_the_fused_cpu_kernel() {
    let dev = gpu();
    let flops = FlopCounter::new();
    let ctx = vvlm_engine::Ctx::new(&flops, Component::LmPrefill);
    let q = Tensor::randn(0f32, 1.0, (1, 8, 33, 64), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &Device::Cpu).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &Device::Cpu).unwrap();
    let m = Masking::Causal { past: 7 };
    let cpu = attention(&q, &k, &v, 0.125, m, &ctx).unwrap();
    let to = |t: &Tensor| t.to_device(&dev).unwrap();
    let cuda = attention(&to(&q), &to(&k), &to(&v), 0.125, m, &ctx).unwrap();
    let e = max_abs(&cpu, &cuda);
    assert!(e <= 1e-4, "{e}");
}

fn fixture_forward(opts: &LoadOptions) -> std::collections::BTreeMap<String, Tensor> {
    let (pixels, ids) = common::inputs(&common::reference());
    let m = VideoVlm::load(&common::fixture().join("model"), opts).unwrap();
    let flops = FlopCounter::new();
    m.debug_forward(&pixels, &ids, m.cfg.default_side(), &flops)
        .unwrap()
}

#[test]
fn tiny_checkpoint_on_the_gpu_matches_the_cpu() {
    let cpu = fixture_forward(&LoadOptions::default());
    let f32_gpu = fixture_forward(&LoadOptions {
        device: gpu(),
        dtype: DType::F32,
        ..LoadOptions::default()
    });
    let mut compared = 0;
    for (name, want) in &cpu {
        let got = &f32_gpu[name];
        let e = max_abs(want, got);
        assert!(e <= 1e-3, "f32 {name}: {e}");
        compared += 1;
    }
    assert!(compared > 10);
    let bf16_gpu = fixture_forward(&LoadOptions {
        device: gpu(),
        dtype: DType::BF16,
        ..LoadOptions::default()
    });
    let logits = &cpu["logits"];
    let range = (logits.max_all().unwrap().to_scalar::<f32>().unwrap()
        - logits.min_all().unwrap().to_scalar::<f32>().unwrap())
    .max(1e-3);
    let e = max_abs(logits, &bf16_gpu["logits"]);
    assert!(e <= 0.05 * range, "bf16 logits: {e} (range {range})");
}
