//! `vvlm frames`: probe a video, sample frames, optionally write the preprocessed frames.

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use vvlm_video::{decode_path, FrameSampling, MediaPolicy, Preprocess};

#[derive(Args, Debug)]
pub struct FramesArgs {
    pub video: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Side of the preprocessed square frames.
    #[arg(long, default_value_t = 384)]
    pub size: u32,
    /// Write the preprocessed frames as PNGs here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Largest file accepted, bytes (the server's media policy default otherwise).
    #[arg(long)]
    pub max_bytes: Option<u64>,
}

pub fn frames(a: FramesArgs) -> Result<()> {
    let pre = Preprocess {
        size: a.size,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut policy = MediaPolicy::default();
    if let Some(b) = a.max_bytes {
        policy.max_bytes = b;
    }
    let v = decode_path(
        &a.video,
        &FrameSampling::Uniform { frames: a.frames },
        &policy,
        &pre,
    )?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let s = a.size as usize;
        for i in 0..v.frames.len() {
            let px = v.frame_pixels(i);
            let img = image::RgbImage::from_fn(a.size, a.size, |x, y| {
                let at = |c: usize| {
                    let val =
                        px[c * s * s + y as usize * s + x as usize] * pre.std[c] + pre.mean[c];
                    (val * 255.0).round().clamp(0.0, 255.0) as u8
                };
                image::Rgb([at(0), at(1), at(2)])
            });
            let path = dir.join(format!("frame_{i:03}.png"));
            img.save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "probe": v.probe, "frames": v.frames, "decoded_frames": v.decoded_frames,
                "seeked": v.seeked, "seconds": secs, "size": a.size,
            }))?
        );
    } else {
        let p = &v.probe;
        println!(
            "{}: {} {}x{} {:.2}s @ {:.2} fps (~{} frames), rotation {}{}",
            a.video.display(),
            p.codec,
            p.width,
            p.height,
            p.duration_s,
            p.frame_rate,
            p.frame_count,
            p.rotation_deg,
            if p.duration_from_container {
                ", duration from container"
            } else {
                ""
            }
        );
        for f in &v.frames {
            println!(
                "  frame {:>6} at {:>9.3}s (asked {:.3}s)",
                f.index, f.timestamp_s, f.requested_s
            );
        }
        println!(
            "{} frames sampled in {:.3}s ({} decoded, {})",
            v.frames.len(),
            secs,
            v.decoded_frames,
            if v.seeked { "seeking" } else { "sequential" }
        );
    }
    Ok(())
}
