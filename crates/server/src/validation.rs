//! Request parsing and validation. Every body shape (multipart form, JSON video body, OpenAI
//! chat, plan) is read into the same [`RequestOptions`] plus its [`Content`], and
//! [`validate`] turns them into a [`ValidRequest`]: the only type that is planned, charged or
//! queued. Adding an option is one field of [`RequestOptions`] and its rule in [`validate`].
//!
//! Owns the request rules (a JSON Schema is compiled here only to refuse what the engine's
//! subset cannot enforce); must not know the ledger, the planner's search or the engine's
//! tensors.

use crate::config::Limits;
use crate::error::ApiError;
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use vvlm_engine::generate::{Penalties, PromptForm, ResponseFormat};
use vvlm_engine::template::Turn;
use vvlm_engine::{SamplingParams, MAX_TOP_LOGPROBS};
use vvlm_planner::Pins;

/// A budget given as a number or a string (`5e12`, `5T`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Budget {
    Number(f64),
    Text(String),
}

impl Budget {
    /// A quota: like a budget, and 0 is allowed (a tenant that may not spend, as the CLI
    /// allows).
    pub fn quota_flops(&self) -> Result<f64, ApiError> {
        let v = match self {
            Budget::Number(v) => Some(*v),
            Budget::Text(s) => vvlm_cost::parse_si(s),
        };
        match v {
            Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(ApiError::Validation(format!(
                "quota must be a number of FLOPs >= 0 such as 1e15 or \"1P\", got {self}"
            ))),
        }
    }

    pub fn flops(&self) -> Result<f64, ApiError> {
        let v = match self {
            Budget::Number(v) => Some(*v),
            Budget::Text(s) => vvlm_cost::parse_si(s),
        };
        match v {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(ApiError::Validation(format!(
                "budget must be a positive number of FLOPs such as 5e12 or \"5T\", got {self}"
            ))),
        }
    }
}

/// As the client wrote it: a number, or a string in quotes.
impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Number(v) => write!(f, "{v}"),
            Budget::Text(s) => write!(f, "{}", Value::String(s.clone())),
        }
    }
}

/// Where the frames come from.
#[derive(Debug, Clone, Default)]
pub enum Media {
    VideoBytes(Vec<u8>),
    VideoPath(PathBuf),
    Images(Vec<Vec<u8>>),
    #[default]
    None,
}

/// A media body the server fetched for a request.
#[derive(Debug)]
pub struct FetchedBody {
    pub image: bool,
    pub bytes: Vec<u8>,
    /// How many times the request names its URL (the last use takes the bytes, no copy).
    pub uses: usize,
}

/// Media bodies the server fetched for a request, by their `http(s)://` URL.
pub type Fetched = std::collections::HashMap<String, FetchedBody>;

/// Where a request's media URLs may come from: `file://` under `folders`, and the `http(s)://`
/// URLs the server fetched for it (`fetched`, by [`crate::remote::fetch_media`]).
#[derive(Debug, Default)]
pub struct MediaSources<'a> {
    pub folders: std::borrow::Cow<'a, [PathBuf]>,
    pub fetched: std::cell::RefCell<Fetched>,
}

impl<'a> MediaSources<'a> {
    /// `file://` under these folders, and these fetched bodies.
    pub fn new(folders: std::borrow::Cow<'a, [PathBuf]>, fetched: Fetched) -> Self {
        Self {
            folders,
            fetched: std::cell::RefCell::new(fetched),
        }
    }

    /// `file://` under these folders, nothing fetched.
    pub fn folders(folders: &'a [PathBuf]) -> Self {
        Self::new(std::borrow::Cow::Borrowed(folders), Fetched::new())
    }

    /// A fetched URL's body as media (moved out at its last use).
    fn take(&self, url: &str) -> Option<Media> {
        let mut fetched = self.fetched.borrow_mut();
        let body = fetched.get_mut(url)?;
        let (image, bytes) = if body.uses > 1 {
            body.uses -= 1;
            (body.image, body.bytes.clone())
        } else {
            let b = fetched.remove(url)?;
            (b.image, b.bytes)
        };
        Some(if image {
            Media::Images(vec![bytes])
        } else {
            Media::VideoBytes(bytes)
        })
    }
}

