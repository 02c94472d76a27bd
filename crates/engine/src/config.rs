//! Serde configs mirroring the checkpoints' `config.json` (LLaVA-OneVision, SigLIP, Llama/Qwen2).

use crate::EngineError;
use serde::{Deserialize, Serialize};

fn default_image_size() -> usize {
    384
}
fn default_patch() -> usize {
    14
}
fn default_channels() -> usize {
    3
}
fn default_ln_eps() -> f64 {
    1e-6
}
fn default_vision_act() -> String {
    "gelu_pytorch_tanh".into()
}

/// SigLIP vision tower (`vision_config`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_vision_act")]
    pub hidden_act: String,
}

impl SiglipVisionConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// so400m/14 at 384 px as the public LLaVA-OneVision checkpoints ship it (26 layers).
    pub fn so400m() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 26,
            num_attention_heads: 16,
            image_size: 384,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu_pytorch_tanh".into(),
        }
    }
}

/// RoPE scaling parameters (`rope_parameters` in transformers 5, `rope_scaling` before).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default, alias = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}

/// Llama or Qwen2 decoder (`text_config`, or a plain LM's config.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

impl TextConfig {
    /// The decoder's shape for exact FLOP accounting.
    pub fn lm_spec(&self) -> vvlm_cost::LmSpec {
        vvlm_cost::LmSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            vocab_size: self.vocab_size,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn is_qwen2(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2")
    }
    /// Qwen2 has biases on q, k and v; Llama has them only when `attention_bias` is set.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.is_qwen2())
    }
    pub fn rope(&self) -> RopeParameters {
        self.rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default()
    }
    pub fn theta(&self) -> f64 {
        self.rope()
            .rope_theta
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }

    /// Llama-3.2-1B's shape (for benchmarks with random weights).
    pub fn llama32_1b() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .expect("valid config")
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        if self.hidden_act != "silu" {
            return Err(EngineError::Unsupported(format!(
                "LM activation `{}` (only silu)",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return Err(EngineError::Unsupported(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(EngineError::Unsupported("odd head_dim".into()));
        }
        match self.rope().rope_type.or(self.rope().kind).as_deref() {
            None | Some("default") | Some("llama3") => Ok(()),
            Some(other) => Err(EngineError::Unsupported(format!("rope type `{other}`"))),
        }
    }
}

fn default_feature_layer() -> i64 {
    -1
}
fn default_strategy() -> String {
    "full".into()
}
fn default_video_token() -> u32 {
    151647
}
fn default_projector_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

/// LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlavaOnevisionConfig {
    pub vision_config: SiglipVisionConfig,
    pub text_config: TextConfig,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "default_video_token")]
    pub video_token_index: u32,
    #[serde(default)]
    pub image_token_index: Option<u32>,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: String,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

impl LlavaOnevisionConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        self.text_config.validate()?;
        if self.vision_feature_select_strategy != "full"
            && self.vision_feature_select_strategy != "default"
        {
            return Err(EngineError::Unsupported(format!(
                "vision_feature_select_strategy `{}`",
                self.vision_feature_select_strategy
            )));
        }
        if self.projector_hidden_act != "gelu" {
            return Err(EngineError::Unsupported(format!(
                "projector activation `{}`",
                self.projector_hidden_act
            )));
        }
        if !matches!(
            self.vision_config.hidden_act.as_str(),
            "gelu_pytorch_tanh" | "gelu"
        ) {
            return Err(EngineError::Unsupported(format!(
                "vision activation `{}`",
                self.vision_config.hidden_act
            )));
        }
        if self.vision_config.patch_size == 0
            || self.vision_config.image_size < self.vision_config.patch_size
        {
            return Err(EngineError::Config(
                "image_size must be at least one patch".into(),
            ));
        }
        self.feature_layers()?;
        Ok(())
    }

    /// Encoder layers that run to produce `hidden_states[vision_feature_layer]`.
    pub fn feature_layers(&self) -> Result<usize, EngineError> {
        let n = self.vision_config.num_hidden_layers as i64;
        let idx = if self.vision_feature_layer < 0 {
            n + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        if !(0..=n).contains(&idx) {
            return Err(EngineError::Config(format!(
                "vision_feature_layer {} is out of range for {n} layers",
                self.vision_feature_layer
            )));
        }
        Ok(idx as usize)
    }

    /// The default pooled side: ceil(grid / 2), as transformers' `apply_pooling`.
    pub fn default_side(&self) -> usize {
        self.vision_config.grid().div_ceil(2)
    }

    pub fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings
            .or(self.text_config.tie_word_embeddings)
            .unwrap_or(false)
    }
}
