//! Where a batched decode step's time goes (release build, SmolLM2-135M Q4_1 GGUF as the server
//! loads it): for B sequences, the median step of `Llama::decode_batch` beside the median time of
//! its matrix products alone (every layer's fused q/k/v, o, fused gate/up and down, and the tied
//! head, each `PackedMatrix::gemv` at B rows on the same weights, into buffers allocated once,
//! the other workers kept awake through a pass as a step keeps them); the difference is attention,
//! norms, RoPE, cache appends and scheduling. Then, per B, one more run of steps with the
//! engine's section timer on (`vvlm_engine::profile`: matmul, attention, norm, rope,
//! activation, kv-append, and the untimed rest), in ms per step.
//! `[VVLM_CPU_KERNELS=avx2] [VVLM_KV_F16=1] cargo run --release -p vvlm-engine --example profile_batch_step [-- GGUF
//! [B,B,..]]`.
use candle_core::{DType, Device};
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::quant::{PackedMatrix, QuantMatrix};
use vvlm_engine::Ctx;

/// Median and minimum (this machine's neighbours only ever slow a step down).
fn median_min(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    vvlm_engine::tune_cpu_allocator();
    // The integer kernels by name, as the server's `cpu_kernels` (default: the best here).
    if let Ok(name) = std::env::var("VVLM_CPU_KERNELS") {
        vvlm_engine::set_cpu_kernels(name.parse()?)?;
    }
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .cloned()
        .unwrap_or("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let batches: Vec<usize> = args
        .get(2)
        .map(|s| {
            s.split(',')
                .map(|b| b.parse().expect("a batch size"))
                .collect()
        })
        .unwrap_or(vec![1, 8]);
    let g =
        vvlm_engine::gguf::load_quantized(std::path::Path::new(&path), DType::F32, &Device::Cpu)?;
    let cfg = g.config.clone();
    // The model's products, fused as `Llama::load_quantized` fuses them.
    let mut mats: Vec<PackedMatrix> = vec![];
    for l in 0..cfg.num_hidden_layers {
        let p = |n: &str| &g.quantized[&format!("layers.{l}.{n}.weight")];
        for parts in [
            vec![
                p("self_attn.q_proj"),
                p("self_attn.k_proj"),
                p("self_attn.v_proj"),
            ],
            vec![p("self_attn.o_proj")],
            vec![p("mlp.gate_proj"), p("mlp.up_proj")],
            vec![p("mlp.down_proj")],
        ] {
            mats.push(
                QuantMatrix::concat_rows(&parts)
                    .expect("same format")
                    .packed(),
            );
        }
    }
    mats.push(g.quantized["embed_tokens.weight"].packed());
    let vb = candle_nn::VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &Device::Cpu);
    let mut lm = vvlm_engine::llama::Llama::load_quantized(vb, None, &cfg, &g.quantized)?;
    // The KV cache in f16, as the server's `kv_cache_dtype = "f16"` (`VVLM_KV_F16=1`).
    if std::env::var("VVLM_KV_F16").is_ok_and(|v| v == "1") {
        lm.set_kv_cache_dtype(DType::F16)?;
    }
    let c = FlopCounter::new();
    vvlm_engine::cpu_pool::run(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        println!("    B | step p50 / min ms | products p50 / min ms | rest p50 / min ms | products GFLOP/s (min)");
        let mut profile_lines = vec![];
        for &b in &batches {
            let mut caches = vec![];
            let mut next = vec![];
            for s in 0..b {
                let ids: Vec<u32> = (0..32u32)
                    .map(|i| 100 + (i * 7 + s as u32 * 13) % 1000)
                    .collect();
                // Allocated once for the 32 + 128 + 32 positions it reaches (as served).
                let mut cache = lm.new_cache();
                cache.plan_positions(32 + 128 + 32);
                let mut ctx = Ctx::new(&c, Component::LmPrefill);
                let h = lm.forward_hidden(&lm.embed(&ids)?, &mut cache, &mut ctx)?;
                next.push(vvlm_engine::llama::argmax(&lm.last_logits(&h, &ctx)?)?);
                caches.push(cache);
            }
            // One decode step of every sequence; the greedy next tokens.
            let step = |next: &[u32],
                        caches: &mut Vec<vvlm_engine::llama::KvCache>|
             -> Result<Vec<u32>, Box<dyn std::error::Error + Send + Sync>> {
                let embeds = lm.embed(next)?.transpose(0, 1)?.contiguous()?;
                let ctxs: Vec<Ctx> = (0..b).map(|_| Ctx::new(&c, Component::LmDecode)).collect();
                let mut refs: Vec<&mut vvlm_engine::llama::KvCache> = caches.iter_mut().collect();
                let logits = lm.decode_batch(&embeds, &mut refs, &ctxs)?;
                // Greedy choices from the rows in place, as the scheduler makes them.
                Ok(vvlm_engine::llama::for_each_row(&logits, |_, row| {
                    vvlm_engine::sampling::greedy(row)
                })?)
            };
            let mut steps = vec![];
            for _ in 0..128 {
                let t = Instant::now();
                next = step(&next, &mut caches)?;
                steps.push(t.elapsed().as_secs_f64() * 1e3);
            }
            // The same steps once more with the engine's section timer on: where the step's
            // time goes by kind of op (the profiler's own cost included), per step.
            vvlm_engine::profile::reset();
            vvlm_engine::profile::set_enabled(true);
            let profiled_steps = 32;
            let t = Instant::now();
            for _ in 0..profiled_steps {
                next = step(&next, &mut caches)?;
            }
            let total = t.elapsed().as_secs_f64() * 1e3 / profiled_steps as f64;
            vvlm_engine::profile::set_enabled(false);
            let mut sections = String::new();
            let mut timed = 0.0;
            for (section, secs, _) in vvlm_engine::profile::totals() {
                let ms = secs * 1e3 / profiled_steps as f64;
                timed += ms;
                sections += &format!(" {} {ms:.2}", section.name());
            }
            profile_lines.push(format!(
                "{b:>5} | profiled step {total:.2} ms:{sections} other {:.2}",
                total - timed
            ));
            // The products alone, as the step runs them: buffers allocated once, the other
            // workers kept awake through a pass (as `decode_batch` keeps them).
            let mut prods = vec![];
            let flops: f64 = mats
                .iter()
                .map(|m| 2.0 * (b * m.rows() * m.cols()) as f64)
                .sum();
            let xs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.5f32; b * m.cols()]).collect();
            let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; b * m.rows()]).collect();
            for _ in 0..64 {
                let t = Instant::now();
                let _warm = vvlm_engine::cpu_pool::keep_warm();
                for ((m, x), y) in mats.iter().zip(&xs).zip(ys.iter_mut()) {
                    m.gemv(x, y, b);
                }
                drop(_warm);
                prods.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let ((s, s0), (p, p0)) = (median_min(steps), median_min(prods));
            println!(
                "{b:>5} | {s:>7.2} / {s0:>7.2} | {p:>9.2} / {p0:>9.2} | {:>7.2} / {:>7.2} | {:>8.1}",
                s - p,
                s0 - p0,
                flops / p0 / 1e6
            );
        }
        for line in profile_lines {
            println!("{line}");
        }
        Ok(())
    })
}
