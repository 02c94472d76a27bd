//! Our SigLIP preprocessing against transformers' image processor on a real 640x360 frame
//! (tests/fixtures/siglip-preprocess). Tolerances: equal (1e-6) to the PIL backend, whose
//! resampling we reproduce; within 1 uint8 level (2/255 after normalisation), mean <= 0.01
//! levels, of the default torchvision backend, which rounds a few pixels the other way.

use std::path::PathBuf;
use vvlm_video::{preprocess_rgb, Preprocess};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/siglip-preprocess")
}

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.shape(), &[1, 3, 384, 384]);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn matches_transformers_siglip_image_processor() {
    let img = image::open(fixture().join("frame.png")).unwrap().to_rgb8();
    let ours = preprocess_rgb(&img, &Preprocess::default());
    let level = 2.0 / 255.0;
    for (name, max_levels, mean_levels) in
        [("pixel_values", 1.0, 0.01), ("pixel_values_pil", 0.0, 0.0)]
    {
        let want = reference(name);
        assert_eq!(ours.len(), want.len());
        let diffs: Vec<f32> = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().copied().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let over1 = diffs.iter().filter(|d| **d > 1.0 * level + 1e-6).count();
        let over2 = diffs.iter().filter(|d| **d > 2.0 * level + 1e-6).count();
        let worst = diffs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        eprintln!(
            "{name}: max {:.2} levels at {worst} (ours {}, theirs {}), mean {:.3} levels, >1 level {over1}, >2 levels {over2}",
            max / level, ours[worst], want[worst], mean / level
        );
        assert!(
            max <= max_levels * level + 1e-6,
            "{name}: max abs diff {max} ({} levels)",
            max / level
        );
        assert!(
            mean <= mean_levels * level + 1e-7,
            "{name}: mean abs diff {mean} ({} levels)",
            mean / level
        );
    }
}
