//! OpenAI's Files and Batch APIs: a tenant uploads a JSONL file of requests
//! (`POST /v1/files`, purpose `batch`), creates a batch over it (`POST /v1/batches`), and reads
//! the output and error files when it is done. The lines run in the background on this
//! server's own routes, as the tenant ([`crate::batch_runner`]): planned, reserved, charged and
//! answered exactly as the same request sent over HTTP.
//!
//! Checked when the file is uploaded, each line naming its number: a JSON object of
//! `custom_id` (unique, 1-512 characters), `method` `POST`, `url` (a route a batch may call)
//! and `body` (an object; `stream` not true), nothing else; at most `[batch] max_lines`.

use crate::error::ApiError;
use crate::ledger::{now, BatchRecord, BatchStatus, FileRecord, NewBatch, Tenant};
use crate::AppState;
use axum::extract::Multipart;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// The routes a batch line may call (JSON bodies).
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/videos/caption",
    "/v1/videos/qa",
];

/// OpenAI's one completion window.
const WINDOW: &str = "24h";
const WINDOW_S: i64 = 24 * 3600;

/// One request of a batch file.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    pub custom_id: String,
    pub url: String,
    pub body: Map<String, Value>,
}

fn bad_line(n: usize, what: impl std::fmt::Display) -> ApiError {
    ApiError::Invalid {
        param: "file".into(),
        message: format!("line {n}: {what}"),
    }
}

/// The requests of a batch file (blank lines skipped), each checked, or a 422 naming the first
/// bad line (1-based, as an editor counts).
pub fn parse_lines(content: &[u8], max_lines: usize) -> Result<Vec<BatchLine>, ApiError> {
    let text = std::str::from_utf8(content).map_err(|e| ApiError::Invalid {
        param: "file".into(),
        message: format!(
            "a batch file is UTF-8 JSONL; byte {} is not UTF-8",
            e.valid_up_to()
        ),
    })?;
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    for (i, raw) in text.split('\n').enumerate() {
        let n = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() == max_lines {
            return Err(bad_line(
                n,
                format_args!("a batch holds at most {max_lines} requests"),
            ));
        }
        let v: Value =
            serde_json::from_str(raw).map_err(|e| bad_line(n, format_args!("not JSON: {e}")))?;
        let Value::Object(mut o) = v else {
            return Err(bad_line(n, "each line is a JSON object"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "custom_id" | "method" | "url" | "body"))
        {
            return Err(bad_line(
                n,
                format_args!("unknown field `{k}` (a line has custom_id, method, url and body)"),
            ));
        }
        let custom_id = match o.remove("custom_id") {
            Some(Value::String(s)) if (1..=512).contains(&s.chars().count()) => s,
            Some(Value::String(_)) => {
                return Err(bad_line(n, "`custom_id` must be 1-512 characters"))
            }
            Some(_) => return Err(bad_line(n, "`custom_id` must be a string")),
            None => return Err(bad_line(n, "`custom_id` is missing")),
        };
        if !ids.insert(custom_id.clone()) {
            return Err(bad_line(
                n,
                format_args!("`custom_id` `{custom_id}` is used by an earlier line"),
            ));
        }
        match o.remove("method") {
            Some(Value::String(m)) if m == "POST" => {}
            _ => return Err(bad_line(n, "`method` must be \"POST\"")),
        }
        let url = match o.remove("url") {
            Some(Value::String(u)) if ENDPOINTS.contains(&u.as_str()) => u,
            _ => {
                return Err(bad_line(
                    n,
                    format_args!("`url` must be one of {}", ENDPOINTS.join(", ")),
                ))
            }
        };
        let body = match o.remove("body") {
            Some(Value::Object(b)) => b,
            _ => return Err(bad_line(n, "`body` must be a JSON object (the request)")),
        };
        if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
            return Err(bad_line(
                n,
                "`body.stream` must be false or absent in a batch",
            ));
        }
        lines.push(BatchLine {
            custom_id,
            url,
            body,
        });
    }
    if lines.is_empty() {
        return Err(ApiError::Invalid {
            param: "file".into(),
            message: "the batch file holds no request".into(),
        });
    }
    Ok(lines)
}

