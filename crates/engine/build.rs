//! With the `cuda` feature: compiles the CUDA sources in `kernels/` to PTX in OUT_DIR, which the
//! engine embeds and loads through cudarc. Without it: nothing.
//!
//! nvcc is found through `CUDA_ROOT`/`CUDA_HOME`/`CUDA_PATH` (its `bin/`) or on PATH (see
//! `scripts/setup-cuda-toolkit`). The PTX targets `compute_${VVLM_PTX_ARCH:-80}`: it loads on
//! any GPU of that capability or newer, and nvcc 13.0's PTX ISA 9.0 loads on driver 580 (CUDA
//! 13.0); PTX from a newer nvcc may not.
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &[
    "bilinear_pool",
    "scaled_softmax",
    "flash_attention",
    "decode_attention",
    "kv_append",
    "epilogue",
    "rms_norm",
    "split_rope",
];

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in [
        "CUDA_ROOT",
        "CUDA_HOME",
        "CUDA_PATH",
        "VVLM_PTX_ARCH",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dir = manifest.join("../../kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let nvcc = find_nvcc();
    let arch = std::env::var("VVLM_PTX_ARCH").unwrap_or_else(|_| "80".into());
    println!("cargo:rerun-if-changed={}", dir.join("dtype.cuh").display());
    for k in KERNELS {
        let src = dir.join(format!("{k}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{arch}"),
            ])
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn find_nvcc() -> PathBuf {
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "the `cuda` feature needs nvcc: set CUDA_ROOT to a CUDA 13 toolkit \
         (scripts/setup-cuda-toolkit installs one from PyPI) or put nvcc on PATH"
    );
}
