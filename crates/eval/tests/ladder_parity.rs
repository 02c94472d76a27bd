//! What was trained is what is served: for a suite video and question, vvlm's logits (its video
//! decoder, sampling, preprocessing, template, tokenizer, tower, projector, pooling, newline and
//! LM) equal the training code's PyTorch forward pass on the same checkpoint, in f32, at several
//! (x_T, s). The golden logits come from `python -m vvlm_train.train golden` (training/), run on
//! frames that vvlm decoded; see tests/fixtures/suite-ladder/golden.json.

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use vvlm_cost::FlopCounter;
use vvlm_engine::{LoadOptions, VideoVlm};
use vvlm_video::MediaPolicy;

/// Max abs error allowed between vvlm's and PyTorch's f32 logits.
const TOLERANCE: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Golden {
    meta: serde_json::Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn golden() -> Golden {
    let dir = root().join("tests/fixtures/suite-ladder");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    Golden { meta, tensors }
}

fn configs(meta: &serde_json::Value) -> Vec<(usize, usize)> {
    meta["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[0].as_u64().unwrap() as usize,
                c[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn load(meta: &serde_json::Value) -> VideoVlm {
    let ckpt = root().join(meta["checkpoint"].as_str().unwrap());
    VideoVlm::load(&ckpt, &LoadOptions::default()).unwrap()
}

fn video(meta: &serde_json::Value) -> PathBuf {
    root()
        .join("tests/fixtures/suite-ladder")
        .join(meta["video_file"].as_str().unwrap())
}

/// PyTorch's last-position logits at (frames, side) and their log-sum-exp, in f64.
fn reference_last_position(g: &Golden, frames: usize, side: usize) -> (Vec<f32>, f64) {
    let want = &g.tensors[&format!("logits_T{frames}_s{side}")];
    let last: Vec<f32> = want
        .get(want.dim(0).unwrap() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = last.iter().copied().fold(f32::MIN, f32::max) as f64;
    let lse = max
        + last
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    (last, lse)
}

#[test]
fn served_logits_equal_the_training_forward_pass() {
    let g = golden();
    let vlm = load(&g.meta);
    let question = g.meta["item"]["question"].as_str().unwrap();
    let (prefix, suffix) = vlm.prompt_ids(None, question).unwrap();
    let want_ids: Vec<i64> = g.tensors["question_ids"].to_vec1().unwrap();
    let got_ids: Vec<i64> = prefix.iter().chain(&suffix).map(|&i| i as i64).collect();
    assert_eq!(got_ids, want_ids, "prompt tokens differ from training's");
    let size = vlm.cfg.vision_config.image_size;
    let cfgs = configs(&g.meta);
    assert!(cfgs.len() >= 3);
    for (frames, side) in cfgs {
        let (pixels, _) =
            vvlm_eval::load_pixels(&video(&g.meta), frames, size, &MediaPolicy::default()).unwrap();
        let mut ids = prefix.clone();
        ids.push(vlm.cfg.video_token_index);
        ids.extend_from_slice(&suffix);
        let taps = vlm
            .debug_forward(&pixels, &ids, side, &FlopCounter::new())
            .unwrap();
        let got = taps["logits"].squeeze(0).unwrap();
        let want = &g.tensors[&format!("logits_T{frames}_s{side}")];
        assert_eq!(got.dims(), want.dims(), "T={frames} s={side}");
        let diff = vvlm_engine::nn::max_abs_diff(&got, want).unwrap();
        let range = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("T={frames} s={side}: max |diff| {diff:.2e} (logits up to {range:.2})");
        assert!(
            diff <= TOLERANCE,
            "T={frames} s={side}: max |diff| {diff} > {TOLERANCE}"
        );
    }
}

#[test]
fn choice_log_likelihoods_are_the_log_softmax_of_the_last_position() {
    let g = golden();
    let vlm = load(&g.meta);
    let item: vvlm_suite::Item = serde_json::from_value(g.meta["item"].clone()).unwrap();
    let (frames, side) = configs(&g.meta)[0];
    let size = vlm.cfg.vision_config.image_size;
    let (pixels, _) =
        vvlm_eval::load_pixels(&video(&g.meta), frames, size, &MediaPolicy::default()).unwrap();
    let ll = vlm
        .choice_log_likelihoods(
            &pixels,
            side,
            &item.question,
            &item.choices,
            &FlopCounter::new(),
        )
        .unwrap();
    // The reference: log-softmax of PyTorch's last-position logits, computed here in f64.
    let (last, lse) = reference_last_position(&g, frames, side);
    let tok = vlm.tokenizer.as_ref().unwrap();
    for (c, got) in item.choices.iter().zip(&ll) {
        let id = tok.token_to_id(c).unwrap() as usize;
        let reference = last[id] as f64 - lse;
        assert!((got - reference).abs() < 1e-4, "{c}: {got} vs {reference}");
    }
}

#[test]
fn generated_logprobs_are_the_log_softmax_of_the_reference_logits() {
    // The first generated token's reported logprob and top alternatives against PyTorch's
    // last-position logits (log-softmax computed here in f64), through `generate_visual`: the
    // path the server takes.
    let g = golden();
    let vlm = load(&g.meta);
    let question = g.meta["item"]["question"].as_str().unwrap();
    let (frames, side) = configs(&g.meta)[0];
    let size = vlm.cfg.vision_config.image_size;
    let (pixels, _) =
        vvlm_eval::load_pixels(&video(&g.meta), frames, size, &MediaPolicy::default()).unwrap();
    let values: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
    let req = vvlm_engine::GenerateRequest {
        pixels: None,
        side,
        system: None,
        prompt: question,
        history: &[],
        form: &vvlm_engine::PromptForm::Chat,
        sampling: vvlm_engine::SamplingParams {
            max_tokens: 2,
            logprobs: Some(3),
            ..Default::default()
        },
        cancel: None,
    };
    let frames_data = vvlm_engine::FrameData {
        pixels: &values,
        frames,
        size,
    };
    let (mut all, features) = vlm
        .generate_visual(
            vvlm_engine::VisualInput::Frames(frames_data),
            &req,
            2,
            &FlopCounter::new(),
            &mut |_, _| true,
        )
        .unwrap();
    // The features of the encoded frames come back for a cache, and answer the same from it,
    // with no vision FLOPs spent.
    let features = features.unwrap();
    assert_eq!(features.frames(), frames);
    let flops = FlopCounter::new();
    let (again, none) = vlm
        .generate_visual(
            vvlm_engine::VisualInput::Features(&features),
            &req,
            1,
            &flops,
            &mut |_, _| true,
        )
        .unwrap();
    assert!(none.is_none());
    assert_eq!(again[0].token_ids, all[0].token_ids);
    assert_eq!(again[0].logprobs, all[0].logprobs);
    assert_eq!(flops.snapshot().vision, 0.0);
    assert_eq!(flops.snapshot().projector, 0.0);
    assert!(flops.snapshot().lm_prefill > 0.0);
    // Two completions of one encoded video: greedy, so the same.
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].token_ids, all[1].token_ids);
    let out = all.swap_remove(0);
    assert!(!out.logprobs.is_empty());
    let (last, lse) = reference_last_position(&g, frames, side);
    let first = &out.logprobs[0];
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    // Greedy: the chosen token is the reference's argmax.
    assert_eq!(first.chosen.token_id as usize, order[0]);
    assert!((first.chosen.logprob - (last[order[0]] as f64 - lse)).abs() < 1e-4);
    assert_eq!(first.top.len(), 3);
    for (t, &id) in first.top.iter().zip(&order) {
        assert_eq!(t.token_id as usize, id);
        assert!((t.logprob - (last[id] as f64 - lse)).abs() < 1e-4);
    }
    assert_eq!(out.logprobs.len(), out.token_ids.len());
}
