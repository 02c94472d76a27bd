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
    Engine(vvlm_engine_bench::engine::EngineArgs),
    /// Admissions per second through the ledger (reserve + settle), SQLite or PostgreSQL, from
    /// one or more replicas.
    Ledger(crate::bench_ledger::LedgerBenchArgs),
    /// Batched decode as llama.cpp's `llama-batched-bench` measures it: for each batch size B,
    /// B sequences of `npp` prompt tokens prefilled, then `ntg` tokens decoded for all of them
    /// (greedy, EOS ignored), batched (one forward per step) and one sequence at a time.
    Batch(vvlm_engine_bench::batch::BatchArgs),
}

#[derive(Args, Debug)]
pub struct FlopsArgs {
    #[arg(long, default_value = "models/cache/demo-smollm2")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub placement: vvlm_engine_bench::Placement,
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
    vvlm_engine_bench::matmul_peak_gflops_on(n, &Device::Cpu, candle_core::DType::F32)
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Flops(a) => flops(a),
        BenchCmd::Engine(a) => {
            let out = vvlm_engine_bench::engine::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(())
        }
        BenchCmd::Ledger(a) => crate::bench_ledger::run(a),
        BenchCmd::Batch(a) => {
            let rows = vvlm_engine_bench::batch::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            Ok(())
        }
    }
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
                history: &[],
                form: &vvlm_engine::PromptForm::Chat,
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
