//! The router in process, one test per rule (`tower::ServiceExt::oneshot`, no sockets): every
//! status of the README's error table that does not need a socket, with the body naming the
//! problem, plus image inputs, two loaded models, SSE error events, text-only chat and
//! concurrent reservations at a quota's edge. Served: the committed suite ladder (suite-s and
//! suite-m), the shipped fitted laws.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;
use vvlm_server::ledger::TenantSettings;
use vvlm_server::{AppState, ServerConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn video_bytes() -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/suite-ladder/test-00003.mp4")).unwrap()
}

const ADMIN: &str = "admin-key-for-tests";

struct Server {
    state: Arc<AppState>,
    _dir: tempfile::TempDir,
}

/// A server over suite-s and suite-m with the shipped configuration, changed by `edit`.
fn server_with(load: bool, edit: impl FnOnce(&mut ServerConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    for rung in ["suite-s", "suite-m"] {
        let text = std::fs::read_to_string(repo().join(format!("models/{rung}.toml"))).unwrap();
        let abs = repo().join("models/ladder").join(rung);
        let text = text.replace(
            &format!("path = \"ladder/{rung}\""),
            &format!("path = \"{}\"", abs.display()),
        );
        std::fs::write(models.join(format!("{rung}.toml")), text).unwrap();
    }
    let mut c = ServerConfig::embedded();
    c.db = dir.path().join("ledger.db").to_string_lossy().into_owned();
    c.models_dir = models;
    c.scaling_model = repo().join(&c.scaling_model);
    for p in c.task_models.values_mut() {
        *p = repo().join(&*p);
    }
    c.admin_key = Some(ADMIN.into());
    c.file_allow = vec![dir.path().to_path_buf()];
    c.limits.workers = 1;
    c.limits.threads_per_worker = 1;
    c.limits.queue_wait_s = 0.0;
    edit(&mut c);
    let state = vvlm_server::build_state(c).unwrap();
    if load {
        vvlm_server::load_models(&state).unwrap();
    }
    Server { state, _dir: dir }
}

fn server() -> Server {
    server_with(true, |_| {})
}

impl Server {
    /// A tenant (unlimited quota unless given) and its key.
    fn tenant(&self, name: &str, quota: Option<f64>) -> String {
        let settings = TenantSettings {
            default_budget: Some(1e9),
            per_request_max: Some(1e12),
            quota: Some(quota),
            ..Default::default()
        };
        self.state.ledger.create_tenant(name, &settings).unwrap().1
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = vvlm_server::router(self.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, body)
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let (s, _, v) = self
            .send(b.body(Body::from(body.to_string())).unwrap())
            .await;
        (s.as_u16(), v)
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.json(Method::POST, path, Some(key), body).await
    }

    /// [`Self::post`] with the answer's headers (and an SSE body as one string).
    async fn post_full(
        &self,
        path: &str,
        key: &str,
        body: &Value,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.send(post_request(path, key, body)).await
    }
}

/// A POST of a JSON body with a tenant's key.
fn post_request(path: &str, key: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn qa_body() -> Value {
    json!({"video": data_url("video/mp4", &video_bytes()),
           "question": "what colour is the flash ?", "max_tokens": 4})
}

/// A metric's value in `/metrics` text (its line's name and labels as written), 0 when absent.
fn metric(m: &str, name: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The error's kind, and that its message is not empty.
fn kind(body: &Value) -> &str {
    let e = &body["error"];
    assert!(
        !e["message"].as_str().unwrap_or("").is_empty(),
        "no message: {body}"
    );
    assert_eq!(e["code"], e["type"], "{body}");
    e["type"].as_str().unwrap()
}

/// A caption request may send no prompt: it asks the planned checkpoint's own caption
/// instruction (`caption_prompt` in its registry entry: the ladder's "describe the video ."),
/// answered and priced as if the client had sent it; `/v1/plan` prices it the same. Without an
/// entry's own, the server's `caption_prompt`. (It was a 422 asking for a prompt.)
#[tokio::test]
async fn a_caption_without_a_prompt_asks_the_checkpoints_own_instruction() {
    let caption = |prompt: Option<&str>| {
        let mut b = json!({"video": data_url("video/mp4", &video_bytes()), "max_tokens": 24,
                           "model": "suite-s", "frames": 8, "tokens_per_frame": 16});
        if let Some(p) = prompt {
            b["prompt"] = json!(p);
        }
        b
    };
    let s = server();
    let key = s.tenant("alice", None);
    let (st, bare) = s.post("/v1/videos/caption", &key, caption(None)).await;
    assert_eq!(st, 200, "{bare}");
    let (st, asked) = s
        .post(
            "/v1/videos/caption",
            &key,
            caption(Some("describe the video .")),
        )
        .await;
    assert_eq!(st, 200, "{asked}");
    assert!(
        bare["text"].as_str().unwrap().contains("background"),
        "{bare}"
    );
    assert_eq!(bare["text"], asked["text"]);
    assert_eq!(
        bare["usage"]["prompt_tokens"],
        asked["usage"]["prompt_tokens"]
    );
    assert_eq!(
        bare["plan"]["cold_cost_flops"],
        asked["plan"]["cold_cost_flops"]
    );
    // The model list says what a bare caption asks.
    let (_, m) = s
        .json(Method::GET, "/v1/models/suite-s", Some(&key), Value::Null)
        .await;
    assert_eq!(m["caption_prompt"], "describe the video .", "{m}");
    let plan = |prompt: Option<&str>| {
        let mut b = json!({"task": "caption", "model": "suite-s", "frames": 8,
                           "tokens_per_frame": 16, "max_tokens": 24});
        if let Some(p) = prompt {
            b["prompt"] = json!(p);
        }
        b
    };
    let (_, p0) = s.post("/v1/plan", &key, plan(None)).await;
    let (_, p1) = s
        .post("/v1/plan", &key, plan(Some("describe the video .")))
        .await;
    assert!(p0["cost_flops"].as_f64().unwrap() > 0.0, "{p0}");
    assert_eq!(p0["cost_flops"], p1["cost_flops"], "{p0} {p1}");
    // A question is still required.
    let mut qa = qa_body();
    qa.as_object_mut().unwrap().remove("question");
    let (st, v) = s.post("/v1/videos/qa", &key, qa).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (422, Some("prompt")),
        "{v}"
    );

    // Entries without their own: the server's (here the ladder's flash question).
    let s = server_with(false, |c| {
        c.caption_prompt = "what colour is the flash ?".into()
    });
    for f in std::fs::read_dir(s._dir.path().join("models")).unwrap() {
        let path = f.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("caption_prompt"))
            .collect();
        std::fs::write(&path, kept.join("\n")).unwrap();
    }
    vvlm_server::load_models(&s.state).unwrap();
    let key = s.tenant("alice", None);
    let (st, bare) = s.post("/v1/videos/caption", &key, caption(None)).await;
    assert_eq!(st, 200, "{bare}");
    let mut question = caption(None);
    question["question"] = json!("what colour is the flash ?");
    let (st, asked) = s.post("/v1/videos/qa", &key, question).await;
    assert_eq!(st, 200, "{asked}");
    assert_eq!(bare["text"], asked["text"]);
    assert_eq!(
        bare["usage"]["prompt_tokens"],
        asked["usage"]["prompt_tokens"]
    );
    let (_, m) = s
        .json(Method::GET, "/v1/models/suite-s", Some(&key), Value::Null)
        .await;
    assert_eq!(m["caption_prompt"], "what colour is the flash ?", "{m}");
}

#[tokio::test]
async fn a_video_question_is_answered_and_charged() {
    let s = server();
    let key = s.tenant("alice", None);
    let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["text"].is_string());
    let measured = v["usage"]["measured_flops"]["total"].as_f64().unwrap();
    assert!(measured > 0.0 && measured <= v["plan"]["cost_flops"].as_f64().unwrap() * 1.000001);
    let (_, u) = s
        .json(Method::GET, "/v1/usage", Some(&key), Value::Null)
        .await;
    assert_eq!(u["charged_flops"].as_f64().unwrap(), measured);
    assert_eq!(u["reserved_flops"].as_f64().unwrap(), 0.0);
}

#[tokio::test]
async fn missing_and_wrong_keys_are_401() {
    let s = server();
    let (st, v) = s.json(Method::POST, "/v1/videos/qa", None, qa_body()).await;
    assert_eq!((st, kind(&v)), (401, "unauthorized"));
    let (st, v) = s.post("/v1/videos/qa", "nope", qa_body()).await;
    assert_eq!((st, kind(&v)), (401, "unauthorized"));
    let (st, v) = s
        .json(Method::GET, "/admin/tenants", Some("nope"), Value::Null)
        .await;
    assert_eq!((st, kind(&v)), (401, "unauthorized"));
}

#[tokio::test]
async fn a_quota_that_cannot_hold_the_plan_is_402_with_reset_at() {
    let s = server();
    let key = s.tenant("poor", Some(1e3));
    let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!((st, kind(&v)), (402, "budget_exhausted"), "{v}");
    assert!(v["error"]["reset_at"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn file_urls_outside_the_allow_list_and_a_disabled_admin_api_are_403() {
    let s = server();
    let key = s.tenant("alice", None);
    let mut body = qa_body();
    body["video"] = json!("file:///etc/passwd");
    let (st, v) = s.post("/v1/videos/qa", &key, body).await;
    assert_eq!((st, kind(&v)), (403, "forbidden"));
    let s = server_with(false, |c| c.admin_key = None);
    let (st, v) = s
        .json(Method::GET, "/admin/tenants", Some(ADMIN), Value::Null)
        .await;
    assert_eq!((st, kind(&v)), (403, "forbidden"));
}

#[tokio::test]
async fn unknown_routes_and_models_are_404() {
    let s = server();
    let key = s.tenant("alice", None);
    let (st, v) = s.post("/v1/nothing", &key, json!({})).await;
    assert_eq!((st, kind(&v)), (404, "not_found"));
    let mut body = qa_body();
    body["model"] = json!("suite-xl");
    let (st, v) = s.post("/v1/videos/qa", &key, body).await;
    assert_eq!((st, kind(&v)), (404, "model_not_found"));
    assert_eq!(v["error"]["param"], "model");
}

#[tokio::test]
async fn a_wrong_method_is_405_with_a_json_body() {
    let s = server();
    let (st, v) = s
        .json(Method::GET, "/v1/videos/qa", None, Value::Null)
        .await;
    assert_eq!((st, kind(&v)), (405, "method_not_allowed"));
}

#[tokio::test]
async fn removing_a_tenant_is_204_then_its_key_is_401() {
    let s = server();
    let key = s.tenant("gone", None);
    let (st, _) = s
        .json(
            Method::DELETE,
            "/admin/tenants/gone",
            Some(ADMIN),
            Value::Null,
        )
        .await;
    assert_eq!(st, 204);
    let (st, _) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_announced_or_read() {
    let s = server_with(true, |c| {
        c.limits.max_body_bytes = 4096;
        c.media.max_bytes = 2048;
    });
    let key = s.tenant("alice", None);
    // Announced: refused from the header.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/videos/qa")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "1000000")
        .body(Body::from(vec![b' '; 16]))
        .unwrap();
    let (st, _, v) = s.send(req).await;
    assert_eq!((st.as_u16(), kind(&v)), (413, "payload_too_large"));
    // Read: a body without a length that turns out too large.
    let chunks = futures_stream(vec![vec![b'{'; 3000], vec![b' '; 3000]]);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/videos/qa")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (st, _, v) = s.send(req).await;
    assert_eq!((st.as_u16(), kind(&v)), (413, "payload_too_large"), "{v}");
}

/// A body in chunks of unknown total length.
fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    struct Chunks(std::vec::IntoIter<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next().map(Ok))
        }
    }
    Chunks(chunks.into_iter())
}

#[tokio::test]
async fn other_content_types_are_415() {
    let s = server();
    let key = s.tenant("alice", None);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/videos/qa")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    let (st, _, v) = s.send(req).await;
    assert_eq!((st.as_u16(), kind(&v)), (415, "unsupported_media"));
}

#[tokio::test]
async fn validation_errors_are_422_naming_the_field() {
    let s = server();
    let key = s.tenant("alice", None);
    let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
        ("question", Value::Null, Some("prompt"), "required"),
        ("video", Value::Null, Some("video"), "video is required"),
        ("budget", json!(1e13), Some("budget"), "per-request maximum"),
        ("budget", json!("lots"), Some("budget"), "positive number"),
        ("budget", json!(1.0), None, "budget"),
        ("tokens_per_frame", json!(200), None, "perfect square"),
        ("frames", json!(0), Some("frames"), "at least 1"),
        (
            "max_tokens",
            json!(100000),
            Some("max_tokens"),
            "max_tokens",
        ),
        ("top_p", json!(0), Some("top_p"), "top_p"),
        ("top_k", json!(-2), Some("top_k"), "top_k must be"),
        ("min_p", json!(1.5), Some("min_p"), "[0, 1]"),
        (
            "frequency_penalty",
            json!(2.5),
            Some("frequency_penalty"),
            "[-2, 2]",
        ),
        (
            "presence_penalty",
            json!(-3),
            Some("presence_penalty"),
            "[-2, 2]",
        ),
        (
            "repetition_penalty",
            json!(0),
            Some("repetition_penalty"),
            "(0, 2]",
        ),
        (
            "logit_bias",
            json!({"red": 5}),
            Some("logit_bias"),
            "token ids",
        ),
        (
            "logit_bias",
            json!({"7": 101}),
            Some("logit_bias"),
            "[-100, 100]",
        ),
        ("logit_bias", json!("{not json"), Some("logit_bias"), "JSON"),
        (
            "logit_bias",
            json!({"44": 1}),
            Some("logit_bias"),
            "outside the vocabulary",
        ),
        (
            "response_format",
            json!({"type": "xml"}),
            Some("response_format"),
            "json_object",
        ),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            Some("response_format"),
            "json_schema.schema",
        ),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "date"}}}),
            Some("response_format"),
            "keyword `format` is not supported",
        ),
        // The ladder's 44 words hold no `{`.
        (
            "response_format",
            json!({"type": "json_object"}),
            Some("response_format"),
            "cannot write JSON",
        ),
        (
            "guided_choice",
            json!([]),
            Some("guided_choice"),
            "1 to 64 strings",
        ),
        (
            "guided_choice",
            json!(["red", ""]),
            Some("guided_choice"),
            "1 to 64 strings",
        ),
        (
            "guided_choice",
            json!(vec!["x".repeat(200); 21]),
            Some("guided_choice"),
            "4096 in all",
        ),
        // Its tokens are words: "reddish" is none, nor is "redblue" two of them.
        (
            "guided_choice",
            json!(["red", "reddish"]),
            Some("guided_choice"),
            "cannot write `reddish`",
        ),
        (
            "stop",
            json!(["a", "b", "c", "d", "e"]),
            Some("stop"),
            "at most 4",
        ),
        (
            "top_logprobs",
            json!(3),
            Some("top_logprobs"),
            "logprobs: true",
        ),
        ("colour", json!("red"), Some("colour"), "unknown field"),
        (
            "video",
            json!(data_url("video/mp4", b"not a video at all")),
            None,
            "video",
        ),
    ];
    for (field, value, param, says) in cases {
        let mut body = qa_body();
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        let (st, v) = s.post("/v1/videos/qa", &key, body).await;
        assert_eq!((st, kind(&v)), (422, "validation_error"), "{field}: {v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{field}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{field}: {msg}");
    }
}

/// An error message speaks JSON, not the deserializer's Rust: no enum, variant or Rust type
/// names, "object" and "array" rather than "map" and "sequence".
fn assert_json_words(message: &str) {
    for internal in [
        "untagged enum",
        "variant",
        "Either",
        "usize",
        "u32",
        "u64",
        "i64",
        "f64",
        "invalid type: map",
        "invalid type: sequence",
        "expected a map",
        "expected a sequence",
        "Text(",
        "Number(",
    ] {
        assert!(
            !message.contains(internal),
            "`{internal}` in the message {message:?}"
        );
    }
}

