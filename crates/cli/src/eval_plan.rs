//! `vvlm eval --plan --budget B,...`: the check that matters. At each budget the planner chooses
//! a configuration per item, as the server would for that request (the item's prompt tokens,
//! its expected answer length, its family as the task when a per-family scaling model is
//! given), and the choice is evaluated through the same cache as the grid. Beside it, from the
//! grid already measured: the oracle (the best grid configuration measured at cost <= budget,
//! per family and pooled) and the naive policies. Writes `plan.csv`, `check.md`, `check.svg` (the grid's measured accuracy with the
//! fitted frontier over it, then every policy's accuracy against the budget).

use crate::eval_cmd::{aggregate, EvalArgs};
use crate::plot::{self, Chart, Series, Style};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use vvlm_cost::format_si;
use vvlm_engine::{LoadOptions, VideoVlm};
use vvlm_eval::policy::{oracle, Choice, NaivePolicy};
use vvlm_eval::{Cache, GridPoint, ItemResult, MAX_ANSWER_TOKENS};
use vvlm_planner::{CostMode, ModelEntry, PlanError, PlanRequest, Planner, Registry};
use vvlm_scaling::FittedModel;
use vvlm_suite::Item;

/// How the planner and the baselines price a configuration.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum CostModeArg {
    /// The paper's `2 x_T (x_M x_W + x_N x_V)` with its SoViT constants.
    Theoretical,
    /// The checkpoint's exact analytic FLOPs with the item's prompt and expected answer.
    Exact,
}

const POOLED: &str = "pooled";

/// One row of `plan.csv`: a policy at a budget over one family (or `all`).
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRow {
    pub budget: f64,
    pub policy: String,
    pub family: String,
    pub items: usize,
    /// Items the policy had no configuration for (scored 0).
    pub refused: usize,
    pub score: f64,
    pub ci95: f64,
    /// Mean priced cost of the chosen configurations.
    pub cost_flops: f64,
    pub measured_flops: f64,
    /// The most frequent configuration and its share of the items.
    pub config: String,
    pub config_share: f64,
}

struct Loaded {
    entry: ModelEntry,
    vlm: VideoVlm,
    grid: Vec<GridPoint>,
    cache: Cache,
}

/// What a request for this item asks the planner: prompt tokens and the answer length a client
/// would allow (the longest choice plus an end token; open answers the eval's generation cap).
fn request_shape(vlm: &VideoVlm, it: &Item) -> Result<(usize, usize)> {
    let text = vlm.count_prompt_tokens(None, &[], &it.question)?;
    let decode = if it.choices.is_empty() {
        MAX_ANSWER_TOKENS
    } else {
        let mut longest = 0;
        for c in &it.choices {
            longest = longest.max(vlm.tokenize(c)?.len());
        }
        longest + 1
    };
    Ok((text, decode))
}

