//! `vvlm cost`, `vvlm fit`, `vvlm frontier`, `vvlm elasticity`.

use crate::plot::{self, Chart, Series, Style};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;
use vvlm_cost::{format_si, parse_si, ArchSpec, PaperCost, Workload};
use vvlm_scaling::frontier::log_space;
use vvlm_scaling::{
    cross_validate, elasticity, evaluate, fit, frontier, CandidateSet, Config, Dataset,
    ElasticityOptions, FitOptions, FittedModel, Form, Loss,
};

pub(crate) fn si(s: &str) -> Result<f64, String> {
    parse_si(s).ok_or_else(|| format!("`{s}` is not a number (accepted: 5e12, 5T, 2.5G, 7.5B)"))
}

/// Paper-formula constants shared by the commands that price configurations.
#[derive(Args, Debug, Clone)]
pub struct PaperCostArgs {
    /// Vision model parameters x_M in the paper's formula.
    #[arg(long, default_value = "0.43e9", value_parser = si)]
    pub vision_params: f64,
    /// Visual features per frame x_W in the paper's formula.
    #[arg(long, default_value = "768", value_parser = si)]
    pub vision_features: f64,
}

impl PaperCostArgs {
    pub fn cost(&self) -> PaperCost {
        PaperCost {
            vision_params: self.vision_params,
            vision_features: self.vision_features,
        }
    }
}

