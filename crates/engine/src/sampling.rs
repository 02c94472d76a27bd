//! Choosing the next token from a step's logits: logit bias and repetition, frequency and
//! presence penalties ([`Penalties`]), greedy, temperature, min-p, top-k and top-p (nucleus)
//! sampling, and log-probabilities. Owns the arithmetic of the choice; knows nothing of models,
//! sequences or requests (the scheduler calls it once per sequence per decode step, on its own
//! thread between forward passes, so its cost adds to every sequence's time per output token).
//!
//! A draw is defined as: weights `w_i = exp((l_i − max l) / T)` (f32, [`exp_f32`], within 2 ulp
//! of the exact value); tokens ranked by weight, heaviest first (equal weights: lower id first);
//! with `min_p`, tokens of weight below `min_p · max w` weigh 0; with `top_k`, all but the first
//! `k` of the ranking weigh 0; the nucleus the shortest prefix of the ranking whose weight
//! reaches `top_p · Σ w` (every token when `top_p >= 1`); then the token where the running weight
//! of the nucleus, in rank order, first reaches `u ·` (the nucleus' weight), `u` uniform in
//! [0, 1): a small `u` picks the likeliest token. (vLLM's order: temperature, min-p, top-k,
//! top-p; min-p and top-k commute.) Ranking all 49152 tokens of a vocabulary took ~1.8 ms a draw (a sort), more
//! than a batched decode step of 8 sequences; here the weights are summed by range (a histogram
//! over their binary exponents), the running sum follows the ranges from the heaviest, and only
//! the tokens of the range where it crosses its target are sorted.
//!
//! NaN logits are never chosen (weight 0, not ranked by greedy).

#[cfg(target_arch = "x86_64")]
use crate::attention::exp_f32x8;
use crate::attention::{exp_f32, max_f32};
use crate::generate::SamplingParams;
use serde::{Deserialize, Serialize};

/// Changes to a step's logits before the choice, as vLLM applies them (OpenAI's `logit_bias`,
/// `frequency_penalty` and `presence_penalty`; Hugging Face's `repetition_penalty`): first each
/// biased token's logit plus its bias; then, for every token in the prompt or generated so far,
/// a positive logit divided by `repetition` and a negative one multiplied by it; then, for each
/// generated token, `frequency · count + presence` subtracted (`count` the times it was
/// generated). The identity by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Penalties {
    #[serde(default)]
    pub frequency: f32,
    #[serde(default)]
    pub presence: f32,
    #[serde(default = "one")]
    pub repetition: f32,
    /// (token id, bias); ids outside the vocabulary are ignored here (the server refuses them).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
}

fn one() -> f32 {
    1.0
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            frequency: 0.0,
            presence: 0.0,
            repetition: 1.0,
            logit_bias: vec![],
        }
    }
}

impl Penalties {
    /// Whether applying them changes nothing.
    pub fn is_identity(&self) -> bool {
        self.frequency == 0.0
            && self.presence == 0.0
            && self.repetition == 1.0
            && self.logit_bias.iter().all(|&(_, b)| b == 0.0)
    }

    /// Whether the prompt's tokens matter (the repetition penalty).
    pub fn uses_prompt(&self) -> bool {
        self.repetition != 1.0
    }

    /// Applies them to `logits` in place (see the type's doc), `prompt` and `generated` the
    /// sequence's token ids so far.
    pub fn apply(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let n = logits.len();
        for &(id, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if self.repetition != 1.0 {
            let mut seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / self.repetition
                    } else {
                        *l * self.repetition
                    };
                }
            }
        }
        if self.frequency != 0.0 || self.presence != 0.0 {
            let mut ids: Vec<u32> = generated
                .iter()
                .copied()
                .filter(|&i| (i as usize) < n)
                .collect();
            ids.sort_unstable();
            for run in ids.chunk_by(|a, b| a == b) {
                let l = &mut logits[run[0] as usize];
                *l -= self.frequency * run.len() as f32 + self.presence;
            }
        }
    }
}