pub fn run(
    a: &EvalArgs,
    items: &[Item],
    items_dir: &Path,
    entries: &[&ModelEntry],
    grid_for: &dyn Fn(&ModelEntry, &VideoVlm) -> Result<Vec<GridPoint>>,
    data_size_for: &dyn Fn(&ModelEntry) -> Result<f64>,
) -> Result<Vec<PolicyRow>> {
    if a.budget.is_empty() {
        bail!("--plan needs --budget B[,B...]");
    }
    let mut models: BTreeMap<String, Loaded> = BTreeMap::new();
    for e in entries {
        let vlm = VideoVlm::load(&e.path, &LoadOptions::default())
            .with_context(|| format!("loading {}", e.name))?;
        let grid = grid_for(e, &vlm)?;
        let cache = Cache::new(&a.out.join("cache").join(&e.name))?;
        models.insert(
            e.name.clone(),
            Loaded {
                entry: (*e).clone(),
                vlm,
                grid,
                cache,
            },
        );
    }
    // The planner: the pooled model for every task, plus one per family when given.
    let pooled = Arc::new(FittedModel::load(&a.scaling)?);
    let mut tasks = BTreeMap::new();
    tasks.insert(POOLED.to_string(), pooled);
    let families: BTreeSet<String> = items.iter().map(family).collect();
    if let Some(dir) = &a.family_models {
        for f in &families {
            let p = dir.join(format!("{f}.json"));
            if p.exists() {
                tasks.insert(f.clone(), Arc::new(FittedModel::load(&p)?));
            } else {
                tracing::warn!("{}: no scaling model; its items use --scaling", p.display());
            }
        }
    }
    let registry = Registry {
        models: entries.iter().map(|e| (*e).clone()).collect(),
    };
    let mut planner = Planner::new(registry, tasks)?;
    planner.cost_mode = match a.cost_mode {
        CostModeArg::Theoretical => CostMode::Theoretical,
        CostModeArg::Exact => CostMode::Exact,
    };
    let sizes: Vec<f64> = entries
        .iter()
        .map(|e| data_size_for(e))
        .collect::<Result<_>>()?;
    planner.data_size_m = sizes.iter().copied().fold(f64::NAN, f64::max);
    if sizes.iter().any(|s| *s != planner.data_size_m) {
        tracing::warn!(
            "the checkpoints differ in data size; planning at n = {} M",
            planner.data_size_m
        );
    }
    for (name, m) in &models {
        planner.set_arch(name, m.vlm.arch());
        if let Some(n) = m.vlm.cfg.text_config.max_position_embeddings {
            planner.set_context(name, n);
        }
    }
    let first = models.values().next().expect("entries is not empty");
    let requests: Vec<(usize, usize)> = items
        .iter()
        .map(|it| request_shape(&first.vlm, it))
        .collect::<Result<_>>()?;
    let req = |i: usize, budget: f64, task: &str| PlanRequest {
        budget_flops: budget,
        task: task.to_string(),
        text_tokens: requests[i].0,
        expected_decode_tokens: requests[i].1,
        ..Default::default()
    };

    // The grid's configurations and their price for each item.
    let grid: Vec<Choice> = models
        .values()
        .flat_map(|m| {
            m.grid.iter().map(|p| Choice {
                model: m.entry.name.clone(),
                lm_params: m.entry.lm_params,
                point: *p,
            })
        })
        .collect();
    let price = |c: &Choice, i: usize| {
        let m = &models[&c.model];
        planner.cost(
            &m.entry,
            c.point.frames as u32,
            c.point.tokens_per_frame() as u32,
            &req(i, 1.0, POOLED),
        )
    };
    let grid_cost: Vec<Vec<f64>> = grid
        .iter()
        .map(|c| (0..items.len()).map(|i| price(c, i)).collect())
        .collect();

    // Every policy's choice per item at every budget.
    type Assignment = Vec<Option<(Choice, f64)>>;
    let mut plans: Vec<(f64, String, Assignment)> = vec![];
    let mut variants = vec![("plan-pooled", false)];
    if a.family_models.is_some() {
        variants.insert(0, ("plan-family", true));
    }
    for &budget in &a.budget {
        for (name, per_family) in &variants {
            let mut asg = vec![];
            for (i, it) in items.iter().enumerate() {
                let f = family(it);
                let task = if *per_family && planner.tasks().any(|t| t == f) {
                    f.as_str()
                } else {
                    POOLED
                };
                match planner.plan(&req(i, budget, task)) {
                    Ok(p) => asg.push(Some((
                        Choice {
                            model: p.choice.model.clone(),
                            lm_params: p.choice.lm_params,
                            point: GridPoint {
                                frames: p.choice.frames as usize,
                                side: p.choice.side as usize,
                            },
                        },
                        p.choice.cost_flops,
                    ))),
                    Err(PlanError::BudgetTooSmall { .. }) => asg.push(None),
                    Err(e) => return Err(e.into()),
                }
            }
            plans.push((budget, name.to_string(), asg));
        }
        for policy in NaivePolicy::ALL {
            let asg = (0..items.len())
                .map(|i| {
                    let fitting = grid
                        .iter()
                        .enumerate()
                        .filter(|(g, _)| grid_cost[*g][i] <= budget)
                        .map(|(_, c)| c);
                    policy.pick(fitting).map(|c| {
                        let g = grid.iter().position(|x| x == c).expect("from the grid");
                        (c.clone(), grid_cost[g][i])
                    })
                })
                .collect();
            plans.push((budget, policy.name().to_string(), asg));
        }
    }

    // Evaluate the planned configurations the grid does not hold (cached like the grid).
    let mut needed: BTreeMap<(String, GridPoint), BTreeSet<usize>> = BTreeMap::new();
    for (_, _, asg) in &plans {
        for (i, c) in asg.iter().enumerate() {
            if let Some((c, _)) = c {
                needed
                    .entry((c.model.clone(), c.point))
                    .or_default()
                    .insert(i);
            }
        }
    }
    let policy_media = vvlm_video::MediaPolicy::default();
    let bar = crate::eval_cmd::progress(a.quiet, "planned configurations", needed.len());
    for ((model, point), idx) in &needed {
        let m = &models[model];
        let subset: Vec<Item> = idx.iter().map(|&i| items[i].clone()).collect();
        vvlm_eval::sweep_checkpoint(
            &m.vlm,
            &subset,
            items_dir,
            &[*point],
            &m.cache,
            &policy_media,
            &mut |_, _| {},
        )?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut results: HashMap<(String, GridPoint), HashMap<String, ItemResult>> = HashMap::new();
    let mut lookup = |c: &Choice, id: &str| -> Option<ItemResult> {
        results
            .entry((c.model.clone(), c.point))
            .or_insert_with(|| {
                models[&c.model]
                    .cache
                    .load(c.point)
                    .into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect()
            })
            .get(id)
            .cloned()
    };

    // The oracles: the best measured grid configuration that fits every item of the group.
    let groups: Vec<(String, Vec<usize>)> = {
        let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            by.entry(family(it)).or_default().push(i);
        }
        by.into_iter().collect()
    };
    for &budget in &a.budget {
        for (name, per_family) in [("oracle-family", true), ("oracle-pooled", false)] {
            let mut asg: Assignment = vec![None; items.len()];
            let all: Vec<usize> = (0..items.len()).collect();
            let sets: Vec<&[usize]> = if per_family {
                groups.iter().map(|(_, v)| v.as_slice()).collect()
            } else {
                vec![&all]
            };
            for set in sets {
                let fits = |g: usize| set.iter().all(|&i| grid_cost[g][i] <= budget);
                let fitting: Vec<&Choice> = (0..grid.len())
                    .filter(|&g| fits(g))
                    .map(|g| &grid[g])
                    .collect();
                let mut score = HashMap::new();
                for c in &fitting {
                    let rs: Option<Vec<f64>> = set
                        .iter()
                        .map(|&i| lookup(c, &items[i].id).map(|r| r.score))
                        .collect();
                    if let Some(rs) = rs {
                        score.insert(c.label(), rs.iter().sum::<f64>() / rs.len() as f64);
                    }
                }
                let mean_cost = |c: &Choice| {
                    let g = grid.iter().position(|x| x == c).expect("from the grid");
                    set.iter().map(|&i| grid_cost[g][i]).sum::<f64>()
                };
                if let Some((best, _)) = oracle(
                    fitting.iter().copied(),
                    |c| score.get(&c.label()).copied(),
                    mean_cost,
                ) {
                    let g = grid.iter().position(|x| x == best).expect("from the grid");
                    for &i in set {
                        asg[i] = Some((best.clone(), grid_cost[g][i]));
                    }
                }
            }
            plans.push((budget, name.to_string(), asg));
        }
    }

    // The chart: every grid configuration's measured accuracy against its mean priced cost, per
    // model, with the pooled law's frontier (predicted score of the plan for a typical request)
    // over it.
    let mut measured: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for (g, c) in grid.iter().enumerate() {
        let rs: Option<Vec<f64>> = items
            .iter()
            .map(|it| lookup(c, &it.id).map(|r| r.score))
            .collect();
        let cost = grid_cost[g].iter().sum::<f64>() / items.len() as f64;
        lo = lo.min(cost);
        hi = hi.max(cost);
        if let Some(rs) = rs {
            let score = 100.0 * rs.iter().sum::<f64>() / rs.len() as f64;
            measured
                .entry(c.model.clone())
                .or_default()
                .push((cost, score));
        }
    }
    let typical = (0..items.len())
        .min_by_key(|&i| {
            let mean = requests.iter().map(|r| r.0 + r.1).sum::<usize>() / items.len();
            (requests[i].0 + requests[i].1).abs_diff(mean)
        })
        .unwrap_or(0);
    let frontier: Vec<(f64, f64)> = vvlm_scaling::frontier::log_space(lo, hi * 1.5, 60)
        .into_iter()
        .filter_map(|b| {
            planner
                .plan(&req(typical, b, POOLED))
                .ok()
                .map(|p| (b, p.choice.predicted_score))
        })
        .collect();

    // Aggregate per budget, policy and family.
    let mut rows = vec![];
    for (budget, policy, asg) in &plans {
        let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            by.entry(family(it)).or_default().push(i);
            by.entry("all".into()).or_default().push(i);
        }
        for (fam, idx) in by {
            let mut scored = vec![];
            let mut refused = 0;
            let mut cost = 0.0;
            let mut configs: BTreeMap<String, usize> = BTreeMap::new();
            for &i in &idx {
                match &asg[i] {
                    Some((c, priced)) => {
                        let r = lookup(c, &items[i].id).with_context(|| {
                            format!("{} has no result at {}", items[i].id, c.label())
                        })?;
                        cost += priced;
                        *configs.entry(c.label()).or_default() += 1;
                        scored.push(r);
                    }
                    None => {
                        refused += 1;
                        scored.push(ItemResult {
                            id: items[i].id.clone(),
                            family: fam.clone(),
                            score: 0.0,
                            predicted: String::new(),
                            measured_flops: 0.0,
                            vision_s: 0.0,
                            lm_s: 0.0,
                        });
                    }
                }
            }
            let (n, score, ci95, measured, _, _) = aggregate(&scored).expect("non-empty group");
            let (config, count) = configs
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(c, n)| (c.clone(), *n))
                .unwrap_or_else(|| ("-".into(), 0));
            let answered = (n - refused).max(1) as f64;
            rows.push(PolicyRow {
                budget: *budget,
                policy: policy.clone(),
                family: fam,
                items: n,
                refused,
                score,
                ci95,
                cost_flops: cost / answered,
                measured_flops: measured * n as f64 / answered,
                config,
                config_share: count as f64 / n as f64,
            });
        }
    }
    let rank = |p: &str| ORDER.iter().position(|o| *o == p).unwrap_or(ORDER.len());
    rows.sort_by(|x, y| {
        x.budget
            .total_cmp(&y.budget)
            .then(rank(&x.policy).cmp(&rank(&y.policy)))
            .then((x.family != "all").cmp(&(y.family != "all")))
            .then(x.family.cmp(&y.family))
    });
    let mut series: Vec<Series> = measured
        .into_iter()
        .map(|(name, points)| Series {
            name: format!("{name} (measured)"),
            points,
            style: Style::Scatter,
        })
        .collect();
    series.push(Series {
        name: "fitted frontier (pooled law, predicted)".into(),
        points: frontier,
        style: Style::Step,
    });
    let frontier_chart = Chart {
        title: "Measured accuracy of every grid configuration, and the fitted frontier".into(),
        x_label: "FLOPs per request (priced as the planner prices it)".into(),
        y_label: "score (0-100)".into(),
        log_x: true,
        series,
        ..Default::default()
    };
    write_outputs(&a.out, &rows, &a.budget, frontier_chart)?;
    Ok(rows)
}

