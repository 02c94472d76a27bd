//! OpenAI's text completions, `POST /v1/completions`: a prompt as it is (no chat template, no
//! video), continued by the checkpoint the planner chooses for it, for the clients and
//! benchmarks that speak this API (vLLM's `bench serve`, lm-eval's `local-completions`). The
//! options are chat's (budget, sampling controls, structured outputs, `n`, `stop`, `seed`),
//! read by the same code; this module owns only what differs: `prompt`, `echo`, `best_of`,
//! `suffix`, `logprobs` as a count, and the `text_completion` shapes. `echo` with `logprobs`
//! returns the prompt's tokens with their log-probabilities ahead of the completion's (the
//! first token's `null`), what lm-eval's log-likelihood tasks read.
//!
//! A prompt is text or the checkpoint's token ids (what lm-eval sends by default), and one
//! request may send several (a list of either): each is planned, reserved and charged as its
//! own request would be, they are queued together (so the workers batch them), share the
//! request's admission place, and come back as choices `i * n + j`, prompt by prompt (streamed
//! too: the chunks of every prompt's choices interleave as they are generated).

use crate::admission::{run_to_completion, AdmissionSlot};
use crate::chat::{add_usage, finish_str, stream, stream_flags, text_logprobs_json, Shape};
use crate::error::ApiError;
use crate::ledger::{now, Tenant};
use crate::routes::{json_error, new_id, usage_json};
use crate::tokenize::token_checkpoint;
use crate::validation::{
    optional_flag, validate, Content, Media, RequestOptions, Rules, ValidRequest,
};
use crate::AppState;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use vvlm_engine::PromptForm;

/// Fields read here besides the shared options.
const OWN: &[&str] = &["stream", "stream_options", "user"];

/// The most alternatives the text completions API returns per token.
const MAX_LOGPROBS: u64 = 5;