/// Picks the next token from raw logits, `u` uniform in [0, 1) (see the module doc).
pub fn sample(logits: &[f32], p: &SamplingParams, u: f64) -> u32 {
    // An infinite logit takes all the probability (its weight would be exp(inf − inf)).
    if p.temperature <= 0.0 || logits.is_empty() {
        return greedy(logits);
    }
    let max = max_f32(logits);
    if max == f32::INFINITY {
        return greedy(logits);
    }
    let mut w = vec![0f32; logits.len()];
    let mut total = weights(logits, max, p.temperature as f32, &mut w);
    if total.is_nan() || total <= 0.0 {
        return greedy(logits);
    }
    if p.min_p > 0.0 || p.top_k > 0 {
        total = keep_likeliest(&mut w, p.top_k, p.min_p);
    }
    let ranking = Ranking::of(&w);
    let top_p = p.top_p.clamp(0.0, 1.0);
    // The nucleus: every bin above `floor`, and of the floor bin its heaviest `floor_tokens`.
    let (floor, floor_tokens, mass) = if top_p < 1.0 {
        let target = top_p * total;
        let (floor, above) = ranking.crossing(target);
        let mut tokens = ranking.bin(floor);
        let mut acc = above;
        let keep = tokens
            .iter()
            .position(|&(_, x)| {
                acc += x as f64;
                acc >= target
            })
            .map_or(tokens.len(), |i| i + 1);
        tokens.truncate(keep);
        let mass = above + tokens.iter().map(|&(_, x)| x as f64).sum::<f64>();
        (floor, tokens, mass)
    } else {
        (0, vec![], total)
    };
    let r = u * mass;
    let (at, above) = ranking.crossing(r);
    let tokens = if at <= floor && top_p < 1.0 {
        floor_tokens
    } else {
        ranking.bin(at)
    };
    let mut rest = r - above;
    for &(id, x) in &tokens {
        rest -= x as f64;
        if rest <= 0.0 {
            return id;
        }
    }
    tokens.last().map_or_else(|| greedy(logits), |&(id, _)| id)
}

/// Zeroes the weights below `min_p ·` the largest (when `min_p > 0`) and all but the `top_k`
/// heaviest (when `top_k > 0`; equal weights: lower id first), and returns the sum of what is
/// left. The largest weight always stays.
fn keep_likeliest(w: &mut [f32], top_k: usize, min_p: f64) -> f64 {
    if min_p > 0.0 {
        let floor = (min_p.min(1.0) * w.iter().fold(0f32, |m, &x| m.max(x)) as f64) as f32;
        for x in w.iter_mut() {
            if *x < floor {
                *x = 0.0;
            }
        }
    }
    if top_k > 0 && top_k < w.len() {
        // The k-th heaviest token: counted by bin (as `Ranking` sums by bin), then only the bin
        // where the count crosses k is ranked.
        let mut counts = [0usize; Ranking::BINS];
        for &x in w.iter() {
            counts[Ranking::bin_of(x)] += 1;
        }
        let mut above = 0;
        let mut last = None;
        for b in (1..Ranking::BINS).rev() {
            if above + counts[b] >= top_k {
                last = Some(Ranking::tokens_in_bin(w, b)[top_k - above - 1]);
                break;
            }
            above += counts[b];
        }
        if let Some((id, x)) = last {
            let after = |i: usize, y: f32| y < x || (y == x && i as u32 > id);
            for (i, y) in w.iter_mut().enumerate() {
                if after(i, *y) {
                    *y = 0.0;
                }
            }
        }
        // (Otherwise fewer than k tokens weigh more than the lowest bin: nothing to drop that
        // the draw could reach.)
    }
    w.iter().map(|&x| x as f64).sum()
}

/// `log softmax(logits)[chosen]` and the `k` most likely `(id, logprob)`, most likely first
/// (equal logits: lower id first), in f64; the normaliser summed from f32 weights ([`exp_f32`],
/// within 2 ulp each, so within ~3e-7 of the exact log-probability).
pub fn logprobs_at(logits: &[f32], chosen: u32, k: usize) -> (f64, Vec<(u32, f64)>) {
    let mut w = vec![0f32; logits.len()];
    let max = max_f32(logits);
    let total = weights(logits, max, 1.0, &mut w);
    let log_z = max as f64 + total.ln();
    let lp = |i: usize| logits[i] as f64 - log_z;
    (
        lp(chosen as usize),
        top_k(logits, k)
            .into_iter()
            .map(|i| (i, lp(i as usize)))
            .collect(),
    )
}

