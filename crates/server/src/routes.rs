//! Routes: caption, QA, OpenAI-compatible chat and text completions (with SSE streaming), plan, models,
//! tokenize and detokenize, health, metrics, usage and the admin API.

use crate::admission::{
    plan_request, refusal, run_to_completion, tenant_share, AdmissionSlot, Outcome, RequestId,
};
use crate::error::ApiError;
use crate::ledger::{now, Tenant, TenantSettings, Usage};
use crate::validation::{
    from_json_video, from_multipart, optional_flag, validate, Budget, Content, RequestOptions,
    Rules,
};
use crate::AppState;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

type St = State<Arc<AppState>>;

/// The largest request body: the configured body limit, and never more than an upload at the
/// media limit needs (base64 in JSON is 4/3 of it, plus 1 MiB for the other fields), so that
/// lowering `VVLM_MAX_UPLOAD_BYTES` lowers what is read.
pub fn body_limit(config: &crate::config::ServerConfig) -> usize {
    let upload = config.media.max_bytes as f64 * 4.0 / 3.0 + (1 << 20) as f64;
    (config.limits.max_body_bytes as f64).min(upload) as usize
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = body_limit(&state.config);
    // Credentials are checked from the headers before any body is read: an unauthenticated
    // client cannot make the server read (or hold) a large upload.
    let tenant_routes = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/plan", post(plan))
        .route("/v1/usage", get(usage))
        .route("/v1/videos/caption", post(caption))
        .route("/v1/videos/qa", post(qa))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(text_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route(
            "/v1/files",
            post(upload_file)
                .layer(DefaultBodyLimit::max(state.config.batch.max_file_bytes))
                .get(list_files),
        )
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_tenant,
        ));
    let admin_routes = Router::new()
        .route("/admin/tenants", post(admin_create).get(admin_list))
        .route(
            "/admin/tenants/{name}",
            get(admin_get).patch(admin_update).delete(admin_remove),
        )
        .route("/admin/tenants/{name}/usage", get(admin_usage))
        .route("/admin/tenants/{name}/key", post(admin_rotate_key))
        .route("/admin/tenants/{name}/requests", get(admin_requests))
        .route("/admin/tenants/{name}/batches", get(admin_batches))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(tenant_routes)
        .merge(admin_routes)
        .merge(crate::console::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            with_request_id,
        ))
        .with_state(state)
}

/// A client's own id for a request (`X-Client-Request-Id`, as OpenAI's clients send it): 1-128
/// visible ASCII characters, else ignored.
fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get("x-client-request-id")?;
    let ok = (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| v.clone())
}

/// Gives every request an id ([`RequestId`]): in the request's extensions for the handlers, in
/// a tracing span around everything logged for it, and on the answer as `x-request-id`
/// (errors included); a valid `X-Client-Request-Id` is logged beside it and echoed back.
async fn with_request_id(State(s): St, req: Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let id = RequestId::new(&s);
    let client = client_request_id(req.headers());
    let span = tracing::info_span!(
        "request",
        request_id = %id.0,
        client_request_id = client.as_ref().and_then(|v| v.to_str().ok()),
        method = %req.method(),
        path = %req.uri().path(),
        tenant = tracing::field::Empty,
    );
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let mut req = req;
    req.extensions_mut().insert(id.clone());
    let mut resp = next.run(req).instrument(span.clone()).await;
    access_log(&span, &path, resp.status(), started.elapsed());
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(v) = client {
        resp.headers_mut().insert("x-client-request-id", v);
    }
    resp
}

/// One line per answered request, in its span (request id, method, path, tenant): its status
/// and the time to its answer's head (a stream's whole length is in its `finished` line).
/// Health checks, scrapes and the console's files at `debug`, so probes do not flood the log.
fn access_log(span: &tracing::Span, path: &str, status: StatusCode, took: Duration) {
    let latency_ms = (took.as_secs_f64() * 1e4).round() / 10.0;
    let status = status.as_u16();
    let quiet = matches!(path, "/health" | "/metrics" | "/")
        || path.starts_with("/console/")
        || path.starts_with("/favicon");
    if quiet {
        tracing::debug!(parent: span, status, latency_ms, "answered");
    } else if status >= 500 {
        tracing::warn!(parent: span, status, latency_ms, "answered");
    } else {
        tracing::info!(parent: span, status, latency_ms, "answered");
    }
}