/// A value of the wrong type is a 422 naming the field and saying what it takes, in JSON's
/// words (it was serde's "data did not match any variant of untagged enum Either"); a chat
/// without a user message to answer, or with an empty one, names `messages` (it named a
/// `prompt` field that chat bodies do not have).
#[tokio::test]
async fn wrong_types_are_422_saying_what_the_field_takes() {
    let s = server();
    let key = s.tenant("alice", None);
    let chat = |field: &str, value: Value| {
        let mut b = text_chat(2);
        b[field] = value;
        b
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            chat("max_tokens", json!(-1)),
            "max_tokens",
            "must be a whole number >= 0, got -1",
        ),
        (
            chat("frames", json!("many")),
            "frames",
            "must be a whole number >= 0, got \"many\"",
        ),
        (
            chat("n", json!(1.5)),
            "n",
            "must be a whole number >= 0, got 1.5",
        ),
        (
            chat("temperature", json!([])),
            "temperature",
            "must be a number, got []",
        ),
        (
            chat("top_k", json!(true)),
            "top_k",
            "must be a whole number, got true",
        ),
        (
            chat("budget", json!({})),
            "budget",
            "a number of FLOPs or a string such as \"5T\"",
        ),
        (chat("budget", json!("lots")), "budget", "got \"lots\""),
        (
            chat("stop", json!(5)),
            "stop",
            "must be a string or an array of strings",
        ),
        (
            chat("logprobs", json!(3)),
            "logprobs",
            "must be true or false, got 3",
        ),
        (
            chat("guided_choice", json!({})),
            "guided_choice",
            "must be an array of strings",
        ),
        (chat("model", json!({})), "model", "must be a string"),
        (
            chat("stream", json!("yes")),
            "stream",
            "`stream` must be true or false, got \"yes\"",
        ),
        (
            chat("stream_options", json!(1)),
            "stream_options",
            "must be an object",
        ),
        (
            chat("stream_options", json!({"include_usage": "yes"})),
            "stream_options",
            "include_usage` must be true or false",
        ),
        (
            chat("messages", json!("hi")),
            "messages",
            "expected an array",
        ),
        (
            chat("messages", json!([])),
            "messages",
            "must end with a user message",
        ),
        (
            chat(
                "messages",
                json!([{"role": "system", "content": "Be brief."}]),
            ),
            "messages",
            "must end with a user message",
        ),
        (
            chat("messages", json!([{"role": "user", "content": " "}])),
            "messages",
            "has no text",
        ),
        (
            chat("messages", json!([{"role": "user", "content": {}}])),
            "messages",
            "`content` must be a string or an array of parts",
        ),
        (
            chat(
                "messages",
                json!([{"role": "user", "content": [{"type": "video_url", "video_url": 7}]}]),
            ),
            "messages",
            "must be a URL or {\"url\": URL}",
        ),
    ];
    for (body, param, says) in cases {
        let (st, v) = s.post("/v1/chat/completions", &key, body.clone()).await;
        assert_eq!((st, kind(&v)), (422, "validation_error"), "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
        assert_json_words(message);
    }
    // The same words on the text completions route, and in a typed admin body.
    let (st, v) = s
        .post(
            "/v1/completions",
            &key,
            json!({"prompt": "what", "max_tokens": -1}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (422, Some("max_tokens")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("whole number >= 0"),
        "{v}"
    );
    let (st, v) = s
        .json(
            Method::POST,
            "/admin/tenants",
            Some(ADMIN),
            json!({"name": "bob", "max_in_flight": "many"}),
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert_json_words(v["error"]["message"].as_str().unwrap());
}

/// A client that leaves while its request's reservation is being written (the ledger busy: a
/// slow database, a lock held) leaves no reservation open. The write finishes after the
/// request is gone; the reservation must then be released, not left open with its lease
/// renewed by this replica for as long as it lives (it was: a soak of 600 dropped connections
/// left 20 open, 4e11 FLOPs of the tenant's quota held until a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_it_reserves_leaves_no_reservation_open() {
    let s = server();
    let key = s.tenant("alice", None);
    let alice = s.state.ledger.tenant_by_key(&key).unwrap().unwrap();
    // Another connection holds the ledger's write lock: the reservation waits for it.
    let lock = rusqlite::Connection::open(s._dir.path().join("ledger.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let request = s.post("/v1/chat/completions", &key, text_chat(4));
    let gone = tokio::time::timeout(Duration::from_millis(800), request).await;
    assert!(
        gone.is_err(),
        "the request finished while the ledger was locked"
    );
    // The client is gone; the database frees up and the reservation's write completes.
    lock.execute_batch("COMMIT").unwrap();
    let open = || {
        s.state
            .ledger
            .recent_requests(&alice, 10)
            .unwrap()
            .into_iter()
            .filter(|r| r.state == "open")
            .count()
    };
    let t = Instant::now();
    while open() > 0 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = s.state.ledger.recent_requests(&alice, 10).unwrap();
    assert_eq!(history.len(), 1, "the reservation was written");
    assert_eq!(history[0].state, "released", "{:?}", history[0].state);
    let u = s
        .state
        .ledger
        .usage(&alice, vvlm_server::ledger::now())
        .unwrap();
    assert_eq!((u.reserved_flops, u.charged_flops), (0.0, 0.0));
    // And the server still answers her.
    let (st, v) = s.post("/v1/chat/completions", &key, text_chat(2)).await;
    assert_eq!(st, 200, "{v}");
}

/// Top-k, min-p, a guided choice and the logit bias reach the model's choice: top-k 1 and min-p
/// 1 at a high temperature answer as greedy; a video question held to a choice answers one of
/// its strings; a +100 bias makes every token that one (the ladder's vocabulary is 44 words).
#[tokio::test]
async fn sampling_controls_reach_the_models_choice() {
    let s = server();
    let key = s.tenant("alice", None);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "what colour is the flash ?"}],
                              "max_tokens": 6, "logprobs": true});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let tokens = |v: &Value| -> Vec<String> {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_string())
            .collect()
    };
    let (st, greedy) = s.post("/v1/chat/completions", &key, chat(json!({}))).await;
    assert_eq!(st, 200, "{greedy}");
    for extra in [
        json!({"temperature": 2.0, "top_k": 1, "seed": 3}),
        json!({"temperature": 2.0, "min_p": 1.0, "seed": 4}),
    ] {
        let (st, v) = s
            .post("/v1/chat/completions", &key, chat(extra.clone()))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(tokens(&v), tokens(&greedy), "{extra}");
    }
    // A video question held to two of the ladder's words: the answer is one of them.
    for choices in [
        json!(["red", "white"]),
        json!(["square", "circle", "cross"]),
    ] {
        let mut body = qa_body();
        body["guided_choice"] = choices.clone();
        let (st, v) = s.post("/v1/videos/qa", &key, body).await;
        assert_eq!(st, 200, "{v}");
        assert!(
            choices.as_array().unwrap().contains(&v["text"]),
            "{choices}: {v}"
        );
        assert_eq!(v["finish_reason"], "stop", "{v}");
    }
    let (_, _, metrics) = s
        .send(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let line = "vvlm_constrained_requests_total{format=\"choice\"} 2";
    assert!(metrics.as_str().unwrap().contains(line), "{line}");
    let mut body = qa_body();
    body["guided_choice"] = json!(["red"]);
    body["response_format"] = json!({"type": "json_object"});
    let (st, v) = s.post("/v1/videos/qa", &key, body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (422, Some("guided_choice")),
        "{v}"
    );
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &key,
            chat(json!({"logit_bias": {"30": 100}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let forced = tokens(&v);
    assert_eq!(forced.len(), 6, "{v}");
    assert!(forced.iter().all(|t| t == &forced[0]), "{forced:?}");
    assert_ne!(forced, tokens(&greedy));
}

/// `tools` and `tool_choice`: a call is made only when forced (a named function, or `required`
/// with one tool); every other shape is a 422 naming the field at fault.
#[tokio::test]
async fn tool_calls_are_forced_or_refused_by_name() {
    let s = server();
    let key = s.tenant("alice", None);
    let f = |name: &str, params: Value| json!({"type": "function", "function": {"name": name, "parameters": params}});
    let obj = json!({"type": "object", "properties": {"colour": {"enum": ["red", "white"]}}, "required": ["colour"]});
    let cases: Vec<(Value, Value, &str, &str)> = vec![
        (
            json!([f("answer", obj.clone())]),
            Value::Null,
            "tool_choice",
            "names it",
        ),
        (
            json!([f("answer", obj.clone())]),
            json!("auto"),
            "tool_choice",
            "names it",
        ),
        (
            json!([f("a", obj.clone()), f("b", obj.clone())]),
            json!("required"),
            "tool_choice",
            "name the one",
        ),
        (
            json!([f("answer", obj.clone())]),
            json!({"type": "function", "function": {"name": "other"}}),
            "tool_choice",
            "no tool is named `other`",
        ),
        (
            Value::Null,
            json!({"type": "function", "function": {"name": "answer"}}),
            "tool_choice",
            "no `tools`",
        ),
        (
            json!([f(
                "answer",
                json!({"type": "object", "patternProperties": {}})
            )]),
            json!("required"),
            "tools",
            "`patternProperties`",
        ),
        (
            json!([f("bad name!", obj.clone())]),
            json!("required"),
            "tools",
            "letters, digits",
        ),
        (
            json!([f("a", obj.clone()), f("a", obj.clone())]),
            json!("required"),
            "tools",
            "twice",
        ),
        (
            json!([{"type": "retrieval"}]),
            json!("required"),
            "tools",
            "each tool is",
        ),
        // A valid forced call on a checkpoint that cannot write JSON (the ladder's words).
        (
            json!([f("answer", obj.clone())]),
            json!("required"),
            "response_format",
            "cannot write JSON",
        ),
    ];
    for (tools, choice, param, says) in cases {
        let mut body =
            json!({"messages": [{"role": "user", "content": "what colour is the flash ?"}]});
        body["tools"] = tools.clone();
        body["tool_choice"] = choice.clone();
        let (st, v) = s.post("/v1/chat/completions", &key, body).await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (422, Some(param)),
            "{tools} {choice}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{tools} {choice}: {msg}");
    }
    // After a call, its result comes back as a `tool` message naming it; the model answers
    // in text. A result naming no call is a 422.
    let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
        "type": "function", "function": {"name": "answer", "arguments": "{\"colour\": \"white\"}"}}]});
    let first = json!({"role": "user", "content": "what colour is the flash ?"});
    let body = json!({"messages": [first, call, {"role": "tool", "tool_call_id": "call_1", "content": "white"}],
                      "max_tokens": 3});
    let (st, v) = s.post("/v1/chat/completions", &key, body).await;
    assert_eq!(st, 200, "{v}");
    let alone = json!({"messages": [first], "max_tokens": 3});
    let (_, w) = s.post("/v1/chat/completions", &key, alone).await;
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > w["usage"]["prompt_tokens"].as_u64(),
        "the call and its result are in the prompt: {v} {w}"
    );
    let body = json!({"messages": [first, call, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]});
    let (st, v) = s.post("/v1/chat/completions", &key, body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (422, Some("messages")),
        "{v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tool_call_id"));
    // `none` answers in text.
    let body = json!({"messages": [{"role": "user", "content": "what colour is the flash ?"}],
                      "tools": [f("answer", obj)], "tool_choice": "none", "max_tokens": 3});
    let (st, v) = s.post("/v1/chat/completions", &key, body).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}

#[tokio::test]
async fn unimplemented_openai_fields_are_400_by_name() {
    let s = server();
    let key = s.tenant("alice", None);
    for (field, value) in [
        ("functions", json!([{"name": "f"}])),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body[field] = value;
        let (st, v) = s.post("/v1/chat/completions", &key, body).await;
        assert_eq!((st, kind(&v)), (400, "unsupported_parameter"), "{v}");
        assert_eq!(v["error"]["param"], field);
    }
}

#[tokio::test]
async fn a_full_queue_is_429_with_retry_after() {
    let s = server();
    let key = s.tenant("alice", None);
    // Every admission place taken (as by another tenant's requests in flight).
    let _held: Vec<_> = (0..s.state.admission.capacity())
        .map(|_| s.state.admission.try_acquire(-1, None).unwrap())
        .collect();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/videos/qa")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(qa_body().to_string()))
        .unwrap();
    let (st, headers, v) = s.send(req).await;
    assert_eq!((st.as_u16(), kind(&v)), (429, "overloaded"));
    assert_eq!(headers["retry-after"], "2");
}

impl Server {
    fn tenant_id(&self, name: &str) -> i64 {
        self.state.ledger.tenant_by_name(name).unwrap().id
    }

    async fn metrics(&self) -> String {
        let req = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        self.send(req).await.2.as_str().unwrap().to_string()
    }
}

impl Server {
    /// A place taken for the tenant (as by a request of its still running), without a limit.
    fn hold_place(&self, tenant: &str) -> vvlm_server::fair_gate::Place {
        let id = self.tenant_id(tenant);
        self.state.admission.try_acquire(id, None).unwrap()
    }

    /// Sets (a number) or clears (null) a tenant's limit of requests in flight.
    async fn set_max_in_flight(&self, tenant: &str, limit: Value) -> (u16, Value) {
        let path = format!("/admin/tenants/{tenant}");
        self.json(
            Method::PATCH,
            &path,
            Some(ADMIN),
            json!({ "max_in_flight": limit }),
        )
        .await
    }

    /// Sends a JSON POST on its own task: its status, and when its answer had been read.
    fn spawn_post(
        &self,
        key: &str,
        path: &'static str,
        body: Value,
    ) -> tokio::task::JoinHandle<(u16, std::time::Instant)> {
        let state = self.state.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(header::AUTHORIZATION, format!("Bearer {key}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = vvlm_server::router(state).oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let _ = axum::body::to_bytes(resp.into_body(), usize::MAX).await;
            (status, std::time::Instant::now())
        })
    }
}

fn text_chat(max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": "what colour is the flash ?"}],
           "max_tokens": max_tokens})
}

/// What the server logs on this thread, as text, while the returned guard lives.
fn capture_logs() -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    #[derive(Clone)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Default::default());
    let buffer = sink.0.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || sink.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

/// A stream whose client leaves is logged as closed, with its request id, even when the client
/// left before the stream's task first ran (the line used to be written by that task, which an
/// abort before its first poll never runs: a CI run missed it). On this test's one-thread
/// runtime the task cannot run before the body is dropped. A stream read to its end is not.
#[tokio::test]
async fn a_stream_its_client_leaves_is_logged_as_closed_even_before_it_ran() {
    let s = server();
    let key = s.tenant("alice", None);
    let (logs, _guard) = capture_logs();
    let mut body = text_chat(64);
    body["stream"] = json!(true);
    let request = || post_request("/v1/chat/completions", &key, &body);
    let resp = vvlm_server::router(s.state.clone())
        .oneshot(request())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let left = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    drop(resp); // the client hangs up after the head
    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("stream closed by its client") && l.contains(&left)),
        "no closed line for {left}:\n{logged}"
    );
    // Read to its end: finished, not closed.
    let (st, headers, v) = s.send(request()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.as_str().unwrap().contains("[DONE]"), "{v}");
    let whole = headers["x-request-id"].to_str().unwrap().to_string();
    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        !logged
            .lines()
            .any(|l| l.contains("stream closed by its client") && l.contains(&whole)),
        "{whole} was read to its end, yet logged as closed:\n{logged}"
    );
}

