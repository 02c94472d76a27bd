//! Routes: caption, QA, OpenAI-compatible chat completions (with SSE streaming), plan, models,
//! health, metrics, usage and the admin API.

use crate::error::ApiError;
use crate::ledger::{now, Tenant, TenantSettings, Usage};
use crate::validation::{
    check_request, from_multipart, resolve_url, Budget, JsonVideoBody, Media, VideoRequest,
};
use crate::worker::{Event, Held, Job};
use crate::AppState;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vvlm_cost::{FlopBreakdown, FlopCounter};
use vvlm_engine::{FinishReason, Generation, SamplingParams};
use vvlm_planner::{Pins, Plan, PlanRequest};
use vvlm_video::{FrameSampling, Preprocess};

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
        .route("/v1/plan", post(plan))
        .route("/v1/usage", get(usage))
        .route("/v1/videos/caption", post(caption))
        .route("/v1/videos/qa", post(qa))
        .route("/v1/chat/completions", post(chat))
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
        .with_state(state)
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
    let checked = match authenticate(&s, req.headers()).and_then(|_| check_length(&s, &req)) {
        Ok(_) => {
            let path = req.uri().path().to_string();
            admission_slot(&s, &path).await
        }
        Err(e) => Err(e),
    };
    match checked {
        Ok(slot) => {
            let mut req = req;
            if let Some(slot) = slot {
                req.extensions_mut().insert(slot);
            }
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

/// A request's place among those admitted (decoding, queued or running), taken before its
/// body is read so that an overloaded server answers 429 without parsing, planning or decoding.
#[derive(Clone)]
pub struct AdmissionSlot(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl AdmissionSlot {
    fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn overloaded(s: &AppState) -> ApiError {
    ApiError::Overloaded {
        message: format!(
            "the queue is full ({} waiting); retry later",
            s.config.limits.queue_depth
        ),
        retry_after_s: 2,
    }
}

/// Routes that run the engine take an admission slot at the door, waiting up to
/// `queue_wait_s` for one: a full server holds a retrying client briefly (an idle wait) instead
/// of answering 429 at once and being asked again in a tight loop.
async fn admission_slot(s: &AppState, path: &str) -> Result<Option<AdmissionSlot>, ApiError> {
    if !matches!(
        path,
        "/v1/videos/caption" | "/v1/videos/qa" | "/v1/chat/completions"
    ) {
        return Ok(None);
    }
    let wait = Duration::from_secs_f64(s.config.limits.queue_wait_s.clamp(0.0, 60.0));
    let permit = match tokio::time::timeout(wait, s.admission.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            // Counted here: this 429 does not pass through `with_tenant`.
            s.metrics
                .overload_rejections
                .fetch_add(1, Ordering::Relaxed);
            return Err(overloaded(s));
        }
    };
    Ok(Some(AdmissionSlot(Arc::new(std::sync::Mutex::new(Some(
        permit,
    ))))))
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
    let limit = body_limit(&s.config);
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

fn json_error(e: axum::extract::rejection::JsonRejection) -> ApiError {
    body_error(e.status(), e.body_text())
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Tenant, ApiError> {
    let key = bearer(headers)
        .ok_or_else(|| ApiError::Unauthorized("missing `Authorization: Bearer <key>`".into()))?;
    state
        .ledger
        .tenant_by_key(key)?
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

/// Runs an authenticated handler and stamps the tenant's remaining quota on the answer, errors
/// included.
async fn with_tenant<F, Fut>(
    state: Arc<AppState>,
    headers: &HeaderMap,
    route: &'static str,
    f: F,
) -> Response
where
    F: FnOnce(Arc<AppState>, Tenant) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let tenant = match authenticate(&state, headers) {
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
                    state
                        .metrics
                        .budget_rejections
                        .fetch_add(1, Ordering::Relaxed);
                }
                ApiError::Overloaded { .. } => {
                    state
                        .metrics
                        .overload_rejections
                        .fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if e.status().is_server_error() {
                tracing::error!(route, "{e}");
            }
            e.into_response()
        }
    };
    if let Ok(u) = state.ledger.usage(&tenant, now()) {
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
        Json(json!({"status": "ok", "models": models})).into_response()
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): St) -> Response {
    let Some(planner) = s.planner() else {
        return ApiError::NotReady("models are loading".into()).into_response();
    };
    let data: Vec<Value> = planner
        .registry()
        .models
        .iter()
        .map(|m| {
            let notes = s.engine(&m.name).map(|e| e.notes.clone()).unwrap_or_default();
            json!({
                "id": m.name, "object": "model", "owned_by": "vvlm", "lm_params": m.lm_params,
                "frames": [m.min_frames, m.max_frames], "max_tokens_per_frame": m.max_side * m.max_side,
                "description": m.description, "notes": notes,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data, "tasks": planner.tasks().collect::<Vec<_>>()}))
        .into_response()
}

async fn usage(State(s): St, headers: HeaderMap) -> Response {
    with_tenant(s, &headers, "/v1/usage", |s, t| async move {
        Ok(Json(json!(s.ledger.usage(&t, now())?)).into_response())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    budget: Option<Budget>,
    task: Option<String>,
    model: Option<String>,
    frames: Option<u32>,
    tokens_per_frame: Option<u32>,
    prompt: Option<String>,
    max_tokens: Option<usize>,
    /// Also answer every allowed configuration priced and scored, whatever its cost (the
    /// frontier a console draws).
    #[serde(default)]
    candidates: bool,
}

async fn plan(
    State(s): St,
    headers: HeaderMap,
    body: Result<Json<PlanBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    with_tenant(s, &headers, "/v1/plan", |s, t| async move {
        let Json(b) = body.map_err(json_error)?;
        let r = VideoRequest {
            task: b.task.unwrap_or_else(|| "caption".into()),
            prompt: b.prompt.unwrap_or_default(),
            budget: b.budget.map(|b| b.flops()).transpose()?,
            model: b.model,
            frames: b.frames,
            tokens_per_frame: b.tokens_per_frame,
            max_tokens: b.max_tokens,
            ..Default::default()
        };
        // The same limits as a request that runs: a dry run must not cost more to answer.
        let limits = &s.config.limits;
        if let Some(m) = r.max_tokens {
            if m == 0 || m > limits.max_tokens {
                return Err(ApiError::Validation(format!(
                    "max_tokens must be in 1..={}, got {m}",
                    limits.max_tokens
                )));
            }
        }
        if r.prompt.chars().count() > limits.max_prompt_chars {
            return Err(ApiError::Validation(format!(
                "prompt is longer than {} characters",
                limits.max_prompt_chars
            )));
        }
        let (req, budget) = plan_request(&s, &t, &r)?;
        let planner = s
            .planner()
            .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
        let plan = planner.plan(&req)?;
        let mut v = json!(plan);
        v["budget_flops"] = json!(budget);
        if let Some(e) = planner.registry().get(&plan.choice.model) {
            let c = &plan.choice;
            v["cost_by_component"] =
                json!(planner.cost_breakdown(e, c.frames, c.tokens_per_frame, &req));
        }
        if b.candidates {
            v["candidates"] = json!(planner.candidates(&req)?);
        }
        Ok(Json(v).into_response())
    })
    .await
}

/// Budget (request's or tenant's default, capped by the tenant's per-request maximum) and plan.
fn plan_for(s: &AppState, t: &Tenant, r: &VideoRequest) -> Result<(Plan, f64), ApiError> {
    let planner = s
        .planner()
        .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
    let (req, budget) = plan_request(s, t, r)?;
    Ok((planner.plan(&req)?, budget))
}

/// What the planner is asked for a request, and the budget.
fn plan_request(
    s: &AppState,
    t: &Tenant,
    r: &VideoRequest,
) -> Result<(PlanRequest, f64), ApiError> {
    let budget = r.budget.unwrap_or(t.default_budget);
    if budget > t.per_request_max {
        return Err(ApiError::Validation(format!(
            "budget {budget:.4e} FLOPs exceeds this tenant's per-request maximum of {:.4e} FLOPs",
            t.per_request_max
        )));
    }
    let text_tokens = match s.engines().values().next() {
        Some(e) if !r.prompt.is_empty() => e
            .count_prompt_tokens(r.system.as_deref(), &r.prompt)
            .unwrap_or(0),
        _ => 0,
    };
    let req = PlanRequest {
        budget_flops: budget,
        task: r.task.clone(),
        text_tokens,
        expected_decode_tokens: r
            .max_tokens
            .unwrap_or(s.config.planner.expected_decode_tokens),
        pins: Pins {
            model: r.model.clone(),
            frames: r.frames,
            tokens_per_frame: r.tokens_per_frame,
        },
    };
    Ok((req, budget))
}

/// Everything a finished request reports.
struct Outcome {
    plan: Plan,
    generation: Generation,
    measured: FlopBreakdown,
    frames: Vec<vvlm_video::SampledFrame>,
    decode_s: f64,
    notes: Vec<String>,
}

/// Sets the cancel flag when the client goes away (the handler's future is dropped).
struct CancelOnDrop(Arc<AtomicBool>, bool);
impl CancelOnDrop {
    /// The request completed: dropping the guard no longer cancels anything.
    fn disarm(&mut self) {
        self.1 = true;
    }
}
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// A unique id (128 random bits, hex).
fn new_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // No randomness: time and a process-wide counter are still unique in this process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        return format!("{:x}{:016x}", now(), n);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Validates, plans, reserves, decodes and queues; returns the event stream of the job.
async fn admit(
    s: &Arc<AppState>,
    t: &Tenant,
    r: VideoRequest,
    slot: Option<AdmissionSlot>,
) -> Result<
    (
        Plan,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
        Arc<FlopCounter>,
        CancelOnDrop,
        Vec<vvlm_video::SampledFrame>,
        f64,
        Arc<vvlm_engine::VideoVlm>,
    ),
    ApiError,
> {
    if !s.is_ready() {
        return Err(ApiError::NotReady("models are loading".into()));
    }
    check_request(
        &r,
        s.config.limits.max_prompt_chars,
        s.config.limits.max_tokens,
    )?;
    let (plan, _budget) = plan_for(s, t, &r)?;
    let engine = s
        .engine(&plan.choice.model)
        .ok_or_else(|| ApiError::Internal(format!("model {} is not loaded", plan.choice.model)))?;
    // A place in the queue before any work is spent (reservation, decoding): an overloaded
    // server answers 429 at once, and at most queue_depth + workers requests decode or wait.
    let permit = match slot.and_then(|x| x.take()) {
        Some(p) => p,
        None => s
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| overloaded(s))?,
    };
    static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let request_id = format!(
        "req-{}-{}-{}",
        std::process::id(),
        now(),
        REQUESTS.fetch_add(1, Ordering::Relaxed)
    );
    let reservation = s
        .ledger
        .reserve(t, plan.choice.cost_flops, &request_id, now())?;
    let mut recorded = json!(plan);
    if let Some(o) = recorded.as_object_mut() {
        o.remove("runners_up");
    }
    if let Err(e) = s.ledger.record_plan(&reservation, &recorded) {
        tracing::warn!(request_id, "could not record the plan: {e}");
    }
    let flops = Arc::new(FlopCounter::new());
    let held = Held::new(s.ledger.clone(), reservation, flops.clone());
    // Decode exactly the planned number of frames at the tower's resolution.
    let pre = Preprocess {
        size: engine.cfg.vision_config.image_size as u32,
        ..Default::default()
    };
    let policy = s.config.media.clone();
    let frames = plan.choice.frames as usize;
    let media = r.media.clone().unwrap_or_default();
    let t0 = Instant::now();
    let sampled = tokio::task::spawn_blocking(move || match media {
        Media::VideoBytes(b) => {
            vvlm_video::decode_bytes(&b, &FrameSampling::Uniform { frames }, &policy, &pre)
        }
        Media::VideoPath(p) => {
            vvlm_video::decode_path(&p, &FrameSampling::Uniform { frames }, &policy, &pre)
        }
        Media::Images(imgs) => {
            // Still images are the frames; the plan's frame count samples them uniformly.
            let all = vvlm_video::frames_from_images(&imgs, &policy, &pre)?;
            let instants = vvlm_video::sample_timestamps(
                &FrameSampling::Uniform { frames },
                all.frames.len() as f64,
            )?;
            let times: Vec<f64> = all.frames.iter().map(|f| f.timestamp_s).collect();
            let idx = vvlm_video::frame_for_instants(&times, &instants);
            let n = 3 * (all.size * all.size) as usize;
            let mut pixels = Vec::with_capacity(idx.len() * n);
            let mut chosen = vec![];
            for (k, &i) in idx.iter().enumerate() {
                pixels.extend_from_slice(all.frame_pixels(i));
                let mut f = all.frames[i].clone();
                f.requested_s = instants[k];
                chosen.push(f);
            }
            Ok(vvlm_video::SampledVideo {
                frames: chosen,
                pixels,
                ..all
            })
        }
        Media::None => Err(vvlm_video::VideoError::Invalid("no media".into())),
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoder task: {e}")))??;
    let decode_s = t0.elapsed().as_secs_f64();
    let size = sampled.size as usize;
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let max_tokens = r.max_tokens.unwrap_or(s.config.limits.default_max_tokens);
    let job = Job {
        engine: engine.clone(),
        pixels: Some((sampled.pixels, [frames, 3, size, size])),
        side: plan.choice.side as usize,
        system: r.system.clone(),
        prompt: r.prompt.clone(),
        sampling: SamplingParams {
            max_tokens,
            temperature: r.temperature.unwrap_or(0.0),
            top_p: r.top_p.unwrap_or(1.0),
            seed: r.seed.unwrap_or(0),
            stop_token_ids: vec![],
            stop: r.stop.clone(),
        },
        flops: flops.clone(),
        cancel: cancel.clone(),
        events: tx,
        held: Some(held),
        _permit: permit,
    };
    s.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    if !s.pool.submit(job) {
        s.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::Overloaded {
            message: format!(
                "the queue is full ({} waiting); retry later",
                s.config.limits.queue_depth
            ),
            retry_after_s: 2,
        });
    }
    Ok((
        plan,
        rx,
        flops,
        CancelOnDrop(cancel, false),
        sampled.frames,
        decode_s,
        engine,
    ))
}

async fn run_to_completion(
    s: Arc<AppState>,
    t: Tenant,
    r: VideoRequest,
    slot: Option<AdmissionSlot>,
) -> Result<Outcome, ApiError> {
    let (plan, mut rx, flops, mut guard, frames, decode_s, engine) = admit(&s, &t, r, slot).await?;
    let timeout = Duration::from_secs_f64(s.config.limits.request_timeout_s);
    let done = tokio::time::timeout(timeout, async {
        while let Some(ev) = rx.recv().await {
            if let Event::Done(r) = ev {
                return Some(r);
            }
        }
        None
    })
    .await;
    let generation = match done {
        Err(_) => {
            return Err(ApiError::Timeout(format!(
                "the request took longer than {timeout:?}"
            )))
        }
        Ok(None) => return Err(ApiError::Internal("the worker went away".into())),
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(g))) => g,
    };
    guard.disarm();
    // The worker settled the reservation to this figure before it reported Done.
    let measured = flops.snapshot();
    s.metrics.add_flops(plan.choice.cost_flops, &measured);
    s.metrics.add_tokens(generation.token_ids.len() as u64);
    Ok(Outcome {
        plan,
        generation,
        measured,
        frames,
        decode_s,
        notes: engine.notes.clone(),
    })
}

fn usage_json(o: &Outcome) -> Value {
    let g = &o.generation;
    json!({
        "prompt_tokens": g.prompt_tokens,
        "text_tokens": g.text_tokens,
        "visual_tokens": g.visual_tokens,
        "completion_tokens": g.token_ids.len(),
        "total_tokens": g.prompt_tokens + g.token_ids.len(),
        "theoretical_flops": o.plan.choice.cost_flops,
        "measured_flops": {
            "vision": o.measured.vision, "projector": o.measured.projector,
            "lm_prefill": o.measured.lm_prefill, "lm_decode": o.measured.lm_decode,
            "total": o.measured.total(),
        },
        "timings": {
            "video_decode_s": o.decode_s, "vision_s": g.timings.vision_s,
            "prefill_s": g.timings.prefill_s, "decode_s": g.timings.decode_s,
        },
    })
}

fn outcome_response(s: &AppState, t: &Tenant, o: Outcome) -> Response {
    let remaining = s.ledger.usage(t, now()).ok().map(|u| json!(u));
    Json(json!({
        "text": o.generation.text,
        "finish_reason": o.generation.finish_reason,
        "plan": o.plan,
        "frames": o.frames,
        "usage": usage_json(&o),
        "budget": remaining,
        "notes": o.notes,
    }))
    .into_response()
}

async fn parse_video_request(
    req: Request,
    default_task: &str,
    allow: &[std::path::PathBuf],
) -> Result<VideoRequest, ApiError> {
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
        from_multipart(mp, default_task).await
    } else if ct.starts_with("application/json") {
        let Json(b): Json<JsonVideoBody> =
            Json::from_request(req, &()).await.map_err(json_error)?;
        b.into_request(default_task, allow)
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
    with_tenant(s, &headers, route, |s, t| async move {
        let r = parse_video_request(req, task, &s.config.file_allow).await?;
        let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
        Ok(outcome_response(&s, &t, o))
    })
    .await
}

async fn caption(State(s): St, req: Request) -> Response {
    video_endpoint(s, req, "caption", "/v1/videos/caption").await
}

async fn qa(State(s): St, req: Request) -> Response {
    video_endpoint(s, req, "qa", "/v1/videos/qa").await
}

// ---------------------------------------------------------------- OpenAI-compatible chat

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    /// A string or a list of up to 4.
    #[serde(default)]
    stop: Option<StopField>,
    // OpenAI fields vvlm does not implement: refused by name when set, never silently ignored.
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    // vvlm extensions
    #[serde(default)]
    budget_flops: Option<Budget>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    frames: Option<u32>,
    #[serde(default)]
    tokens_per_frame: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Checks and collects stop strings (as OpenAI: at most 4).
fn stop_strings(s: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let v = match s {
        None => vec![],
        Some(StopField::One(x)) => vec![x],
        Some(StopField::Many(v)) => v,
    };
    if v.len() > 4 || v.iter().any(|x| x.is_empty() || x.chars().count() > 64) {
        return Err(ApiError::Validation(
            "stop: at most 4 strings of 1-64 characters".into(),
        ));
    }
    Ok(v)
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
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

fn chat_request(
    b: ChatBody,
    allow: &[std::path::PathBuf],
) -> Result<(VideoRequest, bool, String), ApiError> {
    let unsupported = |field: &str| {
        Err(ApiError::Unsupported(format!(
            "`{field}` is not supported by this server"
        )))
    };
    if b.n.is_some_and(|n| n != 1) {
        return unsupported("n");
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_null()) || b.tool_choice.is_some() {
        return unsupported("tools");
    }
    if b.response_format.is_some() {
        return unsupported("response_format");
    }
    if b.logprobs == Some(true) || b.top_logprobs.is_some() {
        return unsupported("logprobs");
    }
    let stop = stop_strings(b.stop)?;
    let mut system = None;
    let mut prompt = vec![];
    let mut media: Option<Media> = None;
    let mut images = vec![];
    for m in b.messages {
        let parts = match m.content {
            Content::Text(t) => vec![Part::Text { text: t }],
            Content::Parts(p) => p,
        };
        for p in parts {
            match (m.role.as_str(), p) {
                ("system", Part::Text { text }) => system = Some(text),
                ("user", Part::Text { text }) => prompt.push(text),
                ("user", Part::VideoUrl { video_url }) => {
                    if media.is_some() {
                        return Err(ApiError::Validation("one video per request".into()));
                    }
                    media = Some(resolve_url(video_url.url(), allow)?);
                }
                ("user", Part::ImageUrl { image_url }) => {
                    match resolve_url(image_url.url(), allow)? {
                        Media::Images(mut i) => images.append(&mut i),
                        _ => {
                            return Err(ApiError::Validation(
                                "image_url must be a data:image/... URL".into(),
                            ))
                        }
                    }
                }
                ("assistant", _) => {
                    return Err(ApiError::Validation(
                        "multi-turn conversations are not supported; send one user turn".into(),
                    ))
                }
                (role, _) => {
                    return Err(ApiError::Validation(format!(
                        "unsupported message part for role `{role}`"
                    )))
                }
            }
        }
    }
    if !images.is_empty() {
        if media.is_some() {
            return Err(ApiError::Validation(
                "send a video or images, not both".into(),
            ));
        }
        media = Some(Media::Images(images));
    }
    let model_name = b.model.clone().unwrap_or_else(|| "auto".into());
    let pin = b.model.filter(|m| m != "auto" && !m.is_empty());
    Ok((
        VideoRequest {
            task: b.task.unwrap_or_else(|| "qa".into()),
            prompt: prompt.join("\n"),
            system,
            budget: b.budget_flops.map(|x| x.flops()).transpose()?,
            model: pin,
            frames: b.frames,
            tokens_per_frame: b.tokens_per_frame,
            max_tokens: b.max_completion_tokens.or(b.max_tokens),
            temperature: b.temperature,
            top_p: b.top_p,
            seed: b.seed,
            stop,
            media,
        },
        b.stream,
        model_name,
    ))
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

async fn chat(
    State(s): St,
    slot: Option<axum::Extension<AdmissionSlot>>,
    headers: HeaderMap,
    body: Result<Json<ChatBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let slot = slot.map(|axum::Extension(x)| x);
    with_tenant(s, &headers, "/v1/chat/completions", |s, t| async move {
        let Json(b) = body.map_err(json_error)?;
        let (r, stream, _model) = chat_request(b, &s.config.file_allow)?;
        let id = format!("chatcmpl-{}", new_id());
        let created = now();
        if !stream {
            let o = run_to_completion(s.clone(), t.clone(), r, slot).await?;
            let u = usage_json(&o);
            return Ok(Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": o.plan.choice.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": o.generation.text},
                             "finish_reason": finish_str(o.generation.finish_reason)}],
                "usage": u, "plan": o.plan, "notes": o.notes,
            }))
            .into_response());
        }
        // Streaming: admission errors are ordinary HTTP errors; after that, SSE chunks.
        let (plan, mut rx, flops, mut guard, _frames, decode_s, engine) = admit(&s, &t, r, slot).await?;
        let model = plan.choice.model.clone();
        let timeout = Duration::from_secs_f64(s.config.limits.request_timeout_s);
        let stream = async_stream(move |tx| async move {
            let chunk = |delta: Value, finish: Option<&str>| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            };
            let _ = tx.send(SseEvent::default().data(chunk(json!({"role": "assistant"}), None).to_string()));
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let ev = tokio::time::timeout_at(deadline, rx.recv()).await;
                match ev {
                    Err(_) => {
                        let _ = tx.send(SseEvent::default().data(json!({"error": {"type": "timeout", "message": "request timed out"}}).to_string()));
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Event::Started)) => {}
                    Ok(Some(Event::Text(piece))) => {
                        if tx.send(SseEvent::default().data(chunk(json!({"content": piece}), None).to_string())).is_err() {
                            return; // client gone: the guard cancels the job
                        }
                    }
                    Ok(Some(Event::Done(Err(e)))) => {
                        let _ = tx.send(SseEvent::default().data(json!({"error": {"type": e.kind(), "message": e.to_string()}}).to_string()));
                        break;
                    }
                    Ok(Some(Event::Done(Ok(g)))) => {
                        guard.disarm();
                        let measured = flops.snapshot();
                        s.metrics.add_flops(plan.choice.cost_flops, &measured);
                        s.metrics.add_tokens(g.token_ids.len() as u64);
                        let o = Outcome { plan: plan.clone(), generation: g, measured, frames: vec![], decode_s, notes: engine.notes.clone() };
                        let mut last = chunk(json!({}), Some(finish_str(o.generation.finish_reason)));
                        last["usage"] = usage_json(&o);
                        last["plan"] = json!(o.plan);
                        let _ = tx.send(SseEvent::default().data(last.to_string()));
                        let _ = tx.send(SseEvent::default().data("[DONE]"));
                        return;
                    }
                }
            }
            drop(guard);
        });
        Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
    })
    .await
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
    };
    let (t, key) = s.ledger.create_tenant(&b.name, &settings)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"tenant": t, "api_key": key})),
    )
        .into_response())
}