/// The first id of the largest logit (NaN ignored); 0 when no logit is above −∞.
pub fn greedy(logits: &[f32]) -> u32 {
    let m = max_f32(logits);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return 0;
    }
    const CHUNK: usize = 64;
    let c = logits
        .chunks(CHUNK)
        .position(|c| c.contains(&m))
        .expect("the maximum is one of the logits");
    let j = logits[c * CHUNK..]
        .iter()
        .position(|&x| x == m)
        .expect("in that chunk");
    (c * CHUNK + j) as u32
}

/// `out[i] = exp((logits[i] − max) / t)` (0 for a NaN logit) and their sum in f64; `max` the
/// largest logit ([`max_f32`], computed once by the caller).
fn weights(logits: &[f32], max: f32, t: f32, out: &mut [f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected above.
        return unsafe { weights_avx2(logits, max, t, out) };
    }
    weights_with(logits, max, t, out)
}

/// [`weights_with`] eight lanes at a time with [`exp_f32x8`] (each weight bit for bit the
/// scalar one; the sum's association differs, by rounding only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weights_avx2(logits: &[f32], max: f32, t: f32, out: &mut [f32]) -> f64 {
    use std::arch::x86_64::*;
    assert_eq!(logits.len(), out.len());
    let (mv, tv) = (_mm256_set1_ps(max), _mm256_set1_ps(t));
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let n8 = logits.len() / 8 * 8;
    let mut i = 0;
    while i < n8 {
        let l = _mm256_loadu_ps(logits.as_ptr().add(i));
        let e = exp_f32x8(_mm256_div_ps(_mm256_sub_ps(l, mv), tv));
        // NaN logits weigh 0.
        let e = _mm256_and_ps(e, _mm256_cmp_ps::<_CMP_ORD_Q>(l, l));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), e);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        i += 8;
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(lo, hi));
    let tail = weights_with(&logits[n8..], max, t, &mut out[n8..]);
    lanes.iter().sum::<f64>() + tail
}

/// `out[i] = exp_f32((logits[i] − max) / t)` (0 for NaN) and their sum.
fn weights_with(logits: &[f32], max: f32, t: f32, out: &mut [f32]) -> f64 {
    let mut total = 0.0;
    for (&l, o) in logits.iter().zip(out) {
        let e = exp_f32((l - max) / t);
        *o = if l.is_nan() { 0.0 } else { e };
        total += *o as f64;
    }
    total
}

/// Weights in [0, 1] summed by range (a bin: one f32 exponent and the top two bits of the
/// mantissa, a factor of 2^(1/4)), so that a running sum from the heaviest token is followed bin
/// by bin and only the bin where it crosses its target has its tokens ranked.
struct Ranking<'a> {
    w: &'a [f32],
    sums: Vec<f64>,
}

impl<'a> Ranking<'a> {
    /// Bits of an f32 below a bin's.
    const SHIFT: u32 = 21;
    /// Bins of the weights in [0, 1] (1.0 is in bin 0x3f80_0000 >> 21 = 508).
    const BINS: usize = 512;

    fn bin_of(x: f32) -> usize {
        ((x.to_bits() >> Self::SHIFT) as usize).min(Self::BINS - 1)
    }

    fn of(w: &'a [f32]) -> Self {
        // Four interleaved histograms: consecutive tokens of one bin do not wait on each
        // other's update.
        const WAYS: usize = 4;
        let mut part = vec![0f64; WAYS * Self::BINS];
        let mut chunks = w.chunks_exact(WAYS);
        for c in &mut chunks {
            for (way, &x) in c.iter().enumerate() {
                part[way * Self::BINS + Self::bin_of(x)] += x as f64;
            }
        }
        for &x in chunks.remainder() {
            part[Self::bin_of(x)] += x as f64;
        }
        let sums = (0..Self::BINS)
            .map(|b| (0..WAYS).map(|way| part[way * Self::BINS + b]).sum())
            .collect();
        Self { w, sums }
    }

