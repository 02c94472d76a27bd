//! Which instants of a video to sample.
//!
//! The exact rule for [`FrameSampling::Uniform`] with `T` frames over a duration `D`: the video is
//! cut into `T` equal segments and the centre of each is taken, `t_i = (i + 0.5) * D / T` for
//! `i = 0..T`. Each instant maps to the frame shown at that time (the last frame whose timestamp
//! is `<= t_i`, or the first frame). When the video has fewer distinct frames than `T` (short
//! videos, one-frame videos, stills), the same frame is used for several instants: frames are
//! repeated, never an error. The sampling rate `T / D` is the paper's "at least 1 fps" when
//! `T >= D` seconds; for longer videos the paper's rule cannot hold with a fixed `T`, and the
//! instants stay uniform.

use crate::VideoError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FrameSampling {
    /// `frames` instants uniformly over the duration (segment centres).
    Uniform { frames: usize },
    /// One instant every `1 / fps` seconds from `0.5 / fps`, at most `max_frames`.
    Fps { fps: f64, max_frames: usize },
}

/// The instants (seconds) to sample from a video of `duration_s` seconds.
pub fn sample_timestamps(s: &FrameSampling, duration_s: f64) -> Result<Vec<f64>, VideoError> {
    if !(duration_s.is_finite() && duration_s > 0.0) {
        return Err(VideoError::BadDuration(format!("{duration_s} s")));
    }
    match *s {
        FrameSampling::Uniform { frames } => {
            if frames == 0 {
                return Err(VideoError::Invalid("frames must be at least 1".into()));
            }
            Ok((0..frames)
                .map(|i| (i as f64 + 0.5) * duration_s / frames as f64)
                .collect())
        }
        FrameSampling::Fps { fps, max_frames } => {
            if !(fps.is_finite() && fps > 0.0) || max_frames == 0 {
                return Err(VideoError::Invalid(
                    "fps must be positive and max_frames at least 1".into(),
                ));
            }
            let n = ((duration_s * fps).floor() as usize).clamp(1, max_frames);
            Ok((0..n)
                .map(|i| ((i as f64 + 0.5) / fps).min(duration_s))
                .collect())
        }
    }
}

/// For each instant, the index of the frame shown at that time, given frame timestamps sorted
/// ascending.
pub fn frame_for_instants(frame_times: &[f64], instants: &[f64]) -> Vec<usize> {
    instants
        .iter()
        .map(
            |&t| match frame_times.partition_point(|&ft| ft <= t + 1e-9) {
                0 => 0,
                k => k - 1,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_takes_segment_centres() {
        let t = sample_timestamps(&FrameSampling::Uniform { frames: 4 }, 8.0).unwrap();
        assert_eq!(t, vec![1.0, 3.0, 5.0, 7.0]);
        let t = sample_timestamps(&FrameSampling::Uniform { frames: 1 }, 10.0).unwrap();
        assert_eq!(t, vec![5.0]);
    }

    #[test]
    fn short_videos_repeat_frames() {
        // 1 s at 2 fps (frames at 0.0 and 0.5) sampled with 8 instants -> repeats.
        let inst = sample_timestamps(&FrameSampling::Uniform { frames: 8 }, 1.0).unwrap();
        let idx = frame_for_instants(&[0.0, 0.5], &inst);
        assert_eq!(idx, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        // One-frame video.
        assert_eq!(frame_for_instants(&[0.0], &inst), vec![0; 8]);
    }

    #[test]
    fn fps_sampling_is_capped() {
        let t = sample_timestamps(
            &FrameSampling::Fps {
                fps: 1.0,
                max_frames: 3,
            },
            10.0,
        )
        .unwrap();
        assert_eq!(t, vec![0.5, 1.5, 2.5]);
        let t = sample_timestamps(
            &FrameSampling::Fps {
                fps: 2.0,
                max_frames: 100,
            },
            1.0,
        )
        .unwrap();
        assert_eq!(t, vec![0.25, 0.75]);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(sample_timestamps(&FrameSampling::Uniform { frames: 0 }, 1.0).is_err());
        assert!(sample_timestamps(&FrameSampling::Uniform { frames: 4 }, 0.0).is_err());
        assert!(sample_timestamps(&FrameSampling::Uniform { frames: 4 }, f64::NAN).is_err());
        assert!(sample_timestamps(
            &FrameSampling::Fps {
                fps: 0.0,
                max_frames: 4
            },
            1.0
        )
        .is_err());
    }

    #[test]
    fn instants_map_to_the_frame_on_screen() {
        let times: Vec<f64> = (0..10).map(|i| i as f64 * 0.1).collect();
        assert_eq!(
            frame_for_instants(&times, &[0.05, 0.1, 0.95, 5.0]),
            vec![0, 1, 9, 9]
        );
    }
}