#[derive(Args, Debug)]
pub struct CostArgs {
    /// LM parameters x_N (e.g. 7.5e9 or 7.5B).
    #[arg(long, value_parser = si)]
    pub lm_params: f64,
    #[arg(long)]
    pub frames: u32,
    /// Visual tokens per frame x_V (a perfect square: 196, 49, 1, ...).
    #[arg(long)]
    pub tokens_per_frame: u32,
    /// A checkpoint directory (config.json) for the exact analytic count by component.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Prompt text tokens for the exact count.
    #[arg(long, default_value_t = 0)]
    pub text_tokens: usize,
    /// Generated tokens for the exact count (decode).
    #[arg(long, default_value_t = 0)]
    pub generated_tokens: usize,
    #[command(flatten)]
    pub paper: PaperCostArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn check_square(v: u32) -> Result<u32> {
    let s = (v as f64).sqrt().round() as u32;
    if v == 0 || s * s != v {
        bail!("tokens per frame must be a perfect square s*s (1, 4, 9, ..., 729), got {v}");
    }
    Ok(s)
}

pub fn cost(a: CostArgs) -> Result<()> {
    check_square(a.tokens_per_frame)?;
    let pc = a.paper.cost();
    let theo = pc.flops(a.lm_params, a.frames as f64, a.tokens_per_frame as f64);
    let (tv, tl) = pc.split(a.lm_params, a.frames as f64, a.tokens_per_frame as f64);
    let exact = match &a.checkpoint {
        Some(dir) => {
            let arch = ArchSpec::from_checkpoint_dir(dir)?;
            let w = Workload {
                frames: a.frames as usize,
                tokens_per_frame: a.tokens_per_frame as usize,
                text_tokens: a.text_tokens,
                decode_steps: a.generated_tokens.saturating_sub(1),
            };
            Some((arch.flops(&w), arch.prefill_len(&w)))
        }
        None => None,
    };
    if a.json {
        let mut v = json!({
            "lm_params": a.lm_params,
            "frames": a.frames,
            "tokens_per_frame": a.tokens_per_frame,
            "theoretical_flops": theo,
            "theoretical": {"vision": tv, "lm": tl, "vision_params": pc.vision_params, "vision_features": pc.vision_features},
        });
        if let Some((b, len)) = exact {
            v["exact_flops"] = json!(b.total());
            v["exact"] = json!({
                "vision": b.vision, "projector": b.projector, "lm_prefill": b.lm_prefill,
                "lm_decode": b.lm_decode, "prefill_tokens": len,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "theoretical (paper): {} FLOPs  (vision {}, LM {})",
            format_si(theo),
            format_si(tv),
            format_si(tl)
        );
        if let Some((b, len)) = exact {
            println!(
                "exact analytic ({len} prefill tokens): {} FLOPs",
                format_si(b.total())
            );
            println!("  vision     {}", format_si(b.vision));
            println!("  projector  {}", format_si(b.projector));
            println!("  lm prefill {}", format_si(b.lm_prefill));
            println!("  lm decode  {}", format_si(b.lm_decode));
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// Sweep CSV: columns lm_params_b, frames, tokens_per_frame, data_size_m (any subset), score.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "add-interact")]
    pub form: Form,
    #[arg(long, default_value_t = 500)]
    pub restarts: usize,
    /// Bootstrap resamples (0: one fit on all data).
    #[arg(long, default_value_t = 100)]
    pub bootstrap: usize,
    /// k-fold cross-validation (k >= 2).
    #[arg(long)]
    pub cv: Option<usize>,
    /// Evaluate the fitted model on another sweep (e.g. fit on star, evaluate on isoFLOP).
    #[arg(long)]
    pub holdout: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Huber loss threshold on log residuals (default: squared error, the paper's choice).
    #[arg(long)]
    pub huber: Option<f64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn progress_bar(total: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} runs (eta {eta})",
        )
        .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

pub fn fit_cmd(a: FitArgs) -> Result<()> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    let data = Dataset::from_path(&a.data)?;
    let opt = FitOptions {
        restarts: a.restarts,
        bootstrap: a.bootstrap,
        seed: a.seed,
        loss: match a.huber {
            Some(delta) => Loss::Huber { delta },
            None => Loss::Mse,
        },
        ..Default::default()
    };
    let runs = vvlm_scaling::fit::total_runs(&opt);
    let cv_runs = a.cv.map(|k| runs * k as u64).unwrap_or(0);
    let pb = progress_bar(runs + cv_runs, &format!("fitting {}", a.form), false);
    let tick = |n: u64| pb.inc(n);
    let started = std::time::Instant::now();
    let mut model = fit(a.form, &data, &opt, &tick)?;
    let fit_secs = started.elapsed().as_secs_f64();
    if let Some(k) = a.cv {
        model.metrics.cv = Some(cross_validate(a.form, &data, k, &opt, &tick)?);
    }
    pb.finish_and_clear();
    if let Some(h) = &a.holdout {
        let hd = Dataset::from_path(h)?;
        vvlm_scaling::validate::same_factors(&model, &hd)?;
        model.metrics.holdout = Some(evaluate(&model, &hd));
    }
    model.provenance = format!(
        "vvlm fit --data {} --form {} --restarts {} --bootstrap {} --seed {}",
        a.data.display(),
        a.form,
        a.restarts,
        a.bootstrap,
        a.seed
    );
    if let Some(out) = &a.out {
        model.save(out)?;
    }
    if a.json {
        let mut v = json!({
            "form": model.form,
            "factors": model.factors,
            "observations": data.len(),
            "seconds": fit_secs,
            "params": model.params,
        });
        for (k, m) in [
            ("train", model.metrics.train),
            ("cv", model.metrics.cv),
            ("holdout", model.metrics.holdout),
        ] {
            if let Some(m) = m {
                v[k] = json!(m);
            }
        }
        let t = model.metrics.train.expect("fit records train metrics");
        v["mse"] = json!(t.mse);
        v["e_pct"] = json!(t.e_pct);
        v["r2"] = json!(t.r2);
        for (name, val) in &model.params {
            v[name] = json!(val);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} fit on {} observations ({} restarts x {} bootstrap) in {:.1}s",
            model.form,
            data.len(),
            a.restarts,
            a.bootstrap.max(1),
            fit_secs
        );
        for (name, val) in &model.params {
            println!("  {name:<8} {val:>12.6}");
        }
        for (k, m) in [
            ("train", model.metrics.train),
            ("cv", model.metrics.cv),
            ("holdout", model.metrics.holdout),
        ] {
            if let Some(m) = m {
                println!(
                    "  {k:<8} MSE {:.4}  E% {:.3}  R2 {:.4}  (n={})",
                    m.mse, m.e_pct, m.r2, m.n
                );
            }
        }
        if let Some(out) = &a.out {
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

/// A candidate grid on the command line.
#[derive(Args, Debug, Clone)]
pub struct CandidateArgs {
    /// LM sizes in billions, comma separated.
    #[arg(long, default_value = "1,2.8,7.5", value_delimiter = ',')]
    pub lm_sizes: Vec<f64>,
    /// Largest frame count considered (1..=max).
    #[arg(long, default_value_t = 64)]
    pub max_frames: u32,
    /// Largest grid side s (tokens per frame s*s for s in 1..=max).
    #[arg(long, default_value_t = 27)]
    pub max_side: u32,
}

impl CandidateArgs {
    pub fn set(&self) -> CandidateSet {
        CandidateSet {
            lm_params_b: self.lm_sizes.clone(),
            frames: (1..=self.max_frames).collect(),
            tokens_per_frame: (1..=self.max_side).map(|s| s * s).collect(),
        }
    }
}

/// Parses `1e12..1e14` into (lo, hi).
pub fn parse_range(s: &str) -> Result<(f64, f64)> {
    let (a, b) = s.split_once("..").context("budgets look like 1e12..1e14")?;
    let (lo, hi) = (
        parse_si(a).with_context(|| format!("bad budget `{a}`"))?,
        parse_si(b).with_context(|| format!("bad budget `{b}`"))?,
    );
    if !(lo > 0.0 && hi >= lo) {
        bail!("budget range must satisfy 0 < lo <= hi, got {s}");
    }
    Ok((lo, hi))
}

#[derive(Args, Debug)]
pub struct FrontierArgs {
    #[arg(long, default_value = "configs/scaling/default.json")]
    pub model: PathBuf,
    /// Finetuning data size in millions of examples.
    #[arg(long, default_value_t = 2.0)]
    pub data_size: f64,
    #[arg(long, default_value = "1e12..1e14")]
    pub budgets: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[command(flatten)]
    pub candidates: CandidateArgs,
    #[command(flatten)]
    pub paper: PaperCostArgs,
    /// Write a chart of the frontier (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn paper_cost_fn(pc: PaperCost) -> impl Fn(&Config) -> f64 {
    move |c: &Config| pc.flops(c.lm_params_b * 1e9, c.frames, c.tokens_per_frame)
}

pub fn frontier_cmd(a: FrontierArgs) -> Result<()> {
    let model = FittedModel::load(&a.model)?;
    let (lo, hi) = parse_range(&a.budgets)?;
    let budgets = log_space(lo, hi, a.steps.max(1));
    let cost = paper_cost_fn(a.paper.cost());
    let pts = frontier(&model, &a.candidates.set(), &cost, a.data_size, &budgets);
    if let Some(p) = &a.plot {
        let feasible: Vec<_> = pts.iter().flatten().collect();
        let series = |name: &str, f: &dyn Fn(&Config) -> f64| Series {
            name: name.into(),
            points: feasible.iter().map(|p| (p.budget, f(&p.config))).collect(),
            style: Style::Step,
        };
        let chart = |title: &str, y: &str, s: Series, log_y: bool| Chart {
            title: title.into(),
            x_label: "inference budget (FLOPs)".into(),
            y_label: y.into(),
            log_x: true,
            log_y,
            series: vec![s],
            ..Default::default()
        };
        let charts = vec![
            chart(
                &format!("Compute-optimal frontier at n = {} M", a.data_size),
                "predicted score",
                Series {
                    name: "predicted score".into(),
                    points: feasible
                        .iter()
                        .map(|p| (p.budget, 100.0 - p.predicted_error))
                        .collect(),
                    style: Style::Scatter,
                },
                false,
            ),
            chart(
                "LM size x_N*",
                "LM params (B)",
                series("x_N (B)", &|c| c.lm_params_b),
                true,
            ),
            chart("Frames x_T*", "frames", series("x_T", &|c| c.frames), true),
            chart(
                "Tokens per frame x_V*",
                "tokens per frame",
                series("x_V", &|c| c.tokens_per_frame),
                true,
            ),
        ];
        std::fs::write(p, plot::render(&charts))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        let rows: Vec<_> = budgets
            .iter()
            .zip(&pts)
            .map(|(b, p)| match p {
                Some(p) => json!({
                    "budget": b, "lm_params_b": p.config.lm_params_b, "frames": p.config.frames,
                    "tokens_per_frame": p.config.tokens_per_frame, "cost": p.cost,
                    "predicted_error": p.predicted_error, "predicted_score": 100.0 - p.predicted_error,
                }),
                None => json!({"budget": b, "feasible": false}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"data_size_m": a.data_size, "frontier": rows}))?
        );
    } else {
        println!(
            "{:>12}  {:>6} {:>6} {:>6}  {:>12}  {:>7}",
            "budget", "N(B)", "T", "V", "cost", "score"
        );
        for (b, p) in budgets.iter().zip(&pts) {
            match p {
                Some(p) => println!(
                    "{:>12}  {:>6} {:>6} {:>6}  {:>12}  {:>7.2}",
                    format_si(*b),
                    p.config.lm_params_b,
                    p.config.frames,
                    p.config.tokens_per_frame,
                    format_si(p.cost),
                    100.0 - p.predicted_error
                ),
                None => println!("{:>12}  (no candidate fits)", format_si(*b)),
            }
        }
        if let Some(p) = &a.plot {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ElasticityArgs {
    #[arg(long, default_value = "configs/scaling/default.json")]
    pub model: PathBuf,
    #[arg(long, default_value = "1e12..1e14")]
    pub budgets: String,
    /// Number of budgets (log-spaced).
    #[arg(long, default_value_t = 300)]
    pub budget_steps: usize,
    /// Largest data size (millions); data sizes are evenly spaced from max/count to max.
    #[arg(long, default_value_t = 10.0)]
    pub max_data_size: f64,
    #[arg(long, default_value_t = 100)]
    pub data_steps: usize,
    /// Forward-difference step in millions of examples.
    #[arg(long, default_value_t = 5.0)]
    pub delta: f64,
    #[command(flatten)]
    pub candidates: CandidateArgs,
    #[command(flatten)]
    pub paper: PaperCostArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn elasticity_cmd(a: ElasticityArgs) -> Result<()> {
    let model = FittedModel::load(&a.model)?;
    let (lo, hi) = parse_range(&a.budgets)?;
    if a.data_steps == 0 || a.delta <= 0.0 {
        bail!("--data-steps must be positive and --delta > 0");
    }
    let opt = ElasticityOptions {
        budgets: log_space(lo, hi, a.budget_steps.max(1)),
        data_sizes_m: (1..=a.data_steps)
            .map(|i| a.max_data_size * i as f64 / a.data_steps as f64)
            .collect(),
        delta_m: a.delta,
    };
    let e = elasticity(
        &model,
        &a.candidates.set(),
        &paper_cost_fn(a.paper.cost()),
        &opt,
    );
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"e_N": e.e_n, "e_T": e.e_t, "e_V": e.e_v, "points": e.points})
            )?
        );
    } else {
        println!(
            "elasticity of the frontier w.r.t. data (avg over {} points): e_N = {:+.3}  e_T = {:+.3}  e_V = {:+.3}",
            e.points, e.e_n, e.e_t, e.e_v
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_squares() {
        assert_eq!(parse_range("1e12..1e14").unwrap(), (1e12, 1e14));
        assert_eq!(parse_range("2T..30T").unwrap(), (2e12, 30e12));
        assert!(parse_range("5..1").is_err());
        assert!(parse_range("5").is_err());
        assert_eq!(check_square(196).unwrap(), 14);
        assert!(check_square(200).is_err());
        assert!(check_square(0).is_err());
    }
}
