//! OpenAI's text completions, `POST /v1/completions`: a prompt as it is (no chat template, no
//! video), continued by the checkpoint the planner chooses for it, for the clients and
//! benchmarks that speak this API (vLLM's `bench serve`, lm-eval's `local-completions`). The
//! options are chat's (budget, sampling controls, structured outputs, `n`, `stop`, `seed`),
//! read by the same code; this module owns only what differs: `prompt`, `echo`, `best_of`,
//! `suffix`, `logprobs` as a count, and the `text_completion` shapes. `echo` with `logprobs`
//! returns the prompt's tokens with their log-probabilities ahead of the completion's (the
//! first token's `null`), what lm-eval's log-likelihood tasks read.

use crate::admission::{run_to_completion, AdmissionSlot};
use crate::chat::{finish_str, stream, stream_flags, text_logprobs_json, Shape};
use crate::error::ApiError;
use crate::ledger::{now, Tenant};
use crate::routes::{json_error, new_id, usage_json};
use crate::validation::{validate, Content, Media, RequestOptions, Rules};
use crate::AppState;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Fields read here besides the shared options.
const OWN: &[&str] = &["stream", "stream_options", "user"];

/// The most alternatives the text completions API returns per token.
const MAX_LOGPROBS: u64 = 5;

/// The length OpenAI's completions default to when `max_tokens` is not given.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// What a completions body asks for, beside the shared options.
struct TextRequest {
    prompt: String,
    echo: bool,
    /// `echo` with `logprobs`: the prompt's log-probabilities too, with this many alternatives.
    prompt_logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

/// Reads what differs from chat, leaving the shared options in `body`.
fn parse(body: &mut Map<String, Value>) -> Result<TextRequest, ApiError> {
    if body.remove("suffix").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::Unsupported {
            param: "suffix".into(),
        });
    }
    let prompt = match body.remove("prompt") {
        Some(Value::String(p)) => p,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|p| p.is_string()) => {
            return Err(ApiError::invalid(
                "prompt",
                "one prompt per request: send each as its own request (they are decoded together)",
            ))
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            return Err(ApiError::invalid(
                "prompt",
                "token-id prompts are not supported: send the prompt's text",
            ))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be a string (or a list of one)",
            ))
        }
    };
    let echo = match body.remove("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(ApiError::invalid("echo", "`echo` must be a boolean")),
    };
    let (stream, include_usage) = stream_flags(body)?;
    let mut prompt_logprobs = None;
    // `logprobs` here is a count of alternatives (0-5), chat's is a flag with `top_logprobs`.
    match body.remove("logprobs") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_LOGPROBS => {
                if echo {
                    if stream {
                        return Err(ApiError::invalid(
                            "stream",
                            "echo with logprobs (the prompt's log-probabilities) is answered \
                             whole: ask without stream",
                        ));
                    }
                    prompt_logprobs = Some(k as usize);
                }
                body.insert("logprobs".into(), json!(true));
                body.insert("top_logprobs".into(), json!(k));
            }
            _ => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!(
                        "`logprobs` must be a whole number from 0 to {MAX_LOGPROBS} (the \
                         alternatives shown per token)"
                    ),
                ))
            }
        },
    }
    // Every completion generated is returned: best_of may only say so.
    let n = body.get("n").and_then(|v| v.as_u64()).unwrap_or(1);
    match body.remove("best_of") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(n) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "best_of",
                "best_of must equal n: vvlm returns every completion it generates",
            ))
        }
    }
    if !body.contains_key("max_tokens") && !body.contains_key("max_completion_tokens") {
        body.insert("max_tokens".into(), json!(DEFAULT_MAX_TOKENS));
    }
    Ok(TextRequest {
        prompt,
        echo,
        prompt_logprobs,
        stream,
        include_usage,
    })
}

/// Runs a text completion; the handler in [`crate::routes`] authenticates and stamps quotas.
pub async fn completions(
    s: Arc<AppState>,
    t: Tenant,
    slot: Option<AdmissionSlot>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut body) = body.map_err(json_error)?;
    let text = parse(&mut body)?;
    let options = RequestOptions::take_from(&mut body, OWN)?;
    let content = Content {
        prompt: text.prompt.clone(),
        system: None,
        history: vec![],
        media: Media::None,
    };
    let rules = Rules {
        default_task: "qa",
        media_required: false,
        prompt_required: true,
    };
    let mut r = validate(options, content, rules, &s.config.limits)?;
    r.raw = true;
    r.sampling.prompt_logprobs = text.prompt_logprobs;
    // The completion's id names the request (`x-request-id`, the ledger's request history).
    let id = format!(
        "cmpl-{}",
        slot.as_ref().map_or_else(new_id, |x| x.id.0.clone())
    );
    let created = now();
    let logprobs = r.sampling.logprobs.is_some();
    let echo = text.echo.then_some(text.prompt);
    if text.stream {
        let shape = Shape::Text { echo };
        return stream(s, t, r, slot, id, created, text.include_usage, shape).await;
    }
    let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
    let choices: Vec<Value> = o
        .generations
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let text = match &echo {
                Some(p) => format!("{p}{}", g.text),
                None => g.text.clone(),
            };
            json!({
                "index": i, "text": text, "finish_reason": finish_str(g.finish_reason),
                // The prompt's entries are there when it was scored (`echo` with `logprobs`).
                "logprobs": text_logprobs_json(logprobs, &g.prompt_logprobs, &g.logprobs),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": o.plan.choice.model,
        "choices": choices, "usage": usage_json(&o), "plan": o.plan, "notes": o.notes,
    }))
    .into_response())
}
