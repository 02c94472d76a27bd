//! Batched decode as llama.cpp's `llama-batched-bench` measures it: for each batch size B, B
//! sequences of `npp` prompt tokens prefilled, then `ntg` tokens decoded for all of them (EOS
//! ignored) in one forward pass per step, beside one sequence decoded alone. Each step's next
//! tokens are chosen as the server's scheduler chooses them (`vvlm_engine::generate::sample` on
//! each sequence's logits: greedy by default, or `--temperature`/`--top-p`), and that choice is
//! part of the step's time.

use crate::{percentile, Placement};
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::Ctx;

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[arg(long, default_value = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub gguf: PathBuf,
    /// Random weights of a known shape instead of the GGUF, for a machine the GGUF is not
    /// carried to (a GPU machine).
    #[arg(long)]
    pub random: Option<RandomLm>,
    #[command(flatten)]
    pub placement: Placement,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub npp: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    pub ntg: usize,
    /// Batch sizes.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    pub npl: Vec<usize>,
    /// Decode from the file's quantized blocks (as the server does on the CPU; f32 CPU only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized_decode: bool,
    /// KV caches in f16 (the server's `kv_cache_dtype = "f16"`; CPU, f32 LM).
    #[arg(long)]
    pub kv_f16: bool,
    /// Sampling temperature of every sequence (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus (top-p) of every sequence's draw.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Decode through the server's scheduler (`vvlm_engine::batch::Batch`: each sequence a chat
    /// request joining the batch, with its template, sampling, stop tokens, incremental
    /// detokenisation and streamed text) instead of the bare forward loop: the time per output
    /// token a served request sees. Prompts are short story requests (not `--npp` tokens); a
    /// sequence may end before `--ntg` tokens at its end of turn.
    #[arg(long)]
    pub scheduler: bool,
    #[arg(long)]
    pub json: bool,
}

/// LM shapes the batch benchmark can fill with random weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomLm {
    /// Llama-3.2-1B (16 layers, d 2048, GQA 32/8, vocab 128256).
    Llama1b,
    /// SmolLM2-135M (30 layers, d 576, GQA 9/3, vocab 49152): the GGUF's shape.
    Smollm2,
}

