//! The math commands as a user runs them: `vvlm cost`, `fit`, `frontier`, `elasticity`, `plan`.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vvlm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vvlm"))
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn json(args: &[&str]) -> Value {
    let (ok, out, err) = vvlm(args);
    assert!(ok, "vvlm {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn cost_prints_theoretical_and_exact_by_component() {
    // Table 6, 7.5B at 30 TFLOPs: (16, 81) -> 2*16*(0.43e9*768 + 7.5e9*81) = 3.0008e13.
    let v = json(&[
        "cost",
        "--lm-params",
        "7.5e9",
        "--frames",
        "16",
        "--tokens-per-frame",
        "81",
        "--json",
    ]);
    let t = v["theoretical_flops"].as_f64().unwrap();
    assert!((t / 30e12 - 1.0).abs() < 0.05, "{t}");
    assert!((t - 2.0 * 16.0 * (0.43e9 * 768.0 + 7.5e9 * 81.0)).abs() < 1e3);
    let v = json(&[
        "cost",
        "--lm-params",
        "7.5B",
        "--frames",
        "4",
        "--tokens-per-frame",
        "16",
        "--checkpoint",
        "tests/fixtures/tiny-llava-onevision/model",
        "--text-tokens",
        "9",
        "--json",
    ]);
    // By hand from the fixture's config.json (2 FLOPs per multiply-add):
    // vision: 98 px / patch 14 = 7x7 = 49 patches, hidden 64, MLP 128, 2 layers, 3 channels:
    //   patch embedding 2*49*(3*14*14)*64 = 3,687,936; per layer q,k,v,o 2*49*64*64*4 =
    //   1,605,632 + scores and AV 2*49*49*64*2 = 614,656 + MLP 2*49*64*128*2 = 1,605,632;
    //   frame = 3,687,936 + 2*3,825,920 = 11,339,776; 4 frames = 45,359,104.
    // projector 64 -> 64 -> 64 on all 49 patches: 2*(64*64 + 64*64) * 49 * 4 = 3,211,264.
    // LM: hidden 64, 4 heads x 16, 2 KV heads, MLP 128, 2 layers, vocab 512; prefill of
    //   9 text + 4*16 visual + 1 newline = 74 tokens: linear 74 * 2*2*(64*64 + 2*64*32 +
    //   64*64 + 3*64*128) = 10,911,744; causal attention over the 74*75/2 = 2,775 visible
    //   (query, key) pairs 2*2*2*2775*64 = 1,420,800; head for the last position 2*64*512 =
    //   65,536: 12,398,080. No decode asked.
    let exact = &v["exact"];
    assert_eq!(exact["vision"].as_f64(), Some(45_359_104.0));
    assert_eq!(exact["projector"].as_f64(), Some(3_211_264.0));
    assert_eq!(exact["lm_prefill"].as_f64(), Some(12_398_080.0));
    assert_eq!(exact["lm_decode"].as_f64(), Some(0.0));
    assert!(exact["lm_decode"].as_f64().unwrap().is_sign_positive());
    assert_eq!(v["exact_flops"].as_f64(), Some(60_968_448.0));
    assert_eq!(exact["prefill_tokens"].as_u64(), Some(74));
    let (ok, _, err) = vvlm(&[
        "cost",
        "--lm-params",
        "1e9",
        "--frames",
        "4",
        "--tokens-per-frame",
        "200",
    ]);
    assert!(!ok && err.contains("perfect square"), "{err}");
}

#[test]
fn fit_frontier_and_elasticity_on_a_sweep() {
    let out = std::env::temp_dir().join(format!("vvlm-fit-{}.json", std::process::id()));
    let v = json(&[
        "fit",
        "--data",
        "benches/data/sweep.csv",
        "--form",
        "add-interact",
        "--restarts",
        "16",
        "--bootstrap",
        "4",
        "--cv",
        "5",
        "--seed",
        "3",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    for k in [
        "alpha_N", "a_N", "beta_V", "b_V", "d", "xi", "eps", "mse", "e_pct", "r2",
    ] {
        assert!(v[k].is_number(), "missing {k}: {v}");
    }
    // 1% noise: the fit explains the data to about that level.
    assert!(v["e_pct"].as_f64().unwrap() < 2.0, "{v}");
    assert!(v["r2"].as_f64().unwrap() > 0.95);
    assert!(v["cv"]["e_pct"].as_f64().unwrap() < 3.0);
    let f = json(&[
        "frontier",
        "--model",
        out.to_str().unwrap(),
        "--budgets",
        "2T..30T",
        "--steps",
        "5",
        "--json",
    ]);
    let pts = f["frontier"].as_array().unwrap();
    assert_eq!(pts.len(), 5);
    for p in pts {
        assert!(p["cost"].as_f64().unwrap() <= p["budget"].as_f64().unwrap() * (1.0 + 1e-12));
    }
    let svg = std::env::temp_dir().join(format!("vvlm-frontier-{}.svg", std::process::id()));
    let (ok, _, err) = vvlm(&[
        "frontier",
        "--model",
        out.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    let e = json(&[
        "elasticity",
        "--model",
        out.to_str().unwrap(),
        "--budget-steps",
        "20",
        "--data-steps",
        "5",
        "--json",
    ]);
    assert!(e["e_N"].is_number() && e["e_T"].is_number() && e["e_V"].is_number());
    std::fs::remove_file(out).ok();
    std::fs::remove_file(svg).ok();
}

#[test]
fn the_shipped_default_model_scales_all_three_factors_jointly() {
    let f = json(&[
        "frontier",
        "--model",
        "configs/scaling/default.json",
        "--budgets",
        "1e12..1e14",
        "--steps",
        "2",
        "--json",
    ]);
    let p = f["frontier"].as_array().unwrap();
    for k in ["lm_params_b", "frames", "tokens_per_frame"] {
        assert!(
            p[1][k].as_f64().unwrap() > p[0][k].as_f64().unwrap(),
            "{k} does not grow: {f}"
        );
    }
}

#[test]
fn plan_is_fast_and_respects_pins() {
    let v = json(&[
        "plan",
        "--budget",
        "15T",
        "--models",
        "models/paper-ladder",
        "--cost-mode",
        "theoretical",
        "--scaling",
        "configs/scaling/default.json",
        "--json",
    ]);
    assert!(v["cost_flops"].as_f64().unwrap() <= 15e12);
    assert!(v["runners_up"].as_array().unwrap().len() == 5);
    let v = json(&[
        "plan",
        "--budget",
        "15T",
        "--models",
        "models/paper-ladder",
        "--model",
        "llava-video-llama-3.2-1b",
        "--frames",
        "8",
        "--cost-mode",
        "theoretical",
        "--scaling",
        "configs/scaling/default.json",
        "--json",
    ]);
    assert_eq!(v["model"], "llava-video-llama-3.2-1b");
    assert_eq!(v["frames"], 8);
    let (ok, _, err) = vvlm(&[
        "plan",
        "--budget",
        "1e9",
        "--models",
        "models/paper-ladder",
        "--cost-mode",
        "theoretical",
        "--scaling",
        "configs/scaling/default.json",
    ]);
    assert!(!ok && err.contains("too small"), "{err}");
    // Exact pricing needs the checkpoints' config.json, and says so.
    let (ok, _, err) = vvlm(&["plan", "--budget", "1e9", "--models", "models/paper-ladder"]);
    assert!(!ok && err.contains("config.json"), "{err}");
    // The suite ladder, priced exactly by its own architecture: the plan fits the budget.
    let v = json(&[
        "plan",
        "--budget",
        "1G",
        "--models",
        "models",
        "--scaling",
        "configs/scaling/default.json",
        "--json",
    ]);
    assert_eq!(v["cost_mode"], "exact");
    assert!(v["cost_flops"].as_f64().unwrap() <= 1e9, "{v}");
    assert!(v["model"].as_str().unwrap().starts_with("suite-"), "{v}");
}

#[test]
fn debug_forward_writes_the_fixtures_tensor_names() {
    let out = std::env::temp_dir().join(format!("vvlm-debug-{}.safetensors", std::process::id()));
    let (ok, stdout, err) = vvlm(&[
        "debug",
        "forward",
        "--checkpoint",
        "tests/fixtures/tiny-llava-onevision/model_hubformat",
        "--inputs",
        "tests/fixtures/tiny-llava-onevision/reference.safetensors",
        "--out",
        out.to_str().unwrap(),
        "--tokens-per-frame",
        "9",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("tokens per frame 9"), "{stdout}");
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let r = candle_core::safetensors::load(
        "../../tests/fixtures/tiny-llava-onevision/reference.safetensors",
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for k in [
        "vision.layer_out.0",
        "vision.layer_out.1",
        "projector.out",
        "pooled",
        "text.inputs_embeds",
        "logits",
    ] {
        assert!(t.contains_key(k), "{k} missing");
    }
    let d = (t["logits"].clone() - r["logits_s3"].squeeze(0).unwrap().unsqueeze(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= 1e-4, "logits_s3 max abs err {d}");
    std::fs::remove_file(out).ok();
}
