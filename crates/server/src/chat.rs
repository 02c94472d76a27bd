//! The OpenAI-compatible chat completions route: the body's messages into [`Content`] (the
//! last user message answered, the earlier user, assistant and tool messages its history, the
//! video or images in the first user message), its options into [`RequestOptions`], a forced
//! tool call (`tools` + `tool_choice`) into a JSON Schema response format and a system-message
//! line, and the answer as `chat.completion` JSON or an SSE stream of `chat.completion.chunk`s
//! (a forced call as `tool_calls`). Fields OpenAI defines that vvlm does not implement are
//! refused by name (400), never ignored.

use crate::admission::{admit, record, run_to_completion, AdmissionSlot, Outcome};
use crate::error::ApiError;
use crate::ledger::{now, Tenant};
use crate::routes::{json_error, new_id, usage_json};
use crate::validation::{
    optional_flag, resolve_url, validate, Content, Media, MediaSources, RequestOptions, Rules,
    ValidRequest,
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
use vvlm_engine::generate::PromptToken;
use vvlm_engine::template::{Role, Turn};
use vvlm_engine::{FinishReason, Generation, StepLogprobs};

/// The body's own fields (the rest are [`RequestOptions`]).
const OWN: &[&str] = &["messages", "stream", "stream_options", "user"];

/// OpenAI fields vvlm does not implement: 400 naming the field when set (null means "not
/// set").
const UNSUPPORTED: &[&str] = &[
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
    /// Null for an assistant message that only called a tool.
    content: Option<MessageContent>,
    /// An assistant message's calls (sent back in a conversation after a forced call).
    #[serde(default)]
    tool_calls: Vec<ToolCall>,
    /// A `tool` message's call (its result follows the call in the conversation).
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: CalledFunction,
}

#[derive(Deserialize)]
struct CalledFunction {
    name: String,
    arguments: String,
}

enum MessageContent {
    Text(String),
    Parts(Vec<Part>),
}

/// A string, or an array of parts each read on its own, so that a bad part is named (an
/// untagged enum would only say that nothing matched).
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(t) => Ok(MessageContent::Text(t)),
            Value::Array(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| {
                    Part::deserialize(p).map_err(|e| {
                        D::Error::custom(format!(
                            "content[{j}]: {}",
                            crate::validation::json_words(&e.to_string())
                        ))
                    })
                })
                .collect::<Result<_, _>>()
                .map(MessageContent::Parts),
            _ => Err(D::Error::custom(
                "a message's `content` must be a string or an array of parts (`text`, \
                 `video_url`, `image_url`)",
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    VideoUrl { video_url: UrlRef },
    ImageUrl { image_url: UrlRef },
}

enum UrlRef {
    Object { url: String },
    Plain(String),
}

impl<'de> Deserialize<'de> for UrlRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(url) => Ok(UrlRef::Plain(url)),
            Value::Object(o) => match o.get("url") {
                Some(Value::String(url)) => Ok(UrlRef::Object { url: url.clone() }),
                _ => Err(serde::de::Error::custom(URL_SHAPE)),
            },
            _ => Err(serde::de::Error::custom(URL_SHAPE)),
        }
    }
}

const URL_SHAPE: &str = "a `video_url` or `image_url` must be a URL or {\"url\": URL}";

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
    /// The function whose call is forced: the answer is its arguments, sent as a tool call.
    pub tool: Option<String>,
}

/// `stream` and `stream_options.include_usage` of a chat or text completions body (left in it).
pub(crate) fn stream_flags(body: &Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let stream = optional_flag(body.get("stream"), "stream", "stream")?;
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => optional_flag(
            o.get("include_usage"),
            "stream_options",
            "stream_options.include_usage",
        )?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object such as {\"include_usage\": true}",
            ))
        }
    };
    Ok((stream, include_usage))
}

