//! Exact analytic FLOPs of a concrete LLaVA-OneVision-style architecture for a workload.
//!
//! Counts the same matrix products the engine executes (see the crate docs for conventions), so
//! that the engine's measured count and this count must agree.

use crate::{CostError, FlopBreakdown};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// SigLIP-style vision tower shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionSpec {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    /// Encoder layers that run to produce the selected features.
    pub layers_run: usize,
}

impl VisionSpec {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn params(&self) -> f64 {
        let h = self.hidden_size as f64;
        let i = self.intermediate_size as f64;
        let pe = (self.num_channels * self.patch_size * self.patch_size) as f64 * h;
        pe + self.layers_run as f64 * (4.0 * h * h + 2.0 * h * i)
    }

    /// FLOPs of one frame.
    pub fn frame_flops(&self) -> f64 {
        let p = self.patches() as f64;
        let h = self.hidden_size as f64;
        let i = self.intermediate_size as f64;
        let patch = 2.0 * p * (self.num_channels * self.patch_size * self.patch_size) as f64 * h;
        let layer = 2.0 * p * h * h * 4.0 // q, k, v, out
            + 2.0 * p * p * h * 2.0 // scores and AV over all heads
            + 2.0 * p * h * i * 2.0; // fc1, fc2
        patch + self.layers_run as f64 * layer
    }

    /// The so400m/14 tower at 384 px with the public checkpoints' 26 layers.
    pub fn so400m() -> Self {
        Self {
            image_size: 384,
            patch_size: 14,
            num_channels: 3,
            hidden_size: 1152,
            intermediate_size: 4304,
            num_attention_heads: 16,
            layers_run: 26,
        }
    }
}

/// Two-layer MLP projector: `in -> hidden -> out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectorSpec {
    pub in_features: usize,
    pub hidden: usize,
    pub out_features: usize,
}

impl ProjectorSpec {
    pub fn token_flops(&self) -> f64 {
        2.0 * (self.in_features * self.hidden + self.hidden * self.out_features) as f64
    }
}

/// Llama/Qwen2-style decoder shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
}

impl LmSpec {
    /// Non-embedding parameters plus the LM head (the usual "x_N" convention counts all
    /// parameters; this is what the matmuls touch).
    pub fn params(&self) -> f64 {
        let h = self.hidden_size as f64;
        let q = (self.num_attention_heads * self.head_dim) as f64;
        let kv = (self.num_key_value_heads * self.head_dim) as f64;
        let i = self.intermediate_size as f64;
        self.num_hidden_layers as f64 * (h * q * 2.0 + h * kv * 2.0 + 3.0 * h * i)
            + h * self.vocab_size as f64
    }

    fn linear_flops_per_token(&self) -> f64 {
        let h = self.hidden_size as f64;
        let q = (self.num_attention_heads * self.head_dim) as f64;
        let kv = (self.num_key_value_heads * self.head_dim) as f64;
        let i = self.intermediate_size as f64;
        self.num_hidden_layers as f64 * 2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i)
    }

    /// Causal attention of `q_len` new positions after `past` cached ones: scores (QK^T) and AV
    /// over the visible (query, key) pairs, `q·past + q(q+1)/2`, every head, every layer. The
    /// total over a prompt is the same however it is split into passes.
    fn attention_flops(&self, q_len: f64, past: f64) -> f64 {
        let pairs = q_len * past + q_len * (q_len + 1.0) / 2.0;
        self.num_hidden_layers as f64
            * 2.0
            * 2.0
            * pairs
            * (self.num_attention_heads * self.head_dim) as f64
    }

    fn head_flops(&self, positions: f64) -> f64 {
        2.0 * positions * (self.hidden_size * self.vocab_size) as f64
    }

    /// Prefill of `len` tokens with an empty cache; the LM head runs on the last position only.
    pub fn prefill_flops(&self, len: usize) -> f64 {
        let l = len as f64;
        l * self.linear_flops_per_token() + self.attention_flops(l, 0.0) + self.head_flops(1.0)
    }

    /// What a prompt's prefill saves when its first `len` positions' KV is cached: their
    /// linear and attention work. Not the LM head: it runs once, on the prompt's last position,
    /// whatever is cached (so this is [`Self::prefill_flops`] without it; the positions after
    /// the prefix still attend to it, which the prompt's own count already holds).
    pub fn cached_prefix_flops(&self, len: usize) -> f64 {
        let l = len as f64;
        l * self.linear_flops_per_token() + self.attention_flops(l, 0.0)
    }

    /// One decode step that attends over `kv_len` positions (the new token included).
    pub fn decode_step_flops(&self, kv_len: usize) -> f64 {
        self.linear_flops_per_token()
            + self.attention_flops(1.0, kv_len.saturating_sub(1) as f64)
            + self.head_flops(1.0)
    }
}

