//! From a validated request to a queued job: plan within the tenant's budget, reserve its
//! FLOPs, decode the planned frames, queue; then wait for the result and record what it cost.
//! Every route that runs the engine goes through [`admit`] and [`record`], so the rules of
//! accounting are written once.

use crate::cache::{content_hash, CacheEntry, CacheKey};
use crate::error::ApiError;
use crate::fair_gate::{Place, Refused, Share};
use crate::ledger::{now, Tenant};
use crate::validation::{Media, ValidRequest};
use crate::worker::{Event, Frames, Held, Job, JobVisual};
use crate::AppState;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use vvlm_cost::{FlopBreakdown, FlopCounter};
use vvlm_engine::{Generation, PromptForm, VideoVlm};
use vvlm_planner::{CachedVision, Plan, PlanRequest};
use vvlm_video::{FrameSampling, Preprocess, SampledFrame};

/// A request's id: `req-<replica>-<n>`, unique across replicas. Every answer carries it
/// (`x-request-id`), logs name it, and a reservation is keyed by it in the ledger (so the
/// tenant's request history shows the id its client saw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn new(s: &AppState) -> Self {
        static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // Unique across replicas: the replica's random id, then a counter.
        Self(format!(
            "req-{}-{}",
            s.ledger.lease().owner,
            REQUESTS.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// A request's place among those admitted (decoding, queued or running), taken before its
/// body is read so that an overloaded server answers 429 without parsing, planning or decoding;
/// with the request's id.
#[derive(Clone)]
pub struct AdmissionSlot {
    place: Arc<std::sync::Mutex<Option<Arc<Place>>>>,
    pub id: RequestId,
    /// A batch line's: its job waits in the queue behind every interactive one.
    pub background: bool,
}

impl AdmissionSlot {
    pub fn new(p: Place, id: RequestId) -> Self {
        Self::shared(Some(Arc::new(p)), id)
    }
    fn shared(p: Option<Arc<Place>>, id: RequestId) -> Self {
        Self {
            place: Arc::new(std::sync::Mutex::new(p)),
            id,
            background: false,
        }
    }
    fn take(&self) -> Option<Arc<Place>> {
        self.place.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The slots of a request's `k` prompts (a completions request may send several): they
    /// share this slot's place, given back when the last prompt's job ends, and each has its
    /// own id, `<id>-<i>`, which keys its reservation (the tenant's request history).
    pub fn split(&self, k: usize) -> Vec<AdmissionSlot> {
        let place = self.take();
        (0..k)
            .map(|i| Self {
                background: self.background,
                ..Self::shared(place.clone(), RequestId(format!("{}-{i}", self.id.0)))
            })
            .collect()
    }
}

pub fn overloaded(s: &AppState) -> ApiError {
    ApiError::Overloaded {
        message: format!(
            "the queue is full ({} waiting); retry later",
            s.config.limits.queue_depth
        ),
        retry_after_s: 2,
    }
}

/// The tenant's share of the places: the most requests it may have in flight (its own limit,
/// else the server's default; None: no limit but the server's places) and its weight.
pub fn tenant_share(s: &AppState, t: &Tenant) -> Share {
    Share {
        limit: t
            .max_in_flight
            .map(|m| m as usize)
            .or(Some(s.config.limits.tenant_max_in_flight).filter(|&m| m > 0)),
        weight: tenant_weight(t),
    }
}

/// The tenant's weight (1 unless set).
pub fn tenant_weight(t: &Tenant) -> f64 {
    t.weight.unwrap_or(1.0)
}

/// The 429 for a refused place.
pub fn refusal(s: &AppState, t: &Tenant, refused: Refused) -> ApiError {
    match refused {
        Refused::Full => overloaded(s),
        Refused::TenantLimit { limit } => ApiError::TenantLimit {
            message: format!(
                "tenant `{}` already has {limit} requests in flight, its limit; retry when one finishes",
                t.name
            ),
            retry_after_s: 1,
        },
    }
}

/// Sets the cancel flag when the client goes away (the handler's future is dropped).
pub struct CancelOnDrop(Arc<AtomicBool>, bool);
impl CancelOnDrop {
    /// The request completed: dropping the guard no longer cancels anything.
    pub fn disarm(&mut self) {
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

/// A queued request: its plan, the job's events and what it will report.
pub struct Admitted {
    pub plan: Plan,
    pub events: UnboundedReceiver<Event>,
    pub flops: Arc<FlopCounter>,
    pub guard: CancelOnDrop,
    pub frames: Vec<SampledFrame>,
    pub decode_s: f64,
    pub engine: Arc<VideoVlm>,
    pub n: usize,
    pub cache: CacheUse,
    /// A batch line's job (see [`run_to_completion`]'s time limit).
    pub background: bool,
    /// For the request's `finished` log line: its id, its tenant, when it was admitted.
    pub request_id: String,
    pub tenant: String,
    pub admitted_at: Instant,
}

/// What the video cache supplied to a request.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CacheUse {
    /// The decoded frames came from the cache (no decoding).
    pub frames: bool,
    /// The vision features came from the cache (no tower or projector run).
    pub vision: bool,
}

/// Everything a finished request reports.
pub struct Outcome {
    pub plan: Plan,
    pub generations: Vec<Generation>,
    pub measured: FlopBreakdown,
    pub frames: Vec<SampledFrame>,
    pub decode_s: f64,
    pub notes: Vec<String>,
    pub n: usize,
    pub cache: CacheUse,
}

/// Budget (request's or tenant's default, capped by the tenant's per-request maximum) and the
/// plan for one completion (at budget / n). The prompt is counted with each model's own
/// tokenizer and template.
pub fn plan_for(
    s: &AppState,
    t: &Tenant,
    r: &ValidRequest,
    text_only: bool,
    cached: Cached,
) -> Result<(Plan, f64), ApiError> {
    let planner = s
        .planner()
        .ok_or_else(|| ApiError::NotReady("models are loading".into()))?;
    let (req, budget) = plan_request(s, t, r, text_only, cached)?;
    Ok((planner.plan(&req)?, budget))
}

/// What the cache holds for a request, as the planner prices it.
#[derive(Debug, Default)]
pub struct Cached {
    /// The video's encodings (and their KV prefixes).
    pub vision: Vec<CachedVision>,
    /// Text alone: the cached prompt tokens (its system message's KV) per model.
    pub text_tokens_by_model: BTreeMap<String, usize>,
}

/// What the planner is asked for a request (see [`plan_for`]), and the budget.
pub fn plan_request(
    s: &AppState,
    t: &Tenant,
    r: &ValidRequest,
    text_only: bool,
    cached: Cached,
) -> Result<(PlanRequest, f64), ApiError> {
    let budget = r.budget.unwrap_or(t.default_budget);
    if budget > t.per_request_max {
        return Err(ApiError::invalid(
            "budget",
            format!(
                "budget {budget:.4e} FLOPs exceeds this tenant's per-request maximum of {:.4e} FLOPs",
                t.per_request_max
            ),
        ));
    }
    let mut text_tokens_by_model = BTreeMap::new();
    if !r.prompt.is_empty() || default_caption(r) || matches!(r.form, PromptForm::Tokens(_)) {
        for (name, e) in s.engines() {
            let n = match &r.form {
                PromptForm::Chat => {
                    let prompt = prompt_for(s, r, &name);
                    e.count_prompt_tokens(r.system.as_deref(), &r.history, &prompt)
                }
                PromptForm::Raw => e.tokenize_raw(&r.prompt).map(|ids| ids.len()),
                PromptForm::Tokens(ids) => Ok(ids.len()),
            }
            .map_err(ApiError::from)?;
            text_tokens_by_model.insert(name, n);
        }
    }
    let req = PlanRequest {
        budget_flops: budget / r.n as f64,
        task: r.task.clone(),
        text_tokens: text_tokens_by_model.values().copied().max().unwrap_or(0),
        text_tokens_by_model,
        text_only,
        cached_vision: cached.vision,
        cached_text_tokens_by_model: cached.text_tokens_by_model,
        expected_decode_tokens: r
            .max_tokens
            .unwrap_or(s.config.planner.expected_decode_tokens),
        scored_prompt: r.sampling.prompt_logprobs.is_some(),
        pins: r.pins.clone(),
    };
    Ok((req, budget))
}

/// Whether `r` is a caption request that sent no prompt: it asks the planned checkpoint's
/// caption prompt ([`prompt_for`]).
fn default_caption(r: &ValidRequest) -> bool {
    r.task == "caption" && r.prompt.trim().is_empty() && r.form == PromptForm::Chat
}

/// The prompt `r` sends checkpoint `model`: its own, or for a caption request without one,
/// the checkpoint's `caption_prompt` (its registry entry), else the server's.
pub fn prompt_for(s: &AppState, r: &ValidRequest, model: &str) -> String {
    if !default_caption(r) {
        return r.prompt.clone();
    }
    s.planner()
        .and_then(|p| {
            p.registry()
                .get(model)
                .and_then(|e| e.caption_prompt.clone())
        })
        .unwrap_or_else(|| s.config.caption_prompt.clone())
}

/// Plans, reserves, decodes and queues.
pub async fn admit(
    s: &Arc<AppState>,
    t: &Tenant,
    mut r: ValidRequest,
    slot: Option<AdmissionSlot>,
) -> Result<Admitted, ApiError> {
    if !s.is_ready() {
        return Err(ApiError::NotReady("models are loading".into()));
    }
    let started = Instant::now();
    let text_only = matches!(r.media, Media::None);
    let background = slot.as_ref().is_some_and(|x| x.background);
    // The video's identity for the cache (its bytes' hash), and what the cache has of it.
    let scope = if s.config.cache.shared {
        "*".to_string()
    } else {
        t.name.clone()
    };
    let media = std::mem::take(&mut r.media);
    // A text prompt's cached part is the KV of its system message (and the template's opening
    // of the first user message): keyed by that message, when nothing else comes before that
    // user message (a conversation opening with the assistant's words is not cached).
    let system_first = r
        .history
        .first()
        .is_none_or(|t| t.role == vvlm_engine::template::Role::User);
    // A completion's prompt is prefilled whole (no system message or template before it), so
    // no cached part of it is looked up or priced.
    let uncached = (text_only && !system_first) || r.form.is_raw();
    let (media, content) = if s.config.cache.max_bytes == 0 || uncached {
        (media, None)
    } else if text_only {
        (
            media,
            Some(crate::cache::text_prefix_key(r.system.as_deref())),
        )
    } else {
        let (m, h) = tokio::task::spawn_blocking(move || {
            let h = media_hash(&media);
            (media, h)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("hashing task: {e}")))?;
        (m, Some(h?))
    };
    let cached = match content {
        Some(c) if text_only => Cached {
            text_tokens_by_model: s.cache.cached_text_tokens(&scope, &c),
            ..Cached::default()
        },
        Some(c) => Cached {
            vision: s
                .cache
                .cached_vision(&scope, &c, r.system.as_deref())
                .into_iter()
                // A prefix made after the system message alone: not this prompt's otherwise.
                .map(|v| CachedVision {
                    prefilled_side: v.prefilled_side.filter(|_| system_first),
                    prefix_tokens: v.prefix_tokens.filter(|_| system_first),
                    ..v
                })
                .collect(),
            ..Cached::default()
        },
        None => Cached::default(),
    };
    let (plan, _budget) = plan_for(s, t, &r, text_only, cached)?;
    // A caption request without a prompt asks what the planned checkpoint was trained on.
    r.prompt = prompt_for(s, &r, &plan.choice.model);
    let engine = s
        .engine(&plan.choice.model)
        .ok_or_else(|| ApiError::Internal(format!("model {} is not loaded", plan.choice.model)))?;
    // What the planned checkpoint's tokens cannot write is refused before anything is spent
    // (the token table is made once per checkpoint, off the async threads).
    if r.sampling.response_format != vvlm_engine::ResponseFormat::Text {
        let (e, format) = (engine.clone(), r.sampling.response_format.clone());
        let unwritable = tokio::task::spawn_blocking(move || match format {
            vvlm_engine::ResponseFormat::JsonObject
            | vvlm_engine::ResponseFormat::JsonSchema(_) => (!e.can_write_json()).then(|| {
                (
                    "response_format",
                    "JSON (no token of its vocabulary opens an object)".to_string(),
                )
            }),
            vvlm_engine::ResponseFormat::Choice(choices) => choices
                .into_iter()
                .find(|c| !e.can_write(c))
                .map(|c| ("guided_choice", format!("`{c}` with its tokens"))),
            vvlm_engine::ResponseFormat::Text => None,
        })
        .await
        .map_err(|e| ApiError::Internal(format!("token table task: {e}")))?;
        if let Some((param, what)) = unwritable {
            return Err(ApiError::invalid(
                param,
                format!("{} cannot write {what}", plan.choice.model),
            ));
        }
    }
    let vocab = engine.cfg.text_config.vocab_size;
    if let Some(&(id, _)) = r
        .sampling
        .penalties
        .logit_bias
        .iter()
        .find(|&&(id, _)| id as usize >= vocab)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "token {id} is outside the vocabulary of {} ({vocab} tokens)",
                plan.choice.model
            ),
        ));
    }
    // A place in the queue before any work is spent (reservation, decoding): an overloaded
    // server answers 429 at once, and at most queue_depth + workers requests decode or wait.
    let request_id = slot
        .as_ref()
        .map_or_else(|| RequestId::new(s), |x| x.id.clone())
        .0;
    let admitted_id = request_id.clone();
    let place = match slot.and_then(|x| x.take()) {
        Some(p) => p,
        None => Arc::new(
            s.admission
                .try_acquire(t.id, tenant_share(s, t))
                .map_err(|refused| refusal(s, t, refused))?,
        ),
    };
    // n completions of one plan: reserved n times its price (the video is encoded once, so
    // the measured cost settles lower).
    let reserve = plan.choice.cost_flops * r.n as f64;
    let tenant = t.clone();
    // The plan is kept beside the reservation (a tenant's request history).
    let mut recorded = json!(plan);
    if let Some(o) = recorded.as_object_mut() {
        o.remove("runners_up");
    }
    let leases = s.leases.clone();
    let flops = Arc::new(FlopCounter::new());
    let counter = flops.clone();
    // The reservation is owned (a `Held`) inside the ledger's task: were this request dropped
    // while that task runs (its client gone), the task's result is dropped with it and the
    // `Held` releases the reservation. Owned only once returned here, it was left open, its
    // lease renewed by this replica for as long as it lives, holding the tenant's quota.
    let held = s
        .ledger_call(move |l| {
            let r = leases.hold(&tenant, reserve, &request_id, now())?;
            if let Err(e) = l.record_plan(&r, &recorded) {
                tracing::warn!(request_id, "could not record the plan: {e}");
            }
            Ok(Held::new(leases, r, counter))
        })
        .await?;
    let t0 = Instant::now();
    let key = content.map(|content| CacheKey {
        scope,
        content,
        model: plan.choice.model.clone(),
        frames: plan.choice.frames,
    });
    let hit = key.as_ref().and_then(|k| s.cache.get(k));
    let side = plan.choice.side;
    // The cached KV prefix, if it was made at this plan's pooled side (the engine checks the
    // text before the video and the visual tokens themselves before continuing from it).
    let prefix = hit
        .as_ref()
        .and_then(|e| e.prefix.clone())
        .filter(|p| p.side == side)
        .map(|p| p.kv);
    let (visual, sampled, cache) = match (media, hit) {
        (Media::None, _) => (JobVisual::None, vec![], CacheUse::default()),
        (_, Some(e)) => {
            let sampled = e.sampled.as_ref().clone();
            match e.features {
                Some(f) => (
                    JobVisual::Features(f),
                    sampled,
                    CacheUse {
                        frames: true,
                        vision: true,
                    },
                ),
                None => (
                    JobVisual::Frames(e.frames),
                    sampled,
                    CacheUse {
                        frames: true,
                        vision: false,
                    },
                ),
            }
        }
        (media, None) => {
            let v = decode(s, &engine, media, plan.choice.frames as usize).await?;
            let frames = Arc::new(Frames {
                count: v.frames.len(),
                size: v.size as usize,
                pixels: v.pixels,
            });
            if let Some(k) = &key {
                s.cache.put(
                    k.clone(),
                    CacheEntry {
                        frames: frames.clone(),
                        sampled: Arc::new(v.frames.clone()),
                        features: None,
                        prefix: None,
                    },
                );
            }
            (JobVisual::Frames(frames), v.frames, CacheUse::default())
        }
    };
    let on_features: Option<Box<dyn FnOnce(vvlm_engine::VisionFeatures) + Send>> =
        match (&visual, &key) {
            (JobVisual::Frames(_), Some(k)) => {
                let (c, k) = (s.cache.clone(), k.clone());
                Some(Box::new(move |f| c.add_features(&k, f)))
            }
            _ => None,
        };
    let on_prefix: Option<Box<dyn FnOnce(vvlm_engine::PrefixKv) + Send>> = match key {
        Some(k) => {
            let c = s.cache.clone();
            let system = r.system.clone();
            let text = matches!(visual, JobVisual::None);
            Some(Box::new(move |kv| {
                let prefix = crate::cache::CachedPrefix { side, system, kv };
                if text {
                    c.put_text_prefix(k, prefix)
                } else {
                    c.add_prefix(&k, prefix)
                }
            }))
        }
        _ => None,
    };
    s.metrics.cache_lookup(cache.frames, cache.vision);
    let decode_s = t0.elapsed().as_secs_f64();
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let constrained = match r.sampling.response_format {
        vvlm_engine::ResponseFormat::Text => None,
        vvlm_engine::ResponseFormat::JsonObject => Some("json_object"),
        vvlm_engine::ResponseFormat::JsonSchema(_) => Some("json_schema"),
        vvlm_engine::ResponseFormat::Choice(_) => Some("choice"),
    };
    let job = Job {
        engine: engine.clone(),
        visual,
        on_features,
        prefix,
        on_prefix,
        n: r.n,
        side: plan.choice.side as usize,
        system: r.system,
        history: r.history,
        prompt: r.prompt,
        form: r.form,
        sampling: r.sampling,
        flops: flops.clone(),
        cancel: cancel.clone(),
        background,
        tenant: t.id,
        weight: tenant_weight(t),
        events: tx,
        held: Some(held),
        queued_at: Instant::now(),
        _place: place,
        started: None,
        resume: None,
    };
    s.metrics.queued(1);
    if !s.pool.submit(job) {
        s.metrics.queued(-1);
        return Err(overloaded(s));
    }
    if let Some(format) = constrained {
        s.metrics.constrained(format);
    }
    Ok(Admitted {
        plan,
        events: rx,
        flops,
        guard: CancelOnDrop(cancel, false),
        frames: sampled,
        decode_s,
        engine,
        n: r.n,
        cache,
        background,
        request_id: admitted_id,
        tenant: t.name.clone(),
        admitted_at: started,
    })
}

