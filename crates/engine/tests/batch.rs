//! Continuous batching against one-at-a-time generation on real weights (SmolLM2-135M from
//! GGUF, decode on its quantized matrices; and the suite ladder's f32 checkpoint with video):
//! sequences joining and leaving a running batch (greedy, and sampled with log-probabilities)
//! produce the same tokens, the same text and the same FLOPs as each run alone; a cancelled sequence leaves at the next step and the
//! others go on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vvlm_cost::FlopCounter;
use vvlm_engine::batch::{Batch, Join, Priority};
use vvlm_engine::{GenerateRequest, Generation, LoadOptions, PromptForm, SamplingParams, VideoVlm};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> Arc<VideoVlm> {
    let gguf = root().join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "run models/fetch-smollm2.sh (scripts/test does)"
    );
    // One directory per call: tests run in parallel threads of one process, and one test must
    // not load the checkpoint while another rewrites or removes it.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vvlm-batch-{}-{call}", std::process::id()));
    vvlm_engine::demo::write_demo_checkpoint(
        &dir,
        &gguf,
        &vvlm_engine::demo::demo_vision_config(),
        0,
    )
    .unwrap();
    let m = VideoVlm::load(&dir, &LoadOptions::default()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    Arc::new(m)
}

const PROMPTS: [(&str, usize); 5] = [
    ("What is the capital of France?", 12),
    ("Name three colours.", 20),
    ("Write one sentence about the sea.", 16),
    ("What is 2 + 2?", 6),
    ("Say hello in Spanish.", 10),
];

/// The suite ladder's middle rung (f32, no quantized matrices) and 4 frames of a deterministic
/// pattern (`modulus` varies it): (model, pixels, frames, size).
fn suite_m_with_frames(modulus: usize) -> (Arc<VideoVlm>, Vec<f32>, usize, usize) {
    let ckpt = root().join("models/ladder/suite-m");
    let m = Arc::new(VideoVlm::load(&ckpt, &LoadOptions::default()).unwrap());
    let size = m.cfg.vision_config.image_size;
    let frames = 4;
    let half = (modulus as f32) / 2.0;
    let pixels = (0..frames * 3 * size * size)
        .map(|i| ((i * 7919) % modulus) as f32 / half - 1.0)
        .collect();
    (m, pixels, frames, size)
}

fn sampling(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

/// A text prompt generated alone (no system message, no history).
fn text(
    m: &VideoVlm,
    prompt: &str,
    sampling: SamplingParams,
) -> Result<Generation, vvlm_engine::EngineError> {
    text_counted(m, prompt, &PromptForm::Chat, sampling, &FlopCounter::new())
}

/// [`text`], counted in `flops`, the prompt read as `form` says.
fn text_counted(
    m: &VideoVlm,
    prompt: &str,
    form: &PromptForm,
    sampling: SamplingParams,
    flops: &FlopCounter,
) -> Result<Generation, vvlm_engine::EngineError> {
    let req = GenerateRequest {
        pixels: None,
        side: 1,
        system: None,
        prompt,
        history: &[],
        form,
        sampling,
        cancel: None,
    };
    m.generate(&req, flops, &mut |_| true)
}

/// How prompt `i` is decoded: greedy, except prompts 1 and 3, drawn at a temperature with a
/// nucleus and their log-probabilities reported (a batch draws those in parallel); prompt 3
/// also with top-k, min-p and every penalty, prompt 2 greedy with a repetition penalty (which
/// reads its prompt), prompt 4 in JSON mode, prompt 0 held to a choice.
fn prompt_sampling(i: usize) -> SamplingParams {
    let n = PROMPTS[i].1;
    match i {
        1 | 3 => SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 7 + i as u64,
            logprobs: Some(2),
            ..if i == 3 {
                SamplingParams {
                    top_k: 20,
                    min_p: 0.02,
                    penalties: vvlm_engine::generate::Penalties {
                        frequency: 0.4,
                        presence: 0.3,
                        repetition: 1.2,
                        logit_bias: vec![(5, 2.0), (17, -3.0)],
                    },
                    ..sampling(n)
                }
            } else {
                sampling(n)
            }
        },
        2 => SamplingParams {
            penalties: vvlm_engine::generate::Penalties {
                repetition: 1.3,
                ..Default::default()
            },
            ..sampling(n)
        },
        4 => SamplingParams {
            response_format: vvlm_engine::ResponseFormat::JsonObject,
            ..sampling(n)
        },
        0 => SamplingParams {
            response_format: vvlm_engine::ResponseFormat::Choice(vec![
                "Paris".into(),
                "Lyon".into(),
                "The capital of France is Paris.".into(),
            ]),
            ..sampling(n)
        },
        _ => sampling(n),
    }
}

/// Each prompt alone: its generation and its FLOPs.
fn alone(m: &VideoVlm) -> Vec<(Generation, vvlm_cost::FlopBreakdown)> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            let flops = FlopCounter::new();
            let req = GenerateRequest {
                pixels: None,
                side: 1,
                system: None,
                prompt: p,
                history: &[],
                form: &PromptForm::Chat,
                sampling: prompt_sampling(i),
                cancel: None,
            };
            let g = m.generate(&req, &flops, &mut |_| true).unwrap();
            (g, flops.snapshot())
        })
        .collect()
}

