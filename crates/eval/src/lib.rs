//! Measured accuracy: labelled videos (the suite's `items.jsonl` or a user's set in the same
//! format) run through vvlm's own video path and engine exactly as the server runs them (same
//! decoder, uniform sampling, preprocessing at the tower's resolution, chat template, pooling),
//! and scored: multiple choice by the highest log-likelihood among the item's choices (as
//! lmms-eval), open answers by greedy generation and normalised exact match, captions by the
//! suite's fact scorer.
//!
//! Owns the scoring of one item at one (x_T, s), the sweep cache, and the budget policies the
//! planner is checked against ([`policy`]: naive rules and the oracle). Must not know about
//! HTTP or tenants; the planner's choices reach it as plain (checkpoint, frames, side) triples.

pub mod policy;

use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::Path;
use vvlm_cost::FlopCounter;
use vvlm_engine::{GenerateRequest, SamplingParams, VideoVlm};
use vvlm_suite::Item;
use vvlm_video::{FrameSampling, MediaPolicy, Preprocess, SampledVideo};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Video(#[from] vvlm_video::VideoError),
    #[error(transparent)]
    Engine(#[from] vvlm_engine::EngineError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Decodes `frames` frames of a video as the server does for a checkpoint of tower resolution
/// `size`, as the engine's input `[T, 3, size, size]`.
pub fn load_pixels(
    path: &Path,
    frames: usize,
    size: usize,
    policy: &MediaPolicy,
) -> Result<(Tensor, SampledVideo), EvalError> {
    let pre = Preprocess {
        size: size as u32,
        ..Default::default()
    };
    let v = vvlm_video::decode_path(path, &FrameSampling::Uniform { frames }, policy, &pre)?;
    let t = Tensor::from_slice(&v.pixels, (v.frames.len(), 3, size, size), &Device::Cpu)?;
    Ok((t, v))
}

/// One item's result.
#[derive(Debug, Clone, Serialize)]
pub struct ItemScore {
    /// In `[0, 1]`: 1 or 0 for choices and exact match, the fact fraction for captions.
    pub score: f64,
    pub predicted: String,
}

/// Longest answer generated for open items.
pub const MAX_ANSWER_TOKENS: usize = 48;

/// Scores one item on decoded pixels at pooled side `side`.
pub fn score_item(
    vlm: &VideoVlm,
    item: &Item,
    pixels: &Tensor,
    side: usize,
    flops: &FlopCounter,
) -> Result<ItemScore, EvalError> {
    if !item.choices.is_empty() {
        let ll = vlm.choice_log_likelihoods(pixels, side, &item.question, &item.choices, flops)?;
        return Ok(pick_choice(item, &ll));
    }
    let req = GenerateRequest {
        pixels: Some(pixels),
        side,
        system: None,
        prompt: &item.question,
        history: &[],
        form: &vvlm_engine::PromptForm::Chat,
        sampling: SamplingParams {
            max_tokens: MAX_ANSWER_TOKENS,
            ..Default::default()
        },
        cancel: None,
    };
    let g = vlm.generate(&req, flops, &mut |_| true)?;
    Ok(score_open(item, g.text.trim()))
}

/// One grid point: frames and pooled side (tokens per frame `side^2`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub struct GridPoint {
    pub frames: usize,
    pub side: usize,
}

impl GridPoint {
    pub fn tokens_per_frame(&self) -> usize {
        self.side * self.side
    }
    /// The cache file name of this point.
    pub fn key(&self) -> String {
        format!("T{}_s{}", self.frames, self.side)
    }
}

/// Parses `T:V` pairs (`V` = tokens per frame, a perfect square), comma-separated.
pub fn parse_grid(text: &str) -> Result<Vec<GridPoint>, EvalError> {
    let mut out = vec![];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            EvalError::Invalid(format!(
                "bad grid point {part:?}: expected FRAMES:TOKENS_PER_FRAME, e.g. 8:16"
            ))
        };
        let (t, v) = part.split_once(':').ok_or_else(bad)?;
        let frames: usize = t.trim().parse().map_err(|_| bad())?;
        let tokens: usize = v.trim().parse().map_err(|_| bad())?;
        let side = (tokens as f64).sqrt().round() as usize;
        if frames == 0 || side == 0 || side * side != tokens {
            return Err(EvalError::Invalid(format!(
                "grid point {part:?}: frames must be >= 1 and tokens per frame a perfect square s*s >= 1"
            )));
        }
        out.push(GridPoint { frames, side });
    }
    if out.is_empty() {
        return Err(EvalError::Invalid("the grid is empty".into()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// One scored item at one grid point of one checkpoint: a line of the sweep's cache.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub family: String,
    pub score: f64,
    pub predicted: String,
    /// Measured FLOPs of the request this item would be: the video's tower and projector at
    /// this frame count plus this item's LM work.
    pub measured_flops: f64,
    pub vision_s: f64,
    pub lm_s: f64,
}

/// Items grouped by video, in first-appearance order.
pub fn group_by_video(items: &[Item]) -> Vec<(String, Vec<&Item>)> {
    let mut order: Vec<(String, Vec<&Item>)> = vec![];
    let mut at = std::collections::HashMap::new();
    for it in items {
        let k = *at.entry(it.video.clone()).or_insert_with(|| {
            order.push((it.video.clone(), vec![]));
            order.len() - 1
        });
        order[k].1.push(it);
    }
    order
}

/// A checkpoint's results cache: one JSONL file per grid point, appended item by item, so an
/// interrupted sweep resumes where it stopped.
pub struct Cache {
    dir: std::path::PathBuf,
}

impl Cache {
    pub fn new(dir: &Path) -> Result<Self, EvalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EvalError::Invalid(format!("{}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, p: GridPoint) -> std::path::PathBuf {
        self.dir.join(format!("{}.jsonl", p.key()))
    }

    /// Results already computed at a grid point (a torn last line is ignored).
    pub fn load(&self, p: GridPoint) -> Vec<ItemResult> {
        std::fs::read_to_string(self.path(p))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn append(&self, p: GridPoint, rows: &[ItemResult]) -> Result<(), EvalError> {
        use std::io::Write;
        let path = self.path(p);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| EvalError::Invalid(format!("{}: {e}", path.display())))?;
        // A run killed mid-write may have left a torn last line: end it, so that it stays one
        // skipped line and does not swallow the first new row.
        let torn = last_byte(&path).is_some_and(|c| c != b'\n');
        let mut text = String::from(if torn { "\n" } else { "" });
        for r in rows {
            text.push_str(&serde_json::to_string(r).expect("plain data"));
            text.push('\n');
        }
        f.write_all(text.as_bytes())
            .map_err(|e| EvalError::Invalid(format!("{}: {e}", path.display())))
    }
}

fn last_byte(path: &Path) -> Option<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::End(-1)).ok()?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b).ok()?;
    Some(b[0])
}

