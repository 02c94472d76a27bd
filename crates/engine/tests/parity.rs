//! Parity with PyTorch/transformers on the tiny random LLaVA-OneVision fixture
//! (tests/fixtures/tiny-llava-onevision, made by transformers 5.23 in f32). Tolerance: max abs
//! error <= 1e-4 on every intermediate and on the logits.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use vvlm_cost::{FlopCounter, Workload};
use vvlm_engine::{LoadOptions, VideoVlm};

mod common;
use common::{fixture, inputs, max_abs, reference};

const TOL: f32 = 1e-4;

fn load(dir: &str) -> VideoVlm {
    VideoVlm::load(&fixture().join(dir), &LoadOptions::default()).unwrap()
}

#[test]
fn every_intermediate_matches_transformers_in_both_key_layouts() {
    let r = reference();
    let (pixels, ids) = inputs(&r);
    for dir in ["model", "model_hubformat"] {
        let m = load(dir);
        let flops = FlopCounter::new();
        let out = m
            .debug_forward(&pixels, &ids, m.cfg.default_side(), &flops)
            .unwrap();
        let mut compared = 0;
        for (name, want) in &r {
            if name.starts_with("input.")
                || name.starts_with("generate.")
                || name.contains("_s") && !name.starts_with("vision.")
            {
                continue;
            }
            let Some(got) = out.get(name) else { continue };
            // The fixture keeps a leading batch dim of 1 on text tensors.
            let got = if got.rank() + 1 == want.rank() {
                got.unsqueeze(0).unwrap()
            } else {
                got.clone()
            };
            let want = if want.rank() + 1 == got.rank() {
                want.unsqueeze(0).unwrap()
            } else {
                want.clone()
            };
            let err = max_abs(&got, &want);
            assert!(err <= TOL, "{dir}: {name} max abs err {err}");
            compared += 1;
        }
        for must in [
            "vision.patch_conv_out",
            "vision.embeddings",
            "vision.layer0.self_attn.q_proj",
            "vision.layer0.mlp.fc2",
            "vision.layer_out.0",
            "vision.layer_out.1",
            "projector.linear_1_out",
            "projector.out",
            "pooled",
            "video_features",
            "text.inputs_embeds",
            "text.layer0.self_attn.k_proj",
            "text.layer0.mlp.down_proj",
            "text.layer_out.1",
            "text.final_norm_out",
            "logits",
            "rope.inv_freq",
        ] {
            assert!(
                out.contains_key(must) && r.contains_key(must),
                "{must} not compared"
            );
        }
        assert!(compared >= 30, "{dir}: only {compared} tensors compared");
    }
}

#[test]
fn other_tokens_per_frame_match_transformers() {
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let m = load("model");
    for s in [1usize, 3, 5] {
        let flops = FlopCounter::new();
        let out = m.debug_forward(&pixels, &ids, s, &flops).unwrap();
        let e = max_abs(&out["pooled"], &r[&format!("pooled_s{s}")]);
        assert!(e <= TOL, "pooled_s{s}: {e}");
        let e = max_abs(&out["logits"], &r[&format!("logits_s{s}")]);
        assert!(e <= TOL, "logits_s{s}: {e}");
    }
}