fn join(m: &Arc<VideoVlm>, i: usize, flops: &Arc<FlopCounter>, cancel: &Arc<AtomicBool>) -> Join {
    Join {
        vlm: m.clone(),
        system: None,
        prompt: PROMPTS[i].0.to_string(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: prompt_sampling(i),
        flops: flops.clone(),
        cancel: cancel.clone(),
        priority: Priority::Interactive,
    }
}

/// The penalties act on a real model's choice: a bias of −100 on the greedy first token moves
/// it; +100 on one token makes every greedy token that one; a presence penalty beyond any logit
/// gap leaves no token repeated, and a repetition penalty changes an answer that repeats itself.
#[test]
fn logit_bias_and_penalties_steer_a_real_models_tokens() {
    let m = smollm2();
    let run = |s: SamplingParams| text(&m, "Count from one to twenty in words.", s).unwrap();
    let plain = run(sampling(24));
    let first = plain.token_ids[0];
    let avoided = run(SamplingParams {
        penalties: vvlm_engine::generate::Penalties {
            logit_bias: vec![(first, -100.0)],
            ..Default::default()
        },
        ..sampling(24)
    });
    assert_ne!(avoided.token_ids[0], first);
    let forced = run(SamplingParams {
        penalties: vvlm_engine::generate::Penalties {
            logit_bias: vec![(1234, 100.0)],
            ..Default::default()
        },
        ..sampling(8)
    });
    assert_eq!(forced.token_ids, vec![1234; 8]);
    // The greedy answer repeats tokens (it counts in digits: "1234567891012..."); a presence
    // penalty larger than any logit gap repeats none, and a frequency penalty as large makes
    // each of its repeats rarer than the answer's own.
    let repeats = |g: &Generation| {
        let mut ids = g.token_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        g.token_ids.len() - ids.len()
    };
    assert!(repeats(&plain) > 0, "{:?}", plain.text);
    let penalised = run(SamplingParams {
        penalties: vvlm_engine::generate::Penalties {
            presence: 1000.0,
            ..Default::default()
        },
        ..sampling(24)
    });
    assert_eq!(repeats(&penalised), 0, "{:?}", penalised.text);
    let repeated = run(SamplingParams {
        penalties: vvlm_engine::generate::Penalties {
            repetition: 1.5,
            ..Default::default()
        },
        ..sampling(24)
    });
    assert_ne!(repeated.token_ids, plain.token_ids, "{:?}", repeated.text);
}

/// JSON mode on a real model: greedy and sampled answers (which would not be JSON unasked)
/// are one JSON object that stops when complete.
#[test]
fn json_mode_answers_one_json_object() {
    let m = smollm2();
    let run = |prompt: &str, s: SamplingParams| text(&m, prompt, s).unwrap();
    let json = |temperature: f64, seed: u64| SamplingParams {
        max_tokens: 96,
        temperature,
        seed,
        response_format: vvlm_engine::ResponseFormat::JsonObject,
        ..Default::default()
    };
    let plain = run("What is the capital of France?", sampling(24));
    assert!(serde_json::from_str::<serde_json::Value>(&plain.text).is_err());
    for (prompt, temperature, seed) in [
        ("What is the capital of France?", 0.0, 0),
        (
            "Describe a cat as JSON with keys name, colour and age.",
            0.0,
            0,
        ),
        (
            "Describe a cat as JSON with keys name, colour and age.",
            0.9,
            5,
        ),
    ] {
        let g = run(prompt, json(temperature, seed));
        let v: serde_json::Value = serde_json::from_str(&g.text)
            .unwrap_or_else(|e| panic!("{prompt:?} at {temperature}: {e}: {:?}", g.text));
        assert!(v.is_object(), "{:?}", g.text);
        assert_eq!(
            g.finish_reason,
            vvlm_engine::FinishReason::Stop,
            "{:?}",
            g.text
        );
    }
}

/// A choice on a real model: the answer is exactly one of the strings, greedy or sampled,
/// whatever the model would have said; a choice its tokens cannot spell is known before.
#[test]
fn a_guided_choice_answers_exactly_one_of_its_strings() {
    let m = smollm2();
    let choices = vec!["yes".to_string(), "no".into(), "not sure".into()];
    for (prompt, temperature, seed) in [
        ("Is Paris in France?", 0.0, 0),
        ("Is the sea made of cheese?", 0.0, 0),
        ("Is Paris in France?", 1.2, 9),
    ] {
        let format = vvlm_engine::ResponseFormat::Choice(choices.clone());
        let g = text(
            &m,
            prompt,
            SamplingParams {
                max_tokens: 16,
                temperature,
                seed,
                response_format: format,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(choices.contains(&g.text), "{prompt:?}: {:?}", g.text);
        assert_eq!(g.finish_reason, vvlm_engine::FinishReason::Stop);
    }
    assert!(m.can_write("not sure") && m.can_write("Ünïcødé 漢字"));
}

/// A JSON Schema on a real model: greedy and sampled answers parse and hold to it (checked here
/// by hand: the keys, each value's type, the enum, the item counts, the required keys).
#[test]
fn a_json_schema_answer_holds_to_the_schema() {
    let m = smollm2();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "caption": {"type": "string"},
            "animals": {"type": "array", "items": {"enum": ["cat", "dog", "bird"]}, "minItems": 1, "maxItems": 3},
            "count": {"type": "integer"},
            "indoors": {"type": "boolean"}
        },
        "required": ["caption", "animals", "count", "indoors"],
        "additionalProperties": false
    });
    for (temperature, seed) in [(0.0, 0), (0.7, 3), (0.7, 11)] {
        let format = vvlm_engine::ResponseFormat::JsonSchema(schema.clone());
        let g = text(
            &m,
            "Describe a photo of two cats sleeping on a sofa.",
            SamplingParams {
                max_tokens: 200,
                temperature,
                top_p: 0.9,
                seed,
                response_format: format,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            g.finish_reason,
            vvlm_engine::FinishReason::Stop,
            "{:?}",
            g.text
        );
        let v: serde_json::Value = serde_json::from_str(&g.text).unwrap();
        let o = v.as_object().unwrap();
        let mut keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["animals", "caption", "count", "indoors"],
            "{:?}",
            g.text
        );
        assert!(o["caption"].is_string() && o["indoors"].is_boolean());
        assert!(o["count"].is_i64() || o["count"].is_u64(), "{:?}", g.text);
        let animals = o["animals"].as_array().unwrap();
        assert!((1..=3).contains(&animals.len()), "{:?}", g.text);
        assert!(animals
            .iter()
            .all(|a| ["cat", "dog", "bird"].contains(&a.as_str().unwrap_or(""))));
    }
    // As Pydantic writes a nested model and an optional field: `$defs`/`$ref`, `anyOf` with
    // null, titles and defaults.
    let nested = serde_json::json!({
        "$defs": {"Animal": {"title": "Animal", "type": "object", "properties": {
            "kind": {"enum": ["cat", "dog"], "title": "Kind", "type": "string"},
            "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}},
            "required": ["kind", "age"]}},
        "title": "Photo", "type": "object",
        "properties": {"animals": {"type": "array", "items": {"$ref": "#/$defs/Animal"}, "minItems": 1, "maxItems": 2},
                       "place": {"type": ["string", "null"]}},
        "required": ["animals", "place"]
    });
    let g = text(
        &m,
        "Describe a photo of two cats sleeping on a sofa.",
        SamplingParams {
            max_tokens: 200,
            response_format: vvlm_engine::ResponseFormat::JsonSchema(nested),
            ..Default::default()
        },
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&g.text).unwrap();
    let animals = v["animals"].as_array().unwrap();
    assert!((1..=2).contains(&animals.len()), "{:?}", g.text);
    for a in animals {
        assert!(
            ["cat", "dog"].contains(&a["kind"].as_str().unwrap()),
            "{:?}",
            g.text
        );
        assert!(
            a["age"].is_null() || a["age"].is_i64() || a["age"].is_u64(),
            "{:?}",
            g.text
        );
    }
    assert!(
        v["place"].is_null() || v["place"].is_string(),
        "{:?}",
        g.text
    );
    // A schema sent again is the one compiled before (its masks known); the checkpoint keeps
    // the most recent few.
    let again = m.compiled_schema(&schema).unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &again,
        &m.compiled_schema(&schema).unwrap()
    ));
    for i in 0..vvlm_engine::json_schema::SCHEMAS_KEPT {
        m.compiled_schema(&serde_json::json!({"const": i})).unwrap();
    }
    assert!(!std::sync::Arc::ptr_eq(
        &again,
        &m.compiled_schema(&schema).unwrap()
    ));
    // A schema outside the subset is a request error before any work.
    let bad = serde_json::json!({"type": "string", "pattern": "a+"});
    let e = text(
        &m,
        "hi",
        SamplingParams {
            response_format: vvlm_engine::ResponseFormat::JsonSchema(bad),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("`pattern`"), "{e}");
}