/// Evaluates one checkpoint over a grid: each video is decoded once per frame count, each frame
/// encoded once (tower + projector) and pooled for every side of the grid with that frame count.
/// Results go to `cache` as they are made; points and videos already there are skipped.
/// `progress(done, total)` is called after every video.
pub fn sweep_checkpoint(
    vlm: &VideoVlm,
    items: &[Item],
    items_dir: &Path,
    grid: &[GridPoint],
    cache: &Cache,
    policy: &MediaPolicy,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), EvalError> {
    use std::collections::{BTreeMap, HashSet};
    use std::time::Instant;
    use vvlm_cost::Component;
    let videos = group_by_video(items);
    let size = vlm.cfg.vision_config.image_size;
    let mut by_frames: BTreeMap<usize, Vec<GridPoint>> = BTreeMap::new();
    for p in grid {
        by_frames.entry(p.frames).or_default().push(*p);
    }
    let done: BTreeMap<GridPoint, HashSet<String>> = grid
        .iter()
        .map(|p| (*p, cache.load(*p).into_iter().map(|r| r.id).collect()))
        .collect();
    let total = videos.len() * by_frames.len();
    let mut step = 0;
    for (frames, points) in &by_frames {
        for (video, its) in &videos {
            step += 1;
            let todo: Vec<GridPoint> = points
                .iter()
                .copied()
                .filter(|p| its.iter().any(|it| !done[p].contains(&it.id)))
                .collect();
            if todo.is_empty() {
                progress(step, total);
                continue;
            }
            let t0 = Instant::now();
            let (pixels, _) = load_pixels(&items_dir.join(video), *frames, size, policy)?;
            let vision_flops = FlopCounter::new();
            let mut ctx = vvlm_engine::Ctx::new(&vision_flops, Component::Vision);
            let projected = vlm.projected_frames(&pixels, &mut ctx)?;
            let vision_s = t0.elapsed().as_secs_f64();
            let vision_total = vision_flops.snapshot().total();
            for p in todo {
                let mut rows = vec![];
                let tokens_flops = FlopCounter::new();
                let mut ctx = vvlm_engine::Ctx::new(&tokens_flops, Component::Projector);
                let tokens = vlm.video_tokens(&projected, p.side, &mut ctx)?;
                for it in its.iter().filter(|it| !done[&p].contains(&it.id)) {
                    let t1 = Instant::now();
                    let flops = FlopCounter::new();
                    let s = score_encoded(vlm, it, &tokens, &flops)?;
                    rows.push(ItemResult {
                        id: it.id.clone(),
                        family: it.family.clone().unwrap_or_else(|| "all".into()),
                        score: s.score,
                        predicted: s.predicted,
                        measured_flops: vision_total
                            + tokens_flops.snapshot().total()
                            + flops.snapshot().total(),
                        vision_s,
                        lm_s: t1.elapsed().as_secs_f64(),
                    });
                }
                cache.append(p, &rows)?;
            }
            progress(step, total);
        }
    }
    Ok(())
}

