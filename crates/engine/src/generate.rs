//! Generation: chat formatting, prefill of `[text, visual tokens, text]`, then decode with
//! greedy / temperature / top-p sampling, max tokens, stop tokens and cancellation.

use crate::model::VideoVlm;
use crate::nn::Ctx;
use crate::sequence::Step;
#[cfg(test)]
use crate::sequence::{find_stop, held_back};
use crate::EngineError;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use vvlm_cost::{Component, FlopCounter};

/// Sampling options. `temperature == 0` is greedy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Extra stop token ids besides the checkpoint's EOS and the template's end-of-turn.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Stop strings: generation ends where one appears (across token boundaries); it is not
    /// part of the text, and text that may begin one is held back from the stream until known.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Log-probabilities: None reports none; `Some(k)` reports each generated token's
    /// log-probability under the model (the softmax of its logits, before penalties,
    /// temperature, min-p, top-k and top-p) and the `k` most likely tokens at that step (k <= [`MAX_TOP_LOGPROBS`]).
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// The prompt's log-probabilities (a completion's prompt, [`PromptForm::is_raw`]): None reports
    /// none; `Some(k)` reports each prompt token after the first with its log-probability
    /// given the tokens before it and the `k` most likely tokens there, in
    /// [`Generation::prompt_logprobs`]. The prefill then computes the logits of every prompt
    /// position, not only the last (counted as prefill FLOPs).
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    /// Only the `top_k` likeliest tokens may be drawn (0: no limit). Applied after temperature
    /// and `min_p`, before `top_p`.
    #[serde(default)]
    pub top_k: usize,
    /// Only tokens at least `min_p` times as likely as the likeliest may be drawn, after
    /// temperature (0: no limit).
    #[serde(default)]
    pub min_p: f64,
    /// Changes to the logits before anything else (bias, then repetition, frequency and
    /// presence penalties); log-probabilities are still the model's.
    #[serde(default)]
    pub penalties: crate::sampling::Penalties,
    /// What the output must be: any text, or one JSON object ([`crate::json_mode`]).
    #[serde(default)]
    pub response_format: ResponseFormat,
}

/// What the output must be ([`crate::constraint`]): OpenAI's `response_format` types vvlm
/// implements, and vLLM's `guided_choice`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    Text,
    /// One JSON object: tokens that would leave none are never drawn, and the sequence stops
    /// only once it is complete.
    JsonObject,
    /// One document valid against this JSON Schema (the subset of [`crate::json_schema`]).
    JsonSchema(serde_json::Value),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// A prompt token and, after the first, its log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptToken {
    pub token_id: u32,
    pub token: String,
    /// None for the first token: nothing before it predicts it.
    pub logprobs: Option<StepLogprobs>,
}

/// The most alternatives reported per generated token (as OpenAI allows).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token and its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    /// The token's text alone (a piece of a multi-byte character decodes lossily; `bytes` is
    /// exact).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f64,
}

/// One generated token's log-probability and the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLogprobs {
    #[serde(flatten)]
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

pub use crate::sampling::{logprobs_at, sample, Penalties};

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_token_ids: vec![],
            stop: vec![],
            logprobs: None,
            prompt_logprobs: None,
            top_k: 0,
            min_p: 0.0,
            penalties: Default::default(),
            response_format: ResponseFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

/// Wall time per stage, seconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Timings {
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Tokens in the prompt: text tokens plus visual tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from a cached prefix (not prefilled for this request).
    pub cached_tokens: usize,
    pub text_tokens: usize,
    pub visual_tokens: usize,
    /// Single-token decode passes run after prefill.
    pub decode_steps: usize,
    pub timings: Timings,
    /// Per generated token, when [`SamplingParams::logprobs`] asked for them.
    pub logprobs: Vec<StepLogprobs>,
    /// Per prompt token, when [`SamplingParams::prompt_logprobs`] asked for them.
    pub prompt_logprobs: Vec<PromptToken>,
}