/// The credentials of `Authorization: Bearer <key>` (the scheme is case-insensitive, RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

async fn require_tenant(State(s): St, req: Request, next: axum::middleware::Next) -> Response {
    // A batch line runs in process as its batch's tenant (HTTP cannot set an extension).
    let caller = req
        .extensions()
        .get::<crate::batch_runner::BatchCaller>()
        .map(|c| c.0.clone());
    let background = caller.is_some();
    let found = match caller {
        Some(t) => Ok(t),
        None => authenticate(&s, req.headers())
            .await
            .and_then(|t| check_length(&s, &req).map(|_| t)),
    };
    let checked = match found {
        Ok(t) => {
            tracing::Span::current().record("tenant", tracing::field::display(&t.name));
            let path = req.uri().path().to_string();
            let id = req
                .extensions()
                .get::<RequestId>()
                .cloned()
                .unwrap_or_else(|| RequestId::new(&s));
            admission_slot(&s, &t, &path, id)
                .await
                .map(|slot| (t, slot))
        }
        Err(e) => Err(e),
    };
    match checked {
        Ok((tenant, slot)) => {
            let mut req = req;
            if let Some(mut slot) = slot {
                slot.background = background;
                req.extensions_mut().insert(slot);
            }
            // The handler answers for this tenant without reading it from the ledger again.
            req.extensions_mut().insert(Authenticated(tenant));
            next.run(req).await
        }
        Err(e) => {
            s.metrics
                .observe(req.uri().path(), e.status().as_u16(), 0.0);
            drain_small_body(req).await;
            e.into_response()
        }
    }
}

/// A refused request's body is read only when it is small (so that a client still writing it
/// gets the answer rather than a broken pipe); a large one is never read.
async fn drain_small_body(req: Request) {
    const SMALL: usize = 1 << 20;
    if announced_length(&req).is_some_and(|n| n <= SMALL as u64) {
        let _ = axum::body::to_bytes(req.into_body(), SMALL).await;
    }
}

/// Routes that run the engine take an admission slot at the door, waiting up to
/// `queue_wait_s` for one: a full server holds a retrying client briefly (an idle wait) instead
/// of answering 429 at once and being asked again in a tight loop. Places freed meanwhile go
/// to the waiting tenant holding the fewest, and a tenant holds at most its limit.
async fn admission_slot(
    s: &AppState,
    t: &Tenant,
    path: &str,
    id: RequestId,
) -> Result<Option<AdmissionSlot>, ApiError> {
    if !matches!(
        path,
        "/v1/videos/caption" | "/v1/videos/qa" | "/v1/chat/completions" | "/v1/completions"
    ) {
        return Ok(None);
    }
    let wait = Duration::from_secs_f64(s.config.limits.queue_wait_s.clamp(0.0, 60.0));
    let place = s
        .admission
        .acquire(t.id, tenant_share(s, t), wait)
        .await
        .map_err(|refused| {
            // Counted here: this 429 does not pass through `with_tenant`.
            s.metrics.admission_refused(&t.name, refused);
            refusal(s, t, refused)
        })?;
    Ok(Some(AdmissionSlot::new(place, id)))
}

/// The body length a request announces (`Content-Length`), if it does.
fn announced_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A body announced over the limit is refused before it is read.
fn check_length(s: &AppState, req: &Request) -> Result<(), ApiError> {
    let limit = if req.uri().path() == "/v1/files" {
        s.config.batch.max_file_bytes
    } else {
        body_limit(&s.config)
    };
    match announced_length(req) {
        Some(n) if n > limit as u64 => Err(ApiError::PayloadTooLarge(format!(
            "the request body is {n} bytes, over the limit of {limit}"
        ))),
        _ => Ok(()),
    }
}