impl RandomLm {
    pub fn config(self) -> vvlm_engine::TextConfig {
        match self {
            RandomLm::Llama1b => vvlm_engine::TextConfig::llama32_1b(),
            RandomLm::Smollm2 => serde_json::from_value(serde_json::json!({
                "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "vocab_size": 49152, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true, "rope_theta": 100000.0
            }))
            .expect("valid config"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            RandomLm::Llama1b => "Llama-3.2-1B shape (random weights)",
            RandomLm::Smollm2 => "SmolLM2-135M shape (random weights)",
        }
    }
}

/// One batch size's figures.
#[derive(Debug, Serialize)]
pub struct BatchRow {
    pub batch: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Aggregate decode tokens per second, batched.
    pub decode_tok_s: f64,
    /// One sequence decoded alone (what B requests get one after another).
    pub sequential_decode_tok_s: f64,
    /// Time per output token (one batched step), median and 99th percentile.
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    /// The slowest step (a stall: a cache growing, a join).
    pub tpot_max_ms: f64,
}

/// Whether the run decodes from the GGUF's quantized blocks (only where that path exists).
pub fn quantized(a: &BatchArgs, opts: &vvlm_engine::LoadOptions) -> bool {
    a.quantized_decode
        && a.random.is_none()
        && opts.device.is_cpu()
        && opts.dtype == candle_core::DType::F32
}

/// Runs every batch size; prints a table unless `a.json`; returns the rows.
pub fn run(a: &BatchArgs) -> Result<Vec<BatchRow>> {
    if a.scheduler {
        let rows = run_scheduler(a)?;
        if !a.json {
            print_rows(
                &format!(
                    "SmolLM2-135M through the scheduler (Q4_1/Q8_0 blocks, {} kernels), story prompts, \
                     up to {} generated tokens per sequence, {}",
                    vvlm_engine::qdot::Isa::best().name(),
                    a.ntg,
                    sampling_label(a)
                ),
                &rows,
            );
        }
        return Ok(rows);
    }
    let opts = a.placement.load_options()?;
    let (dev, dtype) = (opts.device.clone(), opts.dtype);
    let lm = match a.random {
        Some(r) => {
            let cfg = r.config();
            let t = vvlm_engine::demo::random_lm_tensors(&cfg, 2)?;
            let vb = candle_nn::VarBuilder::from_tensors(t, dtype, &dev);
            vvlm_engine::llama::Llama::load(vb, None, &cfg)?
        }
        None => {
            let g = vvlm_engine::gguf::load(&a.gguf, dtype, &dev)
                .with_context(|| format!("{} (run models/fetch-smollm2.sh)", a.gguf.display()))?;
            let vb = candle_nn::VarBuilder::from_tensors(g.tensors, dtype, &dev);
            let mut lm = vvlm_engine::llama::Llama::load(vb, None, &g.config)?;
            if quantized(a, &opts) {
                lm.attach_quantized(&g.quantized)?;
            }
            lm
        }
    };
    let mut lm = lm;
    if a.kv_f16 {
        lm.set_kv_cache_dtype(candle_core::DType::F16)?;
    }
    let prompt = |s: usize| -> Vec<u32> {
        (0..a.npp as u32)
            .map(|i| 100 + (i * 7 + s as u32 * 13) % 1000)
            .collect()
    };
    // The scheduler's choice of a token from a row of logits (a fixed spread of draws).
    let sampling = vvlm_engine::SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        ..Default::default()
    };
    let choose = |logits: &[f32], draw: usize| -> u32 {
        let u = (draw as f64 * 0.618_033_988_749_895).fract();
        vvlm_engine::generate::sample(logits, &sampling, u)
    };
    let rows = vvlm_engine::cpu_pool::run(|| -> Result<Vec<BatchRow>> {
        let c = FlopCounter::new();
        let prefill = |ids: &[u32]| -> Result<(vvlm_engine::llama::KvCache, u32)> {
            let ctx = Ctx::new(&c, Component::LmPrefill);
            let mut ctx = ctx;
            // Allocated once for every position it will reach, as the server's sequences are.
            let mut cache = lm.new_cache();
            cache.plan_positions(a.npp + a.ntg);
            let h = lm.forward_hidden(&lm.embed(ids)?, &mut cache, &mut ctx)?;
            let next = vvlm_engine::llama::argmax(&lm.last_logits(&h, &ctx)?)?;
            Ok((cache, next))
        };
        // One sequence alone: the one-at-a-time figure.
        let (mut cache, mut tok) = prefill(&prompt(0))?;
        let mut ctx = Ctx::new(&c, Component::LmDecode);
        let t = Instant::now();
        for step in 0..a.ntg {
            let h = lm.forward_hidden(&lm.embed(&[tok])?, &mut cache, &mut ctx)?;
            tok = choose(&lm.last_logits(&h, &ctx)?.to_vec1()?, step);
        }
        let single_tok_s = a.ntg as f64 / t.elapsed().as_secs_f64();
        let mut rows = vec![];
        for &b in &a.npl {
            let t = Instant::now();
            let mut caches = vec![];
            let mut next = vec![];
            for s in 0..b {
                let (cache, n) = prefill(&prompt(s))?;
                caches.push(cache);
                next.push(n);
            }
            let prefill_s = t.elapsed().as_secs_f64();
            let mut steps = vec![];
            let t = Instant::now();
            for step in 0..a.ntg {
                let s0 = Instant::now();
                let embeds = lm.embed(&next)?.transpose(0, 1)?.contiguous()?;
                let ctxs: Vec<Ctx> = (0..b).map(|_| Ctx::new(&c, Component::LmDecode)).collect();
                let mut refs: Vec<&mut vvlm_engine::llama::KvCache> = caches.iter_mut().collect();
                let logits = lm.decode_batch(&embeds, &mut refs, &ctxs)?;
                // Each row read in place on the CPU, as the scheduler reads them (one copy to the
                // host from a GPU: a row's `to_vec1` there copies the whole batch's logits).
                next =
                    vvlm_engine::llama::for_each_row(&logits, |r, row| choose(row, step * b + r))?;
                steps.push(s0.elapsed().as_secs_f64() * 1e3);
            }
            let decode_s = t.elapsed().as_secs_f64();
            steps.sort_by(f64::total_cmp);
            rows.push(BatchRow {
                batch: b,
                prefill_s,
                decode_s,
                decode_tok_s: (b * a.ntg) as f64 / decode_s,
                sequential_decode_tok_s: single_tok_s,
                tpot_p50_ms: percentile(&steps, 0.5),
                tpot_p99_ms: percentile(&steps, 0.99),
                tpot_max_ms: percentile(&steps, 1.0),
            });
        }
        Ok(rows)
    })?;
    if a.json {
        return Ok(rows);
    }
    let header = format!(
        "{} decode ({}), {} prompt + {} generated tokens per sequence, {}, {}",
        a.random.map_or("SmolLM2-135M", RandomLm::label),
        if quantized(a, &opts) {
            format!(
                "Q4_1/Q8_0 blocks, {:?} kernels",
                vvlm_engine::qdot::Isa::best()
            )
        } else {
            format!("{dtype:?}")
        },
        a.npp,
        a.ntg,
        if dev.is_cpu() {
            format!(
                "{} threads",
                vvlm_engine::cpu_pool::run(rayon::current_num_threads)
            )
        } else {
            a.placement.device.clone()
        },
        sampling_label(a)
    );
    print_rows(&header, &rows);
    Ok(rows)
}

/// How tokens are chosen, and the KV cache's type.
fn sampling_label(a: &BatchArgs) -> String {
    let kv = if a.kv_f16 { "f16" } else { "as computed" };
    if a.temperature > 0.0 {
        format!(
            "sampled at temperature {} top-p {}, KV cache {kv}",
            a.temperature, a.top_p
        )
    } else {
        format!("greedy, KV cache {kv}")
    }
}

