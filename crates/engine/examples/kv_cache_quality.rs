//! What an f16 KV cache does to a served LM's predictions, beside what the served int8 path
//! itself does: a text teacher-forced through SmolLM2-135M (release build) one decode step per
//! token, three ways in lockstep: exact f32 (the file dequantized, f32 products, f32 cache: the
//! reference), as served (the file's Q4_1/Q8_0 blocks with 8-bit activations, f32 cache), and as
//! served with `kv_cache_dtype = "f16"`. Per way: the text's perplexity, and against the
//! reference: how often the top token agrees and how far the logits move (max and mean |Δ|).
//! The same for the f16 cache against the served f32 cache: the f16 cache's own effect.
//! `cargo run --release -p vvlm-engine --example kv_cache_quality [-- GGUF TEXT [TOKENS [PROMPT]]]`
//! (defaults: the demo GGUF, /usr/share/common-licenses/GPL-3, 1024 decoded tokens after a
//! 16-token prompt).
use candle_core::{DType, Device, Tensor};
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::llama::{KvCache, Llama};
use vvlm_engine::Ctx;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One way of running the LM: its model, its cache, and what its steps gave.
struct Way<'a> {
    name: &'static str,
    lm: &'a Llama,
    cache: KvCache,
    nll: f64,
    logits: Vec<f32>,
}

/// `log p(target)` under `logits` (f64 log-sum-exp).
fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

/// Agreement of two ways over the steps: top tokens equal, max and mean |Δ logit|.
#[derive(Default)]
struct Agreement {
    same_top: usize,
    steps: usize,
    max_abs: f32,
    sum_abs: f64,
    count: usize,
}

impl Agreement {
    fn add(&mut self, a: &[f32], b: &[f32]) {
        self.steps += 1;
        if vvlm_engine::sampling::greedy(a) == vvlm_engine::sampling::greedy(b) {
            self.same_top += 1;
        }
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs();
            self.max_abs = self.max_abs.max(d);
            self.sum_abs += d as f64;
        }
        self.count += a.len();
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what:<44} top token the same {:>5} / {} ({:.2}%), |Δ logit| max {:.3} mean {:.4}",
            self.same_top,
            self.steps,
            100.0 * self.same_top as f64 / self.steps as f64,
            self.max_abs,
            self.sum_abs / self.count as f64
        )
    }
}

fn main() -> Result<(), Error> {
    vvlm_engine::tune_cpu_allocator();
    let args: Vec<String> = std::env::args().collect();
    let gguf = args
        .get(1)
        .cloned()
        .unwrap_or("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let text_path = args
        .get(2)
        .cloned()
        .unwrap_or("/usr/share/common-licenses/GPL-3".into());
    let steps: usize = args.get(3).map_or(Ok(1024), |s| s.parse())?;
    let prompt: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let text = std::fs::read_to_string(&text_path)
        .map_err(|e| format!("reading the text {text_path}: {e}"))?;

    let path = std::path::Path::new(&gguf);
    let dev = Device::Cpu;
    // The reference: the file's blocks dequantized, f32 products (no quantized matrices).
    let full = vvlm_engine::gguf::load(path, DType::F32, &dev)?;
    let exact = Llama::load(
        candle_nn::VarBuilder::from_tensors(full.tensors.clone(), DType::F32, &dev),
        None,
        &full.config,
    )?;
    drop(full);
    // As served: from the file's blocks.
    let g = vvlm_engine::gguf::load_quantized(path, DType::F32, &dev)?;
    let mut served = Llama::load_quantized(
        candle_nn::VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &dev),
        None,
        &g.config,
        &g.quantized,
    )?;
    // One served model, two caches: a cache keeps the dtype it was made with.
    let served_f32_cache = served.new_cache();
    served.set_kv_cache_dtype(DType::F16)?;
    let served_f16_cache = served.new_cache();

    let ids = g
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| format!("tokenizing: {e}"))?
        .get_ids()
        .to_vec();
    if ids.len() < prompt + steps + 1 {
        return Err(format!(
            "{text_path} is {} tokens; {prompt} + {steps} + 1 are needed",
            ids.len()
        )
        .into());
    }
    let c = FlopCounter::new();
    vvlm_engine::cpu_pool::run(|| -> Result<(), Error> {
        let mut ways: Vec<Way> = [
            ("exact f32, f32 cache", &exact, exact.new_cache()),
            ("served int8, f32 cache", &served, served_f32_cache),
            ("served int8, f16 cache", &served, served_f16_cache),
        ]
        .into_iter()
        .map(|(name, lm, mut cache)| {
            cache.plan_positions(prompt + steps);
            Way {
                name,
                lm,
                cache,
                nll: 0.0,
                logits: vec![],
            }
        })
        .collect();
        // The prompt prefilled; its last logits predict token `prompt`.
        for w in ways.iter_mut() {
            let mut ctx = Ctx::new(&c, Component::LmPrefill);
            let h =
                w.lm.forward_hidden(&w.lm.embed(&ids[..prompt])?, &mut w.cache, &mut ctx)?;
            w.logits = w.lm.last_logits(&h, &ctx)?.to_vec1()?;
        }
        let (mut served_vs_exact, mut f16_vs_exact, mut f16_vs_served) = (
            Agreement::default(),
            Agreement::default(),
            Agreement::default(),
        );
        for &token in &ids[prompt..prompt + steps] {
            // Scored: the token under the logits of the positions before it.
            for w in ways.iter_mut() {
                w.nll -= log_prob(&w.logits, token as usize);
            }
            served_vs_exact.add(&ways[1].logits, &ways[0].logits);
            f16_vs_exact.add(&ways[2].logits, &ways[0].logits);
            f16_vs_served.add(&ways[2].logits, &ways[1].logits);
            // Teacher forcing: the token is the next step's input, whatever each way predicted.
            for w in ways.iter_mut() {
                let embeds: Tensor = w.lm.embed(&[token])?.transpose(0, 1)?.contiguous()?;
                let ctxs = [Ctx::new(&c, Component::LmDecode)];
                let logits = w.lm.decode_batch(&embeds, &mut [&mut w.cache], &ctxs)?;
                w.logits = logits.squeeze(0)?.to_vec1()?;
            }
        }
        println!(
            "{text_path}: {steps} tokens scored after a {prompt}-token prompt, one decode step each"
        );
        for w in &ways {
            println!(
                "{:<24} perplexity {:.4} (mean NLL {:.5} nats)",
                w.name,
                (w.nll / steps as f64).exp(),
                w.nll / steps as f64
            );
        }
        println!("{}", served_vs_exact.line("served int8 f32 cache vs exact"));
        println!("{}", f16_vs_exact.line("served int8 f16 cache vs exact"));
        println!(
            "{}",
            f16_vs_served.line("f16 cache vs f32 cache (both served int8)")
        );
        Ok(())
    })
}