async fn require_admin(State(s): St, req: Request, next: axum::middleware::Next) -> Response {
    match admin(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            drain_small_body(req).await;
            e.into_response()
        }
    }
}

/// A body that could not be read: over the limit is 413, anything else 422.
fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("the request body is over the limit: {text}"))
    } else {
        ApiError::Validation(text)
    }
}

pub(crate) fn json_error(e: axum::extract::rejection::JsonRejection) -> ApiError {
    body_error(e.status(), crate::validation::json_words(&e.body_text()))
}

/// The tenant `require_tenant` authenticated, in the request's extensions.
#[derive(Clone)]
struct Authenticated(Tenant);

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Tenant, ApiError> {
    let key = bearer(headers)
        .ok_or_else(|| ApiError::Unauthorized("missing `Authorization: Bearer <key>`".into()))?
        .to_string();
    state
        .ledger_call(move |l| l.tenant_by_key(&key))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))
}

fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &state.admin_key_hash else {
        return Err(ApiError::Forbidden(
            "the admin API is disabled (no admin key configured)".into(),
        ));
    };
    match bearer(headers) {
        Some(k) if &crate::ledger::hash_key(k) == want => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("invalid admin key".into())),
        None => Err(ApiError::Unauthorized(
            "missing `Authorization: Bearer <admin key>`".into(),
        )),
    }
}

fn quota_headers(resp: &mut Response, u: &Usage) {
    let h = resp.headers_mut();
    let rem = u
        .remaining
        .map(|r| format!("{r:.0}"))
        .unwrap_or_else(|| "unlimited".into());
    if let Ok(v) = HeaderValue::from_str(&rem) {
        h.insert("x-vvlm-quota-remaining", v);
    }
    if let Ok(v) = HeaderValue::from_str(&u.reset_at.to_string()) {
        h.insert("x-vvlm-quota-reset", v);
    }
}

/// Runs an authenticated handler (the tenant `require_tenant` found, else the one the headers'
/// key names) and stamps the tenant's remaining quota on the answer, errors included.
async fn with_tenant<F, Fut>(
    state: Arc<AppState>,
    authenticated: Option<Authenticated>,
    headers: &HeaderMap,
    route: &'static str,
    f: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Tenant) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let found = match authenticated {
        Some(Authenticated(t)) => Ok(t),
        None => authenticate(&state, headers).await,
    };
    let tenant = match found {
        Ok(t) => t,
        Err(e) => {
            state
                .metrics
                .observe(route, e.status().as_u16(), started.elapsed().as_secs_f64());
            return e.into_response();
        }
    };
    let result = f(state.clone(), tenant.clone()).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            match &e {
                ApiError::BudgetExhausted { .. } => {
                    state.metrics.budget_rejected();
                }
                ApiError::Overloaded { .. } => {
                    state.metrics.overload_rejected();
                }
                _ => {}
            }
            if e.status().is_server_error() {
                tracing::error!(route, "{e}");
            }
            e.into_response()
        }
    };
    let t = tenant.clone();
    if let Ok(u) = state.ledger_call(move |l| l.usage(&t, now())).await {
        quota_headers(&mut resp, &u);
    }
    state.metrics.observe(
        route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

async fn health(State(s): St) -> Response {
    if s.is_ready() {
        let models: Vec<String> = s.engines().keys().cloned().collect();
        // Which integer kernels the CPU's quantized products run (`cpu_kernels`, as detected
        // or chosen).
        let cpu_kernels = vvlm_engine::qdot::Isa::best().name();
        Json(json!({"status": "ok", "models": models, "cpu_kernels": cpu_kernels})).into_response()
    } else {
        let why = s
            .load_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "models are loading".into());
        ApiError::NotReady(why).into_response()
    }
}

