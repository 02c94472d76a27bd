//! Continuous batching: sequences join a running batch (their prompt prefilled as they join),
//! every step advances each sequence by one token, and the sequences that need a forward pass
//! run it together — one batched decode per checkpoint, so the LM's matrix-vector products
//! become small matrix products. Finished, cancelled and failed sequences leave between steps;
//! the others never wait for them. Each sequence's FLOPs are counted in its own counter (a
//! batched product charges each row to the request it belongs to), and its tokens are decided
//! by the same [`Sequence`] code as a sequence run alone, so the outputs are equal. Sequences
//! have a [`Priority`]: background ones (batch lines) yield decode steps to interactive ones,
//! a bounded number advancing beside them in turn. A sequence may leave with its state kept
//! ([`Batch::suspend`]: its KV freed) and come back where it was ([`Batch::rejoin`]).
//!
//! Owns the batch and its steps; must not know requests, queues, tenants or HTTP (callers tag
//! sequences with numbers and route what comes back).

use crate::generate::{GenerateRequest, Generation, SamplingParams, VisionFeatures, VisualInput};
use crate::model::VideoVlm;
use crate::nn::Ctx;
use crate::sequence::{KeptKv, PrefixKv, Sequence, Step, Suspended};
use crate::EngineError;
use candle_core::Tensor;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};

/// A video encoded for a checkpoint at one pooled side: the visual tokens every completion
/// about it shares. Opaque to callers.
#[derive(Clone)]
pub struct VideoTokens {
    pub(crate) tokens: Tensor,
    /// Seconds the tower, projector and pooling took.
    pub vision_s: f64,
}

impl VideoVlm {
    /// Encodes what a request sees (nothing, frames, or cached features) once, for all its
    /// completions: the pooled visual tokens, and the features of frames it encoded (for a
    /// cache). Vision and projector FLOPs are counted in `flops`.
    pub fn encode_visual(
        &self,
        visual: VisualInput<'_>,
        side: usize,
        flops: &FlopCounter,
        cancel: Option<&AtomicBool>,
    ) -> Result<(Option<VideoTokens>, Option<VisionFeatures>), EngineError> {
        let on_cpu = self.lm.device().is_cpu();
        if on_cpu {
            crate::cpu_pool::run(|| self.encode_visual_between(visual, side, flops, cancel, None))
        } else {
            self.encode_visual_between(visual, side, flops, cancel, None)
        }
    }

    /// [`Self::encode_visual`]; with `(quantum, between)`, frames are encoded as
    /// [`Self::projected_frames_stepping`] encodes them.
    fn encode_visual_between(
        &self,
        visual: VisualInput<'_>,
        side: usize,
        flops: &FlopCounter,
        cancel: Option<&AtomicBool>,
        between: Option<(std::time::Duration, &mut dyn FnMut())>,
    ) -> Result<(Option<VideoTokens>, Option<VisionFeatures>), EngineError> {
        let t0 = Instant::now();
        let mut ctx = Ctx::new(flops, Component::LmPrefill).with_cancel(cancel);
        let (projected, fresh) = match visual {
            VisualInput::None => return Ok((None, None)),
            VisualInput::Frames(f) => {
                let want = f.frames * 3 * f.size * f.size;
                if f.pixels.len() != want || f.frames == 0 {
                    return Err(EngineError::Request(format!(
                        "frames: {} values for {} frames of {}x{} (want {want})",
                        f.pixels.len(),
                        f.frames,
                        f.size,
                        f.size
                    )));
                }
                self.check_side(side)?;
                let pixels = Tensor::from_slice(
                    f.pixels,
                    (f.frames, 3, f.size, f.size),
                    &candle_core::Device::Cpu,
                )?;
                let p = match between {
                    Some((quantum, between)) => {
                        self.projected_frames_stepping(&pixels, &mut ctx, quantum, between)?
                    }
                    None => self.projected_frames(&pixels, &mut ctx)?,
                };
                (p.clone(), Some(self.features(p)))
            }
            VisualInput::Features(f) => (self.features_tensor(f)?, None),
        };
        let tokens = self.video_tokens(&projected, side, &mut ctx)?;
        Ok((
            Some(VideoTokens {
                tokens,
                vision_s: t0.elapsed().as_secs_f64(),
            }),
            fresh,
        ))
    }
}

