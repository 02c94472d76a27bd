//! One generating sequence as a state machine: prefill once, then alternately choose the next
//! token from the last logits ([`Sequence::advance`]: sampling, stop tokens and strings,
//! log-probabilities, incremental detokenisation, streaming) and feed it through the LM, one
//! sequence at a time ([`VideoVlm::generate`]) or several in one batched forward pass
//! ([`crate::batch`]). The same code decides every token either way, so batched and
//! one-at-a-time outputs are equal.

use crate::generate::{
    logprobs_at, sample, FinishReason, GenerateRequest, Generation, PromptToken, Rng,
    SamplingParams, StepLogprobs, Timings, TokenLogprob, MAX_TOP_LOGPROBS,
};
use crate::llama::KvCache;
use crate::model::VideoVlm;
use crate::nn::Ctx;
use crate::EngineError;
use candle_core::Tensor;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};

/// The KV of a prompt's part up to and including the video ([system + user prefix + visual
/// tokens]) for one checkpoint and one video encoding: a follow-up question about the same video
/// continues from it and prefills only its own tokens. For a text prompt, the KV of [system +
/// the template's opening of the first user message]: requests sharing a system prompt continue
/// from it. Immutable and cheap to clone; sequences
/// continuing from it never write into it.
#[derive(Clone)]
pub struct PrefixKv(Arc<PrefixInner>);

struct PrefixInner {
    /// The text tokens before the video.
    ids: Vec<u32>,
    visual_tokens: usize,
    /// A fingerprint of the visual tokens' values (a different video, checkpoint or pooling
    /// never matches).
    visual_hash: u64,
    cache: KvCache,
}

impl PrefixKv {
    /// Positions it holds (text before the video plus visual tokens).
    pub fn tokens(&self) -> usize {
        self.0.ids.len() + self.0.visual_tokens
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.0.cache.bytes()
    }

    fn matches(&self, ids: &[u32], visual_tokens: usize, visual_hash: u64) -> bool {
        self.0.ids == ids
            && self.0.visual_tokens == visual_tokens
            && self.0.visual_hash == visual_hash
    }
}

/// A fingerprint of a tensor's values.
fn fingerprint(t: &Tensor) -> Result<u64, EngineError> {
    use std::hash::Hasher;
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_usize(v.len());
    for x in v {
        h.write_u32(x.to_bits());
    }
    Ok(h.finish())
}

/// What a sequence needs after choosing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Feed this token through the LM, then call [`Sequence::accept_logits`].
    Forward(u32),
    /// Finished: call [`Sequence::finish`].
    Done,
}

/// A sequence between steps: its KV cache, the last logits and the decoding state.
pub struct Sequence {
    pub cache: KvCache,
    logits: Vec<f32>,
    sampling: SamplingParams,
    rng: Rng,
    stop_ids: Vec<u32>,
    /// The prompt's text tokens, kept only when a penalty reads them.
    prompt_ids: Vec<u32>,
    /// JSON mode, a JSON Schema or a choice: what the output is held to, and where it stands.
    constraint: Option<crate::constraint::OutputConstraint>,
    ids: Vec<u32>,
    emitted: String,
    prefix_offset: usize,
    read_offset: usize,
    pending: String,
    stopped_by_string: bool,
    decode_steps: usize,
    logprobs: Vec<StepLogprobs>,
    prompt_logprobs: Vec<PromptToken>,
    timings: Timings,
    decode_started: Option<Instant>,
    prompt_tokens: usize,
    /// Prompt tokens whose KV came from a [`PrefixKv`] (not prefilled here).
    cached_tokens: usize,
    text_tokens: usize,
    visual_tokens: usize,
    finish: Option<FinishReason>,
    /// The next token, drawn ahead of [`Sequence::advance`] by [`Sequence::choose`].
    chosen: Option<Choice>,
}

/// A drawn token and, when asked for, its log-probability and the most likely alternatives.
struct Choice {
    token: u32,
    logprobs: Option<(f64, Vec<(u32, f64)>)>,
}

