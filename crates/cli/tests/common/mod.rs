//! What the end-to-end tests share: the repository, the `vvlm` binary, a scratch folder per
//! test process and a registry folder with the demo checkpoint (SmolLM2-135M from GGUF).
#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn vvlm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vvlm"));
    c.current_dir(repo());
    c
}

pub fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vvlm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A registry folder with the demo checkpoint, built once per test process.
pub fn models_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = repo().join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            gguf.exists(),
            "{} missing: run models/fetch-smollm2.sh (scripts/test does)",
            gguf.display()
        );
        let d = scratch().join("models");
        std::fs::create_dir_all(&d).unwrap();
        let st = vvlm()
            .args(["models", "make-demo", "--gguf"])
            .arg(&gguf)
            .arg("--out")
            .arg(d.join("demo"))
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(
            d.join("demo.toml"),
            "name = \"demo\"\npath = \"demo\"\nlm_params = 1.35e8\nmax_frames = 8\nmax_side = 27\n",
        )
        .unwrap();
        d
    })
}

/// `POST {base}/v1/files` with a JSONL batch file (multipart `purpose` and `file`, as OpenAI's
/// client sends it): the status and the JSON answer.
pub fn upload_batch_file(base: &str, key: &str, jsonl: &str) -> (u16, serde_json::Value) {
    let boundary = "vvlme2eboundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    let r = ureq::post(&format!("{base}/v1/files"))
        .set("Authorization", &format!("Bearer {key}"))
        .set(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .send_bytes(body.as_bytes());
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or_default()),
        Err(e) => panic!("POST /v1/files: {e}"),
    }
}

/// `GET {base}{path}` with a key: the body as text (a stored file's bytes).
pub fn get_text(base: &str, path: &str, key: &str) -> String {
    ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {key}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// The `custom_id`s of a batch output or error file's lines, in order.
pub fn custom_ids(jsonl: &str) -> Vec<String> {
    jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
