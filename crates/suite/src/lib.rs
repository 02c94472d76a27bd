//! The procedural video-QA suite: a seeded generator of short videos whose answers are in the
//! pixels (scenes, H.264 MP4 files through the `ffmpeg` CLI, items as JSONL, train/val/test
//! splits from disjoint seeds), the caption scorer, and frame dumps for training that go through
//! vvlm's own video path (the server's decoder and preprocessing: no train/serve skew).
//!
//! The grammar is specified in this crate's README precisely enough to write an independent
//! generator. Must not know about models, tensors, the planner or HTTP.

pub mod items;
mod npy;
pub mod rng;
pub mod scene;

pub use items::{caption, caption_facts, items, normalise_answer, score_caption, Family, Item};
pub use scene::Scene;

use rayon::prelude::*;
use scene::{CELL, FPS, FRAME, FRAMES};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("ffmpeg: {0}")]
    Ffmpeg(String),
    #[error("decoding {path}: {source}")]
    Decode {
        path: String,
        source: vvlm_video::VideoError,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> SuiteError {
    SuiteError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A split of the suite; each draws its scenes from its own seed range, so splits never share
/// a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
    /// Seed of the split's video `i` is `base + i`.
    pub fn seed_base(self) -> u64 {
        match self {
            Split::Train => 1_000_000,
            Split::Val => 2_000_000,
            Split::Test => 3_000_000,
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Split::Train, Split::Val, Split::Test]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// The scene of video `i` of a split.
pub fn scene_of(split: Split, i: usize) -> Scene {
    Scene::sample(
        format!("{}-{i:05}", split.name()),
        split.seed_base() + i as u64,
    )
}

/// Encodes RGB frames as H.264 MP4 (yuv420p, 8 fps, one keyframe per video, deterministic:
/// one encoder thread, bit-exact flags, no metadata).
pub fn encode_mp4(frames: &[Vec<u8>], out: &Path) -> Result<(), SuiteError> {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{FRAME}x{FRAME}"), "-r", &FPS.to_string()])
        .args([
            "-i", "-", "-c:v", "libx264", "-preset", "medium", "-crf", "10",
        ])
        .args(["-pix_fmt", "yuv420p", "-g", &FRAMES.to_string(), "-bf", "0"])
        .args([
            "-threads",
            "1",
            "-map_metadata",
            "-1",
            "-fflags",
            "+bitexact",
        ])
        .args(["-flags:v", "+bitexact"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SuiteError::Ffmpeg(format!("cannot start ffmpeg (is it installed?): {e}")))?;
    {
        let mut stdin = child.stdin.take().expect("piped above");
        for f in frames {
            stdin
                .write_all(f)
                .map_err(|e| SuiteError::Ffmpeg(e.to_string()))?;
        }
    }
    let o = child
        .wait_with_output()
        .map_err(|e| SuiteError::Ffmpeg(e.to_string()))?;
    if !o.status.success() {
        return Err(SuiteError::Ffmpeg(format!(
            "{} for {}: {}",
            o.status,
            out.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    pub dir: PathBuf,
    pub videos: usize,
    pub items: usize,
}

/// Generates `videos` videos of a split under `root/<split>/`: `videos/<id>.mp4`,
/// `items.jsonl` (every family per video) and `scenes.jsonl` (the ground truth). Videos that
/// already exist are kept (generation is deterministic), so an interrupted run resumes.
pub fn generate(root: &Path, split: Split, videos: usize) -> Result<Generated, SuiteError> {
    let dir = root.join(split.name());
    let vdir = dir.join("videos");
    std::fs::create_dir_all(&vdir).map_err(|e| io(&vdir, e))?;
    let scenes: Vec<Scene> = (0..videos).map(|i| scene_of(split, i)).collect();
    scenes.par_iter().try_for_each(|s| {
        let path = vdir.join(format!("{}.mp4", s.id));
        if path.exists() {
            return Ok(());
        }
        let tmp = vdir.join(format!(".{}.mp4", s.id));
        let frames: Vec<Vec<u8>> = (0..FRAMES).map(|f| s.render(f)).collect();
        encode_mp4(&frames, &tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    })?;
    let mut items_out = String::new();
    let mut scenes_out = String::new();
    let mut n_items = 0;
    for s in &scenes {
        for it in items(s, &format!("videos/{}.mp4", s.id)) {
            items_out.push_str(&serde_json::to_string(&it).expect("plain data"));
            items_out.push('\n');
            n_items += 1;
        }
        scenes_out.push_str(&serde_json::to_string(s).expect("plain data"));
        scenes_out.push('\n');
    }
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| io(&p, e))
    };
    write("items.jsonl", &items_out)?;
    write("scenes.jsonl", &scenes_out)?;
    Ok(Generated {
        dir,
        videos,
        items: n_items,
    })
}

/// Reads `scenes.jsonl` of a generated split folder.
pub fn read_scenes(dir: &Path) -> Result<Vec<Scene>, SuiteError> {
    let p = dir.join("scenes.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| SuiteError::Invalid(format!("{} line {}: {e}", p.display(), n + 1)))
        })
        .collect()
}

/// Reads an items JSONL file (the suite's or a user's labelled set).
pub fn read_items(path: &Path) -> Result<Vec<Item>, SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| SuiteError::Invalid(format!("{} line {}: {e}", path.display(), n + 1)))
        })
        .collect()
}

/// Per-patch labels of frame `f` for pretraining the vision tower, one `[colour, shape,
/// background]` triple per `CELL x CELL` patch in row-major order. The patch belongs to the
/// topmost object owning most of its pixels when that object owns at least 8 of them, else to
/// the background. colour: 0 = background, 1 + index into `COLOURS` (the small object is
/// white); shape: 0 = background, 1..=4 a mover's shape, 5..=8 the small object's shape, 9 the
/// flash; background: index into `BACKGROUNDS` (every patch).
pub fn patch_labels(s: &Scene, f: usize) -> Vec<[u8; 3]> {
    // Owner per pixel: 0 background, 1.. movers, then the small object, then the flash.
    let n_m = s.movers.len();
    let mut owner = vec![0usize; FRAME * FRAME];
    let mut mark = |x0: usize, y0: usize, size: usize, shape: scene::Shape, id: usize| {
        for dy in 0..size {
            for dx in 0..size {
                let (x, y) = (x0 + dx, y0 + dy);
                if x < FRAME && y < FRAME && shape.covers(dx, dy, size) {
                    owner[y * FRAME + x] = id;
                }
            }
        }
    };
    for (i, m) in s.movers.iter().enumerate() {
        let (x, y) = m.position(f);
        mark(x, y, scene::MOVER, m.shape, i + 1);
    }
    let (c, r) = s.small_cell;
    mark(c * CELL, r * CELL, scene::SMALL, s.small_shape, n_m + 1);
    if s.flash_on(f) {
        let o = (FRAME - scene::FLASH) / 2;
        mark(o, o, scene::FLASH, scene::Shape::Square, n_m + 2);
    }
    let g = FRAME / CELL;
    let white = scene::COLOURS
        .iter()
        .position(|c| c.0 == "white")
        .unwrap_or(0);
    (0..g * g)
        .map(|p| {
            let (pr, pc) = (p / g, p % g);
            let mut count = vec![0usize; n_m + 3];
            for y in pr * CELL..(pr + 1) * CELL {
                for x in pc * CELL..(pc + 1) * CELL {
                    count[owner[y * FRAME + x]] += 1;
                }
            }
            let (best, n) = count
                .iter()
                .enumerate()
                .skip(1)
                .fold((0, 0), |acc, (i, &n)| if n > acc.1 { (i, n) } else { acc });
            let bg = s.background as u8;
            if best == 0 || n < 8 {
                [0, 0, bg]
            } else if best <= n_m {
                let m = &s.movers[best - 1];
                [1 + m.colour as u8, 1 + m.shape as u8, bg]
            } else if best == n_m + 1 {
                [1 + white as u8, 5 + s.small_shape as u8, bg]
            } else {
                [1 + s.flash_colour as u8, 9, bg]
            }
        })
        .collect()
}

/// What [`dump_frames`] wrote.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub videos: usize,
    pub frames_path: PathBuf,
    pub labels_path: PathBuf,
}

/// Decodes every video of a generated split through vvlm's video path (the server's decoder,
/// uniform sampling of all `FRAMES` frames, preprocessing at the frame size) and writes
/// `frames.npy` (`uint8 [videos, FRAMES, FRAME, FRAME, 3]`, the preprocessed pixels mapped back
/// to bytes, exact since mean = std = 0.5) and `labels.npy` (`uint8 [videos, FRAMES, patches,
/// 3]`, [`patch_labels`]) into `out`. Fails if the decoder does not return every frame in order.
pub fn dump_frames(dir: &Path, out: &Path) -> Result<Dumped, SuiteError> {
    vvlm_video::init();
    let scenes = read_scenes(dir)?;
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let pre = vvlm_video::Preprocess {
        size: FRAME as u32,
        ..Default::default()
    };
    let policy = vvlm_video::MediaPolicy::default();
    let sampling = vvlm_video::FrameSampling::Uniform { frames: FRAMES };
    let per_video = FRAMES * FRAME * FRAME * 3;
    let decoded: Vec<Vec<u8>> = scenes
        .par_iter()
        .map(|s| {
            let path = dir.join("videos").join(format!("{}.mp4", s.id));
            let v = vvlm_video::decode_path(&path, &sampling, &policy, &pre).map_err(|e| {
                SuiteError::Decode {
                    path: path.display().to_string(),
                    source: e,
                }
            })?;
            let idx: Vec<u64> = v.frames.iter().map(|f| f.index).collect();
            if idx != (0..FRAMES as u64).collect::<Vec<_>>() {
                return Err(SuiteError::Invalid(format!(
                    "{}: sampled frames {idx:?}, expected 0..{FRAMES}",
                    path.display()
                )));
            }
            let mut bytes = vec![0u8; per_video];
            let hw = FRAME * FRAME;
            for f in 0..FRAMES {
                let px = v.frame_pixels(f);
                for c in 0..3 {
                    for i in 0..hw {
                        let val = px[c * hw + i] * pre.std[c] + pre.mean[c];
                        bytes[f * hw * 3 + i * 3 + c] =
                            (val * 255.0).round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
            Ok(bytes)
        })
        .collect::<Result<_, SuiteError>>()?;
    let frames_path = out.join("frames.npy");
    npy::write_u8(
        &frames_path,
        &[scenes.len(), FRAMES, FRAME, FRAME, 3],
        decoded.iter().map(|v| v.as_slice()),
    )
    .map_err(|e| io(&frames_path, e))?;
    let g = FRAME / CELL;
    let labels: Vec<Vec<u8>> = scenes
        .iter()
        .map(|s| {
            (0..FRAMES)
                .flat_map(|f| patch_labels(s, f).into_iter().flatten())
                .collect()
        })
        .collect();
    let labels_path = out.join("labels.npy");
    npy::write_u8(
        &labels_path,
        &[scenes.len(), FRAMES, g * g, 3],
        labels.iter().map(|v| v.as_slice()),
    )
    .map_err(|e| io(&labels_path, e))?;
    Ok(Dumped {
        videos: scenes.len(),
        frames_path,
        labels_path,
    })
}