/// A whole architecture: vision tower, projector and language model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchSpec {
    pub vision: VisionSpec,
    pub projector: ProjectorSpec,
    pub lm: LmSpec,
    /// One separator (`image_newline`) token after all frames.
    pub video_newline: bool,
}

/// What one request runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub frames: usize,
    pub tokens_per_frame: usize,
    /// Text tokens of the prompt (template included) around the visual tokens.
    pub text_tokens: usize,
    /// Single-token decode passes after prefill (generated tokens minus one: the first token
    /// comes from the prefill logits).
    pub decode_steps: usize,
}

impl ArchSpec {
    /// Total prefill sequence length for a workload.
    pub fn prefill_len(&self, w: &Workload) -> usize {
        w.text_tokens
            + w.frames * w.tokens_per_frame
            + usize::from(self.video_newline && w.frames > 0)
    }

    /// Exact FLOPs by component.
    pub fn flops(&self, w: &Workload) -> FlopBreakdown {
        let frames = w.frames as f64;
        let len = self.prefill_len(w);
        // A fold from +0.0: an empty `sum()` of floats is -0.0, which prints as "-0".
        let decode = (0..w.decode_steps)
            .map(|j| self.lm.decode_step_flops(len + j + 1))
            .fold(0.0, |a, b| a + b);
        FlopBreakdown {
            vision: frames * self.vision.frame_flops(),
            projector: frames * self.vision.patches() as f64 * self.projector.token_flops(),
            lm_prefill: self.lm.prefill_flops(len),
            lm_decode: decode,
        }
    }

    /// Reads a checkpoint directory's `config.json` (LLaVA-OneVision layout with `vision_config`
    /// and `text_config`).
    pub fn from_checkpoint_dir(dir: &Path) -> Result<Self, CostError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| CostError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_config_json(&serde_json::from_str(&text)?)
    }

    pub fn from_config_json(cfg: &Value) -> Result<Self, CostError> {
        let vc = cfg
            .get("vision_config")
            .ok_or(CostError::Missing("vision_config"))?;
        let tc = cfg
            .get("text_config")
            .ok_or(CostError::Missing("text_config"))?;
        let lm = LmSpec::from_config_json(tc)?;
        let num_layers = get_usize(vc, "num_hidden_layers", None)?;
        let layer = cfg
            .get("vision_feature_layer")
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        let layers_run = hidden_state_layers(num_layers, layer)
            .ok_or(CostError::Missing("a valid vision_feature_layer"))?;
        let vision = VisionSpec {
            image_size: get_usize(vc, "image_size", Some(384))?,
            patch_size: get_usize(vc, "patch_size", Some(14))?,
            num_channels: get_usize(vc, "num_channels", Some(3))?,
            hidden_size: get_usize(vc, "hidden_size", None)?,
            intermediate_size: get_usize(vc, "intermediate_size", None)?,
            num_attention_heads: get_usize(vc, "num_attention_heads", None)?,
            layers_run,
        };
        let projector = ProjectorSpec {
            in_features: vision.hidden_size,
            hidden: lm.hidden_size,
            out_features: lm.hidden_size,
        };
        Ok(Self {
            vision,
            projector,
            lm,
            video_newline: true,
        })
    }
}

impl LmSpec {
    /// Reads a Llama/Qwen2 `config.json` (or a LLaVA `text_config`).
    pub fn from_config_json(tc: &Value) -> Result<Self, CostError> {
        let hidden = get_usize(tc, "hidden_size", None)?;
        let heads = get_usize(tc, "num_attention_heads", None)?;
        Ok(Self {
            hidden_size: hidden,
            intermediate_size: get_usize(tc, "intermediate_size", None)?,
            num_hidden_layers: get_usize(tc, "num_hidden_layers", None)?,
            num_attention_heads: heads,
            num_key_value_heads: get_usize(tc, "num_key_value_heads", Some(heads))?,
            head_dim: get_usize(tc, "head_dim", Some(hidden / heads.max(1)))?,
            vocab_size: get_usize(tc, "vocab_size", None)?,
        })
    }
}