async fn admin_list(State(s): St, headers: HeaderMap) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let mut out = vec![];
    for t in s.ledger.tenants()? {
        let u = s.ledger.usage(&t, now())?;
        out.push(json!({"tenant": t, "usage": u}));
    }
    Ok(Json(json!({"tenants": out})).into_response())
}

async fn admin_get(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    Ok(Json(json!(s.ledger.tenant_by_name(&name)?)).into_response())
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
}

fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Budget>>, D::Error> {
    Ok(Some(Option::<Budget>::deserialize(d)?))
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
    };
    Ok(Json(json!(s.ledger.update_tenant(&name, &settings)?)).into_response())
}

async fn admin_remove(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    s.ledger.remove_tenant(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn admin_usage(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let t = s.ledger.tenant_by_name(&name)?;
    Ok(Json(json!(s.ledger.usage(&t, now())?)).into_response())
}

async fn admin_rotate_key(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let (t, key) = s.ledger.rotate_key(&name)?;
    Ok(Json(json!({"tenant": t, "api_key": key})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
    bucket_s: Option<i64>,
    buckets: Option<usize>,
}

/// A tenant's latest requests (plan and charge) and its charged FLOPs over time.
async fn admin_requests(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    admin(&s, &headers)?;
    let axum::extract::Query(q) = q.map_err(|e| ApiError::Validation(e.body_text()))?;
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
    let t = s.ledger.tenant_by_name(&name)?;
    Ok(Json(json!({
        "tenant": t.name,
        "requests": s.ledger.recent_requests(&t, limit)?,
        "series": {"bucket_s": bucket_s, "points": s.ledger.usage_series(&t, now(), bucket_s, buckets)?},
    }))
    .into_response())
}