async fn metrics(State(s): St) -> Response {
    // Usage comes from the shared ledger, so every replica reports the same figures.
    let tenants = s
        .ledger_call(|l| {
            let now = now();
            l.tenants()?
                .into_iter()
                .map(|t| l.usage(&t, now).map(|u| (t, u)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .ok();
    s.metrics
        .set_usage(tenants.as_ref().map(|v| v.iter().map(|(_, u)| u)));
    if let Ok((open, pending)) = s.ledger_call(|l| l.backlog()).await {
        s.metrics.set_batch_backlog(open, pending);
    }
    // This replica's admission places, by tenant (for the tenants the ledger listed).
    if let Some(v) = &tenants {
        let held: Vec<_> = v
            .iter()
            .map(|(t, _)| (t.name.as_str(), s.admission.held_by(t.id)))
            .collect();
        s.metrics.set_places_held(&held);
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

/// A served checkpoint as OpenAI's model object, with what the planner knows of it.
fn model_json(s: &AppState, m: &vvlm_planner::ModelEntry) -> Value {
    let engine = s.engine(&m.name);
    let notes = engine.as_ref().map(|e| e.notes.clone()).unwrap_or_default();
    // The trained context (vLLM's `max_model_len`): plans keep within it.
    let max_model_len = engine.and_then(|e| e.cfg.text_config.max_position_embeddings);
    // `created`: when the checkpoint was written (its config.json), as OpenAI's epoch seconds.
    let created = std::fs::metadata(m.path.join("config.json"))
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({
        "id": m.name, "object": "model", "created": created, "owned_by": "vvlm",
        "lm_params": m.lm_params,
        "frames": [m.min_frames, m.max_frames], "max_tokens_per_frame": m.max_side * m.max_side,
        "description": m.description, "notes": notes, "max_model_len": max_model_len,
        // What a caption request without a prompt asks this checkpoint.
        "caption_prompt": m.caption_prompt.as_deref().unwrap_or(&s.config.caption_prompt),
    })
}

async fn models(State(s): St) -> Response {
    let Some(planner) = s.planner() else {
        return ApiError::NotReady("models are loading".into()).into_response();
    };
    let data: Vec<Value> = planner
        .registry()
        .models
        .iter()
        .map(|m| model_json(&s, m))
        .collect();
    Json(json!({"object": "list", "data": data, "tasks": planner.tasks().collect::<Vec<_>>()}))
        .into_response()
}

/// One model (OpenAI's `GET /v1/models/{model}`); an unknown one is 404 `model_not_found`.
async fn model(State(s): St, Path(name): Path<String>) -> Result<Response, ApiError> {
    let planner = s
        .planner()
        .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
    let m = planner
        .registry()
        .models
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ApiError::ModelNotFound(format!("the model `{name}` does not exist")))?;
    Ok(Json(model_json(&s, m)).into_response())
}

async fn usage(
    State(s): St,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
) -> Response {
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(s, authenticated, &headers, "/v1/usage", |s, t| async move {
        Ok(Json(json!(s.ledger_call(move |l| l.usage(&t, now())).await?)).into_response())
    })
    .await
}

/// `/v1/plan`: the options of a request that would run, its `prompt` and `system` (counted with
/// each model's tokenizer), and `text_only` for a request without video.
async fn plan(
    State(s): St,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(s, authenticated, &headers, "/v1/plan", |s, t| async move {
        let Json(mut b) = body.map_err(json_error)?;
        let options =
            RequestOptions::take_from(&mut b, &["prompt", "system", "text_only", "candidates"])?;
        let text = |k: &str| match b.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(x)) => Ok(Some(x.clone())),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must be a string"))),
        };
        let text_only = optional_flag(b.get("text_only"), "text_only", "text_only")?;
        let content = Content {
            prompt: text("prompt")?.unwrap_or_default(),
            system: text("system")?,
            history: vec![],
            media: crate::validation::Media::None,
        };
        // The same rules as a request that runs: a dry run must not cost more to answer.
        let rules = Rules {
            default_task: "caption",
            media_required: false,
            prompt_required: false,
        };
        // Every configuration priced and scored, whatever its cost (the frontier a console draws).
        let candidates = optional_flag(b.get("candidates"), "candidates", "candidates")?;
        let r = validate(options, content, rules, &s.config.limits)?;
        let (req, budget) = plan_request(&s, &t, &r, text_only, Default::default())?;
        let planner = s
            .planner()
            .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
        let plan = planner.plan(&req)?;
        let mut v = json!(plan);
        v["budget_flops"] = json!(budget);
        v["n"] = json!(r.n);
        if let Some(e) = planner.registry().get(&plan.choice.model) {
            let c = &plan.choice;
            v["cost_by_component"] =
                json!(planner.cost_breakdown(e, c.frames, c.tokens_per_frame, &req));
        }
        if candidates {
            v["candidates"] = json!(planner.candidates(&req)?);
        }
        Ok(Json(v).into_response())
    })
    .await
}

/// A unique id (128 random bits, hex).
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // No randomness: time and a process-wide counter are still unique in this process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        return format!("{:x}{:016x}", now(), n);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `usage` object: tokens (the prompt once, completions summed over the n choices), the
/// planned and measured FLOPs by component and the time per stage.
pub(crate) fn usage_json(o: &Outcome) -> Value {
    let first = &o.generations[0];
    let completion: usize = o.generations.iter().map(|g| g.token_ids.len()).sum();
    let sum = |f: fn(&vvlm_engine::Generation) -> f64| o.generations.iter().map(f).sum::<f64>();
    json!({
        "prompt_tokens": first.prompt_tokens,
        // OpenAI's field: prompt tokens whose KV came from the cache (not prefilled again).
        "prompt_tokens_details": { "cached_tokens": first.cached_tokens },
        "text_tokens": first.text_tokens,
        "visual_tokens": first.visual_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "theoretical_flops": o.plan.choice.cost_flops * o.n as f64,
        "measured_flops": {
            "vision": o.measured.vision, "projector": o.measured.projector,
            "lm_prefill": o.measured.lm_prefill, "lm_decode": o.measured.lm_decode,
            "total": o.measured.total(),
        },
        "timings": {
            "video_decode_s": o.decode_s, "vision_s": first.timings.vision_s,
            "prefill_s": sum(|g| g.timings.prefill_s), "decode_s": sum(|g| g.timings.decode_s),
        },
        "cache": o.cache,
        "cold_cost_flops": o.plan.choice.cold_cost_flops * o.n as f64,
    })
}

async fn outcome_response(s: &AppState, t: &Tenant, o: Outcome) -> Response {
    let tenant = t.clone();
    let remaining = s
        .ledger_call(move |l| l.usage(&tenant, now()))
        .await
        .ok()
        .map(|u| json!(u));
    let g = &o.generations[0];
    let mut v = json!({
        "text": g.text,
        "finish_reason": g.finish_reason,
        "plan": o.plan,
        "frames": o.frames,
        "usage": usage_json(&o),
        "budget": remaining,
        "notes": o.notes,
    });
    if o.n > 1 {
        v["choices"] = json!(o
            .generations
            .iter()
            .map(|g| json!({"text": g.text, "finish_reason": g.finish_reason}))
            .collect::<Vec<_>>());
    }
    if !g.logprobs.is_empty() {
        v["logprobs"] = json!(g.logprobs);
    }
    Json(v).into_response()
}

async fn parse_video_request(
    req: Request,
    s: &AppState,
    t: &Tenant,
) -> Result<(RequestOptions, Content), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if ct.starts_with("multipart/form-data") {
        let mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| body_error(e.status(), e.body_text()))?;
        from_multipart(mp).await
    } else if ct.starts_with("application/json") {
        let Json(b): Json<Map<String, Value>> =
            Json::from_request(req, &()).await.map_err(json_error)?;
        // Media by http(s) URL is fetched first (allow-listed), as if it had been uploaded.
        let sources = crate::remote::media_sources(s, t, &b).await?;
        from_json_video(b, &sources)
    } else {
        Err(ApiError::UnsupportedMedia(
            "send multipart/form-data (field `video`) or application/json (`video` as a data: URL)"
                .into(),
        ))
    }
}

async fn video_endpoint(
    s: Arc<AppState>,
    req: Request,
    task: &'static str,
    route: &'static str,
) -> Response {
    // `require_tenant` has checked the key (and taken the admission slot) before any body.
    let headers = req.headers().clone();
    let slot = req.extensions().get::<AdmissionSlot>().cloned();
    let authenticated = req.extensions().get::<Authenticated>().cloned();
    with_tenant(s, authenticated, &headers, route, |s, t| async move {
        let (options, content) = parse_video_request(req, &s, &t).await?;
        let rules = Rules {
            default_task: task,
            media_required: true,
            prompt_required: true,
        };
        let r = validate(options, content, rules, &s.config.limits)?;
        let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
        Ok(outcome_response(&s, &t, o).await)
    })
    .await
}

async fn caption(State(s): St, req: Request) -> Response {
    video_endpoint(s, req, "caption", "/v1/videos/caption").await
}

async fn qa(State(s): St, req: Request) -> Response {
    video_endpoint(s, req, "qa", "/v1/videos/qa").await
}

async fn text_completions(
    State(s): St,
    slot: Option<axum::Extension<AdmissionSlot>>,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let slot = slot.map(|axum::Extension(x)| x);
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(s, authenticated, &headers, "/v1/completions", |s, t| {
        crate::completions::completions(s, t, slot, body)
    })
    .await
}

async fn tokenize(
    State(s): St,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    body: Result<Json<crate::tokenize::TokenizeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(s, authenticated, &headers, "/tokenize", |s, _| {
        crate::tokenize::tokenize(s, body)
    })
    .await
}

async fn tokenizer_info(
    State(s): St,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    query: Result<Query<crate::tokenize::InfoQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(
        s,
        authenticated,
        &headers,
        "/tokenizer_info",
        |s, _| async move {
            let Query(q) = query.map_err(|e| ApiError::Validation(e.body_text()))?;
            crate::tokenize::info(s, q).await
        },
    )
    .await
}

async fn detokenize(
    State(s): St,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    body: Result<Json<crate::tokenize::DetokenizeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(s, authenticated, &headers, "/detokenize", |s, _| {
        crate::tokenize::detokenize(s, body)
    })
    .await
}

async fn chat(
    State(s): St,
    slot: Option<axum::Extension<AdmissionSlot>>,
    authenticated: Option<axum::Extension<Authenticated>>,
    headers: HeaderMap,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let slot = slot.map(|axum::Extension(x)| x);
    let authenticated = authenticated.map(|axum::Extension(x)| x);
    with_tenant(
        s,
        authenticated,
        &headers,
        "/v1/chat/completions",
        |s, t| crate::chat::completions(s, t, slot, body),
    )
    .await
}

// ---------------------------------------------------------------- admin

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
    #[serde(default)]
    default_budget: Option<Budget>,
    #[serde(default)]
    per_request_max: Option<Budget>,
    #[serde(default)]
    quota: Option<Budget>,
    #[serde(default)]
    period: Option<String>,
    /// Requests in flight at once on a server (absent or null: the server's default).
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// Share of a server's places under contention, relative to other tenants' (absent: 1).
    #[serde(default)]
    weight: Option<f64>,
    /// Prefixes its media may be read from, narrowing the server's (absent: the server's).
    #[serde(default)]
    media_allow: Option<Vec<String>>,
}