impl VideoVlm {
    /// Prefills the prompt around the visual tokens (`video`, already pooled) and returns the
    /// sequence ready for its first [`Sequence::advance`].
    ///
    /// The prompt is prefilled in two parts: [text before the video + visual tokens (if any)],
    /// then the text after it (the question; for a text prompt the first part is the system
    /// message and the template's opening). The first part's KV is what `prefix` may already
    /// hold (same text before the video, same visual tokens): then only the rest is prefilled,
    /// and counted. Otherwise the first part is prefilled and returned as a new [`PrefixKv`]
    /// for the caller to keep. Both ways run the rest's prefill on the same KV values, so a
    /// follow-up answers exactly as it would cold.
    pub fn start_sequence(
        &self,
        video: Option<&Tensor>,
        vision_s: f64,
        req: &GenerateRequest,
        flops: &FlopCounter,
        prefix_kv: Option<&PrefixKv>,
        between_chunks: &mut dyn FnMut(),
    ) -> Result<(Sequence, Option<PrefixKv>), EngineError> {
        // Checked before any work is spent.
        let constraint = self.output_constraint(&req.sampling.response_format)?;
        let (prefix, suffix) = match self.completion_prompt_ids(req.form, req.prompt)? {
            Some(ids) => (vec![], ids),
            None => {
                let prompt = self
                    .template
                    .render_conversation(req.system, req.history, req.prompt);
                (
                    self.tokenize(&prompt.before_video)?,
                    self.tokenize(&prompt.after_video)?,
                )
            }
        };
        let mut ctx = Ctx::new(flops, Component::LmPrefill).with_cancel(req.cancel);
        let visual_tokens = video.map(|v| v.dim(0)).transpose()?.unwrap_or(0);
        let prompt_tokens = prefix.len() + visual_tokens + suffix.len();
        // Every position the sequence may reach (what a batch reserves for it): its cache is
        // allocated once at that size, never copied to grow mid-batch.
        let positions = prompt_tokens + req.sampling.max_tokens;
        let t1 = Instant::now();
        let mut made = None;
        let mut cached_tokens = 0;
        // A prompt is prefilled in two parts, the text up to the video (its visual tokens
        // included) and the rest, whenever both are there: a text prompt too, whose first part
        // is the system message and the template's opening, so that requests sharing a system
        // prompt can continue from its cached KV exactly as they would prefill it cold.
        let split = !suffix.is_empty() && (video.is_some() || !prefix.is_empty());
        // A completion prompt's log-probabilities, when asked: from every prefill chunk's logits.
        let mut prompt_logprobs = vec![];
        let (cache, hidden) = match video {
            v if split => {
                let hash = v.map(fingerprint).transpose()?.unwrap_or(0);
                let mut cache = match prefix_kv.filter(|p| p.matches(&prefix, visual_tokens, hash))
                {
                    Some(p) => {
                        cached_tokens = p.tokens();
                        let mut cache = KvCache::continue_from(&p.0.cache);
                        cache.plan_positions(positions);
                        cache
                    }
                    None => {
                        let mut cache = self.lm.new_cache();
                        cache.plan_positions(positions);
                        let first = self.input_embeddings(&prefix, v, &[])?;
                        self.prefill(
                            &first,
                            &mut cache,
                            &mut ctx,
                            between_chunks,
                            &mut |_, _, _| Ok(()),
                        )?;
                        between_chunks();
                        made = Some(PrefixKv(Arc::new(PrefixInner {
                            ids: prefix.clone(),
                            visual_tokens,
                            visual_hash: hash,
                            cache: cache.snapshot()?,
                        })));
                        cache
                    }
                };
                let rest = self.input_embeddings(&[], None, &suffix)?;
                let hidden = self.prefill(
                    &rest,
                    &mut cache,
                    &mut ctx,
                    between_chunks,
                    &mut |_, _, _| Ok(()),
                )?;
                (cache, hidden)
            }
            _ => {
                let embeds = self.input_embeddings(&prefix, video, &suffix)?;
                let mut cache = self.lm.new_cache();
                cache.plan_positions(positions);
                let scored = match req.sampling.prompt_logprobs {
                    Some(k) if req.form.is_raw() => Some(k.min(MAX_TOP_LOGPROBS)),
                    _ => None,
                };
                let mut on_chunk = |start: usize, hidden: &Tensor, ctx: &Ctx| match scored {
                    Some(k) => self.score_prompt_chunk(
                        &suffix,
                        start,
                        hidden,
                        k,
                        ctx,
                        &mut prompt_logprobs,
                    ),
                    None => Ok(()),
                };
                let hidden =
                    self.prefill(&embeds, &mut cache, &mut ctx, between_chunks, &mut on_chunk)?;
                (cache, hidden)
            }
        };
        let logits = self.lm.last_logits(&hidden, &ctx)?.to_vec1::<f32>()?;
        let seq = Sequence {
            cache,
            logits,
            rng: Rng(req.sampling.seed ^ 0x5EED),
            stop_ids: self.stop_ids(&req.sampling.stop_token_ids),
            prompt_ids: if req.sampling.penalties.uses_prompt() {
                prefix.iter().chain(&suffix).copied().collect()
            } else {
                vec![]
            },
            constraint,
            sampling: req.sampling.clone(),
            ids: vec![],
            emitted: String::new(),
            prefix_offset: 0,
            read_offset: 0,
            pending: String::new(),
            stopped_by_string: false,
            decode_steps: 0,
            logprobs: vec![],
            prompt_logprobs,
            timings: Timings {
                vision_s,
                prefill_s: t1.elapsed().as_secs_f64(),
                decode_s: 0.0,
            },
            decode_started: None,
            prompt_tokens,
            cached_tokens,
            text_tokens: prefix.len() + suffix.len(),
            visual_tokens,
            finish: None,
            chosen: None,
        };
        Ok((seq, made))
    }