#[tokio::test]
async fn a_tenant_at_its_limit_is_429_while_other_tenants_are_served() {
    let s = server();
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    // The limit is the tenant's own, set through the admin API (0 is refused, by name).
    let (st, v) = s.set_max_in_flight("alice", json!(0)).await;
    assert_eq!(st, 422, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_in_flight"));
    let (st, v) = s.set_max_in_flight("alice", json!(1)).await;
    assert_eq!((st, &v["max_in_flight"]), (200, &json!(1)), "{v}");
    // Alice's one place is held (as by a request of hers still running).
    let place = s
        .state
        .admission
        .try_acquire(s.tenant_id("alice"), Some(1))
        .unwrap();
    let req = |key: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(text_chat(2).to_string()))
            .unwrap()
    };
    let (st, headers, v) = s.send(req(&alice)).await;
    assert_eq!((st.as_u16(), kind(&v)), (429, "concurrency_limit"), "{v}");
    assert_eq!(headers["retry-after"], "1");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alice") && message.contains("1 requests in flight"),
        "{message}"
    );
    // Bob is served meanwhile: the server has places left.
    let (st, _, v) = s.send(req(&bob)).await;
    assert_eq!(st, 200, "{v}");
    let line = "vvlm_tenant_limit_rejections_total{tenant=\"alice\"} 1";
    assert!(s.metrics().await.contains(line), "{line}");
    // Alice's held place (bob's is given back just after his answer).
    let t0 = std::time::Instant::now();
    let mut metrics = s.metrics().await;
    while !metrics.contains("vvlm_admission_places_held 1") && t0.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        metrics = s.metrics().await;
    }
    assert!(
        metrics.contains("vvlm_admission_places_held 1"),
        "{metrics}"
    );
    for line in [
        "vvlm_tenant_places_held{tenant=\"alice\"} 1",
        "vvlm_tenant_places_held{tenant=\"bob\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    // The admin list shows the same.
    let (st, list) = s
        .json(Method::GET, "/admin/tenants", Some(ADMIN), Value::Null)
        .await;
    assert_eq!(st, 200, "{list}");
    let held: Vec<(&str, u64)> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let name = x["tenant"]["name"].as_str().unwrap();
            (name, x["places_held"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(held, [("alice", 1), ("bob", 0)]);
    // Her place given back, alice is served again.
    drop(place);
    let (st, _, v) = s.send(req(&alice)).await;
    assert_eq!(st, 200, "{v}");
    // null returns her to the server's default (no limit here).
    let (st, v) = s.set_max_in_flight("alice", json!(null)).await;
    assert_eq!((st, &v["max_in_flight"]), (200, &Value::Null), "{v}");
    let _two = [s.hold_place("alice"), s.hold_place("alice")];
    let (st, _, v) = s.send(req(&alice)).await;
    assert_eq!(st, 200, "{v}");
}

/// A tenant's weight (its share of the places under contention): created with it, changed,
/// refused out of range by name, cleared by null; a request of a weighted tenant is served.
#[tokio::test]
async fn a_tenants_weight_is_set_through_the_admin_api() {
    let s = server();
    let (st, v) = s
        .post(
            "/admin/tenants",
            ADMIN,
            json!({"name": "gold", "weight": 3}),
        )
        .await;
    assert_eq!((st, &v["tenant"]["weight"]), (201, &json!(3.0)), "{v}");
    let key = v["api_key"].as_str().unwrap().to_string();
    let patch = |w: Value| {
        s.json(
            Method::PATCH,
            "/admin/tenants/gold",
            Some(ADMIN),
            json!({ "weight": w }),
        )
    };
    for bad in [json!(0), json!(-2), json!(101)] {
        let (st, v) = patch(bad.clone()).await;
        assert_eq!(st, 422, "{bad}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("weight"),
            "{v}"
        );
    }
    let (st, v) = patch(json!(0.5)).await;
    assert_eq!((st, &v["weight"]), (200, &json!(0.5)), "{v}");
    let (st, v) = s.post("/v1/chat/completions", &key, text_chat(2)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = patch(Value::Null).await;
    assert_eq!((st, &v["weight"]), (200, &Value::Null), "{v}");
}

#[tokio::test]
async fn the_servers_default_limit_binds_tenants_without_their_own() {
    let s = server_with(true, |c| c.limits.tenant_max_in_flight = 1);
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let (st, v) = s.set_max_in_flight("bob", json!(2)).await;
    assert_eq!(st, 200, "{v}");
    let _places = [s.hold_place("alice"), s.hold_place("bob")];
    let (st, v) = s.post("/v1/chat/completions", &alice, text_chat(2)).await;
    assert_eq!((st, kind(&v)), (429, "concurrency_limit"), "{v}");
    let (st, v) = s.post("/v1/chat/completions", &bob, text_chat(2)).await;
    assert_eq!(st, 200, "{v}");
}

/// Through the router: with every place held by alice and her second request already waiting
/// at the door, bob's request (arriving later) gets the first freed place; FIFO would give it
/// to alice.
#[tokio::test]
async fn a_freed_place_goes_to_the_waiting_tenant_holding_fewest() {
    let s = server_with(true, |c| {
        c.limits.queue_depth = 1;
        c.limits.max_batch = 1;
        c.limits.queue_wait_s = 30.0;
    });
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let gate = s.state.admission.clone();
    assert_eq!(gate.capacity(), 2);
    let id = s.tenant_id("alice");
    let mut held = vec![
        gate.try_acquire(id, None).unwrap(),
        gate.try_acquire(id, None).unwrap(),
    ];
    let spawn = |key: &str| s.spawn_post(key, "/v1/chat/completions", text_chat(2));
    let alices = spawn(&alice);
    while gate.waiting() < 1 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let bobs = spawn(&bob);
    while gate.waiting() < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    held.pop();
    // The freed place is bob's: alice still holds only the one left (her waiter gets a place
    // once bob's request ends and gives its own back).
    while gate.waiting() == 2 {
        tokio::task::yield_now().await;
    }
    if gate.waiting() == 1 {
        assert_eq!(gate.held_by(id), 1, "the freed place went to alice");
    }
    assert_eq!(bobs.await.unwrap().0, 200);
    held.pop();
    assert_eq!(alices.await.unwrap().0, 200);
    // Every place comes back (the worker drops a job's place just after its answer).
    let t0 = std::time::Instant::now();
    while gate.available() < 2 && t0.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!((gate.waiting(), gate.available()), (0, 2));
}

/// The queue behind the door: one sequence at a time, the worker busy with carol's video,
/// alice's four requests admitted (queued, or one held by the worker until it fits), then
/// bob's: his is taken next, not after all of hers.
#[tokio::test]
async fn a_queued_burst_does_not_keep_another_tenant_waiting_behind_it() {
    let s = server_with(true, |c| {
        c.limits.queue_depth = 8;
        c.limits.max_batch = 1;
        c.limits.queue_wait_s = 30.0;
    });
    let carol = s.tenant("carol", None);
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let mut video = qa_body();
    video["budget"] = json!("1e12");
    video["frames"] = json!(8);
    let t0 = std::time::Instant::now();
    let busy = s.spawn_post(&carol, "/v1/videos/qa", video);
    while !s.state.metrics.render().contains("vvlm_in_flight 1") && t0.elapsed().as_secs() < 30 {
        tokio::task::yield_now().await;
    }
    let hers: Vec<_> = (0..4)
        .map(|_| s.spawn_post(&alice, "/v1/chat/completions", text_chat(8)))
        .collect();
    while s.state.pool.queued() < 3 && t0.elapsed().as_secs() < 30 {
        tokio::task::yield_now().await;
    }
    // Three queued and one held by the worker until it fits, or all four queued (the worker
    // takes the next job between decode steps, not while it encodes a video).
    let queued = s.state.pool.queued();
    assert!(
        (3..=4).contains(&queued),
        "{queued} of alice's requests queued behind carol's video"
    );
    let (status, bob_done) = s
        .spawn_post(&bob, "/v1/chat/completions", text_chat(8))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(busy.await.unwrap().0, 200);
    let mut before_bob = 0;
    for h in hers {
        let (status, done) = h.await.unwrap();
        assert_eq!(status, 200);
        before_bob += (done < bob_done) as usize;
    }
    // Only the one the worker held when bob came; first come first served: all four.
    assert!(
        before_bob <= 1,
        "{before_bob} of alice's requests finished before bob's"
    );
}

/// Every answer names its request (`x-request-id`), errors included; an engine request's id is
/// its chat completion's id and its row in the tenant's request history; a client's own id is
/// echoed when it is well formed.
#[tokio::test]
async fn every_answer_names_its_request() {
    let s = server();
    let key = s.tenant("alice", None);
    let id_of = |h: &axum::http::HeaderMap| {
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert!(id.starts_with("req-"), "{id}");
        id
    };
    let mut seen = std::collections::HashSet::new();
    for (method, path, key) in [
        (Method::GET, "/health", None),
        (Method::GET, "/v1/usage", Some("wrong")),
        (Method::GET, "/no/such/route", Some(key.as_str())),
        (Method::GET, "/v1/usage", Some(key.as_str())),
    ] {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let (_, headers, _) = s.send(b.body(Body::empty()).unwrap()).await;
        assert!(seen.insert(id_of(&headers)), "ids are unique");
        assert!(headers.get("x-client-request-id").is_none());
    }
    let chat = |client: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-client-request-id", client)
            .body(Body::from(text_chat(2).to_string()))
            .unwrap()
    };
    let (st, headers, v) = s.send(chat("trace-7f3a")).await;
    assert_eq!(st, 200, "{v}");
    let id = id_of(&headers);
    assert_eq!(headers["x-client-request-id"], "trace-7f3a");
    assert_eq!(v["id"], format!("chatcmpl-{id}"));
    let (st, history) = s
        .json(
            Method::GET,
            "/admin/tenants/alice/requests?limit=1",
            Some(ADMIN),
            Value::Null,
        )
        .await;
    assert_eq!(st, 200, "{history}");
    assert_eq!(history["requests"][0]["request_id"], id.as_str());
    // A malformed client id (a space; too long) is not echoed; the request is served.
    for bad in ["two words", &"x".repeat(129)] {
        let (st, headers, _) = s.send(chat(bad)).await;
        assert_eq!(st, 200);
        assert!(headers.get("x-client-request-id").is_none(), "{bad}");
    }
}

#[tokio::test]
async fn health_names_the_models_and_the_cpu_kernels_once_loaded() {
    let s = server_with(true, |_| {});
    let (st, v) = s.json(Method::GET, "/health", None, Value::Null).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["models"], json!(["suite-m", "suite-s"]));
    let kernels = v["cpu_kernels"].as_str().unwrap();
    assert!(
        vvlm_engine::CpuKernels::NAMES[1..].contains(&kernels),
        "{kernels}"
    );
}

#[tokio::test]
async fn before_models_load_health_and_requests_are_503() {
    let s = server_with(false, |_| {});
    let key = s.tenant("alice", None);
    let (st, v) = s.json(Method::GET, "/health", None, Value::Null).await;
    assert_eq!((st, kind(&v)), (503, "not_ready"));
    let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!((st, kind(&v)), (503, "not_ready"));
}

#[tokio::test]
async fn a_request_over_its_time_is_504_and_a_stream_ends_with_the_error_event() {
    let s = server_with(true, |c| c.limits.request_timeout_s = 0.000_001);
    let key = s.tenant("alice", None);
    let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!((st, kind(&v)), (504, "timeout"));
    let body = json!({"stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", &video_bytes())}},
        {"type": "text", "text": "what colour is the flash ?"}]}]});
    let (st, v) = s.post("/v1/chat/completions", &key, body).await;
    assert_eq!(st, 200);
    let text = v.as_str().unwrap();
    let last = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .unwrap();
    let e: Value = serde_json::from_str(last).unwrap();
    assert_eq!(kind(&e), "timeout", "{text}");
}

#[tokio::test]
async fn images_are_frames() {
    let s = server();
    let key = s.tenant("alice", None);
    let mut png = vec![];
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let body = json!({"images": [data_url("image/png", &png), data_url("image/png", &png)],
                      "question": "what colour is the flash ?", "max_tokens": 2, "frames": 2});
    let (st, v) = s.post("/v1/videos/qa", &key, body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["plan"]["frames"], 2);
    assert!(v["usage"]["visual_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn two_loaded_models_are_listed_and_each_can_be_pinned() {
    let s = server();
    let key = s.tenant("alice", None);
    let (st, v) = s
        .json(Method::GET, "/v1/models", Some(&key), Value::Null)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["object"], "list");
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["suite-m", "suite-s"]);
    // One model by name is the list's entry; an unknown one is 404 naming `model`.
    let (st, one) = s
        .json(Method::GET, "/v1/models/suite-m", Some(&key), Value::Null)
        .await;
    assert_eq!(st, 200, "{one}");
    let listed = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "suite-m");
    assert_eq!(Some(&one), listed);
    let (st, e) = s
        .json(Method::GET, "/v1/models/nope", Some(&key), Value::Null)
        .await;
    assert_eq!(
        (st, kind(&e), &e["error"]["param"]),
        (404, "model_not_found", &json!("model"))
    );
    for m in ids {
        let mut body = qa_body();
        body["model"] = json!(m);
        let (st, v) = s.post("/v1/videos/qa", &key, body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["plan"]["model"], m);
    }
}

#[tokio::test]
async fn text_only_chat_is_planned_on_text_alone() {
    let s = server();
    let key = s.tenant("alice", None);
    let body = json!({"messages": [{"role": "user", "content": "what colour is the flash ?"}],
                      "max_tokens": 3});
    let (st, v) = s.post("/v1/chat/completions", &key, body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["plan"]["frames"], 0);
    assert_eq!(v["usage"]["visual_tokens"], 0);
    assert_eq!(v["usage"]["measured_flops"]["vision"], 0.0);
    // The caption and QA routes still need a video.
    let (st, v) = s
        .post("/v1/videos/qa", &key, json!({"question": "hi"}))
        .await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("video")));
}

#[tokio::test]
async fn multipart_fields_are_the_same_options() {
    let s = server();
    let key = s.tenant("alice", None);
    let boundary = "vvlmboundary";
    let field = |name: &str, value: &str| {
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
    };
    let form = |frames: &str| {
        let mut body = vec![];
        body.extend(field("question", "what colour is the flash ?").bytes());
        body.extend(field("max_tokens", "3").bytes());
        body.extend(field("frames", frames).bytes());
        body.extend(field("budget", "1G").bytes());
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").bytes(),
        );
        body.extend(video_bytes());
        body.extend(format!("\r\n--{boundary}--\r\n").bytes());
        Request::builder()
            .method(Method::POST)
            .uri("/v1/videos/qa")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap()
    };
    let (st, _, v) = s.send(form("2")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["plan"]["frames"], 2);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    // A bad number names its field, as in JSON.
    let (st, _, v) = s.send(form("two")).await;
    assert_eq!(
        (st.as_u16(), v["error"]["param"].as_str()),
        (422, Some("frames")),
        "{v}"
    );
}