    /// The bin where the running weight from the heaviest bin first reaches `target` (at least
    /// the heaviest non-empty bin, so that a target of 0 is reached by the likeliest token;
    /// the lightest bin if it never is), and the weight of the bins above it.
    fn crossing(&self, target: f64) -> (usize, f64) {
        let mut above = 0.0;
        for b in (0..Self::BINS).rev() {
            let through = above + self.sums[b];
            if through >= target && through > 0.0 {
                return (b, above);
            }
            above = through;
        }
        (0, above - self.sums[0])
    }

    /// `(id, weight)` of bin `b`'s tokens, heaviest first (equal weights: lower id first).
    fn bin(&self, b: usize) -> Vec<(u32, f32)> {
        Self::tokens_in_bin(self.w, b)
    }

    /// [`Self::bin`] of any weights.
    fn tokens_in_bin(w: &[f32], b: usize) -> Vec<(u32, f32)> {
        const L: usize = 8;
        let lo = f32::from_bits((b as u32) << Self::SHIFT);
        let hi = if b + 1 == Self::BINS {
            f32::INFINITY
        } else {
            f32::from_bits((b as u32 + 1) << Self::SHIFT)
        };
        let inside = |x: f32| x >= lo && x < hi;
        let mut out = vec![];
        // Eight at a time, a chunk looked into only when one of its weights is in the bin.
        for (c, chunk) in w.chunks(L).enumerate() {
            if chunk.iter().fold(false, |any, &x| any | inside(x)) {
                for (j, &x) in chunk.iter().enumerate() {
                    if inside(x) {
                        out.push(((c * L + j) as u32, x));
                    }
                }
            }
        }
        out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// Ids of the `k` largest logits, largest first (equal logits: lower id first; NaN skipped), in
/// one pass keeping a sorted list of `k`.
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(logits.len());
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return vec![];
    }
    for (i, &x) in logits.iter().enumerate() {
        // Later ids lose ties, so only a strictly larger value enters a full list.
        if x.is_nan() || (top.len() == k && x <= top[k - 1].0) {
            continue;
        }
        let at = top.partition_point(|&(y, _)| y >= x);
        top.insert(at, (x, i as u32));
        top.truncate(k);
    }
    top.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        }
    }

    /// The definition in the module doc written out directly: every token ranked by a full
    /// sort, in f64, from the same weights.
    fn reference(w: &[f32], top_p: f64, u: f64) -> u32 {
        let mut all: Vec<(u32, f64)> = w
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x as f64))
            .collect();
        let total: f64 = all.iter().map(|x| x.1).sum();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep = all.len();
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (i, x) in all.iter().enumerate() {
                acc += x.1;
                if acc >= top_p * total {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &all[..keep];
        let mass: f64 = kept.iter().map(|x| x.1).sum();
        let mut r = u * mass;
        for x in kept {
            r -= x.1;
            if r <= 0.0 {
                return x.0;
            }
        }
        kept.last().unwrap().0
    }

    /// Deterministic logits shaped like a language model's: a few likely tokens over a long
    /// tail, with repeated values (ties).
    fn lm_like(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 40) as f32 / (1u64 << 24) as f32;
                let base = if i % 997 == 3 { 12.0 } else { 0.0 };
                // Quantised to 1/8 so that many logits tie.
                ((base + 6.0 * r - 3.0) * 8.0).round() / 8.0
            })
            .collect()
    }

    #[test]
    fn draws_equal_the_full_sort_definition() {
        for (seed, n) in [(1u64, 49152usize), (2, 1000), (3, 7), (4, 32000)] {
            let logits = lm_like(n, seed);
            for (t, top_p) in [(0.7, 0.9), (1.0, 1.0), (1.5, 0.95), (0.2, 0.5), (3.0, 1.0)] {
                let mut w = vec![0f32; n];
                weights(&logits, max_f32(&logits), t as f32, &mut w);
                for j in 0..200 {
                    let u = (j as f64 + 0.37) / 200.0;
                    assert_eq!(
                        sample(&logits, &params(t, top_p), u),
                        reference(&w, top_p, u),
                        "n {n} t {t} top_p {top_p} u {u}"
                    );
                }
            }
        }
    }

    /// [`reference`] with min-p and top-k first, written out on the full sort.
    fn reference_filtered(w: &[f32], top_k: usize, min_p: f64, top_p: f64, u: f64) -> u32 {
        let max = w.iter().cloned().fold(0f32, f32::max);
        let floor = (min_p * max as f64) as f32;
        let mut ranked: Vec<u32> = (0..w.len() as u32).collect();
        ranked.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
        let mut kept = vec![0f32; w.len()];
        for (rank, &i) in ranked.iter().enumerate() {
            let x = w[i as usize];
            if (top_k == 0 || rank < top_k) && (min_p == 0.0 || x >= floor) {
                kept[i as usize] = x;
            }
        }
        reference(&kept, top_p, u)
    }

    #[test]
    fn min_p_and_top_k_draws_equal_the_full_sort_definition() {
        for (seed, n) in [(11u64, 49152usize), (12, 1000), (13, 7)] {
            let logits = lm_like(n, seed);
            for (t, top_p, top_k, min_p) in [
                (0.7, 0.9, 40, 0.0),
                (1.0, 1.0, 0, 0.05),
                (1.5, 0.95, 5, 0.1),
                (1.0, 1.0, 1, 0.0),
                (2.0, 1.0, 3000, 0.0),
                (0.8, 0.5, 20, 0.02),
            ] {
                let mut w = vec![0f32; n];
                weights(&logits, max_f32(&logits), t as f32, &mut w);
                let p = SamplingParams {
                    top_k,
                    min_p,
                    ..params(t, top_p)
                };
                for j in 0..200 {
                    let u = (j as f64 + 0.37) / 200.0;
                    let got = sample(&logits, &p, u);
                    assert_eq!(
                        got,
                        reference_filtered(&w, top_k, min_p, top_p, u),
                        "n {n} t {t} top_p {top_p} top_k {top_k} min_p {min_p} u {u}"
                    );
                    if top_k == 1 {
                        assert_eq!(got, greedy(&logits), "top-k 1 is greedy");
                    }
                }
            }
        }
        // Softmax [1, 2, 3, 4] / 10: min-p 0.6 keeps tokens 2 and 3 (3/4 >= 0.6, 2/4 < 0.6),
        // drawn 3:4; top-k 2 keeps the same two.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        for p in [
            SamplingParams {
                min_p: 0.6,
                ..params(1.0, 1.0)
            },
            SamplingParams {
                top_k: 2,
                ..params(1.0, 1.0)
            },
        ] {
            let n = 70_000;
            let mut counts = [0usize; 4];
            for j in 0..n {
                counts[sample(&logits, &p, (j as f64 + 0.5) / n as f64) as usize] += 1;
            }
            assert_eq!((counts[0], counts[1]), (0, 0), "{p:?}");
            assert!(
                (counts[3] as f64 / n as f64 - 4.0 / 7.0).abs() < 1e-3,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn penalties_change_the_logits_as_vllm_does() {
        let p = Penalties {
            frequency: 0.5,
            presence: 0.25,
            repetition: 2.0,
            logit_bias: vec![(1, 1.5), (4, -100.0), (99, 7.0)],
        };
        let mut l = [1.0f32, 2.0, -1.0, 0.5, 3.0, -2.0];
        // Prompt: 3 and 5; generated: 0 twice and 2 once.
        p.apply(&mut l, &[3, 5, 3], &[0, 2, 0]);
        // 0: 1 / 2 − (2·0.5 + 0.25) = −0.75; 1: biased 3.5, unseen; 2: −1 · 2 − 0.75 = −2.75;
        // 3: 0.5 / 2 (prompt only); 4: 3 − 100 = −97, unseen; 5: −2 · 2 (prompt); 99 ignored.
        assert_eq!(l, [-0.75, 3.5, -2.75, 0.25, -97.0, -4.0]);
        assert!(!p.is_identity() && p.uses_prompt());
        let none = Penalties::default();
        assert!(none.is_identity() && !none.uses_prompt());
        let mut same = [1.0f32, -2.0];
        none.apply(&mut same, &[0, 1], &[1, 1]);
        assert_eq!(same, [1.0, -2.0]);
        // Greedy on the changed logits: a bias of −100 on the likeliest token moves the choice.
        let mut l = [5.0f32, 4.0, 1.0];
        Penalties {
            logit_bias: vec![(0, -100.0)],
            ..Default::default()
        }
        .apply(&mut l, &[], &[]);
        assert_eq!(greedy(&l), 1);
    }

    #[test]
    fn weights_are_the_scaled_softmax_numerators() {
        let logits = lm_like(4099, 9);
        let mut w = vec![0f32; logits.len()];
        let total = weights(&logits, max_f32(&logits), 0.7, &mut w);
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let mut exact_total = 0.0;
        for (&l, &x) in logits.iter().zip(&w) {
            // The exponent as f32 computes it (its rounding, ~1e-6 of an exponent of -20, is
            // the input's); its exp in f64.
            let exact = (((l - max) / 0.7f32) as f64).exp();
            exact_total += exact;
            assert!((x as f64 - exact).abs() <= 3e-7 * exact, "{x} vs {exact}");
        }
        assert!((total - exact_total).abs() <= 3e-7 * exact_total);
        // The one-at-a-time path (CPUs without AVX2) gives the same weights bit for bit.
        let mut one = vec![0f32; logits.len()];
        let one_total = weights_with(&logits, max_f32(&logits), 0.7, &mut one);
        assert!(w.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!((one_total - total).abs() <= 1e-12 * total);
    }

    #[test]
    fn draw_frequencies_follow_the_probabilities() {
        // Softmax of [0, ln 2, ln 3, ln 4] at T = 1: [1, 2, 3, 4] / 10; u on a fine grid.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let mut counts = [0usize; 4];
        let n = 100_000;
        for j in 0..n {
            counts[sample(&logits, &params(1.0, 1.0), (j as f64 + 0.5) / n as f64) as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let want = (i + 1) as f64 / 10.0;
            assert!((*c as f64 / n as f64 - want).abs() < 1e-3, "{i}: {c}");
        }
        // top_p 0.65 keeps {3, 2} (0.4 + 0.3 >= 0.65): drawn 4:3.
        let mut counts = [0usize; 4];
        for j in 0..n {
            counts[sample(&logits, &params(1.0, 0.65), (j as f64 + 0.5) / n as f64) as usize] += 1;
        }
        assert_eq!((counts[0], counts[1]), (0, 0));
        assert!(
            (counts[3] as f64 / n as f64 - 4.0 / 7.0).abs() < 1e-3,
            "{counts:?}"
        );
    }

    #[test]
    fn greedy_takes_the_first_largest_and_skips_nan() {
        assert_eq!(greedy(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(greedy(&[f32::NAN, -1.0, 2.0, f32::NAN]), 2);
        assert_eq!(greedy(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(greedy(&[]), 0);
        let mut long = vec![0.5f32; 1000];
        long[700] = 9.0;
        long[900] = 9.0;
        assert_eq!(greedy(&long), 700);
        // An infinite logit is always drawn.
        for j in 0..10 {
            let logits = [1.0, f32::INFINITY, 3.0, f32::INFINITY];
            assert_eq!(sample(&logits, &params(1.0, 0.5), j as f64 / 10.0), 1);
        }
        // NaN logits are never drawn either.
        let logits = [f32::NAN, 1.0, 1.0];
        for j in 0..10 {
            assert_ne!(sample(&logits, &params(1.0, 1.0), j as f64 / 10.0), 0);
        }
    }

    #[test]
    fn top_k_ranks_like_a_full_sort() {
        let logits = lm_like(5000, 5);
        let mut all: Vec<u32> = (0..logits.len() as u32).collect();
        all.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        for k in [0, 1, 5, 20, 64] {
            assert_eq!(top_k(&logits, k), all[..k].to_vec(), "k {k}");
        }
        assert_eq!(top_k(&[1.0, 2.0], 9), vec![1, 0]);
    }
}
