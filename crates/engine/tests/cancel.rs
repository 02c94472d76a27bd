//! Cancellation reaches every stage: a request cancelled before it starts stops at the first
//! vision layer (it used to run the whole tower and prefill, noticing only at the first token),
//! and one cancelled mid-decode stops there. Uses the committed suite-s checkpoint.

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use vvlm_cost::FlopCounter;
use vvlm_engine::{
    EngineError, FinishReason, GenerateRequest, LoadOptions, SamplingParams, VideoVlm,
};

fn model() -> VideoVlm {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ladder/suite-s");
    VideoVlm::load(&dir, &LoadOptions::default()).unwrap()
}

#[test]
fn cancellation_stops_vision_prefill_and_decode() {
    let vlm = model();
    let size = vlm.cfg.vision_config.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (8, 3, size, size), &Device::Cpu).unwrap();
    let sampling = SamplingParams {
        max_tokens: 16,
        ..Default::default()
    };
    let req = |cancel| GenerateRequest {
        pixels: Some(&pixels),
        side: 4,
        system: None,
        prompt: "what colour is the background ?",
        history: &[],
        form: &vvlm_engine::PromptForm::Chat,
        sampling: sampling.clone(),
        cancel,
    };
    // A full run, for scale; its streamed pieces add up to its text.
    let full = FlopCounter::new();
    let mut streamed = String::new();
    let g = vlm
        .generate(&req(None), &full, &mut |p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(streamed, g.text);
    let full = full.snapshot();
    assert!(full.vision > 0.0 && full.lm_prefill > 0.0);

    // Cancelled before it starts: nothing past the patch embedding runs.
    let flag = AtomicBool::new(true);
    let flops = FlopCounter::new();
    let r = vlm.generate(&req(Some(&flag)), &flops, &mut |_| true);
    assert!(matches!(r, Err(EngineError::Cancelled)), "{r:?}");
    let got = flops.snapshot();
    assert!(got.vision < 0.2 * full.vision, "{got:?} vs {full:?}");
    assert_eq!((got.lm_prefill, got.lm_decode), (0.0, 0.0), "{got:?}");

    // Cancelled after the first piece of text: decode stops there.
    let flag = AtomicBool::new(false);
    let flops = FlopCounter::new();
    let g = vlm
        .generate(&req(Some(&flag)), &flops, &mut |_| {
            flag.store(true, Ordering::Relaxed);
            true
        })
        .map(|g| g.finish_reason);
    assert!(
        matches!(
            g,
            Ok(FinishReason::Cancelled) | Err(EngineError::Cancelled) | Ok(FinishReason::Stop)
        ),
        "{g:?}"
    );
    // The flag was set with the first piece, before any decode step: none ran.
    assert_eq!(flops.snapshot().lm_decode, 0.0);
    assert!(full.lm_decode > 0.0, "the full run decoded: {full:?}");
}
