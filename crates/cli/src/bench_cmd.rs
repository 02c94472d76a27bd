//! `vvlm bench flops`: theoretical vs exact analytic vs measured FLOPs over a grid of
//! configurations, with wall time per stage and utilisation against the measured matmul peak.

use crate::plot::{self, Chart, Series, Style};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use vvlm_cost::{format_si, FlopCounter, PaperCost, Workload};
use vvlm_engine::{GenerateRequest, SamplingParams, VideoVlm};
use vvlm_video::{decode_path, FrameSampling, MediaPolicy, Preprocess};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Measured vs theoretical FLOPs over a grid of (frames, tokens per frame).
    Flops(FlopsArgs),
    /// Engine hot paths at real shapes with random weights: SigLIP so400m/14 per frame, bilinear
    /// pooling, Llama-3.2-1B-shaped prefill and decode, and SmolLM2 (GGUF) prefill and decode.
    Engine(EngineArgs),
    /// Admissions per second through the ledger (reserve + settle), SQLite or PostgreSQL, from
    /// one or more replicas.
    Ledger(crate::bench_ledger::LedgerBenchArgs),
    /// Batched decode as llama.cpp's `llama-batched-bench` measures it: for each batch size B,
    /// B sequences of `npp` prompt tokens prefilled, then `ntg` tokens decoded for all of them
    /// (greedy, EOS ignored), batched (one forward per step) and one sequence at a time.
    Batch(BatchArgs),
}

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[arg(long, default_value = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub gguf: PathBuf,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub npp: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    pub ntg: usize,
    /// Batch sizes.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    pub npl: Vec<usize>,
    /// Decode from the file's quantized blocks (as the server does on the CPU).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized_decode: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Prefill length (tokens).
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Decode steps timed after the prefill.
    #[arg(long, default_value_t = 16)]
    pub decode: usize,
    /// Frames encoded by the vision benchmark.
    #[arg(long, default_value_t = 2)]
    pub frames: usize,
    /// SmolLM2 GGUF for the small-LM benchmark (skipped when absent).
    #[arg(long, default_value = "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub gguf: PathBuf,
    /// Only these parts (comma separated: vision, pool, llama1b, smollm2).
    #[arg(
        long,
        default_value = "vision,pool,llama1b,smollm2",
        value_delimiter = ','
    )]
    pub parts: Vec<String>,
    #[command(flatten)]
    pub placement: crate::engine_cmd::Placement,
    /// SmolLM2 decode from the GGUF file's quantized blocks (what the server does on the CPU);
    /// `--quantized-decode false` times the f32 matrices instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized_decode: bool,
    /// The device's dense peak at the run's dtype, in TFLOP/s (e.g. 989 for an H100 SXM in
    /// bf16): MFU is reported against it. Default: the measured matmul peak.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FlopsArgs {
    #[arg(long, default_value = "models/cache/demo-smollm2")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub placement: crate::engine_cmd::Placement,
    /// The video to caption (frames are sampled from it for every configuration).
    #[arg(long)]
    pub video: PathBuf,
    /// `isoflop` (the paper's 2 and 5 TFLOPs isoFLOP pairs of its 1B row), `star` (the paper's
    /// star sweep over T and V), or a list `T:V,T:V,...`.
    #[arg(long, default_value = "isoflop")]
    pub grid: String,
    #[arg(long, default_value = "Describe this video.")]
    pub prompt: String,
    /// Generated tokens per configuration (decode is measured too).
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Write `flops.csv` and the SVG plots here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Price the theoretical formula with the paper's SoViT constants (x_M = 0.43e9, x_W = 768)
    /// instead of this checkpoint's own vision tower (its parameters and patches per frame).
    #[arg(long)]
    pub paper_constants: bool,
}

