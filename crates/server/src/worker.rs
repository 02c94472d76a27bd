//! The queue and the inference workers. The queue is ordered fairly between tenants
//! ([`JobQueue`]) and bounded by the admission places (every admitted request fits in it).
//! (429), never buffered without bound. Each worker runs a continuous batch (the engine's
//! [`Batch`]): requests join it between decode steps while it has room, each request's `n`
//! completions are sequences sharing one encoding of its video, and a request leaves when its
//! last sequence finishes (settled to the FLOPs it ran, its text streamed as it is decided). A
//! cancelled request's sequences leave at the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use vvlm_cost::FlopCounter;
use vvlm_engine::batch::{Batch, Join, Priority};
use vvlm_engine::{
    EngineError, FrameData, Generation, KeptKv, PrefixKv, PromptForm, SamplingParams, Suspended,
    VideoVlm, VisionFeatures, VisualInput,
};

use crate::error::ApiError;
use crate::job_queue::{JobQueue, Started};
use crate::ledger::{now, Leases, Reservation};

/// What a worker reports back.
#[derive(Debug)]
pub enum Event {
    Started,
    /// New text of completion `index`.
    Text {
        index: usize,
        piece: String,
    },
    /// Every completion, or the request's error.
    Done(Result<Vec<Generation>, ApiError>),
}

/// A reservation carried by its job. The worker settles it to the FLOPs the job executed
/// before it reports the result, so a client that leaves, times out or is cancelled is still
/// charged for the work done (capped at the reservation by the ledger); a job that never ran
/// releases it. Its lease is renewed until then; a settlement the database cannot take goes
/// to the journal.
pub struct Held {
    leases: Arc<Leases>,
    r: Option<Reservation>,
    flops: Arc<FlopCounter>,
}

impl Held {
    pub fn new(leases: Arc<Leases>, r: Reservation, flops: Arc<FlopCounter>) -> Self {
        Self {
            leases,
            r: Some(r),
            flops,
        }
    }

    /// Settles to what was executed (released if nothing was).
    pub fn close(&mut self) {
        let Some(r) = self.r.take() else { return };
        let measured = self.flops.snapshot().total();
        if measured > r.flops {
            tracing::warn!(
                request_id = %r.request_id,
                reserved = r.flops,
                measured,
                "measured FLOPs exceed the reservation; charged the reservation"
            );
        }
        if let Err(e) = self.leases.close(&r, measured, now()) {
            tracing::error!("closing reservation {}: {e}", r.request_id);
        }
    }
}

impl Drop for Held {
    /// A reservation dropped on the async runtime (a request refused after it reserved: bad
    /// video, full queue) is closed on a blocking thread; elsewhere (workers) here.
    fn drop(&mut self) {
        if self.r.is_none() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let mut rest = Held {
                    leases: self.leases.clone(),
                    r: self.r.take(),
                    flops: self.flops.clone(),
                };
                rt.spawn_blocking(move || rest.close());
            }
            Err(_) => self.close(),
        }
    }
}

