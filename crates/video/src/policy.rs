//! The media policy: byte, pixel, duration, frame and time caps (all configuration).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MediaPolicy {
    /// Largest upload, bytes.
    pub max_bytes: u64,
    /// Longest video, seconds.
    pub max_duration_s: f64,
    /// Largest frame, width * height.
    pub max_pixels_per_frame: u64,
    /// Largest side of a frame, pixels.
    pub max_side: u32,
    /// Most frames a request may sample.
    pub max_sampled_frames: usize,
    /// Most frames the decoder may decode for one request (bounds sequential decode work).
    pub max_decoded_frames: u64,
    /// Wall-clock limit for decoding one request, seconds.
    pub decode_timeout_s: f64,
    /// Most still images a request may send as frames.
    pub max_images: usize,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            max_duration_s: 3.0 * 3600.0,
            max_pixels_per_frame: 3840 * 2160,
            max_side: 8192,
            max_sampled_frames: 256,
            max_decoded_frames: 200_000,
            decode_timeout_s: 60.0,
            max_images: 256,
        }
    }
}