/// A tenant's `media_allow` is a list of URL prefixes the server can use (422 naming it).
fn check_media_allow(settings: &TenantSettings) -> Result<(), ApiError> {
    match &settings.media_allow {
        Some(Some(m)) => crate::remote::check_media_allow(m).map_err(|message| ApiError::Invalid {
            param: "media_allow".into(),
            message,
        }),
        _ => Ok(()),
    }
}

async fn admin_create(
    State(s): St,
    headers: HeaderMap,
    body: Result<Json<CreateTenant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let Json(b) = body.map_err(json_error)?;
    let settings = TenantSettings {
        default_budget: b.default_budget.map(|x| x.flops()).transpose()?,
        per_request_max: b.per_request_max.map(|x| x.flops()).transpose()?,
        quota: b.quota.map(|x| x.quota_flops()).transpose()?.map(Some),
        period: b
            .period
            .as_deref()
            .map(crate::ledger::Period::parse)
            .transpose()?,
        max_in_flight: b.max_in_flight.map(Some),
        weight: b.weight.map(Some),
        media_allow: b.media_allow.map(Some),
    };
    check_media_allow(&settings)?;
    let (t, key) = s
        .ledger_call(move |l| l.create_tenant(&b.name, &settings))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"tenant": t, "api_key": key})),
    )
        .into_response())
}