#[test]
fn greedy_generation_matches_transformers_step_by_step() {
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let m = load("model");
    let want: Vec<u32> = r["generate.greedy_new_tokens"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let step_logits = r["generate.step_logits"].squeeze(0).unwrap();
    let flops = FlopCounter::new();
    let mut ctx = vvlm_engine::Ctx::new(&flops, vvlm_cost::Component::LmPrefill);
    let (prefix, _, suffix) = m.split_placeholder(&ids).unwrap();
    let video = m
        .encode_video(&pixels, m.cfg.default_side(), &mut ctx)
        .unwrap();
    let embeds = m.input_embeddings(prefix, Some(&video), suffix).unwrap();
    let mut cache = m.lm.new_cache();
    let h = m.lm.forward_hidden(&embeds, &mut cache, &mut ctx).unwrap();
    let mut logits = m.lm.last_logits(&h, &ctx).unwrap();
    let mut got = vec![];
    ctx.component = vvlm_cost::Component::LmDecode;
    for step in 0..want.len() {
        let e = max_abs(&logits, &step_logits.get(step).unwrap());
        assert!(e <= TOL, "decode step {step}: logits max abs err {e}");
        let next = vvlm_engine::llama::argmax(&logits).unwrap();
        got.push(next);
        let emb = m.lm.embed(&[next]).unwrap();
        let h = m.lm.forward_hidden(&emb, &mut cache, &mut ctx).unwrap();
        logits = m.lm.last_logits(&h, &ctx).unwrap();
    }
    assert_eq!(got, want);
    // Measured FLOPs equal the exact analytic count for what ran (8 decode passes here).
    let w = Workload {
        frames: 4,
        tokens_per_frame: 16,
        text_tokens: prefix.len() + suffix.len(),
        decode_steps: want.len(),
    };
    let exact = m.arch().flops(&w);
    let measured = flops.snapshot();
    assert_eq!(measured, exact, "measured {measured:?} vs exact {exact:?}");
}

#[test]
fn measured_flops_equal_the_analytic_count_for_debug_forward() {
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let m = load("model");
    for s in [1usize, 4, 7] {
        let flops = FlopCounter::new();
        let out = m.debug_forward(&pixels, &ids, s, &flops).unwrap();
        let len = out["logits"].dim(1).unwrap();
        let arch = m.arch();
        let mut exact = arch.flops(&Workload {
            frames: 4,
            tokens_per_frame: s * s,
            text_tokens: 9,
            decode_steps: 0,
        });
        // debug_forward runs the LM head on every position, not just the last.
        exact.lm_prefill += 2.0 * (len - 1) as f64 * 64.0 * 512.0;
        assert_eq!(flops.snapshot(), exact, "s = {s}");
    }
}

#[test]
fn bad_checkpoints_and_inputs_are_clear_errors() {
    let tmp = std::env::temp_dir().join(format!("vvlm-bad-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let e = VideoVlm::load(&tmp, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(fixture().join("model/config.json"), tmp.join("config.json")).unwrap();
    let e = VideoVlm::load(&tmp, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("safetensors"), "{e}");
    // Wrong shape: a safetensors file whose projector has the wrong width.
    let mut ts =
        candle_core::safetensors::load(fixture().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    ts.insert(
        "multi_modal_projector.linear_1.weight".into(),
        Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&ts, tmp.join("model.safetensors")).unwrap();
    let e = VideoVlm::load(&tmp, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();

    let m = load("model");
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let flops = FlopCounter::new();
    assert!(m.debug_forward(&pixels, &ids, 0, &flops).is_err());
    assert!(m.debug_forward(&pixels, &ids, 8, &flops).is_err());
    assert!(m.debug_forward(&pixels, &[1, 2, 3], 4, &flops).is_err());
    let wrong = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(m.debug_forward(&wrong, &ids, 4, &flops).is_err());
}

/// Qwen2 as the LM (QKV biases, untied head, plain RoPE), as LLaVA-OneVision's public
/// checkpoints use it: logits from transformers on the same inputs (fixture made by
/// scripts/make-qwen2-fixture.py).
#[test]
fn qwen2_language_model_matches_transformers() {
    let dir = fixture().join("../tiny-llava-onevision-qwen2");
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let (pixels, ids) = inputs(&r);
    let m = VideoVlm::load(&dir, &LoadOptions::default()).unwrap();
    assert!(m.cfg.text_config.qkv_bias());
    let flops = FlopCounter::new();
    let out = m
        .debug_forward(&pixels, &ids, m.cfg.default_side(), &flops)
        .unwrap();
    let e = max_abs(&out["logits"], &r["logits"]);
    assert!(e <= TOL, "qwen2 logits max abs err {e}");
}

/// A checkpoint sharded into two safetensors files with an index loads to the same logits.
#[test]
fn sharded_checkpoints_with_an_index_load() {
    let src = fixture().join("model");
    let dir = std::env::temp_dir().join(format!("vvlm-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in all {
        let file = if k.starts_with("vision_tower") {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), serde_json::Value::String(file.into()));
        if file.contains("00001") {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let m = VideoVlm::load(&dir, &LoadOptions::default()).unwrap();
    let out = m
        .debug_forward(&pixels, &ids, m.cfg.default_side(), &FlopCounter::new())
        .unwrap();
    assert!(max_abs(&out["logits"], &r["logits"]) <= TOL);
    std::fs::remove_dir_all(&dir).ok();
}

/// bf16 and f16 on the CPU take the engine's non-f32 paths (unfused attention with an additive
/// mask, SwiGLU and GELU through candle ops, pooling through f32, RMSNorm in f32), the same
/// code a GPU runs. Against transformers' f32 logits: within 5% of the logits' range, and the
/// same next token at the last position.
#[test]
fn half_precision_paths_track_transformers() {
    let r = reference();
    let (pixels, ids) = inputs(&r);
    let want = &r["logits"];
    let range = want.max_all().unwrap().to_scalar::<f32>().unwrap()
        - want.min_all().unwrap().to_scalar::<f32>().unwrap();
    let last = |t: &Tensor| {
        let t = t.to_dtype(DType::F32).unwrap().flatten_to(1).unwrap();
        let n = t.dim(0).unwrap();
        t.get(n - 1)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    for dtype in [DType::BF16, DType::F16] {
        let m = VideoVlm::load(
            &fixture().join("model"),
            &LoadOptions {
                device: Device::Cpu,
                dtype,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let flops = FlopCounter::new();
        let out = m
            .debug_forward(&pixels, &ids, m.cfg.default_side(), &flops)
            .unwrap();
        let got = out["logits"].unsqueeze(0).unwrap();
        let got = if got.rank() > want.rank() {
            got.squeeze(0).unwrap()
        } else {
            got
        };
        let e = max_abs(&got, want);
        eprintln!("{dtype:?}: max abs logit error {e} (range {range})");
        assert!(
            e <= 0.05 * range,
            "{dtype:?}: max abs {e}, logits range {range}"
        );
        assert_eq!(last(&got), last(want), "{dtype:?}: next token differs");
    }
}
