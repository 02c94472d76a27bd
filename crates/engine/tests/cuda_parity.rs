//! GPU parity (built with `--features cuda`; run on a machine with an NVIDIA GPU by
//! `scripts/gpu-run` from a bundle built by `scripts/gpu-bundle`, or built and run there by
//! `scripts/gpu-check`; these tests fail without one). Every CUDA result is compared with the
//! CPU engine, which is itself checked against transformers by `parity.rs`:
//! - the bilinear pooling kernel against its CPU reference: f32 max abs error <= 1e-6, bf16
//!   within one bf16 rounding of the output (2^-8 relative);
//! - the tiny LLaVA-OneVision fixture end to end on the GPU in f32 (max abs error of every
//!   intermediate and the logits <= 1e-3: cuBLAS may reorder sums) and in bf16 (logits within
//!   5% of the logits' range);
//! - the scaled causal softmax kernel, the linear layers' epilogues (bias + GELU, bias +
//!   residual), the one-pass bf16/f16 RMSNorm and the q/k/v split with RoPE against their CPU
//!   references;
//! - attention through candle's CUDA ops and that kernel against the fused CPU kernel;
//! - the flash attention kernel (bf16/f16 prompts) and the batched decode attention kernel
//!   against the CPU's kernels and the unfused GPU path;
//! - the trained suite rung answering on the GPU as on the CPU, alone and in a batch (the
//!   batch through the decode attention and KV append kernels), and batched = alone in bf16.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::attention::{attention, Masking};
use vvlm_engine::{LoadOptions, VideoVlm};

mod common;
use common::max_abs;

fn gpu() -> Device {
    vvlm_engine::cuda_device(0)
        .expect("these tests need an NVIDIA GPU and driver (see scripts/gpu-check)")
}