#[tokio::test]
async fn engine_errors_keep_their_kind() {
    use vvlm_server::error::ApiError;
    let bad = ApiError::from(vvlm_engine::EngineError::Request("frames: wrong".into()));
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let cancelled = ApiError::from(vvlm_engine::EngineError::Cancelled);
    assert_eq!(cancelled.status(), StatusCode::GATEWAY_TIMEOUT);
    let broken = ApiError::from(vvlm_engine::EngineError::Checkpoint("x".into()));
    assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_at_the_quota_edge_never_overspend() {
    let s = server();
    // Price one request as the server will.
    let probe = s.tenant("probe", None);
    let (st, plan) = s
        .post(
            "/v1/plan",
            &probe,
            json!({"prompt": "what colour is the flash ?", "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{plan}");
    let price = plan["cost_flops"].as_f64().unwrap();
    // Room for exactly 3 reservations.
    let quota = 3.5 * price;
    let key = s.tenant("edge", Some(quota));
    let s = Arc::new(s);
    let mut tasks = vec![];
    for _ in 0..8 {
        let (s, key) = (s.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            s.post("/v1/videos/qa", &key, qa_body()).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    let mut measured = 0.0;
    for t in tasks {
        let (st, v) = t.await.unwrap();
        match st {
            200 => {
                ok += 1;
                measured += v["usage"]["measured_flops"]["total"].as_f64().unwrap();
            }
            402 | 429 => refused += 1,
            other => panic!("{other}: {v}"),
        }
    }
    assert!(ok >= 3, "{ok} answered");
    assert!(refused >= 1, "nothing refused");
    let (_, u) = s
        .json(Method::GET, "/v1/usage", Some(&key), Value::Null)
        .await;
    let charged = u["charged_flops"].as_f64().unwrap();
    assert!(charged <= quota, "charged {charged} over quota {quota}");
    // Every answered request is charged what it measured: nothing lost, nothing twice.
    assert!(
        (charged - measured).abs() <= 1e-6 * measured,
        "{charged} vs {measured}"
    );
    assert_eq!(u["reserved_flops"].as_f64().unwrap(), 0.0);
}

#[tokio::test]
async fn the_console_is_served_open_with_its_policy() {
    let s = server();
    for path in ["/", "/console/app.js", "/console/samples/suite-00003.mp4"] {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let (st, h, _) = s.send(req).await;
        assert_eq!(st, 200, "{path}");
        assert_eq!(
            h[header::CONTENT_SECURITY_POLICY],
            vvlm_server::console::CSP,
            "{path}"
        );
    }
    let (st, v) = s.json(Method::POST, "/", None, json!({})).await;
    assert_eq!((st, kind(&v)), (405, "method_not_allowed"));
    let req = Request::get("/console/nothing.js")
        .body(Body::empty())
        .unwrap();
    let (st, _, v) = s.send(req).await;
    assert_eq!((st.as_u16(), kind(&v)), (404, "not_found"));
}

#[tokio::test]
async fn a_tenants_history_holds_its_requests_plans_and_charges_and_keys_rotate() {
    let s = server();
    let key = s.tenant("alice", None);
    let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!(st, 200, "{v}");
    let measured = v["usage"]["measured_flops"]["total"].as_f64().unwrap();
    let path = "/admin/tenants/alice/requests?limit=5&bucket_s=60&buckets=3";
    let (st, h) = s.json(Method::GET, path, Some(ADMIN), Value::Null).await;
    assert_eq!(st, 200, "{h}");
    let reqs = h["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["state"], "settled");
    assert_eq!(reqs[0]["charged_flops"].as_f64().unwrap(), measured);
    assert_eq!(reqs[0]["plan"]["model"], v["plan"]["model"]);
    assert_eq!(reqs[0]["plan"]["frames"], v["plan"]["frames"]);
    let points = h["series"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    let charged: f64 = points
        .iter()
        .map(|p| p["charged_flops"].as_f64().unwrap())
        .sum();
    assert_eq!(charged, measured);
    // Admin only; bounded; a tenant that does not exist is 404.
    let (st, _) = s.json(Method::GET, path, Some(&key), Value::Null).await;
    assert_eq!(st, 401);
    let bad = "/admin/tenants/alice/requests?bucket_s=0";
    let (st, v) = s.json(Method::GET, bad, Some(ADMIN), Value::Null).await;
    assert_eq!((st, kind(&v)), (422, "validation_error"));
    let nobody = "/admin/tenants/nobody/requests";
    let (st, _) = s.json(Method::GET, nobody, Some(ADMIN), Value::Null).await;
    assert_eq!(st, 404);
    // Rotation: the old key stops working at once, the new one works.
    let (st, _) = s.post("/admin/tenants/alice/key", &key, json!({})).await;
    assert_eq!(st, 401);
    let (st, r) = s.post("/admin/tenants/alice/key", ADMIN, json!({})).await;
    assert_eq!(st, 200, "{r}");
    let new_key = r["api_key"].as_str().unwrap();
    assert_eq!(r["tenant"]["name"], "alice");
    let (st, _) = s
        .json(Method::GET, "/v1/usage", Some(&key), Value::Null)
        .await;
    assert_eq!(st, 401);
    let (st, u) = s
        .json(Method::GET, "/v1/usage", Some(new_key), Value::Null)
        .await;
    assert_eq!((st, u["requests"].as_u64()), (200, Some(1)));
}

#[tokio::test]
async fn a_plan_answers_its_price_by_component_and_on_request_every_candidate() {
    let s = server();
    let key = s.tenant("alice", None);
    let body =
        json!({"budget": "1G", "task": "detail", "prompt": "what shape is the small object ?"});
    let (st, p) = s.post("/v1/plan", &key, body.clone()).await;
    assert_eq!(st, 200, "{p}");
    assert!(p.get("candidates").is_none());
    let parts = &p["cost_by_component"];
    let sum: f64 = ["vision", "projector", "lm_prefill", "lm_decode"]
        .iter()
        .map(|k| parts[k].as_f64().unwrap())
        .sum();
    let cost = p["cost_flops"].as_f64().unwrap();
    assert!((sum - cost).abs() <= 1e-9 * cost, "{parts} vs {cost}");
    let mut with = body.clone();
    with["candidates"] = json!(true);
    let (st, c) = s.post("/v1/plan", &key, with).await;
    assert_eq!(st, 200, "{c}");
    let all = c["candidates"].as_array().unwrap();
    // suite-s and suite-m: 32 frames x 8 sides each.
    assert_eq!(all.len(), 2 * 32 * 8);
    // The plan is the best candidate within the budget (ties to the cheaper).
    let best = all
        .iter()
        .filter(|x| x["cost_flops"].as_f64().unwrap() <= 1e9)
        .min_by(|a, b| {
            let e = |x: &&Value| x["predicted_error"].as_f64().unwrap();
            let f = |x: &&Value| x["cost_flops"].as_f64().unwrap();
            e(a).total_cmp(&e(b)).then(f(a).total_cmp(&f(b)))
        })
        .unwrap();
    for k in ["model", "frames", "tokens_per_frame", "cost_flops"] {
        assert_eq!(best[k], c[k], "{k}");
    }
    // A multiple-choice question is priced at its longest choice's bytes (+ the stop token)
    // of decode, not at the server's expected answer length.
    let mut choice = body.clone();
    choice["guided_choice"] = json!(["circle", "square"]);
    choice.as_object_mut().unwrap().remove("candidates");
    let (st, q) = s.post("/v1/plan", &key, choice).await;
    assert_eq!(st, 200, "{q}");
    let decode = |p: &Value| p["cost_by_component"]["lm_decode"].as_f64().unwrap();
    assert!(
        decode(&q) < decode(&p) / 2.0,
        "{} vs {}",
        decode(&q),
        decode(&p)
    );
    let mut bad = json!({"budget": "1G", "candidates": "yes"});
    let (st, v) = s.post("/v1/plan", &key, bad.take()).await;
    assert_eq!((st, kind(&v)), (422, "validation_error"));
    assert_eq!(v["error"]["param"], "candidates");
}

#[tokio::test]
async fn a_cached_video_answers_the_same_for_less_and_stays_with_its_tenant() {
    let s = server();
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let mut body = qa_body();
    body["model"] = json!("suite-m");
    body["frames"] = json!(8);
    body["tokens_per_frame"] = json!(16);
    let (st, cold) = s.post("/v1/videos/qa", &alice, body.clone()).await;
    assert_eq!(st, 200, "{cold}");
    assert_eq!(
        cold["usage"]["cache"],
        json!({"frames": false, "vision": false})
    );
    let cold_plan = &cold["plan"];
    assert_eq!(cold_plan["cost_flops"], cold_plan["cold_cost_flops"]);
    assert!(cold["usage"]["measured_flops"]["vision"].as_f64().unwrap() > 0.0);

    // The same video again: frames and features from the cache, the same answer, no vision
    // FLOPs measured or charged, and the plan priced at its marginal cost.
    let (_, before) = s
        .json(Method::GET, "/v1/usage", Some(&alice), Value::Null)
        .await;
    let (st, warm) = s.post("/v1/videos/qa", &alice, body.clone()).await;
    assert_eq!(st, 200, "{warm}");
    assert_eq!(
        warm["usage"]["cache"],
        json!({"frames": true, "vision": true})
    );
    assert_eq!(warm["text"], cold["text"]);
    // The KV of the prompt up to and including the video came from the cache too: only the
    // question was prefilled.
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached(&cold), Some(0));
    let hit = cached(&warm).unwrap();
    assert!(hit >= 8 * 16, "{warm}");
    assert!(hit < warm["usage"]["prompt_tokens"].as_u64().unwrap());
    let prefill = |v: &Value| v["usage"]["measured_flops"]["lm_prefill"].as_f64().unwrap();
    assert!(prefill(&warm) < prefill(&cold) / 2.0, "{warm}");
    let marginal_of = |v: &Value| v["plan"]["cost_flops"].as_f64().unwrap();
    let mv = &warm["usage"]["measured_flops"];
    assert_eq!(
        (mv["vision"].as_f64(), mv["projector"].as_f64()),
        (Some(0.0), Some(0.0))
    );
    let marginal = warm["plan"]["cost_flops"].as_f64().unwrap();
    let full = warm["plan"]["cold_cost_flops"].as_f64().unwrap();
    assert_eq!(full, cold_plan["cost_flops"].as_f64().unwrap());
    assert!(marginal < full, "{marginal} vs {full}");
    // What was reserved covers what ran.
    let ran = mv["total"].as_f64().unwrap();
    assert!(ran <= marginal * (1.0 + 1e-9), "{ran} > {marginal}");
    let (_, after) = s
        .json(Method::GET, "/v1/usage", Some(&alice), Value::Null)
        .await;
    let charged =
        after["charged_flops"].as_f64().unwrap() - before["charged_flops"].as_f64().unwrap();
    assert!((charged - mv["total"].as_f64().unwrap()).abs() <= 1e-6 * charged);
    assert!(charged < cold["usage"]["measured_flops"]["total"].as_f64().unwrap());

    // Another system prompt: the features are cached but not a prefix made for it, so the plan
    // prices the visual tokens' prefill again (the engine would not reuse that KV either).
    let mut with_system = body.clone();
    with_system["system"] = json!("Answer in one word.");
    let (st, other) = s.post("/v1/videos/qa", &alice, with_system).await;
    assert_eq!(st, 200, "{other}");
    assert!(marginal_of(&other) > marginal_of(&warm), "{other}");
    assert!(marginal_of(&other) < full);

    // A budget between the marginal and the cold price: fits only because the video is cached.
    let mut tight = body.clone();
    tight["budget"] = json!((marginal + full) / 2.0);
    let (st, v) = s.post("/v1/videos/qa", &alice, tight.clone()).await;
    assert_eq!(st, 200, "{v}");
    // Another tenant sending the same video gets no hit (and that budget is too small cold).
    let (st, v) = s.post("/v1/videos/qa", &bob, tight).await;
    assert_eq!(st, 422, "{v}");
    let (st, v) = s.post("/v1/videos/qa", &bob, body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["usage"]["cache"],
        json!({"frames": false, "vision": false})
    );
    // A different question about the cached video: alice continues from the cached prefix; a
    // new tenant answers it cold: the same text.
    let carol = s.tenant("carol", None);
    let mut follow = body.clone();
    follow["question"] = json!("what shape moves ?");
    let (st, a) = s.post("/v1/videos/qa", &alice, follow.clone()).await;
    assert_eq!(st, 200, "{a}");
    let (st, c) = s.post("/v1/videos/qa", &carol, follow).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(cached(&c), Some(0));
    assert_eq!(cached(&a), Some(hit));
    assert_eq!(a["text"], c["text"]);
    assert!(prefill(&a) < prefill(&c));
}

#[tokio::test]
async fn the_cache_holds_no_more_than_its_cap() {
    // Room for no video at all: every request is cold, nothing is kept.
    let s = server_with(true, |c| c.cache.max_bytes = 1000);
    let key = s.tenant("alice", None);
    for _ in 0..2 {
        let (st, v) = s.post("/v1/videos/qa", &key, qa_body()).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["usage"]["cache"],
            json!({"frames": false, "vision": false})
        );
    }
    assert_eq!(s.state.cache.usage(), (0, 0));
    // With room, one entry per (video, checkpoint, frames), within the cap.
    let s = server_with(true, |c| c.cache.max_bytes = 64 << 20);
    let key = s.tenant("alice", None);
    let (st, _) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!(st, 200);
    // Again: the prompt's KV up to the video comes from the cache.
    let (st, _) = s.post("/v1/videos/qa", &key, qa_body()).await;
    assert_eq!(st, 200);
    let (entries, bytes) = s.state.cache.usage();
    assert_eq!(entries, 1);
    assert!(bytes > 0 && bytes <= 64 << 20);
    let (_, _, metrics) = s
        .send(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let text = metrics.as_str().unwrap();
    for line in [
        "vvlm_cache_lookups_total{what=\"vision\",result=\"miss\"} 1",
        "vvlm_cache_lookups_total{what=\"vision\",result=\"hit\"} 1",
        "vvlm_cache_lookups_total{what=\"prefix\",result=\"miss\"} 1",
        "vvlm_cache_lookups_total{what=\"prefix\",result=\"hit\"} 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    assert!(
        text.contains(&format!("vvlm_cache_bytes {bytes}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_never_wait_on_each_other() {
    // Two workers: one going idle (waiting for the queue) must not stall the other's batch.
    let s = Arc::new(server_with(true, |c| {
        c.limits.workers = 2;
        c.limits.request_timeout_s = 60.0;
    }));
    let key = s.tenant("alice", None);
    let t = std::time::Instant::now();
    let mut tasks = vec![];
    for i in 0..6 {
        let (s, key) = (s.clone(), key.clone());
        let mut body = qa_body();
        body["max_tokens"] = json!(2 + i % 3);
        tasks.push(tokio::spawn(async move {
            s.post("/v1/videos/qa", &key, body).await
        }));
    }
    for t in tasks {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "{v}");
    }
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t.elapsed()
    );
}

/// A chat's earlier messages: a follow-up about a video is answered with the whole conversation
/// as its prompt, the video's KV reused from the first turn (the video in the first user
/// message, so every turn shares the text before it), and equal to the same conversation sent
/// cold by another tenant. The rules of a conversation are 422s naming `messages`.
#[tokio::test]
async fn a_conversation_about_a_video_continues_from_its_cached_prefix() {
    let s = server();
    let alice = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let video = json!({"type": "video_url",
                       "video_url": {"url": data_url("video/mp4", &video_bytes())}});
    let first = json!({"role": "user", "content": [video.clone(),
                       {"type": "text", "text": "what colour is the flash ?"}]});
    let opts = |messages: Value| {
        json!({"model": "suite-m", "frames": 8, "tokens_per_frame": 16, "max_tokens": 4,
               "messages": messages})
    };
    let (st, one) = s
        .post("/v1/chat/completions", &alice, opts(json!([first.clone()])))
        .await;
    assert_eq!(st, 200, "{one}");
    let answer = one["choices"][0]["message"]["content"].clone();
    let conversation = json!([first.clone(), {"role": "assistant", "content": answer},
                              {"role": "user", "content": "what shape moves ?"}]);
    let (st, two) = s
        .post("/v1/chat/completions", &alice, opts(conversation.clone()))
        .await;
    assert_eq!(st, 200, "{two}");
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    // The whole conversation is the prompt; the video's part of it came from the first turn.
    assert!(tokens(&two) > tokens(&one) + 4, "{one}\n{two}");
    assert!(cached(&two).unwrap() >= 8 * 16, "{two}");
    // Cold (another tenant: caches are per tenant), the same answer, every token prefilled.
    let (st, cold) = s
        .post("/v1/chat/completions", &bob, opts(conversation))
        .await;
    assert_eq!(st, 200, "{cold}");
    assert_eq!(cached(&cold), Some(0));
    assert_eq!(tokens(&cold), tokens(&two));
    assert_eq!(
        cold["choices"][0]["message"]["content"],
        two["choices"][0]["message"]["content"]
    );
    // The rules.
    let text = |role: &str, t: &str| json!({"role": role, "content": t});
    let cases = [
        (
            json!([first.clone(), text("assistant", "red")]),
            "the last message must be the user's",
        ),
        (
            json!([
                text("user", "hi"),
                text("assistant", "hello"),
                first.clone()
            ]),
            "first user message",
        ),
        (
            json!([text("function", "x"), first.clone()]),
            "unsupported role",
        ),
        (
            json!([text("tool", "x"), first.clone()]),
            "must name a call",
        ),
        (
            json!([first.clone(), {"role": "assistant", "content": [video.clone()]},
                   text("user", "and?")]),
            "unsupported message part",
        ),
        (
            json!([
                text("user", &"a".repeat(5000)),
                text("assistant", &"b".repeat(5000)),
                text("user", "why?")
            ]),
            "longer than",
        ),
    ];
    for (messages, says) in cases {
        let (st, v) = s.post("/v1/chat/completions", &alice, opts(messages)).await;
        assert_eq!((st, kind(&v)), (422, "validation_error"), "{says}: {v}");
        assert_eq!(v["error"]["param"], "messages", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{says}: {msg}");
    }
}

/// A small deterministic generator (xorshift64*) for the hostile-body test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values a hostile or careless client puts where another was expected.
fn odd_value(rng: &mut Rng) -> Value {
    let deep = (0..80).fold(json!(1), |v, _| json!([v]));
    let choices = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(1.5),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x".repeat(20_000)),
        json!("\u{0}\u{7}\u{fffd}\u{10ffff} é 漢"),
        json!("5T"),
        json!("NaN"),
        json!([]),
        json!({}),
        json!([null, 1, "a"]),
        json!({"type": "object"}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}),
        deep,
    ];
    choices[rng.below(choices.len())].clone()
}

/// One random change to a JSON value: a value replaced (anywhere), a key removed or added.
fn mutate(v: &mut Value, rng: &mut Rng) {
    // Walk down to a random container.
    let mut at = v;
    loop {
        let go_deeper = rng.below(3) > 0;
        let next = match at {
            Value::Object(m) if go_deeper && !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                if m[&k].is_object() || m[&k].is_array() {
                    Some(k)
                } else {
                    None
                }
            }
            _ => None,
        };
        match next {
            Some(k) => at = at.get_mut(&k).unwrap(),
            None => break,
        }
    }
    match at {
        Value::Object(m) => match rng.below(3) {
            0 if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
            }
            1 => {
                let k = [
                    "extra",
                    "n",
                    "max_tokens",
                    "stream",
                    "logit_bias",
                    "stop",
                    "top_k",
                ][rng.below(7)];
                m.insert(k.into(), odd_value(rng));
            }
            _ if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.insert(k, odd_value(rng));
            }
            _ => {}
        },
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            a[i] = odd_value(rng);
        }
        other => *other = odd_value(rng),
    }
}

/// Hostile bodies: valid requests of every JSON route changed at random (values of the wrong
/// kind or size anywhere, keys removed and added, the text cut or a byte changed) are answered
/// 2xx or 4xx with a JSON error naming the problem, never 5xx or a dropped connection, and the
/// server still serves a plain request after them.
#[tokio::test]
async fn random_hostile_bodies_get_4xx_never_5xx() {
    let s = server();
    let key = s.tenant("alice", None);
    let seeds: Vec<(&str, Option<&str>, Value)> = vec![
        (
            "/v1/chat/completions",
            Some(&key),
            json!({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "what colour ?"}]}],
                   "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "stop": ["."], "n": 2,
                   "logit_bias": {"5": 1}, "guided_choice": ["red", "white"],
                   "stream": false, "seed": 3}),
        ),
        (
            "/v1/chat/completions",
            Some(&key),
            json!({"messages": [{"role": "user", "content": "what colour is the flash ?"},
                                {"role": "assistant", "content": "red"},
                                {"role": "user", "content": "what shape ?"}],
                   "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "presence_penalty": 0.5,
                   "repetition_penalty": 1.1, "min_p": 0.05, "top_k": 5,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            Some(&key),
            json!({"prompt": ["what colour is the flash ?"], "max_tokens": 3, "echo": true,
                   "n": 2, "best_of": 2, "stop": ["."], "seed": 4, "temperature": 0.7,
                   "stream": false, "user": "u1"}),
        ),
        (
            "/v1/completions",
            Some(&key),
            json!({"prompt": [[40, 11, 20, 35, 17, 6], [41, 39, 6]], "max_tokens": 2,
                   "echo": true, "logprobs": 1, "model": "suite-s", "temperature": 0}),
        ),
        (
            "/tokenize",
            Some(&key),
            json!({"prompt": "what colour is the flash ?", "model": "suite-s",
                   "add_special_tokens": false, "return_token_strs": true}),
        ),
        (
            "/detokenize",
            Some(&key),
            json!({"tokens": [40, 11, 20, 35, 17, 6], "model": "suite-m"}),
        ),
        (
            "/v1/plan",
            Some(&key),
            json!({"budget": "1G", "task": "detail", "prompt": "what shape ?", "frames": 4,
                   "tokens_per_frame": 16, "candidates": true, "n": 2, "guided_choice": ["a", "b"]}),
        ),
        (
            "/v1/videos/qa",
            Some(&key),
            json!({"video": data_url("video/mp4", &video_bytes()), "question": "what colour ?",
                   "max_tokens": 2, "budget": "1G"}),
        ),
        (
            "/admin/tenants",
            Some(ADMIN),
            json!({"name": "bob", "quota": "1P", "per_request_max": "1T", "period": "day",
                   "max_in_flight": 2}),
        ),
    ];
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let mut statuses = std::collections::BTreeMap::new();
    for (path, key, seed) in &seeds {
        // The seed itself is a valid request.
        let (st, v) = s.post(path, key.unwrap(), seed.clone()).await;
        assert!((200..300).contains(&st), "{path}: {st} {v}");
        if *path == "/admin/tenants" {
            let (st, _) = s
                .json(
                    Method::DELETE,
                    "/admin/tenants/bob",
                    Some(ADMIN),
                    Value::Null,
                )
                .await;
            assert_eq!(st, 204);
        }
        let rounds = if path.starts_with("/v1/videos") {
            40
        } else {
            150
        };
        for round in 0..rounds {
            let mut body = seed.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut body, &mut rng);
            }
            let mut bytes = body.to_string().into_bytes();
            match rng.below(8) {
                0 => bytes.truncate(rng.below(bytes.len() + 1)),
                1 if !bytes.is_empty() => {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
                _ => {}
            }
            let mut b = Request::builder()
                .method(Method::POST)
                .uri(*path)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(k) = key {
                b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
            }
            let (st, _, v) = s.send(b.body(Body::from(bytes.clone())).unwrap()).await;
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            assert!(
                !st.is_server_error(),
                "{path} round {round}: {st} for {shown}: {v}"
            );
            if st.is_client_error() {
                let m = v["error"]["message"].as_str().unwrap_or("");
                assert!(!m.is_empty(), "{path} round {round}: {st} {v} for {shown}");
                assert_json_words(m);
            }
            *statuses.entry((*path, st.as_u16())).or_insert(0) += 1;
            // Tenants made by the admin seed are removed again (the name is reused).
            if *path == "/admin/tenants" && st.is_success() {
                let name = v["tenant"]["name"].as_str().unwrap().to_string();
                let (st, _) = s
                    .json(
                        Method::DELETE,
                        &format!("/admin/tenants/{name}"),
                        Some(ADMIN),
                        Value::Null,
                    )
                    .await;
                assert_eq!(st, 204);
            }
        }
    }
    eprintln!("{statuses:?}");
    // Each route answered some mutated bodies and refused others.
    for (path, _, _) in &seeds {
        let ok = statuses
            .iter()
            .any(|((p, st), _)| p == path && (200..300).contains(st));
        let refused = statuses
            .iter()
            .any(|((p, st), _)| p == path && (400..500).contains(st));
        assert!(ok && refused, "{path}: {statuses:?}");
    }
    let (st, v) = s.post("/v1/chat/completions", &key, text_chat(2)).await;
    assert_eq!(st, 200, "{v}");
}

