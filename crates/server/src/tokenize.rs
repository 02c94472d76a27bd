//! A served checkpoint's tokenizer over HTTP, as vLLM serves it: `POST /tokenize` (text to the
//! checkpoint's token ids), `POST /detokenize` (ids to text) and `GET /tokenizer_info` (its
//! special tokens and context), for clients that send token-id prompts to `/v1/completions`
//! without the tokenizer at hand (lm-eval's `tokenizer_backend=remote`), or count tokens before
//! they send.
//! No model runs and nothing is charged; a tenant's key is required.
//!
//! Owns these two bodies and answers, and [`token_checkpoint`]: which checkpoint's ids a request
//! means (the one it names, else the one vocabulary every served checkpoint shares), which
//! `/v1/completions` uses for token-id prompts too. It must not know planning or the engine's
//! forward pass.

use crate::error::ApiError;
use crate::routes::json_error;
use crate::AppState;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use vvlm_engine::VideoVlm;

/// The checkpoint whose token ids a request means: the one it names (`model`; 404 if none is
/// served by that name), else any served one, when every served checkpoint reads ids alike
/// (one vocabulary: [`VideoVlm::vocabulary_fingerprint`]); otherwise the ids would mean
/// different text to each, and `model` is required (422).
pub fn token_checkpoint(
    s: &AppState,
    model: Option<&str>,
) -> Result<(String, Arc<VideoVlm>), ApiError> {
    if let Some(m) = model.filter(|m| !m.is_empty() && *m != "auto") {
        return s
            .engine(m)
            .map(|e| (m.to_string(), e))
            .ok_or_else(|| ApiError::ModelNotFound(format!("the model `{m}` does not exist")));
    }
    let engines: Vec<(String, Arc<VideoVlm>)> = s.engines().into_iter().collect();
    let first = engines
        .first()
        .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
    if engines
        .iter()
        .any(|(_, e)| e.vocabulary_fingerprint() != first.1.vocabulary_fingerprint())
    {
        let names: Vec<&str> = engines.iter().map(|(n, _)| n.as_str()).collect();
        return Err(ApiError::invalid(
            "model",
            format!(
                "token ids need `model`: the served checkpoints ({}) do not share one vocabulary",
                names.join(", ")
            ),
        ));
    }
    Ok(first.clone())
}

fn yes() -> bool {
    true
}

/// `POST /tokenize`'s body (vLLM's completion form).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeBody {
    #[serde(default)]
    model: Option<String>,
    prompt: String,
    /// The tokenizer's own special tokens (a BOS where it adds one), as a completion's text
    /// prompt is tokenized; false: the text's tokens alone.
    #[serde(default = "yes")]
    add_special_tokens: bool,
    /// Each token's string as the vocabulary writes it (a byte-level BPE's `Ġ` for a space).
    #[serde(default)]
    return_token_strs: bool,
}

/// `GET /tokenizer_info`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfoQuery {
    #[serde(default)]
    model: Option<String>,
}

/// The tokenizer's special tokens as text (`eos_token`, `bos_token`, `pad_token`: null when it
/// has none), the vocabulary's size and the trained context (`model_max_length`), as vLLM's
/// `/tokenizer_info` answers them (no chat template: the checkpoint's is built in, not Jinja).
pub async fn info(s: Arc<AppState>, q: InfoQuery) -> Result<Response, ApiError> {
    let (model, e) = token_checkpoint(&s, q.model.as_deref())?;
    let text = |id: Option<u32>| -> Option<String> { e.tokenizer.as_ref()?.id_to_token(id?) };
    let tc = &e.cfg.text_config;
    let eos = tc.eos_ids().first().copied();
    Ok(Json(json!({
        "model": model, "eos_token": text(eos), "bos_token": text(tc.bos_token_id),
        "pad_token": Value::Null, "vocab_size": tc.vocab_size,
        "model_max_length": tc.max_position_embeddings, "chat_template": Value::Null,
    }))
    .into_response())
}

/// `POST /detokenize`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeBody {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// Text to token ids: `{count, max_model_len, tokens, token_strs, model}`.
pub async fn tokenize(s: Arc<AppState>, body: Body<TokenizeBody>) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(json_error)?;
    let max = s.config.limits.max_prompt_chars;
    if b.prompt.chars().count() > max {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt is longer than {max} characters"),
        ));
    }
    let (model, e) = token_checkpoint(&s, b.model.as_deref())?;
    let tok = e
        .tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::Internal("the checkpoint has no tokenizer".into()))?;
    let ids = tok
        .encode(b.prompt.as_str(), b.add_special_tokens)
        .map_err(|err| ApiError::invalid("prompt", format!("tokenizing: {err}")))?
        .get_ids()
        .to_vec();
    let strs = b.return_token_strs.then(|| {
        ids.iter()
            .map(|&i| tok.id_to_token(i).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(Json(json!({
        "count": ids.len(), "max_model_len": e.cfg.text_config.max_position_embeddings,
        "tokens": ids, "token_strs": strs, "model": model,
    }))
    .into_response())
}

/// Token ids to text, special tokens included (as a token-id prompt is echoed): `{prompt,
/// model}`; an id outside the vocabulary is 422 naming it.
pub async fn detokenize(
    s: Arc<AppState>,
    body: Body<DetokenizeBody>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(json_error)?;
    let (model, e) = token_checkpoint(&s, b.model.as_deref())?;
    let vocab = e.cfg.text_config.vocab_size;
    if let Some((i, id)) = b
        .tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(ApiError::invalid(
            "tokens",
            format!("token {id} (tokens[{i}]) is outside the vocabulary of {vocab} tokens"),
        ));
    }
    let text = e.prompt_text(&b.tokens).map_err(ApiError::from)?;
    Ok(Json(json!({"prompt": text, "model": model})).into_response())
}
