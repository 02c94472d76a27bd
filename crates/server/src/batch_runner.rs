//! Runs batches in the background: claims an open batch from the ledger (any replica may; a
//! lease keeps two from running one), runs each line that has no answer yet through this
//! server's own router as the batch's tenant, records each answer as it arrives, and closes
//! the batch with its output and error files.
//!
//! Priority: a line starts only while no request waits at the door for an admission place and
//! at most `[batch] concurrency` of this replica's lines run at once, so batches take the
//! capacity interactive requests leave. A line refused for room or by an unreachable ledger
//! (429, 503) is run again later, not failed. A line runs at least once: one in flight when
//! its replica dies runs again on the replica that takes the batch over (its first run's
//! reservation expires uncharged unless it settled).

use crate::batch::{parse_lines, BatchLine};
use crate::ledger::{now, BatchRecord, BatchStatus, LineResult, LineUsage, NewFile, Tenant};
use crate::AppState;
use axum::body::Body;
use axum::http::{header, Request};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

/// Set on a batch line's request (in process only: HTTP cannot set it): the tenant it runs as.
#[derive(Clone)]
pub struct BatchCaller(pub Tenant);

/// Runs batches until `stop` turns true; then starts no new line, lets the lines in flight
/// finish and returns (their batch stays open for the next process).
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let poll = Duration::from_secs_f64(state.config.batch.poll_s.clamp(0.01, 60.0));
    let mut purged: Option<Instant> = None;
    while !stopping(&stop) {
        if purged.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            purge(&state).await;
            purged = Some(Instant::now());
        }
        if state.ready.load(Ordering::Acquire) {
            match state.ledger_call(|l| l.claim_batch(now())).await {
                Ok(Some(b)) => {
                    let id = b.id.clone();
                    if let Err(e) = run_batch(&state, b, &mut stop).await {
                        tracing::warn!(batch = %id, "batch: {e}; retrying");
                    } else {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("batch: cannot look for batches: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => {}
        }
    }
}

/// How often a replica deletes what is past `[batch] retention_days` (and once at start).
const PURGE_EVERY: Duration = Duration::from_secs(3600);

async fn purge(state: &Arc<AppState>) {
    let days = state.config.batch.retention_days;
    if !(days > 0.0 && days.is_finite()) {
        return;
    }
    let before = now() - (days * 86_400.0) as i64;
    match state.ledger_call(move |l| l.purge(before)).await {
        Ok((0, 0)) => {}
        Ok((batches, files)) => {
            tracing::info!(
                batches,
                files,
                days,
                "batch: deleted what is past retention"
            )
        }
        Err(e) => tracing::warn!("batch: retention not applied: {e}"),
    }
}

/// Asked to stop (or the one who could ask is gone).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Why a batch stops taking new lines before each has an answer.
#[derive(Clone, Copy, PartialEq)]
enum Wind {
    Cancelled,
    Expired,
}

async fn run_batch(
    state: &Arc<AppState>,
    b: BatchRecord,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), crate::error::ApiError> {
    let (tenant_id, file_id) = (b.tenant_id, b.input_file_id.clone());
    let content = state
        .ledger_call(move |l| l.file_content(tenant_id, &file_id))
        .await?;
    let lines = Arc::new(parse_lines(&content, usize::MAX)?);
    drop(content);
    let id = b.id.clone();
    let done = state.ledger_call(move |l| l.line_results(&id)).await?;
    let answered: std::collections::HashSet<i64> = done.iter().map(|r| r.line).collect();
    let mut pending: VecDeque<usize> = (0..lines.len())
        .filter(|i| !answered.contains(&(*i as i64)))
        .collect();
    tracing::info!(batch = %b.id, lines = lines.len(), pending = pending.len(), "batch: running");
    let router = crate::routes::router(state.clone());
    let cfg = &state.config.batch;
    let renew_every = Duration::from_secs_f64((state.ledger.lease().lease_s as f64 / 3.0).max(0.5));
    let mut last_renew = Instant::now();
    let mut status = b.status;
    let mut wind = None;
    let mut hold_until = Instant::now();
    let mut tenant = None;
    let mut in_flight = JoinSet::new();
    // Every slice, the batch is offered to the others waiting (the lines in flight finish
    // first, so none runs twice): one long batch cannot hold another back for hours.
    let slice = Duration::from_secs_f64(cfg.slice_s.clamp(0.0, 86_400.0));
    let mut slice_start = Instant::now();
    // Lines started in this slice: a turn runs at least one (else two batches would hand the
    // turn to each other forever).
    let mut started = 0usize;
    loop {
        if last_renew.elapsed() >= renew_every || tenant.is_none() {
            let id = b.id.clone();
            match state.ledger_call(move |l| l.renew_batch(&id, now())).await {
                Ok(Some(s)) => status = s,
                Ok(None) => {
                    tracing::warn!(batch = %b.id, "batch: taken over by another replica or closed");
                    in_flight.shutdown().await;
                    return Ok(());
                }
                Err(e) => tracing::warn!(batch = %b.id, "batch: lease not renewed: {e}"),
            }
            // The tenant as it is now (its settings apply to the next lines); removed, the
            // batch is cancelled. Unreadable, the lines keep the tenant read before.
            tenant = match &b.tenant {
                Some(name) => {
                    let name = name.clone();
                    match state.ledger_call(move |l| l.tenant_by_name(&name)).await {
                        Ok(t) if t.id == b.tenant_id => Some(Some(t)),
                        Ok(_) | Err(crate::error::ApiError::NotFound(_)) => Some(None),
                        Err(e) if tenant.is_none() => return Err(e),
                        Err(e) => {
                            tracing::warn!(batch = %b.id, "batch: tenant not read again: {e}");
                            tenant
                        }
                    }
                }
                None => Some(None),
            };
            last_renew = Instant::now();
        }
        let runs_as = tenant.clone().flatten();
        if wind.is_none() {
            wind = if status == BatchStatus::Cancelling || runs_as.is_none() {
                Some(Wind::Cancelled)
            } else if now() >= b.expires_at {
                Some(Wind::Expired)
            } else {
                None
            };
        }
        let stop_now = stopping(stop);
        let turn_over = wind.is_none() && started > 0 && slice_start.elapsed() >= slice;
        if turn_over && in_flight.is_empty() && !pending.is_empty() {
            let id = b.id.clone();
            match state.ledger_call(move |l| l.yield_batch(&id, now())).await {
                Ok(true) => {
                    tracing::info!(batch = %b.id, pending = pending.len(), "batch: another's turn");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(batch = %b.id, "batch: cannot offer a turn: {e}"),
            }
            slice_start = Instant::now();
            started = 0;
            continue;
        }
        while let (None, false, false, Some(t)) = (wind, stop_now, turn_over, &runs_as) {
            if in_flight.len() >= cfg.concurrency.max(1)
                || Instant::now() < hold_until
                || state.admission.waiting() > 0
                || state.admission.available() == 0
            {
                break;
            }
            let Some(i) = pending.pop_front() else { break };
            started += 1;
            let (router, t, lines) = (router.clone(), t.clone(), lines.clone());
            in_flight.spawn(async move { (i, call(router, t, &lines[i]).await) });
        }
        if in_flight.is_empty() && (pending.is_empty() || wind.is_some() || stop_now) {
            break;
        }
        tokio::select! {
            Some(joined) = in_flight.join_next() => {
                let Ok((i, answer)) = joined else { continue };
                if matches!(answer.status, 429 | 503) {
                    state.metrics.batch_line("retried");
                    pending.push_front(i);
                    hold_until = Instant::now() + Duration::from_millis(500);
                    continue;
                }
                state.metrics.batch_line(if (200..300).contains(&answer.status) { "ok" } else { "failed" });
                let r = LineResult {
                    line: i as i64,
                    custom_id: lines[i].custom_id.clone(),
                    status_code: answer.status as i64,
                    request_id: answer.request_id,
                    finished_at: now(),
                    usage: usage_of(&answer.body),
                    body: answer.body.to_string(),
                };
                let id = b.id.clone();
                if let Err(e) = state.ledger_call(move |l| l.record_line(&id, &r)).await {
                    // Not recorded: the line runs again (here after a retry, or on the
                    // replica that takes the batch over).
                    tracing::warn!(batch = %b.id, line = i, "batch: answer not recorded: {e}");
                    pending.push_back(i);
                    hold_until = Instant::now() + Duration::from_secs(1);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed(), if !stop_now => {}
        }
    }
    if stopping(stop) && wind.is_none() {
        return Ok(());
    }
    finish(state, &b, &lines, wind).await
}

struct Answer {
    status: u16,
    request_id: String,
    body: Value,
}

/// One line through the router, as its tenant.
async fn call(router: axum::Router, tenant: Tenant, line: &BatchLine) -> Answer {
    let body = serde_json::to_vec(&line.body).unwrap_or_default();
    let mut req = Request::post(&line.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .expect("a route and a JSON body make a request");
    req.extensions_mut().insert(BatchCaller(tenant));
    let resp = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match axum::body::to_bytes(resp.into_body(), usize::MAX).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) => json!({"error": {"type": "internal_error", "code": "internal_error",
                         "message": format!("reading the answer: {e}")}}),
    };
    Answer {
        status,
        request_id,
        body,
    }
}

/// The tokens and measured FLOPs an answer reports (zero for a refusal).
fn usage_of(body: &Value) -> LineUsage {
    let u = &body["usage"];
    LineUsage {
        prompt_tokens: u["prompt_tokens"].as_i64().unwrap_or(0),
        completion_tokens: u["completion_tokens"].as_i64().unwrap_or(0),
        measured_flops: u["measured_flops"]["total"].as_f64().unwrap_or(0.0),
    }
}

/// Writes the output (2xx answers) and error (the others, and lines never run) files in input
/// order, as OpenAI's batch output lines, and closes the batch.
async fn finish(
    state: &Arc<AppState>,
    b: &BatchRecord,
    lines: &[BatchLine],
    wind: Option<Wind>,
) -> Result<(), crate::error::ApiError> {
    let id = b.id.clone();
    let results: HashMap<i64, LineResult> = state
        .ledger_call(move |l| l.line_results(&id))
        .await?
        .into_iter()
        .map(|r| (r.line, r))
        .collect();
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in lines.iter().enumerate() {
        let (out, entry) = match results.get(&(i as i64)) {
            Some(r) => {
                let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
                let ok = (200..300).contains(&r.status_code);
                let error = (!ok).then(
                    || json!({"code": body["error"]["code"], "message": body["error"]["message"]}),
                );
                let entry = json!({
                    "id": format!("batch_req_{}", r.request_id),
                    "custom_id": r.custom_id,
                    "response": {"status_code": r.status_code, "request_id": r.request_id, "body": body},
                    "error": error,
                });
                (ok, entry)
            }
            None => {
                let (code, message) = match wind {
                    Some(Wind::Expired) => {
                        ("batch_expired", "the batch expired before this request ran")
                    }
                    _ => (
                        "batch_cancelled",
                        "the batch was cancelled before this request ran",
                    ),
                };
                let entry = json!({
                    "id": format!("batch_req_{}-{i}", b.id),
                    "custom_id": line.custom_id,
                    "response": null,
                    "error": {"code": code, "message": message},
                });
                (false, entry)
            }
        };
        let to = if out { &mut output } else { &mut errors };
        serde_json::to_writer(&mut *to, &entry).expect("JSON to a vector");
        to.push(b'\n');
    }
    let file = |content: Vec<u8>, kind: &str| {
        (!content.is_empty()).then(|| NewFile {
            filename: format!("{}_{kind}.jsonl", b.id),
            content,
        })
    };
    let (output, errors) = (file(output, "output"), file(errors, "error"));
    let status = match wind {
        Some(Wind::Cancelled) => BatchStatus::Cancelled,
        Some(Wind::Expired) => BatchStatus::Expired,
        None => BatchStatus::Completed,
    };
    let id = b.id.clone();
    let closed = state
        .ledger_call(move |l| l.finish_batch(&id, status, output, errors, now()))
        .await?;
    tracing::info!(
        batch = %closed.id,
        status = closed.status.as_str(),
        completed = closed.completed,
        failed = closed.failed,
        "batch: closed"
    );
    Ok(())
}