/// Decodes a `data:` URL (base64), takes a fetched `http(s)://` URL's body, or resolves a
/// `file://` URL under the allowed folders.
pub fn resolve_url(url: &str, sources: &MediaSources) -> Result<Media, ApiError> {
    let allow: &[PathBuf] = &sources.folders;
    if let Some(media) = sources.take(url) {
        return Ok(media);
    }
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::Validation("malformed data: URL (no comma)".into()))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::Validation(
                "data: URLs must be base64-encoded".into(),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::Validation(format!("data: URL is not valid base64: {e}")))?;
        return Ok(if meta.starts_with("image/") {
            Media::Images(vec![bytes])
        } else {
            Media::VideoBytes(bytes)
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        if allow.is_empty() {
            return Err(ApiError::Forbidden(
                "file:// URLs are disabled on this server (file_allow is empty)".into(),
            ));
        }
        // One answer whether the file is missing or outside the allow-list: a different status
        // would tell a client which paths exist anywhere on the machine.
        let refused = || {
            ApiError::Forbidden(format!(
                "{path} is not an existing file under the allowed folders"
            ))
        };
        let p = Path::new(path).canonicalize().map_err(|_| refused())?;
        let allowed = allow
            .iter()
            .filter_map(|a| a.canonicalize().ok())
            .any(|a| p.starts_with(&a));
        if !allowed || !p.is_file() {
            return Err(refused());
        }
        return Ok(Media::VideoPath(p));
    }
    Err(ApiError::Validation(
        "video URLs must be data: (base64), file:// (allow-listed) or http(s):// (allow-listed)"
            .into(),
    ))
}

/// Every option a request may carry, whichever body it arrives in. Numbers may also be given
/// as strings (multipart fields are text). Unknown fields are refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestOptions {
    /// FLOPs for this request (`budget_flops` in chat bodies).
    #[serde(default, alias = "budget_flops")]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub task: Option<String>,
    /// Pin a checkpoint (`auto` or empty: let the planner choose).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub frames: Option<u32>,
    #[serde(default, deserialize_with = "lenient")]
    pub tokens_per_frame: Option<u32>,
    #[serde(default, deserialize_with = "lenient", alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "lenient")]
    pub temperature: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    pub seed: Option<u64>,
    /// A string or a list of up to 4.
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Completions to generate from the one video (each planned at budget / n).
    #[serde(default, deserialize_with = "lenient")]
    pub n: Option<u32>,
    #[serde(default, deserialize_with = "lenient")]
    pub logprobs: Option<bool>,
    #[serde(default, deserialize_with = "lenient")]
    pub top_logprobs: Option<u32>,
    /// vLLM's: only the k likeliest tokens (0 or -1: all).
    #[serde(default, deserialize_with = "lenient")]
    pub top_k: Option<i64>,
    /// vLLM's: only tokens at least `min_p` times as likely as the likeliest.
    #[serde(default, deserialize_with = "lenient")]
    pub min_p: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    pub presence_penalty: Option<f64>,
    /// vLLM's (and Hugging Face's): over the prompt's and the generated tokens.
    #[serde(default, deserialize_with = "lenient")]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's: token id (as a string) -> bias in [-100, 100], added to its logit.
    #[serde(default, deserialize_with = "object_or_json_text")]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// OpenAI's: `{"type": "text"}` or `{"type": "json_object"}` (JSON mode).
    #[serde(default, deserialize_with = "object_or_json_text")]
    pub response_format: Option<Map<String, Value>>,
    /// vLLM's: the answer must be exactly one of these strings.
    #[serde(default, deserialize_with = "object_or_json_text")]
    pub guided_choice: Option<Vec<String>>,
}