impl VideoTokens {
    /// The visual tokens `[frames · side² (+1 newline), hidden]` (the LM's input embeddings).
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }
}

/// How a sequence's decode steps are scheduled beside the others' (see
/// [`Batch::set_background_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Advances at every step (an interactive request).
    #[default]
    Interactive,
    /// Yields to interactive sequences: while one is in the batch, only the batch's background
    /// rows advance each step, taken in turn (least recently advanced first); the others wait
    /// with their KV kept (a batch line, which has hours, not milliseconds).
    Background,
}

/// One sequence to add to a batch.
pub struct Join {
    pub vlm: Arc<VideoVlm>,
    pub system: Option<String>,
    /// The conversation's earlier messages (see [`GenerateRequest::history`]).
    pub history: Vec<crate::template::Turn>,
    pub prompt: String,
    /// How the prompt is read (see [`GenerateRequest::form`]).
    pub form: crate::generate::PromptForm,
    pub sampling: SamplingParams,
    /// Where its FLOPs are counted (shared by the completions of one request).
    pub flops: Arc<FlopCounter>,
    /// Set to stop it; it leaves at the next step.
    pub cancel: Arc<AtomicBool>,
    pub priority: Priority,
}

struct Active {
    tag: u64,
    vlm: Arc<VideoVlm>,
    seq: Sequence,
    flops: Arc<FlopCounter>,
    cancel: Arc<AtomicBool>,
    /// Tokens of context it may reach (prompt + max_tokens): what it holds of the KV budget.
    reserve: usize,
    priority: Priority,
    /// The step it last advanced at (or joined at): background sequences take turns by it.
    advanced_at: u64,
}

/// How long a joining video's encoding runs between two decode steps of the batch at most,
/// give or take one tower layer of [`VideoVlm::frames_per_pass`] frames (see
/// [`Batch::encode_stepping`]).
pub const DEFAULT_ENCODE_QUANTUM: std::time::Duration = std::time::Duration::from_millis(50);

/// Step sizes a batch holds for [`Batch::take_step_sizes`] at most.
pub const MAX_STEP_SIZES: usize = 1 << 16;

/// Steps a background sequence waits at most while interactive ones run
/// ([`Batch::set_background_max_wait`]).
pub const DEFAULT_BACKGROUND_MAX_WAIT: u64 = 64;

/// The running batch.
pub struct Batch {
    active: Vec<Active>,
    encode_quantum: std::time::Duration,
    steps: u64,
    /// Sequences in each step since [`Batch::take_step_sizes`] last took them.
    step_sizes: Vec<usize>,
    /// Background sequences that advance in a step beside interactive ones.
    background_rows: usize,
    /// Steps a background sequence waits at most (then it advances beside the rows anyway).
    background_max_wait: u64,
    /// Steps background sequences waited since [`Batch::take_deferred`] last took them.
    deferred: u64,
    /// An interactive request is being encoded or prefilled to join: the steps taken meanwhile
    /// count it as in the batch.
    interactive_joining: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            active: vec![],
            encode_quantum: DEFAULT_ENCODE_QUANTUM,
            steps: 0,
            step_sizes: vec![],
            background_rows: usize::MAX,
            background_max_wait: DEFAULT_BACKGROUND_MAX_WAIT,
            deferred: 0,
            interactive_joining: false,
        }
    }
}

impl Batch {
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Steps taken so far (each [`Self::step`], and each one run while a sequence joins).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The number of sequences in each step taken since the last call (those run while a
    /// sequence joined included), oldest first: what a caller's batch-size metric observes.
    /// At most the newest [`MAX_STEP_SIZES`] are held.
    pub fn take_step_sizes(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.step_sizes)
    }

    /// Sets how long a joining video's encoding may run between two decode steps (default
    /// [`DEFAULT_ENCODE_QUANTUM`]; zero: a step at every tower layer).
    pub fn set_encode_quantum(&mut self, quantum: std::time::Duration) {
        self.encode_quantum = quantum;
    }

    /// How many [`Priority::Background`] sequences advance in a step while an interactive
    /// sequence is in the batch (default: all of them, no priority). Fewer keep interactive
    /// time per token near what those sequences alone would take, at the background ones'
    /// expense; they advance in turn, so none waits more than `ceil(background / rows)` steps,
    /// and all of them step again once no interactive sequence is left. With 0 they wait
    /// until then, or [`Self::set_background_max_wait`] steps at most.
    pub fn set_background_rows(&mut self, rows: usize) {
        self.background_rows = rows;
    }

