//! Engine hot paths at real shapes with random weights: SigLIP so400m/14 per frame, bilinear
//! pooling, Llama-3.2-1B-shaped prefill and decode, and SmolLM2 (GGUF) prefill and decode.
//! Reports throughput, the FLOPs the engine counted, and MFU against a given or measured peak.

use crate::{matmul_peak_gflops_on, Placement};
use anyhow::Result;
use candle_core::Tensor;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};

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
    pub placement: Placement,
    /// SmolLM2 decode from the GGUF file's quantized blocks (what the server does on the CPU);
    /// `--quantized-decode false` times the f32 matrices instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized_decode: bool,
    /// SmolLM2 prefill from the quantized blocks too (8-bit activations), no f32 copies of its
    /// matrices (the server's `quantized_prefill`, on by default there too; needs quantized
    /// decode); `--quantized-prefill false` prefills from the dequantized f32 matrices.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized_prefill: bool,
    /// SmolLM2's KV cache in f16 (the server's `kv_cache_dtype = "f16"`; CPU, f32 LM).
    #[arg(long)]
    pub kv_f16: bool,
    /// One more pass of the vision tower and of the Llama-1B prefill with per-section timing
    /// (`vvlm_engine::profile`: each section synchronises the device, so the profiled pass is
    /// slower than the timed one): ms in matrix products, attention, norms, RoPE, activations
    /// and the rest, as `vision_profile_ms` / `llama1b_prefill_profile_ms`.
    #[arg(long)]
    pub profile: bool,
    /// The device's dense peak at the run's dtype, in TFLOP/s (e.g. 989 for an H100 SXM in
    /// bf16): MFU is reported against it. Default: the measured matmul peak.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Skip measuring the matmul peak (needs --peak-tflops): a profiler counting the run's
    /// tensor-core operations (scripts/ncu-flops-check) must see the engine's work alone.
    #[arg(long, requires = "peak_tflops")]
    pub no_matmul_peak: bool,
    #[arg(long)]
    pub json: bool,
}

