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

    // Plan mode. Hand-written scaling laws: pooled, error falls with frames only
    // (50/T + 1); for temporal items, with tokens per frame only (50/V + 1). Ties go to the
    // cheaper configuration, so the pooled plan is 32 frames x 1 token and the temporal one
    // 1 frame x 64 tokens when the budget allows everything, and nothing fits 1 MFLOP.
    use vvlm_scaling::{Factor, FittedModel, Form};
    let law = |f: Factor, name: &str| {
        FittedModel::from_params(
            Form::Add,
            &[f],
            &[
                (format!("alpha_{name}"), 50.0),
                (format!("a_{name}"), 1.0),
                ("eps".to_string(), 1.0),
            ],
        )
        .unwrap()
    };
    let fams = dir.join("family-models");
    std::fs::create_dir_all(&fams).unwrap();
    law(Factor::T, "T").save(&dir.join("pooled.json")).unwrap();
    law(Factor::V, "V")
        .save(&fams.join("temporal.json"))
        .unwrap();
    let mut plan_args = args.to_vec();
    let (pooled, fam_dir) = (s(&dir.join("pooled.json")), s(&fams));
    plan_args.extend([
        "--plan",
        "--budget",
        "1e6,1e11",
        "--scaling",
        &pooled,
        "--family-models",
        &fam_dir,
    ]);
    vvlm(&plan_args);
    // The planned configurations off the grid were evaluated, for the items that chose them.
    assert_eq!(lines(&cache.join("T32_s1.jsonl")), 12);
    assert_eq!(
        lines(&cache.join("T1_s8.jsonl")),
        2,
        "the two temporal items"
    );
    let mut rdr = csv::Reader::from_path(out.join("plan.csv")).unwrap();
    let rows: Vec<std::collections::HashMap<String, String>> =
        rdr.deserialize().map(|r| r.unwrap()).collect();
    let get = |budget: &str, policy: &str, family: &str| {
        rows.iter()
            .find(|r| r["budget"] == budget && r["policy"] == policy && r["family"] == family)
            .unwrap_or_else(|| panic!("no row {budget} {policy} {family}"))
    };
    assert_eq!(
        get("100000000000.0", "plan-pooled", "all")["config"],
        "suite-s T32 V1"
    );
    assert_eq!(
        get("100000000000.0", "plan-family", "temporal")["config"],
        "suite-s T1 V64"
    );
    assert_eq!(
        get("100000000000.0", "plan-family", "static")["config"],
        "suite-s T32 V1"
    );
    // The naive rules over the grid {1:1, 4:16}.
    assert_eq!(
        get("100000000000.0", "most-frames", "all")["config"],
        "suite-s T4 V16"
    );
    assert_eq!(
        get("100000000000.0", "fixed-default", "all")["refused"],
        "12"
    );
    // Nothing fits 1 MFLOP: every item is refused, none is scored.
    for p in ["plan-pooled", "plan-family", "most-frames", "oracle-pooled"] {
        let r = get("1000000.0", p, "all");
        assert_eq!(
            (r["refused"].as_str(), r["score"].as_str()),
            ("12", "0.0"),
            "{p}"
        );
    }
    // The oracle is the better of the two grid points on the sweep's own measurements.
    let sweep = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let best = sweep
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(7).unwrap().parse::<f64>().unwrap())
        .fold(0.0, f64::max);
    let oracle: f64 = get("100000000000.0", "oracle-pooled", "all")["score"]
        .parse()
        .unwrap();
    assert!((oracle - best).abs() < 1e-9, "{oracle} vs {best}");
    // A grid run as 3 shards then merged equals the unsharded run, cell for cell (timings
    // aside); a missing or repeated shard is refused by name.
    let grid3 = "1:1,2:4,4:16";
    let (items_s, reg_s) = (s(&items), s(&reg));
    let run = |out: &Path, shard: Option<&str>| {
        let o = s(out);
        let mut a = vec![
            "eval", "--items", &items_s, "--models", &reg_s, "--grid", grid3, "--out", &o,
            "--quiet",
        ];
        if let Some(sh) = shard {
            a.extend(["--shard", sh]);
        }
        vvlm(&a);
    };
    run(&dir.join("whole"), None);
    for i in 0..3 {
        run(&dir.join(format!("part{i}")), Some(&format!("{i}/3")));
    }
    let parts: Vec<String> = (0..3).map(|i| s(&dir.join(format!("part{i}")))).collect();
    let merged = s(&dir.join("merged"));
    let mut args = vec!["eval", "merge", "--out", &merged];
    args.extend(parts.iter().map(String::as_str));
    vvlm(&args);
    let rows = |p: PathBuf| -> Vec<Vec<String>> {
        let mut r = csv::Reader::from_path(p).unwrap();
        let h = r.headers().unwrap().clone();
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                h.iter()
                    .zip(rec.iter())
                    .filter(|(c, _)| !c.ends_with("_s"))
                    .map(|(_, v)| v.to_string())
                    .collect()
            })
            .collect()
    };
    for f in ["sweep.csv", "sweep-temporal.csv"] {
        let (a, b) = (
            rows(dir.join("whole").join(f)),
            rows(dir.join("merged").join(f)),
        );
        assert_eq!(a.len(), 3, "{f}");
        assert_eq!(a, b, "{f}");
    }
    let fails = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_vvlm"))
            .current_dir(repo())
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let bad = s(&dir.join("bad"));
    let e = fails(&["eval", "merge", "--out", &bad, &parts[0], &parts[1]]);
    assert!(e.contains("missing shards: 2/3"), "{e}");
    let e = fails(&[
        "eval", "merge", "--out", &bad, &parts[0], &parts[1], &parts[1],
    ]);
    assert!(e.contains("given twice"), "{e}");
    let table = std::fs::read_to_string(out.join("check.md")).unwrap();
    assert!(
        table.contains("| 100.000G |") && table.contains("#### temporal"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