    /// Steps a background sequence waits at most beside interactive ones (default
    /// [`DEFAULT_BACKGROUND_MAX_WAIT`], at least 1): one that has waited this long advances in
    /// the next step whatever the rows, so under unbroken interactive traffic (or with 0 rows)
    /// a started background request still progresses instead of running into its time limit
    /// with its work lost.
    pub fn set_background_max_wait(&mut self, steps: u64) {
        self.background_max_wait = steps.max(1);
    }

    /// Sequence-steps that background sequences waited for their turn (one per sequence per
    /// step it did not advance) since the last call.
    pub fn take_deferred(&mut self) -> u64 {
        std::mem::take(&mut self.deferred)
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// KV positions the batch may reach (each sequence's prompt plus its max_tokens).
    pub fn reserved_tokens(&self) -> usize {
        self.active.iter().map(|a| a.reserve).sum()
    }

    /// Takes a sequence out of the batch with its KV freed and its decoding state kept, for
    /// [`Self::rejoin`] (a caller making room for another that means to continue it later).
    /// None when no sequence has that tag.
    pub fn suspend(&mut self, tag: u64) -> Option<Suspended> {
        self.take(tag).map(Sequence::suspend)
    }

    /// Removes the sequence with that tag.
    fn take(&mut self, tag: u64) -> Option<Sequence> {
        let i = self.active.iter().position(|a| a.tag == tag)?;
        Some(self.active.remove(i).seq)
    }

    /// [`Self::suspend`] keeping the sequence's KV cache with it ([`Sequence::park`]): the
    /// caller holds the [`KeptKv`], counts its memory and may free it; [`Self::rejoin`] then
    /// continues at once, recomputing nothing, unless it was freed.
    pub fn park(&mut self, tag: u64) -> Option<(Suspended, KeptKv)> {
        self.take(tag).map(Sequence::park)
    }

    /// A sequence's KV positions: those it may reach (its reservation) and those its cache is
    /// allocated for. None when no sequence has that tag.
    pub fn positions_of(&self, tag: u64) -> Option<(usize, usize)> {
        let a = self.active.iter().find(|a| a.tag == tag)?;
        Some((a.reserve, a.seq.cache.capacity()))
    }

    /// The sequences of one priority in the batch and the KV positions they may reach.
    pub fn held_by(&self, priority: Priority) -> (usize, usize) {
        self.active
            .iter()
            .filter(|a| a.priority == priority)
            .fold((0, 0), |(n, kv), a| (n + 1, kv + a.reserve))
    }

    /// KV positions the batch's caches are allocated for: its reservation, each cache being
    /// allocated once at its sequence's (see [`crate::llama::KvCache::plan_positions`]).
    pub fn allocated_tokens(&self) -> usize {
        self.active.iter().map(|a| a.seq.cache.capacity()).sum()
    }

    /// Prefills a sequence and adds it. With a video, the prompt's part up to the video continues
    /// from `prefix` when it matches (see [`VideoVlm::start_sequence`]); otherwise that part is
    /// prefilled and returned, for the caller to pass to the next sequence about the same video
    /// and to keep. Errors (a bad prompt, cancellation during prefill) are the caller's; nothing
    /// is added then.
    pub fn join(
        &mut self,
        tag: u64,
        j: Join,
        video: Option<&VideoTokens>,
        prefix: Option<&PrefixKv>,
    ) -> Result<Option<PrefixKv>, EngineError> {
        self.join_inner(tag, j, video, prefix, None, None)
    }

    /// [`Self::join`] with chunked prefill: between two chunks of the joining sequence's
    /// prefill, the sequences already in the batch take a decode step (streamed through
    /// `on_text`, as [`Self::step`]), so a long prompt does not stall them. Sequences that leave
    /// meanwhile are appended to `left`.
    pub fn join_stepping(
        &mut self,
        tag: u64,
        j: Join,
        video: Option<&VideoTokens>,
        prefix: Option<&PrefixKv>,
        on_text: &mut (dyn FnMut(u64, &str) -> bool + Send),
        left: &mut Vec<(u64, Result<Generation, EngineError>)>,
    ) -> Result<Option<PrefixKv>, EngineError> {
        self.join_inner(tag, j, video, prefix, Some((on_text, left)), None)
    }

    /// [`Self::join_stepping`] for a sequence [`Self::suspend`] took out: `j`, `video` and
    /// `prefix` as it was first joined with; it continues where it was
    /// ([`VideoVlm::resume_sequence`]), its prompt's prefill and the rebuilding of its
    /// generated tokens' KV counted in `recompute` (not in `j.flops`, where what it ran before
    /// is counted already).
    #[allow(clippy::too_many_arguments)]
    pub fn rejoin(
        &mut self,
        tag: u64,
        j: Join,
        suspended: Suspended,
        recompute: &FlopCounter,
        video: Option<&VideoTokens>,
        prefix: Option<&PrefixKv>,
        on_text: &mut (dyn FnMut(u64, &str) -> bool + Send),
        left: &mut Vec<(u64, Result<Generation, EngineError>)>,
    ) -> Result<Option<PrefixKv>, EngineError> {
        self.join_inner(
            tag,
            j,
            video,
            prefix,
            Some((on_text, left)),
            Some((suspended, recompute)),
        )
    }

    /// [`VideoVlm::encode_visual`] for a request about to join: on the CPU, while the batch has
    /// sequences, its frames are encoded in passes of [`VideoVlm::frames_per_pass`] and the
    /// sequences take a decode step (streamed through `on_text`, as [`Self::step`]) at the first
    /// tower layer or pass boundary after each encode quantum ([`Self::set_encode_quantum`]), and
    /// one after the encoding, so a joining video does not stall their streams for its whole
    /// encoding, nor for its end and its prompt's first prefill chunk together. The result
    /// equals `encode_visual`'s (frames are encoded independently, a pause changes no
    /// arithmetic). Sequences that leave meanwhile are appended to `left`. The steps taken for
    /// an interactive request's video treat it as in the batch already
    /// ([`Self::set_background_rows`]).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn encode_stepping(
        &mut self,
        vlm: &VideoVlm,
        visual: VisualInput<'_>,
        side: usize,
        flops: &FlopCounter,
        cancel: Option<&AtomicBool>,
        priority: Priority,
        on_text: &mut (dyn FnMut(u64, &str) -> bool + Send),
        left: &mut Vec<(u64, Result<Generation, EngineError>)>,
    ) -> Result<(Option<VideoTokens>, Option<VisionFeatures>), EngineError> {
        if self.active.is_empty() || !vlm.lm.device().is_cpu() {
            // Nothing waits (or a GPU, where a video's encoding is milliseconds): one pass.
            return vlm.encode_visual(visual, side, flops, cancel);
        }
        self.interactive_joining = priority == Priority::Interactive;
        let frames = matches!(visual, VisualInput::Frames(_));
        let quantum = self.encode_quantum;
        let encoded = crate::cpu_pool::run(|| {
            let mut between = || {
                if !self.active.is_empty() {
                    left.extend(self.step_here(on_text));
                }
            };
            let encoded = vlm.encode_visual_between(
                visual,
                side,
                flops,
                cancel,
                Some((quantum, &mut between)),
            )?;
            if frames {
                // And one before the joining prompt's prefill starts.
                between();
            }
            Ok(encoded)
        });
        self.interactive_joining = false;
        encoded
    }

