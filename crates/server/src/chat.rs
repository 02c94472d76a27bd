//! The OpenAI-compatible chat completions route: the body's messages into [`Content`] (the
//! last user message answered, the earlier user and assistant messages its history, the video
//! or images in the first user message), its options into [`RequestOptions`], and the answer as `chat.completion` JSON or an SSE stream of
//! `chat.completion.chunk`s. Fields OpenAI defines that vvlm does not implement are refused by
//! name (400), never ignored.

use crate::admission::{admit, record, run_to_completion, AdmissionSlot, Outcome};
use crate::error::ApiError;
use crate::ledger::{now, Tenant};
use crate::routes::{json_error, new_id, usage_json};
use crate::validation::{
    resolve_url, validate, Content, Media, RequestOptions, Rules, ValidRequest,
};
use crate::worker::Event;
use crate::AppState;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use vvlm_engine::template::{Role, Turn};
use vvlm_engine::{FinishReason, Generation, StepLogprobs};

/// The body's own fields (the rest are [`RequestOptions`]).
const OWN: &[&str] = &["messages", "stream", "stream_options", "user"];

/// OpenAI fields vvlm does not implement: 400 naming the field when set (null means "not
/// set").
const UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "web_search_options",
];

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: MessageContent,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    VideoUrl { video_url: UrlRef },
    ImageUrl { image_url: UrlRef },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UrlRef {
    Object { url: String },
    Plain(String),
}

impl UrlRef {
    fn url(&self) -> &str {
        match self {
            UrlRef::Object { url } | UrlRef::Plain(url) => url,
        }
    }
}

/// A parsed chat body.
pub struct ChatRequest {
    pub options: RequestOptions,
    pub content: Content,
    pub stream: bool,
    pub include_usage: bool,
}