/// Hostile multipart forms: random fields (known and unknown names, odd values), the video part
/// present, missing, cut short or repeated, and the body cut anywhere: 2xx or 4xx with a JSON
/// error, never 5xx.
#[tokio::test]
async fn random_hostile_forms_get_4xx_never_5xx() {
    let s = server();
    let key = s.tenant("alice", None);
    let boundary = "hostileboundary";
    let video = video_bytes();
    let names = [
        "question",
        "prompt",
        "system",
        "max_tokens",
        "frames",
        "tokens_per_frame",
        "budget",
        "temperature",
        "n",
        "stop",
        "logit_bias",
        "guided_choice",
        "response_format",
        "seed",
        "task",
        "model",
        "logprobs",
        "top_logprobs",
        "unknown",
        "",
    ];
    let mut rng = Rng(0xf0f0_1234_abcd_9876);
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..60 {
        let mut body = vec![];
        let mut shown = vec![];
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nwhat colour ?\r\n")
                .bytes(),
        );
        for _ in 0..rng.below(5) {
            let name = names[rng.below(names.len())];
            let value = match odd_value(&mut rng) {
                Value::String(t) => t,
                v => v.to_string(),
            };
            shown.push(format!("{name}={}", &value[..value.len().min(40)]));
            body.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .bytes(),
            );
        }
        for _ in 0..rng.below(3) {
            let cut = if rng.below(3) == 0 {
                rng.below(video.len())
            } else {
                video.len()
            };
            shown.push(format!("video[..{cut}]"));
            body.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").bytes(),
            );
            body.extend(&video[..cut]);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").bytes());
        if rng.below(6) == 0 {
            let cut = rng.below(body.len());
            shown.push(format!("body[..{cut}]"));
            body.truncate(cut);
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/videos/qa")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap();
        let (st, _, v) = s.send(req).await;
        assert!(
            !st.is_server_error(),
            "round {round}: {st} for {shown:?}: {v}"
        );
        if st.is_client_error() {
            let m = v["error"]["message"].as_str().unwrap_or("");
            assert!(!m.is_empty(), "round {round}: {st} {v} for {shown:?}");
        }
        *statuses.entry(st.as_u16()).or_insert(0) += 1;
    }
    eprintln!("{statuses:?}");
    assert!(statuses.contains_key(&200) && statuses.keys().any(|s| (400..500).contains(s)));
}

/// `/v1/completions`: the prompt as it is, OpenAI's `text_completion` shape with the request's id, `echo`,
/// `logprobs` as a count, the same text streamed, and each field it refuses by name.
#[tokio::test]
async fn text_completions_continue_the_prompt_as_it_is() {
    let s = server();
    let key = s.tenant("alice", None);
    let prompt = "what colour is the flash ?";
    let req = |body: Value| post_request("/v1/completions", &key, &body);
    let (st, headers, v) = s
        .send(req(
            json!({"prompt": prompt, "max_tokens": 4, "model": "suite-s"}),
        ))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(v["id"], format!("cmpl-{id}"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    // Six words of a word-level vocabulary, nothing around them.
    assert_eq!(v["usage"]["prompt_tokens"], 6, "{v}");
    // One prompt in a list is that prompt; the default length is OpenAI's 16.
    let (st, _, one) = s
        .send(req(json!({"prompt": [prompt], "model": "suite-s"})))
        .await;
    assert_eq!(st, 200, "{one}");
    assert!(one["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    // echo: the prompt, then the completion.
    let (st, _, e) = s
        .send(req(
            json!({"prompt": prompt, "max_tokens": 4, "model": "suite-s", "echo": true}),
        ))
        .await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["choices"][0]["text"], format!("{prompt}{text}"));
    // logprobs: 2 alternatives per token, one entry per generated token.
    let (st, _, l) = s
        .send(req(
            json!({"prompt": prompt, "max_tokens": 4, "model": "suite-s", "logprobs": 2}),
        ))
        .await;
    assert_eq!(st, 200, "{l}");
    let lp = &l["choices"][0]["logprobs"];
    let n = l["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{lp}");
    assert!(lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64().unwrap() <= 0.0));
    assert!(lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m.as_object().unwrap().len() == 2));
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.first(), Some(&0));
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    // echo with logprobs (lm-eval's log-likelihood requests): the prompt's tokens with their
    // log-probabilities (the first null), then the completion's, as without echo.
    let scored = |echo: bool| {
        req(
            json!({"prompt": prompt, "max_tokens": 2, "model": "suite-s", "logprobs": 1,
                   "echo": echo, "temperature": 0}),
        )
    };
    let (st, _, el) = s.send(scored(true)).await;
    assert_eq!(st, 200, "{el}");
    let (st, _, plain) = s.send(scored(false)).await;
    assert_eq!(st, 200, "{plain}");
    let (lp, plain_lp) = (
        &el["choices"][0]["logprobs"],
        &plain["choices"][0]["logprobs"],
    );
    let prompt_tokens = el["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let n = el["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let arr = |v: &Value, k: &str| v[k].as_array().unwrap().clone();
    assert_eq!(arr(lp, "tokens").len(), prompt_tokens + n, "{lp}");
    let logprobs = arr(lp, "token_logprobs");
    let tops = arr(lp, "top_logprobs");
    assert!(logprobs[0].is_null() && tops[0].is_null(), "{lp}");
    for (x, t) in logprobs.iter().zip(&tops).skip(1) {
        assert!(x.as_f64().unwrap() <= 0.0, "{lp}");
        assert_eq!(t.as_object().unwrap().len(), 1, "{lp}");
    }
    assert_eq!(
        logprobs[prompt_tokens..],
        arr(plain_lp, "token_logprobs")[..],
        "{lp}"
    );
    assert_eq!(
        arr(lp, "tokens")[prompt_tokens..],
        arr(plain_lp, "tokens")[..]
    );
    let continued = plain["choices"][0]["text"].as_str().unwrap();
    assert_eq!(el["choices"][0]["text"], format!("{prompt}{continued}"));
    let offsets: Vec<u64> = arr(lp, "text_offset")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), prompt_tokens + n);
    assert!(offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]));
    // Scoring the prompt is work done, and priced: the head (suite-s: 64 wide, 44 tokens) over
    // the prompt's positions but the last, measured and in the plan that was reserved.
    let head = 2.0 * (prompt_tokens - 1) as f64 * 64.0 * 44.0;
    let prefill = |v: &Value| v["usage"]["measured_flops"]["lm_prefill"].as_f64().unwrap();
    assert_eq!(
        prefill(&el) - prefill(&plain),
        head,
        "{} vs {}",
        el["usage"],
        plain["usage"]
    );
    let planned = |v: &Value| v["plan"]["cost_flops"].as_f64().unwrap();
    assert_eq!(
        planned(&el) - planned(&plain),
        head,
        "{} vs {}",
        el["plan"],
        plain["plan"]
    );
    // Streamed: text_completion chunks whose texts make the same (greedy) completion.
    let (st, _, sse) = s
        .send(req(
            json!({"prompt": prompt, "max_tokens": 4, "model": "suite-s", "stream": true}),
        ))
        .await;
    assert_eq!(st, 200);
    let events: Vec<&str> = sse
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut streamed = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion", "{c}");
        streamed += c["choices"][0]["text"].as_str().unwrap();
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = Some(c["choices"][0]["finish_reason"].clone());
        }
    }
    assert_eq!(streamed, text);
    assert!(finish.is_some(), "{events:?}");
    // Refused by name.
    for (body, status, param) in [
        (json!({"prompt": prompt, "suffix": "!"}), 400, "suffix"),
        (json!({}), 422, "prompt"),
        (json!({"prompt": []}), 422, "prompt"),
        (json!({"prompt": {"text": prompt}}), 422, "prompt"),
        (json!({"prompt": [[40, 11], "what"]}), 422, "prompt"),
        (json!({"prompt": [40, -11]}), 422, "prompt"),
        (json!({"prompt": [40, 1.5]}), 422, "prompt"),
        (json!({"prompt": [40, 4294967296u64]}), 422, "prompt"),
        (json!({"prompt": "   "}), 422, "prompt"),
        (json!({"prompt": [prompt, ""]}), 422, "prompt[1]"),
        (json!({"prompt": [[40, 11], []]}), 422, "prompt[1]"),
        (json!({"prompt": [[40, 11], [40, -1]]}), 422, "prompt[1]"),
        // Ids past suite-s's 44-token vocabulary.
        (
            json!({"prompt": [40, 44], "model": "suite-s"}),
            422,
            "prompt",
        ),
        (json!({"prompt": [[40], [35, 9999]]}), 422, "prompt[1]"),
        (json!({"prompt": vec![prompt; 65]}), 422, "prompt"),
        (json!({"prompt": prompt, "best_of": 3}), 422, "best_of"),
        (json!({"prompt": prompt, "logprobs": 6}), 422, "logprobs"),
        (
            json!({"prompt": prompt, "logprobs": 1, "echo": true, "stream": true}),
            422,
            "stream",
        ),
        (json!({"prompt": prompt, "echo": "yes"}), 422, "echo"),
        (
            json!({"prompt": prompt, "max_tokens": 0}),
            422,
            "max_tokens",
        ),
    ] {
        let (st, _, v) = s.send(req(body.clone())).await;
        assert_eq!(
            (st.as_u16(), v["error"]["param"].as_str()),
            (status, Some(param)),
            "{body}: {v}"
        );
    }
}