    /// Joins a sequence; with `stepping`, the others take decode steps between its prefill's
    /// chunks; with `resume`, it continues a suspended one (its recomputation counted there).
    #[allow(clippy::type_complexity)]
    fn join_inner(
        &mut self,
        tag: u64,
        j: Join,
        video: Option<&VideoTokens>,
        prefix: Option<&PrefixKv>,
        mut stepping: Option<(
            &mut (dyn FnMut(u64, &str) -> bool + Send),
            &mut Vec<(u64, Result<Generation, EngineError>)>,
        )>,
        resume: Option<(Suspended, &FlopCounter)>,
    ) -> Result<Option<PrefixKv>, EngineError> {
        let req = GenerateRequest {
            pixels: None,
            side: 1,
            system: j.system.as_deref(),
            prompt: &j.prompt,
            history: &j.history,
            form: &j.form,
            sampling: j.sampling.clone(),
            cancel: Some(&j.cancel),
        };
        let vision_s = video.map_or(0.0, |v| v.vision_s);
        let tokens = video.map(|v| &v.tokens);
        let vlm = j.vlm.clone();
        let on_cpu = vlm.lm.device().is_cpu();
        // The steps between its prefill chunks count an interactive sequence as in the batch.
        self.interactive_joining = j.priority == Priority::Interactive;
        let mut between = || {
            if let Some((on_text, left)) = stepping.as_mut() {
                if !self.active.is_empty() {
                    left.extend(self.step_here(*on_text));
                }
            }
        };
        let start = || match resume {
            Some((suspended, recompute)) => vlm.resume_sequence(
                tokens,
                vision_s,
                &req,
                recompute,
                prefix,
                &mut between,
                suspended,
            ),
            None => vlm.start_sequence(tokens, vision_s, &req, &j.flops, prefix, &mut between),
        };
        let started = if on_cpu {
            crate::cpu_pool::run(start)
        } else {
            start()
        };
        self.interactive_joining = false;
        let (seq, made) = started.map_err(|e| cancelled(e, &j.cancel))?;
        let reserve = seq.context_len() + j.sampling.max_tokens;
        self.active.push(Active {
            tag,
            vlm,
            seq,
            flops: j.flops,
            cancel: j.cancel,
            reserve,
            priority: j.priority,
            advanced_at: self.steps,
        });
        Ok(made)
    }

