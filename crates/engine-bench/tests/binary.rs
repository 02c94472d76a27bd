//! The `vvlm-engine-bench` binary as a GPU run calls it (`scripts/gpu-run`), on the CPU: the
//! smoke check prints one JSON report and exits 0; bad arguments exit 2 naming the problem; a
//! CUDA device asked of a CPU build fails with a message that says how to build one; the batch
//! bench serves real requests through the scheduler.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vvlm-engine-bench"))
}

/// The run's stdout as JSON, after checking that it exited 0 (else its stderr is the failure).
fn json_of(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn smoke_on_the_cpu_prints_a_passing_report() {
    let out = bin()
        .args(["smoke", "--device", "cpu", "--dtype", "f32"])
        .output()
        .unwrap();
    let r = json_of(out);
    assert_eq!(r["ok"], true);
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["checks"].as_array().unwrap().len(), 7);
}

#[test]
fn bad_arguments_exit_2_naming_them() {
    let out = bin().args(["bench-everything"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bench-everything"));
    let out = bin()
        .args(["batch", "--random", "llama70b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("llama70b") && err.contains("llama1b"), "{err}");
    let out = bin()
        .args(["smoke", "--kernels", "flashy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flashy") && err.contains("fused"), "{err}");
}

#[test]
fn cuda_on_a_cpu_build_says_how_to_get_one() {
    if candle_core::utils::cuda_is_available() {
        return; // a CUDA build: nothing to refuse
    }
    let out = bin().args(["smoke", "--device", "cuda"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn the_batch_bench_serves_real_requests_through_the_scheduler() {
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "run models/fetch-smollm2.sh (scripts/test does)"
    );
    let out = bin()
        .args([
            "batch",
            "--scheduler",
            "--ntg",
            "6",
            "--npl",
            "1,3",
            "--json",
        ])
        .args(["--temperature", "0.7", "--top-p", "0.9", "--gguf"])
        .arg(&gguf)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let rows = json_of(out);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, b) in rows.iter().zip([1, 3]) {
        assert_eq!(row["batch"], b);
        // Tokens were generated and steps timed (6 at most per sequence).
        assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["tpot_p50_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Random weights have no tokenizer: refused with a message, not a panic.
    let out = bin()
        .args(["batch", "--scheduler", "--random", "smollm2", "--ntg", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scheduler"));
}