    /// Continues a [`Suspended`] sequence. Parked with its KV cache ([`Sequence::park`]) and not
    /// released since: takes the cache back and recomputes nothing (the prompt is not read).
    /// Otherwise: prefills its prompt again (`req`, `video` and
    /// `prefix_kv` as [`Self::start_sequence`] takes them: the request it was started from) and
    /// rebuilds the KV of the tokens it had generated ([`crate::llama::Llama::replay`]); the
    /// rest of its state is kept, so it goes on as if it had never left (on the CPU, bit for
    /// bit: the same token ids, text, draws and log-probabilities). The recomputation is
    /// counted in `flops` (not the request's: what the sequence costs is what it ran before
    /// leaving and what it runs after). An error if the prompt is not the one it was started
    /// from.
    #[allow(clippy::too_many_arguments)]
    pub fn resume_sequence(
        &self,
        video: Option<&Tensor>,
        vision_s: f64,
        req: &GenerateRequest,
        flops: &FlopCounter,
        prefix_kv: Option<&PrefixKv>,
        between_chunks: &mut dyn FnMut(),
        suspended: Suspended,
    ) -> Result<(Sequence, Option<PrefixKv>), EngineError> {
        let Suspended { mut seq, fed, kept } = suspended;
        if let Some(cache) = kept.and_then(|k| take_kept(&k)) {
            // Parked with its cache: nothing to recompute.
            seq.cache = cache;
            return Ok((seq, None));
        }
        let (fresh, made) =
            self.start_sequence(video, vision_s, req, flops, prefix_kv, between_chunks)?;
        if fresh.prompt_tokens != seq.prompt_tokens || fed > seq.ids.len() {
            return Err(EngineError::Request(format!(
                "resume: a prompt of {} positions for a sequence started from {} ({} of its {} \
                 tokens cached)",
                fresh.prompt_tokens,
                seq.prompt_tokens,
                fed,
                seq.ids.len()
            )));
        }
        let mut cache = fresh.cache;
        self.lm
            .replay(&seq.ids[..fed], &mut cache, flops, req.cancel)?;
        seq.cache = cache;
        Ok((seq, made))
    }