fn family(it: &Item) -> String {
    it.family.clone().unwrap_or_else(|| "all".into())
}

const ORDER: [&str; 8] = [
    "plan-family",
    "plan-pooled",
    "oracle-family",
    "oracle-pooled",
    "most-frames",
    "most-tokens",
    "biggest-model",
    "fixed-default",
];

fn write_outputs(out: &Path, rows: &[PolicyRow], budgets: &[f64], frontier: Chart) -> Result<()> {
    std::fs::create_dir_all(out)?;
    crate::eval_cmd::write_csv(&out.join("plan.csv"), rows)?;
    std::fs::write(out.join("check.md"), check_markdown(rows, budgets))?;
    let mut series: BTreeMap<usize, Series> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.family == "all" && r.refused == 0) {
        let k = ORDER
            .iter()
            .position(|p| *p == r.policy)
            .unwrap_or(ORDER.len());
        series
            .entry(k)
            .or_insert_with(|| Series {
                name: r.policy.clone(),
                points: vec![],
                style: Style::Step,
            })
            .points
            .push((r.budget, r.score));
    }
    let chart = Chart {
        title: "Measured accuracy at a budget: plan, oracle and naive policies (test split)".into(),
        x_label: "budget (FLOPs per request)".into(),
        y_label: "score (0-100)".into(),
        log_x: true,
        series: series.into_values().collect(),
        ..Default::default()
    };
    std::fs::write(out.join("check.svg"), plot::render(&[frontier, chart]))?;
    Ok(())
}

