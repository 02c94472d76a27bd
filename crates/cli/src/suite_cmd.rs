//! `vvlm suite`: generate the procedural video-QA suite and dump its frames for training.

use anyhow::{bail, Result};
use clap::Subcommand;
use std::path::PathBuf;
use vvlm_suite::Split;

#[derive(Subcommand, Debug)]
pub enum SuiteCmd {
    /// Generate videos, items.jsonl and scenes.jsonl of one or more splits under OUT/<split>/.
    Generate {
        /// Folder of the suite.
        #[arg(long, default_value = "suite")]
        out: PathBuf,
        /// Splits and video counts, e.g. `train=4000,val=400,test=400`.
        #[arg(long, default_value = "train=4000,val=400,test=400")]
        splits: String,
    },
    /// Decode every video of a split through vvlm's video path into frames.npy and labels.npy
    /// (what the training code reads).
    Frames {
        /// A generated split folder (with scenes.jsonl and videos/).
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Score a predicted caption against a reference (fraction of facts stated).
    ScoreCaption {
        predicted: String,
        reference: String,
    },
}

pub fn run(c: SuiteCmd) -> Result<()> {
    match c {
        SuiteCmd::Generate { out, splits } => {
            for part in splits.split(',').filter(|p| !p.trim().is_empty()) {
                let Some((name, n)) = part.split_once('=') else {
                    bail!("bad split {part:?}: expected NAME=VIDEOS, e.g. train=4000");
                };
                let Some(split) = Split::parse(name.trim()) else {
                    bail!("unknown split {name:?} (train, val or test)");
                };
                let n: usize = n.trim().parse()?;
                let t = std::time::Instant::now();
                let g = vvlm_suite::generate(&out, split, n)?;
                println!(
                    "{}: {} videos, {} items in {:.1}s ({})",
                    split.name(),
                    g.videos,
                    g.items,
                    t.elapsed().as_secs_f64(),
                    g.dir.display()
                );
            }
            Ok(())
        }
        SuiteCmd::Frames { dir, out } => {
            let t = std::time::Instant::now();
            let d = vvlm_suite::dump_frames(&dir, &out)?;
            println!(
                "{} videos -> {} and {} in {:.1}s",
                d.videos,
                d.frames_path.display(),
                d.labels_path.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        SuiteCmd::ScoreCaption {
            predicted,
            reference,
        } => {
            println!("{:.4}", vvlm_suite::score_caption(&predicted, &reference));
            Ok(())
        }
    }
}