/// How a request's prompt is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PromptForm {
    /// The last user message, inside the checkpoint's chat template with the system message and
    /// the conversation's earlier messages.
    #[default]
    Chat,
    /// The prompt as it is, for a completion: no system message, history or chat template
    /// around it; tokenized with the tokenizer's own special tokens (a BOS where it adds one).
    Raw,
    /// A completion's prompt as the checkpoint's token ids, taken as they are (the prompt's
    /// text is not read).
    Tokens(Vec<u32>),
}

impl PromptForm {
    /// Whether the prompt is a completion's (no chat template around it).
    pub fn is_raw(&self) -> bool {
        !matches!(self, Self::Chat)
    }
}

/// One request to the engine.
pub struct GenerateRequest<'a> {
    /// Preprocessed frames `[T, 3, H, W]`, or None for a text-only prompt.
    pub pixels: Option<&'a Tensor>,
    /// Pooled grid side s (tokens per frame s*s).
    pub side: usize,
    pub system: Option<&'a str>,
    /// The conversation's earlier messages, in order (empty: one user turn).
    pub history: &'a [crate::template::Turn],
    /// The last user message (or, [`PromptForm::Raw`], the whole prompt).
    pub prompt: &'a str,
    /// How the prompt is read: a chat message, or a completion's prompt as text or token ids.
    pub form: &'a PromptForm,
    pub sampling: SamplingParams,
    /// Set to stop the request: vision, prefill and decode check it between layers.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

/// Frames as plain values, as the video crate decodes them: `[frames, 3, size, size]`,
/// row-major. The engine places them on its device; callers need no tensor library.
#[derive(Debug, Clone, Copy)]
pub struct FrameData<'a> {
    pub pixels: &'a [f32],
    pub frames: usize,
    pub size: usize,
}