/// Reads a chat body.
pub fn parse(mut body: Map<String, Value>, allow: &MediaSources) -> Result<ChatRequest, ApiError> {
    for &field in UNSUPPORTED {
        let set = match body.remove(field) {
            None | Some(Value::Null) => false,
            Some(_) => true,
        };
        if set {
            return Err(ApiError::Unsupported {
                param: field.to_string(),
            });
        }
    }
    // Accepted and without effect here: OpenAI's storage and routing hints, and whether calls
    // may be parallel (a forced call is one call).
    for field in ["store", "metadata", "service_tier", "parallel_tool_calls"] {
        body.remove(field);
    }
    let tool = forced_tool(body.remove("tools"), body.remove("tool_choice"))?;
    let mut options = RequestOptions::take_from(&mut body, OWN)?;
    if let Some(t) = &tool {
        // The call's arguments are a document of the function's parameters schema.
        if options.response_format.is_some() || options.guided_choice.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "a forced tool call and response_format or guided_choice exclude each other",
            ));
        }
        options.response_format = Some(
            json!({"type": "json_schema", "json_schema": {"name": t.name, "schema": t.parameters}})
                .as_object()
                .cloned()
                .expect("an object"),
        );
    }
    let (stream, include_usage) = stream_flags(&body)?;
    let messages: Vec<ChatMessage> = match body.remove("messages") {
        Some(v) => serde_json::from_value(v).map_err(|e| {
            let e = crate::validation::json_words(&e.to_string());
            ApiError::invalid("messages", format!("messages: {e}"))
        })?,
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    let mut system = None;
    // The user and assistant messages in order; which user message carries the media.
    let mut turns: Vec<Turn> = vec![];
    let mut media_turn = None;
    let mut media = Media::None;
    let mut images = vec![];
    // The calls made so far, by id, for the results that follow them.
    let mut calls: Vec<(String, String)> = vec![];
    for m in messages {
        let mut parts = match m.content {
            None => vec![],
            Some(MessageContent::Text(t)) => vec![Part::Text { text: t }],
            Some(MessageContent::Parts(p)) => p,
        };
        let role = match m.role.as_str() {
            "system" | "developer" => None,
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            // A tool's result is read by the model as the next user turn, naming the call.
            "tool" => {
                let name = m
                    .tool_call_id
                    .as_ref()
                    .and_then(|id| calls.iter().find(|(c, _)| c == id))
                    .map(|(_, name)| name.clone())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "messages",
                            "a tool message's tool_call_id must name a call an earlier assistant message made",
                        )
                    })?;
                let text = parts
                    .drain(..)
                    .map(|p| match p {
                        Part::Text { text } => Ok(text),
                        _ => Err(ApiError::invalid("messages", "a tool message is text")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n");
                parts.push(Part::Text {
                    text: format!("The function `{name}` returned: {text}"),
                });
                Some(Role::User)
            }
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unsupported role `{other}` (system, user, assistant or tool)"),
                ))
            }
        };
        // An assistant's calls are what it said: the arguments it wrote, a call a line.
        if !m.tool_calls.is_empty() {
            if role != Some(Role::Assistant) {
                return Err(ApiError::invalid(
                    "messages",
                    "only assistant messages make tool calls",
                ));
            }
            for c in &m.tool_calls {
                calls.push((c.id.clone(), c.function.name.clone()));
                parts.push(Part::Text {
                    text: c.function.arguments.clone(),
                });
            }
        }
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
        None => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must end with a user message (the one answered)",
            ))
        }
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the last user message has no text: it is what the model answers",
        ));
    }
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
    // The forced function is described to the model in the system message (the templates vvlm
    // renders have no tool syntax of their own).
    if let Some(t) = &tool {
        let call = t.instruction();
        system = Some(match system {
            Some(s) if !s.is_empty() => format!("{s}\n\n{call}"),
            _ => call,
        });
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
        tool: tool.map(|t| t.name),
    })
}

/// The function a request forces a call of (OpenAI's `tools` and `tool_choice`).
struct ForcedTool {
    name: String,
    description: String,
    parameters: Value,
}

impl ForcedTool {
    /// What the system message says of it.
    fn instruction(&self) -> String {
        let what = if self.description.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.description)
        };
        format!(
            "Call the function `{}`{what}: answer with its arguments only, as one JSON object \
             of this JSON Schema: {}",
            self.name, self.parameters
        )
    }
}