/// The most strings a `guided_choice` may list, the longest one and all together (characters:
/// each is checked against the planned checkpoint's tokens before the request is queued).
pub const MAX_CHOICES: usize = 64;
pub const MAX_CHOICE_CHARS: usize = 256;
pub const MAX_CHOICES_CHARS: usize = 4096;

/// The most entries a `logit_bias` may hold.
pub const MAX_LOGIT_BIAS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// An optional boolean field: absent or null is false; any other non-boolean is a 422 naming
/// `param` (`name` is the field as the message shows it, e.g. `stream_options.include_usage`).
pub(crate) fn optional_flag(v: Option<&Value>, param: &str, name: &str) -> Result<bool, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            param,
            format!("`{name}` must be true or false, got {}", shown(other)),
        )),
    }
}

/// An object given as itself or as its JSON text (a form field).
fn object_or_json_text<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => serde_json::from_str(&t).map(Some).map_err(|e| {
            serde::de::Error::custom(format!("not a JSON object: {}", json_words(&e.to_string())))
        }),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(json_words(&e.to_string()))),
    }
}

/// A value given as itself or as its text (`"8"` for 8, `"true"` for true).
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Value(T),
        Text(String),
    }
    match Option::<Either<T>>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Value(v)) => Ok(Some(v)),
        Some(Either::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{t}` is not a valid value"))),
    }
}

impl RequestOptions {
    /// Reads the options out of a JSON object; what remains is the body's own fields. A field
    /// with a bad value is named in the error.
    pub fn take_from(body: &mut Map<String, Value>, own: &[&str]) -> Result<Self, ApiError> {
        let keys: Vec<String> = body
            .keys()
            .filter(|k| !own.contains(&k.as_str()))
            .cloned()
            .collect();
        let options: Map<String, Value> = keys
            .into_iter()
            .filter_map(|k| body.remove_entry(&k))
            .collect();
        for (k, v) in &options {
            Self::deserialize_one(k, v)?;
        }
        serde_json::from_value(Value::Object(options))
            .map_err(|e| ApiError::Validation(e.to_string()))
    }

    /// Checks one field alone, to name it in the error.
    fn deserialize_one(key: &str, value: &Value) -> Result<(), ApiError> {
        let mut m = Map::new();
        m.insert(key.to_string(), value.clone());
        match serde_json::from_value::<Self>(Value::Object(m)) {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().starts_with("unknown field") => {
                Err(ApiError::invalid(key, format!("unknown field `{key}`")))
            }
            Err(e) => Err(ApiError::invalid(
                key,
                match expected_shape(key) {
                    Some(shape) => format!("`{key}` must be {shape}, got {}", shown(value)),
                    None => format!("`{key}`: {}", json_words(&e.to_string())),
                },
            )),
        }
    }
}

/// What each option takes, in JSON's words (a wrong type is answered with it instead of the
/// deserializer's own message). Ranges are checked, and named, afterwards.
fn expected_shape(key: &str) -> Option<&'static str> {
    Some(match key {
        "budget" | "budget_flops" => "a number of FLOPs or a string such as \"5T\"",
        "task" | "model" => "a string",
        "frames"
        | "tokens_per_frame"
        | "max_tokens"
        | "max_completion_tokens"
        | "n"
        | "top_logprobs"
        | "seed" => "a whole number >= 0",
        "top_k" => "a whole number",
        "temperature" | "top_p" | "min_p" | "frequency_penalty" | "presence_penalty"
        | "repetition_penalty" => "a number",
        "logprobs" => "true or false",
        "stop" => "a string or an array of strings",
        "guided_choice" => "an array of strings",
        _ => return None,
    })
}

/// A client's value as it appears in JSON, cut short.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// A deserializer's message in JSON's words: "an object" and "an array", not serde's "map" and
/// "sequence"; no Rust type or enum names.
pub(crate) fn json_words(msg: &str) -> String {
    let mut m = msg
        .replace("invalid type: map", "invalid type: object")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a map", "expected an object")
        .replace("expected a sequence", "expected an array")
        .replace("expected struct ", "expected an object ")
        .replace("expected usize", "expected a whole number >= 0")
        .replace("expected u32", "expected a whole number >= 0")
        .replace("expected u64", "expected a whole number >= 0")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected f32", "expected a number")
        .replace("unknown variant", "unknown value");
    if let Some(i) = m.find("data did not match any variant of untagged enum") {
        m.replace_range(i.., "not one of the accepted forms");
    }
    m
}

/// What a request asks about: its text and its media.
#[derive(Debug, Default)]
pub struct Content {
    /// The (last) user message.
    pub prompt: String,
    pub system: Option<String>,
    /// A chat's earlier messages, in order (empty for one user turn).
    pub history: Vec<Turn>,
    pub media: Media,
}

/// A request that passed every rule: the only shape that is planned, charged and queued.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub task: String,
    pub prompt: String,
    pub system: Option<String>,
    /// A chat's earlier messages, in order.
    pub history: Vec<Turn>,
    /// The request's budget (None: the tenant's default).
    pub budget: Option<f64>,
    pub pins: Pins,
    /// max_tokens as the client gave it (the planner prices it; None: the server's estimate).
    pub max_tokens: Option<usize>,
    /// Sampling for the engine, max_tokens resolved.
    pub sampling: SamplingParams,
    /// Completions to generate (1..=MAX_N).
    pub n: usize,
    /// `Media::None`: a text-only request (chat only).
    pub media: Media,
    /// How the prompt is read: a chat message, or (`/v1/completions`) the prompt as it is, as
    /// text or token ids, without system message, history or chat template.
    pub form: PromptForm,
}

/// The most completions one request may ask for.
pub const MAX_N: u32 = 8;

/// What a route requires besides the options' own rules.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub default_task: &'a str,
    /// A video or images must be sent (caption and QA); chat also serves text alone.
    pub media_required: bool,
    /// A prompt must be given (a plan may be asked without one), except by a caption request:
    /// it then asks the checkpoint's caption instruction (`caption_prompt`).
    pub prompt_required: bool,
}

/// Applies every rule; the answer names the field at fault.
pub fn validate(
    o: RequestOptions,
    c: Content,
    rules: Rules,
    limits: &Limits,
) -> Result<ValidRequest, ApiError> {
    let caption = o.task.as_deref().unwrap_or(rules.default_task) == "caption";
    if rules.prompt_required && c.prompt.trim().is_empty() && !caption {
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` (or `question`) is required",
        ));
    }
    if c.prompt.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt is longer than {} characters",
                limits.max_prompt_chars
            ),
        ));
    }
    // A conversation is held to the same cap as one message: its messages together.
    let conversation: usize = c.prompt.chars().count()
        + c.history
            .iter()
            .map(|t| t.content.chars().count())
            .sum::<usize>();
    if conversation > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the conversation's messages are longer than {} characters together",
                limits.max_prompt_chars
            ),
        ));
    }
    if c.system
        .as_deref()
        .is_some_and(|x| x.chars().count() > limits.max_prompt_chars)
    {
        return Err(ApiError::invalid(
            "system",
            format!(
                "system is longer than {} characters",
                limits.max_prompt_chars
            ),
        ));
    }
    if rules.media_required && matches!(c.media, Media::None) {
        return Err(ApiError::invalid(
            "video",
            "a video is required (`video` field, data: URL or file:// URL)",
        ));
    }
    if let Some(m) = o.max_tokens {
        if m == 0 || m > limits.max_tokens {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be in 1..={}, got {m}", limits.max_tokens),
            ));
        }
    }
    if let Some(t) = o.temperature {
        if !(0.0..=5.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be in [0, 5], got {t}"),
            ));
        }
    }
    if let Some(p) = o.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
    }
    if o.frames == Some(0) {
        return Err(ApiError::invalid("frames", "frames must be at least 1"));
    }
    let n = o.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be in 1..={MAX_N}, got {n}"),
        ));
    }
    let logprobs = match (o.logprobs.unwrap_or(false), o.top_logprobs) {
        (_, Some(k)) if k as usize > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs `logprobs: true`",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let penalties = penalties(&o)?;
    let response_format = match o.response_format.as_ref().map(|f| f.get("type")) {
        None => ResponseFormat::Text,
        Some(Some(Value::String(t))) if t == "text" => ResponseFormat::Text,
        Some(Some(Value::String(t))) if t == "json_object" => ResponseFormat::JsonObject,
        Some(Some(Value::String(t))) if t == "json_schema" => {
            let schema = o
                .response_format
                .as_ref()
                .and_then(|f| f.get("json_schema"))
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format",
                        "a json_schema response format needs `json_schema.schema`",
                    )
                })?;
            // Outside the subset vvlm enforces: refused by keyword, never silently dropped.
            vvlm_engine::json_schema::Schema::compile(schema)
                .map_err(|e| ApiError::invalid("response_format", e.to_string()))?;
            ResponseFormat::JsonSchema(schema.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "response_format",
                "response_format type must be text, json_object or json_schema",
            ))
        }
    };
    let response_format = match (response_format, o.guided_choice) {
        (f, None) => f,
        (ResponseFormat::Text, Some(choices)) => {
            let bad = choices
                .iter()
                .find(|c| c.is_empty() || c.chars().count() > MAX_CHOICE_CHARS);
            let total: usize = choices.iter().map(|c| c.chars().count()).sum();
            if choices.is_empty()
                || choices.len() > MAX_CHOICES
                || bad.is_some()
                || total > MAX_CHOICES_CHARS
            {
                return Err(ApiError::invalid(
                    "guided_choice",
                    format!(
                        "guided_choice lists 1 to {MAX_CHOICES} strings of 1 to \
                         {MAX_CHOICE_CHARS} characters, {MAX_CHOICES_CHARS} in all"
                    ),
                ));
            }
            ResponseFormat::Choice(choices)
        }
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "guided_choice",
                "guided_choice and a JSON response_format exclude each other",
            ))
        }
    };
    // A choice is answered in at most its longest string's bytes (every token writes at least
    // one) and the stop token: planned, reserved and capped at that, so a multiple-choice
    // question leaves the budget to the video instead of to a long answer.
    let choice_tokens = match &response_format {
        ResponseFormat::Choice(c) => c.iter().map(|x| x.len() + 1).max(),
        _ => None,
    };
    let stop = match o.stop {
        None => vec![],
        Some(StopField::One(x)) => vec![x],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty() || x.chars().count() > 64) {
        return Err(ApiError::invalid(
            "stop",
            "stop: at most 4 strings of 1-64 characters",
        ));
    }
    let top_k = match o.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 or 0 (no limit) or positive, got {k}"),
            ))
        }
    };
    let min_p = o.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("min_p must be in [0, 1], got {min_p}"),
        ));
    }
    let budget = o
        .budget
        .map(|b| b.flops())
        .transpose()
        .map_err(|e| ApiError::invalid("budget", e.to_string()))?;
    Ok(ValidRequest {
        task: o.task.unwrap_or_else(|| rules.default_task.to_string()),
        prompt: c.prompt,
        system: c.system,
        history: c.history,
        budget,
        pins: Pins {
            model: o.model.filter(|m| !m.is_empty() && m != "auto"),
            frames: o.frames,
            tokens_per_frame: o.tokens_per_frame,
        },
        max_tokens: match (o.max_tokens, choice_tokens) {
            (Some(m), Some(c)) => Some(m.min(c)),
            (m, c) => m.or(c),
        },
        sampling: SamplingParams {
            max_tokens: o
                .max_tokens
                .unwrap_or(limits.default_max_tokens)
                .min(choice_tokens.unwrap_or(usize::MAX)),
            temperature: o.temperature.unwrap_or(0.0),
            top_p: o.top_p.unwrap_or(1.0),
            seed: o.seed.unwrap_or(0),
            stop_token_ids: vec![],
            stop,
            logprobs,
            // Set by the text completions handler (`echo` with `logprobs`).
            prompt_logprobs: None,
            top_k,
            min_p,
            penalties,
            response_format,
        },
        n: n as usize,
        media: c.media,
        form: PromptForm::Chat,
    })
}