/// `POST /v1/completions` with token ids and with several prompts (what lm-eval's
/// `local-completions` sends by default): ids answer as the text they stand for; each of several
/// prompts answers as it would alone, in choices `i * n + j`, with the usage summed, each
/// prompt's plan, and a reservation of its own in the tenant's history; the request's one
/// admission place is given back at the end.
#[tokio::test]
async fn text_completions_take_token_ids_and_several_prompts() {
    let s = server();
    let key = s.tenant("alice", None);
    let capacity = s.state.admission.available();
    // suite-s's word-level vocabulary (models/ladder/suite-s/tokenizer.json), read by hand:
    // what=40 colour=11 is=20 the=35 flash=17 ?=6; which=41 way=39 does=15 object=27 move=23.
    let (colour, colour_ids) = ("what colour is the flash ?", json!([40, 11, 20, 35, 17, 6]));
    let (way, way_ids) = (
        "which way does the object move ?",
        json!([41, 39, 15, 35, 27, 23, 6]),
    );
    let greedy = |prompt: Value, extra: Value| {
        let mut b = json!({"prompt": prompt, "max_tokens": 4, "model": "suite-s",
                           "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let mut alone = vec![];
    for p in [colour, way] {
        let (st, v) = s
            .post("/v1/completions", &key, greedy(json!(p), json!({})))
            .await;
        assert_eq!(st, 200, "{v}");
        alone.push(v);
    }
    let text = |v: &Value, i: usize| v["choices"][i]["text"].as_str().unwrap().to_string();
    // Token ids: the same completion and prompt tokens as the text; echo decodes them.
    let (st, by_ids) = s
        .post(
            "/v1/completions",
            &key,
            greedy(colour_ids.clone(), json!({"echo": true})),
        )
        .await;
    assert_eq!(st, 200, "{by_ids}");
    assert_eq!(text(&by_ids, 0), format!("{colour}{}", text(&alone[0], 0)));
    assert_eq!(by_ids["usage"]["prompt_tokens"], 6, "{by_ids}");
    assert_eq!(
        by_ids["usage"]["completion_tokens"],
        alone[0]["usage"]["completion_tokens"]
    );
    // Scored (echo with logprobs): the prompt's own tokens come back, the first unscored.
    let (st, scored) = s
        .post(
            "/v1/completions",
            &key,
            greedy(
                colour_ids.clone(),
                json!({"echo": true, "logprobs": 1, "max_tokens": 1}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{scored}");
    let tokens = scored["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap();
    let words: Vec<&str> = tokens[..6].iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(words.join(" "), colour);
    assert!(scored["choices"][0]["logprobs"]["token_logprobs"][0].is_null());
    // Unpinned: both served checkpoints read ids alike (one vocabulary), so the planner chooses.
    let (st, v) = s
        .post(
            "/v1/completions",
            &key,
            json!({"prompt": colour_ids, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // Several prompts, two completions each (one greedy: both the same), as texts and as ids.
    for prompts in [json!([colour, way]), json!([colour_ids, way_ids])] {
        let (st, headers, v) = s
            .post_full(
                "/v1/completions",
                &key,
                &greedy(prompts.clone(), json!({"n": 2})),
            )
            .await;
        assert_eq!(st, 200, "{prompts}: {v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4, "{v}");
        for (k, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], k, "{v}");
            assert_eq!(text(&v, k), text(&alone[k / 2], 0), "choice {k}: {v}");
        }
        let usage = |v: &Value, f: &str| v["usage"][f].as_u64().unwrap();
        assert_eq!(
            usage(&v, "prompt_tokens"),
            usage(&alone[0], "prompt_tokens") + usage(&alone[1], "prompt_tokens")
        );
        assert_eq!(
            usage(&v, "completion_tokens"),
            2 * (usage(&alone[0], "completion_tokens") + usage(&alone[1], "completion_tokens"))
        );
        let decode = |v: &Value| v["usage"]["measured_flops"]["lm_decode"].as_f64().unwrap();
        assert!(
            decode(&v) > decode(&alone[0]).max(decode(&alone[1])),
            "{}",
            v["usage"]
        );
        assert_eq!(v["plans"].as_array().unwrap().len(), 2, "{v}");
        // Each prompt is reserved and charged under its own id, the request's with its index.
        let id = headers["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(v["id"], format!("cmpl-{id}"));
        let (st, history) = s
            .json(
                Method::GET,
                "/admin/tenants/alice/requests?limit=2",
                Some(ADMIN),
                Value::Null,
            )
            .await;
        assert_eq!(st, 200, "{history}");
        let mut ids: Vec<&str> = history["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, [format!("{id}-0"), format!("{id}-1")], "{history}");
    }
    // Streamed: every prompt's completions as chunks of their choice (i * n + j), each ending
    // with its finish reason, then one usage chunk summing both prompts, then [DONE].
    let body = greedy(
        json!([colour, way]),
        json!({"n": 2, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (st, _, sse) = s.post_full("/v1/completions", &key, &body).await;
    assert_eq!(st, 200, "{sse}");
    let events: Vec<&str> = sse
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{events:?}");
    let mut texts = vec![String::new(); 4];
    let mut finished = [0; 4];
    for e in &events[..events.len() - 2] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion", "{c}");
        let choice = &c["choices"][0];
        let k = choice["index"].as_u64().unwrap() as usize;
        texts[k] += choice["text"].as_str().unwrap();
        if !choice["finish_reason"].is_null() {
            finished[k] += 1;
        }
    }
    assert_eq!(finished, [1; 4], "{events:?}");
    for (k, t) in texts.iter().enumerate() {
        assert_eq!(*t, text(&alone[k / 2], 0), "choice {k}");
    }
    let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    let tokens = |v: &Value, f: &str| v["usage"][f].as_u64().unwrap();
    assert_eq!(
        tokens(&usage, "completion_tokens"),
        2 * (tokens(&alone[0], "completion_tokens") + tokens(&alone[1], "completion_tokens")),
        "{usage}"
    );
    assert_eq!(
        tokens(&usage, "prompt_tokens"),
        tokens(&alone[0], "prompt_tokens") + tokens(&alone[1], "prompt_tokens")
    );
    // Every place comes back once the requests are answered (the prompts shared one; a job
    // lets its place go as the worker drops it, just after it reports).
    let t0 = std::time::Instant::now();
    while s.state.admission.available() != capacity && t0.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(s.state.admission.available(), capacity);
}

/// Token ids mean different text to checkpoints with different vocabularies: unpinned, such a
/// prompt is refused naming `model`; pinned, it is served; text prompts are unaffected. The
/// second checkpoint is suite-s's weights with two words of its vocabulary swapped.
#[tokio::test]
async fn token_id_prompts_need_a_model_when_vocabularies_differ() {
    let s = server_with(true, |c| {
        let dir = c.models_dir.join("suite-x");
        std::fs::create_dir(&dir).unwrap();
        let src = repo().join("models/ladder/suite-s");
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let tok = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
        let swapped = tok
            .replace("\"red\": 30", "\"tmp\": 30")
            .replace("\"blue\": 9", "\"red\": 9")
            .replace("\"tmp\": 30", "\"blue\": 30");
        assert_ne!(swapped, tok);
        std::fs::write(dir.join("tokenizer.json"), swapped).unwrap();
        let toml = std::fs::read_to_string(repo().join("models/suite-s.toml"))
            .unwrap()
            .replace("name = \"suite-s\"", "name = \"suite-x\"")
            .replace(
                "path = \"ladder/suite-s\"",
                &format!("path = \"{}\"", dir.display()),
            );
        std::fs::write(c.models_dir.join("suite-x.toml"), toml).unwrap();
    });
    let key = s.tenant("alice", None);
    assert!(s.state.engine("suite-x").is_some());
    let ids = json!([40, 11, 20, 35, 17, 6]);
    let (st, v) = s
        .post(
            "/v1/completions",
            &key,
            json!({"prompt": ids, "max_tokens": 2}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (422, Some("model")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("suite-x"),
        "{v}"
    );
    for model in ["suite-s", "suite-x"] {
        let (st, v) = s
            .post(
                "/v1/completions",
                &key,
                json!({"prompt": ids, "max_tokens": 2, "model": model}),
            )
            .await;
        assert_eq!(st, 200, "{model}: {v}");
        assert_eq!(v["model"], model);
    }
    let (st, v) = s
        .post(
            "/v1/completions",
            &key,
            json!({"prompt": "what colour is the flash ?", "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

/// `POST /tokenize` and `POST /detokenize` (vLLM's): a served checkpoint's ids for a text
/// (suite-s's word-level vocabulary, read by hand from its tokenizer.json), the same ids back to
/// the text, and ids that answer as the text through `/v1/completions`; a tenant's key is
/// required, an unknown model is 404, an id outside the vocabulary and an unknown field 422.
#[tokio::test]
async fn tokenize_and_detokenize_use_the_checkpoints_vocabulary() {
    let s = server();
    let key = s.tenant("alice", None);
    let prompt = "what colour is the flash ?";
    let (st, v) = s
        .post(
            "/tokenize",
            &key,
            json!({"prompt": "What colour is the flash?", "return_token_strs": true}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens"], json!([40, 11, 20, 35, 17, 6]), "{v}");
    assert_eq!(v["count"], 6);
    assert_eq!(
        v["token_strs"],
        json!(["what", "colour", "is", "the", "flash", "?"])
    );
    // Both served checkpoints share the vocabulary: the first is answered for.
    assert_eq!(v["model"], "suite-m");
    let (st, plain) = s
        .post(
            "/tokenize",
            &key,
            json!({"prompt": prompt, "model": "suite-s"}),
        )
        .await;
    assert_eq!(st, 200, "{plain}");
    assert_eq!(plain["model"], "suite-s");
    assert!(plain["token_strs"].is_null());
    let (st, d) = s
        .post(
            "/detokenize",
            &key,
            json!({"tokens": v["tokens"], "model": "suite-s"}),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["prompt"], prompt);
    // The ids continue as the text does.
    let complete =
        |p: Value| json!({"prompt": p, "max_tokens": 4, "model": "suite-s", "temperature": 0});
    let (_, by_text) = s
        .post("/v1/completions", &key, complete(json!(prompt)))
        .await;
    let (_, by_ids) = s
        .post("/v1/completions", &key, complete(v["tokens"].clone()))
        .await;
    assert_eq!(by_ids["choices"][0]["text"], by_text["choices"][0]["text"]);
    // Refused, naming the problem.
    for (path, body, status, param) in [
        (
            "/tokenize",
            json!({"prompt": prompt, "model": "nope"}),
            404,
            Some("model"),
        ),
        ("/tokenize", json!({"model": "suite-s"}), 422, None),
        (
            "/tokenize",
            json!({"prompt": prompt, "messages": []}),
            422,
            None,
        ),
        (
            "/tokenize",
            json!({"prompt": "x".repeat(8001)}),
            422,
            Some("prompt"),
        ),
        (
            "/detokenize",
            json!({"tokens": [40, 44]}),
            422,
            Some("tokens"),
        ),
        ("/detokenize", json!({"tokens": [40, -1]}), 422, None),
    ] {
        let (st, v) = s.post(path, &key, body.clone()).await;
        assert_eq!(st, status, "{path} {body}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{v}"
        );
        if param.is_some() {
            assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        }
    }
    let (st, v) = s
        .json(Method::POST, "/tokenize", None, json!({"prompt": prompt}))
        .await;
    assert_eq!(st, 401, "{v}");
    // The model list says the same context (vLLM's `max_model_len`).
    let (_, models) = s
        .json(Method::GET, "/v1/models/suite-s", Some(&key), Value::Null)
        .await;
    assert_eq!(models["max_model_len"], 4096, "{models}");
    // vLLM's /tokenizer_info, as lm-eval's remote tokenizer reads it (suite-s's config.json:
    // eos id 2, "<eos>"; no BOS; 4096 positions; 44 tokens).
    let (st, v) = s
        .json(
            Method::GET,
            "/tokenizer_info?model=suite-s",
            Some(&key),
            Value::Null,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            &v["eos_token"],
            &v["bos_token"],
            &v["model_max_length"],
            &v["vocab_size"]
        ),
        (&json!("<eos>"), &Value::Null, &json!(4096), &json!(44)),
        "{v}"
    );
    for (path, status) in [
        ("/tokenizer_info?model=nope", 404),
        ("/tokenizer_info?color=red", 422),
    ] {
        let (st, v) = s.json(Method::GET, path, Some(&key), Value::Null).await;
        assert_eq!(st, status, "{path}: {v}");
    }
}

/// An upstream on loopback for media URLs: the suite's video and a PNG under `/v/`, a redirect,
/// a 404, a body over the media limit (2 MiB in these tests) and one slower than the fetch
/// deadline (1 s); its port.
async fn media_upstream(png: Vec<u8>) -> u16 {
    use axum::routing::get;
    let video = video_bytes();
    let app = axum::Router::new()
        .route("/v/a.mp4", get(move || async move { video.clone() }))
        .route("/v/a.png", get(move || async move { png.clone() }))
        .route(
            "/v/moved.mp4",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/v/a.mp4")]) }),
        )
        .route("/v/big.mp4", get(|| async { vec![0u8; 3 << 20] }))
        .route("/v/half.png", get(|| async { vec![0u8; 3 << 19] }))
        .route(
            "/v/slow.mp4",
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                "late"
            }),
        )
        .route("/other/a.mp4", get(|| async { "not allowed" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// Video and image URLs (`http(s)://`) are fetched only under `url_allow`'s prefixes, and then
/// answer as the same bytes sent as a `data:` URL: on `/v1/videos/qa` (`video`, `images`) and in
/// chat (`video_url`, `image_url`). Refused, each with its reason: a URL outside the prefixes or
/// with credentials (403), a redirect (422, naming its target), an upstream 404 (422), a body over
/// the media limit (413), a fetch past its deadline (422); a loopback address unless
/// `url_private` (403); and any URL when `url_allow` is empty (403).
#[tokio::test]
async fn media_urls_are_fetched_only_from_allowed_prefixes() {
    let mut png = vec![];
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let port = media_upstream(png.clone()).await;
    let base = format!("http://127.0.0.1:{port}");
    let allow = |c: &mut ServerConfig, private: bool| {
        c.url_allow = vec![format!("{base}/v/")];
        c.url_private = private;
        c.url_timeout_s = 1.0;
        c.media.max_bytes = 2 << 20;
    };
    let s = server_with(true, |c| allow(c, true));
    let key = s.tenant("alice", None);
    let qa = |video: String| {
        json!({"video": video, "question": "what colour is the flash ?", "max_tokens": 4,
               "temperature": 0, "model": "suite-s", "frames": 4})
    };
    let (st, by_data) = s
        .post(
            "/v1/videos/qa",
            &key,
            qa(data_url("video/mp4", &video_bytes())),
        )
        .await;
    assert_eq!(st, 200, "{by_data}");
    let (st, by_url) = s
        .post("/v1/videos/qa", &key, qa(format!("{base}/v/a.mp4?sig=abc")))
        .await;
    assert_eq!(st, 200, "{by_url}");
    assert_eq!(by_url["text"], by_data["text"]);
    assert_eq!(
        by_url["usage"]["prompt_tokens"],
        by_data["usage"]["prompt_tokens"]
    );
    // The same bytes: the video cache knows them (a hit, no decoding).
    assert_eq!(
        by_url["usage"]["cache"]["frames"], true,
        "{}",
        by_url["usage"]
    );
    let images = |urls: Vec<String>| {
        json!({"images": urls, "question": "what colour is the flash ?", "max_tokens": 2,
               "temperature": 0, "model": "suite-s", "frames": 2})
    };
    let (_, img_data) = s
        .post(
            "/v1/videos/qa",
            &key,
            images(vec![data_url("image/png", &png); 2]),
        )
        .await;
    let (st, img_url) = s
        .post(
            "/v1/videos/qa",
            &key,
            images(vec![data_url("image/png", &png), format!("{base}/v/a.png")]),
        )
        .await;
    assert_eq!(st, 200, "{img_url}");
    assert_eq!(img_url["text"], img_data["text"]);
    // Chat: a video_url part by URL answers as by data: URL.
    let chat = |url: String| {
        json!({"model": "suite-s", "max_tokens": 4, "temperature": 0, "frames": 4,
               "messages": [{"role": "user", "content": [
                   {"type": "video_url", "video_url": {"url": url}},
                   {"type": "text", "text": "what colour is the flash ?"}]}]})
    };
    let (st, c_data) = s
        .post(
            "/v1/chat/completions",
            &key,
            chat(data_url("video/mp4", &video_bytes())),
        )
        .await;
    assert_eq!(st, 200, "{c_data}");
    let (st, c_url) = s
        .post(
            "/v1/chat/completions",
            &key,
            chat(format!("{base}/v/a.mp4")),
        )
        .await;
    assert_eq!(st, 200, "{c_url}");
    assert_eq!(
        c_url["choices"][0]["message"]["content"],
        c_data["choices"][0]["message"]["content"]
    );
    // Refused, naming why.
    for (url, status, says) in [
        (
            format!("{base}/other/a.mp4"),
            403,
            "not under an allowed URL prefix",
        ),
        (
            format!("{base}/v-other/a.mp4"),
            403,
            "not under an allowed URL prefix",
        ),
        (
            format!("http://u:p@127.0.0.1:{port}/v/a.mp4"),
            403,
            "user name or password",
        ),
        (format!("{base}/v/moved.mp4?sig=s3cret"), 422, "to /v/a.mp4"),
        (format!("{base}/v/missing.mp4?sig=s3cret"), 422, "404"),
        (format!("{base}/v/big.mp4?sig=s3cret"), 413, "media limit"),
        (format!("{base}/v/slow.mp4?sig=s3cret"), 422, "fetching"),
    ] {
        let (st, v) = s.post("/v1/videos/qa", &key, qa(url.clone())).await;
        let m = v["error"]["message"].as_str().unwrap_or("");
        assert!(st == status && m.contains(says), "{url}: {st} {v}");
        // A presigned URL's query stays out of the answer.
        assert!(!m.contains("s3cret"), "{m}");
    }
    // Each outcome counted: three fetched (the video twice, the PNG), three refused before any
    // fetch, three failed upstream, one too large.
    let metrics = s.metrics().await;
    let fetched = 2 * video_bytes().len() + png.len();
    for line in [
        "vvlm_media_fetches_total{result=\"ok\"} 3".to_string(),
        "vvlm_media_fetches_total{result=\"refused\"} 3".to_string(),
        "vvlm_media_fetches_total{result=\"failed\"} 3".to_string(),
        "vvlm_media_fetches_total{result=\"too_large\"} 1".to_string(),
        format!("vvlm_media_fetch_bytes_total {fetched}"),
        "vvlm_media_fetch_seconds_count 7".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    // A request's URLs share the media limit (two of 1.5 MiB under 2 MiB: the second is refused;
    // a URL named twice is fetched once), and a request names at most 64.
    let (st, v) = s
        .post(
            "/v1/videos/qa",
            &key,
            images(vec![
                format!("{base}/v/half.png?n=1"),
                format!("{base}/v/half.png?n=2"),
            ]),
        )
        .await;
    assert_eq!(st, 413, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("together"),
        "{v}"
    );
    let fetched_ok = |m: String| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("vvlm_media_fetches_total{result=\"ok\"} "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = fetched_ok(s.metrics().await);
    let (st, v) = s
        .post(
            "/v1/videos/qa",
            &key,
            images(vec![format!("{base}/v/a.png"); 2]),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        fetched_ok(s.metrics().await),
        before + 1,
        "one URL twice, fetched once"
    );
    let (st, v) = s
        .post(
            "/v1/videos/qa",
            &key,
            images(vec![format!("{base}/v/a.png"); 65]),
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{v}"
    );
    // Loopback is refused unless url_private, and nothing is fetched without url_allow.
    let strict = server_with(true, |c| allow(c, false));
    let key = strict.tenant("alice", None);
    let (st, v) = strict
        .post("/v1/videos/qa", &key, qa(format!("{base}/v/a.mp4")))
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("private or local"),
        "{v}"
    );
    let closed = server();
    let key = closed.tenant("alice", None);
    let (st, v) = closed
        .post(
            "/v1/chat/completions",
            &key,
            chat(format!("{base}/v/a.mp4")),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no prefix in url_allow"),
        "{v}"
    );
}

impl Server {
    /// `POST /v1/files` as OpenAI's client sends it (multipart `purpose` and `file`).
    async fn upload(&self, key: &str, purpose: &str, content: &[u8]) -> (u16, Value) {
        let boundary = "vvlmbatchboundary";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes();
        body.extend(content);
        body.extend(format!("\r\n--{boundary}--\r\n").bytes());
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/files")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap();
        let (st, _, v) = self.send(req).await;
        (st.as_u16(), v)
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.json(Method::GET, path, Some(key), Value::Null).await
    }

    /// Uploads `lines` copies of one text completion as a batch file and creates its batch:
    /// the batch's id.
    async fn completions_batch(&self, key: &str, lines: usize, body: &Value) -> String {
        self.batch_of(key, lines, "/v1/completions", body).await
    }

    /// Uploads `lines` copies of one request to `endpoint` as a batch file and creates its
    /// batch: the batch's id.
    async fn batch_of(&self, key: &str, lines: usize, endpoint: &str, body: &Value) -> String {
        let input: String = (0..lines)
            .map(|i| batch_line(&format!("l{i}"), endpoint, body.clone()))
            .collect();
        let (st, f) = self.upload(key, "batch", input.as_bytes()).await;
        assert_eq!(st, 200, "{f}");
        let (st, b) = self
            .post(
                "/v1/batches",
                key,
                json!({"input_file_id": f["id"], "endpoint": endpoint,
                       "completion_window": "24h"}),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        b["id"].as_str().unwrap().to_string()
    }

    /// Runs batches in the background until the returned sender is dropped or sent `true`.
    fn run_batches(&self) -> tokio::sync::watch::Sender<bool> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(vvlm_server::batch_runner::run(self.state.clone(), stopped));
        stop
    }

    /// Sends `interactive` (a completions request answering `choices`) one after another, or
    /// two at once when `in_pairs`, while batch `id` runs, until the counter `until.0` reaches
    /// `until.1` or the batch closes; then waits for the batch to close and returns it.
    async fn preempting_lines(
        &self,
        key: &str,
        id: &str,
        interactive: &Value,
        choices: &Value,
        in_pairs: bool,
        until: (&str, f64),
    ) -> Value {
        let t = std::time::Instant::now();
        let send = || self.post("/v1/completions", key, interactive.clone());
        for sent in 1.. {
            let answers = if in_pairs {
                let (a, b) = tokio::join!(send(), send());
                vec![a, b]
            } else {
                vec![send().await]
            };
            for (st, v) in answers {
                assert_eq!(st, 200, "{v}");
                assert_eq!(&v["choices"], choices);
            }
            if metric(&self.metrics().await, until.0) >= until.1 {
                break;
            }
            if sent % 16 == 0 {
                let (_, b) = self.get(&format!("/v1/batches/{id}"), key).await;
                if b["status"] != "in_progress" {
                    break;
                }
            }
            assert!(t.elapsed().as_secs() < 60, "{} not reached", until.0);
        }
        self.closed_batch(key, id).await
    }

    /// Polls a batch until it is closed (at most 120 s).
    async fn closed_batch(&self, key: &str, id: &str) -> Value {
        let t = std::time::Instant::now();
        loop {
            let (st, b) = self.get(&format!("/v1/batches/{id}"), key).await;
            assert_eq!(st, 200, "{b}");
            if !matches!(b["status"].as_str(), Some("in_progress" | "cancelling")) {
                return b;
            }
            assert!(t.elapsed().as_secs() < 120, "batch not closed: {b}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// A stored file's JSONL lines.
    async fn jsonl(&self, key: &str, id: &Value) -> Vec<Value> {
        let (st, v) = self
            .get(&format!("/v1/files/{}/content", id.as_str().unwrap()), key)
            .await;
        assert_eq!(st, 200, "{v}");
        // One line is JSON itself; several come back as text.
        let text = match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn batch_line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string() + "\n"
}

/// A batch file of two greedy text completions (`a`, `b`).
fn two_completions() -> String {
    let line = |id: &str, prompt: &str| {
        batch_line(
            id,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 2, "temperature": 0}),
        )
    };
    line("a", "the flash is") + &line("b", "the ball is")
}

fn greedy_chat(text: &str) -> Value {
    json!({"messages": [{"role": "user", "content": text}], "max_tokens": 3, "temperature": 0})
}

/// Each line runs as the same request sent over HTTP would (the same answer, planned,
/// reserved and charged to the tenant); answers land in the output file and refusals in the
/// error file, in input order; another tenant sees none of it.
#[tokio::test]
async fn a_batch_runs_each_line_as_its_own_request() {
    let s = server();
    let key = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let video = s._dir.path().join("v.mp4");
    std::fs::write(&video, video_bytes()).unwrap();
    let with_video = json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": format!("file://{}", video.display())}},
            {"type": "text", "text": "what happens ?"}]}],
        "max_tokens": 4, "temperature": 0});
    let bad = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 9});
    let input = [
        batch_line(
            "q1",
            "/v1/chat/completions",
            greedy_chat("what colour is the flash ?"),
        ),
        batch_line("bad", "/v1/chat/completions", bad),
        batch_line("q3", "/v1/chat/completions", with_video.clone()),
    ]
    .concat();
    let (st, f) = s.upload(&key, "batch", input.as_bytes()).await;
    assert_eq!(st, 200, "{f}");
    assert_eq!(
        (
            f["object"].as_str(),
            f["purpose"].as_str(),
            f["bytes"].as_u64()
        ),
        (Some("file"), Some("batch"), Some(input.len() as u64))
    );
    let (st, b) = s
        .post(
            "/v1/batches",
            &key,
            json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"job": "nightly"}}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["status"], "in_progress");
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 0})
    );
    assert_eq!(b["metadata"]["job"], "nightly");
    let id = b["id"].as_str().unwrap().to_string();
    // Another tenant sees neither the batch nor its file.
    assert_eq!(s.get(&format!("/v1/batches/{id}"), &bob).await.0, 404);
    let file_path = format!("/v1/files/{}", f["id"].as_str().unwrap());
    assert_eq!(s.get(&file_path, &bob).await.0, 404);
    assert_eq!(s.get("/v1/batches", &bob).await.1["data"], json!([]));
    // The backlog, from the ledger, for autoscaling on it.
    let m = s.metrics().await;
    assert!(m.contains("\nvvlm_batches_open 1\n"), "{m}");
    assert!(m.contains("\nvvlm_batch_lines_pending 3\n"), "{m}");
    // The input cannot be deleted while the batch is open.
    let (st, v) = s
        .json(Method::DELETE, &file_path, Some(&key), Value::Null)
        .await;
    assert_eq!(st, 409, "{v}");

    let _runner = s.run_batches();
    let b = s.closed_batch(&key, &id).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    assert!(b["completed_at"].as_i64().is_some() && b["cancelled_at"].is_null());
    let output = s.jsonl(&key, &b["output_file_id"]).await;
    let errors = s.jsonl(&key, &b["error_file_id"]).await;
    let custom: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(custom, ["q1", "q3"]);
    let charged_by_batch = s
        .state
        .ledger
        .usage(
            &s.state.ledger.tenant_by_name("alice").unwrap(),
            vvlm_server::ledger::now(),
        )
        .unwrap();
    assert_eq!(
        charged_by_batch.requests, 2,
        "the refused line reserved nothing"
    );
    let mut measured = 0.0;
    for (l, direct) in output
        .iter()
        .zip([greedy_chat("what colour is the flash ?"), with_video])
    {
        let r = &l["response"];
        assert_eq!(r["status_code"], 200);
        assert!(l["error"].is_null());
        assert_eq!(
            l["id"],
            format!("batch_req_{}", r["request_id"].as_str().unwrap())
        );
        // The same request over HTTP answers the same.
        let (st, v) = s.post("/v1/chat/completions", &key, direct).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            r["body"]["choices"][0]["message"]["content"],
            v["choices"][0]["message"]["content"]
        );
        // The same configuration (the video is cached now: priced at its marginal cost).
        for k in ["model", "frames", "tokens_per_frame", "cold_cost_flops"] {
            assert_eq!(r["body"]["plan"][k], v["plan"][k], "{k}");
        }
        measured += r["body"]["usage"]["measured_flops"]["total"]
            .as_f64()
            .unwrap();
    }
    assert!(
        output[1]["response"]["body"]["usage"]["visual_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The batch's usage sums its answers' (the refusal reports none).
    let sum = |k: &str| -> u64 {
        output
            .iter()
            .map(|l| l["response"]["body"]["usage"][k].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        b["usage"]["input_tokens"].as_u64(),
        Some(sum("prompt_tokens")),
        "{b}"
    );
    assert_eq!(
        b["usage"]["output_tokens"].as_u64(),
        Some(sum("completion_tokens"))
    );
    assert_eq!(
        b["usage"]["total_tokens"].as_u64(),
        Some(sum("prompt_tokens") + sum("completion_tokens"))
    );
    assert_eq!(b["usage"]["measured_flops"].as_f64(), Some(measured));
    // Charged what each line measured (capped at its reservation, which these stay under).
    let rel = (charged_by_batch.charged_flops - measured).abs() / measured;
    assert!(
        rel < 1e-9,
        "{} vs {measured}",
        charged_by_batch.charged_flops
    );
    assert_eq!(errors.len(), 1);
    let e = &errors[0];
    assert_eq!(e["custom_id"], "bad");
    assert_eq!(e["response"]["status_code"], 422);
    assert_eq!(e["response"]["body"]["error"]["param"], "temperature");
    assert_eq!(e["error"]["code"], e["response"]["body"]["error"]["code"]);
    // The admin API lists a tenant's batches too (and refuses a tenant's key).
    let (st, v) = s
        .json(
            Method::GET,
            "/admin/tenants/alice/batches",
            Some(ADMIN),
            Value::Null,
        )
        .await;
    assert_eq!(
        (st, v["data"][0]["id"].as_str()),
        (200, Some(id.as_str())),
        "{v}"
    );
    assert_eq!(v["data"][0]["request_counts"]["completed"], 2);
    let (st, _) = s
        .json(
            Method::GET,
            "/admin/tenants/alice/batches",
            Some(&key),
            Value::Null,
        )
        .await;
    assert_eq!(st, 401);
    let (st, _) = s
        .json(
            Method::GET,
            "/admin/tenants/nobody/batches",
            Some(ADMIN),
            Value::Null,
        )
        .await;
    assert_eq!(st, 404);
    // Listings, newest first: the batch, and the input with its two output files.
    let (_, list) = s.get("/v1/batches?limit=1", &key).await;
    assert_eq!(
        (list["data"][0]["id"].as_str(), list["has_more"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    let (_, files) = s.get("/v1/files", &key).await;
    assert_eq!(files["data"].as_array().unwrap().len(), 3);
    let (_, outputs) = s.get("/v1/files?purpose=batch_output", &key).await;
    assert_eq!(outputs["data"].as_array().unwrap().len(), 2);
    // Closed: the input can go; the outputs stay readable.
    let (st, v) = s
        .json(Method::DELETE, &file_path, Some(&key), Value::Null)
        .await;
    assert_eq!((st, v["deleted"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(s.jsonl(&key, &b["output_file_id"]).await.len(), 2);
    let m = s.metrics().await;
    assert!(m.contains("\nvvlm_batches_open 0\n"), "{m}");
    assert!(m.contains("\nvvlm_batch_lines_pending 0\n"), "{m}");
    assert!(m.contains("vvlm_batch_lines_total{result=\"ok\"} 2"), "{m}");
    assert!(
        m.contains("vvlm_batch_lines_total{result=\"failed\"} 1"),
        "{m}"
    );
}

/// A batch waits while every admission place is taken (interactive requests first); a line
/// answered before (by a replica that died) is not run again; a cancelled batch closes with
/// its unrun lines in the error file.
#[tokio::test]
async fn batches_yield_resume_and_cancel() {
    let s = server();
    let key = s.tenant("alice", None);
    let input = two_completions();
    let (_, f) = s.upload(&key, "batch", input.as_bytes()).await;
    let create = json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
    let (st, resumed) = s.post("/v1/batches", &key, create.clone()).await;
    assert_eq!(st, 200, "{resumed}");
    let resumed = resumed["id"].as_str().unwrap().to_string();
    // Line 0 was answered by a replica that died before closing the batch.
    let prior = vvlm_server::ledger::LineResult {
        line: 0,
        custom_id: "a".into(),
        status_code: 200,
        request_id: "req-dead-1".into(),
        body: json!({"prior": true}).to_string(),
        finished_at: 1,
        usage: vvlm_server::ledger::LineUsage::default(),
    };
    assert!(s.state.ledger.record_line(&resumed, &prior).unwrap());
    let (_, cancelled) = s.post("/v1/batches", &key, create).await;
    let cancelled = cancelled["id"].as_str().unwrap().to_string();
    let (st, c) = s
        .post(&format!("/v1/batches/{cancelled}/cancel"), &key, json!({}))
        .await;
    assert_eq!((st, c["status"].as_str()), (200, Some("cancelling")), "{c}");
    assert!(c["cancelling_at"].as_i64().is_some());

    // Every place taken: nothing starts.
    let places: Vec<_> = (0..s.state.admission.capacity())
        .map(|_| s.hold_place("alice"))
        .collect();
    let _runner = s.run_batches();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, r) = s.get(&format!("/v1/batches/{resumed}"), &key).await;
    assert_eq!(
        r["request_counts"]["completed"], 1,
        "only the prior answer: {r}"
    );
    let m = s.metrics().await;
    assert!(
        !m.contains("vvlm_batch_lines_total{"),
        "a line was tried: {m}"
    );
    drop(places);

    let r = s.closed_batch(&key, &resumed).await;
    let c = s.closed_batch(&key, &cancelled).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(
        r["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    let out = s.jsonl(&key, &r["output_file_id"]).await;
    assert_eq!(
        out[0]["response"]["body"],
        json!({"prior": true}),
        "line 0 not run again"
    );
    assert_eq!(out[0]["id"], "batch_req_req-dead-1");
    assert_eq!(out[1]["response"]["body"]["object"], "text_completion");
    let alice = s.state.ledger.tenant_by_name("alice").unwrap();
    assert_eq!(
        s.state
            .ledger
            .usage(&alice, vvlm_server::ledger::now())
            .unwrap()
            .requests,
        1
    );
    // The cancelled batch ran nothing.
    assert_eq!(c["status"], "cancelled", "{c}");
    assert!(c["cancelled_at"].as_i64().is_some() && c["output_file_id"].is_null());
    let errors = s.jsonl(&key, &c["error_file_id"]).await;
    let codes: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["custom_id"].as_str().unwrap(),
                e["error"]["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(codes, [("a", "batch_cancelled"), ("b", "batch_cancelled")]);
    assert!(errors.iter().all(|e| e["response"].is_null()));
    let (st, v) = s
        .post(&format!("/v1/batches/{cancelled}/cancel"), &key, json!({}))
        .await;
    assert_eq!(st, 409, "{v}");
}

/// Batch lines yield decode steps to interactive requests: while an interactive request
/// decodes beside running lines, at most `rows_beside_interactive` of them step with it (the
/// others wait their turn, counted in `vvlm_decode_steps_deferred_total`), and the interactive
/// answer is the one it gets alone.
#[tokio::test]
async fn batch_lines_yield_decode_steps_to_interactive_requests() {
    let s = server_with(true, |c| {
        c.batch.concurrency = 4;
        c.batch.rows_beside_interactive = 1;
        c.batch.poll_s = 0.05;
    });
    let key = s.tenant("alice", None);
    let long = |prompt: &str| json!({"prompt": prompt, "max_tokens": 48, "temperature": 0});
    let (alone_st, alone) = s.post("/v1/completions", &key, long("the flash is")).await;
    assert_eq!(alone_st, 200, "{alone}");
    let id = s.completions_batch(&key, 12, &long("the ball is")).await;
    let _runner = s.run_batches();
    let deferred = |m: &str| metric(m, "vvlm_decode_steps_deferred_total");
    let t = std::time::Instant::now();
    let mut beside = 0;
    loop {
        let (st, v) = s.post("/v1/completions", &key, long("the flash is")).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], alone["choices"][0]["text"]);
        beside += 1;
        let (_, b) = s.get(&format!("/v1/batches/{id}"), &key).await;
        if deferred(&s.metrics().await) > 0.0 || b["status"] != "in_progress" {
            break;
        }
        assert!(t.elapsed().as_secs() < 60, "no step deferred: {b}");
    }
    assert!(
        deferred(&s.metrics().await) > 0.0,
        "the batch closed before any line waited for an interactive request ({beside} sent)"
    );
    let b = s.closed_batch(&key, &id).await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0}),
        "{b}"
    );
}

/// Batch lines hold at most `worker_share` of a worker's batch: with 4 places and half of them
/// theirs, four lines at once never decode more than two rows a step; the rest is kept for
/// interactive requests.
#[tokio::test]
async fn batch_lines_hold_at_most_their_share_of_a_workers_batch() {
    let s = server_with(true, |c| {
        c.limits.max_batch = 4;
        c.batch.concurrency = 4;
        c.batch.worker_share = 0.5;
        c.batch.poll_s = 0.05;
    });
    let key = s.tenant("alice", None);
    let line = json!({"prompt": "the ball is", "max_tokens": 24, "temperature": 0});
    let id = s.completions_batch(&key, 8, &line).await;
    let _runner = s.run_batches();
    let b = s.closed_batch(&key, &id).await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 8, "completed": 8, "failed": 0}),
        "{b}"
    );
    let m = s.metrics().await;
    let steps = metric(&m, "vvlm_decode_batch_size_count");
    assert!(steps >= 24.0, "{m}");
    let at_most = |rows: &str| {
        metric(
            &m,
            &format!("vvlm_decode_batch_size_bucket{{le=\"{rows}\"}}"),
        )
    };
    assert_eq!(at_most("2.0"), steps, "{m}");
    assert!(at_most("1.0") < steps, "{m}");
}

/// An interactive request that does not fit the room batch lines leave takes theirs: the line
/// goes back to the queue with its progress and continues where it was, answering as it would
/// have and charged once (what it costs alone); the interactive answer is the one it gets
/// alone. The worker's KV budget has room for the line's cache (a preemption for a place), so
/// the cache waits with the line and it continues recomputing nothing.
#[tokio::test]
async fn an_interactive_request_preempts_a_batch_line_for_room() {
    let m = preempted_lines_answer_as_alone(|_| {}, false, PREEMPTED_ONE).await;
    let resumed = metric(&m, "vvlm_batch_lines_resumed_total");
    assert_eq!(
        metric(&m, "vvlm_batch_lines_resumed_kv_kept_total"),
        resumed,
        "every line kept its KV: {m}"
    );
    assert_eq!(metric(&m, "vvlm_resume_recomputed_flops_total"), 0.0, "{m}");
}

/// The same where the worker's KV budget (`max_batch_tokens`, here below one line's positions)
/// has no room for a preempted line's cache: it is freed, and the line continues by prefilling
/// its prompt again and rebuilding its tokens' KV (the server's cost, reported apart, not
/// charged), with the same answer and charge.
#[tokio::test]
async fn a_preempted_line_without_room_for_its_kv_rebuilds_it() {
    let m =
        preempted_lines_answer_as_alone(|c| c.limits.max_batch_tokens = 40, false, PREEMPTED_ONE)
            .await;
    assert_eq!(
        metric(&m, "vvlm_batch_lines_resumed_kv_kept_total"),
        0.0,
        "{m}"
    );
    assert!(
        metric(&m, "vvlm_resume_recomputed_flops_total") > 0.0,
        "{m}"
    );
}

/// A kept cache counts against the worker's KV budget while its line waits; when an
/// interactive request finds memory short (the batch's reservation and the kept caches reach
/// the budget), the kept caches are freed, oldest first, and their lines rebuild their KV when
/// they continue, with the same answers and charges. Here the budget (64 positions) holds a
/// line's cache (its prompt and 48 tokens) alone but not beside a request of two 8-token
/// completions, and those requests come two at a time: the first takes the line's places (its
/// cache kept), the second finds the memory short.
#[tokio::test]
async fn a_kept_cache_is_freed_when_an_interactive_request_needs_the_memory() {
    let m = preempted_lines_answer_as_alone(
        |c| c.limits.max_batch_tokens = 64,
        true,
        ("vvlm_batch_parked_kv_released_total", 1.0),
    )
    .await;
    let released = metric(&m, "vvlm_batch_parked_kv_released_total");
    assert!(released >= 1.0, "no kept cache freed: {m}");
    // Every line preempted here kept its cache (the budget has room for one line's), so the
    // lines that rebuilt theirs are exactly those whose cache was freed.
    assert_eq!(
        metric(&m, "vvlm_batch_lines_resumed_total")
            - metric(&m, "vvlm_batch_lines_resumed_kv_kept_total"),
        released,
        "{m}"
    );
    assert!(
        metric(&m, "vvlm_resume_recomputed_flops_total") > 0.0,
        "{m}"
    );
}

/// Stop the interactive requests once one line was preempted.
const PREEMPTED_ONE: (&str, f64) = ("vvlm_batch_lines_preempted_total", 1.0);

/// Runs 200 short lines on a worker of 2 places while interactive requests of 2 completions
/// (one at a time, or two at once `in_pairs`) preempt them, until the counter `until.0`
/// reaches `until.1`; checks every answer against its alone and returns the metrics.
async fn preempted_lines_answer_as_alone(
    config: impl FnOnce(&mut ServerConfig),
    in_pairs: bool,
    until: (&str, f64),
) -> String {
    let s = server_with(true, |c| {
        c.limits.max_batch = 2;
        c.batch.concurrency = 1;
        c.batch.worker_share = 0.5;
        c.batch.poll_s = 0.05;
        config(c);
    });
    let key = s.tenant("alice", None);
    let line = json!({"prompt": "the ball is", "max_tokens": 48, "temperature": 0});
    let (st, line_alone) = s.post("/v1/completions", &key, line.clone()).await;
    assert_eq!(st, 200, "{line_alone}");
    // Two completions: both places of the worker's batch.
    let two = json!({"prompt": "the flash is", "max_tokens": 8, "temperature": 0, "n": 2});
    let (st, two_alone) = s.post("/v1/completions", &key, two.clone()).await;
    assert_eq!(st, 200, "{two_alone}");
    // Many short lines (each answers in ~14 tokens): a line is in the batch when one of the
    // interactive requests below arrives, however the machine's load times them.
    let lines = 200;
    let id = s.completions_batch(&key, lines, &line).await;
    let _runner = s.run_batches();
    let b = s
        .preempting_lines(&key, &id, &two, &two_alone["choices"], in_pairs, until)
        .await;
    assert!(
        metric(&s.metrics().await, "vvlm_batch_lines_preempted_total") > 0.0,
        "the batch closed before an interactive request needed a line's place"
    );
    assert_eq!(
        b["request_counts"],
        json!({"total": lines, "completed": lines, "failed": 0}),
        "{b}"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "vvlm_batch_lines_resumed_total"),
        metric(&m, "vvlm_batch_lines_preempted_total"),
        "every preempted line continued"
    );
    let want = &line_alone["usage"]["measured_flops"]["total"];
    for out in s.jsonl(&key, &b["output_file_id"]).await {
        let body = &out["response"]["body"];
        assert_eq!(body["choices"], line_alone["choices"], "{out}");
        assert_eq!(&body["usage"]["measured_flops"]["total"], want, "{out}");
    }
    m
}

/// A preempted video line whose KV cache could not be kept (the KV budget below one line's
/// positions) continues from the features and KV prefix it made before leaving: what it
/// recomputes is its generated tokens' KV and its question's prefill, not its video's encoding.
/// (The cache is off, as for a batch of distinct videos: nothing else could give them back.)
/// Its answer and charge are the line's alone.
#[tokio::test]
async fn a_preempted_video_line_does_not_encode_its_video_again() {
    let s = server_with(true, |c| {
        c.limits.max_batch = 2;
        c.limits.max_batch_tokens = 40;
        c.batch.concurrency = 1;
        c.batch.worker_share = 0.5;
        c.batch.poll_s = 0.05;
        c.cache.max_bytes = 0;
    });
    let key = s.tenant("alice", None);
    let video = s._dir.path().join("v.mp4");
    std::fs::write(&video, video_bytes()).unwrap();
    let line = json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": format!("file://{}", video.display())}},
            {"type": "text", "text": "what happens ?"}]}],
        "max_tokens": 48, "temperature": 0});
    let (st, line_alone) = s.post("/v1/chat/completions", &key, line.clone()).await;
    assert_eq!(st, 200, "{line_alone}");
    let vision = line_alone["usage"]["measured_flops"]["vision"]
        .as_f64()
        .unwrap();
    assert!(vision > 0.0, "{line_alone}");
    let two = json!({"prompt": "the flash is", "max_tokens": 8, "temperature": 0, "n": 2});
    let (st, two_alone) = s.post("/v1/completions", &key, two.clone()).await;
    assert_eq!(st, 200, "{two_alone}");
    let lines = 60;
    let id = s.batch_of(&key, lines, "/v1/chat/completions", &line).await;
    let _runner = s.run_batches();
    let b = s
        .preempting_lines(
            &key,
            &id,
            &two,
            &two_alone["choices"],
            false,
            ("vvlm_batch_lines_preempted_total", 3.0),
        )
        .await;
    assert_eq!(
        b["request_counts"],
        json!({"total": lines, "completed": lines, "failed": 0}),
        "{b}"
    );
    let m = s.metrics().await;
    let resumed = metric(&m, "vvlm_batch_lines_resumed_total");
    assert!(
        resumed > 0.0,
        "the batch closed before a line was preempted"
    );
    assert_eq!(resumed, metric(&m, "vvlm_batch_lines_preempted_total"));
    let recomputed = metric(&m, "vvlm_resume_recomputed_flops_total");
    assert!(
        recomputed > 0.0 && recomputed < resumed * vision,
        "{recomputed} FLOPs recomputed by {resumed} resumptions: a video encoded again \
         ({vision} FLOPs each)"
    );
    let want = &line_alone["usage"]["measured_flops"]["total"];
    for out in s.jsonl(&key, &b["output_file_id"]).await {
        let body = &out["response"]["body"];
        assert_eq!(body["choices"], line_alone["choices"], "{out}");
        assert_eq!(&body["usage"]["measured_flops"]["total"], want, "{out}");
    }
}

/// Each rule of the Files and Batch APIs answers 4xx naming what is wrong.
#[tokio::test]
async fn batch_inputs_are_refused_by_name() {
    let s = server_with(true, |c| {
        c.batch.max_file_bytes = 4096;
        c.batch.tenant_storage_bytes = 600;
        c.batch.max_open_per_tenant = 1;
    });
    let key = s.tenant("alice", None);
    let ok = batch_line("a", "/v1/completions", json!({"prompt": "hi"}));
    let param = |v: &Value| v["error"]["param"].as_str().map(str::to_string);
    let (st, v) = s.upload(&key, "fine-tune", ok.as_bytes()).await;
    assert_eq!((st, param(&v)), (422, Some("purpose".into())), "{v}");
    let (st, v) = s
        .upload(&key, "batch", format!("{ok}{{oops\n").as_bytes())
        .await;
    assert_eq!((st, param(&v)), (422, Some("file".into())), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2: not JSON"),
        "{v}"
    );
    let (st, v) = s.upload(&key, "batch", &vec![b' '; 5000]).await;
    assert_eq!(st, 413, "{v}");
    let (st, v) = s.upload(&key, "batch", &[]).await;
    assert_eq!((st, param(&v)), (422, Some("file".into())), "{v}");
    let (st, f) = s.upload(&key, "batch", ok.as_bytes()).await;
    assert_eq!(st, 200, "{f}");
    // The tenant's storage: 600 bytes in all.
    let big = batch_line("b", "/v1/completions", json!({"prompt": "x".repeat(500)}));
    let (st, v) = s.upload(&key, "batch", big.as_bytes()).await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 600"),
        "{v}"
    );
    let batch = |file: &Value, endpoint: &str, window: &str| json!({"input_file_id": file, "endpoint": endpoint, "completion_window": window});
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&f["id"], "/v1/chat/completions", "24h"),
        )
        .await;
    assert_eq!((st, param(&v)), (422, Some("input_file_id".into())), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("calls `/v1/completions`"),
        "{v}"
    );
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&f["id"], "/v1/completions", "1h"),
        )
        .await;
    assert_eq!(
        (st, param(&v)),
        (422, Some("completion_window".into())),
        "{v}"
    );
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&f["id"], "/v1/embeddings", "24h"),
        )
        .await;
    assert_eq!((st, param(&v)), (422, Some("endpoint".into())), "{v}");
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&json!("file-nope"), "/v1/completions", "24h"),
        )
        .await;
    assert_eq!((st, param(&v)), (422, Some("input_file_id".into())), "{v}");
    let mut extra = batch(&f["id"], "/v1/completions", "24h");
    extra["priority"] = json!(1);
    let (st, v) = s.post("/v1/batches", &key, extra).await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("priority"),
        "{v}"
    );
    let mut meta = batch(&f["id"], "/v1/completions", "24h");
    meta["metadata"] = json!({"n": 1});
    let (st, v) = s.post("/v1/batches", &key, meta).await;
    assert_eq!((st, param(&v)), (422, Some("metadata".into())), "{v}");
    // One open batch is this tenant's most here: a second is a 409 naming the limit.
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&f["id"], "/v1/completions", "24h"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .post(
            "/v1/batches",
            &key,
            batch(&f["id"], "/v1/completions", "24h"),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 open batches"),
        "{v}"
    );
    let (st, v) = s.get("/v1/batches?limit=0", &key).await;
    assert_eq!((st, param(&v)), (422, Some("limit".into())), "{v}");
    assert_eq!(s.get("/v1/batches/batch_nope", &key).await.0, 404);
    assert_eq!(s.get("/v1/files/file-nope/content", &key).await.0, 404);
    assert_eq!(
        s.json(Method::GET, "/v1/batches", None, Value::Null)
            .await
            .0,
        401
    );
    // Turned off: the routes are not there.
    let off = server_with(false, |c| c.batch.enabled = false);
    let key = off.tenant("alice", None);
    let (st, v) = off.get("/v1/batches", &key).await;
    assert_eq!(st, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[batch] enabled"),
        "{v}"
    );
}