/// A file as OpenAI's API shows it.
pub fn file_json(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
    })
}

/// A batch as OpenAI's API shows it.
pub fn batch_json(b: &BatchRecord) -> Value {
    let closed = |s: BatchStatus| (b.status == s).then_some(b.closed_at).flatten();
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": null,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.created_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.closed_at,
        "completed_at": closed(BatchStatus::Completed),
        "failed_at": null,
        "expired_at": closed(BatchStatus::Expired),
        "cancelling_at": b.cancelling_at,
        "cancelled_at": closed(BatchStatus::Cancelled),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        // The answered lines' usage (OpenAI's token fields; vvlm's measured FLOPs, what the
        // tenant was charged for them unless a line ran over its reservation).
        "usage": {
            "input_tokens": b.usage.prompt_tokens,
            "output_tokens": b.usage.completion_tokens,
            "total_tokens": b.usage.prompt_tokens + b.usage.completion_tokens,
            "measured_flops": b.usage.measured_flops,
        },
        "metadata": b.metadata,
    })
}

fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.map(|v| v["id"].clone()).unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

fn enabled(s: &AppState) -> Result<(), ApiError> {
    if s.config.batch.enabled {
        Ok(())
    } else {
        Err(ApiError::NotFound(
            "the Files and Batch APIs are disabled on this server ([batch] enabled = false)".into(),
        ))
    }
}

/// `POST /v1/files`: multipart `file` and `purpose` (`batch`).
pub async fn upload(s: Arc<AppState>, t: Tenant, mut mp: Multipart) -> Result<Response, ApiError> {
    enabled(&s)?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        let text = e.body_text();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the file is over the limit of {} bytes ([batch] max_file_bytes): {text}",
                s.config.batch.max_file_bytes
            ))
        } else {
            ApiError::Validation(format!("multipart: {text}"))
        }
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        match field.name().unwrap_or("") {
            "purpose" => purpose = Some(field.text().await.map_err(bad)?),
            "file" => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(bad)?));
            }
            other => {
                return Err(ApiError::Invalid {
                    param: other.into(),
                    message: format!(
                        "unknown field `{other}` (a file upload has file and purpose)"
                    ),
                })
            }
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::Invalid {
        param: "purpose".into(),
        message: "`purpose` is missing (`batch`)".into(),
    })?;
    if purpose != "batch" {
        return Err(ApiError::Invalid {
            param: "purpose".into(),
            message: format!(
                "`purpose` must be `batch` (this server stores batch input only), got `{purpose}`"
            ),
        });
    }
    let (filename, content) = file.ok_or_else(|| ApiError::Invalid {
        param: "file".into(),
        message: "`file` is missing".into(),
    })?;
    if filename.chars().count() > 256 {
        return Err(ApiError::Invalid {
            param: "file".into(),
            message: "the file's name is over 256 characters".into(),
        });
    }
    parse_lines(&content, s.config.batch.max_lines)?;
    let cap = s.config.batch.tenant_storage_bytes;
    let f = s
        .ledger_call(move |l| l.create_file(t.id, &filename, "batch", &content, cap, now()))
        .await?;
    Ok(Json(file_json(&f)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub after: Option<String>,
    pub purpose: Option<String>,
    pub order: Option<String>,
}

fn page(q: &ListQuery, default: usize) -> Result<usize, ApiError> {
    if q.order.as_deref().is_some_and(|o| o != "desc") {
        return Err(ApiError::Invalid {
            param: "order".into(),
            message: "only `desc` (newest first) is supported".into(),
        });
    }
    match q.limit.unwrap_or(default) {
        n @ 1..=10_000 => Ok(n),
        n => Err(ApiError::Invalid {
            param: "limit".into(),
            message: format!("`limit` must be 1-10000, got {n}"),
        }),
    }
}

/// `GET /v1/files`: newest first, `limit` (10000), `after`, `purpose`.
pub async fn list_files(s: Arc<AppState>, t: Tenant, q: ListQuery) -> Result<Response, ApiError> {
    enabled(&s)?;
    let limit = page(&q, 10_000)?;
    let files = s
        .ledger_call(move |l| l.files(t.id, q.purpose.as_deref(), limit + 1, q.after.as_deref()))
        .await?;
    let more = files.len() > limit;
    let data = files.iter().take(limit).map(file_json).collect();
    Ok(Json(list_json(data, more)).into_response())
}

pub async fn get_file(s: Arc<AppState>, t: Tenant, id: String) -> Result<Response, ApiError> {
    enabled(&s)?;
    let f = s.ledger_call(move |l| l.file(t.id, &id)).await?;
    Ok(Json(file_json(&f)).into_response())
}

/// `GET /v1/files/{id}/content`: the bytes as stored.
pub async fn file_content(s: Arc<AppState>, t: Tenant, id: String) -> Result<Response, ApiError> {
    enabled(&s)?;
    let bytes = s.ledger_call(move |l| l.file_content(t.id, &id)).await?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], bytes).into_response())
}

