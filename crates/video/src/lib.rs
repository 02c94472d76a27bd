//! Video ingestion: probe a container, sample `x_T` frames uniformly over its duration, decode
//! only what is needed (seeking where cheaper, sequential decode where seeking fails), apply the
//! stream's rotation, and preprocess for the SigLIP vision tower. Everything is bounded by a
//! [`MediaPolicy`], and every failure is a typed [`VideoError`], never a panic.
//!
//! Owns ffmpeg (through video-rs's re-export of ffmpeg-next) and image decoding. Must not know
//! about tensors, models, HTTP or budgets: it hands back `f32` pixels in `[T, 3, H, W]` order.

mod decode;
mod policy;
mod preprocess;
mod sampling;

pub use decode::{decode_bytes, decode_path, probe_path, Probe, SampledFrame, SampledVideo};
pub use policy::MediaPolicy;
pub use preprocess::{frames_from_images, preprocess_rgb, Preprocess};
pub use sampling::{frame_for_instants, sample_timestamps, FrameSampling};

/// Everything that can go wrong with user media. The server maps these to 4xx.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("the upload is empty (0 bytes)")]
    Empty,
    #[error("not a video file: {0}")]
    NotAVideo(String),
    #[error("the container has no video stream")]
    NoVideoStream,
    #[error("unsupported codec `{0}`")]
    UnsupportedCodec(String),
    #[error("corrupt or truncated stream: {0}")]
    Corrupt(String),
    #[error("invalid duration: {0}")]
    BadDuration(String),
    #[error("{what} is {value}, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: String,
        limit: String,
    },
    #[error("decoding took longer than {0:.1} s")]
    Timeout(f64),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not an image: {0}")]
    NotAnImage(String),
    #[error("i/o error: {0}")]
    Io(String),
}

/// Initialises ffmpeg once (quiet logging).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = video_rs::ffmpeg::init();
        video_rs::ffmpeg::util::log::set_level(video_rs::ffmpeg::util::log::Level::Fatal);
    });
}
