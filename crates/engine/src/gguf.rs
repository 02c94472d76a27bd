//! Loading a Llama LM from GGUF (quantized or not): dequantized to the engine's dtype and renamed
//! to the Hugging Face layout, with q/k rows un-permuted (llama.cpp's converter interleaves the
//! rotary halves). The tokenizer is rebuilt from the GGUF metadata.

use crate::config::TextConfig;
use crate::EngineError;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// An LM read from GGUF: its config, HF-named tensors (without the `model.` prefix, plus
/// `lm_head.weight` when untied), tokenizer and chat template.
pub struct GgufLm {
    pub config: TextConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    /// The file's quantization types, e.g. `["Q4_1", "F32"]`.
    pub quantizations: Vec<String>,
    /// The Q4_1/Q8_0 weight matrices as the file stores them (rows in HF order), under HF
    /// names, for quantized decode on the CPU ([`crate::quant`]).
    pub quantized: HashMap<String, crate::quant::QuantMatrix>,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Checkpoint(format!("GGUF metadata `{key}` is missing")))
}

fn md_u(ct: &gguf_file::Content, key: &str) -> Result<usize, EngineError> {
    let v = md(ct, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| EngineError::Checkpoint(format!("GGUF `{key}`: {e}")))
}

fn md_f(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok())
        .map(|v| v as f64)
}

/// Reads the whole LM from a GGUF file: every tensor as `dtype` on `device`, plus (CPU) the
/// Q4_1/Q8_0 matrices as the file stores them.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<GgufLm, EngineError> {
    read(path, dtype, device, true)
}

/// [`load`] without f32 copies of the Q4_1/Q8_0 matrices (CPU): they are in
/// [`GgufLm::quantized`] only, for [`crate::llama::Llama::load_quantized`]. Nothing is
/// dequantized that will not be kept, so loading never holds the whole model in f32 (SmolLM2:
/// peak resident ~0.2 GiB instead of ~1 GiB).
pub fn load_quantized(path: &Path, dtype: DType, device: &Device) -> Result<GgufLm, EngineError> {
    read(path, dtype, device, false)
}

fn read(
    path: &Path,
    dtype: DType,
    device: &Device,
    f32_of_quantized: bool,
) -> Result<GgufLm, EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let ct = gguf_file::Content::read(&mut file).map_err(|e| {
        EngineError::Checkpoint(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    let arch = md(&ct, "general.architecture")?
        .to_string()
        .map_err(|e| EngineError::Checkpoint(e.to_string()))?
        .clone();
    if arch != "llama" {
        return Err(EngineError::Unsupported(format!(
            "GGUF architecture `{arch}` (only llama)"
        )));
    }
    let p = |k: &str| format!("{arch}.{k}");
    let hidden = md_u(&ct, &p("embedding_length"))?;
    let heads = md_u(&ct, &p("attention.head_count"))?;
    let kv_heads = md_u(&ct, &p("attention.head_count_kv")).unwrap_or(heads);
    let layers = md_u(&ct, &p("block_count"))?;
    let ffn = md_u(&ct, &p("feed_forward_length"))?;
    let eps = md_f(&ct, &p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
    let theta = md_f(&ct, &p("rope.freq_base")).unwrap_or(10_000.0);
    // The context the model was trained for: the planner keeps requests within it.
    let context = md_u(&ct, &p("context_length")).ok();
    let emb_info = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| EngineError::Checkpoint("GGUF has no token_embd.weight".into()))?;
    let vocab = emb_info.shape.dims()[0];
    let head_dim = hidden / heads;
    let tied = !ct.tensor_infos.contains_key("output.weight");
    let config: TextConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": eps, "rope_theta": theta,
        "tie_word_embeddings": tied, "max_position_embeddings": context,
        "bos_token_id": ct.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
        "eos_token_id": ct.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
    }))
    .map_err(|e| EngineError::Config(e.to_string()))?;
    let mut tensors = HashMap::new();
    let mut quantizations: Vec<String> = vec![];
    let mut quantized = HashMap::new();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    for name in names {
        let q = ct
            .tensor(&mut file, &name, device)
            .map_err(|e| EngineError::Checkpoint(format!("GGUF tensor {name}: {e}")))?;
        let qt = format!("{:?}", q.dtype());
        if !quantizations.contains(&qt) {
            quantizations.push(qt);
        }
        let Some(hf) = hf_name(&name) else { continue };
        let perm_heads = if hf.ends_with("self_attn.q_proj.weight") {
            Some(heads)
        } else if hf.ends_with("self_attn.k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        let mut kept_quantized = false;
        if device.is_cpu() && hf.ends_with(".weight") && q.shape().rank() == 2 {
            if let Some(qm) = crate::quant::QuantMatrix::from_qtensor(&q)? {
                let qm = match perm_heads {
                    Some(h) => qm.permute_rows(&unpermute_rows(qm.rows, h)?),
                    None => qm,
                };
                quantized.insert(hf.clone(), qm);
                kept_quantized = true;
            }
        }
        if kept_quantized && !f32_of_quantized {
            continue;
        }
        let t = q
            .dequantize(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| EngineError::Checkpoint(format!("dequantizing {name}: {e}")))?;
        let t = match perm_heads {
            Some(h) => unpermute(&t, h)?,
            None => t,
        };
        tensors.insert(hf, t);
    }
    let tokenizer = tokenizer_from_gguf(&ct)?;
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    Ok(GgufLm {
        config,
        tensors,
        tokenizer,
        chat_template,
        quantizations,
        quantized,
    })
}

/// GGUF tensor name -> HF name (relative to the LM's `model.` prefix; `lm_head.weight` as is).
pub fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "embed_tokens.weight".into(),
        "output_norm.weight" => "norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (n, what) = rest.split_once('.')?;
            let hf = match what {
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                _ => return None,
            };
            format!("layers.{n}.{hf}")
        }
    })
}

/// Undoes llama.cpp's q/k row permutation: `(heads, 2, hd/2)` rows back to `(heads, hd/2, 2)`.
/// The row order [`unpermute`] produces: row `i` of the result is row `perm[i]` of the input.
pub fn unpermute_rows(rows: usize, heads: usize) -> Result<Vec<usize>, EngineError> {
    let idx: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let t = Tensor::from_vec(idx, (rows, 1), &Device::Cpu)?;
    Ok(unpermute(&t, heads)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}

pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor, EngineError> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, EngineError> {
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
    let mut tok = Tokenizer::from_gguf(ct)
        .map_err(|e| EngineError::Checkpoint(format!("GGUF tokenizer: {e}")))?;
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned();
    if pre.as_deref() == Some("smollm") {
        // candle maps "smollm" to a byte-level pre-tokenizer that adds a prefix space; SmolLM2's
        // tokenizer.json splits digits individually and adds none.
        let seq = Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]);
        tok.with_pre_tokenizer(Some(seq));
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("token_embd.weight").unwrap(), "embed_tokens.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
        let (heads, hd, inp) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * hd * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