pub async fn delete_file(s: Arc<AppState>, t: Tenant, id: String) -> Result<Response, ApiError> {
    enabled(&s)?;
    let deleted = id.clone();
    s.ledger_call(move |l| l.delete_file(t.id, &id)).await?;
    Ok(Json(json!({"id": deleted, "object": "file", "deleted": true})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

/// OpenAI's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512.
fn check_metadata(m: &Map<String, Value>) -> Result<(), ApiError> {
    let bad = |message: String| ApiError::Invalid {
        param: "metadata".into(),
        message,
    };
    if m.len() > 16 {
        return Err(bad(format!("at most 16 pairs, got {}", m.len())));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return Err(bad(format!("key `{k}` is over 64 characters")));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            _ => {
                return Err(bad(format!(
                    "`{k}` must be a string of at most 512 characters"
                )))
            }
        }
    }
    Ok(())
}

/// `POST /v1/batches`: `input_file_id`, `endpoint`, `completion_window` (`24h`), `metadata`.
pub async fn create_batch(
    s: Arc<AppState>,
    t: Tenant,
    body: Result<Json<CreateBatch>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    enabled(&s)?;
    let Json(b) = body.map_err(crate::routes::json_error)?;
    if !ENDPOINTS.contains(&b.endpoint.as_str()) {
        return Err(ApiError::Invalid {
            param: "endpoint".into(),
            message: format!("`endpoint` must be one of {}", ENDPOINTS.join(", ")),
        });
    }
    if b.completion_window != WINDOW {
        return Err(ApiError::Invalid {
            param: "completion_window".into(),
            message: format!("`completion_window` must be `{WINDOW}`"),
        });
    }
    if let Some(m) = &b.metadata {
        check_metadata(m)?;
    }
    let (file_id, tenant) = (b.input_file_id.clone(), t.id);
    let content = s
        .ledger_call(move |l| l.file_content(tenant, &file_id))
        .await
        .map_err(|e| match e {
            ApiError::NotFound(m) => ApiError::Invalid {
                param: "input_file_id".into(),
                message: m,
            },
            other => other,
        })?;
    let lines = parse_lines(&content, s.config.batch.max_lines).map_err(|e| ApiError::Invalid {
        param: "input_file_id".into(),
        message: e.to_string(),
    })?;
    if let Some((i, l)) = lines.iter().enumerate().find(|(_, l)| l.url != b.endpoint) {
        return Err(ApiError::Invalid {
            param: "input_file_id".into(),
            message: format!(
                "request {} (`{}`) calls `{}`, not the batch's endpoint `{}`",
                i + 1,
                l.custom_id,
                l.url,
                b.endpoint
            ),
        });
    }
    let new = NewBatch {
        endpoint: b.endpoint,
        input_file_id: b.input_file_id,
        total: lines.len() as i64,
        completion_window: WINDOW.into(),
        window_s: WINDOW_S,
        metadata: b.metadata.map(Value::Object),
        max_open: s.config.batch.max_open_per_tenant,
    };
    let r = s
        .ledger_call(move |l| l.create_batch(t.id, &new, now()))
        .await?;
    tracing::info!(batch = %r.id, lines = r.total, endpoint = %r.endpoint, "batch created");
    Ok(Json(batch_json(&r)).into_response())
}

pub async fn get_batch(s: Arc<AppState>, t: Tenant, id: String) -> Result<Response, ApiError> {
    enabled(&s)?;
    let b = s.ledger_call(move |l| l.batch(t.id, &id)).await?;
    Ok(Json(batch_json(&b)).into_response())
}

/// `GET /v1/batches`: newest first, `limit` (20), `after`.
pub async fn list_batches(s: Arc<AppState>, t: Tenant, q: ListQuery) -> Result<Response, ApiError> {
    enabled(&s)?;
    if q.purpose.is_some() {
        return Err(ApiError::Invalid {
            param: "purpose".into(),
            message: "`purpose` filters files, not batches".into(),
        });
    }
    let limit = page(&q, 20)?;
    let list = s
        .ledger_call(move |l| l.batches(t.id, limit + 1, q.after.as_deref()))
        .await?;
    let more = list.len() > limit;
    let data = list.iter().take(limit).map(batch_json).collect();
    Ok(Json(list_json(data, more)).into_response())
}

/// `POST /v1/batches/{id}/cancel`: no new line starts; the ones running finish; then the batch
/// is closed as `cancelled` with what was answered.
pub async fn cancel_batch(s: Arc<AppState>, t: Tenant, id: String) -> Result<Response, ApiError> {
    enabled(&s)?;
    let b = s
        .ledger_call(move |l| l.cancel_batch(t.id, &id, now()))
        .await?;
    Ok(Json(batch_json(&b)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, body: Value) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            .to_string()
    }

    fn refused(text: &str) -> String {
        match parse_lines(text.as_bytes(), 3) {
            Err(ApiError::Invalid { param, message }) => {
                assert_eq!(param, "file");
                message
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lines_are_parsed_with_blank_lines_and_crlf() {
        let text = format!(
            "{}\r\n\n{}\n",
            line("a", json!({"x": 1})),
            line("b", json!({}))
        );
        let lines = parse_lines(text.as_bytes(), 3).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].custom_id, "a");
        assert_eq!(lines[0].url, "/v1/chat/completions");
        assert_eq!(lines[0].body["x"], 1);
        assert_eq!(lines[1].custom_id, "b");
    }

    #[test]
    fn each_rule_names_its_line() {
        let ok = line("a", json!({}));
        assert_eq!(refused(""), "the batch file holds no request");
        assert!(refused(&format!("{ok}\nnot json")).starts_with("line 2: not JSON"));
        assert_eq!(refused("[1]"), "line 1: each line is a JSON object");
        assert!(refused(&format!("{ok}\n{ok}")).contains("line 2: `custom_id` `a` is used"));
        assert!(refused(r#"{"method": "POST"}"#).contains("`custom_id` is missing"));
        assert!(refused(r#"{"custom_id": 5}"#).contains("`custom_id` must be a string"));
        assert!(refused(r#"{"custom_id": ""}"#).contains("1-512 characters"));
        let long = "x".repeat(513);
        assert!(refused(&line(&long, json!({}))).contains("1-512 characters"));
        assert!(refused(
            r#"{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}"#
        )
        .contains("`method` must be \"POST\""));
        assert!(refused(
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}"#
        )
        .contains("`url` must be one of /v1/chat/completions"));
        assert!(refused(
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": 3}"#
        )
        .contains("`body` must be a JSON object"));
        assert!(refused(
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1}"#
        )
        .contains("unknown field `x`"));
        assert!(refused(&line("a", json!({"stream": true}))).contains("`body.stream`"));
        assert!(parse_lines(line("a", json!({"stream": false})).as_bytes(), 3).is_ok());
        let four = (0..4)
            .map(|i| line(&i.to_string(), json!({})))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(refused(&four), "line 4: a batch holds at most 3 requests");
        match parse_lines(&[b'{', 0xff], 3) {
            Err(ApiError::Invalid { message, .. }) => {
                assert!(message.contains("byte 1"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metadata_follows_openais_limits() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert!(check_metadata(&m(json!({"job": "nightly"}))).is_ok());
        assert!(check_metadata(&m(json!({"job": 1}))).is_err());
        assert!(check_metadata(&m(json!({"k": "v".repeat(513)}))).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (i.to_string(), json!("v"))).collect();
        assert!(check_metadata(&many).is_err());
    }
}