/// The check table: per budget, every policy's score over all items, the plan's distance to
/// the oracle and its margin over the naive policies' mean; then the same per family.
pub fn check_markdown(rows: &[PolicyRow], budgets: &[f64]) -> String {
    let get = |b: f64, p: &str, f: &str| {
        rows.iter()
            .find(|r| r.budget == b && r.policy == p && r.family == f)
    };
    let policies: Vec<&str> = ORDER
        .iter()
        .copied()
        .filter(|p| rows.iter().any(|r| r.policy == *p))
        .collect();
    let naive: Vec<&str> = NaivePolicy::ALL.iter().map(|p| p.name()).collect();
    let cell = |r: Option<&PolicyRow>| match r {
        Some(r) if r.refused == r.items => "-".to_string(),
        Some(r) if r.refused > 0 => format!("{:.1} ({} refused)", r.score, r.refused),
        Some(r) => format!("{:.1}", r.score),
        None => "-".into(),
    };
    let plan = if policies.contains(&"plan-family") {
        "plan-family"
    } else {
        "plan-pooled"
    };
    let oracle = if plan == "plan-family" {
        "oracle-family"
    } else {
        "oracle-pooled"
    };
    let mut families: Vec<String> = rows
        .iter()
        .map(|r| r.family.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    families.retain(|f| f != "all");
    families.insert(0, "all".into());
    let mut s = String::new();
    for fam in &families {
        s += &format!("\n#### {fam}\n\n| budget | ");
        s += &policies.join(" | ");
        s +=
            &format!(" | naive mean | {plan} - {oracle} | {plan} - naive mean | {plan} picks |\n|");
        s += &"---|".repeat(policies.len() + 5);
        s += "\n";
        for &b in budgets {
            s += &format!("| {} |", format_si(b));
            for p in &policies {
                s += &format!(" {} |", cell(get(b, p, fam)));
            }
            let ns: Vec<f64> = naive
                .iter()
                .filter_map(|p| get(b, p, fam))
                .filter(|r| r.refused < r.items)
                .map(|r| r.score)
                .collect();
            let nm = if ns.is_empty() {
                f64::NAN
            } else {
                ns.iter().sum::<f64>() / ns.len() as f64
            };
            let (ps, os) = (get(b, plan, fam), get(b, oracle, fam));
            let d = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:+.1}"));
            s += &format!(
                " {} | {} | {} | {} ({:.0}%) |\n",
                if nm.is_nan() {
                    "-".into()
                } else {
                    format!("{nm:.1}")
                },
                d(ps.zip(os).map(|(p, o)| p.score - o.score)),
                d(ps.filter(|_| !nm.is_nan()).map(|p| p.score - nm)),
                ps.map_or("-".into(), |p| p.config.clone()),
                ps.map_or(0.0, |p| 100.0 * p.config_share)
            );
        }
    }
    s
}