/// One inference job.
pub struct Job {
    pub engine: Arc<VideoVlm>,
    /// What the request sees.
    pub visual: JobVisual,
    /// Receives the features of frames the job encoded (for the video cache).
    pub on_features: Option<Box<dyn FnOnce(VisionFeatures) + Send>>,
    /// The KV of the prompt up to the video, from the cache (used when it matches).
    pub prefix: Option<PrefixKv>,
    /// Receives the KV prefix the job prefilled (for the cache).
    pub on_prefix: Option<Box<dyn FnOnce(PrefixKv) + Send>>,
    /// Completions to generate from the one encoded video.
    pub n: usize,
    pub side: usize,
    pub system: Option<String>,
    /// A chat's earlier messages, in order.
    pub history: Vec<vvlm_engine::template::Turn>,
    pub prompt: String,
    /// How the prompt is read: a chat message, or a completion's text or token ids.
    pub form: PromptForm,
    pub sampling: SamplingParams,
    pub flops: Arc<FlopCounter>,
    pub cancel: Arc<AtomicBool>,
    /// A batch line's job: queued after interactive ones, joins one per decode step, holds at
    /// most [`BatchLimits::background_share`] of a batch, and its sequences yield decode steps
    /// to interactive ones ([`Priority::Background`]).
    pub background: bool,
    /// Its tenant and weight in the queue (where a job that does not fit yet is put back).
    pub tenant: i64,
    pub weight: f64,
    pub events: UnboundedSender<Event>,
    /// The request's reservation (None in tests that run the engine alone).
    pub held: Option<Held>,
    /// When the job was queued (for queue time, time to first token and end to end).
    pub queued_at: std::time::Instant,
    /// The request's place among those admitted, freed when its last job ends (the prompts of
    /// one completions request share it).
    pub _place: Arc<crate::fair_gate::Place>,
    /// Set when a worker takes the job: counted against its tenant in the queue's order until
    /// the job ends.
    pub started: Option<Started>,
    /// A preempted batch line's progress (None for a job never started).
    pub resume: Option<Resumption>,
}

/// What a batch line taken out of a worker's batch keeps while it waits in the queue to run
/// again: its finished completions, and the decoding state of the others (with their KV when
/// the worker's KV budget had room for it, else without), so it continues where it was instead
/// of from the start.
pub struct Resumption {
    generations: Vec<Option<Generation>>,
    suspended: Vec<Option<Suspended>>,
}

/// What a job sees: text alone, decoded frames, or a cached encoding of them.
pub enum JobVisual {
    None,
    Frames(Arc<Frames>),
    Features(Arc<VisionFeatures>),
}

/// Frames as the video crate decodes them.
pub struct Frames {
    pub pixels: Vec<f32>,
    pub count: usize,
    pub size: usize,
}

pub struct Pool {
    queue: JobQueue<Job>,
    pub workers: usize,
}

/// How much each worker's batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences decoded together (a request with `n` completions is `n` sequences).
    pub max_sequences: usize,
    /// KV positions (each sequence's prompt plus its max_tokens) beyond which new requests
    /// wait in the queue.
    pub max_tokens: usize,
    /// Requests admitted between two decode steps while the batch runs (0: all that fit).
    pub joins_per_step: usize,
    /// How long a joining video's encoding runs before the batch takes a decode step.
    pub encode_quantum: std::time::Duration,
    /// Background (batch line) sequences that advance in a step beside interactive ones
    /// ([`Batch::set_background_rows`]).
    pub background_rows: usize,
    /// The fraction of `max_sequences` and `max_tokens` background jobs may hold in a running
    /// batch; the rest stays free for interactive requests.
    pub background_share: f64,
}

impl Pool {
    /// `workers` threads, each running a continuous batch on its own CPU pool of `threads`
    /// threads (so workers never share or oversubscribe each other's cores).
    pub fn start(
        workers: usize,
        threads: usize,
        limits: BatchLimits,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let queue = JobQueue::new();
        for i in 0..workers {
            let queue = queue.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("vvlm-worker-{i}"))
                .spawn(move || {
                    vvlm_engine::cpu_pool::use_own_pool(threads, &format!("vvlm-worker-{i}"));
                    Worker {
                        queue,
                        metrics,
                        limits,
                        batch: new_batch(&limits),
                        running: HashMap::new(),
                        next_id: 0,
                        waiting: None,
                        parked: Vec::new(),
                    }
                    .run()
                })
                .expect("spawn worker thread");
        }
        Self { queue, workers }
    }

    /// Queues a job for its tenant at its weight (a `background` one, a batch line, after
    /// every interactive one queued); false once the pool is shutting down (the job is
    /// dropped, its events closed).
    pub fn submit(&self, job: Job) -> bool {
        self.queue
            .push_as(job.tenant, job.weight, job.background, job)
    }

    /// Jobs queued, not yet taken by a worker.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

