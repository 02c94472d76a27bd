//! The `vvlm` binary: the command-line edge of the project. Errors become one clear line and a
//! non-zero exit; everything else lives in the library crates.

mod bench_cmd;
mod bench_ledger;
mod engine_cmd;
mod eval_cmd;
mod eval_plan;
mod frames_cmd;
mod math;
mod plan_cmd;
mod plot;
mod serve_cmd;
mod suite_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vvlm",
    version,
    about = "Video VLM inference at the compute-optimal frontier"
)]
struct Cli {
    /// How log lines are written to stderr: `text` (colour only on a terminal) or `json` (one
    /// object a line, for a log collector). Which lines: `RUST_LOG` (default `info`).
    #[arg(long, global = true, env = "VVLM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Theoretical (paper) and exact analytic FLOPs of one configuration.
    Cost(math::CostArgs),
    /// Fit a scaling model to sweep results.
    Fit(math::FitArgs),
    /// The compute-optimal frontier of a fitted model over a range of budgets.
    Frontier(math::FrontierArgs),
    /// Elasticity of the frontier with respect to finetuning data size.
    Elasticity(math::ElasticityArgs),
    /// Inspect the engine on given inputs.
    #[command(subcommand)]
    Debug(engine_cmd::DebugCmd),
    /// Make or inspect checkpoints.
    #[command(subcommand)]
    Models(engine_cmd::ModelsCmd),
    /// Benchmarks: measured vs theoretical FLOPs.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Run the HTTP server.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Manage tenants in the ledger.
    Tenant(serve_cmd::TenantArgs),
    /// Plan a request: checkpoint, frames and tokens per frame under a budget.
    Plan(plan_cmd::PlanArgs),
    /// Probe a video and sample frames as the server would.
    Frames(frames_cmd::FramesArgs),
    /// Measured accuracy of the registry's checkpoints on labelled videos over a grid (the sweep).
    Eval(eval_cmd::EvalArgs),
    /// The procedural video-QA suite: generate it, dump its frames for training.
    #[command(subcommand)]
    Suite(suite_cmd::SuiteCmd),
    /// Text-only generation with a checkpoint.
    Generate(engine_cmd::GenerateArgs),
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    vvlm_engine::tune_cpu_allocator();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Log lines on stderr, filtered by `RUST_LOG` (default `info`): text, coloured only when
/// stderr is a terminal (and `NO_COLOR` is unset), or one JSON object a line with the event's
/// fields at the top level and the request's span (`request_id`, `method`, `path`, `tenant`)
/// beside them.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cost(a) => math::cost(a),
        Command::Fit(a) => math::fit_cmd(a),
        Command::Frontier(a) => math::frontier_cmd(a),
        Command::Elasticity(a) => math::elasticity_cmd(a),
        Command::Debug(c) => engine_cmd::debug(c),
        Command::Models(c) => engine_cmd::models(c),
        Command::Generate(a) => engine_cmd::generate(a),
        Command::Frames(a) => frames_cmd::frames(a),
        Command::Plan(a) => plan_cmd::plan(a),
        Command::Serve(a) => serve_cmd::serve(*a),
        Command::Bench(c) => bench_cmd::run(c),
        Command::Tenant(a) => serve_cmd::tenant(a),
        Command::Suite(c) => suite_cmd::run(c),
        Command::Eval(a) => eval_cmd::eval(a),
    }
}