/// Open batches take turns: a batch created later does not wait for an earlier, longer one to
/// finish (each runs a slice, here one line, then offers its place to the batches waiting).
#[tokio::test]
async fn batches_take_turns() {
    let s = server_with(true, |c| {
        c.batch.slice_s = 0.0;
        c.batch.concurrency = 1;
    });
    let key = s.tenant("alice", None);
    let bob = s.tenant("bob", None);
    let line = |i: usize| {
        batch_line(
            &format!("l{i}"),
            "/v1/completions",
            json!({"prompt": format!("line {i}"), "max_tokens": 1, "temperature": 0}),
        )
    };
    let create = |file: &Value| json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
    let (_, long) = s
        .upload(
            &key,
            "batch",
            (0..4).map(line).collect::<String>().as_bytes(),
        )
        .await;
    let (_, long) = s.post("/v1/batches", &key, create(&long)).await;
    let (_, short) = s.upload(&bob, "batch", line(9).as_bytes()).await;
    let (_, short) = s.post("/v1/batches", &bob, create(&short)).await;
    let _runner = s.run_batches();
    let long = s.closed_batch(&key, long["id"].as_str().unwrap()).await;
    let short = s.closed_batch(&bob, short["id"].as_str().unwrap()).await;
    // Request numbers (`req-<replica>-<n>`) give the order the lines ran in.
    let order = |l: &Value| -> u64 {
        l["response"]["request_id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let long_lines: Vec<u64> = s
        .jsonl(&key, &long["output_file_id"])
        .await
        .iter()
        .map(order)
        .collect();
    let short_line = order(&s.jsonl(&bob, &short["output_file_id"]).await[0]);
    assert_eq!(long_lines.len(), 4);
    assert!(
        short_line < long_lines[3],
        "the short batch ran after the whole long one: {short_line} vs {long_lines:?}"
    );
}

/// A batch not closed within its window expires: nothing more runs, and every line without an
/// answer is in the error file as `batch_expired`.
#[tokio::test]
async fn an_expired_batch_closes_with_its_unrun_lines() {
    let s = server();
    let key = s.tenant("alice", None);
    let input = two_completions();
    let (_, f) = s.upload(&key, "batch", input.as_bytes()).await;
    // Created through the ledger with a window already over (the API's window is 24 h).
    let alice = s.state.ledger.tenant_by_name("alice").unwrap();
    let b = s
        .state
        .ledger
        .create_batch(
            alice.id,
            &vvlm_server::ledger::NewBatch {
                endpoint: "/v1/completions".into(),
                input_file_id: f["id"].as_str().unwrap().into(),
                total: 2,
                completion_window: "24h".into(),
                window_s: -1,
                metadata: None,
                max_open: 16,
            },
            vvlm_server::ledger::now(),
        )
        .unwrap();
    let _runner = s.run_batches();
    let b = s.closed_batch(&key, &b.id).await;
    assert_eq!(b["status"], "expired", "{b}");
    assert!(b["expired_at"].as_i64().is_some() && b["completed_at"].is_null());
    assert_eq!(
        b["request_counts"],
        json!({"total": 2, "completed": 0, "failed": 0})
    );
    let errors = s.jsonl(&key, &b["error_file_id"]).await;
    let codes: Vec<&str> = errors
        .iter()
        .map(|e| e["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["batch_expired", "batch_expired"]);
    assert_eq!(
        s.state
            .ledger
            .usage(&alice, vvlm_server::ledger::now())
            .unwrap()
            .requests,
        0
    );
}

/// A tenant's `media_allow` narrows the server's `file_allow` and `url_allow` for its own
/// requests (another tenant's folder or bucket is refused, 403 naming the lists), and leaves
/// other tenants alone; the admin API checks and clears it.
#[tokio::test]
async fn a_tenants_media_allow_narrows_what_its_requests_may_read() {
    let port = media_upstream(vec![]).await;
    let base = format!("http://127.0.0.1:{port}");
    let s = server_with(true, |c| {
        c.url_allow = vec![format!("{base}/")];
        c.url_private = true;
    });
    let root = s._dir.path().canonicalize().unwrap();
    for who in ["acme", "other"] {
        std::fs::create_dir(root.join(who)).unwrap();
        std::fs::write(root.join(who).join("v.mp4"), video_bytes()).unwrap();
    }
    let (st, made) = s
        .json(
            Method::POST,
            "/admin/tenants",
            Some(ADMIN),
            json!({"name": "acme", "media_allow": [format!("file://{}/acme/", root.display()),
                                                   format!("{base}/v/")]}),
        )
        .await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(made["tenant"]["media_allow"][1], format!("{base}/v/"));
    let acme = made["api_key"].as_str().unwrap().to_string();
    let free = s.tenant("free", None);
    let qa = |video: String| {
        json!({"video": video, "question": "what colour is the flash ?", "max_tokens": 2,
               "model": "suite-s", "frames": 2})
    };
    let file = |who: &str| format!("file://{}/{who}/v.mp4", root.display());
    let (st, v) = s.post("/v1/videos/qa", &acme, qa(file("acme"))).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.post("/v1/videos/qa", &acme, qa(file("other"))).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .post("/v1/videos/qa", &acme, qa(format!("{base}/v/a.mp4")))
        .await;
    assert_eq!(st, 200, "{v}");
    // Under the server's url_allow, not under acme's: refused, naming both lists.
    let (st, v) = s
        .post("/v1/videos/qa", &acme, qa(format!("{base}/other/a.mp4")))
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant `acme`'s media_allow"),
        "{v}"
    );
    // The same through chat.
    let chat_with = |url: String| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}},
            {"type": "text", "text": "what happens ?"}]}], "max_tokens": 2})
    };
    let (st, v) = s
        .post("/v1/chat/completions", &acme, chat_with(file("other")))
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .post("/v1/chat/completions", &acme, chat_with(file("acme")))
        .await;
    assert_eq!(st, 200, "{v}");
    // A tenant without a list reads what the server allows (the other folder; the upstream's
    // /other/ answers text, which is not a video: refused as such, not for its URL).
    let (st, v) = s.post("/v1/videos/qa", &free, qa(file("other"))).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .post("/v1/videos/qa", &free, qa(format!("{base}/other/a.mp4")))
        .await;
    assert_ne!(st, 403, "{v}");
    // Checked by the admin API; null returns the tenant to the server's lists.
    for bad in [
        json!(["ftp://x/"]),
        json!(["https://user:pw@h/"]),
        json!(["not a url"]),
    ] {
        let (st, v) = s
            .json(
                Method::PATCH,
                "/admin/tenants/acme",
                Some(ADMIN),
                json!({"media_allow": bad}),
            )
            .await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (422, Some("media_allow")),
            "{v}"
        );
    }
    let (st, v) = s
        .json(
            Method::PATCH,
            "/admin/tenants/acme",
            Some(ADMIN),
            json!({"media_allow": null}),
        )
        .await;
    assert_eq!((st, &v["media_allow"]), (200, &Value::Null), "{v}");
    let (st, v) = s.post("/v1/videos/qa", &acme, qa(file("other"))).await;
    assert_eq!(st, 200, "{v}");
}

