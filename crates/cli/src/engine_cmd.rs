//! `vvlm debug forward`, `vvlm models make-demo`, `vvlm generate`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use vvlm_cost::{format_si, FlopCounter};
use vvlm_engine::{GenerateRequest, SamplingParams, VideoVlm};

/// Where a command runs the model (device and dtype flags).
pub use vvlm_engine_bench::Placement;

#[derive(Subcommand, Debug)]
pub enum DebugCmd {
    /// Run the whole forward pass on given inputs and write every intermediate.
    Forward(ForwardArgs),
    /// Next-token logits of the LM alone for given token ids (to compare with other runtimes).
    Logits(LogitsArgs),
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Token ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// JSON file for `{"ids": [...], "logits": [...]}` (the last position's logits).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub placement: Placement,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// safetensors with `input.pixel_values_videos` ([1,] T, 3, H, W) and `input.input_ids`.
    #[arg(long)]
    pub inputs: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Visual tokens per frame s*s (default: the checkpoint's own pooling, ceil(grid/2)^2).
    #[arg(long)]
    pub tokens_per_frame: Option<u32>,
    #[command(flatten)]
    pub placement: Placement,
}

pub fn debug(cmd: DebugCmd) -> Result<()> {
    match cmd {
        DebugCmd::Forward(a) => forward(a),
        DebugCmd::Logits(a) => logits(a),
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    let m = VideoVlm::load(&a.checkpoint, &a.placement.load_options()?)?;
    let inputs = candle_core::safetensors::load(&a.inputs, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", a.inputs.display()))?;
    let pixels = inputs
        .get("input.pixel_values_videos")
        .context("inputs lack `input.pixel_values_videos`")?;
    let pixels = if pixels.rank() == 5 {
        pixels.squeeze(0)?
    } else {
        pixels.clone()
    };
    let ids_t = inputs
        .get("input.input_ids")
        .context("inputs lack `input.input_ids`")?;
    let ids: Vec<u32> = ids_t
        .flatten_all()?
        .to_dtype(candle_core::DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let side = match a.tokens_per_frame {
        Some(v) => crate::math::check_square(v)? as usize,
        None => m.cfg.default_side(),
    };
    let flops = FlopCounter::new();
    let out = m.debug_forward(&pixels, &ids, side, &flops)?;
    // Written as f32 on the host whatever the device and dtype, for comparison with references.
    let out = out
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_device(&candle_core::Device::Cpu)?;
            let t = if t.dtype().is_float() {
                t.to_dtype(candle_core::DType::F32)?
            } else {
                t
            };
            Ok((k, t))
        })
        .collect::<candle_core::Result<std::collections::HashMap<String, candle_core::Tensor>>>()?;
    candle_core::safetensors::save(&out, &a.out)?;
    let f = flops.snapshot();
    println!(
        "wrote {} tensors to {} (tokens per frame {}; measured FLOPs {}: vision {}, projector {}, LM {})",
        out.len(),
        a.out.display(),
        side * side,
        format_si(f.total()),
        format_si(f.vision),
        format_si(f.projector),
        format_si(f.lm_prefill)
    );
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let m = VideoVlm::load(&a.checkpoint, &a.placement.load_options()?)?;
    let vocab = m.lm.cfg.vocab_size as u32;
    if let Some(bad) = a.ids.iter().find(|&&i| i >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab})");
    }
    let flops = FlopCounter::new();
    let logits = vvlm_engine::cpu_pool::run(|| -> Result<Vec<f32>> {
        let mut ctx = vvlm_engine::Ctx::new(&flops, vvlm_cost::Component::LmPrefill);
        let mut cache = m.lm.new_cache();
        let h =
            m.lm.forward_hidden(&m.lm.embed(&a.ids)?, &mut cache, &mut ctx)?;
        Ok(m.lm.last_logits(&h, &ctx)?.to_vec1::<f32>()?)
    })?;
    let json = serde_json::json!({"ids": a.ids, "logits": logits});
    std::fs::write(&a.out, serde_json::to_vec(&json)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} logits for {} tokens to {}",
        logits.len(),
        a.ids.len(),
        a.out.display()
    );
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum ModelsCmd {
    /// Build the demo checkpoint: an LM from GGUF behind an untrained random SigLIP + projector.
    MakeDemo(MakeDemoArgs),
}

#[derive(Args, Debug)]
pub struct MakeDemoArgs {
    #[arg(long, default_value = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub gguf: PathBuf,
    #[arg(long, default_value = "models/cache/demo-smollm2")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the full so400m/14 vision shape (slow on CPU) instead of the narrow demo tower.
    #[arg(long)]
    pub so400m: bool,
}

pub fn models(cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::MakeDemo(a) => {
            if !a.gguf.exists() {
                bail!(
                    "{} not found: run models/fetch-smollm2.sh first",
                    a.gguf.display()
                );
            }
            let v = if a.so400m {
                vvlm_engine::SiglipVisionConfig::so400m()
            } else {
                vvlm_engine::demo::demo_vision_config()
            };
            vvlm_engine::demo::write_demo_checkpoint(&a.out, &a.gguf, &v, a.seed)?;
            println!(
                "wrote demo checkpoint {} (vision weights are UNTRAINED)",
                a.out.display()
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub placement: Placement,
}

/// Text-only generation (no video): checks an LM end to end.
pub fn generate(a: GenerateArgs) -> Result<()> {
    let m = VideoVlm::load(&a.checkpoint, &a.placement.load_options()?)?;
    let flops = FlopCounter::new();
    let req = GenerateRequest {
        pixels: None,
        side: 1,
        system: a.system.as_deref(),
        prompt: &a.prompt,
        history: &[],
        form: &vvlm_engine::PromptForm::Chat,
        sampling: SamplingParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            ..Default::default()
        },
        cancel: None,
    };
    let mut out = std::io::stdout();
    let g = m.generate(&req, &flops, &mut |piece| {
        use std::io::Write;
        let _ = write!(out, "{piece}");
        let _ = out.flush();
        true
    })?;
    println!();
    let f = flops.snapshot();
    eprintln!(
        "[{} prompt tokens, {} generated, {:?}; prefill {:.1} tok/s, decode {:.1} tok/s; measured {} FLOPs]",
        g.prompt_tokens,
        g.token_ids.len(),
        g.finish_reason,
        g.prompt_tokens as f64 / g.timings.prefill_s.max(1e-9),
        g.decode_steps as f64 / g.timings.decode_s.max(1e-9),
        format_si(f.total())
    );
    Ok(())
}