    /// One step: each sequence chooses its next token (streamed through `on_text(tag, piece)`,
    /// which returns false to cancel that sequence), then those that continue run one batched
    /// forward pass per checkpoint. Returns the sequences that left, with their result.
    pub fn step(
        &mut self,
        on_text: &mut (dyn FnMut(u64, &str) -> bool + Send),
    ) -> Vec<(u64, Result<Generation, EngineError>)> {
        let run = |batch: &mut Self, on_text: &mut (dyn FnMut(u64, &str) -> bool + Send)| {
            batch.step_here(on_text)
        };
        let on_cpu = self
            .active
            .first()
            .is_none_or(|a| a.vlm.lm.device().is_cpu());
        if on_cpu {
            crate::cpu_pool::run(|| run(self, on_text))
        } else {
            run(self, on_text)
        }
    }

    /// Which sequences advance in the next step: all of them, unless an interactive one is
    /// in the batch and more background ones than [`Self::set_background_rows`] allows; then
    /// those that advanced least recently, and any that waited
    /// [`Self::set_background_max_wait`] steps.
    fn advancing(&self) -> Vec<bool> {
        let mut go = vec![true; self.active.len()];
        let interactive = self.interactive_joining
            || self
                .active
                .iter()
                .any(|a| a.priority == Priority::Interactive && !a.cancel.load(Ordering::Relaxed));
        let mut background: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].priority == Priority::Background)
            .collect();
        if interactive && background.len() > self.background_rows {
            background.sort_by_key(|&i| (self.active[i].advanced_at, i));
            for &i in &background[self.background_rows..] {
                // `steps` is the step about to run; it last advanced in step `advanced_at`
                // (or joined after it), and has waited the steps between.
                let waited = self.steps.saturating_sub(self.active[i].advanced_at + 1);
                go[i] = waited >= self.background_max_wait;
            }
        }
        go
    }

    fn step_here(
        &mut self,
        on_text: &mut (dyn FnMut(u64, &str) -> bool + Send),
    ) -> Vec<(u64, Result<Generation, EngineError>)> {
        self.steps += 1;
        if self.step_sizes.len() >= MAX_STEP_SIZES {
            // Nobody is taking them: keep the newest (bounded memory for any caller).
            self.step_sizes.drain(..MAX_STEP_SIZES / 2);
        }
        let go = self.advancing();
        let advancing = go.iter().filter(|g| **g).count();
        self.step_sizes.push(advancing);
        self.deferred += (go.len() - advancing) as u64;
        let mut left = vec![];
        let mut forward: Vec<(usize, u32)> = vec![];
        let mut keep = Vec::with_capacity(self.active.len());
        // Sampled sequences draw their tokens in parallel first (a draw over a 49152-token
        // vocabulary is ~0.1 ms; greedy ones are a 3 µs pass, not worth the fork).
        let costly: Vec<&mut Active> = self
            .active
            .iter_mut()
            .zip(&go)
            .filter(|(a, go)| **go && a.seq.choice_is_costly() && !a.cancel.load(Ordering::Relaxed))
            .map(|(a, _)| a)
            .collect();
        if costly.len() > 1 {
            costly.into_par_iter().for_each(|a| a.seq.choose());
        }
        for (mut a, go) in std::mem::take(&mut self.active).into_iter().zip(go) {
            let tag = a.tag;
            if a.cancel.load(Ordering::Relaxed) {
                left.push((tag, Err(EngineError::Cancelled)));
                continue;
            }
            if !go {
                // Its turn comes later (a background sequence beside interactive ones).
                keep.push(a);
                continue;
            }
            a.advanced_at = self.steps;
            let mut each = |piece: &str| on_text(tag, piece);
            match a.seq.advance(&a.vlm, &mut each) {
                Ok(Step::Forward(t)) => {
                    forward.push((keep.len(), t));
                    keep.push(a);
                }
                Ok(Step::Done) => {
                    let vlm = a.vlm.clone();
                    left.push((tag, a.seq.finish(&vlm, &mut each)));
                }
                Err(e) => left.push((tag, Err(e))),
            }
        }
        self.active = keep;
        // One forward per checkpoint over its continuing sequences.
        let mut failed: Vec<(usize, String)> = vec![];
        let mut groups: Vec<Vec<(usize, u32)>> = vec![];
        for (idx, tok) in forward {
            let vlm = &self.active[idx].vlm;
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(&self.active[g[0].0].vlm, vlm))
            {
                Some(g) => g.push((idx, tok)),
                None => groups.push(vec![(idx, tok)]),
            }
        }
        for g in groups {
            if let Err(e) = self.forward_group(&g) {
                failed.extend(g.iter().map(|(i, _)| (*i, e.to_string())));
            }
        }
        if !failed.is_empty() {
            let mut active = std::mem::take(&mut self.active)
                .into_iter()
                .enumerate()
                .collect::<Vec<_>>();
            active.retain(|(i, a)| match failed.iter().find(|(f, _)| f == i) {
                Some((_, msg)) => {
                    left.push((a.tag, Err(EngineError::Request(format!("decode: {msg}")))));
                    false
                }
                None => true,
            });
            self.active = active.into_iter().map(|(_, a)| a).collect();
        }
        left
    }

    fn forward_group(&mut self, g: &[(usize, u32)]) -> Result<(), EngineError> {
        let vlm = self.active[g[0].0].vlm.clone();
        let ids: Vec<u32> = g.iter().map(|(_, t)| *t).collect();
        // Token embeddings [B, 1, h].
        let embeds = vlm.lm.embed(&ids)?.transpose(0, 1)?.contiguous()?;
        let flops: Vec<Arc<FlopCounter>> = g
            .iter()
            .map(|(i, _)| self.active[*i].flops.clone())
            .collect();
        let ctxs: Vec<Ctx> = flops
            .iter()
            .map(|f| Ctx::new(f, Component::LmDecode))
            .collect();
        // Disjoint mutable borrows of the group's caches, in the group's order.
        let order: Vec<usize> = g.iter().map(|(i, _)| *i).collect();
        let mut caches: Vec<(usize, &mut crate::llama::KvCache)> = self
            .active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| order.contains(i))
            .map(|(i, a)| (i, &mut a.seq.cache))
            .collect();
        caches.sort_by_key(|(i, _)| order.iter().position(|o| o == i));
        let mut refs: Vec<&mut crate::llama::KvCache> =
            caches.into_iter().map(|(_, c)| c).collect();
        let logits = vlm.lm.decode_batch(&embeds, &mut refs, &ctxs)?;
        drop(refs);
        // The step's logits read in place on the CPU (a greedy sequence chooses from its row
        // and keeps no copy), from one copy on a GPU: candle's `to_vec1` of one row copies the
        // whole `[b, vocab]` storage, b times a step (2 GB a step at 64 sequences of a 128k
        // vocabulary: an H200's time per token grew from 5.9 ms at 8 to 147 ms at 64).
        crate::llama::for_each_row(&logits, |r, row| {
            self.active[order[r]].seq.accept_logits_row(row)
        })?;
        Ok(())
    }
}

fn cancelled(e: EngineError, cancel: &AtomicBool) -> EngineError {
    match e {
        EngineError::Candle(c)
            if cancel.load(Ordering::Relaxed) && c.to_string().contains(crate::nn::CANCELLED) =>
        {
            EngineError::Cancelled
        }
        other => other,
    }
}