/// The length OpenAI's completions default to when `max_tokens` is not given.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// One prompt: text, continued as it is, or the checkpoint's token ids.
#[derive(Debug, Clone, PartialEq)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// What a completions body asks for, beside the shared options.
struct TextRequest {
    prompts: Vec<Prompt>,
    echo: bool,
    /// `echo` with `logprobs`: the prompt's log-probabilities too, with this many alternatives.
    prompt_logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

/// A list of token ids, if `v` is one (each a whole number that fits a token id).
fn token_ids(v: &[Value]) -> Option<Vec<u32>> {
    v.iter()
        .map(|x| x.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

/// `prompt` as OpenAI's API takes it: a string, a list of strings, a list of token ids, or a
/// list of token-id lists.
fn parse_prompts(v: Option<Value>, max_prompts: usize) -> Result<Vec<Prompt>, ApiError> {
    let shapes = "`prompt` must be a string, a list of strings, a list of token ids or a list of \
                  token-id lists";
    let prompts = match v {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"))
        }
        Some(Value::String(p)) => vec![Prompt::Text(p)],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` is an empty list"))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .into_iter()
            .map(|p| Prompt::Text(p.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            vec![Prompt::Tokens(token_ids(&a).ok_or_else(|| {
                ApiError::invalid("prompt", "token ids are whole numbers from 0 to 2^32 - 1")
            })?)]
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ids = p.as_array().and_then(|p| token_ids(p)).ok_or_else(|| {
                    ApiError::invalid(
                        &format!("prompt[{i}]"),
                        "token ids are whole numbers from 0 to 2^32 - 1",
                    )
                })?;
                Ok(Prompt::Tokens(ids))
            })
            .collect::<Result<_, ApiError>>()?,
        Some(_) => return Err(ApiError::invalid("prompt", shapes)),
    };
    if prompts.len() > max_prompts {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts; at most {max_prompts} per request (`[limits] max_prompts`)",
                prompts.len()
            ),
        ));
    }
    Ok(prompts)
}

/// Reads what differs from chat, leaving the shared options in `body`.
fn parse(body: &mut Map<String, Value>, max_prompts: usize) -> Result<TextRequest, ApiError> {
    if body.remove("suffix").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::Unsupported {
            param: "suffix".into(),
        });
    }
    let prompts = parse_prompts(body.remove("prompt"), max_prompts)?;
    let echo = optional_flag(body.remove("echo").as_ref(), "echo", "echo")?;
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
        prompts,
        echo,
        prompt_logprobs,
        stream,
        include_usage,
    })
}

/// Where prompt `i` is named in an error: `prompt`, or `prompt[i]` when there are several.
fn prompt_param(i: usize, several: bool) -> String {
    if several {
        format!("prompt[{i}]")
    } else {
        "prompt".into()
    }
}

/// Each prompt's own rules (the shared options are validated once): text is not blank and not
/// over `max_prompt_chars` characters; token ids are some, and at most that many.
fn check_prompts(prompts: &[Prompt], max: usize) -> Result<(), ApiError> {
    let several = prompts.len() > 1;
    for (i, p) in prompts.iter().enumerate() {
        let problem = match p {
            Prompt::Text(t) if t.trim().is_empty() => Some("the prompt is empty".to_string()),
            Prompt::Text(t) if t.chars().count() > max => {
                Some(format!("prompt is longer than {max} characters"))
            }
            Prompt::Tokens(ids) if ids.is_empty() => Some("the prompt has no tokens".to_string()),
            Prompt::Tokens(ids) if ids.len() > max => {
                Some(format!("prompt is longer than {max} tokens"))
            }
            _ => None,
        };
        if let Some(m) = problem {
            return Err(ApiError::invalid(&prompt_param(i, several), m));
        }
    }
    Ok(())
}

/// Each prompt's request: the shared options with its text or token ids; and the text its
/// `echo` returns (a token-id prompt decoded, special tokens included).
fn prompt_requests(
    s: &AppState,
    r: &ValidRequest,
    prompts: Vec<Prompt>,
) -> Result<Vec<(ValidRequest, String)>, ApiError> {
    let several = prompts.len() > 1;
    // Token ids are read by the named checkpoint, else by the vocabulary all served share.
    let checkpoint = if prompts.iter().any(|p| matches!(p, Prompt::Tokens(_))) {
        Some(token_checkpoint(s, r.pins.model.as_deref())?.1)
    } else {
        None
    };
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut one = r.clone();
            match p {
                Prompt::Text(t) => {
                    one.prompt = t;
                    one.form = PromptForm::Raw;
                }
                Prompt::Tokens(ids) => {
                    let form = PromptForm::Tokens(ids);
                    if let (PromptForm::Tokens(ids), Some(e)) = (&form, &checkpoint) {
                        if let Err(e) = e.completion_prompt_ids(&form, "") {
                            return Err(ApiError::invalid(
                                &prompt_param(i, several),
                                e.to_string(),
                            ));
                        }
                        one.prompt = e.prompt_text(ids).map_err(ApiError::from)?;
                    }
                    one.form = form;
                }
            }
            let echo = one.prompt.clone();
            Ok((one, echo))
        })
        .collect()
}

/// Runs a text completion; the handler in [`crate::routes`] authenticates and stamps quotas.
pub async fn completions(
    s: Arc<AppState>,
    t: Tenant,
    slot: Option<AdmissionSlot>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut body) = body.map_err(json_error)?;
    let limits = &s.config.limits;
    let text = parse(&mut body, limits.max_prompts)?;
    check_prompts(&text.prompts, limits.max_prompt_chars)?;
    let options = RequestOptions::take_from(&mut body, OWN)?;
    // The shared options, validated once; each prompt is put in below.
    let content = Content {
        prompt: String::new(),
        system: None,
        history: vec![],
        media: Media::None,
    };
    let rules = Rules {
        default_task: "qa",
        media_required: false,
        prompt_required: false,
    };
    let mut r = validate(options, content, rules, limits)?;
    r.sampling.prompt_logprobs = text.prompt_logprobs;
    let requests = prompt_requests(&s, &r, text.prompts)?;
    // The completion's id names the request (`x-request-id`, the ledger's request history).
    let id = format!(
        "cmpl-{}",
        slot.as_ref().map_or_else(new_id, |x| x.id.0.clone())
    );
    let created = now();
    let logprobs = r.sampling.logprobs.is_some();
    let slots: Vec<Option<AdmissionSlot>> = match &slot {
        Some(x) if requests.len() > 1 => x.split(requests.len()).into_iter().map(Some).collect(),
        _ => vec![slot],
    };
    if text.stream {
        let streamed = requests
            .into_iter()
            .zip(slots)
            .map(|((r, echo), slot)| {
                let shape = Shape::Text {
                    echo: text.echo.then_some(echo),
                };
                (r, slot, shape)
            })
            .collect();
        return stream(s, t, streamed, id, created, text.include_usage).await;
    }
    // Every prompt is queued at once (the workers batch them); the first error is the answer,
    // and dropping the others' tasks cancels them.
    let mut tasks = tokio::task::JoinSet::new();
    let mut echoes = Vec::with_capacity(requests.len());
    for (i, ((r, echo), slot)) in requests.into_iter().zip(slots).enumerate() {
        echoes.push(echo);
        let (s, t) = (s.clone(), t.clone());
        tasks.spawn(async move { (i, run_to_completion(s, t, r, slot).await) });
    }
    let mut outcomes: Vec<Option<crate::admission::Outcome>> =
        (0..echoes.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, o) = done.map_err(|e| ApiError::Internal(format!("a prompt's task: {e}")))?;
        outcomes[i] = Some(o?);
    }
    let outcomes: Vec<_> = outcomes.into_iter().flatten().collect();
    let mut choices = vec![];
    for (i, o) in outcomes.iter().enumerate() {
        for (j, g) in o.generations.iter().enumerate() {
            let text = match text.echo {
                true => format!("{}{}", echoes[i], g.text),
                false => g.text.clone(),
            };
            choices.push(json!({
                "index": i * o.n + j, "text": text, "finish_reason": finish_str(g.finish_reason),
                // The prompt's entries are there when it was scored (`echo` with `logprobs`).
                "logprobs": text_logprobs_json(logprobs, &g.prompt_logprobs, &g.logprobs),
            }));
        }
    }
    let first = &outcomes[0];
    let mut usage = usage_json(first);
    for o in &outcomes[1..] {
        add_usage(&mut usage, &usage_json(o));
    }
    let mut notes: Vec<String> = vec![];
    for note in outcomes.iter().flat_map(|o| &o.notes) {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
    let mut v = json!({
        "id": id, "object": "text_completion", "created": created,
        "model": first.plan.choice.model, "choices": choices, "usage": usage,
        "plan": first.plan, "notes": notes,
    });
    if outcomes.len() > 1 {
        // Each prompt's own plan, in order (`plan` is the first's).
        v["plans"] = json!(outcomes.iter().map(|o| &o.plan).collect::<Vec<_>>());
    }
    Ok(Json(v).into_response())
}
