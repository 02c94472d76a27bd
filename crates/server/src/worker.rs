//! The bounded queue and the inference worker pool. Requests beyond the queue's depth are refused
//! (429), never buffered without bound; a worker notices a cancelled request between tokens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use vvlm_cost::FlopCounter;
use vvlm_engine::{
    FrameData, GenerateRequest, Generation, SamplingParams, VideoVlm, VisionFeatures, VisualInput,
};

use crate::error::ApiError;
use crate::ledger::{now, Ledger, Reservation};

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
/// releases it.
pub struct Held {
    ledger: Arc<dyn Ledger>,
    r: Option<Reservation>,
    flops: Arc<FlopCounter>,
}

impl Held {
    pub fn new(ledger: Arc<dyn Ledger>, r: Reservation, flops: Arc<FlopCounter>) -> Self {
        Self {
            ledger,
            r: Some(r),
            flops,
        }
    }

    /// Settles to what was executed (released if nothing was).
    pub fn close(&mut self) {
        let Some(r) = self.r.take() else { return };
        let measured = self.flops.snapshot().total();
        let result = if measured > 0.0 {
            if measured > r.flops {
                tracing::warn!(
                    reservation = r.id,
                    reserved = r.flops,
                    measured,
                    "measured FLOPs exceed the reservation; charged the reservation"
                );
            }
            self.ledger.settle(&r, measured, now())
        } else {
            self.ledger.release(&r, now())
        };
        if let Err(e) = result {
            tracing::error!("closing reservation {}: {e}", r.id);
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
                    ledger: self.ledger.clone(),
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
    /// Completions to generate from the one encoded video.
    pub n: usize,
    pub side: usize,
    pub system: Option<String>,
    pub prompt: String,
    pub sampling: SamplingParams,
    pub flops: Arc<FlopCounter>,
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
    /// The request's reservation (None in tests that run the engine alone).
    pub held: Option<Held>,
    /// When the job was queued (for queue time, time to first token and end to end).
    pub queued_at: std::time::Instant,
    /// The request's place in the admission limit, freed when the job ends.
    pub _permit: tokio::sync::OwnedSemaphorePermit,
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
    tx: SyncSender<Job>,
    pub workers: usize,
}

impl Pool {
    /// `workers` threads, each running its jobs on its own CPU pool of `threads` threads (so
    /// workers never share or oversubscribe each other's cores).
    pub fn start(
        workers: usize,
        threads: usize,
        depth: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(depth);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("vvlm-worker-{i}"))
                .spawn(move || {
                    vvlm_engine::cpu_pool::use_own_pool(threads, &format!("vvlm-worker-{i}"));
                    worker_loop(rx, metrics)
                })
                .expect("spawn worker thread");
        }
        Self { tx, workers }
    }

    /// Queues a job; false when the queue is full (the job is dropped, its events closed).
    pub fn submit(&self, job: Job) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

fn worker_loop(rx: Arc<Mutex<Receiver<Job>>>, metrics: Arc<crate::metrics::Metrics>) {
    loop {
        let mut job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            match guard.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        metrics.queued(-1);
        if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
            if let Some(h) = job.held.as_mut() {
                h.close();
            }
            let _ = job.events.send(Event::Done(Err(ApiError::Internal(
                "cancelled before it started".into(),
            ))));
            continue;
        }
        metrics.running(1);
        let queue_s = job.queued_at.elapsed().as_secs_f64();
        let _ = job.events.send(Event::Started);
        let mut first_text = None;
        let on_features = job.on_features.take();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&job, &mut first_text)));
        let result = match result {
            Ok(Ok((generations, features))) => {
                if let (Some(f), Some(keep)) = (features, on_features) {
                    keep(f);
                }
                Ok(generations)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::Internal(
                "the engine panicked on this request".into(),
            )),
        };
        metrics.running(-1);
        if let Ok(generations) = &result {
            let per_token: Vec<f64> = generations
                .iter()
                .filter(|g| g.token_ids.len() > 1)
                .map(|g| g.timings.decode_s / (g.token_ids.len() - 1) as f64)
                .collect();
            let first = first_text
                .map(|t: std::time::Instant| t.duration_since(job.queued_at).as_secs_f64());
            metrics.observe_request(
                queue_s,
                first,
                &per_token,
                job.queued_at.elapsed().as_secs_f64(),
            );
        }
        if let Some(h) = job.held.as_mut() {
            h.close();
        }
        let _ = job.events.send(Event::Done(result));
    }
}

/// Engine errors stay typed to the edge: a bad request the engine finds is a 4xx there.
fn run(
    job: &Job,
    first_text: &mut Option<std::time::Instant>,
) -> Result<(Vec<Generation>, Option<VisionFeatures>), ApiError> {
    let visual = match &job.visual {
        JobVisual::None => VisualInput::None,
        JobVisual::Frames(f) => VisualInput::Frames(FrameData {
            pixels: &f.pixels,
            frames: f.count,
            size: f.size,
        }),
        JobVisual::Features(f) => VisualInput::Features(f),
    };
    let req = GenerateRequest {
        pixels: None,
        side: job.side,
        system: job.system.as_deref(),
        prompt: &job.prompt,
        sampling: job.sampling.clone(),
        cancel: Some(&job.cancel),
    };
    let events = job.events.clone();
    let cancel = job.cancel.clone();
    job.engine
        .generate_visual(visual, &req, job.n, &job.flops, &mut |index, piece| {
            if cancel.load(Ordering::Relaxed) || events.is_closed() {
                return false;
            }
            first_text.get_or_insert_with(std::time::Instant::now);
            events
                .send(Event::Text {
                    index,
                    piece: piece.to_string(),
                })
                .is_ok()
        })
        .map_err(ApiError::from)
}