/// The tool a request forces, from `tools` and `tool_choice`: `none` (or no tools) calls
/// none; a named function, or `required` with one tool, forces it. `auto` is refused by name:
/// vvlm's checkpoints are not trained to choose a call, so it never pretends they do.
fn forced_tool(
    tools: Option<Value>,
    choice: Option<Value>,
) -> Result<Option<ForcedTool>, ApiError> {
    let bad = |param: &str, m: String| ApiError::invalid(param, m);
    let tools = match tools {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("tools", "`tools` must be a list".into())),
    };
    let mut defined = vec![];
    for t in &tools {
        let f = t
            .get("function")
            .filter(|_| t.get("type").and_then(|x| x.as_str()) == Some("function"))
            .ok_or_else(|| {
                bad(
                    "tools",
                    "each tool is {\"type\": \"function\", \"function\": {...}}".into(),
                )
            })?;
        let name = f.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(bad(
                "tools",
                format!("function name `{name}`: 1-64 letters, digits, `_` or `-`"),
            ));
        }
        if defined.iter().any(|d: &ForcedTool| d.name == name) {
            return Err(bad("tools", format!("function `{name}` is defined twice")));
        }
        let parameters = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        vvlm_engine::json_schema::Schema::compile(&parameters)
            .map_err(|e| bad("tools", format!("function `{name}` parameters: {e}")))?;
        defined.push(ForcedTool {
            name: name.to_string(),
            description: f
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or_default()
                .to_string(),
            parameters,
        });
    }
    let named = |name: &str| {
        defined
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| bad("tool_choice", format!("no tool is named `{name}`")))
    };
    let pick = match choice.as_ref() {
        None | Some(Value::Null) if defined.is_empty() => return Ok(None),
        Some(Value::String(c)) if c == "none" => return Ok(None),
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c == "auto" => None,
        Some(Value::String(c)) if c == "required" && defined.len() == 1 => Some(0),
        Some(Value::String(c)) if c == "required" => {
            return Err(bad(
                "tool_choice",
                "`required` with several tools: name the one to call".into(),
            ))
        }
        Some(c) => match c.get("function").and_then(|f| f.get("name")).and_then(|n| n.as_str()) {
            Some(name) if !defined.is_empty() => Some(named(name)?),
            Some(_) => return Err(bad("tool_choice", "tool_choice names a function but no `tools` are given".into())),
            None => return Err(bad("tool_choice", "tool_choice is none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}".into())),
        },
    };
    match pick {
        Some(i) => Ok(Some(defined.swap_remove(i))),
        None => Err(bad(
            "tool_choice",
            "vvlm calls a tool only when tool_choice names it (or is `required` with one tool): \
             its checkpoints are not trained to choose one"
                .into(),
        )),
    }
}

pub(crate) fn finish_str(f: FinishReason) -> &'static str {
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

/// OpenAI's text-completion `logprobs`: the prompt's entries when it was scored (`echo` with
/// `logprobs`; the first token's `null`: nothing before it predicts it), then each generated
/// token's; `text_offset` counts characters from the start of the text they make. Null unless
/// asked.
pub(crate) fn text_logprobs_json(
    asked: bool,
    prompt: &[PromptToken],
    steps: &[StepLogprobs],
) -> Value {
    if !asked {
        return Value::Null;
    }
    let top = |s: &StepLogprobs| -> Value {
        Value::Object(
            s.top
                .iter()
                .map(|t| (t.token.clone(), json!(t.logprob)))
                .collect(),
        )
    };
    let mut tokens = vec![];
    let mut token_logprobs = vec![];
    let mut top_logprobs = vec![];
    for p in prompt {
        tokens.push(p.token.clone());
        token_logprobs.push(
            p.logprobs
                .as_ref()
                .map_or(Value::Null, |l| json!(l.chosen.logprob)),
        );
        top_logprobs.push(p.logprobs.as_ref().map_or(Value::Null, top));
    }
    for s in steps {
        tokens.push(s.chosen.token.clone());
        token_logprobs.push(json!(s.chosen.logprob));
        top_logprobs.push(top(s));
    }
    let mut offset = 0;
    let text_offset: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = offset;
            offset += t.chars().count();
            at
        })
        .collect();
    json!({
        "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// A forced call's id: the completion's id and the choice.
fn call_id(id: &str, index: usize) -> String {
    format!("call_{}_{index}", id.trim_start_matches("chatcmpl-"))
}

fn choices_json(
    id: &str,
    generations: &[Generation],
    logprobs: bool,
    tool: Option<&str>,
) -> Vec<Value> {
    generations
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let message = match tool {
                None => json!({"role": "assistant", "content": g.text}),
                Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [{
                    "id": call_id(id, i), "type": "function",
                    "function": {"name": name, "arguments": g.text},
                }]}),
            };
            json!({
                "index": i,
                "message": message,
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
    // Media by http(s) URL is fetched first (allow-listed), as if it had been uploaded.
    let sources = crate::remote::media_sources(&s, &t, &body).await?;
    let c = parse(body, &sources)?;
    let rules = Rules {
        default_task: "qa",
        media_required: false,
        prompt_required: true,
    };
    let r = validate(c.options, c.content, rules, &s.config.limits)?;
    // The completion's id names the request (`x-request-id`, the ledger's request history).
    let id = format!(
        "chatcmpl-{}",
        slot.as_ref().map_or_else(new_id, |x| x.id.0.clone())
    );
    let created = now();
    let logprobs = r.sampling.logprobs.is_some();
    if !c.stream {
        let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": o.plan.choice.model,
            "choices": choices_json(&id, &o.generations, logprobs, c.tool.as_deref()),
            "usage": usage_json(&o), "plan": o.plan, "notes": o.notes,
        }))
        .into_response());
    }
    let shape = Shape::Chat { tool: c.tool };
    stream(s, t, vec![(r, slot, shape)], id, created, c.include_usage).await
}