/// What a request sees: nothing (text alone), frames to encode, or the cached features of
/// frames encoded before.
#[derive(Debug, Clone, Copy)]
pub enum VisualInput<'a> {
    None,
    Frames(FrameData<'a>),
    Features(&'a VisionFeatures),
}

/// The tower's and projector's output for a video's frames, before pooling (so any pooled side
/// s reuses it). Opaque to callers: they cache it and hand it back to the same checkpoint.
#[derive(Debug, Clone)]
pub struct VisionFeatures {
    projected: Tensor,
    model_dir: std::path::PathBuf,
}

impl VideoVlm {
    pub(crate) fn features(&self, projected: Tensor) -> VisionFeatures {
        VisionFeatures {
            projected,
            model_dir: self.dir.clone(),
        }
    }

    pub(crate) fn features_tensor(&self, f: &VisionFeatures) -> Result<Tensor, EngineError> {
        if f.model_dir != self.dir {
            return Err(EngineError::Request(
                "vision features of another checkpoint".into(),
            ));
        }
        Ok(f.projected.clone())
    }
}

impl VisionFeatures {
    /// Frames it holds.
    pub fn frames(&self) -> usize {
        self.projected.dims().first().copied().unwrap_or(0)
    }

    /// Bytes it occupies.
    pub fn bytes(&self) -> usize {
        self.projected.elem_count() * self.projected.dtype().size_in_bytes()
    }
}

/// A small deterministic generator for sampling.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl VideoVlm {
    /// Text without special tokens (a rendered template has its own).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_text(text, false)
    }

    /// A completion's prompt as it is: tokenized with the tokenizer's own special tokens (a
    /// BOS where the checkpoint's tokenizer adds one, as `transformers` and vLLM do).
    pub fn tokenize_raw(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_text(text, true)
    }

    /// What this checkpoint's token ids mean: a hash of every id's token (added tokens
    /// included) and of the LM's vocabulary size, equal for two checkpoints exactly when a
    /// token-id prompt reads the same to both. Made once; 0 without a tokenizer.
    pub fn vocabulary_fingerprint(&self) -> u64 {
        *self.vocabulary.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let Some(t) = self.tokenizer.as_ref() else {
                return 0;
            };
            let mut tokens: Vec<(u32, String)> =
                t.get_vocab(true).into_iter().map(|(s, i)| (i, s)).collect();
            tokens.sort_unstable();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.cfg.text_config.vocab_size.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        })
    }

    /// A completion's prompt as token ids: its text tokenized as it is ([`Self::tokenize_raw`]),
    /// or the ids it was given, each checked to be in the vocabulary. None for a chat prompt.
    pub fn completion_prompt_ids(
        &self,
        form: &PromptForm,
        text: &str,
    ) -> Result<Option<Vec<u32>>, EngineError> {
        match form {
            PromptForm::Chat => Ok(None),
            PromptForm::Raw => self.tokenize_raw(text).map(Some),
            PromptForm::Tokens(ids) => {
                let vocab = self.cfg.text_config.vocab_size;
                if ids.is_empty() {
                    return Err(EngineError::Request("the prompt has no tokens".into()));
                }
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab)
                {
                    return Err(EngineError::Request(format!(
                        "token {id} (the prompt's token {i}) is outside the vocabulary of \
                         {vocab} tokens"
                    )));
                }
                Ok(Some(ids.clone()))
            }
        }
    }

    fn encode_text(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::Checkpoint("the checkpoint has no tokenizer".into()))?;
        Ok(tok
            .encode(text, special_tokens)
            .map_err(|e| EngineError::Request(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Generated ids as text, special tokens left out.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.decode_ids(ids, true)
    }

    /// A token-id prompt as the text it stands for, special tokens included (what `echo`
    /// returns for it).
    pub fn prompt_text(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.decode_ids(ids, false)
    }

    fn decode_ids(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| EngineError::Checkpoint("the checkpoint has no tokenizer".into()))?;
        tok.decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Request(format!("detokenizing: {e}")))
    }

    /// Every token of the LM's vocabulary as the bytes it adds to the output, made once, for the
    /// output constraints ([`crate::constraint`]): with a byte-level BPE decoder (SmolLM2, Llama
    /// 3, Qwen2) the token's own bytes (a piece of a multi-byte character included), otherwise
    /// its text decoded alone; special tokens and ids without text: none.
    pub fn token_bytes(&self) -> std::sync::Arc<crate::json_mode::TokenBytes> {
        self.token_bytes
            .get_or_init(|| {
                let vocab = self.cfg.text_config.vocab_size;
                let Some(t) = self.tokenizer.as_ref() else {
                    return std::sync::Arc::new(crate::json_mode::TokenBytes::new(
                        (0..vocab).map(|_| vec![]),
                    ));
                };
                let byte_level = matches!(
                    t.get_decoder(),
                    Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
                );
                let unicode_to_byte = gpt2_unicode_to_byte();
                std::sync::Arc::new(crate::json_mode::TokenBytes::new((0..vocab).map(|id| {
                    let text = t.decode(&[id as u32], true).unwrap_or_default();
                    if text.is_empty() {
                        return vec![];
                    }
                    let raw = byte_level
                        .then(|| t.id_to_token(id as u32))
                        .flatten()
                        .and_then(|piece| {
                            piece
                                .chars()
                                .map(|c| unicode_to_byte.get(&c).copied())
                                .collect::<Option<Vec<u8>>>()
                        });
                    raw.unwrap_or_else(|| text.into_bytes())
                })))
            })
            .clone()
    }

    /// Whether this checkpoint's vocabulary can write a JSON object (a token can open one).
    pub fn can_write_json(&self) -> bool {
        self.token_bytes().can_open_object()
    }

    /// Whether this checkpoint's tokens, each as it decodes alone, can spell `text` exactly (as
    /// a choice is written: [`crate::constraint`]).
    pub fn can_write(&self, text: &str) -> bool {
        self.token_bytes().can_spell(text.as_bytes())
    }

    /// Number of text tokens the chat-formatted prompt takes (for planning).
    pub fn count_prompt_tokens(
        &self,
        system: Option<&str>,
        history: &[crate::template::Turn],
        prompt: &str,
    ) -> Result<usize, EngineError> {
        let p = self.template.render_conversation(system, history, prompt);
        Ok(self.tokenize(&p.before_video)?.len() + self.tokenize(&p.after_video)?.len())
    }

    /// Runs a whole request. `on_text` receives each new piece of text and returns false to
    /// cancel. On the CPU it runs inside the engine's thread pool ([`crate::cpu_pool`]).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        flops: &FlopCounter,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, EngineError> {
        let r = if self.lm.device().is_cpu() {
            crate::cpu_pool::run(|| self.generate_here(req, flops, on_text))
        } else {
            self.generate_here(req, flops, on_text)
        };
        cancelled_as_such(r, req)
    }

    /// [`Self::generate`] from frames as plain values or from cached vision features
    /// (`req.pixels` is not used), for `n` completions of the same prompt: the video is encoded
    /// once (or not at all, from features), then each completion is prefilled and decoded with
    /// seed `seed + i`. `on_text(i, piece)` streams completion `i`; it returns false to cancel.
    /// Returns the completions and, when frames were encoded, their features for a cache.
    pub fn generate_visual(
        &self,
        visual: VisualInput<'_>,
        req: &GenerateRequest,
        n: usize,
        flops: &FlopCounter,
        on_text: &mut (dyn FnMut(usize, &str) -> bool + Send),
    ) -> Result<(Vec<Generation>, Option<VisionFeatures>), EngineError> {
        let mut run = || -> Result<(Vec<Generation>, Option<VisionFeatures>), EngineError> {
            let (video, features) = self.encode_visual(visual, req.side, flops, req.cancel)?;
            let mut vision_s = video.as_ref().map_or(0.0, |v| v.vision_s);
            let mut out = Vec::with_capacity(n);
            // The completions share the prompt's part up to the video: prefilled once.
            let mut prefix = None;
            for i in 0..n.max(1) {
                let mut sampling = req.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(i as u64);
                let one = GenerateRequest {
                    pixels: None,
                    side: req.side,
                    system: req.system,
                    prompt: req.prompt,
                    history: req.history,
                    form: req.form,
                    sampling,
                    cancel: req.cancel,
                };
                let mut each = |piece: &str| on_text(i, piece);
                out.push(self.generate_after_video(
                    video.as_ref().map(|v| &v.tokens),
                    vision_s,
                    &one,
                    flops,
                    &mut prefix,
                    &mut each,
                )?);
                vision_s = 0.0;
            }
            Ok((out, features))
        };
        let r = if self.lm.device().is_cpu() {
            crate::cpu_pool::run(run)
        } else {
            run()
        };
        match r {
            Ok(v) => Ok(v),
            Err(e) => cancelled_as_such(Err(e), req).map(|g| (vec![g], None)),
        }
    }

    fn generate_here(
        &self,
        req: &GenerateRequest,
        flops: &FlopCounter,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, EngineError> {
        let mut ctx = Ctx::new(flops, Component::LmPrefill).with_cancel(req.cancel);
        let t0 = Instant::now();
        let video = match req.pixels {
            Some(p) => Some(self.encode_video(p, req.side, &mut ctx)?),
            None => None,
        };
        let vision_s = t0.elapsed().as_secs_f64();
        self.generate_after_video(video.as_ref(), vision_s, req, flops, &mut None, on_text)
    }

    /// [`Self::generate`] for already encoded visual tokens ([`Self::video_tokens`]);
    /// `req.pixels` and `req.side` are not used.
    pub fn generate_encoded(
        &self,
        video: Option<&Tensor>,
        req: &GenerateRequest,
        flops: &FlopCounter,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, EngineError> {
        let r = if self.lm.device().is_cpu() {
            crate::cpu_pool::run(|| {
                self.generate_after_video(video, 0.0, req, flops, &mut None, on_text)
            })
        } else {
            self.generate_after_video(video, 0.0, req, flops, &mut None, on_text)
        };
        cancelled_as_such(r, req)
    }

    fn generate_after_video(
        &self,
        video: Option<&Tensor>,
        vision_s: f64,
        req: &GenerateRequest,
        flops: &FlopCounter,
        prefix: &mut Option<crate::sequence::PrefixKv>,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, EngineError> {
        let (mut seq, made) =
            self.start_sequence(video, vision_s, req, flops, prefix.as_ref(), &mut || {})?;
        if made.is_some() {
            *prefix = made;
        }
        let mut ctx = Ctx::new(flops, Component::LmDecode).with_cancel(req.cancel);
        while let Step::Forward(next) = seq.advance(self, on_text)? {
            let e = self.lm.embed(&[next])?;
            let h = self.lm.forward_hidden(&e, &mut seq.cache, &mut ctx)?;
            seq.accept_logits(self.lm.last_logits(&h, &ctx)?.to_vec1::<f32>()?);
        }
        seq.finish(self, on_text)
    }

    pub(crate) fn stop_ids(&self, extra: &[u32]) -> Vec<u32> {
        let mut ids = self.cfg.text_config.eos_ids();
        if let Some(tok) = &self.tokenizer {
            for s in self.template.render(None, "").stop {
                if let Some(id) = tok.token_to_id(&s) {
                    ids.push(id);
                }
            }
        }
        ids.extend_from_slice(extra);
        ids
    }
}

/// The inverse of GPT-2's byte-level alphabet (`bytes_to_unicode`): printable Latin-1 bytes
/// stand for themselves, the other 68 bytes for the characters from U+0100 on, in byte order.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let c = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        map.insert(char::from_u32(c).expect("a valid char"), b);
    }
    map
}

