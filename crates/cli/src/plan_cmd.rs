//! `vvlm plan`: the planner alone.

use anyhow::{Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use vvlm_cost::{format_si, parse_si};
use vvlm_planner::{CostMode, Pins, PlanRequest, Planner, Registry};
use vvlm_scaling::FittedModel;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// FLOPs budget (5e12 or 5T).
    #[arg(long)]
    pub budget: String,
    #[arg(long, default_value = "caption")]
    pub task: String,
    /// Folder of model registry entries (*.toml).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Scaling model used for the tasks caption and qa.
    #[arg(long, default_value = "configs/scaling/suite/pooled.json")]
    pub scaling: PathBuf,
    /// Extra task models: NAME=PATH (repeatable).
    #[arg(long = "task-model")]
    pub task_models: Vec<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub frames: Option<u32>,
    #[arg(long)]
    pub tokens_per_frame: Option<u32>,
    /// Finetuning data size (millions) the checkpoints were trained with (default: the
    /// registry entries' `data_size_m` when they all state the same, else 2.0).
    #[arg(long)]
    pub data_size: Option<f64>,
    /// How configurations are priced (exact needs each checkpoint's config.json).
    #[arg(long, value_enum, default_value = "exact")]
    pub cost_mode: crate::eval_plan::CostModeArg,
    /// Prompt text tokens (exact cost mode).
    #[arg(long, default_value_t = 20)]
    pub text_tokens: usize,
    /// Generated tokens to price (exact cost mode).
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn load_tasks(
    scaling: &std::path::Path,
    extra: &[String],
) -> Result<BTreeMap<String, Arc<FittedModel>>> {
    let default = Arc::new(FittedModel::load(scaling)?);
    let mut tasks = BTreeMap::new();
    tasks.insert("caption".to_string(), default.clone());
    tasks.insert("qa".to_string(), default);
    for t in extra {
        let (name, path) = t.split_once('=').context("--task-model takes NAME=PATH")?;
        tasks.insert(
            name.to_string(),
            Arc::new(FittedModel::load(path.as_ref())?),
        );
    }
    Ok(tasks)
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let budget = parse_si(&a.budget)
        .with_context(|| format!("bad budget `{}` (use 5e12 or 5T)", a.budget))?;
    let registry = Registry::load_dir(&a.models)?;
    let stated: Vec<Option<f64>> = registry.models.iter().map(|e| e.data_size_m).collect();
    let common = match stated.first() {
        Some(Some(d)) if stated.iter().all(|s| *s == Some(*d)) => Some(*d),
        _ => None,
    };
    let archs: Vec<(String, vvlm_cost::ArchSpec)> = match a.cost_mode {
        crate::eval_plan::CostModeArg::Theoretical => vec![],
        crate::eval_plan::CostModeArg::Exact => registry
            .models
            .iter()
            .map(|e| {
                vvlm_cost::ArchSpec::from_checkpoint_dir(&e.path)
                    .map(|arch| (e.name.clone(), arch))
                    .with_context(|| {
                        format!(
                            "{}: exact pricing reads {}/config.json (or use --cost-mode theoretical)",
                            e.name,
                            e.path.display()
                        )
                    })
            })
            .collect::<Result<_>>()?,
    };
    let mut planner = Planner::new(registry, load_tasks(&a.scaling, &a.task_models)?)?;
    planner.data_size_m = a.data_size.or(common).unwrap_or(2.0);
    planner.cost_mode = match a.cost_mode {
        crate::eval_plan::CostModeArg::Theoretical => CostMode::Theoretical,
        crate::eval_plan::CostModeArg::Exact => CostMode::Exact,
    };
    for (name, arch) in archs {
        planner.set_arch(&name, arch);
    }
    let req = PlanRequest {
        budget_flops: budget,
        task: a.task.clone(),
        text_tokens: a.text_tokens,
        expected_decode_tokens: a.decode_tokens,
        pins: Pins {
            model: a.model.clone(),
            frames: a.frames,
            tokens_per_frame: a.tokens_per_frame,
        },
        ..Default::default()
    };
    // Time the planner itself (median of repeated runs).
    let mut times = vec![];
    let mut plan = None;
    for _ in 0..21 {
        let t = std::time::Instant::now();
        plan = Some(planner.plan(&req)?);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let plan = plan.expect("planned");
    if a.json {
        let mut v = serde_json::to_value(&plan)?;
        v["planning_us"] = serde_json::json!(times[10]);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let c = &plan.choice;
        println!(
            "plan for {} at {} FLOPs ({} cost): {} frames x {} tokens/frame on {} -> predicted score {:.2}, cost {}",
            plan.task,
            format_si(budget),
            match plan.cost_mode {
                CostMode::Theoretical => "theoretical",
                CostMode::Exact => "exact",
            },
            c.frames,
            c.tokens_per_frame,
            c.model,
            c.predicted_score,
            format_si(c.cost_flops)
        );
        println!("runners-up:");
        for r in &plan.runners_up {
            println!(
                "  {:<28} T={:<3} V={:<4} score {:.2}  cost {}",
                r.model,
                r.frames,
                r.tokens_per_frame,
                r.predicted_score,
                format_si(r.cost_flops)
            );
        }
        println!(
            "{} candidates considered in {:.1} us (median of 21)",
            plan.considered, times[10]
        );
    }
    Ok(())
}