/// What a stream's chunks are: chat completion chunks (a forced call's arguments as tool-call
/// deltas), or text completion chunks (`/v1/completions`; `echo`: the prompt comes first).
pub(crate) enum Shape {
    Chat { tool: Option<String> },
    Text { echo: Option<String> },
}

/// One request of a stream: its validated options, its admission slot and its chunks' shape.
pub(crate) type Streamed = (ValidRequest, Option<AdmissionSlot>, Shape);

/// Streaming: admission errors are ordinary HTTP errors; after that, SSE chunks, and an error
/// (timeout, engine) as an event carrying the same body as an HTTP error. A text completion may
/// stream several prompts: request `p`'s completion `i` is choice `p * n + i`, its final chunk
/// carries its own usage and plan, `include_usage`'s chunk the sum, and the first error ends the
/// stream (the others are cancelled).
pub(crate) async fn stream(
    s: Arc<AppState>,
    t: Tenant,
    requests: Vec<Streamed>,
    id: String,
    created: i64,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let logprobs = requests
        .first()
        .is_some_and(|(r, _, _)| r.sampling.logprobs.is_some());
    let mut admitted = Vec::with_capacity(requests.len());
    let mut shapes = Vec::with_capacity(requests.len());
    for (r, slot, shape) in requests {
        admitted.push(admit(&s, &t, r, slot).await?);
        shapes.push(shape);
    }
    let model = admitted[0].plan.choice.model.clone();
    let timeout = Duration::from_secs_f64(s.config.limits.request_timeout_s);
    let request_id = admitted[0].request_id.clone();
    let stream = async_stream(request_id.clone(), move |tx| async move {
        let text = matches!(shapes[0], Shape::Text { .. });
        let object = if text {
            "text_completion"
        } else {
            "chat.completion.chunk"
        };
        let chunk = |choices: Value| {
            json!({"id": id, "object": object, "created": created,
                   "model": model, "choices": choices})
        };
        let send = |v: Value| tx.send(SseEvent::default().data(v.to_string())).is_ok();
        // A stream's head was answered 200 (the `answered` line): an error is logged here, a
        // client that leaves first by the body's drop (`EventStream`).
        let error = |e: ApiError| {
            tracing::warn!(
                request_id = %request_id,
                status = e.status().as_u16(),
                "stream ended with an error: {e}"
            );
            let _ = tx.send(SseEvent::default().data(e.body().to_string()));
        };
        // A choice's index: the request's place times n, plus the completion's.
        let n = admitted[0].n;
        let index = |p: usize, i: usize| p * n + i;
        for (p, (a, shape)) in admitted.iter().zip(&shapes).enumerate() {
            for i in 0..a.n {
                let first = match shape {
                    // Text completions: the prompt first when echoed, no role chunk.
                    Shape::Text { echo: Some(prompt) } => {
                        json!([{"index": index(p, i), "text": prompt, "logprobs": null,
                                "finish_reason": null}])
                    }
                    Shape::Text { echo: None } => continue,
                    Shape::Chat { tool: None } => json!([{"index": index(p, i),
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": null, "logprobs": null}]),
                    // A forced call streams as OpenAI's do: its id and name first, then its
                    // arguments.
                    Shape::Chat { tool: Some(name) } => json!([{"index": index(p, i),
                        "delta": {"role": "assistant", "content": null, "tool_calls": [{
                            "index": 0, "id": call_id(&id, i), "type": "function",
                            "function": {"name": name, "arguments": ""}}]},
                        "finish_reason": null, "logprobs": null}]),
                };
                send(chunk(first));
            }
        }
        let delta = |p: usize, piece: &str| match &shapes[p] {
            Shape::Chat { tool: Some(_) } => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            }
            _ => json!({"content": piece}),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = admitted.len();
        let mut total_usage: Option<Value> = None;
        loop {
            let (p, ev) = match tokio::time::timeout_at(deadline, next_event(&mut admitted)).await {
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
                Ok(Some(x)) => x,
            };
            match ev {
                Event::Started => {}
                Event::Text { index: i, piece } => {
                    let c = if text {
                        chunk(json!([{"index": index(p, i), "text": piece,
                                      "finish_reason": null, "logprobs": null}]))
                    } else {
                        chunk(json!([{"index": index(p, i), "delta": delta(p, &piece),
                                      "finish_reason": null, "logprobs": null}]))
                    };
                    if !send(c) {
                        return; // client gone: the guards cancel the jobs
                    }
                }
                Event::Done(Err(e)) => {
                    error(e);
                    return;
                }
                Event::Done(Ok(generations)) => {
                    let a = &mut admitted[p];
                    a.guard.disarm();
                    let measured = record(&s, a, &generations);
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
                        let finish = finish_str(g.finish_reason);
                        let mut last = if text {
                            chunk(json!([{"index": index(p, i), "text": "",
                                "finish_reason": finish,
                                "logprobs": text_logprobs_json(logprobs, &[], &g.logprobs)}]))
                        } else {
                            chunk(json!([{"index": index(p, i), "delta": {},
                                "finish_reason": finish,
                                "logprobs": logprobs_json(logprobs, &g.logprobs)}]))
                        };
                        last["usage"] = usage.clone();
                        last["plan"] = json!(o.plan);
                        send(last);
                    }
                    match &mut total_usage {
                        None => total_usage = Some(usage),
                        Some(total) => add_usage(total, &usage),
                    }
                    left -= 1;
                    if left > 0 {
                        continue;
                    }
                    if include_usage {
                        let mut u = chunk(json!([]));
                        u["usage"] = total_usage.take().unwrap_or_default();
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

/// The next event of any of the admitted requests, with the request's place; None once every
/// request's events have ended.
async fn next_event(admitted: &mut [crate::admission::Admitted]) -> Option<(usize, Event)> {
    std::future::poll_fn(|cx| {
        let mut open = false;
        for (p, a) in admitted.iter_mut().enumerate() {
            match a.events.poll_recv(cx) {
                std::task::Poll::Ready(Some(ev)) => return std::task::Poll::Ready(Some((p, ev))),
                std::task::Poll::Ready(None) => {}
                std::task::Poll::Pending => open = true,
            }
        }
        if open {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(None)
        }
    })
    .await
}

/// Numbers summed and flags or-ed, field by field: the usage of several requests in one.
pub(crate) fn add_usage(total: &mut Value, one: &Value) {
    match (total, one) {
        (Value::Object(t), Value::Object(o)) => {
            for (k, v) in o {
                match t.get_mut(k) {
                    Some(x) => add_usage(x, v),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t @ Value::Number(_), Value::Number(o)) => {
            *t = match (t.as_u64(), o.as_u64()) {
                (Some(a), Some(b)) => json!(a + b),
                _ => json!(t.as_f64().unwrap_or(0.0) + o.as_f64().unwrap_or(0.0)),
            };
        }
        (t @ Value::Bool(_), Value::Bool(o)) => *t = json!(t.as_bool() == Some(true) || *o),
        _ => {}
    }
}

/// A stream of SSE events fed by a spawned task (dropping the stream ends the task's sends).
/// The task returns after its last event (`[DONE]` or an error), dropping its sender; a stream
/// dropped before that (its client closed the connection) is logged at `info` with `request_id`.
fn async_stream<F, Fut>(
    request_id: String,
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
        request_id,
        _task: AbortOnDrop(handle),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The response body. The closed line is logged here rather than in the task: a body is always
/// dropped when its connection goes, while a task aborted before its first poll never runs.
struct EventStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<SseEvent>,
    request_id: String,
    _task: AbortOnDrop,
}

impl Drop for EventStream {
    /// Runs before the fields drop: a task still running (or never run) holds its sender, so
    /// the channel is open; one that returned has closed it.
    fn drop(&mut self) {
        if !self.rx.is_closed() {
            tracing::info!(request_id = %self.request_id, "stream closed by its client");
        }
    }
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
