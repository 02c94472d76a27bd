//! The demo checkpoint: a real LM (SmolLM2 from GGUF) behind a deterministic, randomly
//! initialised (untrained) SigLIP tower and projector. Used until a trained vision tower is
//! available; every output made with it says the vision weights are untrained.

use crate::config::SiglipVisionConfig;
use crate::EngineError;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A deterministic normal generator (SplitMix64 + Box-Muller).
pub struct NormalRng(u64);

/// splitmix64's increment: draw `i` of a stream is a function of `start + (i + 1)·GAMMA` alone,
/// so any stretch of the stream can be drawn without the ones before it.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Values a worker draws in one go when [`NormalRng::tensor`] fills a tensor in parallel.
const CHUNK: usize = 1 << 16;

impl NormalRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0xA076_1D64_78BD_642F)
    }
    fn u(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.u().max(1e-300);
        let u2 = self.u();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    /// A tensor of N(0, std^2) values: the next values of this stream, drawn in parallel
    /// chunks on the engine's pool (each chunk starts at its own place in the stream: the same
    /// values as one draw after another; a Llama-1B shape's 1.2 G values took ~30 s on one
    /// thread, and every GPU benchmark step draws them again).
    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Result<Tensor, EngineError> {
        use rayon::prelude::*;
        let n: usize = shape.iter().product();
        let start = self.0;
        // Two draws a value (Box-Muller's u1, u2).
        let at = |value: usize| start.wrapping_add((2 * value as u64).wrapping_mul(GAMMA));
        let mut v = vec![0f32; n];
        crate::cpu_pool::run(|| {
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = NormalRng(at(c * CHUNK));
                for x in chunk {
                    *x = rng.normal() * std;
                }
            })
        });
        self.0 = at(n);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// Scale of the untrained projector's output layer. Small, so the random visual tokens are
/// near-zero vectors the LM mostly ignores and its text stays readable (with 0.02, hundreds of
/// random tokens derail SmolLM2 into emitting newlines).
const DEMO_PROJECTOR_OUT_STD: f32 = 0.001;

/// The demo's vision shape: so400m's geometry (384 px, patch 14, 27x27 = 729 tokens per frame)
/// with a narrow, shallow encoder so CPU demos run in seconds.
pub fn demo_vision_config() -> SiglipVisionConfig {
    SiglipVisionConfig {
        hidden_size: 256,
        intermediate_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        image_size: 384,
        patch_size: 14,
        num_channels: 3,
        layer_norm_eps: 1e-6,
        hidden_act: "gelu_pytorch_tanh".into(),
    }
}

/// Random vision tower + projector + newline tensors under transformers' key names.
pub fn random_vision_tensors(
    v: &SiglipVisionConfig,
    text_hidden: usize,
    seed: u64,
) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut rng = NormalRng::new(seed);
    let mut t = HashMap::new();
    let (h, i, p, c) = (
        v.hidden_size,
        v.intermediate_size,
        v.patch_size,
        v.num_channels,
    );
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu);
    let pre = "vision_tower.vision_model";
    t.insert(
        format!("{pre}.embeddings.patch_embedding.weight"),
        rng.tensor(&[h, c, p, p], 0.02)?,
    );
    t.insert(format!("{pre}.embeddings.patch_embedding.bias"), zeros(h)?);
    t.insert(
        format!("{pre}.embeddings.position_embedding.weight"),
        rng.tensor(&[v.grid() * v.grid(), h], 0.02)?,
    );
    for l in 0..v.num_hidden_layers {
        let lp = format!("{pre}.encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.insert(
                format!("{lp}.self_attn.{n}.weight"),
                rng.tensor(&[h, h], 0.02)?,
            );
            t.insert(format!("{lp}.self_attn.{n}.bias"), zeros(h)?);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            t.insert(format!("{lp}.{n}.weight"), ones(h)?);
            t.insert(format!("{lp}.{n}.bias"), zeros(h)?);
        }
        t.insert(format!("{lp}.mlp.fc1.weight"), rng.tensor(&[i, h], 0.02)?);
        t.insert(format!("{lp}.mlp.fc1.bias"), zeros(i)?);
        t.insert(format!("{lp}.mlp.fc2.weight"), rng.tensor(&[h, i], 0.02)?);
        t.insert(format!("{lp}.mlp.fc2.bias"), zeros(h)?);
    }
    t.insert(format!("{pre}.post_layernorm.weight"), ones(h)?);
    t.insert(format!("{pre}.post_layernorm.bias"), zeros(h)?);
    t.insert(
        "multi_modal_projector.linear_1.weight".into(),
        rng.tensor(&[text_hidden, h], 0.02)?,
    );
    t.insert(
        "multi_modal_projector.linear_1.bias".into(),
        zeros(text_hidden)?,
    );
    t.insert(
        "multi_modal_projector.linear_2.weight".into(),
        rng.tensor(&[text_hidden, text_hidden], DEMO_PROJECTOR_OUT_STD)?,
    );
    t.insert(
        "multi_modal_projector.linear_2.bias".into(),
        zeros(text_hidden)?,
    );
    t.insert("image_newline".into(), rng.tensor(&[text_hidden], 0.02)?);
    Ok(t)
}

