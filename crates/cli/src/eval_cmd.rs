//! `vvlm eval`: measured accuracy of the registry's checkpoints on a labelled set over a grid of
//! (frames, tokens per frame): the sweep step of the paper's method. Writes the per-item cache
//! (resumable), the sweep as the CSV `vvlm fit` reads (one file overall and one per family), a
//! JSON summary and an SVG of accuracy against measured FLOPs per checkpoint.

use crate::plot::{self, Chart, Series, Style};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vvlm_engine::{LoadOptions, VideoVlm};
use vvlm_eval::{Cache, GridPoint, ItemResult};
use vvlm_planner::{ModelEntry, Registry};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub action: Option<EvalAction>,
    /// Labelled set: JSONL of {"video", "question", "answer", "choices"?, "family"?}; `video`
    /// is relative to the file's folder.
    #[arg(long)]
    pub items: Option<PathBuf>,
    /// Folder of model registry entries (*.toml): every checkpoint in it is evaluated.
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Only these registry entries (repeatable).
    #[arg(long = "model")]
    pub only: Vec<String>,
    /// Grid of FRAMES:TOKENS_PER_FRAME points. Default: frames 1,2,4,8,16,32 x sides
    /// 1,2,4,8 (tokens 1,4,16,64), clipped to each entry's ranges.
    #[arg(long)]
    pub grid: Option<String>,
    /// Output folder (cache/, sweep.csv, sweep-<family>.csv, summary.json, accuracy.svg).
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// Evaluate only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Finetuning data size (millions of examples) for entries that do not state it.
    #[arg(long)]
    pub data_size: Option<f64>,
    /// Quiet: no progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Plan mode: at each `--budget` the planner chooses a configuration per item (as the
    /// server would for that request) and the choice is evaluated; the oracle (best measured grid
    /// configuration within the budget) and naive policies are computed from the grid beside it.
    /// Writes plan.csv, check.md and check.svg.
    #[arg(long, requires = "budget")]
    pub plan: bool,
    /// Budgets for --plan, FLOPs per request, comma separated (3e8,1G,...).
    #[arg(long, value_delimiter = ',', value_parser = crate::math::si)]
    pub budget: Vec<f64>,
    /// Scaling model of the pooled plan (every item plans with it).
    #[arg(long, default_value = "configs/scaling/default.json")]
    pub scaling: PathBuf,
    /// Folder of per-family scaling models (`<family>.json`): adds the per-family plan (items of
    /// a family without a file plan with --scaling).
    #[arg(long)]
    pub family_models: Option<PathBuf>,
    /// How the planner and the baselines price a configuration.
    #[arg(long, value_enum, default_value = "exact")]
    pub cost_mode: crate::eval_plan::CostModeArg,
    /// Evaluate only shard I of N (0-based): every N-th cell (checkpoint x grid point) of the
    /// whole grid in a fixed order, so N machines split a sweep; `vvlm eval merge` joins the
    /// parts.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
}