/// The grid: (frames, tokens per frame).
pub fn grid(spec: &str, max_tokens_per_frame: u32) -> Result<Vec<(u32, u32)>> {
    let mut g: Vec<(u32, u32)> = match spec {
        "isoflop" => vec![
            (2, 196),
            (3, 9),
            (3, 16),
            (4, 289),
            (5, 169),
            (6, 81),
            (7, 25),
        ],
        "star" => {
            let mut v: Vec<(u32, u32)> = [4, 8, 12, 16, 32].iter().map(|&t| (t, 196)).collect();
            v.extend([4, 16, 25, 36, 49, 100].iter().map(|&x| (32, x)));
            v
        }
        list => list
            .split(',')
            .map(|p| {
                let (t, v) = p
                    .split_once(':')
                    .with_context(|| format!("grid entries look like T:V, got `{p}`"))?;
                let t: u32 = t
                    .trim()
                    .parse()
                    .with_context(|| format!("bad frame count `{t}`"))?;
                let v: u32 = v
                    .trim()
                    .parse()
                    .with_context(|| format!("bad tokens per frame `{v}`"))?;
                crate::math::check_square(v)?;
                if t == 0 {
                    bail!("frames must be at least 1");
                }
                Ok((t, v))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    g.retain(|&(_, v)| v <= max_tokens_per_frame);
    if g.is_empty() {
        bail!("no configuration of the grid fits this checkpoint");
    }
    Ok(g)
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub model: String,
    pub frames: u32,
    pub tokens_per_frame: u32,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub theoretical_flops: f64,
    pub exact_flops: f64,
    pub measured_flops: f64,
    pub exact: vvlm_cost::FlopBreakdown,
    pub measured: vvlm_cost::FlopBreakdown,
    pub measured_over_exact: f64,
    pub measured_over_theoretical: f64,
    pub seconds_video_decode: f64,
    pub seconds_vision: f64,
    pub seconds_prefill: f64,
    pub seconds_decode: f64,
    pub gflops_vision: f64,
    pub gflops_prefill: f64,
    pub gflops_decode: f64,
    pub utilisation_prefill: f64,
}

/// Best-of-3 f32 matmul throughput of this device (GFLOP/s), the peak utilisation is taken
/// against.
pub fn matmul_peak_gflops(n: usize) -> Result<f64> {
    matmul_peak_gflops_on(n, &Device::Cpu, candle_core::DType::F32)
}

/// Best of 3 `n^3` matmuls on a device at a dtype, synchronised, in GFLOP/s.
pub fn matmul_peak_gflops_on(n: usize, dev: &Device, dtype: candle_core::DType) -> Result<f64> {
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

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Flops(a) => flops(a),
        BenchCmd::Engine(a) => engine(a),
        BenchCmd::Ledger(a) => crate::bench_ledger::run(a),
        BenchCmd::Batch(a) => batch(a),
    }
}

/// One batch size's figures.
#[derive(Debug, Serialize)]
struct BatchRow {
    batch: usize,
    prefill_s: f64,
    decode_s: f64,
    /// Aggregate decode tokens per second, batched.
    decode_tok_s: f64,
    /// One sequence decoded alone (what B requests get one after another).
    sequential_decode_tok_s: f64,
    /// Time per output token (one batched step), median and 99th percentile.
    tpot_p50_ms: f64,
    tpot_p99_ms: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn batch(a: BatchArgs) -> Result<()> {
    use vvlm_cost::Component;
    use vvlm_engine::Ctx;
    let dev = Device::Cpu;
    let dtype = candle_core::DType::F32;
    let g = vvlm_engine::gguf::load(&a.gguf, dtype, &dev)
        .with_context(|| format!("{} (run models/fetch-smollm2.sh)", a.gguf.display()))?;
    let vb = candle_nn::VarBuilder::from_tensors(g.tensors, dtype, &dev);
    let mut lm = vvlm_engine::llama::Llama::load(vb, None, &g.config)?;
    if a.quantized_decode {
        lm.attach_quantized(&g.quantized)?;
    }
    let prompt = |s: usize| -> Vec<u32> {
        (0..a.npp as u32)
            .map(|i| 100 + (i * 7 + s as u32 * 13) % 1000)
            .collect()
    };
    let rows = vvlm_engine::cpu_pool::run(|| -> Result<Vec<BatchRow>> {
        let c = FlopCounter::new();
        let prefill = |ids: &[u32]| -> Result<(vvlm_engine::llama::KvCache, u32)> {
            let ctx = Ctx::new(&c, Component::LmPrefill);
            let mut ctx = ctx;
            let mut cache = lm.new_cache();
            let h = lm.forward_hidden(&lm.embed(ids)?, &mut cache, &mut ctx)?;
            let next = vvlm_engine::llama::argmax(&lm.last_logits(&h, &ctx)?)?;
            Ok((cache, next))
        };
        // One sequence alone: the one-at-a-time figure.
        let (mut cache, mut tok) = prefill(&prompt(0))?;
        let mut ctx = Ctx::new(&c, Component::LmDecode);
        let t = Instant::now();
        for _ in 0..a.ntg {
            let h = lm.forward_hidden(&lm.embed(&[tok])?, &mut cache, &mut ctx)?;
            tok = vvlm_engine::llama::argmax(&lm.last_logits(&h, &ctx)?)?;
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
            for _ in 0..a.ntg {
                let s0 = Instant::now();
                let embeds = lm.embed(&next)?.transpose(0, 1)?.contiguous()?;
                let ctxs: Vec<Ctx> = (0..b).map(|_| Ctx::new(&c, Component::LmDecode)).collect();
                let mut refs: Vec<&mut vvlm_engine::llama::KvCache> = caches.iter_mut().collect();
                let logits = lm.decode_batch(&embeds, &mut refs, &ctxs)?;
                next = (0..b)
                    .map(|r| vvlm_engine::llama::argmax(&logits.get(r)?))
                    .collect::<candle_core::Result<_>>()?;
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
            });
        }
        Ok(rows)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "SmolLM2-135M decode ({}), {} prompt + {} generated tokens per sequence, {} threads",
        if a.quantized_decode {
            "Q4_1/Q8_0 blocks"
        } else {
            "f32"
        },
        a.npp,
        a.ntg,
        vvlm_engine::cpu_pool::run(rayon::current_num_threads)
    );
    println!("    B | batched tok/s | one at a time tok/s | speed-up | TPOT p50 ms | p99 ms");
    for r in &rows {
        println!(
            "{:>5} | {:>13.1} | {:>19.1} | {:>7.2}x | {:>11.2} | {:>6.2}",
            r.batch,
            r.decode_tok_s,
            r.sequential_decode_tok_s,
            r.decode_tok_s / r.sequential_decode_tok_s,
            r.tpot_p50_ms,
            r.tpot_p99_ms
        );
    }
    Ok(())
}

fn lm_prefill_decode(
    lm: &vvlm_engine::llama::Llama,
    prefill: usize,
    decode: usize,
) -> Result<(f64, f64, f64, f64)> {
    use vvlm_cost::Component;
    let ids: Vec<u32> = (0..prefill as u32).map(|i| 100 + (i * 7) % 1000).collect();
    // Warm-up on a short prompt.
    {
        lm.device().synchronize()?;
        let c = FlopCounter::new();
        let mut ctx = vvlm_engine::Ctx::new(&c, Component::LmPrefill);
        let mut cache = lm.new_cache();
        let h = lm.forward_hidden(&lm.embed(&ids[..16.min(prefill)])?, &mut cache, &mut ctx)?;
        let _ = lm.last_logits(&h, &ctx)?;
    }
    let c = FlopCounter::new();
    let mut ctx = vvlm_engine::Ctx::new(&c, Component::LmPrefill);
    let mut cache = lm.new_cache();
    let t = Instant::now();
    let h = lm.forward_hidden(&lm.embed(&ids)?, &mut cache, &mut ctx)?;
    let mut logits = lm.last_logits(&h, &ctx)?;
    lm.device().synchronize()?;
    let prefill_s = t.elapsed().as_secs_f64();
    let prefill_flops = c.get(Component::LmPrefill) as f64;
    ctx.component = Component::LmDecode;
    let t = Instant::now();
    for _ in 0..decode {
        let next = vvlm_engine::llama::argmax(&logits)?;
        let h = lm.forward_hidden(&lm.embed(&[next])?, &mut cache, &mut ctx)?;
        logits = lm.last_logits(&h, &ctx)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok((
        prefill_s,
        prefill_flops,
        decode_s,
        c.get(Component::LmDecode) as f64,
    ))
}

fn engine(a: EngineArgs) -> Result<()> {
    use vvlm_cost::Component;
    let opts = a.placement.load_options()?;
    let (dev, dtype) = (opts.device.clone(), opts.dtype);
    let n = if dev.is_cpu() { 1024 } else { 8192 };
    let measured_peak = matmul_peak_gflops_on(n, &dev, dtype)?;
    let peak = a.peak_tflops.map_or(measured_peak, |t| t * 1e3);
    let mut out = serde_json::json!({
        "device": a.placement.device, "dtype": format!("{dtype:?}"),
        "matmul_peak_gflops": measured_peak, "mfu_reference_gflops": peak,
    });
    let want = |p: &str| a.parts.iter().any(|x| x == p);
    if !a.json {
        println!(
            "{} {dtype:?}: matmul {n}^3 best of 3: {measured_peak:.1} GFLOP/s; MFU against {peak:.1} GFLOP/s",
            a.placement.device
        );
    }
    if want("vision") {
        let cfg = vvlm_engine::SiglipVisionConfig::so400m();
        let t = vvlm_engine::demo::random_vision_tensors(&cfg, 2048, 1)?;
        let vb = candle_nn::VarBuilder::from_tensors(t, dtype, &dev);
        let tower = vvlm_engine::siglip::SiglipVision::load(
            vb.pp("vision_tower.vision_model"),
            &cfg,
            cfg.num_hidden_layers,
        )?;
        let frame_batch = if dev.is_cpu() { 1 } else { a.frames.max(1) };
        let px = Tensor::randn(0f32, 1.0, (frame_batch, 3, 384, 384), &dev)?.to_dtype(dtype)?;
        let c = FlopCounter::new();
        let mut ctx = vvlm_engine::Ctx::new(&c, Component::Vision);
        let _ = vvlm_engine::cpu_pool::run(|| tower.forward(&px, &mut ctx))?; // warm-up
        dev.synchronize()?;
        c.reset();
        // One frame per forward, timed separately: the median resists the noise of a shared
        // machine better than the mean of one batched call.
        // On a GPU, `frames` frames go in one batch (timed 3 times) and times are per frame.
        let mut times = Vec::with_capacity(a.frames);
        let calls = if dev.is_cpu() { a.frames.max(1) } else { 3 };
        for _ in 0..calls {
            let px = Tensor::randn(0f32, 1.0, (frame_batch, 3, 384, 384), &dev)?.to_dtype(dtype)?;
            dev.synchronize()?;
            let t0 = Instant::now();
            let _ = vvlm_engine::cpu_pool::run(|| tower.forward(&px, &mut ctx))?;
            dev.synchronize()?;
            times.push(t0.elapsed().as_secs_f64() / frame_batch as f64);
        }
        let frame_flops = c.get(Component::Vision) as f64 / (calls * frame_batch) as f64;
        times.sort_by(f64::total_cmp);
        let s = times[times.len() / 2];
        let gf = frame_flops / s / 1e9;
        if !a.json {
            println!(
                "SigLIP so400m/14 @384 (26 layers): {s:.3} s/frame (median of {}), {gf:.1} GFLOP/s ({:.0}% of peak)",
                times.len(),
                100.0 * gf / peak
            );
        }
        out["vision_s_per_frame"] = serde_json::json!(s);
        out["vision_gflops"] = serde_json::json!(gf);
        out["vision_frames_per_s"] = serde_json::json!(1.0 / s);
        out["vision_mfu"] = serde_json::json!(gf / peak);
    }
    if want("pool") {
        let x = Tensor::randn(0f32, 1.0, (32, 729, 2048), &dev)?.to_dtype(dtype)?;
        let _ = vvlm_engine::pool::pool(&x, 27, 14)?;
        dev.synchronize()?;
        let t0 = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let _ = vvlm_engine::pool::pool(&x, 27, 14)?;
        }
        dev.synchronize()?;
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        if !a.json {
            println!(
                "bilinear pooling 32 x 27x27 -> 14x14, D=2048: {:.2} ms",
                s * 1e3
            );
        }
        out["pool_32x729x2048_to_14_ms"] = serde_json::json!(s * 1e3);
    }
    if want("llama1b") {
        let cfg = vvlm_engine::TextConfig::llama32_1b();
        let t = vvlm_engine::demo::random_lm_tensors(&cfg, 2)?;
        let vb = candle_nn::VarBuilder::from_tensors(t, dtype, &dev);
        let lm = vvlm_engine::llama::Llama::load(vb, None, &cfg)?;
        let (ps, pf, ds, df) =
            vvlm_engine::cpu_pool::run(|| lm_prefill_decode(&lm, a.prefill, a.decode))?;
        if !a.json {
            println!(
                "Llama-3.2-1B shape: prefill {} tokens {:.1} tok/s ({:.1} GFLOP/s, {:.0}% of peak); decode {:.1} tok/s ({:.3} s/token)",
                a.prefill,
                a.prefill as f64 / ps,
                pf / ps / 1e9,
                100.0 * pf / ps / 1e9 / peak,
                a.decode as f64 / ds,
                ds / a.decode as f64
            );
        }
        out["llama1b_prefill_tok_s"] = serde_json::json!(a.prefill as f64 / ps);
        out["llama1b_prefill_gflops"] = serde_json::json!(pf / ps / 1e9);
        out["llama1b_prefill_mfu"] = serde_json::json!(pf / ps / 1e9 / peak);
        out["llama1b_prefill_flops"] = serde_json::json!(pf);
        out["llama1b_decode_flops"] = serde_json::json!(df);
        out["llama1b_decode_tok_s"] = serde_json::json!(a.decode as f64 / ds);
        out["llama1b_decode_gflops"] = serde_json::json!(df / ds / 1e9);
    }
    if want("smollm2") && a.gguf.exists() {
        let g = vvlm_engine::gguf::load(&a.gguf, dtype, &dev)?;
        let vb = candle_nn::VarBuilder::from_tensors(g.tensors, dtype, &dev);
        let mut lm = vvlm_engine::llama::Llama::load(vb, None, &g.config)?;
        let quantized = a.quantized_decode && dev.is_cpu() && dtype == candle_core::DType::F32;
        if quantized {
            lm.attach_quantized(&g.quantized)?;
        }
        let (ps, pf, ds, _) =
            vvlm_engine::cpu_pool::run(|| lm_prefill_decode(&lm, a.prefill, a.decode.max(32)))?;
        let steps = a.decode.max(32);
        if !a.json {
            println!(
                "SmolLM2-135M (GGUF Q4_1; prefill f32, decode {}): prefill {} tokens {:.1} tok/s ({:.1} GFLOP/s); decode {:.1} tok/s",
                if quantized { "Q4_1/Q8_0 blocks" } else { "f32" },
                a.prefill,
                a.prefill as f64 / ps,
                pf / ps / 1e9,
                steps as f64 / ds
            );
        }
        out["smollm2_prefill_tok_s"] = serde_json::json!(a.prefill as f64 / ps);
        out["smollm2_decode_tok_s"] = serde_json::json!(steps as f64 / ds);
        out["smollm2_decode_quantized"] = serde_json::json!(quantized);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn flops(a: FlopsArgs) -> Result<()> {
    let m = VideoVlm::load(&a.checkpoint, &a.placement.load_options()?)?;
    let grid_side = m.grid() as u32;
    let configs = grid(&a.grid, grid_side * grid_side)?;
    let model = a
        .checkpoint
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let arch = m.arch();
    let lm_params = arch.lm.params();
    let paper = if a.paper_constants {
        PaperCost::default()
    } else {
        PaperCost {
            vision_params: arch.vision.params(),
            vision_features: arch.vision.patches() as f64,
        }
    };
    let peak = matmul_peak_gflops(1024)?;
    let pre = Preprocess {
        size: m.cfg.vision_config.image_size as u32,
        ..Default::default()
    };
    let pb = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(configs.len() as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .expect("template"),
    );
    pb.set_message("bench flops");
    let mut rows = vec![];
    for &(t, v) in &configs {
        let side = (v as f64).sqrt().round() as usize;
        let t0 = Instant::now();
        let video = decode_path(
            &a.video,
            &FrameSampling::Uniform { frames: t as usize },
            &MediaPolicy::default(),
            &pre,
        )?;
        let video_s = t0.elapsed().as_secs_f64();
        let s = pre.size as usize;
        let pixels = Tensor::from_slice(&video.pixels, (t as usize, 3, s, s), &Device::Cpu)?;
        let counter = FlopCounter::new();
        let g = m.generate(
            &GenerateRequest {
                pixels: Some(&pixels),
                side,
                system: None,
                prompt: &a.prompt,
                sampling: SamplingParams {
                    max_tokens: a.max_tokens,
                    ..Default::default()
                },
                cancel: None,
            },
            &counter,
            &mut |_| true,
        )?;
        let measured = counter.snapshot();
        let exact = arch.flops(&Workload {
            frames: t as usize,
            tokens_per_frame: v as usize,
            text_tokens: g.text_tokens,
            decode_steps: g.decode_steps,
        });
        let theoretical = paper.flops(lm_params, t as f64, v as f64);
        let gf = |f: f64, s: f64| if s > 0.0 { f / s / 1e9 } else { 0.0 };
        rows.push(Row {
            model: model.clone(),
            frames: t,
            tokens_per_frame: v,
            prompt_tokens: g.prompt_tokens,
            generated_tokens: g.token_ids.len(),
            theoretical_flops: theoretical,
            exact_flops: exact.total(),
            measured_flops: measured.total(),
            exact,
            measured,
            measured_over_exact: measured.total() / exact.total(),
            measured_over_theoretical: measured.total() / theoretical,
            seconds_video_decode: video_s,
            seconds_vision: g.timings.vision_s,
            seconds_prefill: g.timings.prefill_s,
            seconds_decode: g.timings.decode_s,
            gflops_vision: gf(measured.vision + measured.projector, g.timings.vision_s),
            gflops_prefill: gf(measured.lm_prefill, g.timings.prefill_s),
            gflops_decode: gf(measured.lm_decode, g.timings.decode_s),
            utilisation_prefill: gf(measured.lm_prefill, g.timings.prefill_s) / peak,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mismatches: Vec<&Row> = rows
        .iter()
        .filter(|r| (r.measured_over_exact - 1.0).abs() > 1e-3)
        .collect();
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        write_csv(&dir.join("flops.csv"), &rows)?;
        write_plots(dir, &rows)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "matmul_peak_gflops": peak, "vision_params": paper.vision_params,
                "vision_features": paper.vision_features, "lm_params": lm_params, "rows": rows,
            }))?
        );
    } else {
        println!("matmul peak (f32, 1024^3, best of 3): {peak:.1} GFLOP/s");
        println!(
            "theoretical = 2 T (x_M x_W + x_N V) with x_M = {:.4e}, x_W = {}, x_N = {:.4e}",
            paper.vision_params, paper.vision_features, lm_params
        );
        println!(
            "{:>3} {:>4} {:>6} {:>11} {:>11} {:>11} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>6}",
            "T",
            "V",
            "tokens",
            "theoretical",
            "exact",
            "measured",
            "meas/ex",
            "meas/th",
            "vis s",
            "pre s",
            "dec s",
            "GF/s pre",
            "util"
        );
        for r in &rows {
            println!(
                "{:>3} {:>4} {:>6} {:>11} {:>11} {:>11} {:>8.5} {:>8.4} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>5.1}%",
                r.frames,
                r.tokens_per_frame,
                r.prompt_tokens,
                format_si(r.theoretical_flops),
                format_si(r.exact_flops),
                format_si(r.measured_flops),
                r.measured_over_exact,
                r.measured_over_theoretical,
                r.seconds_vision,
                r.seconds_prefill,
                r.seconds_decode,
                r.gflops_prefill,
                100.0 * r.utilisation_prefill
            );
        }
        if let Some(dir) = &a.out {
            println!("wrote {}/flops.csv and measured_vs_theoretical.svg, components.svg, throughput.svg", dir.display());
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "{} configuration(s) measured more than 0.1% away from the exact analytic count: a counting bug",
            mismatches.len()
        );
    }
    Ok(())
}

fn write_csv(path: &std::path::Path, rows: &[Row]) -> Result<()> {
    let mut s = String::from(
        "model,frames,tokens_per_frame,prompt_tokens,generated_tokens,theoretical_flops,exact_flops,measured_flops,\
         measured_vision,measured_projector,measured_lm_prefill,measured_lm_decode,seconds_video_decode,seconds_vision,\
         seconds_prefill,seconds_decode,gflops_vision,gflops_prefill,gflops_decode,utilisation_prefill\n",
    );
    for r in rows {
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.model,
            r.frames,
            r.tokens_per_frame,
            r.prompt_tokens,
            r.generated_tokens,
            r.theoretical_flops,
            r.exact_flops,
            r.measured_flops,
            r.measured.vision,
            r.measured.projector,
            r.measured.lm_prefill,
            r.measured.lm_decode,
            r.seconds_video_decode,
            r.seconds_vision,
            r.seconds_prefill,
            r.seconds_decode,
            r.gflops_vision,
            r.gflops_prefill,
            r.gflops_decode,
            r.utilisation_prefill
        );
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

fn label(r: &Row) -> String {
    format!("T{} V{}", r.frames, r.tokens_per_frame)
}

fn write_plots(dir: &std::path::Path, rows: &[Row]) -> Result<()> {
    let scatter = Chart {
        title: "Measured vs theoretical FLOPs per request".into(),
        x_label: "theoretical FLOPs (paper formula)".into(),
        y_label: "measured FLOPs (engine counter)".into(),
        log_x: true,
        log_y: true,
        diagonal: true,
        series: vec![
            Series {
                name: "measured".into(),
                points: rows
                    .iter()
                    .map(|r| (r.theoretical_flops, r.measured_flops))
                    .collect(),
                style: Style::Scatter,
            },
            Series {
                name: "exact analytic".into(),
                points: rows
                    .iter()
                    .map(|r| (r.theoretical_flops, r.exact_flops))
                    .collect(),
                style: Style::Scatter,
            },
        ],
        ..Default::default()
    };
    std::fs::write(
        dir.join("measured_vs_theoretical.svg"),
        plot::render(&[scatter]),
    )?;
    let bars = Chart {
        title: "Measured FLOPs by component".into(),
        x_label: "configuration (frames T, tokens per frame V)".into(),
        y_label: "FLOPs".into(),
        bars: rows
            .iter()
            .map(|r| {
                (
                    label(r),
                    vec![
                        ("vision".to_string(), r.measured.vision),
                        ("projector".to_string(), r.measured.projector),
                        ("LM prefill".to_string(), r.measured.lm_prefill),
                        ("LM decode".to_string(), r.measured.lm_decode),
                    ],
                )
            })
            .collect(),
        ..Default::default()
    };
    std::fs::write(dir.join("components.svg"), plot::render(&[bars]))?;
    let thr = Chart {
        title: "Achieved throughput by stage".into(),
        x_label: "visual tokens in the prefill".into(),
        y_label: "GFLOP/s".into(),
        log_x: true,
        series: vec![
            Series {
                name: "vision + projector".into(),
                points: rows
                    .iter()
                    .map(|r| ((r.frames * r.tokens_per_frame) as f64, r.gflops_vision))
                    .collect(),
                style: Style::Scatter,
            },
            Series {
                name: "LM prefill".into(),
                points: rows
                    .iter()
                    .map(|r| ((r.frames * r.tokens_per_frame) as f64, r.gflops_prefill))
                    .collect(),
                style: Style::Scatter,
            },
            Series {
                name: "LM decode".into(),
                points: rows
                    .iter()
                    .map(|r| ((r.frames * r.tokens_per_frame) as f64, r.gflops_decode))
                    .collect(),
                style: Style::Scatter,
            },
        ],
        ..Default::default()
    };
    std::fs::write(dir.join("throughput.svg"), plot::render(&[thr]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_parse_and_fit_the_checkpoint() {
        assert_eq!(grid("isoflop", 729).unwrap().len(), 7);
        assert_eq!(grid("isoflop", 100).unwrap().len(), 4);
        assert_eq!(grid("star", 729).unwrap().len(), 11);
        assert_eq!(grid("2:4, 3:9", 729).unwrap(), vec![(2, 4), (3, 9)]);
        assert!(grid("2:5", 729).is_err());
        assert!(grid("0:4", 729).is_err());
        assert!(grid("x", 729).is_err());
        assert!(grid("2:729", 100).is_err());
    }
}