/// Work queued from the engine's pool thread (where a forward runs) is ordered with the calling
/// thread's: after the caller's `synchronize`, a long chain of products launched on a pool
/// thread is complete and its result reads back right, and an output dropped by the caller is
/// freed after the kernels that write it. Under candle's per-thread default stream this read
/// back a result before the chain ended (each thread had its own stream).
#[test]
fn work_launched_on_a_pool_thread_is_ordered_with_the_callers() {
    let dev = gpu();
    let stream = dev.as_cuda_device().unwrap().cuda_stream();
    // CU_STREAM_PER_THREAD is the handle 0x2: one stream per calling thread.
    assert_ne!(
        stream.cu_stream() as usize,
        2,
        "the per-thread default stream"
    );
    // One stream: no per-buffer events (cudarc records them at every use once a context has
    // a stream of its own).
    assert!(!dev.as_cuda_device().unwrap().is_event_tracking());
    if std::env::var("VVLM_CUDA_POOL_RELEASE").as_deref() != Ok("1") {
        // Freed memory stays in the pool (the driver's default releases it at every sync).
        let kept = vvlm_engine::cuda::pool_release_threshold(&dev).unwrap();
        assert!(matches!(kept, None | Some(u64::MAX)), "{kept:?}");
    }
    let x = Tensor::randn(0f32, 0.02, (2048, 2048), &Device::Cpu).unwrap();
    let chain = |x: &Tensor| -> Tensor {
        let mut y = x.clone();
        for _ in 0..24 {
            y = (y.matmul(x).unwrap() + x).unwrap();
        }
        y
    };
    let want = chain(&x);
    let xg = x.to_device(&dev).unwrap();
    for _ in 0..3 {
        let got = vvlm_engine::cpu_pool::run(|| chain(&xg));
        dev.synchronize().unwrap();
        let e = max_abs(&want, &got);
        assert!(e <= 1e-3, "a chain launched on a pool thread: {e}");
        // Dropped here, on this thread, while nothing else waits: freed in the stream's order.
        drop(vvlm_engine::cpu_pool::run(|| chain(&xg)));
    }
    dev.synchronize().unwrap();
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

/// `kernels/scaled_softmax.cu` against its CPU reference (`ScaledSoftmax::cpu_fwd`): row
/// lengths around the warp and block sizes and past them, causal with and without a past, and
/// bidirectional; f32 within 1e-6 (probabilities <= 1; only the summation order differs), bf16
/// and f16 within one rounding of the output (2^-8, 2^-11 relative) plus that.
#[test]
fn scaled_softmax_kernel_matches_its_cpu_reference() {
    use vvlm_engine::attention::ScaledSoftmax;
    let dev = gpu();
    for (rows, kv, causal) in [
        (3, 1, Some((3, 0))),
        (6, 5, Some((3, 2))),
        (64, 31, None),
        (64, 32, Some((32, 0))),
        (66, 33, Some((33, 0))),
        (40, 257, Some((20, 237))),
        (24, 1000, None),
        (8, 4100, Some((8, 4092))),
    ] {
        let x = Tensor::randn(0f32, 3.0, (2, rows, kv), &Device::Cpu).unwrap();
        let op = ScaledSoftmax {
            scale: 0.125,
            causal,
        };
        for (dtype, tol) in [
            (DType::F32, 1e-6),
            (DType::BF16, 2f32.powi(-8) + 1e-6),
            (DType::F16, 2f32.powi(-11) + 1e-6),
        ] {
            let xd = x.to_dtype(dtype).unwrap();
            let cpu = xd.apply_op1_no_bwd(&op).unwrap();
            let cuda = xd.to_device(&dev).unwrap().apply_op1_no_bwd(&op).unwrap();
            let e = max_abs(
                &cpu.to_dtype(DType::F32).unwrap(),
                &cuda.to_dtype(DType::F32).unwrap(),
            );
            assert!(e <= tol, "{dtype:?} rows {rows} kv {kv} {causal:?}: {e}");
        }
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

/// `kernels/flash_attention.cu` (what `attention` runs on CUDA for bf16/f16 prompts of at least
/// `FLASH_MIN_ROWS` rows) against the CPU's fused f32 kernel on the same rounded inputs, and
/// against the unfused GPU path: head sizes 32, 64, 72 (padded to 80) and 128; one and several
/// 64-row blocks with a partial last one; causal with and without a past, and bidirectional
/// (vision); grouped heads; q read through a transposed view and k/v through a narrowed cache.
/// P and the output are rounded to the input type: bf16 within 2e-2, f16 within 4e-3 of values
/// up to ~3 (randn inputs).
#[test]
fn flash_attention_kernel_matches_the_cpu_and_the_unfused_path() {
    use vvlm_engine::{set_device_kernels, DeviceKernels};
    let dev = gpu();
    let flops = FlopCounter::new();
    let ctx = vvlm_engine::Ctx::new(&flops, Component::LmPrefill);
    for (b, heads, kv_heads, q_len, past, d, causal) in [
        (1, 2, 2, 16, 0, 64, true),
        (2, 8, 2, 65, 7, 64, true),
        (1, 4, 1, 200, 300, 128, true),
        (2, 6, 2, 100, 9, 72, true),
        (1, 16, 16, 729, 0, 72, false),
        (2, 4, 4, 33, 0, 32, false),
    ] {
        let kv_len = q_len + past;
        // Queries of half the keys' spread: the unfused path rounds the scores themselves to
        // bf16, which at full spread approaches the bound on its own.
        let r = |s: (usize, usize, usize, usize), std: f32| {
            Tensor::randn(0f32, std, s, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        // q as a linear layer leaves it: [b, len, heads, d] seen as [b, heads, len, d]; k and v
        // as the first kv_len positions of a longer cache.
        let q = r((b, q_len, heads, d), 0.5).transpose(1, 2).unwrap();
        let k = r((b, kv_heads, kv_len + 24, d), 1.0)
            .narrow(2, 0, kv_len)
            .unwrap();
        let v = r((b, kv_heads, kv_len + 24, d), 1.0)
            .narrow(2, 0, kv_len)
            .unwrap();
        let m = if causal {
            Masking::Causal { past }
        } else {
            Masking::None
        };
        let cpu = attention(&q, &k, &v, 0.125, m, &ctx).unwrap();
        for (dtype, tol) in [(DType::BF16, 2e-2), (DType::F16, 4e-3)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            set_device_kernels(DeviceKernels::Fused);
            let flash = attention(&on(&q), &on(&k), &on(&v), 0.125, m, &ctx).unwrap();
            set_device_kernels(DeviceKernels::Unfused);
            let unfused = attention(&on(&q), &on(&k), &on(&v), 0.125, m, &ctx).unwrap();
            set_device_kernels(DeviceKernels::Fused);
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let case = format!("{dtype:?} b {b} heads {heads}/{kv_heads} q {q_len} past {past} d {d} causal {causal}");
            assert_eq!(flash.dims(), cpu.dims(), "{case}");
            let e = max_abs(&cpu, &f32(&flash));
            assert!(e <= tol, "flash vs CPU, {case}: {e}");
            let e = max_abs(&f32(&unfused), &f32(&flash));
            assert!(e <= 2.0 * tol, "flash vs unfused, {case}: {e}");
        }
    }
}

/// `kernels/decode_attention.cu` (a batched decode step's attention, every sequence in one
/// launch) against the CPU's decode kernel: cache lengths 1 to 700 (fewer keys than the kernel's
/// 8 warps, and many), caches read through narrowed views, grouped heads, head sizes 64, 72 and
/// 128; f32 within 1e-4 (summation order), bf16 within 2e-2, f16 within 4e-3 (the output's
/// rounding); each row equal bit for bit to the sequence decoded alone on the GPU; and within
/// the same bounds of the unfused GPU path.
#[test]
fn decode_attention_kernel_matches_the_cpu_alone_and_batched() {
    use vvlm_engine::attention::decode_attention_batch;
    use vvlm_engine::{set_device_kernels, DeviceKernels};
    let dev = gpu();
    let flops = FlopCounter::new();
    for (heads, kv_heads, d) in [(6, 2, 64), (4, 4, 72), (8, 1, 128)] {
        let lens = [1usize, 5, 130, 700];
        let b = lens.len();
        let round = |t: Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let q = round(Tensor::randn(0f32, 0.5, (1, heads, b, d), &Device::Cpu).unwrap());
        let kvs: Vec<(Tensor, Tensor)> = lens
            .iter()
            .map(|&n| {
                let t = || {
                    round(Tensor::randn(0f32, 1.0, (1, kv_heads, n + 10, d), &Device::Cpu).unwrap())
                        .narrow(2, 0, n)
                        .unwrap()
                };
                (t(), t())
            })
            .collect();
        let ctxs: Vec<vvlm_engine::Ctx> = (0..b)
            .map(|_| vvlm_engine::Ctx::new(&flops, Component::LmDecode))
            .collect();
        let cpu = decode_attention_batch(&q, &kvs, 0.125, &ctxs).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let gkvs: Vec<(Tensor, Tensor)> = kvs.iter().map(|(k, v)| (on(k), on(v))).collect();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let case = format!("{dtype:?} heads {heads}/{kv_heads} d {d}");
            let got = decode_attention_batch(&on(&q), &gkvs, 0.125, &ctxs).unwrap();
            assert_eq!(got.dims(), cpu.dims(), "{case}");
            let e = max_abs(&cpu, &f32(&got));
            assert!(e <= tol, "batched vs CPU, {case}: {e}");
            for (i, (k, v)) in gkvs.iter().enumerate() {
                let qi = on(&q).narrow(2, i, 1).unwrap().contiguous().unwrap();
                let ctx = vvlm_engine::Ctx::new(&flops, Component::LmDecode);
                let m = Masking::Causal { past: lens[i] - 1 };
                let alone = attention(&qi, k, v, 0.125, m, &ctx)
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                let row = got.get(i).unwrap().flatten_all().unwrap();
                assert_eq!(
                    f32(&alone).to_vec1::<f32>().unwrap(),
                    f32(&row).to_vec1::<f32>().unwrap(),
                    "{case} sequence {i}: alone = batched"
                );
            }
            set_device_kernels(DeviceKernels::Unfused);
            let unfused = decode_attention_batch(&on(&q), &gkvs, 0.125, &ctxs).unwrap();
            set_device_kernels(DeviceKernels::Fused);
            let e = max_abs(&f32(&unfused), &f32(&got));
            assert!(e <= 2.0 * tol, "fused vs unfused, {case}: {e}");
        }
    }
}

/// `kernels/epilogue.cu` against its CPU reference (`BiasGeluTanh`, `BiasResidual`,
/// `SwigluDevice`): f32
/// within 1e-5 of each value's magnitude (the GPU's tanhf vs libm's tanh), bf16/f16 within one
/// ulp of the output (2^-7, 2^-10 of a value).
#[test]
fn epilogue_kernels_match_their_cpu_reference() {
    use vvlm_engine::nn::{BiasGeluTanh, BiasResidual, SwigluDevice};
    let dev = gpu();
    let y = Tensor::randn(0f32, 2.0, (7, 300, 4304), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, 4304, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (7, 300, 4304), &Device::Cpu).unwrap();
    for (dtype, rel) in [
        (DType::F32, 1e-5),
        (DType::BF16, 2f32.powi(-7)),
        (DType::F16, 2f32.powi(-10)),
    ] {
        let (y, b, x) = (
            y.to_dtype(dtype).unwrap(),
            b.to_dtype(dtype).unwrap(),
            x.to_dtype(dtype).unwrap(),
        );
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        for (name, cpu, cuda) in [
            (
                "gelu",
                y.apply_op2_no_bwd(&b, &BiasGeluTanh).unwrap(),
                on(&y).apply_op2_no_bwd(&on(&b), &BiasGeluTanh).unwrap(),
            ),
            (
                "residual",
                y.apply_op3_no_bwd(&b, &x, &BiasResidual).unwrap(),
                on(&y)
                    .apply_op3_no_bwd(&on(&b), &on(&x), &BiasResidual)
                    .unwrap(),
            ),
            (
                // y as a fused gate/up product: [.., 2 · 2152] -> [.., 2152].
                "swiglu",
                y.apply_op1_no_bwd(&SwigluDevice).unwrap(),
                on(&y).apply_op1_no_bwd(&SwigluDevice).unwrap(),
            ),
        ] {
            let f = common::values_f32;
            for (c, g) in f(&cpu).iter().zip(f(&cuda)) {
                assert!(
                    (c - g).abs() <= rel * c.abs().max(1.0),
                    "{name} {dtype:?}: {c} vs {g}"
                );
            }
        }
    }
}

/// `kernels/rms_norm.cu` against its CPU reference (`RmsNormLowPrecision`, itself checked
/// against the composition `RmsNorm` runs on the CPU): rows of 2048 and 576, bf16 and f16,
/// within two ulps of the output (the GPU sums in another order).
#[test]
fn rms_norm_kernel_matches_its_cpu_reference() {
    use vvlm_engine::nn::RmsNormLowPrecision;
    let dev = gpu();
    let op = RmsNormLowPrecision { eps: 1e-5 };
    for n in [2048usize, 576] {
        let x = Tensor::randn(0f32, 3.0, (3, 100, n), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.2, n, &Device::Cpu).unwrap();
        for (dt, ulp) in [(DType::BF16, 2f32.powi(-7)), (DType::F16, 2f32.powi(-10))] {
            let (x, w) = (x.to_dtype(dt).unwrap(), w.to_dtype(dt).unwrap());
            let cpu = x.apply_op2_no_bwd(&w, &op).unwrap();
            let cuda = x
                .to_device(&dev)
                .unwrap()
                .apply_op2_no_bwd(&w.to_device(&dev).unwrap(), &op)
                .unwrap();
            let f = common::values_f32;
            for (c, g) in f(&cpu).iter().zip(f(&cuda)) {
                assert!(
                    (c - g).abs() <= 2.0 * ulp * c.abs().max(2f32.powi(-10)),
                    "{dt:?} n {n}: {c} vs {g}"
                );
            }
        }
    }
}

/// `kernels/split_rope.cu` against its CPU reference (`SplitRope`, itself bit-equal to the
/// per-head copies and candle's rope in f32): the same f32 arithmetic without fused
/// multiply-adds and one rounding to the type, so every dtype equal bit for bit; a prompt
/// (batch 2, 37 positions) and a decode batch laid out as time (b 1, 9 rows).
#[test]
fn split_rope_kernel_equals_its_cpu_reference() {
    use vvlm_engine::llama::SplitRope;
    let dev = gpu();
    let (heads, kv_heads, d) = (8, 2, 64);
    let op = SplitRope {
        rotated: heads + kv_heads,
        heads: heads + 2 * kv_heads,
        head_dim: d,
    };
    for (b, len) in [(2usize, 37usize), (1, 9)] {
        let x = Tensor::randn(
            0f32,
            1.0,
            (b, len, (heads + 2 * kv_heads) * d),
            &Device::Cpu,
        )
        .unwrap();
        let angles = Tensor::randn(0f32, 2.0, (len, d / 2), &Device::Cpu).unwrap();
        let (c, s) = (angles.cos().unwrap(), angles.sin().unwrap());
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = |v: &Tensor| v.to_dtype(dt).unwrap();
            let on = |v: &Tensor| t(v).to_device(&dev).unwrap();
            let cpu = t(&x).apply_op3_no_bwd(&t(&c), &t(&s), &op).unwrap();
            let cuda = on(&x).apply_op3_no_bwd(&on(&c), &on(&s), &op).unwrap();
            let f = common::values_f32;
            assert_eq!(f(&cpu), f(&cuda), "{dt:?} b {b} len {len}");
        }
    }
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

/// The trained suite rung on the GPU (f32): two questions about one video answer as on the CPU,
/// and decoding them together in one batch (continuous batching, the batched forward on cuBLAS)
/// answers as each alone. Greedy tokens are compared: cuBLAS may reorder sums, which could only
/// change a token at a near-tie; the rung's answers are not near ties.
#[test]
fn the_suite_rung_answers_on_the_gpu_as_on_the_cpu_alone_and_batched() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use vvlm_engine::batch::{Batch, Join, Priority};
    use vvlm_engine::{FrameData, GenerateRequest, SamplingParams, VisualInput};
    let ckpt = common::repo_root().join("models/ladder/suite-m");
    let load = |device: Device, dtype: DType| {
        Arc::new(
            VideoVlm::load(
                &ckpt,
                &LoadOptions {
                    device,
                    dtype,
                    ..LoadOptions::default()
                },
            )
            .unwrap(),
        )
    };
    let (cpu, gpu_m) = (load(Device::Cpu, DType::F32), load(gpu(), DType::F32));
    let size = cpu.cfg.vision_config.image_size;
    let frames = 4;
    let pixels: Vec<f32> = (0..frames * 3 * size * size)
        .map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0)
        .collect();
    let visual = VisualInput::Frames(FrameData {
        pixels: &pixels,
        frames,
        size,
    });
    let sampling = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let questions = ["what colour is the flash ?", "what shape moves ?"];
    let alone = |m: &VideoVlm, q: &str| {
        let req = GenerateRequest {
            pixels: None,
            side: 2,
            system: None,
            prompt: q,
            history: &[],
            form: &vvlm_engine::PromptForm::Chat,
            sampling: sampling.clone(),
            cancel: None,
        };
        let (g, _) = m
            .generate_visual(visual, &req, 1, &FlopCounter::new(), &mut |_, _| true)
            .unwrap();
        g[0].token_ids.clone()
    };
    for q in questions {
        assert_eq!(alone(&gpu_m, q), alone(&cpu, q), "{q}: GPU vs CPU");
    }
    // Batched on the GPU (the decode attention and KV append kernels; in bf16 also the flash
    // kernel for the prompts) equals each question alone on the GPU, in f32 and in bf16.
    let gpu_bf16 = load(gpu(), DType::BF16);
    for m in [&gpu_m, &gpu_bf16] {
        let (tokens, _) = m
            .encode_visual(visual, 2, &FlopCounter::new(), None)
            .unwrap();
        let mut batch = Batch::default();
        for (i, q) in questions.iter().enumerate() {
            let j = Join {
                vlm: m.clone(),
                system: None,
                prompt: q.to_string(),
                history: vec![],
                form: vvlm_engine::PromptForm::Chat,
                sampling: sampling.clone(),
                flops: Arc::new(FlopCounter::new()),
                cancel: Arc::new(AtomicBool::new(false)),
                priority: Priority::Interactive,
            };
            batch.join(i as u64, j, tokens.as_ref(), None).unwrap();
        }
        let mut out = std::collections::BTreeMap::new();
        while !batch.is_empty() {
            for (t, r) in batch.step(&mut |_, _| true) {
                out.insert(t, r.unwrap().token_ids);
            }
        }
        for (i, q) in questions.iter().enumerate() {
            assert_eq!(
                out[&(i as u64)],
                alone(m, q),
                "{q}: batched vs alone on the GPU ({:?})",
                m.dtype
            );
        }
    }
}