    /// What `format` holds a sequence's output to (None: any text); a schema outside the
    /// subset is a request error.
    fn output_constraint(
        &self,
        format: &crate::generate::ResponseFormat,
    ) -> Result<Option<crate::constraint::OutputConstraint>, EngineError> {
        use crate::constraint::{ChoiceConstraint, OutputConstraint};
        use crate::generate::ResponseFormat;
        Ok(match format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(OutputConstraint::Json(
                crate::json_mode::JsonConstraint::new(self.token_bytes()),
            )),
            ResponseFormat::JsonSchema(schema) => Some(OutputConstraint::Schema(Box::new(
                crate::json_schema::SchemaConstraint::new(
                    self.compiled_schema(schema)?,
                    self.token_bytes(),
                ),
            ))),
            ResponseFormat::Choice(choices) => Some(OutputConstraint::Choice(
                ChoiceConstraint::new(choices, self.token_bytes()),
            )),
        })
    }

    /// `schema` compiled, from the checkpoint's recent schemas when it was sent before (with
    /// the masks its states have met); a schema outside the subset is a request error.
    pub fn compiled_schema(
        &self,
        schema: &serde_json::Value,
    ) -> Result<std::sync::Arc<crate::json_schema::Schema>, EngineError> {
        let key = schema.to_string();
        let lock = || self.schemas.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut kept = lock();
            if let Some(i) = kept.iter().position(|(k, _)| *k == key) {
                let hit = kept.remove(i);
                let compiled = hit.1.clone();
                kept.push(hit);
                return Ok(compiled);
            }
        }
        let compiled = std::sync::Arc::new(
            crate::json_schema::Schema::compile(schema)
                .map_err(|e| EngineError::Request(e.to_string()))?,
        );
        let mut kept = lock();
        // (Compiled meanwhile by another request: that one, with whatever masks it has.)
        if let Some((_, other)) = kept.iter().find(|(k, _)| *k == key) {
            return Ok(other.clone());
        }
        if kept.len() >= crate::json_schema::SCHEMAS_KEPT {
            kept.remove(0);
        }
        kept.push((key, compiled.clone()));
        Ok(compiled)
    }

    /// Prefills `embeds` (`[1, n, h]`) in chunks of [`Self::prefill_chunk`] positions, calling
    /// `between_chunks` between two chunks; returns the last chunk's hidden states. The chunks
    /// are fixed by the prompt and the checkpoint alone (not by what else runs), so a sequence
    /// prefills the same way alone and in a batch.
    /// `on_chunk(start, hidden, ctx)` sees each chunk's hidden states (`[1, len, h]`, positions
    /// `start..start + len` of `embeds`) as they are made.
    fn prefill(
        &self,
        embeds: &Tensor,
        cache: &mut crate::llama::KvCache,
        ctx: &mut Ctx,
        between_chunks: &mut dyn FnMut(),
        on_chunk: &mut dyn FnMut(usize, &Tensor, &Ctx) -> Result<(), EngineError>,
    ) -> Result<Tensor, EngineError> {
        let n = embeds.dim(1)?;
        let chunk = if self.prefill_chunk == 0 {
            n
        } else {
            self.prefill_chunk
        };
        let mut start = 0;
        loop {
            let len = chunk.min(n - start);
            let part = if len == n {
                embeds.clone()
            } else {
                embeds.narrow(1, start, len)?.contiguous()?
            };
            let hidden = self.lm.forward_hidden(&part, cache, ctx)?;
            on_chunk(start, &hidden, ctx)?;
            start += len;
            if start >= n {
                return Ok(hidden);
            }
            between_chunks();
        }
    }
}