/// Reads a chat body.
pub fn parse(
    mut body: Map<String, Value>,
    allow: &[std::path::PathBuf],
) -> Result<ChatRequest, ApiError> {
    for &field in UNSUPPORTED {
        let set = match body.remove(field) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) if field == "tools" => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(ApiError::Unsupported {
                param: field.to_string(),
            });
        }
    }
    // Accepted and without effect here: OpenAI's storage and routing hints.
    for field in ["store", "metadata", "service_tier"] {
        body.remove(field);
    }
    let options = RequestOptions::take_from(&mut body, OWN)?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let messages: Vec<ChatMessage> = match body.remove("messages") {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| ApiError::invalid("messages", format!("messages: {e}")))?,
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    let mut system = None;
    // The user and assistant messages in order; which user message carries the media.
    let mut turns: Vec<Turn> = vec![];
    let mut media_turn = None;
    let mut media = Media::None;
    let mut images = vec![];
    for m in messages {
        let parts = match m.content {
            MessageContent::Text(t) => vec![Part::Text { text: t }],
            MessageContent::Parts(p) => p,
        };
        let role = match m.role.as_str() {
            "system" | "developer" => None,
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unsupported role `{other}` (system, user or assistant)"),
                ))
            }
        };
        let mut texts = vec![];
        for p in parts {
            match (role, p) {
                (_, Part::Text { text }) => texts.push(text),
                (Some(Role::User), Part::VideoUrl { video_url }) => {
                    if !matches!(media, Media::None) {
                        return Err(ApiError::invalid("messages", "one video per request"));
                    }
                    media = resolve_url(video_url.url(), allow)?;
                    media_turn = Some(turns.len());
                }
                (Some(Role::User), Part::ImageUrl { image_url }) => {
                    match resolve_url(image_url.url(), allow)? {
                        Media::Images(mut i) => images.append(&mut i),
                        _ => {
                            return Err(ApiError::invalid(
                                "messages",
                                "image_url must be a data:image/... URL",
                            ))
                        }
                    }
                    media_turn = Some(turns.len());
                }
                _ => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("unsupported message part for role `{}`", m.role),
                    ))
                }
            }
        }
        match role {
            None => system = Some(texts.join("\n")),
            Some(role) => turns.push(Turn {
                role,
                content: texts.join("\n"),
            }),
        }
    }
    // The last message is the one answered; the others are the conversation so far.
    let prompt = match turns.pop() {
        Some(t) if t.role == Role::User => t.content,
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "the last message must be the user's (the one answered)",
            ))
        }
        None => String::new(),
    };
    let history = turns;
    // The video's tokens go in the first user message: every turn about it shares the text
    // before them (and the KV cached for them).
    let first_user = history
        .iter()
        .position(|t| t.role == Role::User)
        .unwrap_or(history.len());
    if media_turn.is_some_and(|i| i != first_user) {
        return Err(ApiError::invalid(
            "messages",
            "a video or images go in the first user message (later turns ask about them)",
        ));
    }
    if !images.is_empty() {
        if !matches!(media, Media::None) {
            return Err(ApiError::invalid(
                "messages",
                "send a video or images, not both",
            ));
        }
        media = Media::Images(images);
    }
    Ok(ChatRequest {
        options,
        content: Content {
            prompt,
            system,
            history,
            media,
        },
        stream,
        include_usage,
    })
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// OpenAI's `logprobs` object of one choice (null when not asked for).
fn logprobs_json(asked: bool, steps: &[StepLogprobs]) -> Value {
    if !asked {
        return Value::Null;
    }
    let content: Vec<Value> = steps
        .iter()
        .map(|s| {
            json!({
                "token": s.chosen.token, "logprob": s.chosen.logprob, "bytes": s.chosen.bytes,
                "top_logprobs": s.top.iter().map(|t| json!({
                    "token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

fn choices_json(generations: &[Generation], logprobs: bool) -> Vec<Value> {
    generations
        .iter()
        .enumerate()
        .map(|(i, g)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": finish_str(g.finish_reason),
                "logprobs": logprobs_json(logprobs, &g.logprobs),
            })
        })
        .collect()
}

/// Runs a chat request; the handler in [`crate::routes`] authenticates and stamps quotas.
pub async fn completions(
    s: Arc<AppState>,
    t: Tenant,
    slot: Option<AdmissionSlot>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let c = parse(body, &s.config.file_allow)?;
    let rules = Rules {
        default_task: "qa",
        media_required: false,
        prompt_required: true,
    };
    let r = validate(c.options, c.content, rules, &s.config.limits)?;
    let id = format!("chatcmpl-{}", new_id());
    let created = now();
    let logprobs = r.sampling.logprobs.is_some();
    if !c.stream {
        let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": o.plan.choice.model,
            "choices": choices_json(&o.generations, logprobs),
            "usage": usage_json(&o), "plan": o.plan, "notes": o.notes,
        }))
        .into_response());
    }
    stream(s, t, r, slot, id, created, c.include_usage).await
}

/// Streaming: admission errors are ordinary HTTP errors; after that, SSE chunks, and an error
/// (timeout, engine) as an event carrying the same body as an HTTP error.
async fn stream(
    s: Arc<AppState>,
    t: Tenant,
    r: ValidRequest,
    slot: Option<AdmissionSlot>,
    id: String,
    created: i64,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let logprobs = r.sampling.logprobs.is_some();
    let mut a = admit(&s, &t, r, slot).await?;
    let model = a.plan.choice.model.clone();
    let timeout = Duration::from_secs_f64(s.config.limits.request_timeout_s);
    let stream = async_stream(move |tx| async move {
        let chunk = |choices: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices})
        };
        let send = |v: Value| tx.send(SseEvent::default().data(v.to_string())).is_ok();
        let error = |e: ApiError| {
            let _ = tx.send(SseEvent::default().data(e.body().to_string()));
        };
        for i in 0..a.n {
            send(chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": null, "logprobs": null}]),
            ));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, a.events.recv()).await {
                Err(_) => {
                    error(ApiError::Timeout(format!(
                        "the request took longer than {timeout:?}"
                    )));
                    return;
                }
                Ok(None) => {
                    error(ApiError::Internal("the worker went away".into()));
                    return;
                }
                Ok(Some(Event::Started)) => {}
                Ok(Some(Event::Text { index, piece })) => {
                    let c = chunk(json!([{"index": index, "delta": {"content": piece},
                                          "finish_reason": null, "logprobs": null}]));
                    if !send(c) {
                        return; // client gone: the guard cancels the job
                    }
                }
                Ok(Some(Event::Done(Err(e)))) => {
                    error(e);
                    return;
                }
                Ok(Some(Event::Done(Ok(generations)))) => {
                    a.guard.disarm();
                    let measured = record(&s, &a, &generations);
                    let o = Outcome {
                        plan: a.plan.clone(),
                        measured,
                        frames: vec![],
                        decode_s: a.decode_s,
                        notes: a.engine.notes.clone(),
                        n: a.n,
                        cache: a.cache,
                        generations,
                    };
                    let usage = usage_json(&o);
                    for (i, g) in o.generations.iter().enumerate() {
                        let mut last = chunk(json!([{"index": i, "delta": {},
                            "finish_reason": finish_str(g.finish_reason),
                            "logprobs": logprobs_json(logprobs, &g.logprobs)}]));
                        last["usage"] = usage.clone();
                        last["plan"] = json!(o.plan);
                        send(last);
                    }
                    if include_usage {
                        let mut u = chunk(json!([]));
                        u["usage"] = usage;
                        send(u);
                    }
                    let _ = tx.send(SseEvent::default().data("[DONE]"));
                    return;
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A stream of SSE events fed by a spawned task (dropping the stream ends the task's sends).
fn async_stream<F, Fut>(
    f: F,
) -> impl futures_core::Stream<Item = Result<SseEvent, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(f(tx));
    EventStream {
        rx,
        _task: AbortOnDrop(handle),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct EventStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<SseEvent>,
    _task: AbortOnDrop,
}

impl futures_core::Stream for EventStream {
    type Item = Result<SseEvent, std::convert::Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}
