//! `vvlm suite` and `vvlm eval` as a user runs them: generate suite videos, evaluate the
//! committed suite-s checkpoint over a small grid, read the sweep back as `vvlm fit` reads it,
//! and resume an evaluation without redoing or duplicating work.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vvlm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vvlm"))
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vvlm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).unwrap().lines().count()
}

#[test]
fn eval_writes_a_fittable_sweep_and_resumes() {
    let dir = std::env::temp_dir().join(format!("vvlm-cli-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let suite = dir.join("suite");
    let out = dir.join("out");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    vvlm(&[
        "suite",
        "generate",
        "--out",
        &s(&suite),
        "--splits",
        "test=2",
    ]);
    let items = suite.join("test/items.jsonl");
    assert_eq!(lines(&items), 12, "6 families x 2 videos");
    // A registry with only the small rung.
    let reg = dir.join("models");
    std::fs::create_dir_all(&reg).unwrap();
    let entry = std::fs::read_to_string(repo().join("models/suite-s.toml")).unwrap();
    let ckpt = repo().join("models/ladder/suite-s");
    std::fs::write(
        reg.join("suite-s.toml"),
        entry.replace(
            "path = \"ladder/suite-s\"",
            &format!("path = {:?}", s(&ckpt)),
        ),
    )
    .unwrap();
    let args = [
        "eval",
        "--items",
        &s(&items),
        "--models",
        &s(&reg),
        "--grid",
        "1:1,4:16",
        "--out",
        &s(&out),
        "--quiet",
    ];
    vvlm(&args);
    // Every item is scored once per grid point.
    let cache = out.join("cache/suite-s");
    assert_eq!(lines(&cache.join("T1_s1.jsonl")), 12);
    assert_eq!(lines(&cache.join("T4_s4.jsonl")), 12);
    // The sweep reads back as `vvlm fit` reads it: one row per grid point, factors and score.
    let text = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let data = vvlm_scaling::Dataset::from_csv(&text, "sweep.csv").unwrap();
    assert_eq!(data.rows.len(), 2);
    assert_eq!(data.factors.len(), 4, "N, T, V and n");
    let header = text.lines().next().unwrap();
    for col in [
        "lm_params_b",
        "frames",
        "tokens_per_frame",
        "data_size_m",
        "score",
        "family",
        "items",
        "ci95",
        "theoretical_flops",
        "measured_flops",
    ] {
        assert!(header.split(',').any(|c| c == col), "no {col} in {header}");
    }
    assert!(out.join("sweep-temporal.csv").exists());
    // Rerunning resumes: nothing is evaluated twice.
    let before = std::fs::read_to_string(cache.join("T4_s4.jsonl")).unwrap();
    vvlm(&args);
    assert_eq!(
        std::fs::read_to_string(cache.join("T4_s4.jsonl")).unwrap(),
        before
    );
    // An interrupted point (half its items missing) is completed, not redone.
    let kept: Vec<&str> = before.lines().take(5).collect();
    std::fs::write(cache.join("T4_s4.jsonl"), kept.join("\n") + "\n").unwrap();
    vvlm(&args);
    assert_eq!(lines(&cache.join("T4_s4.jsonl")), 12);
    std::fs::remove_dir_all(&dir).ok();
}