/// How many encoder layers run to produce `hidden_states[layer]` (index 0 is the embeddings;
/// negative indices count from the end of `num_layers + 1` states).
pub fn hidden_state_layers(num_layers: usize, layer: i64) -> Option<usize> {
    let states = num_layers as i64 + 1;
    let idx = if layer < 0 { states + layer } else { layer };
    (0..states).contains(&idx).then_some(idx as usize)
}

fn get_usize(v: &Value, key: &'static str, default: Option<usize>) -> Result<usize, CostError> {
    match v.get(key).and_then(Value::as_u64) {
        Some(x) => Ok(x as usize),
        None => default.ok_or(CostError::Missing(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ArchSpec {
        ArchSpec {
            vision: VisionSpec {
                image_size: 98,
                patch_size: 14,
                num_channels: 3,
                hidden_size: 64,
                intermediate_size: 128,
                num_attention_heads: 4,
                layers_run: 2,
            },
            projector: ProjectorSpec {
                in_features: 64,
                hidden: 64,
                out_features: 64,
            },
            lm: LmSpec {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                vocab_size: 512,
            },
            video_newline: true,
        }
    }

    #[test]
    fn hand_counted_tiny_vision_frame() {
        // patch: 2*49*588*64 = 3_687_936; layer: 2*49*64*64*4 = 1_605_632,
        // attn 2*49*49*64*2 = 614_656, mlp 2*49*64*128*2 = 1_605_632 -> 3_825_920 per layer.
        let f = tiny().vision.frame_flops();
        assert_eq!(f, 3_687_936.0 + 2.0 * 3_825_920.0);
    }

    #[test]
    fn hand_counted_tiny_prefill_and_decode() {
        let a = tiny();
        let w = Workload {
            frames: 4,
            tokens_per_frame: 16,
            text_tokens: 9,
            decode_steps: 2,
        };
        assert_eq!(a.prefill_len(&w), 74);
        // per token linear: 2*(64*64 + 2*64*32 + 64*64 + 3*64*128) = 2*(4096+4096+4096+24576)=73728, x2 layers
        let lin = 2.0 * 73_728.0;
        // Over visible (query, key) pairs: 74 * 75 / 2 = 2775 for the prefill, kv for a decode
        // step.
        let attn = |pairs: f64| 2.0 * 2.0 * 2.0 * pairs * 64.0;
        let head = 2.0 * 64.0 * 512.0;
        let b = a.flops(&w);
        assert_eq!(b.lm_prefill, 74.0 * lin + attn(2775.0) + head);
        assert_eq!(b.lm_decode, 2.0 * (lin + head) + attn(75.0) + attn(76.0));
        assert_eq!(b.projector, 4.0 * 49.0 * 2.0 * (64.0 * 64.0 * 2.0));
    }

    #[test]
    fn reads_llava_onevision_config() {
        let cfg = serde_json::json!({
            "vision_feature_layer": -1,
            "vision_config": {"hidden_size": 64, "image_size": 98, "intermediate_size": 128,
                "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14},
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
        });
        assert_eq!(ArchSpec::from_config_json(&cfg).unwrap(), tiny());
        let missing = serde_json::json!({"vision_config": {}, "text_config": {}});
        assert!(ArchSpec::from_config_json(&missing).is_err());
    }

    #[test]
    fn hidden_state_layer_indices() {
        assert_eq!(hidden_state_layers(26, -1), Some(26));
        assert_eq!(hidden_state_layers(27, -2), Some(26));
        assert_eq!(hidden_state_layers(26, 0), Some(0));
        assert_eq!(hidden_state_layers(26, 27), None);
        assert_eq!(hidden_state_layers(26, -28), None);
    }

    #[test]
    fn so400m_is_about_paper_size() {
        let v = VisionSpec::so400m();
        // ~0.4e9 parameters, and the per-frame count is close to 2 * x_M * x_W in magnitude.
        assert!((v.params() / 0.4e9 - 1.0).abs() < 0.1, "{}", v.params());
        assert_eq!(v.patches(), 729);
    }
}