/// A forward pass stopped by the request's cancel flag is [`EngineError::Cancelled`].
fn cancelled_as_such(
    r: Result<Generation, EngineError>,
    req: &GenerateRequest,
) -> Result<Generation, EngineError> {
    match r {
        Err(EngineError::Candle(e))
            if req
                .cancel
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                && e.to_string().contains(crate::nn::CANCELLED) =>
        {
            Err(EngineError::Cancelled)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_beginnings_held_back() {
        let stops = vec!["assist".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("I can assist you", &stops), Some(6));
        assert_eq!(find_stop("a\n\nb", &stops), Some(1));
        assert_eq!(find_stop("nothing here", &stops), None);
        assert_eq!(held_back("designed to ass", &stops), 3);
        assert_eq!(held_back("line\n", &stops), 1);
        assert_eq!(held_back("assis", &stops), 5);
        assert_eq!(held_back("plain", &stops), 0);
        assert_eq!(held_back("é", &["éa".to_string()]), 2, "whole characters");
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        // Hand computation: logits [0, ln 2, ln 3, ln 4]: softmax [1, 2, 3, 4] / 10.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let (lp, top) = logprobs_at(&logits, 1, 2);
        assert!((lp - 0.2f64.ln()).abs() < 1e-6, "{lp}");
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[1].0), (3, 2));
        assert!((top[0].1 - 0.4f64.ln()).abs() < 1e-6);
        assert!((top[1].1 - 0.3f64.ln()).abs() < 1e-6);
        assert!(logprobs_at(&logits, 0, 0).1.is_empty());
        assert_eq!(logprobs_at(&logits, 0, 9).1.len(), 4);
    }

    #[test]
    fn gpt2_byte_alphabet_inverts_as_published() {
        // bytes_to_unicode: ' ' (32) is 'Ġ' (U+0120), '\n' (10) 'Ċ' (U+010A), 0xAD 'Ń' (U+0143).
        let m = super::gpt2_unicode_to_byte();
        assert_eq!(m.len(), 256);
        assert_eq!(
            (m[&'Ġ'], m[&'Ċ'], m[&'Ń'], m[&'a'], m[&'é']),
            (32, 10, 0xAD, b'a', 0xE9)
        );
    }

    #[test]
    fn greedy_and_top_p_sampling() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let greedy = SamplingParams::default();
        assert_eq!(sample(&logits, &greedy, 0.99), 1);
        let hot = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            ..Default::default()
        };
        // u near 0 picks the most likely, u near 1 the least likely.
        assert_eq!(sample(&logits, &hot, 0.0), 1);
        assert_eq!(sample(&logits, &hot, 0.9999), 0);
        // top_p small enough keeps only the top token.
        let nucleus = SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &nucleus, 0.9999), 1);
    }
}