impl Drop for Pool {
    /// The workers finish what they hold and stop.
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// An empty batch as the limits configure it.
fn new_batch(limits: &BatchLimits) -> Batch {
    let mut b = Batch::default();
    b.set_encode_quantum(limits.encode_quantum);
    b.set_background_rows(limits.background_rows);
    b
}

/// Completions per request at most (tags hold the index in their low byte).
const TAG_BITS: u32 = 8;

/// Streams a piece of a running request's text to its client; false cancels that sequence.
fn stream(running: &mut HashMap<u64, Running>, tag: u64, piece: &str) -> bool {
    let Some(r) = running.get_mut(&(tag >> TAG_BITS)) else {
        return false;
    };
    if r.job.cancel.load(Ordering::Relaxed) || r.job.events.is_closed() {
        return false;
    }
    r.first_text.get_or_insert_with(std::time::Instant::now);
    r.job
        .events
        .send(Event::Text {
            index: (tag & ((1 << TAG_BITS) - 1)) as usize,
            piece: piece.to_string(),
        })
        .is_ok()
}

/// A request whose sequences are in the batch.
struct Running {
    job: Job,
    generations: Vec<Option<Generation>>,
    left: usize,
    error: Option<ApiError>,
    features: Option<VisionFeatures>,
    /// The KV prefix this job prefilled (kept in the cache if it succeeds).
    prefix: Option<PrefixKv>,
    queue_s: f64,
    first_text: Option<std::time::Instant>,
}

struct Worker {
    queue: JobQueue<Job>,
    metrics: Arc<crate::metrics::Metrics>,
    limits: BatchLimits,
    batch: Batch,
    running: HashMap<u64, Running>,
    next_id: u64,
    /// A request taken from the queue that did not fit the batch yet.
    waiting: Option<Job>,
    /// The KV caches of batch lines this worker preempted, kept with them while they wait in
    /// the queue (counted against `max_tokens` until they resume, here or on another worker;
    /// freed, oldest first, when an interactive request needs the room).
    parked: Vec<KeptKv>,
}

impl Worker {
    fn run(mut self) {
        let mut shown = (0i64, 0i64);
        loop {
            let now = (self.batch.len() as i64, self.batch.reserved_tokens() as i64);
            self.metrics.batch_changed(now.0 - shown.0, now.1 - shown.1);
            shown = now;
            let admitted = self.admit();
            self.observe_steps();
            if !admitted {
                return;
            }
            if self.batch.is_empty() {
                continue;
            }
            let running = &mut self.running;
            let batch = &mut self.batch;
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                batch.step(&mut |tag, piece| stream(running, tag, piece))
            }));
            match stepped {
                Ok(left) => {
                    for (tag, result) in left {
                        self.sequence_left(tag, result.map_err(ApiError::from));
                    }
                }
                Err(_) => self.fail_batch(),
            }
            self.observe_steps();
        }
    }

    /// Every decode step's size into the metrics, those run while requests joined included.
    fn observe_steps(&mut self) {
        for size in self.batch.take_step_sizes() {
            self.metrics.decode_step(size);
        }
        self.metrics
            .decode_steps_deferred(self.batch.take_deferred());
    }

    /// Takes requests into the batch while it has room, at most `joins_per_step` of them once
    /// it runs (so its sequences take a decode step between two such joins), and at most one
    /// batch line while it runs (an interactive request arriving waits for one line's prefill
    /// at most, not for a burst of them); blocks for one when the worker is idle. A batch line
    /// that does not fit yet goes back to the queue (an interactive request behind it is not
    /// held up). False when the queue is closed and nothing runs.
    fn admit(&mut self) -> bool {
        let mut joined = 0;
        // After a batch line joined or went back, only interactive jobs until the next step.
        let mut interactive_only = false;
        loop {
            let job = match self.waiting.take() {
                Some(j) => j,
                None => {
                    // Idle: wait for a request; busy: never wait for the queue.
                    let idle = self.batch.is_empty() && self.running.is_empty();
                    let taken = if interactive_only && !self.batch.is_empty() {
                        self.queue.take_interactive()
                    } else {
                        self.queue.take(idle)
                    };
                    match taken {
                        Some((mut j, started)) => {
                            j.started = Some(started);
                            j
                        }
                        None if idle => return false,
                        None => return true,
                    }
                }
            };
            if !self.fits(&job) {
                if job.background {
                    self.put_back(job);
                    interactive_only = true;
                    continue;
                }
                if !self.preempt_for(&job) {
                    self.waiting = Some(job);
                    return true;
                }
            }
            interactive_only |= job.background;
            self.start(job);
            joined += 1;
            if !self.batch.is_empty() && joined == self.limits.joins_per_step {
                // A decode step before the next join (`joins_per_step`): the first joiners
                // stream while the rest of a burst is prefilled.
                return true;
            }
        }
    }

    /// Whether a job may join the running batch now: any job when it is empty; else while it
    /// has room, and a batch line only within the share of it batch lines may hold
    /// ([`BatchLimits::background_share`]), so interactive requests always find the rest.
    /// The KV kept by lines this worker preempted counts as held (a job's own, about to come
    /// back, excepted when this worker parked it).
    fn fits(&self, j: &Job) -> bool {
        let l = &self.limits;
        if self.batch.is_empty() {
            return true;
        }
        let own = |k: &KeptKv| {
            j.resume
                .as_ref()
                .is_some_and(|r| r.suspended.iter().flatten().any(|s| k.is_of(s)))
        };
        let parked: usize = self
            .parked
            .iter()
            .filter(|k| !own(k))
            .map(KeptKv::positions)
            .sum();
        let room = self.batch.len() + j.n <= l.max_sequences
            && self.batch.reserved_tokens() + parked < l.max_tokens;
        if !j.background {
            return room;
        }
        let (sequences, tokens) = self.batch.held_by(Priority::Background);
        let share = l.background_share.clamp(0.0, 1.0);
        let max_sequences = ((l.max_sequences as f64 * share).floor() as usize).max(1);
        room && sequences + j.n <= max_sequences
            && ((tokens + parked) as f64) < l.max_tokens as f64 * share
    }

    /// KV positions held by the caches of lines this worker preempted that have not resumed.
    fn parked_positions(&self) -> usize {
        self.parked.iter().map(KeptKv::positions).sum()
    }

    /// Makes room for an interactive job that does not fit: first frees the KV kept by lines
    /// preempted before (oldest first; they will rebuild it), then takes batch lines out of the
    /// batch, the most recently started first, when that makes room (else nothing is taken):
    /// each goes back to the head of its tenant's lines in the queue with its progress
    /// ([`Resumption`]) and continues where it was when it runs again (its reservation is
    /// kept, and it is charged what it costs alone). True when the job fits now.
    fn preempt_for(&mut self, job: &Job) -> bool {
        self.parked.retain(|k| k.positions() > 0);
        // While memory is what is short (not places).
        while self.batch.reserved_tokens() + self.parked_positions() >= self.limits.max_tokens
            && !self.parked.is_empty()
        {
            if self.parked.remove(0).release() > 0 {
                self.metrics.batch_parked_kv_released();
            }
        }
        if self.fits(job) {
            return true;
        }
        let l = &self.limits;
        let (lines, kv) = self.batch.held_by(Priority::Background);
        let room_without_lines = self.batch.len() - lines + job.n <= l.max_sequences
            && self.batch.reserved_tokens() - kv < l.max_tokens;
        if lines == 0 || !room_without_lines {
            return false;
        }
        let mut victims: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| r.job.background)
            .map(|(id, _)| *id)
            .collect();
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for id in victims {
            if self.fits(job) {
                break;
            }
            self.preempt(id);
        }
        self.fits(job)
    }

    /// Takes a running batch line out of the batch, its sequences suspended, and puts it back in
    /// the queue to continue later. Their KV caches go with it while the worker's KV budget has
    /// room for them beside what the batch reserves (the line then continues at once, recomputing
    /// nothing, like vLLM's swap preemption without the copy; a preemption for a place, not for
    /// memory, usually has that room), else they are freed (rebuilt when it continues).
    fn preempt(&mut self, id: u64) {
        let Some(mut r) = self.running.remove(&id) else {
            return;
        };
        let tags: Vec<u64> = (0..r.generations.len())
            .map(|i| (id << TAG_BITS) | i as u64)
            .collect();
        let (reserved, allocated) = tags
            .iter()
            .filter_map(|&t| self.batch.positions_of(t))
            .fold((0, 0), |(r, a), (rt, at)| (r + rt, a + at));
        let keep = self.batch.reserved_tokens() - reserved + self.parked_positions() + allocated
            < self.limits.max_tokens;
        let suspended = tags
            .iter()
            .map(|&tag| {
                if keep {
                    let (s, owner) = self.batch.park(tag)?;
                    self.parked.push(owner);
                    Some(s)
                } else {
                    self.batch.suspend(tag)
                }
            })
            .collect();
        // What the line computed before leaving that does not depend on its place in the
        // batch is kept for when it continues, so its video is not encoded nor its prefix
        // prefilled again: the video's features (instead of its frames) and the KV prefix it
        // made. (Held while the line waits: at most one line's worth per preempted line, and
        // lines are at most `worker_share` of a worker's places.) They go to the caches now,
        // as at a finish: they are complete whatever becomes of the line.
        if let Some(f) = r.features.take() {
            if let Some(keep) = r.job.on_features.take() {
                keep(f.clone());
            }
            r.job.visual = JobVisual::Features(Arc::new(f));
        }
        if let Some(p) = r.prefix.take() {
            if let Some(keep) = r.job.on_prefix.take() {
                keep(p.clone());
            }
            r.job.prefix = Some(p);
        }
        r.job.resume = Some(Resumption {
            generations: r.generations,
            suspended,
        });
        self.metrics.running(-1);
        self.metrics.queued(1);
        self.metrics.batch_line_preempted();
        tracing::debug!(line = id, "batch line preempted for an interactive request");
        self.put_back(r.job);
    }

    /// Returns a batch line that does not fit yet to the head of its tenant's lines in the
    /// queue (its start ticket dropped: it counts as queued again).
    fn put_back(&mut self, mut job: Job) {
        job.started = None;
        let (tenant, weight) = (job.tenant, job.weight);
        if let Err(job) = self.queue.put_back(tenant, weight, true, job) {
            // Shutting down: dropped unstarted (its reservation released, its route told).
            self.metrics.queued(-1);
            drop(job);
        }
    }

    /// Encodes a request's visual input once and joins its `n` sequences to the batch.
    fn start(&mut self, mut job: Job) {
        self.metrics.queued(-1);
        if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
            if let Some(h) = job.held.as_mut() {
                h.close();
            }
            let _ = job.events.send(Event::Done(Err(ApiError::Internal(
                "cancelled before it started".into(),
            ))));
            return;
        }
        self.metrics.running(1);
        let queue_s = job.queued_at.elapsed().as_secs_f64();
        let _ = job.events.send(Event::Started);
        let id = self.next_id;
        self.next_id += 1;
        let n = job.n.clamp(1, 1 << TAG_BITS);
        // A preempted batch line continues: its finished completions are kept, the others
        // rejoin where they were; what that recomputes (the video's encoding when it is not
        // cached, the prompt's prefill, the generated tokens' KV) is the server's cost, counted
        // here and not charged (the line is charged what it costs alone).
        let (generations, mut suspended) = match job.resume.take() {
            Some(Resumption {
                generations,
                suspended,
            }) if generations.len() == n && suspended.len() == n => (generations, suspended),
            other => {
                if other.is_some() {
                    // Not this job's shape (never expected): it starts over, counted afresh.
                    job.flops.reset();
                }
                (vec![None; n], (0..n).map(|_| None).collect())
            }
        };
        let resuming = suspended.iter().any(Option::is_some);
        // Sequences that kept their KV cache continue at once (taken out of the reach of the
        // worker that parked it first, so it cannot be freed meanwhile); when all did, the
        // line needs neither its video's encoding nor any prefill.
        let mut all_kept = resuming;
        for s in suspended.iter_mut().flatten() {
            all_kept &= s.claim_kept();
        }
        let recompute = FlopCounter::new();
        let mut r = Running {
            generations,
            left: 0,
            error: None,
            features: None,
            prefix: None,
            queue_s,
            first_text: None,
            job,
        };
        // Sequences of other requests that finish while this one's video is encoded or its
        // prompt prefilled (their decode steps run between its frames' passes and its prefill
        // chunks).
        let mut others_left = vec![];
        let encoded = if all_kept {
            Ok(Ok((None, None)))
        } else {
            let j = &r.job;
            let (batch, running) = (&mut self.batch, &mut self.running);
            let visual = match &j.visual {
                JobVisual::None => VisualInput::None,
                JobVisual::Frames(f) => VisualInput::Frames(FrameData {
                    pixels: &f.pixels,
                    frames: f.count,
                    size: f.size,
                }),
                JobVisual::Features(f) => VisualInput::Features(f),
            };
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                batch.encode_stepping(
                    &j.engine,
                    visual,
                    j.side,
                    if resuming { &recompute } else { &j.flops },
                    Some(&j.cancel),
                    if j.background {
                        Priority::Background
                    } else {
                        Priority::Interactive
                    },
                    &mut |tag, piece| stream(running, tag, piece),
                    &mut others_left,
                )
            }))
        };
        let tokens = match encoded {
            Ok(Ok((tokens, features))) => {
                r.features = features;
                tokens
            }
            Ok(Err(e)) => {
                r.error = Some(ApiError::from(e));
                self.finish(r);
                self.others_left(others_left);
                return;
            }
            Err(_) => {
                // A panic may have been in another sequence's step between two passes: the
                // batch's state is unknown, so every request in it fails, this one too.
                r.error = Some(ApiError::Internal("the engine panicked".into()));
                self.finish(r);
                self.others_left(others_left);
                self.fail_batch();
                return;
            }
        };
        // The completions continue from the cached prefix, or the first one prefills it for
        // the others (and the cache).
        let mut prefix = r.job.prefix.clone();
        for (i, resume) in suspended.iter_mut().enumerate() {
            if r.generations[i].is_some() {
                // Finished before the line was preempted.
                continue;
            }
            let mut sampling = r.job.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(i as u64);
            let join = Join {
                vlm: r.job.engine.clone(),
                system: r.job.system.clone(),
                prompt: r.job.prompt.clone(),
                history: r.job.history.clone(),
                form: r.job.form.clone(),
                sampling,
                flops: r.job.flops.clone(),
                cancel: r.job.cancel.clone(),
                priority: if r.job.background {
                    Priority::Background
                } else {
                    Priority::Interactive
                },
            };
            let (batch, running) = (&mut self.batch, &mut self.running);
            let tag = (id << TAG_BITS) | i as u64;
            let resume = resume.take();
            let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let on_text = &mut |tag, piece: &str| stream(running, tag, piece);
                match resume {
                    Some(s) => batch.rejoin(
                        tag,
                        join,
                        s,
                        &recompute,
                        tokens.as_ref(),
                        prefix.as_ref(),
                        on_text,
                        &mut others_left,
                    ),
                    None => batch.join_stepping(
                        tag,
                        join,
                        tokens.as_ref(),
                        prefix.as_ref(),
                        on_text,
                        &mut others_left,
                    ),
                }
            }));
            let Ok(joined) = joined else {
                // A panic may have been in another sequence's step between prefill chunks:
                // the batch's state is unknown, so every request in it fails, this one too.
                r.error = Some(ApiError::Internal("the engine panicked".into()));
                self.finish(r);
                self.others_left(others_left);
                self.fail_batch();
                return;
            };
            match joined {
                Ok(made) => {
                    r.left += 1;
                    if let Some(p) = made {
                        prefix = Some(p.clone());
                        r.prefix = Some(p);
                    }
                }
                Err(e) => {
                    // The completions already joined stop at the next step.
                    r.job.cancel.store(true, Ordering::Relaxed);
                    r.error.get_or_insert(ApiError::from(e));
                    break;
                }
            }
        }
        if resuming {
            self.metrics
                .batch_line_resumed(recompute.snapshot().total(), all_kept);
        }
        if r.left == 0 {
            self.finish(r);
        } else {
            self.running.insert(id, r);
        }
        self.others_left(others_left);
    }

    /// Sequences of other requests that left while a request joined.
    fn others_left(&mut self, left: Vec<(u64, Result<Generation, EngineError>)>) {
        for (tag, result) in left {
            self.sequence_left(tag, result.map_err(ApiError::from));
        }
    }

    /// After a panic the batch's state is unknown: every request in it fails.
    fn fail_batch(&mut self) {
        self.batch = new_batch(&self.limits);
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            if let Some(mut r) = self.running.remove(&id) {
                r.error = Some(ApiError::Internal(
                    "the engine panicked on this batch".into(),
                ));
                self.finish(r);
            }
        }
    }

    fn sequence_left(&mut self, tag: u64, result: Result<Generation, ApiError>) {
        let id = tag >> TAG_BITS;
        let index = (tag & ((1 << TAG_BITS) - 1)) as usize;
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        r.left -= 1;
        match result {
            Ok(g) => r.generations[index] = Some(g),
            Err(e) => {
                r.job.cancel.store(true, Ordering::Relaxed);
                r.error.get_or_insert(e);
            }
        }
        if r.left == 0 {
            let r = self.running.remove(&id).expect("present above");
            self.finish(r);
        }
    }

    /// Settles the request's reservation to what it ran, keeps its features for the cache,
    /// records its latency, and reports.
    fn finish(&mut self, mut r: Running) {
        if let Some(h) = r.job.held.as_mut() {
            h.close();
        }
        self.metrics.running(-1);
        let result = match r.error.take() {
            Some(e) => Err(e),
            None => {
                let generations: Vec<Generation> = r.generations.into_iter().flatten().collect();
                if r.job.on_prefix.is_some() || r.job.prefix.is_some() || r.prefix.is_some() {
                    // A request whose video could use the KV prefix cache.
                    let hit = generations.first().is_some_and(|g| g.cached_tokens > 0);
                    self.metrics.prefix_lookup(hit);
                }
                if let (Some(f), Some(keep)) = (r.features.take(), r.job.on_features.take()) {
                    keep(f);
                }
                if let (Some(p), Some(keep)) = (r.prefix.take(), r.job.on_prefix.take()) {
                    keep(p);
                }
                let per_token: Vec<f64> = generations
                    .iter()
                    .filter(|g| g.token_ids.len() > 1)
                    .map(|g| g.timings.decode_s / (g.token_ids.len() - 1) as f64)
                    .collect();
                let first = r
                    .first_text
                    .map(|t| t.duration_since(r.job.queued_at).as_secs_f64());
                self.metrics.observe_request(
                    r.queue_s,
                    first,
                    &per_token,
                    r.job.queued_at.elapsed().as_secs_f64(),
                );
                Ok(generations)
            }
        };
        let _ = r.job.events.send(Event::Done(result));
    }
}