impl VideoVlm {
    /// Token `chosen`'s entry with its log-probability and the alternatives `(lp, top)` found
    /// by [`logprobs_at`], each token's text decoded alone.
    fn step_logprobs(
        &self,
        chosen: u32,
        (lp, top): (f64, Vec<(u32, f64)>),
    ) -> Result<StepLogprobs, EngineError> {
        let entry = |id: u32, logprob: f64| -> Result<TokenLogprob, EngineError> {
            let token = self.detokenize(&[id])?;
            Ok(TokenLogprob {
                token_id: id,
                bytes: token.as_bytes().to_vec(),
                token,
                logprob,
            })
        };
        Ok(StepLogprobs {
            chosen: entry(chosen, lp)?,
            top: top
                .into_iter()
                .map(|(i, l)| entry(i, l))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The log-probabilities of the prompt tokens `ids` that the chunk of hidden states
    /// `hidden` (`[1, len, h]`, positions `start..start + len`) predicts: position `p`'s logits
    /// give token `p + 1` (the last position's, the first generated token, is the decode's).
    /// Pushes the first token too (with no log-probability) when `start` is 0.
    fn score_prompt_chunk(
        &self,
        ids: &[u32],
        start: usize,
        hidden: &Tensor,
        k: usize,
        ctx: &Ctx,
        out: &mut Vec<PromptToken>,
    ) -> Result<(), EngineError> {
        if start == 0 {
            if let Some(&first) = ids.first() {
                out.push(PromptToken {
                    token_id: first,
                    token: self.detokenize(&[first])?,
                    logprobs: None,
                });
            }
        }
        let len = hidden.dim(1)?;
        // Positions whose next token is in the prompt (counted: the lm_head over them).
        let scored = len.min(ids.len().saturating_sub(start + 1));
        if scored == 0 {
            return Ok(());
        }
        let rows = self
            .lm
            .logits(&hidden.narrow(1, 0, scored)?, ctx)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        for (i, row) in rows.iter().enumerate() {
            let next = ids[start + i + 1];
            out.push(PromptToken {
                token_id: next,
                token: self.detokenize(&[next])?,
                logprobs: Some(self.step_logprobs(next, logprobs_at(row, next, k))?),
            });
        }
        Ok(())
    }
}

/// A sequence taken out of its batch with its KV cache freed (a preempted batch line): its
/// decoding state (tokens, text so far, random draws, penalties, constraint, last logits)
/// without the cache, which [`VideoVlm::resume_sequence`] rebuilds so that it continues exactly
/// where it was.
pub struct Suspended {
    seq: Sequence,
    /// Generated tokens whose KV the cache held (all of them between two steps).
    fed: usize,
    /// The KV cache itself when it was kept ([`Sequence::park`]), until the holder of the
    /// matching [`KeptKv`] releases it.
    kept: Option<Arc<Mutex<Option<KvCache>>>>,
}

impl Suspended {
    /// Tokens generated before it was taken out (their KV is rebuilt on resuming unless it was
    /// kept).
    pub fn generated(&self) -> usize {
        self.seq.ids.len()
    }

    /// KV positions its kept cache is allocated for (0: freed, or never kept).
    pub fn kept_positions(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| kept_capacity(k))
    }

    /// Takes its kept cache out of the owner's reach (its [`KeptKv`] reports 0 and can no longer
    /// free it), for a caller about to resume it: true when the cache was still there, so that
    /// resuming recomputes nothing and needs neither the video nor the prompt's prefix.
    pub fn claim_kept(&mut self) -> bool {
        let cache = self.kept.take().and_then(|k| take_kept(&k));
        let claimed = cache.is_some();
        self.kept = cache.map(|c| Arc::new(Mutex::new(Some(c))));
        claimed
    }
}

/// The owner's side of a parked sequence's KV cache ([`Sequence::park`]): whoever accounts for
/// the memory (a worker's KV budget) sees how much it holds and may free it while the sequence
/// waits; the sequence then rebuilds it when it resumes. Holds no memory itself: once the
/// sequence resumed (the cache taken back) or was dropped, it reports 0.
pub struct KeptKv(Weak<Mutex<Option<KvCache>>>);

impl KeptKv {
    /// KV positions the kept cache is allocated for (0 once taken back, released or dropped).
    pub fn positions(&self) -> usize {
        self.0.upgrade().map_or(0, |k| kept_capacity(&k))
    }

    /// Whether this is `s`'s kept cache.
    pub fn is_of(&self, s: &Suspended) -> bool {
        s.kept
            .as_ref()
            .is_some_and(|k| std::ptr::eq(Arc::as_ptr(k), self.0.as_ptr()))
    }

    /// Frees the cache (the sequence will rebuild it); the positions freed.
    pub fn release(&self) -> usize {
        let freed = self.0.upgrade().and_then(|k| take_kept(&k));
        freed.map_or(0, |c| c.capacity())
    }
}

fn lock_kept(k: &Mutex<Option<KvCache>>) -> std::sync::MutexGuard<'_, Option<KvCache>> {
    // Nothing panics while holding it; a poisoned lock still holds a whole cache or none.
    k.lock().unwrap_or_else(|e| e.into_inner())
}

fn take_kept(k: &Mutex<Option<KvCache>>) -> Option<KvCache> {
    lock_kept(k).take()
}

fn kept_capacity(k: &Mutex<Option<KvCache>>) -> usize {
    lock_kept(k).as_ref().map_or(0, |c| c.capacity())
}

impl Sequence {
    /// Frees the KV cache and keeps the rest, for [`VideoVlm::resume_sequence`].
    pub fn suspend(self) -> Suspended {
        self.take_out().0
    }

