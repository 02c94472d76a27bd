//! The whole video VLM: SigLIP tower -> projector -> bilinear pooling -> newline -> LM.
//!
//! A checkpoint is a directory with a LLaVA-OneVision `config.json` and safetensors (single or
//! sharded with an index), in transformers' saved layout or the published llava-hf layout. The
//! LM may instead come from a GGUF file named by the config's `vvlm_lm_gguf` field (used by the
//! demo checkpoint: SmolLM2 from GGUF with an untrained vision tower).

use crate::config::LlavaOnevisionConfig;
use crate::gguf;
use crate::llama::Llama;
use crate::nn::{Ctx, Linear};
use crate::pool;
use crate::siglip::SiglipVision;
use crate::template::ChatTemplate;
use crate::EngineError;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;
use vvlm_cost::{ArchSpec, Component, ProjectorSpec, VisionSpec};

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// How decode multiplies a GGUF checkpoint's quantized matrices on the CPU.
    pub quantized_decode: QuantizedDecode,
    /// With int8 quantized decode: prefill multiplies the file's blocks too (8-bit activation
    /// blocks, as llama.cpp runs a quantized file), and those matrices are never dequantized (a
    /// tied embedding table neither: lookups read the head's rows). SmolLM2-135M Q4_1: resident
    /// 123 vs 637 MiB after load (load peak 235 vs 967), prefill 512 tokens ~1.4x faster;
    /// logits move by the activations' rounding, as decode's do.
    pub quantized_prefill: bool,
    /// Prompt tokens prefilled per forward pass (0: the whole prompt at once). A batch runs a
    /// decode step of its other sequences between two chunks of a joining sequence's prefill.
    pub prefill_chunk: usize,
    /// What the LM's KV cache stores keys and values as.
    pub kv_cache: KvCacheDtype,
}

/// The KV cache's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheDtype {
    /// The model's dtype (f32 on the CPU, bf16 on a GPU).
    #[default]
    Auto,
    /// f16 for an f32 LM on the CPU (AVX2, FMA and F16C) whose head size is a multiple of 8:
    /// half the cache's memory, and half the bytes a decode step reads from it, which is most of
    /// a step at long contexts (a video's visual tokens). Keys and values are rounded to f16 (11
    /// significant bits, as llama.cpp's default cache); attention computes in f32. A checkpoint
    /// it cannot apply to keeps its own dtype, with a load note saying why.
    F16,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, EngineError> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "f16" => Ok(Self::F16),
            other => Err(EngineError::Request(format!(
                "unknown kv_cache dtype {other:?} (expected auto or f16)"
            ))),
        }
    }
}

/// The default [`LoadOptions::prefill_chunk`].
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// How CPU decode multiplies a GGUF checkpoint's quantized (Q4_1/Q8_0) matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizedDecode {
    /// The file's blocks times the activations quantized to 8-bit blocks, in integer arithmetic
    /// (llama.cpp's way; the fastest, and a batch costs little more than one sequence). Logits
    /// move by the activations' rounding (SmolLM2-135M: mean ~0.1, max ~1 over a range of ~50).
    #[default]
    Int8,
    /// The dequantized f32 matrices: the f32 forward exactly, reading 4 bytes a weight.
    Off,
}

impl std::str::FromStr for QuantizedDecode {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, EngineError> {
        match s.trim() {
            "int8" => Ok(Self::Int8),
            "off" => Ok(Self::Off),
            other => Err(EngineError::Request(format!(
                "unknown quantized_decode {other:?} (expected int8 or off)"
            ))),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            quantized_decode: QuantizedDecode::default(),
            quantized_prefill: true,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache: KvCacheDtype::default(),
        }
    }
}

