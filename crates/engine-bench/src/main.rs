//! `vvlm-engine-bench`: the engine benchmarks and the GPU smoke check in a binary that links
//! no FFmpeg, to be carried to a GPU machine (`scripts/gpu-bundle`, `scripts/gpu-run`). The same
//! benchmarks are `vvlm bench engine` and `vvlm bench batch`; `smoke` prints JSON and exits 1
//! when a check fails.

use anyhow::Result;
use clap::{Parser, Subcommand};
use vvlm_engine_bench::{batch, engine, smoke, Placement};

#[derive(Parser, Debug)]
#[command(name = "vvlm-engine-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open the device and compare one of each kernel kind with the CPU (JSON; exit 1 on failure).
    Smoke(Placement),
    /// SigLIP so400m/14, pooling, Llama-3.2-1B shape and SmolLM2 at real shapes.
    Engine(engine::EngineArgs),
    /// Batched decode at several batch sizes, beside one sequence alone.
    Batch(batch::BatchArgs),
}

fn main() -> Result<()> {
    // The allocator as the server tunes it (buffers reused, not mapped and unmapped per op).
    vvlm_engine::tune_cpu_allocator();
    match Cli::parse().cmd {
        Cmd::Smoke(p) => {
            let r = smoke::run(&p)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !r.ok {
                std::process::exit(1);
            }
        }
        Cmd::Engine(a) => {
            let out = engine::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        Cmd::Batch(a) => {
            let rows = batch::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
    }
    Ok(())
}