/// The SHA-256 of the media's bytes (a `file://` video is read for it).
fn media_hash(m: &Media) -> Result<[u8; 32], ApiError> {
    Ok(match m {
        Media::VideoBytes(b) => content_hash([b.as_slice()]),
        Media::Images(v) => content_hash(v.iter().map(|x| x.as_slice())),
        Media::VideoPath(p) => {
            use sha2::Digest;
            let read =
                |e: std::io::Error| ApiError::Internal(format!("reading {}: {e}", p.display()));
            let mut f = std::fs::File::open(p).map_err(read)?;
            let len = f.metadata().map_err(read)?.len();
            // The same hash as the same bytes uploaded: length, then content.
            let mut h = sha2::Sha256::new();
            h.update(len.to_le_bytes());
            std::io::copy(&mut f, &mut h).map_err(read)?;
            h.finalize().into()
        }
        Media::None => [0; 32],
    })
}

/// Decodes exactly the planned number of frames at the tower's resolution, off the runtime.
async fn decode(
    s: &AppState,
    engine: &VideoVlm,
    media: Media,
    frames: usize,
) -> Result<vvlm_video::SampledVideo, ApiError> {
    let pre = Preprocess {
        size: engine.cfg.vision_config.image_size as u32,
        ..Default::default()
    };
    let policy = s.config.media.clone();
    let sampling = FrameSampling::Uniform { frames };
    tokio::task::spawn_blocking(move || match media {
        Media::VideoBytes(b) => vvlm_video::decode_bytes(&b, &sampling, &policy, &pre),
        Media::VideoPath(p) => vvlm_video::decode_path(&p, &sampling, &policy, &pre),
        Media::Images(imgs) => {
            // Still images are the frames; the plan's frame count samples them uniformly.
            let all = vvlm_video::frames_from_images(&imgs, &policy, &pre)?;
            let instants = vvlm_video::sample_timestamps(&sampling, all.frames.len() as f64)?;
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
    .map_err(|e| ApiError::Internal(format!("decoder task: {e}")))?
    .map_err(ApiError::from)
}

/// Records a finished request in the metrics (the worker settled its reservation to the
/// executed FLOPs before it reported) and returns what it measured.
pub fn record(s: &AppState, a: &Admitted, generations: &[Generation]) -> FlopBreakdown {
    let measured = a.flops.snapshot();
    let planned = a.plan.choice.cost_flops * a.n as f64;
    s.metrics.add_flops(planned, &measured);
    let completion_tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
    s.metrics.add_tokens(completion_tokens as u64);
    // What an operator greps for: one line per finished request, its plan and what it ran.
    let first = generations.first();
    tracing::info!(
        request_id = %a.request_id,
        tenant = %a.tenant,
        task = %a.plan.task,
        model = %a.plan.choice.model,
        frames = a.plan.choice.frames,
        tokens_per_frame = a.plan.choice.tokens_per_frame,
        n = a.n,
        prompt_tokens = first.map_or(0, |g| g.prompt_tokens),
        cached_tokens = first.map_or(0, |g| g.cached_tokens),
        completion_tokens,
        finish_reason = first.map_or("none", |g| crate::chat::finish_str(g.finish_reason)),
        planned_flops = planned,
        measured_flops = measured.total(),
        frames_cached = a.cache.frames,
        vision_cached = a.cache.vision,
        batch_line = a.background,
        seconds = (a.admitted_at.elapsed().as_secs_f64() * 1e3).round() / 1e3,
        "finished"
    );
    measured
}

/// Admits a request and waits for all of it.
/// A job's result from its events: `Err` past the time limit, `Ok(None)` if its worker went
/// away. A batch line (`background`) waits in the queue behind interactive requests as long as
/// that takes (its batch's window bounds it): its limit counts from when a worker starts it, so
/// a busy hour does not fail lines that never ran. An interactive request's counts from now.
async fn finished(
    events: &mut UnboundedReceiver<Event>,
    timeout: Duration,
    background: bool,
) -> Result<Option<Result<Vec<Generation>, ApiError>>, tokio::time::error::Elapsed> {
    if background {
        loop {
            match events.recv().await {
                Some(Event::Started) => break,
                Some(Event::Done(r)) => return Ok(Some(r)),
                Some(Event::Text { .. }) => {}
                None => return Ok(None),
            }
        }
    }
    tokio::time::timeout(timeout, async {
        while let Some(ev) = events.recv().await {
            if let Event::Done(r) = ev {
                return Some(r);
            }
        }
        None
    })
    .await
}

pub async fn run_to_completion(
    s: Arc<AppState>,
    t: Tenant,
    r: ValidRequest,
    slot: Option<AdmissionSlot>,
) -> Result<Outcome, ApiError> {
    let mut a = admit(&s, &t, r, slot).await?;
    let timeout = Duration::from_secs_f64(s.config.limits.request_timeout_s);
    let done = finished(&mut a.events, timeout, a.background).await;
    let generations = match done {
        Err(_) => {
            return Err(ApiError::Timeout(format!(
                "the request took longer than {timeout:?}"
            )))
        }
        Ok(None) => return Err(ApiError::Internal("the worker went away".into())),
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(g))) => g,
    };
    a.guard.disarm();
    let measured = record(&s, &a, &generations);
    Ok(Outcome {
        generations,
        measured,
        frames: std::mem::take(&mut a.frames),
        decode_s: a.decode_s,
        notes: a.engine.notes.clone(),
        n: a.n,
        cache: a.cache,
        plan: a.plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job whose worker starts it after twice the time limit and finishes at once.
    async fn late_job(background: bool) -> Result<Option<Result<Vec<Generation>, ApiError>>, ()> {
        let limit = Duration::from_millis(50);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            tokio::time::sleep(limit * 3).await;
            let _ = tx.send(Event::Started);
            let _ = tx.send(Event::Done(Ok(vec![])));
        });
        finished(&mut rx, limit, background).await.map_err(|_| ())
    }

    /// An interactive request's time limit includes its wait in the queue; a batch line's
    /// starts when a worker starts it (the line answers; the request times out).
    #[tokio::test]
    async fn a_batch_lines_time_limit_counts_from_its_start() {
        assert!(late_job(true)
            .await
            .is_ok_and(|r| r.is_some_and(|g| g.is_ok())));
        assert!(late_job(false).await.is_err());
        // Started, then slower than the limit: a line times out too.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Event::Started).unwrap();
        let slow = finished(&mut rx, Duration::from_millis(30), true).await;
        assert!(slow.is_err());
        drop(tx);
        // A worker that goes away before starting it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        drop(tx);
        assert!(matches!(
            finished(&mut rx, Duration::from_secs(1), true).await,
            Ok(None)
        ));
    }
}