/// The logit bias and penalties, each checked against its range (OpenAI's for its fields,
/// vLLM's for `repetition_penalty`).
fn penalties(o: &RequestOptions) -> Result<Penalties, ApiError> {
    let within = |name: &str, v: Option<f64>, ok: fn(f64) -> bool, range: &str| match v {
        Some(x) if !ok(x) => Err(ApiError::invalid(
            name,
            format!("{name} must be in {range}, got {x}"),
        )),
        _ => Ok(v),
    };
    let two = |x: f64| (-2.0..=2.0).contains(&x);
    let frequency = within("frequency_penalty", o.frequency_penalty, two, "[-2, 2]")?;
    let presence = within("presence_penalty", o.presence_penalty, two, "[-2, 2]")?;
    let repetition = within(
        "repetition_penalty",
        o.repetition_penalty,
        |x| x > 0.0 && x <= 2.0,
        "(0, 2]",
    )?;
    let mut logit_bias = vec![];
    if let Some(map) = &o.logit_bias {
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "logit_bias holds at most {MAX_LOGIT_BIAS} tokens, got {}",
                    map.len()
                ),
            ));
        }
        for (k, &v) in map {
            let id: u32 = k.trim().parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys are token ids, got `{k}`"),
                )
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], got {v} for token {id}"),
                ));
            }
            logit_bias.push((id, v as f32));
        }
    }
    Ok(Penalties {
        frequency: frequency.unwrap_or(0.0) as f32,
        presence: presence.unwrap_or(0.0) as f32,
        repetition: repetition.unwrap_or(1.0) as f32,
        logit_bias,
    })
}

