//! Decode attention alone at long contexts (release build): one decode step's attention over
//! every layer of a SmolLM2-135M-shaped model (30 layers, 9 query heads on 3 kv heads of 64),
//! each layer with its own cache (so a step streams `30 · 2 · 3 · len · 64` cached values, as a
//! real step does), for B sequences of `len` positions, f32 and f16 caches: the median and
//! fastest step in ms and the cache bytes read per second.
//! `cargo run --release -p vvlm-engine --example profile_decode_attention [-- LEN,LEN.. [B,B..]]`.
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::attention::decode_attention_batch;
use vvlm_engine::Ctx;

const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const D: usize = 64;

fn list(arg: Option<&String>, default: &[usize]) -> Vec<usize> {
    arg.map(|s| s.split(',').map(|x| x.parse().expect("a number")).collect())
        .unwrap_or(default.to_vec())
}

fn main() -> candle_core::Result<()> {
    vvlm_engine::tune_cpu_allocator();
    let args: Vec<String> = std::env::args().collect();
    let lens = list(args.get(1), &[256, 2048, 4096]);
    let batches = list(args.get(2), &[1, 4]);
    let dev = Device::Cpu;
    let c = FlopCounter::new();
    println!("  len |  B | cache | step p50 / min ms | cache GB/s (min)");
    vvlm_engine::cpu_pool::run(|| -> candle_core::Result<()> {
        for &len in &lens {
            for &b in &batches {
                for dtype in [DType::F32, DType::F16] {
                    let layers: Vec<Vec<(Tensor, Tensor)>> = (0..LAYERS)
                        .map(|_| {
                            (0..b)
                                .map(|_| {
                                    let k = Tensor::randn(0f32, 1.0, (1, KV_HEADS, len, D), &dev)?
                                        .to_dtype(dtype)?;
                                    let v = Tensor::randn(0f32, 1.0, (1, KV_HEADS, len, D), &dev)?
                                        .to_dtype(dtype)?;
                                    Ok((k, v))
                                })
                                .collect::<candle_core::Result<Vec<_>>>()
                        })
                        .collect::<candle_core::Result<_>>()?;
                    let q = Tensor::randn(0f32, 1.0, (1, HEADS, b, D), &dev)?;
                    let mut steps = vec![];
                    for _ in 0..24 {
                        let t = Instant::now();
                        for kvs in &layers {
                            let ctxs: Vec<Ctx> =
                                (0..b).map(|_| Ctx::new(&c, Component::LmDecode)).collect();
                            decode_attention_batch(&q, kvs, 0.125, &ctxs)?;
                        }
                        steps.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    steps.sort_by(f64::total_cmp);
                    let bytes =
                        (LAYERS * b * 2 * KV_HEADS * len * D * dtype.size_in_bytes()) as f64;
                    println!(
                        "{len:>5} | {b:>2} | {:>5} | {:>7.2} / {:>7.2} | {:>8.1}",
                        format!("{dtype:?}"),
                        steps[steps.len() / 2],
                        steps[0],
                        bytes / steps[0] / 1e6
                    );
                }
            }
        }
        Ok(())
    })
}