/// Writes a demo checkpoint directory next to (or pointing at) an LM GGUF file.
pub fn write_demo_checkpoint(
    dir: &Path,
    gguf_path: &Path,
    vision: &SiglipVisionConfig,
    seed: u64,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let mut f = std::fs::File::open(gguf_path).map_err(|e| EngineError::io(gguf_path, e))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| EngineError::Checkpoint(format!("{}: {e}", gguf_path.display())))?;
    let get = |k: &str| -> Result<usize, EngineError> {
        ct.metadata
            .get(k)
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .ok_or_else(|| EngineError::Checkpoint(format!("GGUF metadata `{k}` is missing")))
    };
    let hidden = get("llama.embedding_length")?;
    let heads = get("llama.attention.head_count")?;
    let tensors = random_vision_tensors(vision, hidden, seed)?;
    candle_core::safetensors::save(&tensors, dir.join("vision.safetensors"))?;
    let gguf_abs = std::fs::canonicalize(gguf_path).map_err(|e| EngineError::io(gguf_path, e))?;
    let cfg = serde_json::json!({
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "vision_config": vision,
        "text_config": {
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": get("llama.feed_forward_length")?,
            "num_hidden_layers": get("llama.block_count")?, "num_attention_heads": heads,
            "num_key_value_heads": get("llama.attention.head_count_kv").unwrap_or(heads),
            "vocab_size": ct.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).unwrap_or(0)
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "video_token_index": 0xFFFF_FFFFu32,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vvlm_lm_gguf": gguf_abs.display().to_string(),
        "vvlm_notes": [format!(
            "UNTRAINED vision tower and projector (deterministic random init, seed {seed}): the text is \
             the LM's, the video does not inform it"
        )],
    });
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&cfg).expect("json") + "\n",
    )
    .map_err(|e| EngineError::io(&path, e))?;
    Ok(())
}

/// Random Llama/Qwen2 tensors (HF names relative to the LM's `model.` prefix) for a config:
/// benchmarks of real shapes without real weights.
pub fn random_lm_tensors(
    cfg: &crate::TextConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>, EngineError> {
    let mut rng = NormalRng::new(seed);
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    let mut t = HashMap::new();
    t.insert(
        "embed_tokens.weight".to_string(),
        rng.tensor(&[cfg.vocab_size, h], 0.02)?,
    );
    t.insert("norm.weight".to_string(), ones(h)?);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("layers.{l}");
        t.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rng.tensor(&[q, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rng.tensor(&[kv, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rng.tensor(&[kv, h], 0.02)?,
        );
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rng.tensor(&[h, q], 0.02)?,
        );
        if cfg.qkv_bias() {
            for (n, d) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                t.insert(format!("{p}.self_attn.{n}.bias"), rng.tensor(&[d], 0.02)?);
            }
        }
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            rng.tensor(&[i, h], 0.02)?,
        );
        t.insert(
            format!("{p}.mlp.up_proj.weight"),
            rng.tensor(&[i, h], 0.02)?,
        );
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            rng.tensor(&[h, i], 0.02)?,
        );
        t.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draws one after another, as `tensor` made them before it drew in parallel.
    fn sequential(rng: &mut NormalRng, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| rng.normal() * std).collect()
    }

    #[test]
    fn a_tensor_drawn_in_parallel_equals_the_draws_one_after_another() {
        // Three chunks and a ragged tail, then a second tensor continuing the stream.
        let (mut par, mut seq) = (NormalRng::new(7), NormalRng::new(7));
        for (n, std) in [(2 * CHUNK + 12_345, 0.02f32), (1, 1.0), (CHUNK, 0.5)] {
            let got = par.tensor(&[n], std).unwrap().to_vec1::<f32>().unwrap();
            let want = sequential(&mut seq, n, std);
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(got.len(), want.len());
        }
        // The stream goes on where the sequential one does.
        assert_eq!(par.normal().to_bits(), seq.normal().to_bits());
    }
}
