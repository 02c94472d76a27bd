//! The tiny LLaVA-OneVision fixture shared by the parity tests (CPU and GPU).
#![allow(dead_code)] // each test crate uses a different subset

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The repository root: `VVLM_REPO_ROOT` when set (a test binary carried to another machine,
/// `scripts/gpu-run`, where the build's path does not exist), else the one it was built in.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("VVLM_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

pub fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/tiny-llava-onevision")
}

/// transformers' inputs, intermediates and logits.
pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's pixels `[T, 3, H, W]` and input ids.
pub fn inputs(r: &HashMap<String, Tensor>) -> (Tensor, Vec<u32>) {
    let pixels = r["input.pixel_values_videos"].squeeze(0).unwrap();
    let ids: Vec<u32> = r["input.input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    (pixels, ids)
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    vvlm_engine::nn::max_abs_diff(a, b).unwrap()
}

/// A tensor's values as f32, for element-by-element comparisons.
pub fn values_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("an f32-convertible tensor")
}