/// [`score_item`] on already encoded visual tokens.
pub fn score_encoded(
    vlm: &VideoVlm,
    item: &Item,
    tokens: &Tensor,
    flops: &FlopCounter,
) -> Result<ItemScore, EvalError> {
    if !item.choices.is_empty() {
        let ll = vlm.choice_log_likelihoods_for(tokens, &item.question, &item.choices, flops)?;
        return Ok(pick_choice(item, &ll));
    }
    let req = GenerateRequest {
        pixels: None,
        side: 0,
        system: None,
        prompt: &item.question,
        history: &[],
        form: &vvlm_engine::PromptForm::Chat,
        sampling: SamplingParams {
            max_tokens: MAX_ANSWER_TOKENS,
            ..Default::default()
        },
        cancel: None,
    };
    let g = vlm.generate_encoded(Some(tokens), &req, flops, &mut |_| true)?;
    Ok(score_open(item, g.text.trim()))
}

fn pick_choice(item: &Item, ll: &[f64]) -> ItemScore {
    let best = ll
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let predicted = item.choices[best].clone();
    let score = f64::from(
        vvlm_suite::normalise_answer(&predicted) == vvlm_suite::normalise_answer(&item.answer),
    );
    ItemScore { score, predicted }
}

fn score_open(item: &Item, predicted: &str) -> ItemScore {
    let score = if item.family.as_deref() == Some("caption") {
        vvlm_suite::score_caption(predicted, &item.answer)
    } else {
        f64::from(
            vvlm_suite::normalise_answer(predicted) == vvlm_suite::normalise_answer(&item.answer),
        )
    };
    ItemScore {
        score,
        predicted: predicted.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_points_are_frames_and_square_token_counts() {
        let g = parse_grid("8:16, 1:1,8:16,32:64").unwrap();
        assert_eq!(
            g,
            vec![
                GridPoint { frames: 1, side: 1 },
                GridPoint { frames: 8, side: 4 },
                GridPoint {
                    frames: 32,
                    side: 8
                }
            ]
        );
        for bad in ["8:15", "0:4", "8", "x:4", "", "4:0"] {
            assert!(parse_grid(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn row(id: &str, score: f64) -> ItemResult {
        ItemResult {
            id: id.into(),
            family: "f".into(),
            score,
            predicted: "p".into(),
            measured_flops: 1.0,
            vision_s: 0.0,
            lm_s: 0.0,
        }
    }

    #[test]
    fn cache_appends_and_ignores_a_torn_last_line() {
        let dir = std::env::temp_dir().join(format!("vvlm-eval-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Cache::new(&dir).unwrap();
        let p = GridPoint { frames: 2, side: 3 };
        assert!(c.load(p).is_empty());
        c.append(p, &[row("a", 1.0), row("b", 0.0)]).unwrap();
        c.append(p, &[row("c", 0.5)]).unwrap();
        // A run killed mid-write leaves a partial line: it is skipped, the rest is kept.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("T2_s3.jsonl"))
            .unwrap();
        f.write_all(b"{\"id\": \"d\", \"fam").unwrap();
        let got: Vec<String> = c.load(p).into_iter().map(|r| r.id).collect();
        assert_eq!(got, ["a", "b", "c"]);
        // The resumed run's rows are not lost to the torn line.
        c.append(p, &[row("d", 1.0)]).unwrap();
        let got: Vec<String> = c.load(p).into_iter().map(|r| r.id).collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
        assert!(c.load(GridPoint { frames: 2, side: 2 }).is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn items_group_by_video_in_order() {
        let it = |id: &str, v: &str| Item {
            id: id.into(),
            video: v.into(),
            question: "q".into(),
            answer: "a".into(),
            choices: vec![],
            family: None,
        };
        let items = [it("1", "x"), it("2", "y"), it("3", "x")];
        let g = group_by_video(&items);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].0, "x");
        assert_eq!(
            g[0].1.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["1", "3"]
        );
    }
}
