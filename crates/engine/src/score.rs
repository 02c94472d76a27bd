//! Scoring continuations: the log-likelihood of each answer choice after a prompt about a video,
//! as lmms-eval scores multiple-choice items (the sum of the choice tokens' log-probabilities;
//! the highest wins). One prefill of the video and prompt is shared by every choice.

use crate::model::VideoVlm;
use crate::nn::Ctx;
use crate::EngineError;
use candle_core::{DType, Tensor};
use vvlm_cost::{Component, FlopCounter};

fn log_softmax_at(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[id as usize] as f64 - max - z.ln()
}

impl VideoVlm {
    /// The chat-formatted prompt's token ids before and after the video's tokens.
    pub fn prompt_ids(
        &self,
        system: Option<&str>,
        prompt: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), EngineError> {
        let p = self.template.render(system, prompt);
        Ok((
            self.tokenize(&p.before_video)?,
            self.tokenize(&p.after_video)?,
        ))
    }

    /// Log-likelihood of each choice as the answer to `prompt` about the video `pixels`
    /// (`[T, 3, H, W]`, pooled to `side`), in the order given.
    pub fn choice_log_likelihoods(
        &self,
        pixels: &Tensor,
        side: usize,
        prompt: &str,
        choices: &[String],
        flops: &FlopCounter,
    ) -> Result<Vec<f64>, EngineError> {
        let mut ctx = Ctx::new(flops, Component::LmPrefill);
        let video = self.encode_video(pixels, side, &mut ctx)?;
        self.choice_log_likelihoods_for(&video, prompt, choices, flops)
    }

    /// [`Self::choice_log_likelihoods`] for already encoded visual tokens
    /// ([`Self::encode_video`] or [`Self::video_tokens`]).
    pub fn choice_log_likelihoods_for(
        &self,
        video: &Tensor,
        prompt: &str,
        choices: &[String],
        flops: &FlopCounter,
    ) -> Result<Vec<f64>, EngineError> {
        let run = || {
            let (prefix, suffix) = self.prompt_ids(None, prompt)?;
            let mut ctx = Ctx::new(flops, Component::LmPrefill);
            let video = video.clone();
            let embeds = self.input_embeddings(&prefix, Some(&video), &suffix)?;
            let mut cache = self.lm.new_cache();
            let hidden = self.lm.forward_hidden(&embeds, &mut cache, &mut ctx)?;
            let last = self.lm.last_logits(&hidden, &ctx)?.to_vec1::<f32>()?;
            choices
                .iter()
                .map(|c| {
                    let ids = self.tokenize(c)?;
                    let Some((&first, rest)) = ids.split_first() else {
                        return Err(EngineError::Request(format!(
                            "answer choice {c:?} has no tokens"
                        )));
                    };
                    if rest.is_empty() {
                        return Ok(log_softmax_at(&last, first));
                    }
                    // Longer choices: the prompt and the choice's tokens but its last, from the
                    // start (the KV cache is written in place); the last len(choice) positions
                    // predict the choice's tokens.
                    let mut text = suffix.clone();
                    text.extend_from_slice(&ids[..ids.len() - 1]);
                    let e = self.input_embeddings(&prefix, Some(&video), &text)?;
                    let mut c_cache = self.lm.new_cache();
                    let h = self.lm.forward_hidden(&e, &mut c_cache, &mut ctx)?;
                    let n = h.dim(1)?;
                    let h = h.narrow(1, n - ids.len(), ids.len())?;
                    let logits = self.lm.logits(&h, &ctx)?.to_dtype(DType::F32)?;
                    let rows = logits.squeeze(0)?.to_vec2::<f32>()?;
                    let ll = rows
                        .iter()
                        .zip(&ids)
                        .map(|(row, &next)| log_softmax_at(row, next))
                        .sum::<f64>();
                    Ok(ll)
                })
                .collect()
        };
        if self.lm.device().is_cpu() {
            crate::cpu_pool::run(run)
        } else {
            run()
        }
    }
}