impl LoadOptions {
    /// From user-facing names: device `cpu`, `cuda` or `cuda:N`; dtype `f32`, `bf16`, `f16` or
    /// `auto` (bf16 on a GPU, f32 on the CPU, where bf16 matmuls are several times slower).
    /// A CUDA device in a build without the `cuda` feature is a clear error.
    pub fn parse(device: &str, dtype: &str) -> Result<Self, EngineError> {
        let device = match device.trim() {
            "cpu" => Device::Cpu,
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = match d.strip_prefix("cuda:") {
                    Some(n) => n.parse::<usize>().map_err(|_| {
                        EngineError::Request(format!("bad CUDA device ordinal in {d:?}"))
                    })?,
                    None => 0,
                };
                if !candle_core::utils::cuda_is_available() {
                    return Err(EngineError::Unsupported(
                        "device cuda: this binary was built without the `cuda` feature \
                         (cargo build --release --features cuda)"
                            .into(),
                    ));
                }
                crate::cuda_device(ordinal)?
            }
            other => {
                return Err(EngineError::Request(format!(
                    "unknown device {other:?} (expected cpu, cuda or cuda:N)"
                )))
            }
        };
        let dtype = match dtype.trim() {
            "auto" if device.is_cuda() => DType::BF16,
            "auto" | "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => {
                return Err(EngineError::Request(format!(
                    "unknown dtype {other:?} (expected auto, f32, bf16 or f16)"
                )))
            }
        };
        Ok(Self {
            device,
            dtype,
            quantized_decode: QuantizedDecode::default(),
            quantized_prefill: true,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache: KvCacheDtype::default(),
        })
    }
}

/// A loaded video VLM.
pub struct VideoVlm {
    pub cfg: LlavaOnevisionConfig,
    pub vision: SiglipVision,
    proj1: Linear,
    proj2: Linear,
    image_newline: Option<Tensor>,
    pub lm: Llama,
    pub tokenizer: Option<Tokenizer>,
    pub template: ChatTemplate,
    pub dir: PathBuf,
    /// Free-text notes about the checkpoint (e.g. "vision weights are untrained").
    pub notes: Vec<String>,
    pub device: Device,
    pub dtype: DType,
    /// Prompt tokens per prefill pass (see [`LoadOptions::prefill_chunk`]).
    pub prefill_chunk: usize,
    /// Every token's bytes, made on the first JSON-mode request ([`Self::token_bytes`]).
    pub(crate) token_bytes: std::sync::OnceLock<std::sync::Arc<crate::json_mode::TokenBytes>>,
    /// What the token ids mean, made on first use ([`Self::vocabulary_fingerprint`]).
    pub(crate) vocabulary: std::sync::OnceLock<u64>,
    /// Compiled JSON Schemas by their compact text, the most recently used last (at most
    /// [`crate::json_schema::SCHEMAS_KEPT`]): a schema sent again starts with its masks known.
    pub(crate) schemas: std::sync::Mutex<Vec<(String, std::sync::Arc<crate::json_schema::Schema>)>>,
}

fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Checkpoint(format!("{}: {e}", index.display())))?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| {
                EngineError::Checkpoint(format!("{} has no weight_map", index.display()))
            })?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::Checkpoint(format!(
            "no *.safetensors in {}",
            dir.display()
        )));
    }
    Ok(files)
}

fn first_prefix(vb: &VarBuilder, candidates: &[&str], probe: &str) -> Option<String> {
    candidates
        .iter()
        .find(|p| vb.contains_tensor(&format!("{p}.{probe}")))
        .map(|p| p.to_string())
}