/// Closed batches and files past `[batch] retention_days` are deleted by the runner (at its
/// start, then hourly); what is younger stays.
#[tokio::test]
async fn batches_past_retention_are_deleted() {
    let s = server_with(true, |c| c.batch.retention_days = 1.0 / 86_400.0);
    let key = s.tenant("alice", None);
    let line = batch_line(
        "a",
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 1}),
    );
    let (_, f) = s.upload(&key, "batch", line.as_bytes()).await;
    let create = json!({"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
    let (_, b) = s.post("/v1/batches", &key, create).await;
    let id = b["id"].as_str().unwrap().to_string();
    let runner = s.run_batches();
    let b = s.closed_batch(&key, &id).await;
    assert_eq!(b["status"], "completed", "{b}");
    drop(runner);
    // Times are whole seconds: 2 s later the batch is past a retention of 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let young = s.upload(&key, "batch", line.as_bytes()).await.1;
    let _runner = s.run_batches();
    let t = std::time::Instant::now();
    while s.get(&format!("/v1/batches/{id}"), &key).await.0 != 404 {
        assert!(t.elapsed().as_secs() < 20, "the batch was not deleted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for file in [&f["id"], &b["output_file_id"]] {
        let (st, v) = s
            .get(&format!("/v1/files/{}", file.as_str().unwrap()), &key)
            .await;
        assert_eq!(st, 404, "{v}");
    }
    let (st, v) = s
        .get(
            &format!("/v1/files/{}", young["id"].as_str().unwrap()),
            &key,
        )
        .await;
    assert_eq!(st, 200, "a younger file stays: {v}");
}

/// Hostile batch files and batch requests: JSONL with mutated lines (odd values in any field,
/// bytes flipped, cut anywhere, lines repeated), uploaded and, when accepted, made a batch with
/// a mutated request: 2xx or 4xx with a JSON error naming the problem, never 5xx.
#[tokio::test]
async fn random_hostile_batch_files_get_4xx_never_5xx() {
    let s = server_with(true, |c| c.batch.max_open_per_tenant = 1_000);
    let key = s.tenant("alice", None);
    let seed: Vec<Value> = vec![
        json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "what colour ?"}], "max_tokens": 2}}),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "what shape ?"}], "n": 2}}),
    ];
    let create = json!({"endpoint": "/v1/chat/completions", "completion_window": "24h",
                        "metadata": {"job": "x"}});
    let mut rng = Rng(0xba7c_4f11_e5ee_d001);
    let (mut accepted, mut refused, mut created) = (0, 0, 0);
    for round in 0..120 {
        let mut lines = seed.clone();
        for _ in 0..rng.below(3) {
            let i = rng.below(lines.len());
            mutate(&mut lines[i], &mut rng);
        }
        if rng.below(4) == 0 {
            let i = rng.below(lines.len());
            lines.push(lines[i].clone());
        }
        let mut bytes: Vec<u8> = lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>()
            .into_bytes();
        match rng.below(6) {
            0 => bytes.truncate(rng.below(bytes.len() + 1)),
            1 => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            _ => {}
        }
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        let (st, f) = s.upload(&key, "batch", &bytes).await;
        assert!(
            st == 200 || (400..500).contains(&st),
            "round {round}: {st} {f} for {shown}"
        );
        if st != 200 {
            refused += 1;
            assert!(
                f["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{f}"
            );
            continue;
        }
        accepted += 1;
        let mut body = create.clone();
        body["input_file_id"] = f["id"].clone();
        if rng.below(2) == 0 {
            mutate(&mut body, &mut rng);
        }
        let (st, b) = s.post("/v1/batches", &key, body.clone()).await;
        assert!(
            st == 200 || (400..500).contains(&st),
            "round {round}: {st} {b} for {body}"
        );
        if st == 200 {
            created += 1;
        }
        // The uploads stay within the tenant's storage.
        let (st, _) = s
            .json(
                Method::DELETE,
                &format!("/v1/files/{}", f["id"].as_str().unwrap()),
                Some(&key),
                Value::Null,
            )
            .await;
        assert!(st == 200 || st == 409, "{st}");
    }
    eprintln!("accepted {accepted}, refused {refused}, batches created {created}");
    assert!(accepted > 0 && refused > 0 && created > 0);
}
