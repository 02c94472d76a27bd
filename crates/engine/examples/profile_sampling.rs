//! What choosing one token costs on the CPU (release build): `vvlm_engine::sample` on real
//! SmolLM2-135M logits (49152 of them, after a short prompt, from the Q4_1 GGUF as the server
//! loads it) at greedy, temperature 0.7 with top-p 0.9 and 1.0, and temperature 1.5, and
//! `logprobs_at` with 5 alternatives, with top-k and min-p, and the penalties (a copy of the
//! logits and the changes): median and fastest µs per call. A batched decode step
//! samples once per sequence on the scheduler's thread, between forward passes.
//! `cargo run --release -p vvlm-engine --example profile_sampling [-- GGUF]`.
use candle_core::{DType, Device};
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};
use vvlm_engine::{Ctx, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let g =
        vvlm_engine::gguf::load_quantized(std::path::Path::new(&path), DType::F32, &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &Device::Cpu);
    let lm = vvlm_engine::llama::Llama::load_quantized(vb, None, &g.config, &g.quantized)?;
    let c = FlopCounter::new();
    let ids: Vec<u32> = (0..24u32).map(|i| 100 + i * 37 % 900).collect();
    let mut cache = lm.new_cache();
    let mut ctx = Ctx::new(&c, Component::LmPrefill);
    let h = lm.forward_hidden(&lm.embed(&ids)?, &mut cache, &mut ctx)?;
    let logits: Vec<f32> = lm.last_logits(&h, &ctx)?.to_vec1()?;
    println!(
        "{} logits; µs per call, median / fastest of 200",
        logits.len()
    );
    let time = |name: &str, f: &mut dyn FnMut(f64) -> u32| {
        let mut v = vec![];
        let mut sink = 0u64;
        for i in 0..200 {
            let t = Instant::now();
            sink += f(i as f64 / 200.0) as u64;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        v.sort_by(f64::total_cmp);
        println!(
            "{name:>32}: {:>8.1} / {:>8.1}   (tokens drawn sum {sink})",
            v[100], v[0]
        );
    };
    for (temperature, top_p) in [(0.0, 1.0), (0.7, 0.9), (0.7, 1.0), (1.5, 0.95)] {
        let p = SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        };
        time(&format!("sample t={temperature} top_p={top_p}"), &mut |u| {
            vvlm_engine::generate::sample(&logits, &p, u)
        });
    }
    // vLLM's extensions: top-k and min-p (a partial selection over the weights), and the
    // penalties as a sequence applies them (a copy of the logits, then the changes) over 256
    // generated tokens and a 64-token prompt.
    for (top_k, min_p) in [(40, 0.0), (0, 0.05)] {
        let p = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k,
            min_p,
            ..Default::default()
        };
        time(
            &format!("sample t=0.7 top_p=0.9 top_k={top_k} min_p={min_p}"),
            &mut |u| vvlm_engine::generate::sample(&logits, &p, u),
        );
    }
    let penalties = vvlm_engine::generate::Penalties {
        frequency: 0.5,
        presence: 0.5,
        repetition: 1.1,
        logit_bias: vec![(13, 5.0), (42, -5.0)],
    };
    let prompt: Vec<u32> = (0..64u32).map(|i| i * 613 % 49152).collect();
    let generated: Vec<u32> = (0..256u32).map(|i| i * 97 % 3000).collect();
    time("penalties (copy + apply)", &mut |_| {
        let mut l = logits.clone();
        penalties.apply(&mut l, &prompt, &generated);
        l[0] as u32
    });
    // JSON mode's mask over the vocabulary (the demo checkpoint's tokenizer, from the same
    // GGUF: `bash scripts/setup-models`): inside a string, where most tokens stay in it, and
    // where a value must begin.
    let demo = std::path::Path::new("models/cache/demo-smollm2");
    if demo.join("config.json").exists() {
        let m = vvlm_engine::VideoVlm::load(demo, &vvlm_engine::LoadOptions::default())?;
        let t = Instant::now();
        let tokens = m.token_bytes();
        println!(
            "{:>32}: {:>8.1}   (once per checkpoint)",
            "token table",
            t.elapsed().as_secs_f64() * 1e6
        );
        let ids = |text: &str| -> Vec<u32> {
            m.tokenizer
                .as_ref()
                .unwrap()
                .encode(text, false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        for (name, prefix) in [
            ("in a string", "{\"name\": \"Fel"),
            ("a value", "{\"age\":"),
        ] {
            let mut c = vvlm_engine::json_mode::JsonConstraint::new(tokens.clone());
            for id in ids(prefix) {
                c.accept(id);
            }
            time(&format!("json mask, {name}"), &mut |_| {
                let mut l = logits.clone();
                c.mask(&mut l, &[0, 2]) as u32
            });
        }
        // A JSON Schema's mask: the first time a state is met (every token tried) and after.
        let schema = vvlm_engine::json_schema::Schema::compile(&serde_json::json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
            "required": ["name"]
        }))?;
        let mut c = vvlm_engine::json_schema::SchemaConstraint::new(
            std::sync::Arc::new(schema),
            tokens.clone(),
        );
        for id in ids("{\"age\": 3, ") {
            c.accept(id);
        }
        let t = Instant::now();
        c.mask(&mut logits.clone(), &[0, 2]);
        println!(
            "{:>32}: {:>8.1}",
            "schema mask, a new state",
            t.elapsed().as_secs_f64() * 1e6
        );
        time("schema mask, a state met before", &mut |_| {
            let mut l = logits.clone();
            c.mask(&mut l, &[0, 2]) as u32
        });
    }
    time("logprobs_at k=5", &mut |_| {
        vvlm_engine::generate::logprobs_at(&logits, 7, 5).1.len() as u32
    });
    Ok(())
}