    /// The sequence without its KV cache, and the cache.
    fn take_out(mut self) -> (Suspended, KvCache) {
        let fed = self.cache.len().saturating_sub(self.prompt_tokens);
        let cache = std::mem::take(&mut self.cache);
        let s = Suspended {
            seq: self,
            fed,
            kept: None,
        };
        (s, cache)
    }

    /// [`Self::suspend`] keeping the KV cache with it (a preemption for a batch place while
    /// memory allows): [`VideoVlm::resume_sequence`] then continues at once, recomputing
    /// nothing, unless the owner released the cache through the returned [`KeptKv`] meanwhile.
    pub fn park(self) -> (Suspended, KeptKv) {
        let (mut s, cache) = self.take_out();
        let cache = Arc::new(Mutex::new(Some(cache)));
        let owner = KeptKv(Arc::downgrade(&cache));
        s.kept = Some(cache);
        (s, owner)
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.ids.len()
    }

    /// Positions in the KV cache.
    pub fn context_len(&self) -> usize {
        self.cache.len()
    }

    /// Whether choosing the next token costs more than a greedy pass over the logits (a draw
    /// at a temperature, log-probabilities): worth doing for a batch's sequences in parallel.
    pub fn choice_is_costly(&self) -> bool {
        self.sampling.temperature > 0.0
            || self.sampling.logprobs.is_some()
            || !self.sampling.penalties.is_identity()
            || self.constraint.is_some()
    }

    /// Draws the next token (and its log-probabilities) from the last logits ahead of
    /// [`Self::advance`], which then takes it: the same token from the same random draw as
    /// `advance` alone would choose, so a batch may choose every sequence's token in parallel
    /// (it touches nothing but this sequence). Nothing when the sequence is finishing.
    pub fn choose(&mut self) {
        if self.awaits_choice() {
            self.chosen = Some(self.draw());
        }
    }

    /// Whether `advance` will choose a next token (none chosen yet, not finishing).
    fn awaits_choice(&self) -> bool {
        self.finish.is_none() && self.chosen.is_none() && self.ids.len() < self.sampling.max_tokens
    }

    fn draw(&mut self) -> Choice {
        let u = self.rng.uniform();
        let token = if self.sampling.penalties.is_identity() && self.constraint.is_none() {
            sample(&self.logits, &self.sampling, u)
        } else {
            let mut logits = self.logits.clone();
            self.sampling
                .penalties
                .apply(&mut logits, &self.prompt_ids, &self.ids);
            match &self.constraint {
                // Nothing the constraint allows (a vocabulary without the bytes it needs): stop.
                Some(j) if !j.mask(&mut logits, &self.stop_ids) => {
                    self.stop_ids.first().copied().unwrap_or(0)
                }
                _ => sample(&logits, &self.sampling, u),
            }
        };
        let logprobs = match self.sampling.logprobs {
            Some(k) if !self.stop_ids.contains(&token) => {
                Some(logprobs_at(&self.logits, token, k.min(MAX_TOP_LOGPROBS)))
            }
            _ => None,
        };
        Choice { token, logprobs }
    }