/// Media from `video` (one URL) or `images` (a list of `data:image/...` URLs).
pub fn media_from_urls(
    video: Option<&str>,
    images: &[String],
    allow: &MediaSources,
) -> Result<Media, ApiError> {
    match (video, images.is_empty()) {
        (Some(_), false) => Err(ApiError::Validation(
            "send `video` or `images`, not both".into(),
        )),
        (Some(v), true) => resolve_url(v, allow),
        (None, false) => {
            let mut imgs = vec![];
            for u in images {
                match resolve_url(u, allow)? {
                    Media::Images(mut i) => imgs.append(&mut i),
                    _ => {
                        return Err(ApiError::invalid(
                            "images",
                            "`images` must be data:image/... URLs",
                        ))
                    }
                }
            }
            Ok(Media::Images(imgs))
        }
        (None, true) => Ok(Media::None),
    }
}

/// The JSON body of `/v1/videos/caption` and `/v1/videos/qa`: `video` or `images`,
/// `prompt` / `question`, `system`, and the options.
pub fn from_json_video(
    mut body: Map<String, Value>,
    allow: &MediaSources,
) -> Result<(RequestOptions, Content), ApiError> {
    let options = RequestOptions::take_from(
        &mut body,
        &["video", "images", "prompt", "question", "system"],
    )?;
    let text = |k: &str, body: &Map<String, Value>| -> Result<Option<String>, ApiError> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must be a string"))),
        }
    };
    let images = match body.get("images") {
        None | Some(Value::Null) => vec![],
        Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
            .map_err(|_| ApiError::invalid("images", "`images` must be a list of URLs"))?,
    };
    let media = media_from_urls(text("video", &body)?.as_deref(), &images, allow)?;
    let prompt = text("question", &body)?
        .or(text("prompt", &body)?)
        .unwrap_or_default();
    Ok((
        options,
        Content {
            prompt,
            system: text("system", &body)?,
            history: vec![],
            media,
        },
    ))
}