#[test]
fn batched_decode_equals_one_at_a_time_across_joins_and_leaves() {
    let m = smollm2();
    let reference = alone(&m);
    let mut batch = Batch::default();
    let counters: Vec<Arc<FlopCounter>> = (0..5).map(|_| Arc::new(FlopCounter::new())).collect();
    let cancels: Vec<Arc<AtomicBool>> = (0..5).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let mut streamed: BTreeMap<u64, String> = BTreeMap::new();
    let mut done: BTreeMap<u64, Generation> = BTreeMap::new();
    let mut max_batch = 0;
    // Two start together; two join after 3 steps; the last after 8 (others have left by then).
    let schedule: [(usize, &[usize]); 3] = [(0, &[0, 1]), (3, &[2, 3]), (8, &[4])];
    let mut step = 0;
    while done.len() < 5 {
        for (at, who) in schedule {
            if at == step {
                for &i in who {
                    batch
                        .join(i as u64, join(&m, i, &counters[i], &cancels[i]), None, None)
                        .unwrap();
                }
            }
        }
        max_batch = max_batch.max(batch.len());
        // Every cache is allocated once, at what admission reserves for its sequence.
        assert_eq!(batch.allocated_tokens(), batch.reserved_tokens());
        for (tag, r) in batch.step(&mut |tag, piece| {
            streamed.entry(tag).or_default().push_str(piece);
            true
        }) {
            done.insert(tag, r.unwrap());
        }
        step += 1;
        assert!(step < 200, "the batch did not finish");
    }
    assert!(max_batch >= 4, "at most {max_batch} ran together");
    for (i, (want, want_flops)) in reference.iter().enumerate() {
        let got = &done[&(i as u64)];
        assert_eq!(got.token_ids, want.token_ids, "prompt {i}: tokens differ");
        assert_eq!(got.text, want.text);
        assert_eq!(
            streamed[&(i as u64)],
            want.text,
            "prompt {i}: streamed text"
        );
        assert_eq!(got.finish_reason, want.finish_reason);
        assert_eq!(got.logprobs, want.logprobs, "prompt {i}: log-probabilities");
        assert_eq!(got.logprobs.is_empty(), i % 2 == 0);
        // Each request is charged exactly what it would be alone.
        assert_eq!(counters[i].snapshot(), *want_flops, "prompt {i}: FLOPs");
    }
    assert!(batch.is_empty());
}

