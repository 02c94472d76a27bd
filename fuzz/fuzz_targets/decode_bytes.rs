//! Fuzzes the upload entry point: arbitrary bytes must give frames or a typed error, never a
//! panic, a hang past the policy's timeout or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vvlm_video::{decode_bytes, FrameSampling, MediaPolicy, Preprocess};

fuzz_target!(|data: &[u8]| {
    let policy = MediaPolicy {
        max_bytes: 1 << 20,
        max_duration_s: 600.0,
        max_pixels_per_frame: 1 << 20,
        max_side: 4096,
        max_sampled_frames: 8,
        max_decoded_frames: 2_000,
        decode_timeout_s: 5.0,
        max_images: 4,
    };
    let pre = Preprocess { size: 32, ..Default::default() };
    let _ = decode_bytes(data, &FrameSampling::Uniform { frames: 4 }, &policy, &pre);
});