/// One prefill of `prefill` tokens after a 16-token warm-up, then `decode` greedy steps:
/// (prefill seconds, prefill FLOPs, decode seconds, decode FLOPs).
fn lm_prefill_decode(
    lm: &vvlm_engine::llama::Llama,
    prefill: usize,
    decode: usize,
) -> Result<(f64, f64, f64, f64)> {
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

/// One more run of `f` with `vvlm_engine::profile` on: ms per section, the rest of the pass as
/// `other`, the profiled pass's `total`, and each section's call count.
fn profiled(
    dev: &candle_core::Device,
    f: impl FnOnce() -> Result<()>,
) -> Result<serde_json::Value> {
    use vvlm_engine::profile;
    profile::reset();
    dev.synchronize()?;
    profile::set_enabled(true);
    let t = Instant::now();
    let r = f().and_then(|()| Ok(dev.synchronize()?));
    let total = t.elapsed().as_secs_f64() * 1e3;
    profile::set_enabled(false);
    r?;
    let mut out = serde_json::Map::new();
    let mut timed = 0.0;
    for (section, secs, calls) in profile::totals() {
        out.insert(section.name().into(), serde_json::json!(secs * 1e3));
        out.insert(
            format!("{}_calls", section.name()),
            serde_json::json!(calls),
        );
        timed += secs * 1e3;
    }
    out.insert("other".into(), serde_json::json!((total - timed).max(0.0)));
    out.insert("total".into(), serde_json::json!(total));
    Ok(serde_json::Value::Object(out))
}

/// An impossible figure fails the run: above the device's dense peak (given by
/// `--peak-tflops`), the clock did not wait for the work (as when a forward's kernels ran on
/// another thread's CUDA stream than the one synchronised: 8 frames of SigLIP "in" 5 ms, 103%
/// of an H200's peak).
fn over_peak(a: &EngineArgs, part: &str, gflops: f64, peak: f64) -> Result<()> {
    if a.peak_tflops.is_some() && gflops > peak {
        anyhow::bail!(
            "{part}: {gflops:.0} GFLOP/s is over the dense peak of {peak:.0}: the timing did not wait for the device's work"
        );
    }
    Ok(())
}

/// Runs the chosen parts; prints a line per part unless `a.json`; returns the figures.
pub fn run(a: &EngineArgs) -> Result<serde_json::Value> {
    let opts = a.placement.load_options()?;
    let (dev, dtype) = (opts.device.clone(), opts.dtype);
    let n = if dev.is_cpu() { 1024 } else { 8192 };
    let measured_peak = if a.no_matmul_peak {
        None
    } else {
        Some(matmul_peak_gflops_on(n, &dev, dtype)?)
    };
    let peak = match (a.peak_tflops, measured_peak) {
        (Some(t), _) => t * 1e3,
        (None, Some(m)) => m,
        (None, None) => anyhow::bail!("--no-matmul-peak needs --peak-tflops"),
    };
    let mut out = serde_json::json!({
        "device": a.placement.device, "dtype": format!("{dtype:?}"),
        "cuda_kernels": format!("{:?}", a.placement.kernels).to_lowercase(),
        "matmul_peak_gflops": measured_peak, "mfu_reference_gflops": peak,
        "cpu_decode_kernels": format!("{:?}", vvlm_engine::qdot::Isa::best()),
    });
    let want = |p: &str| a.parts.iter().any(|x| x == p);
    if !a.json {
        let measured = measured_peak.map_or("not measured".into(), |m| format!("{m:.1} GFLOP/s"));
        println!(
            "{} {dtype:?}: matmul {n}^3 best of 3: {measured}; MFU against {peak:.1} GFLOP/s",
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
        let want = vvlm_cost::VisionSpec::so400m().frame_flops();
        out["vision_frame_flops"] = serde_json::json!(frame_flops);
        out["vision_frame_flops_analytic"] = serde_json::json!(want);
        out["vision_flops_match_analytic"] = serde_json::json!(frame_flops == want);
        times.sort_by(f64::total_cmp);
        let s = times[times.len() / 2];
        let gf = frame_flops / s / 1e9;
        over_peak(a, "vision", gf, peak)?;
        if !a.json {
            println!(
                "SigLIP so400m/14 @384 (26 layers): {s:.3} s/frame (median of {}), {gf:.1} GFLOP/s ({:.0}% of peak)",
                times.len(),
                100.0 * gf / peak
            );
        }
        if a.profile {
            let p = profiled(&dev, || {
                let px =
                    Tensor::randn(0f32, 1.0, (frame_batch, 3, 384, 384), &dev)?.to_dtype(dtype)?;
                vvlm_engine::cpu_pool::run(|| tower.forward(&px, &mut ctx))?;
                Ok(())
            })?;
            if !a.json {
                println!("  profiled ({frame_batch} frame(s)), ms: {p}");
            }
            out["vision_profile_ms"] = p;
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
        over_peak(a, "llama1b prefill", pf / ps / 1e9, peak)?;
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
        if a.profile {
            let ids: Vec<u32> = (0..a.prefill as u32)
                .map(|i| 100 + (i * 7) % 1000)
                .collect();
            let p = profiled(&dev, || {
                vvlm_engine::cpu_pool::run(|| -> Result<()> {
                    let c = FlopCounter::new();
                    let mut ctx = vvlm_engine::Ctx::new(&c, Component::LmPrefill);
                    let mut cache = lm.new_cache();
                    let h = lm.forward_hidden(&lm.embed(&ids)?, &mut cache, &mut ctx)?;
                    lm.last_logits(&h, &ctx)?;
                    Ok(())
                })
            })?;
            if !a.json {
                println!("  profiled prefill, ms: {p}");
            }
            out["llama1b_prefill_profile_ms"] = p;
        }
        out["llama1b_prefill_tok_s"] = serde_json::json!(a.prefill as f64 / ps);
        out["llama1b_prefill_gflops"] = serde_json::json!(pf / ps / 1e9);
        out["llama1b_prefill_mfu"] = serde_json::json!(pf / ps / 1e9 / peak);
        out["llama1b_prefill_flops"] = serde_json::json!(pf);
        out["llama1b_decode_flops"] = serde_json::json!(df);
        // What the analytic model (checked against the CPU engine by the parity tests) says
        // this device should have counted.
        let spec = cfg.lm_spec();
        let want_pf = spec.prefill_flops(a.prefill);
        let want_df: f64 = (0..a.decode)
            .map(|i| spec.decode_step_flops(a.prefill + i + 1))
            .sum();
        out["llama1b_prefill_flops_analytic"] = serde_json::json!(want_pf);
        out["llama1b_decode_flops_analytic"] = serde_json::json!(want_df);
        out["llama1b_flops_match_analytic"] = serde_json::json!(pf == want_pf && df == want_df);
        out["llama1b_decode_tok_s"] = serde_json::json!(a.decode as f64 / ds);
        out["llama1b_decode_gflops"] = serde_json::json!(df / ds / 1e9);
    }
    if want("smollm2") && a.gguf.exists() {
        let quantized = a.quantized_decode && dev.is_cpu() && dtype == candle_core::DType::F32;
        let quantized_prefill = quantized && a.quantized_prefill;
        // As the server loads it: served from the blocks alone, nothing is dequantized.
        let g = if quantized_prefill {
            vvlm_engine::gguf::load_quantized(&a.gguf, dtype, &dev)?
        } else {
            vvlm_engine::gguf::load(&a.gguf, dtype, &dev)?
        };
        let vb = candle_nn::VarBuilder::from_tensors(g.tensors, dtype, &dev);
        let lm = if quantized_prefill {
            vvlm_engine::llama::Llama::load_quantized(vb, None, &g.config, &g.quantized)?
        } else {
            let mut lm = vvlm_engine::llama::Llama::load(vb, None, &g.config)?;
            if quantized {
                lm.attach_quantized(&g.quantized)?;
            }
            lm
        };
        let mut lm = lm;
        if a.kv_f16 {
            lm.set_kv_cache_dtype(candle_core::DType::F16)?;
        }
        drop(g.quantized);
        vvlm_engine::release_free_memory();
        let (rss, load_peak) = (resident_mib(), peak_resident_mib());
        let (ps, pf, ds, _) =
            vvlm_engine::cpu_pool::run(|| lm_prefill_decode(&lm, a.prefill, a.decode.max(32)))?;
        let steps = a.decode.max(32);
        if !a.json {
            println!(
                "SmolLM2-135M (GGUF Q4_1; prefill {}, decode {}, KV cache {}): prefill {} tokens {:.1} tok/s ({:.1} GFLOP/s); decode {:.1} tok/s; resident after load {} (peak so far {})",
                if quantized_prefill { "Q4_1/Q8_0 blocks" } else { "f32" },
                if quantized { "Q4_1/Q8_0 blocks" } else { "f32" },
                if a.kv_f16 { "f16" } else { "f32" },
                a.prefill,
                a.prefill as f64 / ps,
                pf / ps / 1e9,
                steps as f64 / ds,
                rss.map_or("unknown".to_string(), |m| format!("{m:.0} MiB")),
                load_peak.map_or("unknown".to_string(), |m| format!("{m:.0} MiB"))
            );
        }
        out["smollm2_prefill_tok_s"] = serde_json::json!(a.prefill as f64 / ps);
        out["smollm2_decode_tok_s"] = serde_json::json!(steps as f64 / ds);
        out["smollm2_decode_quantized"] = serde_json::json!(quantized);
        out["smollm2_prefill_quantized"] = serde_json::json!(quantized_prefill);
        out["smollm2_kv_f16"] = serde_json::json!(a.kv_f16);
        out["smollm2_resident_mib"] = serde_json::json!(rss);
        out["smollm2_load_peak_mib"] = serde_json::json!(load_peak);
    }
    Ok(out)
}

/// This process's resident memory (Linux `VmRSS`), MiB; `None` elsewhere.
fn resident_mib() -> Option<f64> {
    proc_status_mib("VmRSS:")
}

/// This process's peak resident memory so far (Linux `VmHWM`), MiB; `None` elsewhere.
fn peak_resident_mib() -> Option<f64> {
    proc_status_mib("VmHWM:")
}

fn proc_status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn args(flags: &[&str]) -> Result<EngineArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("bench").chain(flags.iter().copied())).map(|c| c.engine)
    }

    #[test]
    fn the_matmul_peak_is_skipped_only_against_a_given_peak() {
        let e = args(&["--no-matmul-peak"]).err().unwrap().to_string();
        assert!(e.contains("--peak-tflops"), "{e}");
        let a = args(&[
            "--no-matmul-peak",
            "--peak-tflops",
            "1",
            "--parts",
            "pool",
            "--json",
        ])
        .unwrap();
        let out = run(&a).unwrap();
        assert!(out["matmul_peak_gflops"].is_null(), "{out}");
        assert_eq!(out["mfu_reference_gflops"], 1000.0);
        assert!(
            out["pool_32x729x2048_to_14_ms"].as_f64().unwrap() > 0.0,
            "{out}"
        );
    }

    #[test]
    fn a_figure_over_the_given_peak_fails_the_run() {
        let given = args(&["--peak-tflops", "1"]).unwrap();
        let e = over_peak(&given, "vision", 1000.5, 1000.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision") && e.contains("did not wait"), "{e}");
        assert!(over_peak(&given, "vision", 999.0, 1000.0).is_ok());
        // Against the measured peak (no datasheet figure) a faster part is possible.
        let measured = args(&[]).unwrap();
        assert!(over_peak(&measured, "vision", 1000.5, 1000.0).is_ok());
    }

    #[test]
    fn a_profiled_pass_reports_every_section_and_the_rest() {
        let dev = candle_core::Device::Cpu;
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                (
                    "weight".to_string(),
                    Tensor::ones(64, candle_core::DType::F32, &dev).unwrap(),
                ),
                (
                    "bias".to_string(),
                    Tensor::zeros(64, candle_core::DType::F32, &dev).unwrap(),
                ),
            ]
            .into_iter()
            .collect(),
            candle_core::DType::F32,
            &dev,
        );
        let norm = vvlm_engine::nn::LayerNorm::load(vb, 64, 1e-6).unwrap();
        let x = Tensor::randn(0f32, 1.0, (256, 64), &dev).unwrap();
        let p = profiled(&dev, || {
            for _ in 0..3 {
                norm.forward(&x)?;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        for s in vvlm_engine::profile::Section::ALL {
            assert!(p[s.name()].as_f64().unwrap() >= 0.0, "{p}");
        }
        // Other tests' passes may run while timing is on: lower bounds.
        assert!(p["norm_calls"].as_u64().unwrap() >= 3, "{p}");
        let total = p["total"].as_f64().unwrap();
        assert!(total >= 5.0 && p["other"].as_f64().unwrap() >= 0.0, "{p}");
        assert!(p["norm"].as_f64().unwrap() <= total, "{p}");
        // A failing pass is an error, and timing is off again afterwards.
        assert!(profiled(&dev, || anyhow::bail!("boom")).is_err());
        vvlm_engine::profile::reset();
        norm.forward(&x).unwrap();
        let norm_calls = vvlm_engine::profile::totals()
            .into_iter()
            .find(|t| t.0 == vvlm_engine::profile::Section::Norm)
            .unwrap()
            .2;
        assert_eq!(norm_calls, 0);
    }
}