    /// Chooses the next token from the last logits and streams any text it completes.
    /// `on_text` returns false to cancel (the sequence then finishes as cancelled).
    pub fn advance(
        &mut self,
        vlm: &VideoVlm,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Step, EngineError> {
        if self.finish.is_some() {
            return Ok(Step::Done);
        }
        self.decode_started.get_or_insert_with(Instant::now);
        let done = |s: &mut Self, f: FinishReason| {
            s.finish = Some(f);
            Ok(Step::Done)
        };
        if self.ids.len() >= self.sampling.max_tokens {
            return done(self, FinishReason::Length);
        }
        let Choice {
            token: next,
            logprobs,
        } = match self.chosen.take() {
            Some(c) => c,
            None => self.draw(),
        };
        if self.stop_ids.contains(&next) {
            return done(self, FinishReason::Stop);
        }
        if let Some(found) = logprobs {
            self.logprobs.push(vlm.step_logprobs(next, found)?);
        }
        if let Some(c) = &mut self.constraint {
            c.accept(next);
        }
        self.ids.push(next);
        // Incremental detokenisation (as text-generation-inference does): each step decodes
        // only the ids since the last emitted piece plus the token before them.
        let before = vlm.detokenize(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = vlm.detokenize(&self.ids[self.prefix_offset..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.pending.push_str(&now[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            if let Some(cut) = find_stop(&self.pending, &self.sampling.stop) {
                let out = self.pending[..cut].to_string();
                self.emitted.push_str(&out);
                if !out.is_empty() {
                    on_text(&out);
                }
                self.stopped_by_string = true;
                return done(self, FinishReason::Stop);
            }
            let keep = self.pending.len() - held_back(&self.pending, &self.sampling.stop);
            let out: String = self.pending.drain(..keep).collect();
            if !out.is_empty() {
                self.emitted.push_str(&out);
                if !on_text(&out) {
                    return done(self, FinishReason::Cancelled);
                }
            }
        }
        if self.ids.len() >= self.sampling.max_tokens {
            return done(self, FinishReason::Length);
        }
        Ok(Step::Forward(next))
    }

    /// The logits after the token [`Sequence::advance`] asked to feed.
    pub fn accept_logits(&mut self, logits: Vec<f32>) {
        self.logits = logits;
        self.decode_steps += 1;
    }

    /// [`Self::accept_logits`] from a row read in place (a decode step's batch of logits, which
    /// is then dropped): a sequence whose next choice is a plain greedy one
    /// ([`Self::choice_is_costly`] false) makes it now from the row and keeps no copy (the
    /// token, and the random draw it takes, of [`Self::choose`] ahead of `advance`); any other
    /// copies the row into its own buffer, kept from step to step. At 8 SmolLM2 sequences the
    /// step's copy of the logits to the host was ~0.12 ms of a ~8 ms step.
    pub fn accept_logits_row(&mut self, row: &[f32]) {
        self.decode_steps += 1;
        self.logits.clear();
        if self.awaits_choice() && !self.choice_is_costly() {
            let u = self.rng.uniform();
            self.chosen = Some(Choice {
                token: sample(row, &self.sampling, u),
                logprobs: None,
            });
            return;
        }
        self.logits.extend_from_slice(row);
    }

    /// Ends the sequence: the final text (streaming what the detokeniser still held).
    pub fn finish(
        mut self,
        vlm: &VideoVlm,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, EngineError> {
        let finish = self.finish.unwrap_or(FinishReason::Cancelled);
        self.timings.decode_s = self
            .decode_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        let text = if self.stopped_by_string {
            self.emitted
        } else {
            let text = vlm.detokenize(&self.ids)?;
            if text.len() > self.emitted.len()
                && text.starts_with(&self.emitted)
                && finish != FinishReason::Cancelled
            {
                on_text(&text[self.emitted.len()..]);
            }
            text
        };
        Ok(Generation {
            text,
            token_ids: self.ids,
            finish_reason: finish,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            text_tokens: self.text_tokens,
            visual_tokens: self.visual_tokens,
            decode_steps: self.decode_steps,
            timings: self.timings,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
        })
    }
}

/// Where the first stop string begins in `text`, if one appears.
pub(crate) fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Bytes at the end of `text` that could be the beginning of a stop string (held back).
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if k > hold && text.ends_with(&s[..k]) {
                hold = k;
            }
        }
    }
    hold
}