/// Batch lines yield decode steps to interactive requests: with `rows` background rows beside
/// an interactive sequence, every step advances the interactive one and `rows` background ones,
/// taken in turn; the interactive one leaves at the step it would alone (it never waits), the
/// background ones (four of the same answer) leave within a step of each other (none is starved
/// for another), all
/// step again once it has left, and every answer and every FLOP count equals the sequence's
/// alone.
#[test]
fn background_sequences_take_turns_beside_an_interactive_one() {
    let m = smollm2();
    let reference = alone(&m);
    let (interactive, background) = (2usize, 1usize);
    let run_waiting = |rows: Option<usize>, max_wait: Option<u64>, with_background: bool| {
        let mut batch = Batch::default();
        if let Some(r) = rows {
            batch.set_background_rows(r);
        }
        if let Some(w) = max_wait {
            batch.set_background_max_wait(w);
        }
        let mut joined: Vec<(u64, usize, Arc<FlopCounter>)> = vec![];
        let mut add = |batch: &mut Batch, tag: u64, prompt: usize, priority: Priority| {
            let f = Arc::new(FlopCounter::new());
            let c = Arc::new(AtomicBool::new(false));
            let j = Join {
                priority,
                ..join(&m, prompt, &f, &c)
            };
            batch.join(tag, j, None, None).unwrap();
            joined.push((tag, prompt, f));
        };
        add(&mut batch, 0, interactive, Priority::Interactive);
        if with_background {
            for tag in 1..=4 {
                add(&mut batch, tag, background, Priority::Background);
            }
        }
        let mut left_at: BTreeMap<u64, usize> = BTreeMap::new();
        let mut sizes = vec![];
        let mut step = 0;
        while !batch.is_empty() {
            step += 1;
            for (tag, r) in batch.step(&mut |_, _| true) {
                let g = r.unwrap();
                let prompt = joined.iter().find(|j| j.0 == tag).unwrap().1;
                assert_eq!(g.token_ids, reference[prompt].0.token_ids, "tag {tag}");
                assert_eq!(g.logprobs, reference[prompt].0.logprobs, "tag {tag}");
                left_at.insert(tag, step);
            }
            sizes.extend(batch.take_step_sizes());
            assert!(step < 400, "the batch did not finish");
        }
        for (tag, prompt, f) in &joined {
            assert_eq!(f.snapshot(), reference[*prompt].1, "tag {tag}: FLOPs");
        }
        (left_at, sizes)
    };
    let run = |rows: Option<usize>, with_background: bool| run_waiting(rows, None, with_background);
    let (alone_left, _) = run(None, false);
    let steps_alone = alone_left[&0];
    assert!(
        steps_alone >= 12,
        "the interactive sequence is too short to test waits"
    );
    // Without priority every sequence steps every step.
    let (_, sizes) = run(None, true);
    assert_eq!(sizes[0], 5);
    for rows in [0usize, 1, 2] {
        let (left_at, sizes) = run(Some(rows), true);
        assert_eq!(
            left_at[&0], steps_alone,
            "rows {rows}: the interactive one waited"
        );
        // While it ran, each step advanced it and `rows` background sequences (its last step,
        // where it left, included); after, the four together until they leave.
        assert!(
            sizes[..steps_alone].iter().all(|&s| s == 1 + rows),
            "rows {rows}: {sizes:?}"
        );
        assert_eq!(sizes[steps_alone], 4, "rows {rows}: {sizes:?}");
        let leaves: Vec<usize> = (1..=4).map(|t| left_at[&t]).collect();
        let spread = leaves.iter().max().unwrap() - leaves.iter().min().unwrap();
        // The same answer from each: advanced in turn, their counts differ by one at most.
        assert!(spread <= 1, "rows {rows}: background left at {leaves:?}");
    }
    // No background sequence waits more than its bound, even with no rows beside: with 0 rows
    // and a bound of 3 steps the four (joined together) wait 3 steps, advance beside the
    // interactive one, wait 3 again, ... (without the bound they would wait until it left).
    let (left_at, sizes) = run_waiting(Some(0), Some(3), true);
    assert_eq!(left_at[&0], steps_alone, "the interactive one waited");
    for (i, &size) in sizes[..steps_alone].iter().enumerate() {
        let expect = if i % 4 == 3 { 5 } else { 1 };
        assert_eq!(size, expect, "step {i}: {sizes:?}");
    }
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_go_on() {
    let m = smollm2();
    let reference = alone(&m);
    let mut batch = Batch::default();
    let counters: Vec<Arc<FlopCounter>> = (0..3).map(|_| Arc::new(FlopCounter::new())).collect();
    let cancels: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    for i in 0..3 {
        batch
            .join(i as u64, join(&m, i, &counters[i], &cancels[i]), None, None)
            .unwrap();
    }
    let mut results = BTreeMap::new();
    let mut step = 0;
    while !batch.is_empty() {
        if step == 2 {
            cancels[1].store(true, Ordering::Relaxed);
        }
        for (tag, r) in batch.step(&mut |_, _| true) {
            results.insert(tag, r);
        }
        if step == 2 {
            // It left at this step: the batch holds the other two.
            assert_eq!(batch.len(), 2);
        }
        step += 1;
    }
    assert!(matches!(
        results[&1],
        Err(vvlm_engine::EngineError::Cancelled)
    ));
    // Charged only for what ran: less than the full generation.
    assert!(counters[1].snapshot().lm_decode < reference[1].1.lm_decode);
    for i in [0u64, 2] {
        let g = results[&i].as_ref().unwrap();
        assert_eq!(g.token_ids, reference[i as usize].0.token_ids);
    }
    // A client that stops reading cancels its sequence too.
    let c = Arc::new(AtomicBool::new(false));
    let f = Arc::new(FlopCounter::new());
    batch.join(9, join(&m, 1, &f, &c), None, None).unwrap();
    let mut left = vec![];
    while !batch.is_empty() {
        left.extend(batch.step(&mut |_, _| false));
    }
    let (_, r) = &left[0];
    assert_eq!(
        r.as_ref().unwrap().finish_reason,
        vvlm_engine::FinishReason::Cancelled
    );
}

#[test]
fn a_video_joining_a_running_batch_is_encoded_between_their_decode_steps() {
    // The demo checkpoint's tower sees 729 patches a frame, more than a prefill chunk (512):
    // one frame a pass. With a zero encode quantum the running sequences take a decode step
    // after every layer of every pass (4 layers), between passes, and once at the end.
    let m = smollm2();
    let (frames, size) = (3, m.cfg.vision_config.image_size);
    assert_eq!(m.frames_per_pass(frames), 1);
    let pixels: Vec<f32> = (0..frames * 3 * size * size)
        .map(|i| ((i * 7919) % 251) as f32 / 125.5 - 1.0)
        .collect();
    let visual = vvlm_engine::VisualInput::Frames(vvlm_engine::FrameData {
        pixels: &pixels,
        frames,
        size,
    });
    let reference = alone(&m);
    // The video in one pass, nothing else running; and a question about it alone.
    let (whole, whole_features) = m
        .encode_visual(visual, 2, &FlopCounter::new(), None)
        .unwrap();
    let question = "Describe the video.";
    let alone_flops = FlopCounter::new();
    let req = GenerateRequest {
        pixels: None,
        side: 2,
        system: None,
        prompt: question,
        history: &[],
        form: &PromptForm::Chat,
        sampling: sampling(8),
        cancel: None,
    };
    let (want, _) = m
        .generate_visual(visual, &req, 1, &alone_flops, &mut |_, _| true)
        .unwrap();

    // Prompts 0 (greedy) and 3 (sampled) run; the video is encoded while they do.
    let mut batch = Batch::default();
    batch.set_encode_quantum(std::time::Duration::ZERO);
    let counters: Vec<Arc<FlopCounter>> = (0..5).map(|_| Arc::new(FlopCounter::new())).collect();
    let cancel = Arc::new(AtomicBool::new(false));
    for i in [0, 3] {
        batch
            .join(i as u64, join(&m, i, &counters[i], &cancel), None, None)
            .unwrap();
    }
    // And a story, long enough to decode through the whole encoding.
    let story = "Write a long story about a lighthouse keeper.";
    let story_alone = m
        .generate(
            &GenerateRequest {
                pixels: None,
                side: 1,
                system: None,
                prompt: story,
                history: &[],
                form: &PromptForm::Chat,
                sampling: sampling(40),
                cancel: None,
            },
            &FlopCounter::new(),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(story_alone.token_ids.len(), 40, "the story ended early");
    let story_join = Join {
        vlm: m.clone(),
        system: None,
        prompt: story.to_string(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: sampling(40),
        flops: Arc::new(FlopCounter::new()),
        cancel: cancel.clone(),
        priority: Priority::Interactive,
    };
    batch.join(7, story_join, None, None).unwrap();
    let mut streamed: BTreeMap<u64, usize> = BTreeMap::new();
    let mut done: BTreeMap<u64, Generation> = BTreeMap::new();
    for (t, r) in batch.step(&mut |_, _| true) {
        done.insert(t, r.unwrap());
    }
    let video_flops = Arc::new(FlopCounter::new());
    let mut left = vec![];
    let before = counters[0].snapshot().lm_decode;
    let steps_before = batch.steps();
    batch.take_step_sizes();
    let (tokens, features) = batch
        .encode_stepping(
            &m,
            visual,
            2,
            &video_flops,
            None,
            Priority::Interactive,
            &mut |tag, _| {
                *streamed.entry(tag).or_default() += 1;
                true
            },
            &mut left,
        )
        .unwrap();
    // The running sequences took decode steps between the frames' passes...
    assert!(
        counters[0].snapshot().lm_decode > before,
        "no decode step ran during the encoding"
    );
    assert!(streamed.get(&0).is_some_and(|&n| n >= 1), "{streamed:?}");
    let layers = m.cfg.vision_config.num_hidden_layers as u64;
    assert_eq!(
        batch.steps() - steps_before,
        frames as u64 * layers + (frames as u64 - 1) + 1
    );
    // Each of those steps' sizes is reported (the server's batch-size metric observes them).
    let sizes = batch.take_step_sizes();
    assert_eq!(sizes.len() as u64, batch.steps() - steps_before);
    assert!(sizes.iter().all(|&n| (1..=3).contains(&n)), "{sizes:?}");
    assert_eq!(sizes[0], 3);
    for (t, r) in left {
        done.insert(t, r.unwrap());
    }
    // ...and the encoding equals the one-pass encoding bit for bit, FLOPs included.
    let (tokens, whole) = (tokens.unwrap(), whole.unwrap());
    assert_eq!(
        tokens.tokens().to_vec2::<f32>().unwrap(),
        whole.tokens().to_vec2::<f32>().unwrap()
    );
    assert_eq!(video_flops.snapshot().vision, alone_flops.snapshot().vision);
    let full = m.grid();
    let pooled = |f: &vvlm_engine::VisionFeatures| {
        let (t, _) = m
            .encode_visual(
                vvlm_engine::VisualInput::Features(f),
                full,
                &FlopCounter::new(),
                None,
            )
            .unwrap();
        t.unwrap().tokens().to_vec2::<f32>().unwrap()
    };
    assert_eq!(pooled(&features.unwrap()), pooled(&whole_features.unwrap()));
    // The question joins with it and answers as alone; so do the others.
    let j = Join {
        vlm: m.clone(),
        system: None,
        prompt: question.to_string(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: sampling(8),
        flops: video_flops.clone(),
        cancel: cancel.clone(),
        priority: Priority::Interactive,
    };
    batch.join(9, j, Some(&tokens), None).unwrap();
    while !batch.is_empty() {
        for (t, r) in batch.step(&mut |_, _| true) {
            done.insert(t, r.unwrap());
        }
    }
    assert_eq!(done[&9].token_ids, want[0].token_ids);
    assert_eq!(done[&7].token_ids, story_alone.token_ids);
    assert_eq!(video_flops.snapshot(), alone_flops.snapshot());
    for i in [0usize, 3] {
        let got = &done[&(i as u64)];
        assert_eq!(got.token_ids, reference[i].0.token_ids, "prompt {i}");
        assert_eq!(got.logprobs, reference[i].0.logprobs, "prompt {i}");
        assert_eq!(counters[i].snapshot(), reference[i].1, "prompt {i}: FLOPs");
    }
}

#[test]
fn videos_in_a_batch_answer_as_alone() {
    // The suite ladder (f32, no quantized matrices) with a video: encoded once, two questions
    // in one batch, each equal to its own generation.
    let (m, pixels, frames, size) = suite_m_with_frames(255);
    let visual = vvlm_engine::VisualInput::Frames(vvlm_engine::FrameData {
        pixels: &pixels,
        frames,
        size,
    });
    let questions = ["what colour is the flash ?", "what shape moves ?"];
    let mut reference = vec![];
    for q in questions {
        let f = FlopCounter::new();
        let req = GenerateRequest {
            pixels: None,
            side: 2,
            system: None,
            prompt: q,
            history: &[],
            form: &PromptForm::Chat,
            sampling: sampling(5),
            cancel: None,
        };
        let (g, _) = m
            .generate_visual(visual, &req, 1, &f, &mut |_, _| true)
            .unwrap();
        reference.push(g[0].token_ids.clone());
    }
    let flops = Arc::new(FlopCounter::new());
    let (tokens, features) = m.encode_visual(visual, 2, &flops, None).unwrap();
    assert!(features.is_some());
    let vision = flops.snapshot().vision;
    assert!(vision > 0.0);
    let mut batch = Batch::default();
    for (i, q) in questions.iter().enumerate() {
        let j = Join {
            vlm: m.clone(),
            system: None,
            prompt: q.to_string(),
            history: vec![],
            form: PromptForm::Chat,
            sampling: sampling(5),
            flops: flops.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
            priority: Priority::Interactive,
        };
        batch.join(i as u64, j, tokens.as_ref(), None).unwrap();
    }
    let mut out = BTreeMap::new();
    while !batch.is_empty() {
        for (t, r) in batch.step(&mut |_, _| true) {
            out.insert(t, r.unwrap().token_ids);
        }
    }
    assert_eq!(out[&0], reference[0]);
    assert_eq!(out[&1], reference[1]);
    // The video was encoded once for both.
    assert_eq!(flops.snapshot().vision, vision);
}

#[test]
fn a_follow_up_continues_from_the_prefix_kv_and_answers_as_cold() {
    // The suite ladder with a video encoded once. Question 1 prefills [text before the video +
    // visual tokens] and returns that KV; question 2 continuing from it answers token for token
    // as question 2 cold, prefills only its own tokens, and leaves the prefix as it was.
    let (m, pixels, frames, size) = suite_m_with_frames(251);
    let visual = vvlm_engine::VisualInput::Frames(vvlm_engine::FrameData {
        pixels: &pixels,
        frames,
        size,
    });
    let (tokens, _) = m
        .encode_visual(visual, 2, &FlopCounter::new(), None)
        .unwrap();
    let tokens = tokens.unwrap();
    let run = |q: &str, system: Option<&str>, prefix: Option<&vvlm_engine::PrefixKv>| {
        let flops = Arc::new(FlopCounter::new());
        let mut batch = Batch::default();
        let j = Join {
            vlm: m.clone(),
            system: system.map(str::to_string),
            prompt: q.to_string(),
            history: vec![],
            form: PromptForm::Chat,
            sampling: sampling(6),
            flops: flops.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
            priority: Priority::Interactive,
        };
        let made = batch.join(0, j, Some(&tokens), prefix).unwrap();
        // Continuing from a prefix too, the cache is allocated once at the reservation.
        assert_eq!(batch.allocated_tokens(), batch.reserved_tokens());
        let mut out = None;
        while !batch.is_empty() {
            for (_, r) in batch.step(&mut |_, _| true) {
                out = Some(r.unwrap());
            }
        }
        (out.unwrap(), flops.snapshot(), made)
    };
    let (_, q1_cold, made) = run("what colour is the flash ?", None, None);
    let prefix = made.expect("a cold question with a video returns its prefix");
    assert!(
        prefix.tokens() > 2 * 2 * frames,
        "{} tokens",
        prefix.tokens()
    );
    assert!(prefix.bytes() > 0);
    let (cold, f_cold, _) = run("what shape moves ?", None, None);
    let (warm, f_warm, again) = run("what shape moves ?", None, Some(&prefix));
    assert!(again.is_none(), "a hit makes no new prefix");
    assert_eq!(warm.token_ids, cold.token_ids);
    assert_eq!(cold.cached_tokens, 0);
    assert_eq!(warm.cached_tokens, prefix.tokens());
    assert_eq!(warm.prompt_tokens, cold.prompt_tokens);
    assert!(f_warm.lm_prefill < f_cold.lm_prefill);
    assert_eq!(f_warm.lm_decode, f_cold.lm_decode);
    // The same prefix saved the same for either question.
    let (_, q1_warm, _) = run("what colour is the flash ?", None, Some(&prefix));
    let saved = |a: f64, b: f64| a - b;
    let (s1, s2) = (
        saved(q1_cold.lm_prefill, q1_warm.lm_prefill),
        saved(f_cold.lm_prefill, f_warm.lm_prefill),
    );
    assert!((s1 - s2).abs() <= 1e-9 * s1, "{s1} vs {s2}");
    // Used twice: the prefix was not written into.
    let (warm2, _, _) = run("what shape moves ?", None, Some(&prefix));
    assert_eq!(warm2.token_ids, cold.token_ids);
    // A system prompt answers as its own cold run whether or not its text before the video
    // matches (this checkpoint's template may place it elsewhere).
    let (sys_cold, _, _) = run("what shape moves ?", Some("Be brief."), None);
    let (sys, _, _) = run("what shape moves ?", Some("Be brief."), Some(&prefix));
    assert_eq!(sys.token_ids, sys_cold.token_ids);
    // Another video's tokens never continue from this prefix.
    let other_pixels: Vec<f32> = pixels.iter().map(|p| -p).collect();
    let other = vvlm_engine::VisualInput::Frames(vvlm_engine::FrameData {
        pixels: &other_pixels,
        frames,
        size,
    });
    let (other_tokens, _) = m
        .encode_visual(other, 2, &FlopCounter::new(), None)
        .unwrap();
    let other_tokens = other_tokens.unwrap();
    let mut batch = Batch::default();
    let j = Join {
        vlm: m.clone(),
        system: None,
        prompt: "what shape moves ?".into(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: sampling(6),
        flops: Arc::new(FlopCounter::new()),
        cancel: Arc::new(AtomicBool::new(false)),
        priority: Priority::Interactive,
    };
    let made = batch
        .join(0, j, Some(&other_tokens), Some(&prefix))
        .unwrap();
    assert!(made.is_some(), "a miss prefills and returns its own prefix");
    assert_eq!(batch.allocated_tokens(), batch.reserved_tokens());
    while !batch.is_empty() {
        for (_, r) in batch.step(&mut |_, _| true) {
            assert_eq!(r.unwrap().cached_tokens, 0);
        }
    }
}

#[test]
fn a_long_prefill_is_chunked_and_the_batch_decodes_between_chunks() {
    // Chunks of 8 prompt tokens: sequences already decoding take steps while another's
    // ~30-token prompt is prefilled, and all answer as they do alone (alone, the prompt is
    // chunked the same way: the chunks depend on the prompt, not on what else runs).
    let gguf = root().join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = std::env::temp_dir().join(format!("vvlm-chunk-{}", std::process::id()));
    vvlm_engine::demo::write_demo_checkpoint(
        &dir,
        &gguf,
        &vvlm_engine::demo::demo_vision_config(),
        0,
    )
    .unwrap();
    let opts = LoadOptions {
        prefill_chunk: 8,
        ..LoadOptions::default()
    };
    let m = Arc::new(VideoVlm::load(&dir, &opts).unwrap());
    std::fs::remove_dir_all(&dir).ok();
    let long = "Describe, in one short sentence, what a lighthouse keeper does at night.";
    let lone = |prompt: &str, n: usize| text(&m, prompt, sampling(n)).unwrap();
    let (first_alone, long_alone) = (lone(PROMPTS[0].0, 12), lone(long, 6));
    assert!(
        long_alone.prompt_tokens > 3 * 8,
        "{}",
        long_alone.prompt_tokens
    );

    // Two batch lines decode (one row a step beside an interactive sequence); the long prompt
    // is an interactive request's, so the steps between its chunks already give it priority.
    let mut batch = Batch::default();
    batch.set_background_rows(1);
    for tag in [0, 2] {
        let (f, c) = (
            Arc::new(FlopCounter::new()),
            Arc::new(AtomicBool::new(false)),
        );
        let j = Join {
            priority: Priority::Background,
            ..join(&m, 0, &f, &c)
        };
        batch.join(tag, j, None, None).unwrap();
    }
    batch.step(&mut |_, _| true);
    assert_eq!(batch.take_step_sizes(), [2]);
    let mut streamed: BTreeMap<u64, usize> = BTreeMap::new();
    let mut left = vec![];
    let j = Join {
        vlm: m.clone(),
        system: None,
        prompt: long.to_string(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: sampling(6),
        flops: Arc::new(FlopCounter::new()),
        cancel: Arc::new(AtomicBool::new(false)),
        priority: Priority::Interactive,
    };
    batch
        .join_stepping(
            1,
            j,
            None,
            None,
            &mut |tag, _| {
                *streamed.entry(tag).or_default() += 1;
                true
            },
            &mut left,
        )
        .unwrap();
    // The lines decoded while the long prompt was prefilled chunk by chunk, one a step, in turn.
    let during: usize = streamed.values().sum();
    assert!(during >= 3, "{during} pieces streamed during the prefill");
    let sizes = batch.take_step_sizes();
    assert!(
        sizes.len() >= 3 && sizes.iter().all(|&s| s == 1),
        "{sizes:?}"
    );
    assert!(streamed.len() == 2, "{streamed:?}");
    let mut out = BTreeMap::new();
    for (t, r) in left {
        out.insert(t, r.unwrap());
    }
    while !batch.is_empty() {
        for (t, r) in batch.step(&mut |_, _| true) {
            out.insert(t, r.unwrap());
        }
    }
    assert_eq!(out[&0].token_ids, first_alone.token_ids);
    assert_eq!(out[&2].token_ids, first_alone.token_ids);
    assert_eq!(out[&1].token_ids, long_alone.token_ids);
}

/// A raw prompt's log-probabilities (`prompt_logprobs`), prefilled in chunks of 4 tokens,
/// against one unchunked forward over the same ids with the log-softmax computed here in f64:
/// every token after the first, its log-probability given the tokens before it and the top 3
/// there; the first token has none; the scoring's lm_head is counted as prefill.
#[test]
fn a_raw_prompts_log_probabilities_equal_an_unchunked_forward() {
    let ckpt = root().join("models/ladder/suite-m");
    let opts = LoadOptions {
        prefill_chunk: 4,
        ..LoadOptions::default()
    };
    let m = VideoVlm::load(&ckpt, &opts).unwrap();
    let prompt = "what color is the ball on the left of the box and what shape is it";
    let run = |prompt_logprobs: Option<usize>| {
        let flops = FlopCounter::new();
        let sampling = SamplingParams {
            max_tokens: 2,
            prompt_logprobs,
            ..Default::default()
        };
        let g = text_counted(&m, prompt, &PromptForm::Raw, sampling, &flops).unwrap();
        (g, flops.get(vvlm_cost::Component::LmPrefill))
    };
    let (g, scored_flops) = run(Some(3));
    let (plain, plain_flops) = run(None);
    assert!(plain.prompt_logprobs.is_empty());
    assert_eq!(g.text, plain.text, "scoring changes nothing generated");

    let ids = m.tokenize_raw(prompt).unwrap();
    assert!(
        ids.len() > 2 * 4,
        "{} tokens: more than two chunks",
        ids.len()
    );
    assert_eq!(g.prompt_logprobs.len(), ids.len());
    assert_eq!(g.prompt_logprobs[0].token_id, ids[0]);
    assert!(g.prompt_logprobs[0].logprobs.is_none());
    // The reference: all positions at once, log-softmax in f64.
    let embeds = m.lm.embed(&ids).unwrap();
    let flops = FlopCounter::new();
    let mut ctx = vvlm_engine::Ctx::new(&flops, vvlm_cost::Component::LmPrefill);
    let mut cache = m.lm.new_cache();
    let hidden = m.lm.forward_hidden(&embeds, &mut cache, &mut ctx).unwrap();
    let rows =
        m.lm.logits(&hidden, &ctx)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
    for (p, entry) in g.prompt_logprobs.iter().enumerate().skip(1) {
        let row = &rows[p - 1];
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let log_z = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let lp = entry.logprobs.as_ref().expect("after the first token");
        assert_eq!(entry.token_id, ids[p]);
        assert_eq!(lp.chosen.token_id, ids[p]);
        let want = row[ids[p] as usize] as f64 - log_z;
        assert!(
            (lp.chosen.logprob - want).abs() < 1e-4,
            "position {p}: {} vs {want}",
            lp.chosen.logprob
        );
        // The top 3, most likely first, each with its own log-probability.
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        assert_eq!(lp.top.len(), 3);
        for (t, &i) in lp.top.iter().zip(&order) {
            assert!(
                (t.logprob - (row[i] as f64 - log_z)).abs() < 1e-4,
                "position {p}"
            );
        }
        assert!(lp.top[0].logprob >= lp.top[1].logprob && lp.top[1].logprob >= lp.top[2].logprob);
    }
    // The lm_head over the prompt's positions but the last: counted as prefill.
    let cfg = &m.lm.cfg;
    let head = 2 * (ids.len() as u64 - 1) * (cfg.hidden_size * cfg.vocab_size) as u64;
    assert_eq!(scored_flops - plain_flops, head);
}

/// A completion's prompt given as token ids is the prompt those ids are: the same tokens, log-
/// probabilities and FLOPs as its text tokenized by the checkpoint's tokenizer.json (read here
/// with the tokenizers library, not through the engine). Ids outside the vocabulary and an
/// empty list are refused, naming the token.
#[test]
fn a_token_id_prompt_answers_as_its_text() {
    let ckpt = root().join("models/ladder/suite-m");
    let m = VideoVlm::load(&ckpt, &LoadOptions::default()).unwrap();
    let prompt = "what color is the ball on the left of the box";
    let ids = tokenizers::Tokenizer::from_file(ckpt.join("tokenizer.json"))
        .unwrap()
        .encode(prompt, true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.len() > 5, "{ids:?}");
    let run = |text: &str, form: &PromptForm| {
        let flops = FlopCounter::new();
        let sampling = SamplingParams {
            max_tokens: 4,
            prompt_logprobs: Some(2),
            logprobs: Some(2),
            ..Default::default()
        };
        let g = text_counted(&m, text, form, sampling, &flops).unwrap();
        (g, flops.snapshot())
    };
    let (by_text, text_flops) = run(prompt, &PromptForm::Raw);
    // The text is not read when ids are given.
    let (by_ids, ids_flops) = run("", &PromptForm::Tokens(ids.clone()));
    assert_eq!(by_ids.token_ids, by_text.token_ids);
    assert_eq!(by_ids.text, by_text.text);
    assert_eq!(by_ids.prompt_tokens, ids.len());
    let scored: Vec<u32> = by_ids.prompt_logprobs.iter().map(|t| t.token_id).collect();
    assert_eq!(scored, ids);
    for (a, b) in by_ids.prompt_logprobs.iter().zip(&by_text.prompt_logprobs) {
        assert_eq!(
            a.logprobs.as_ref().map(|l| l.chosen.logprob),
            b.logprobs.as_ref().map(|l| l.chosen.logprob)
        );
    }
    assert_eq!(ids_flops, text_flops);

    let vocab = m.cfg.text_config.vocab_size as u32;
    for (bad, says) in [
        (
            vec![ids[0], vocab],
            format!("token {vocab} (the prompt's token 1)"),
        ),
        (vec![], "no tokens".to_string()),
    ] {
        let e = text_counted(
            &m,
            prompt,
            &PromptForm::Tokens(bad),
            SamplingParams::default(),
            &FlopCounter::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&says), "{e}");
    }
}

/// `generate_visual` keeps a conversation's earlier messages: with no video it answers a
/// follow-up exactly as `generate` does (the same prompt tokens, the same greedy tokens), and
/// the history is in the prompt (more tokens than the last message alone).
#[test]
fn generate_visual_keeps_the_conversation() {
    use vvlm_engine::template::{Role, Turn};
    let m = VideoVlm::load(
        &root().join("models/ladder/suite-m"),
        &LoadOptions::default(),
    )
    .unwrap();
    let history = [
        Turn {
            role: Role::User,
            content: "what colour is the flash ?".into(),
        },
        Turn {
            role: Role::Assistant,
            content: "red .".into(),
        },
    ];
    let req = |history| GenerateRequest {
        pixels: None,
        side: 1,
        system: None,
        prompt: "which way does the object move ?",
        history,
        form: &PromptForm::Chat,
        sampling: SamplingParams {
            max_tokens: 4,
            ..Default::default()
        },
        cancel: None,
    };
    let flops = FlopCounter::new();
    let direct = m.generate(&req(&history), &flops, &mut |_| true).unwrap();
    let (visual, _) = m
        .generate_visual(
            vvlm_engine::VisualInput::None,
            &req(&history),
            1,
            &flops,
            &mut |_, _| true,
        )
        .unwrap();
    let last_alone = m.generate(&req(&[]), &flops, &mut |_| true).unwrap();
    assert!(direct.prompt_tokens > last_alone.prompt_tokens);
    assert_eq!(visual[0].prompt_tokens, direct.prompt_tokens);
    assert_eq!(visual[0].token_ids, direct.token_ids);
}

/// A sequence taken out of a running batch ([`Batch::suspend`]: its KV freed) and joined again
/// later ([`Batch::rejoin`]) continues where it was: every prompt (greedy, sampled with
/// log-probabilities and penalties, JSON mode, a choice) answers exactly as alone — tokens,
/// streamed text, log-probabilities bit for bit (so the rebuilt KV has its decode steps' bits)
/// — and is charged exactly what it costs alone; the recomputation (its prompt's prefill and
/// its generated tokens' KV) is counted apart. A long answer suspended after 70 tokens rebuilds
/// them in two passes of the row kernels (64 + 6). A cancelled-and-resumed sequence is not
/// needed here: the server cancels queued jobs before they rejoin.
#[test]
fn a_suspended_sequence_rejoins_and_answers_as_alone() {
    let m = smollm2();
    let reference = alone(&m);
    let story = "Write a long story about a lighthouse keeper.";
    let story_flops = FlopCounter::new();
    let story_alone =
        text_counted(&m, story, &PromptForm::Chat, sampling(90), &story_flops).unwrap();
    assert_eq!(story_alone.token_ids.len(), 90, "the story ended early");
    let mut batch = Batch::default();
    let counters: Vec<Arc<FlopCounter>> = (0..6).map(|_| Arc::new(FlopCounter::new())).collect();
    let cancels: Vec<Arc<AtomicBool>> = (0..6).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let story_join = |f: &Arc<FlopCounter>, c: &Arc<AtomicBool>| Join {
        prompt: story.to_string(),
        sampling: sampling(90),
        ..join(&m, 0, f, c)
    };
    for i in 0..5 {
        batch
            .join(i as u64, join(&m, i, &counters[i], &cancels[i]), None, None)
            .unwrap();
    }
    batch
        .join(5, story_join(&counters[5], &cancels[5]), None, None)
        .unwrap();
    let mut streamed: BTreeMap<u64, String> = BTreeMap::new();
    let mut done: BTreeMap<u64, Generation> = BTreeMap::new();
    let mut suspended = BTreeMap::new();
    let recompute = FlopCounter::new();
    let mut step = 0;
    while done.len() < 6 {
        // Prompts 1 to 4 leave after 2 steps and come back 3 steps later; the story leaves
        // after 70 and comes back at once.
        let leave: &[u64] = match step {
            2 => &[1, 2, 3, 4],
            70 => &[5],
            _ => &[],
        };
        for &tag in leave {
            if let Some(s) = batch.suspend(tag) {
                suspended.insert(tag, s);
            }
        }
        let back: &[u64] = match step {
            5 => &[1, 2, 3, 4],
            70 => &[5],
            _ => &[],
        };
        for &tag in back {
            let Some(s) = suspended.remove(&tag) else {
                continue;
            };
            let i = tag as usize;
            let j = if i == 5 {
                story_join(&counters[i], &cancels[i])
            } else {
                join(&m, i, &counters[i], &cancels[i])
            };
            let mut left = vec![];
            batch
                .rejoin(
                    tag,
                    j,
                    s,
                    &recompute,
                    None,
                    None,
                    &mut |tag, piece| {
                        streamed.entry(tag).or_default().push_str(piece);
                        true
                    },
                    &mut left,
                )
                .unwrap();
            for (t, r) in left {
                done.insert(t, r.unwrap());
            }
        }
        for (tag, r) in batch.step(&mut |tag, piece| {
            streamed.entry(tag).or_default().push_str(piece);
            true
        }) {
            done.insert(tag, r.unwrap());
        }
        step += 1;
        assert!(step < 300, "the batch did not finish");
    }
    assert!(suspended.is_empty(), "{:?}", suspended.keys());
    let wants = reference
        .iter()
        .map(|(g, f)| (g, *f))
        .chain([(&story_alone, story_flops.snapshot())]);
    for (i, (want, want_flops)) in wants.enumerate() {
        let got = &done[&(i as u64)];
        assert_eq!(got.token_ids, want.token_ids, "prompt {i}: tokens differ");
        assert_eq!(got.text, want.text);
        assert_eq!(streamed[&(i as u64)], want.text, "prompt {i}: streamed");
        assert_eq!(got.finish_reason, want.finish_reason);
        assert_eq!(got.logprobs, want.logprobs, "prompt {i}: log-probabilities");
        assert_eq!(got.decode_steps, want.decode_steps, "prompt {i}");
        assert_eq!(counters[i].snapshot(), want_flops, "prompt {i}: FLOPs");
    }
    // The recomputation: the five prompts prefilled again, and the KV of the tokens they had.
    let r = recompute.snapshot();
    let prefilled: f64 = (1..5).map(|i| reference[i].1.lm_prefill).sum();
    assert_eq!(r.lm_prefill, prefilled + story_flops.snapshot().lm_prefill);
    assert!(r.lm_decode > 0.0, "{r:?}");
    assert!(batch.is_empty());
}

/// A sequence parked with its KV cache ([`Batch::park`]: a preemption for a place while memory
/// allows) rejoins at once and recomputes nothing, answering (tokens, streamed text,
/// log-probabilities) and charged exactly as alone; its owner's [`vvlm_engine::KeptKv`] counts
/// the cache's positions until the sequence claims it back. Released by the owner meanwhile (the
/// memory wanted elsewhere), the cache is rebuilt on rejoining, with the same answer.
#[test]
fn a_parked_sequence_rejoins_without_recomputing_unless_its_kv_was_released() {
    let m = smollm2();
    let reference = alone(&m);
    for release in [false, true] {
        let counters: Vec<Arc<FlopCounter>> =
            (0..2).map(|_| Arc::new(FlopCounter::new())).collect();
        let cancels: Vec<Arc<AtomicBool>> =
            (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let mut batch = Batch::default();
        for i in 0..2 {
            batch
                .join(i as u64, join(&m, i, &counters[i], &cancels[i]), None, None)
                .unwrap();
        }
        let mut streamed: BTreeMap<u64, String> = BTreeMap::new();
        let mut done: BTreeMap<u64, Generation> = BTreeMap::new();
        let mut step = |batch: &mut Batch, streamed: &mut BTreeMap<u64, String>| {
            for (tag, r) in batch.step(&mut |tag, piece| {
                streamed.entry(tag).or_default().push_str(piece);
                true
            }) {
                done.insert(tag, r.unwrap());
            }
        };
        for _ in 0..3 {
            step(&mut batch, &mut streamed);
        }
        let (mut parked, owner) = batch.park(1).unwrap();
        assert_eq!(batch.len(), 1);
        let positions = owner.positions();
        assert!(positions >= parked.generated(), "{positions}");
        assert_eq!(parked.kept_positions(), positions);
        for _ in 0..2 {
            step(&mut batch, &mut streamed);
        }
        if release {
            assert_eq!(owner.release(), positions);
            assert_eq!(parked.kept_positions(), 0);
        }
        assert_eq!(parked.claim_kept(), !release);
        assert_eq!(owner.positions(), 0, "claimed: out of the owner's reach");
        assert_eq!(owner.release(), 0);
        let recompute = FlopCounter::new();
        let mut left = vec![];
        batch
            .rejoin(
                1,
                join(&m, 1, &counters[1], &cancels[1]),
                parked,
                &recompute,
                None,
                None,
                &mut |tag, piece| {
                    streamed.entry(tag).or_default().push_str(piece);
                    true
                },
                &mut left,
            )
            .unwrap();
        assert!(left.is_empty());
        while !batch.is_empty() {
            step(&mut batch, &mut streamed);
        }
        let (want, want_flops) = &reference[1];
        let got = &done[&1];
        assert_eq!(got.token_ids, want.token_ids, "released {release}");
        assert_eq!(streamed[&1], want.text);
        assert_eq!(got.logprobs, want.logprobs);
        assert_eq!(counters[1].snapshot(), *want_flops);
        assert_eq!(done[&0].token_ids, reference[0].0.token_ids);
        let r = recompute.snapshot();
        if release {
            assert_eq!(r.lm_prefill, want_flops.lm_prefill, "{r:?}");
            assert!(r.lm_decode > 0.0, "{r:?}");
        } else {
            assert_eq!(r.total(), 0.0, "{r:?}");
        }
    }
}

/// The same on the suite ladder's f32 checkpoint with a video, where a prefill of more than a
/// few rows runs the matrix products as GEMMs (other bits than the decode kernels): a sampled
/// answer with log-probabilities, suspended after 24 tokens (its stop token biased away so it
/// runs on), rejoins and answers exactly as alone. Rebuilding the 24 tokens' KV with the
/// prefill's GEMMs instead of the row kernels changes the log-probabilities that follow.
#[test]
fn a_suspended_video_sequence_on_f32_weights_rejoins_as_alone() {
    let (m, pixels, frames, size) = suite_m_with_frames(253);
    let visual = vvlm_engine::VisualInput::Frames(vvlm_engine::FrameData {
        pixels: &pixels,
        frames,
        size,
    });
    let eos = m.cfg.text_config.eos_ids();
    assert!(!eos.is_empty());
    let params = SamplingParams {
        max_tokens: 40,
        temperature: 1.0,
        seed: 11,
        logprobs: Some(3),
        penalties: vvlm_engine::generate::Penalties {
            logit_bias: eos.iter().map(|&t| (t, -100.0)).collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    let question = "what happens in the video ?";
    let alone_flops = FlopCounter::new();
    let req = GenerateRequest {
        pixels: None,
        side: 2,
        system: None,
        prompt: question,
        history: &[],
        form: &PromptForm::Chat,
        sampling: params.clone(),
        cancel: None,
    };
    let (want, _) = m
        .generate_visual(visual, &req, 1, &alone_flops, &mut |_, _| true)
        .unwrap();
    let want = &want[0];
    assert_eq!(want.token_ids.len(), 40, "{:?}", want.text);
    let flops = Arc::new(FlopCounter::new());
    let (tokens, _) = m.encode_visual(visual, 2, &flops, None).unwrap();
    let tokens = tokens.unwrap();
    let j = || Join {
        vlm: m.clone(),
        system: None,
        prompt: question.to_string(),
        history: vec![],
        form: PromptForm::Chat,
        sampling: params.clone(),
        flops: flops.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        priority: Priority::Background,
    };
    let mut batch = Batch::default();
    batch.join(0, j(), Some(&tokens), None).unwrap();
    for _ in 0..24 {
        assert!(batch.step(&mut |_, _| true).is_empty());
    }
    let s = batch.suspend(0).unwrap();
    assert_eq!(s.generated(), 24);
    assert!(batch.is_empty());
    let recompute = FlopCounter::new();
    let mut left = vec![];
    batch
        .rejoin(
            0,
            j(),
            s,
            &recompute,
            Some(&tokens),
            None,
            &mut |_, _| true,
            &mut left,
        )
        .unwrap();
    assert!(left.is_empty());
    let mut got = None;
    while !batch.is_empty() {
        for (_, r) in batch.step(&mut |_, _| true) {
            got = Some(r.unwrap());
        }
    }
    let got = got.unwrap();
    assert_eq!(got.token_ids, want.token_ids);
    assert_eq!(got.text, want.text);
    assert_eq!(
        got.logprobs, want.logprobs,
        "log-probabilities after the rejoin"
    );
    assert_eq!(flops.snapshot(), alone_flops.snapshot(), "charged as alone");
    let r = recompute.snapshot();
    assert_eq!(r.lm_prefill, alone_flops.snapshot().lm_prefill);
    assert!(r.lm_decode > 0.0 && r.vision == 0.0, "{r:?}");
}