/// Reads a multipart form: files `video` or `image` (repeatable), text `prompt` / `question`,
/// `system`, and every option as a text field.
pub async fn from_multipart(
    mut mp: axum::extract::Multipart,
) -> Result<(RequestOptions, Content), ApiError> {
    let mut content = Content::default();
    let mut images = vec![];
    let mut options = Map::new();
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is over the limit: {}",
                e.body_text()
            ))
        } else {
            ApiError::Validation(format!("multipart: {}", e.body_text()))
        }
    };
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "video" => {
                content.media = Media::VideoBytes(field.bytes().await.map_err(bad)?.to_vec())
            }
            "image" | "images" => images.push(field.bytes().await.map_err(bad)?.to_vec()),
            "prompt" | "question" => content.prompt = field.text().await.map_err(bad)?,
            "system" => content.system = Some(field.text().await.map_err(bad)?),
            _ => {
                let text = field.text().await.map_err(bad)?;
                if options.insert(name.clone(), Value::String(text)).is_some() {
                    return Err(ApiError::invalid(&name, format!("`{name}` is given twice")));
                }
            }
        }
    }
    if !images.is_empty() {
        if !matches!(content.media, Media::None) {
            return Err(ApiError::Validation(
                "send `video` or `image` fields, not both".into(),
            ));
        }
        content.media = Media::Images(images);
    }
    Ok((RequestOptions::take_from(&mut options, &[])?, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_suffixes() {
        assert_eq!(Budget::Text("5T".into()).flops().unwrap(), 5e12);
        assert_eq!(Budget::Number(5e12).flops().unwrap(), 5e12);
        assert!(Budget::Text("lots".into()).flops().is_err());
        assert!(Budget::Number(-1.0).flops().is_err());
        assert!(Budget::Number(0.0).flops().is_err());
        assert_eq!(Budget::Number(0.0).quota_flops().unwrap(), 0.0);
        assert_eq!(Budget::Text("0".into()).quota_flops().unwrap(), 0.0);
        assert!(Budget::Number(-1.0).quota_flops().is_err());
    }

    #[test]
    fn urls_are_data_or_allow_listed_files() {
        assert!(
            matches!(resolve_url("data:video/mp4;base64,AAAA", &MediaSources::default()), Ok(Media::VideoBytes(b)) if b == vec![0, 0, 0])
        );
        assert!(matches!(
            resolve_url("data:image/png;base64,AAAA", &MediaSources::default()),
            Ok(Media::Images(_))
        ));
        assert!(resolve_url("data:video/mp4,AAAA", &MediaSources::default()).is_err());
        assert!(resolve_url("data:video/mp4;base64,@@@", &MediaSources::default()).is_err());
        assert!(matches!(
            resolve_url("https://example.com/v.mp4", &MediaSources::default()),
            Err(ApiError::Validation(_))
        ));
        assert!(matches!(
            resolve_url("file:///etc/passwd", &MediaSources::default()),
            Err(ApiError::Forbidden(_))
        ));
        let tmp = std::env::temp_dir();
        let f = tmp.join(format!("vvlm-allow-{}.mp4", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            resolve_url(
                &format!("file://{}", f.display()),
                &MediaSources::folders(std::slice::from_ref(&tmp))
            ),
            Ok(Media::VideoPath(_))
        ));
        // Missing, outside, or a folder: the same answer (no existence oracle).
        let answer = |url: &str| match resolve_url(
            url,
            &MediaSources::folders(std::slice::from_ref(&tmp)),
        ) {
            Err(ApiError::Forbidden(m)) => m.replace(url.trim_start_matches("file://"), "P"),
            other => panic!("{url}: {other:?}"),
        };
        let missing = answer(&format!("file://{}/vvlm-no-such-file.mp4", tmp.display()));
        assert_eq!(answer("file:///etc/passwd"), missing);
        assert_eq!(answer("file:///no/such/file.mp4"), missing);
        assert_eq!(answer(&format!("file://{}", tmp.display())), missing);
        std::fs::remove_file(f).ok();
    }
}