impl VideoVlm {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let mut cfg = LlavaOnevisionConfig::from_file(&dir.join("config.json"))?;
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json"))
                .map_err(|e| EngineError::io(dir, e))?,
        )
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let files = safetensor_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; vvlm never writes to checkpoint files
        // while a model is loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, opts.dtype, &opts.device)? };
        let missing = |what: &str| {
            EngineError::Checkpoint(format!(
                "{}: no {what} tensors under any known key layout",
                dir.display()
            ))
        };
        let vp = first_prefix(
            &vb,
            &[
                "vision_tower.vision_model",
                "vision_tower",
                "model.vision_tower.vision_model",
                "model.vision_tower",
            ],
            "embeddings.patch_embedding.weight",
        )
        .ok_or_else(|| missing("vision tower"))?;
        let pp = first_prefix(
            &vb,
            &["multi_modal_projector", "model.multi_modal_projector"],
            "linear_1.weight",
        )
        .ok_or_else(|| missing("projector"))?;
        let layers = cfg.feature_layers()?;
        let vision = SiglipVision::load(vb.pp(&vp), &cfg.vision_config, layers)
            .map_err(|e| ctx_err(&vp, e))?;
        let (hv, ht) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size);
        let bias = cfg.multimodal_projector_bias;
        let proj1 = Linear::load(vb.pp(format!("{pp}.linear_1")), hv, ht, bias)
            .map_err(|e| ctx_err(&pp, e))?;
        let proj2 = Linear::load(vb.pp(format!("{pp}.linear_2")), ht, ht, bias)
            .map_err(|e| ctx_err(&pp, e))?;
        let image_newline = ["image_newline", "model.image_newline"]
            .iter()
            .find(|k| vb.contains_tensor(k))
            .map(|k| vb.get(ht, k))
            .transpose()?;
        let mut notes = vec![];
        if let Some(n) = raw.get("vvlm_notes").and_then(|v| v.as_array()) {
            notes.extend(n.iter().filter_map(|s| s.as_str().map(String::from)));
        }
        let mut template_src: Option<String> = None;
        let (mut lm, mut tokenizer) = match raw.get("vvlm_lm_gguf").and_then(|v| v.as_str()) {
            Some(g) => {
                let gpath = dir.join(g);
                // On the CPU in f32, decode (and by default prefill) reads the file's quantized
                // blocks (same weights); served from them alone, they are never dequantized.
                let quantized_decode = opts.device.is_cpu()
                    && opts.dtype == DType::F32
                    && opts.quantized_decode == QuantizedDecode::Int8;
                let only_quantized = quantized_decode && opts.quantized_prefill;
                let glm = if only_quantized {
                    gguf::load_quantized(&gpath, opts.dtype, &opts.device)?
                } else {
                    gguf::load(&gpath, opts.dtype, &opts.device)?
                };
                if glm.config.hidden_size != ht {
                    return Err(EngineError::Config(format!(
                        "{} has hidden size {}, the projector outputs {ht}",
                        gpath.display(),
                        glm.config.hidden_size
                    )));
                }
                cfg.text_config = glm.config.clone();
                let gguf::GgufLm {
                    tensors,
                    quantized,
                    tokenizer,
                    chat_template,
                    quantizations,
                    config: _,
                } = glm;
                template_src = chat_template;
                let lm_vb = VarBuilder::from_tensors(tensors, opts.dtype, &opts.device);
                let head = (lm_vb.contains_tensor("lm_head.weight")
                    || quantized.contains_key("lm_head.weight"))
                .then(|| lm_vb.pp("lm_head"));
                let (lm, how) = if only_quantized {
                    let lm = Llama::load_quantized(lm_vb, head, &cfg.text_config, &quantized)?;
                    let how = format!(
                        "; prefill and decode read the quantized weights of {} matrices (no f32 copies)",
                        quantized.len()
                    );
                    (lm, how)
                } else {
                    let mut lm = Llama::load(lm_vb, head, &cfg.text_config)?;
                    let attached = if quantized_decode {
                        lm.attach_quantized(&quantized)?
                    } else {
                        0
                    };
                    let how = if attached > 0 {
                        format!("; decode reads the quantized weights of {attached} matrices")
                    } else {
                        String::new()
                    };
                    (lm, how)
                };
                drop(quantized);
                crate::release_free_memory();
                notes.push(format!(
                    "LM from GGUF {} ({}){how}",
                    g,
                    quantizations.join(", ")
                ));
                (lm, Some(tokenizer))
            }
            None => {
                let lp = first_prefix(
                    &vb,
                    &[
                        "language_model.model",
                        "model.language_model",
                        "language_model",
                    ],
                    "embed_tokens.weight",
                )
                .ok_or_else(|| missing("language model"))?;
                let head = if cfg.tied_embeddings() {
                    None
                } else {
                    ["language_model.lm_head", "lm_head"]
                        .iter()
                        .find(|k| vb.contains_tensor(&format!("{k}.weight")))
                        .map(|k| vb.pp(k))
                };
                let lm =
                    Llama::load(vb.pp(&lp), head, &cfg.text_config).map_err(|e| ctx_err(&lp, e))?;
                (lm, None)
            }
        };
        if opts.kv_cache == KvCacheDtype::F16 {
            // A server-wide preference over checkpoints of different shapes: where it cannot
            // apply, this checkpoint keeps its own dtype and says why.
            notes.push(match lm.set_kv_cache_dtype(DType::F16) {
                Ok(()) => "KV cache in f16 (decode reads half the bytes)".into(),
                Err(e) => format!(
                    "kv_cache f16 not applied ({e}); the KV cache stays {:?}",
                    opts.dtype
                ),
            });
        }
        let tok_path = dir.join("tokenizer.json");
        if tok_path.exists() {
            tokenizer =
                Some(Tokenizer::from_file(&tok_path).map_err(|e| {
                    EngineError::Checkpoint(format!("{}: {e}", tok_path.display()))
                })?);
        }
        let tc_path = dir.join("tokenizer_config.json");
        if tc_path.exists() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(&tc_path).unwrap_or_default(),
            ) {
                if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                    template_src = Some(t.to_string());
                }
            }
        }
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.as_ref()?.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = token_text(cfg.text_config.bos_token_id);
        let eos = token_text(cfg.text_config.eos_ids().first().copied());
        let (template, template_error) =
            ChatTemplate::from_source(template_src.as_deref(), &bos, &eos);
        notes.extend(template_error);
        Ok(Self {
            cfg,
            vision,
            proj1,
            proj2,
            image_newline,
            lm,
            tokenizer,
            template,
            dir: dir.to_path_buf(),
            notes,
            device: opts.device.clone(),
            dtype: opts.dtype,
            prefill_chunk: opts.prefill_chunk,
            token_bytes: Default::default(),
            vocabulary: Default::default(),
            schemas: Default::default(),
        })
    }

    /// Grid side of the vision tower (27 for so400m/14 at 384 px).
    pub fn grid(&self) -> usize {
        self.cfg.vision_config.grid()
    }

    /// The architecture for exact FLOP accounting.
    pub fn arch(&self) -> ArchSpec {
        let v = &self.cfg.vision_config;
        let t = &self.cfg.text_config;
        ArchSpec {
            vision: VisionSpec {
                image_size: v.image_size,
                patch_size: v.patch_size,
                num_channels: v.num_channels,
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                num_attention_heads: v.num_attention_heads,
                layers_run: self.cfg.feature_layers().unwrap_or(v.num_hidden_layers),
            },
            projector: ProjectorSpec {
                in_features: v.hidden_size,
                hidden: t.hidden_size,
                out_features: t.hidden_size,
            },
            lm: t.lm_spec(),
            video_newline: self.image_newline.is_some(),
        }
    }

    /// Vision features `[frames, patches, hidden]` of preprocessed pixels `[frames, 3, H, W]`.
    pub fn vision_features(&self, pixels: &Tensor, ctx: &mut Ctx) -> Result<Tensor, EngineError> {
        self.vision_features_with(pixels, ctx, &mut || {})
    }

    /// [`Self::vision_features`], calling `after_layer` after each tower layer.
    fn vision_features_with(
        &self,
        pixels: &Tensor,
        ctx: &mut Ctx,
        after_layer: &mut dyn FnMut(),
    ) -> Result<Tensor, EngineError> {
        let saved = ctx.component;
        ctx.component = Component::Vision;
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let out = self.vision.forward_with(&pixels, ctx, after_layer);
        ctx.component = saved;
        Ok(out?)
    }

    /// Projector over every patch feature: `[frames, patches, hv]` -> `[frames, patches, ht]`.
    pub fn project(&self, features: &Tensor, ctx: &mut Ctx) -> Result<Tensor, EngineError> {
        let saved = ctx.component;
        ctx.component = Component::Projector;
        let r = (|| {
            let h = self.proj1.forward(features, ctx)?;
            ctx.tap(|| "projector.linear_1_out".into(), &h);
            let h = h.gelu_erf()?;
            self.proj2.forward(&h, ctx)
        })();
        ctx.component = saved;
        let out = r?;
        ctx.tap(|| "projector.out".into(), &out);
        Ok(out)
    }

    /// The visual tokens of a video: `[frames * side^2 (+1 newline), ht]`.
    pub fn encode_video(
        &self,
        pixels: &Tensor,
        side: usize,
        ctx: &mut Ctx,
    ) -> Result<Tensor, EngineError> {
        self.check_side(side)?;
        let projected = self.projected_frames(pixels, ctx)?;
        self.video_tokens(&projected, side, ctx)
    }

    pub(crate) fn check_side(&self, side: usize) -> Result<(), EngineError> {
        let grid = self.grid();
        if side == 0 || side > grid {
            return Err(EngineError::Request(format!(
                "tokens per frame must be s*s with 1 <= s <= {grid}, got s = {side}"
            )));
        }
        Ok(())
    }

    /// Tower and projector over every frame: `[frames, g*g, ht]`, before pooling. Pooling it
    /// to several sides ([`Self::video_tokens`]) encodes each frame once.
    pub fn projected_frames(&self, pixels: &Tensor, ctx: &mut Ctx) -> Result<Tensor, EngineError> {
        let feats = self.vision_features(pixels, ctx)?;
        self.project(&feats, ctx)
    }

    /// Frames per tower pass when a video's encoding is interleaved with other work
    /// ([`Self::projected_frames_stepping`]): as many as hold [`Self::prefill_chunk`] patches, at
    /// least one (every frame when chunking is off), so one layer of a pass is a bounded piece
    /// of work.
    pub fn frames_per_pass(&self, frames: usize) -> usize {
        let patches = self.grid() * self.grid();
        if self.prefill_chunk == 0 {
            return frames.max(1);
        }
        (self.prefill_chunk / patches.max(1)).clamp(1, frames.max(1))
    }

    /// [`Self::projected_frames`] in passes of [`Self::frames_per_pass`] frames, calling
    /// `between` (a running batch takes a decode step there) at the first tower layer or pass
    /// boundary after `quantum` has passed since the last call (zero: at every boundary). Frames
    /// are encoded independently (the tower's attention is within a frame) and a pause changes
    /// no arithmetic, so the result equals one pass over every frame on the CPU bit for bit
    /// (tested), FLOPs included.
    pub fn projected_frames_stepping(
        &self,
        pixels: &Tensor,
        ctx: &mut Ctx,
        quantum: std::time::Duration,
        between: &mut dyn FnMut(),
    ) -> Result<Tensor, EngineError> {
        let frames = pixels.dim(0)?;
        let per = self.frames_per_pass(frames);
        let mut last = std::time::Instant::now();
        let mut boundary = || {
            if last.elapsed() >= quantum {
                between();
                last = std::time::Instant::now();
            }
        };
        let mut parts = Vec::with_capacity(frames.div_ceil(per));
        for start in (0..frames).step_by(per) {
            let n = per.min(frames - start);
            let chunk = if n == frames {
                pixels.clone()
            } else {
                pixels.narrow(0, start, n)?
            };
            let feats = self.vision_features_with(&chunk, ctx, &mut boundary)?;
            parts.push(self.project(&feats, ctx)?);
            if start + n < frames {
                boundary();
            }
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Pooled tokens of projected frames, flattened, with the newline:
    /// `[frames * side^2 (+1), ht]`.
    pub fn video_tokens(
        &self,
        projected: &Tensor,
        side: usize,
        ctx: &mut Ctx,
    ) -> Result<Tensor, EngineError> {
        self.check_side(side)?;
        let pooled = pool::pool(projected, self.grid(), side)?;
        ctx.tap(|| "pooled".into(), &pooled);
        let (f, n, d) = pooled.dims3()?;
        let flat = pooled.reshape((f * n, d))?;
        let out = match &self.image_newline {
            Some(nl) => Tensor::cat(&[&flat, &nl.unsqueeze(0)?], 0)?,
            None => flat,
        };
        ctx.tap(|| "video_features".into(), &out);
        Ok(out)
    }

    /// Input embeddings `[1, L, h]`: prefix tokens, the video's tokens, suffix tokens.
    pub fn input_embeddings(
        &self,
        prefix: &[u32],
        video: Option<&Tensor>,
        suffix: &[u32],
    ) -> Result<Tensor, EngineError> {
        let mut parts = vec![];
        if !prefix.is_empty() {
            parts.push(self.lm.embed(prefix)?);
        }
        if let Some(v) = video {
            parts.push(v.to_dtype(self.dtype)?.unsqueeze(0)?);
        }
        if !suffix.is_empty() {
            parts.push(self.lm.embed(suffix)?);
        }
        if parts.is_empty() {
            return Err(EngineError::Request("empty input".into()));
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Splits ids around the first contiguous run of the video placeholder token.
    pub fn split_placeholder<'a>(
        &self,
        ids: &'a [u32],
    ) -> Result<(&'a [u32], usize, &'a [u32]), EngineError> {
        let vt = self.cfg.video_token_index;
        let start = ids.iter().position(|&t| t == vt).ok_or_else(|| {
            EngineError::Request(format!("input_ids contain no video placeholder ({vt})"))
        })?;
        let len = ids[start..].iter().take_while(|&&t| t == vt).count();
        let rest = &ids[start + len..];
        if rest.contains(&vt) {
            return Err(EngineError::Request(
                "video placeholders must form one contiguous run".into(),
            ));
        }
        Ok((&ids[..start], len, rest))
    }
}

fn ctx_err(prefix: &str, e: candle_core::Error) -> EngineError {
    EngineError::Checkpoint(format!("under `{prefix}`: {e}"))
}

impl VideoVlm {
    /// The whole forward pass on given inputs, returning every intermediate under the reference
    /// fixture's names (`vision.layer_out.{i}`, `projector.out`, `pooled`, `video_features`,
    /// `text.inputs_embeds`, `text.layer_out.{i}`, `logits`, ...). `input_ids` must contain one
    /// run of video placeholders; it is replaced by the frames' tokens for pooled side `side`.
    /// Logits are computed for every position (so the LM head's count covers all of them).
    pub fn debug_forward(
        &self,
        pixels: &Tensor,
        input_ids: &[u32],
        side: usize,
        flops: &vvlm_cost::FlopCounter,
    ) -> Result<std::collections::BTreeMap<String, Tensor>, EngineError> {
        if self.lm.device().is_cpu() {
            crate::cpu_pool::run(|| self.debug_forward_here(pixels, input_ids, side, flops))
        } else {
            self.debug_forward_here(pixels, input_ids, side, flops)
        }
    }

    fn debug_forward_here(
        &self,
        pixels: &Tensor,
        input_ids: &[u32],
        side: usize,
        flops: &vvlm_cost::FlopCounter,
    ) -> Result<std::collections::BTreeMap<String, Tensor>, EngineError> {
        let mut taps = std::collections::BTreeMap::new();
        let (prefix, _len, suffix) = self.split_placeholder(input_ids)?;
        let mut ctx = Ctx::with_taps(flops, Component::LmPrefill, &mut taps);
        let video = self.encode_video(pixels, side, &mut ctx)?;
        let embeds = self.input_embeddings(prefix, Some(&video), suffix)?;
        ctx.tap(|| "text.inputs_embeds".into(), &embeds);
        let mut cache = self.lm.new_cache();
        let hidden = self.lm.forward_hidden(&embeds, &mut cache, &mut ctx)?;
        let logits = self.lm.logits(&hidden, &ctx)?;
        ctx.tap(|| "logits".into(), &logits);
        let inv = self.lm.inv_freq();
        let n = inv.len();
        taps.insert(
            "rope.inv_freq".into(),
            Tensor::from_vec(inv, n, &Device::Cpu)?,
        );
        Ok(taps)
    }
}

#[cfg(test)]
mod load_options_tests {
    use super::*;

    #[test]
    fn device_and_dtype_names() {
        let o = LoadOptions::parse("cpu", "auto").unwrap();
        assert!(o.device.is_cpu() && o.dtype == DType::F32);
        assert_eq!(
            LoadOptions::parse("cpu", "bf16").unwrap().dtype,
            DType::BF16
        );
        assert!(LoadOptions::parse("tpu", "f32").is_err());
        assert!(LoadOptions::parse("cpu", "int3").is_err());
        assert!(LoadOptions::parse("cuda:x", "f32").is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = LoadOptions::parse("cuda", "auto").unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{e}");
        }
    }
}
