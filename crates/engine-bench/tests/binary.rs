//! The `vvlm-engine-bench` binary as a GPU run calls it (`scripts/gpu-run`), on the CPU: the
//! smoke check prints one JSON report and exits 0; bad arguments exit 2 naming the problem; a
//! CUDA device asked of a CPU build fails with a message that says how to build one.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vvlm-engine-bench"))
}

#[test]
fn smoke_on_the_cpu_prints_a_passing_report() {
    let out = bin()
        .args(["smoke", "--device", "cpu", "--dtype", "f32"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