#[derive(clap::Subcommand, Debug)]
pub enum EvalAction {
    /// Join the parts of a sharded sweep (`--shard I/N` output folders) into one sweep.
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The parts' output folders (each has shard.json and its sweep CSVs).
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{s}`: a shard is I/N with 0 <= I < N, e.g. 0/3");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// One cell of a sweep: a checkpoint at a grid point.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Cell {
    pub model: String,
    pub frames: usize,
    pub tokens_per_frame: usize,
}

/// What a shard's folder records: which part of which grid it holds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub shard: usize,
    pub of: usize,
    /// Every cell of the whole grid, in the order shards are cut from.
    pub grid: Vec<Cell>,
    /// This shard's cells.
    pub cells: Vec<Cell>,
}

/// The cells of shard `i` of `n`: every n-th of the whole grid, starting at `i`.
pub fn shard_cells(all: &[Cell], i: usize, n: usize) -> Vec<Cell> {
    all.iter().skip(i).step_by(n).cloned().collect()
}

const DEFAULT_FRAMES: [usize; 6] = [1, 2, 4, 8, 16, 32];
const DEFAULT_SIDES: [usize; 4] = [1, 2, 4, 8];

fn default_grid(e: &ModelEntry, grid_side: usize) -> Vec<GridPoint> {
    let max_side = (e.max_side as usize).min(grid_side);
    let mut out = vec![];
    for &frames in &DEFAULT_FRAMES {
        if frames < e.min_frames as usize || frames > e.max_frames as usize {
            continue;
        }
        let mut sides: Vec<usize> = DEFAULT_SIDES
            .iter()
            .copied()
            .filter(|&s| s <= max_side)
            .collect();
        if !sides.contains(&max_side) {
            sides.push(max_side);
        }
        out.extend(sides.into_iter().map(|side| GridPoint { frames, side }));
    }
    out
}

/// Data size of an entry: the registry's `data_size_m`, else the checkpoint's training record,
/// else the command line.
fn data_size(e: &ModelEntry, dir: &Path, cli: Option<f64>) -> Result<f64> {
    if let Some(d) = e.data_size_m {
        return Ok(d);
    }
    let cfg: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(items) = cfg["vvlm_training"]["items"].as_f64() {
        return Ok(items / 1e6);
    }
    cli.with_context(|| {
        format!(
            "{}: no data size (set data_size_m in its registry entry or pass --data-size)",
            e.name
        )
    })
}

/// One row of the sweep: a checkpoint at a grid point, over one family or all items.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub model: String,
    pub lm_params_b: f64,
    pub frames: usize,
    pub tokens_per_frame: usize,
    pub data_size_m: f64,
    pub family: String,
    pub items: usize,
    /// Mean score, 0-100.
    pub score: f64,
    /// Half-width of the 95% confidence interval of `score` (normal approximation).
    pub ci95: f64,
    /// The paper's formula with this checkpoint's tower: `2 x_T (x_M x_W + x_N x_V)`.
    pub theoretical_flops: f64,
    /// Mean measured FLOPs per item (tower + projector + LM as executed).
    pub measured_flops: f64,
    pub vision_s: f64,
    pub lm_s: f64,
}

pub fn aggregate(rows: &[ItemResult]) -> Option<(usize, f64, f64, f64, f64, f64)> {
    let n = rows.len();
    if n == 0 {
        return None;
    }
    let mean = |f: &dyn Fn(&ItemResult) -> f64| rows.iter().map(f).sum::<f64>() / n as f64;
    let m = mean(&|r| r.score);
    let var = if n > 1 {
        rows.iter().map(|r| (r.score - m).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some((
        n,
        100.0 * m,
        100.0 * 1.96 * (var / n as f64).sqrt(),
        mean(&|r| r.measured_flops),
        mean(&|r| r.vision_s),
        mean(&|r| r.lm_s),
    ))
}

/// A progress bar over `len` steps (hidden when quiet).
pub fn progress(quiet: bool, what: &str, len: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len}, ETA {eta}")
            .expect("static template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

pub fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(EvalAction::Merge(m)) = &a.action {
        return merge(m);
    }
    let Some(items_path) = a.items.clone() else {
        bail!("--items is required (or use `vvlm eval merge`)");
    };
    if a.plan && a.shard.is_some() {
        bail!("--plan evaluates the planner's choices on the whole set: do not combine it with --shard");
    }
    vvlm_video::init();
    let mut items = vvlm_suite::read_items(&items_path)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("{} has no items", items_path.display());
    }
    let items_dir = items_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let registry = Registry::load_dir(&a.models)?;
    let entries: Vec<&ModelEntry> = registry
        .models
        .iter()
        .filter(|e| a.only.is_empty() || a.only.contains(&e.name))
        .collect();
    if entries.is_empty() {
        bail!("no registry entries to evaluate in {}", a.models.display());
    }
    let ids: std::collections::HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let policy = vvlm_video::MediaPolicy::default();
    // The whole grid, cell by cell, in a fixed order (a shard takes every N-th): grid sides come
    // from each checkpoint's config.json, so no weights are loaded to cut shards.
    let mut grids: BTreeMap<String, Vec<GridPoint>> = BTreeMap::new();
    for e in entries.iter().copied() {
        let grid = match &a.grid {
            Some(g) => vvlm_eval::parse_grid(g)?,
            None => {
                let arch = vvlm_cost::ArchSpec::from_checkpoint_dir(&e.path)
                    .with_context(|| format!("{}: reading {}", e.name, e.path.display()))?;
                default_grid(e, arch.vision.grid())
            }
        };
        grids.insert(e.name.clone(), grid);
    }
    let all_cells: Vec<Cell> = grids
        .iter()
        .flat_map(|(m, g)| {
            g.iter().map(|p| Cell {
                model: m.clone(),
                frames: p.frames,
                tokens_per_frame: p.tokens_per_frame(),
            })
        })
        .collect();
    if let Some((i, n)) = a.shard {
        let mine = shard_cells(&all_cells, i, n);
        for (m, g) in grids.iter_mut() {
            g.retain(|p| {
                mine.iter().any(|c| {
                    &c.model == m
                        && c.frames == p.frames
                        && c.tokens_per_frame == p.tokens_per_frame()
                })
            });
        }
        std::fs::create_dir_all(&a.out)?;
        std::fs::write(
            a.out.join("shard.json"),
            serde_json::to_string_pretty(&ShardInfo {
                shard: i,
                of: n,
                grid: all_cells.clone(),
                cells: mine,
            })?,
        )?;
    }
    let mut sweep = vec![];
    for e in entries.iter().copied() {
        let grid = grids.get(&e.name).cloned().unwrap_or_default();
        if grid.is_empty() {
            continue;
        }
        let dir = e.path.clone();
        let vlm = VideoVlm::load(&dir, &LoadOptions::default())
            .with_context(|| format!("loading {} from {}", e.name, dir.display()))?;
        let data_size_m = data_size(e, &dir, a.data_size)?;
        let cache = Cache::new(&a.out.join("cache").join(&e.name))?;
        let bar = if a.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} videos x frame counts, ETA {eta}",
            )
            .expect("static template"),
        );
        bar.set_prefix(e.name.clone());
        let t0 = std::time::Instant::now();
        vvlm_eval::sweep_checkpoint(
            &vlm,
            &items,
            &items_dir,
            &grid,
            &cache,
            &policy,
            &mut |d, t| {
                bar.set_length(t as u64);
                bar.set_position(d as u64);
            },
        )?;
        bar.finish_and_clear();
        tracing::info!(
            "{}: {} grid points in {:.1}s",
            e.name,
            grid.len(),
            t0.elapsed().as_secs_f64()
        );
        let arch = vlm.arch();
        let paper = vvlm_cost::PaperCost {
            vision_params: arch.vision.params(),
            vision_features: arch.vision.patches() as f64,
        };
        for p in &grid {
            let results: Vec<ItemResult> = cache
                .load(*p)
                .into_iter()
                .filter(|r| ids.contains(r.id.as_str()))
                .collect();
            let mut by_family: BTreeMap<String, Vec<ItemResult>> = BTreeMap::new();
            for r in &results {
                by_family
                    .entry(r.family.clone())
                    .or_default()
                    .push(r.clone());
            }
            by_family.insert("all".into(), results);
            for (family, rs) in by_family {
                let Some((n, score, ci95, measured, vision_s, lm_s)) = aggregate(&rs) else {
                    continue;
                };
                sweep.push(SweepRow {
                    model: e.name.clone(),
                    lm_params_b: e.lm_params / 1e9,
                    frames: p.frames,
                    tokens_per_frame: p.tokens_per_frame(),
                    data_size_m,
                    family,
                    items: n,
                    score,
                    ci95,
                    theoretical_flops: paper.flops(
                        e.lm_params,
                        p.frames as f64,
                        p.tokens_per_frame() as f64,
                    ),
                    measured_flops: measured,
                    vision_s,
                    lm_s,
                });
            }
        }
    }
    std::fs::create_dir_all(&a.out)?;
    let families: std::collections::BTreeSet<String> =
        sweep.iter().map(|r| r.family.clone()).collect();
    for f in &families {
        let rows: Vec<SweepRow> = sweep.iter().filter(|r| &r.family == f).cloned().collect();
        let name = if f == "all" {
            "sweep.csv".to_string()
        } else {
            format!("sweep-{f}.csv")
        };
        write_csv(&a.out.join(name), &rows)?;
    }
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "items": items_path, "n_items": items.len(), "rows": sweep,
        }))?,
    )?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in sweep.iter().filter(|r| r.family == "all") {
        series
            .entry(r.model.clone())
            .or_default()
            .push((r.measured_flops, r.score));
    }
    let chart = Chart {
        title: "Measured accuracy against measured FLOPs per request".into(),
        x_label: "FLOPs (measured)".into(),
        y_label: "score (0-100)".into(),
        log_x: true,
        series: series
            .into_iter()
            .map(|(name, points)| Series {
                name,
                points,
                style: Style::Scatter,
            })
            .collect(),
        ..Default::default()
    };
    std::fs::write(a.out.join("accuracy.svg"), plot::render(&[chart]))?;
    println!(
        "{:<18} {:>6} {:>6} {:>14} {:>7} {:>6} {:>11}",
        "model", "frames", "tokens", "family", "items", "score", "FLOPs"
    );
    for r in sweep.iter().filter(|r| r.family == "all") {
        println!(
            "{:<18} {:>6} {:>6} {:>14} {:>7} {:>6.1} {:>11.3e}",
            r.model, r.frames, r.tokens_per_frame, r.family, r.items, r.score, r.measured_flops
        );
    }
    if a.plan {
        let rows = crate::eval_plan::run(
            &a,
            &items,
            &items_dir,
            &entries,
            &|e, vlm| match &a.grid {
                Some(g) => Ok(vvlm_eval::parse_grid(g)?),
                None => Ok(default_grid(e, vlm.grid())),
            },
            &|e| data_size(e, &e.path, a.data_size),
        )?;
        println!();
        println!(
            "{:>10} {:<14} {:>6} {:>6}  {:<24} {:>11}",
            "budget", "policy", "items", "score", "config (most items)", "cost"
        );
        for r in rows.iter().filter(|r| r.family == "all") {
            println!(
                "{:>10} {:<14} {:>6} {:>6.1}  {:<24} {:>11}",
                vvlm_cost::format_si(r.budget),
                r.policy,
                r.items - r.refused,
                r.score,
                r.config,
                vvlm_cost::format_si(r.cost_flops)
            );
        }
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// `vvlm eval merge`: the parts of a sharded sweep joined into one, refusing duplicate and
/// missing cells with the cells named.
pub fn merge(m: &MergeArgs) -> Result<()> {
    let mut infos = vec![];
    for p in &m.parts {
        let path = p.join("shard.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: not a shard's output (run `vvlm eval --shard I/N`)",
                path.display()
            )
        })?;
        let info: ShardInfo = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a shard description", path.display()))?;
        infos.push((p.clone(), info));
    }
    let (_, first) = &infos[0];
    for (p, info) in &infos {
        if info.of != first.of || info.grid != first.grid {
            bail!(
                "{} is shard {}/{} of a different grid than {} ({}/{})",
                p.display(),
                info.shard,
                info.of,
                m.parts[0].display(),
                first.shard,
                first.of
            );
        }
    }
    let mut seen: Vec<Option<PathBuf>> = vec![None; first.of];
    for (p, info) in &infos {
        if let Some(other) = &seen[info.shard] {
            bail!(
                "shard {}/{} is given twice: {} and {}",
                info.shard,
                info.of,
                other.display(),
                p.display()
            );
        }
        seen[info.shard] = Some(p.clone());
    }
    let missing: Vec<String> = (0..first.of)
        .filter(|i| seen[*i].is_none())
        .map(|i| format!("{i}/{}", first.of))
        .collect();
    if !missing.is_empty() {
        bail!("missing shards: {}", missing.join(", "));
    }
    // Every CSV name any part wrote (sweep.csv, sweep-<family>.csv), rows joined.
    let mut files: BTreeMap<String, Vec<csv::StringRecord>> = BTreeMap::new();
    let mut header: Option<csv::StringRecord> = None;
    for (p, _) in &infos {
        for entry in std::fs::read_dir(p)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            if !(name.starts_with("sweep") && name.ends_with(".csv")) {
                continue;
            }
            let mut r = csv::Reader::from_path(&path)?;
            let h = r.headers()?.clone();
            match &header {
                Some(x) if x != &h => {
                    bail!("{}: columns differ from the other parts", path.display())
                }
                _ => header = Some(h),
            }
            let rows = files.entry(name).or_default();
            for rec in r.records() {
                rows.push(rec?);
            }
        }
    }
    let Some(header) = header else {
        bail!("the parts hold no sweep rows");
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|c| c == name)
            .with_context(|| format!("the sweep has no `{name}` column"))
    };
    let (cm, cf, cv, cfam) = (
        col("model")?,
        col("frames")?,
        col("tokens_per_frame")?,
        col("family")?,
    );
    let cell_of = |r: &csv::StringRecord| -> Result<Cell> {
        Ok(Cell {
            model: r[cm].to_string(),
            frames: r[cf].parse()?,
            tokens_per_frame: r[cv].parse()?,
        })
    };
    std::fs::create_dir_all(&m.out)?;
    for (name, rows) in &files {
        let mut keys = std::collections::BTreeSet::new();
        let mut sorted = rows.clone();
        for r in rows {
            let c = cell_of(r)?;
            if !keys.insert((c.clone(), r[cfam].to_string())) {
                bail!(
                    "{name}: cell {} T{} V{} ({}) appears in more than one part",
                    c.model,
                    c.frames,
                    c.tokens_per_frame,
                    &r[cfam]
                );
            }
        }
        if name == "sweep.csv" {
            let have: std::collections::BTreeSet<Cell> =
                keys.iter().map(|(c, _)| c.clone()).collect();
            let lost: Vec<String> = first
                .grid
                .iter()
                .filter(|c| !have.contains(c))
                .map(|c| format!("{} T{} V{}", c.model, c.frames, c.tokens_per_frame))
                .collect();
            if !lost.is_empty() {
                bail!("cells missing from the parts: {}", lost.join(", "));
            }
        }
        // The unsharded order: the grid's cell order.
        let rank = |r: &csv::StringRecord| {
            cell_of(r)
                .ok()
                .and_then(|c| first.grid.iter().position(|g| *g == c))
                .unwrap_or(usize::MAX)
        };
        sorted.sort_by_key(|r| rank(r));
        let mut w = csv::Writer::from_path(m.out.join(name))?;
        w.write_record(&header)?;
        for r in &sorted {
            w.write_record(r)?;
        }
        w.flush()?;
    }
    println!(
        "merged {} shards ({} cells) into {}",
        first.of,
        first.grid.len(),
        m.out.display()
    );
    Ok(())
}