async fn admin_list(State(s): St, headers: HeaderMap) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let mut out = vec![];
    let all = s
        .ledger_call(|l| {
            let now = now();
            l.tenants()?
                .into_iter()
                .map(|t| l.usage(&t, now).map(|u| (t, u)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    for (t, u) in all {
        // Its requests in flight on this replica now (decoding, queued or running).
        let held = s.admission.held_by(t.id);
        out.push(json!({"tenant": t, "usage": u, "places_held": held}));
    }
    Ok(Json(json!({"tenants": out})).into_response())
}

async fn admin_get(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    Ok(Json(json!(
        s.ledger_call(move |l| l.tenant_by_name(&name)).await?
    ))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTenant {
    #[serde(default)]
    default_budget: Option<Budget>,
    #[serde(default)]
    per_request_max: Option<Budget>,
    /// A number sets the quota; null removes it.
    #[serde(default, deserialize_with = "nullable")]
    quota: Option<Option<Budget>>,
    #[serde(default)]
    period: Option<String>,
    /// A number sets the tenant's limit of requests in flight; null returns it to the
    /// server's default.
    #[serde(default, deserialize_with = "nullable")]
    max_in_flight: Option<Option<u32>>,
    /// A number sets the tenant's weight; null returns it to 1.
    #[serde(default, deserialize_with = "nullable")]
    weight: Option<Option<f64>>,
    /// A list narrows where its media may be read from; null returns it to the server's lists.
    #[serde(default, deserialize_with = "nullable")]
    media_allow: Option<Option<Vec<String>>>,
}

fn nullable<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::<T>::deserialize(d)?))
}

async fn admin_update(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<UpdateTenant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let Json(b) = body.map_err(json_error)?;
    let settings = TenantSettings {
        default_budget: b.default_budget.map(|x| x.flops()).transpose()?,
        per_request_max: b.per_request_max.map(|x| x.flops()).transpose()?,
        quota: match b.quota {
            None => None,
            Some(None) => Some(None),
            Some(Some(q)) => Some(Some(q.quota_flops()?)),
        },
        period: b
            .period
            .as_deref()
            .map(crate::ledger::Period::parse)
            .transpose()?,
        max_in_flight: b.max_in_flight,
        weight: b.weight,
        media_allow: b.media_allow,
    };
    check_media_allow(&settings)?;
    Ok(Json(json!(
        s.ledger_call(move |l| l.update_tenant(&name, &settings))
            .await?
    ))
    .into_response())
}

async fn admin_remove(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    s.ledger_call(move |l| l.remove_tenant(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn admin_usage(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let u = s
        .ledger_call(move |l| l.usage(&l.tenant_by_name(&name)?, now()))
        .await?;
    Ok(Json(json!(u)).into_response())
}

async fn admin_rotate_key(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let (t, key) = s.ledger_call(move |l| l.rotate_key(&name)).await?;
    Ok(Json(json!({"tenant": t, "api_key": key})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
    bucket_s: Option<i64>,
    buckets: Option<usize>,
}

/// A tenant's batches, newest first (`limit`, `after`), as the tenant sees them.
async fn admin_batches(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<crate::batch::ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let Query(q) = q.map_err(|e| ApiError::Validation(e.body_text()))?;
    let t = s.ledger_call(move |l| l.tenant_by_name(&name)).await?;
    crate::batch::list_batches(s, t, q).await
}

/// A tenant's latest requests (plan and charge) and its charged FLOPs over time.
async fn admin_requests(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let Query(q) = q.map_err(|e| ApiError::Validation(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    let bucket_s = q.bucket_s.unwrap_or(3600);
    let buckets = q.buckets.unwrap_or(48);
    if !(1..=1000).contains(&limit)
        || !(1..=31_622_400).contains(&bucket_s)
        || !(1..=1000).contains(&buckets)
    {
        return Err(ApiError::Validation(
            "limit and buckets must be in 1..=1000, bucket_s in 1..=31622400".into(),
        ));
    }
    let (requests, points) = s
        .ledger_call(move |l| {
            let t = l.tenant_by_name(&name)?;
            Ok((
                l.recent_requests(&t, limit)?,
                l.usage_series(&t, now(), bucket_s, buckets)?,
            ))
        })
        .await?;
    Ok(Json(json!({
        "requests": requests,
        "series": {"bucket_s": bucket_s, "points": points},
    }))
    .into_response())
}

/// The Files and Batch APIs' handlers: each authenticates, then calls `crate::batch`.
macro_rules! batch_route {
    ($name:ident, $route:literal, |$s:ident, $t:ident $(, $arg:ident: $ty:ty)?| $call:expr) => {
        async fn $name(
            State(s): St,
            authenticated: Option<axum::Extension<Authenticated>>,
            headers: HeaderMap,
            $($arg: $ty,)?
        ) -> Response {
            let authenticated = authenticated.map(|axum::Extension(x)| x);
            with_tenant(s, authenticated, &headers, $route, |$s, $t| async move { $call.await })
                .await
        }
    };
}

batch_route!(upload_file, "/v1/files", |s, t, mp: Multipart| {
    crate::batch::upload(s, t, mp)
});
batch_route!(list_files, "/v1/files", |s,
                                       t,
                                       q: Result<
    Query<crate::batch::ListQuery>,
    axum::extract::rejection::QueryRejection,
>| async move {
    let Query(q) = q.map_err(|e| ApiError::Validation(e.body_text()))?;
    crate::batch::list_files(s, t, q).await
});
batch_route!(get_file, "/v1/files/{id}", |s, t, id: Path<String>| {
    crate::batch::get_file(s, t, id.0)
});
batch_route!(delete_file, "/v1/files/{id}", |s, t, id: Path<String>| {
    crate::batch::delete_file(s, t, id.0)
});
batch_route!(file_content, "/v1/files/{id}/content", |s,
                                                      t,
                                                      id: Path<
    String,
>| {
    crate::batch::file_content(s, t, id.0)
});
batch_route!(create_batch, "/v1/batches", |s,
                                           t,
                                           body: Result<
    Json<crate::batch::CreateBatch>,
    axum::extract::rejection::JsonRejection,
>| crate::batch::create_batch(
    s, t, body
));
batch_route!(list_batches, "/v1/batches", |s,
                                           t,
                                           q: Result<
    Query<crate::batch::ListQuery>,
    axum::extract::rejection::QueryRejection,
>| async move {
    let Query(q) = q.map_err(|e| ApiError::Validation(e.body_text()))?;
    crate::batch::list_batches(s, t, q).await
});
batch_route!(get_batch, "/v1/batches/{id}", |s, t, id: Path<String>| {
    crate::batch::get_batch(s, t, id.0)
});
batch_route!(cancel_batch, "/v1/batches/{id}/cancel", |s,
                                                       t,
                                                       id: Path<
    String,
>| {
    crate::batch::cancel_batch(s, t, id.0)
});