fn print_rows(header: &str, rows: &[BatchRow]) {
    println!("{header}");
    println!(
        "    B | batched tok/s | one at a time tok/s | speed-up | TPOT p50 ms | p99 ms | max ms"
    );
    for r in rows {
        println!(
            "{:>5} | {:>13.1} | {:>19.1} | {:>7.2}x | {:>11.2} | {:>6.2} | {:>6.2}",
            r.batch,
            r.decode_tok_s,
            r.sequential_decode_tok_s,
            r.decode_tok_s / r.sequential_decode_tok_s,
            r.tpot_p50_ms,
            r.tpot_p99_ms,
            r.tpot_max_ms
        );
    }
}

/// Story requests: answers long enough to fill `--ntg` tokens.
const STORY_PROMPTS: [&str; 8] = [
    "Write a long story about a lighthouse keeper.",
    "Write a long story about a dragon who learns to cook.",
    "Tell me a long tale about a lost city under the sea.",
    "Write a long story about two friends crossing a desert.",
    "Describe, at length, a day in the life of a medieval baker.",
    "Write a long story about a robot who paints.",
    "Tell a long story about a storm over a small fishing village.",
    "Write a long story about a clockmaker and a mysterious clock.",
];

/// [`run`] through the scheduler: for each B, B story requests join a [`Batch`] and it steps
/// until all have left; a step's time includes choosing each sequence's token and streaming
/// its text. One request alone first (the one-at-a-time figure).
///
/// [`Batch`]: vvlm_engine::batch::Batch
fn run_scheduler(a: &BatchArgs) -> Result<Vec<BatchRow>> {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use vvlm_engine::batch::{Batch, Join, Priority};
    let mut opts = a.placement.load_options()?;
    anyhow::ensure!(
        a.random.is_none() && quantized(a, &opts),
        "--scheduler serves the GGUF from its quantized blocks on the CPU"
    );
    if a.kv_f16 {
        opts.kv_cache = vvlm_engine::KvCacheDtype::F16;
    }
    // The SmolLM2 demo checkpoint (the GGUF's LM and tokenizer; its vision tower is not used).
    let dir = std::env::temp_dir().join(format!("vvlm-bench-scheduler-{}", std::process::id()));
    vvlm_engine::demo::write_demo_checkpoint(
        &dir,
        &a.gguf,
        &vvlm_engine::demo::demo_vision_config(),
        0,
    )
    .with_context(|| format!("{} (run models/fetch-smollm2.sh)", a.gguf.display()))?;
    let vlm = vvlm_engine::VideoVlm::load(&dir, &opts);
    std::fs::remove_dir_all(&dir).ok();
    let vlm = Arc::new(vlm?);
    let join = |i: usize| Join {
        vlm: vlm.clone(),
        system: None,
        prompt: STORY_PROMPTS[i % STORY_PROMPTS.len()].to_string(),
        history: vec![],
        form: vvlm_engine::PromptForm::Chat,
        sampling: vvlm_engine::SamplingParams {
            max_tokens: a.ntg,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: i as u64,
            ..Default::default()
        },
        flops: Arc::new(FlopCounter::new()),
        cancel: Arc::new(AtomicBool::new(false)),
        priority: Priority::Interactive,
    };
    // B sequences joined, then stepped until every one has left: (join seconds, per-step ms,
    // decode seconds, tokens generated).
    let serve = |b: usize| -> Result<(f64, Vec<f64>, f64, usize)> {
        let mut batch = Batch::default();
        let t = Instant::now();
        for i in 0..b {
            batch.join(i as u64, join(i), None, None)?;
        }
        let join_s = t.elapsed().as_secs_f64();
        let (mut steps, mut tokens) = (vec![], 0);
        let t = Instant::now();
        while !batch.is_empty() {
            let s0 = Instant::now();
            for (_, r) in batch.step(&mut |_, _| true) {
                tokens += r?.token_ids.len();
            }
            steps.push(s0.elapsed().as_secs_f64() * 1e3);
        }
        Ok((join_s, steps, t.elapsed().as_secs_f64(), tokens))
    };
    let (_, _, single_s, single_tokens) = serve(1)?;
    let single_tok_s = single_tokens as f64 / single_s;
    let mut rows = vec![];
    for &b in &a.npl {
        let (prefill_s, mut steps, decode_s, tokens) = serve(b)?;
        steps.sort_by(f64::total_cmp);
        rows.push(BatchRow {
            batch: b,
            prefill_s,
            decode_s,
            decode_tok_s: tokens as f64 / decode_s,
            sequential_decode_tok_s: single_tok_s,
            tpot_p50_ms: percentile(&steps, 0.5),
            tpot_p99_ms: percentile(&steps, 0.99),
            tpot_max_ms: percentile(&steps, 1.0),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smollm2_preset_has_the_ggufs_shape() {
        // Figures from SmolLM2-135M-Instruct's config.json (134.5M parameters, tied embeddings).
        let c = RandomLm::Smollm2.config();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.vocab_size),
            (576, 30, 49152)
        );
        assert_eq!(
            (c.num_attention_heads, c.kv_heads(), c.head_dim()),
            (9, 3, 64)
        );
    }
}
