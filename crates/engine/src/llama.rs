//! Llama 3.x / Qwen2 decoder over input embeddings, with a KV cache. RoPE with llama3 scaling
//! (half rotation, not interleaved), GQA, RMSNorm, SwiGLU, tied or untied LM head.

use crate::attention::{attention, Masking};
use crate::config::TextConfig;
use crate::nn::{Ctx, Linear, RmsNorm};
use crate::EngineError;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

/// RoPE inverse frequencies, with llama3 scaling when configured (computed in f32 as torch does).
pub fn inv_freq(cfg: &TextConfig) -> Vec<f32> {
    let d = cfg.head_dim();
    let theta = cfg.theta() as f32;
    let base: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / d as f32))
        .collect();
    let rope = cfg.rope();
    let kind = rope.rope_type.clone().or(rope.kind.clone());
    if kind.as_deref() != Some("llama3") {
        return base;
    }
    let factor = rope.factor.unwrap_or(8.0) as f32;
    let low = rope.low_freq_factor.unwrap_or(1.0) as f32;
    let high = rope.high_freq_factor.unwrap_or(4.0) as f32;
    let old = rope.original_max_position_embeddings.unwrap_or(8192) as f32;
    let low_wavelen = old / low;
    let high_wavelen = old / high;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen > low_wavelen {
                f / factor
            } else if wavelen < high_wavelen {
                f
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

/// Precomputed cos/sin tables, grown on demand.
pub struct Rope {
    inv_freq: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Rope {
    pub fn new(cfg: &TextConfig, device: &Device) -> Result<Self> {
        let mut r = Self {
            inv_freq: inv_freq(cfg),
            cos: Tensor::zeros((0, cfg.head_dim() / 2), DType::F32, device)?,
            sin: Tensor::zeros((0, cfg.head_dim() / 2), DType::F32, device)?,
            device: device.clone(),
        };
        r.grow(4096)?;
        Ok(r)
    }

    fn grow(&mut self, len: usize) -> Result<()> {
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(len * half);
        for p in 0..len {
            for f in &self.inv_freq {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (len, half), &self.device)?;
        self.cos = freqs.cos()?;
        self.sin = freqs.sin()?;
        Ok(())
    }

    fn tables(&mut self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if start + len > self.cos.dim(0)? {
            self.grow((start + len).next_power_of_two())?;
        }
        Ok((
            self.cos.narrow(0, start, len)?.to_dtype(dtype)?,
            self.sin.narrow(0, start, len)?.to_dtype(dtype)?,
        ))
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rows of the tables at arbitrary positions (one per sequence of a batch).
    fn tables_at(&mut self, positions: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        let max = positions.iter().copied().max().unwrap_or(0);
        if max + 1 > self.cos.dim(0)? {
            self.grow((max + 1).next_power_of_two())?;
        }
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &self.device)?;
        Ok((
            self.cos.index_select(&idx, 0)?.to_dtype(dtype)?,
            self.sin.index_select(&idx, 0)?.to_dtype(dtype)?,
        ))
    }
}

struct Attention {
    /// q, k and v stacked: `[heads·d + 2·kv_heads·d, hidden]`.
    qkv: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// [`SplitRope`] of the fused product `[b, len, (heads + 2·kv_heads)·d]` at `cos`/`sin`.
    fn split_rope(&self, qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let op = SplitRope {
            rotated: self.heads + self.kv_heads,
            heads: self.heads + 2 * self.kv_heads,
            head_dim: self.head_dim,
        };
        qkv.contiguous()?
            .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
    }
}

struct Mlp {
    /// gate and up stacked: `[2·intermediate, hidden]`.
    gate_up: Linear,
    down: Linear,
}

struct Block {
    attn: Attention,
    mlp: Mlp,
    ln1: RmsNorm,
    ln2: RmsNorm,
}

/// Per-layer key/value cache of one sequence: preallocated buffers `[b, kv_heads, capacity, d]`
/// written in place, read through a view of the filled positions (no copy of the whole cache per
/// generated token). A sequence that knows how many positions it may reach (prompt + max tokens:
/// what a batch's admission reserves for it) plans them ([`Self::plan_positions`]) and its
/// buffers are allocated once at that size; otherwise (or past the plan) they grow by doubling,
/// each growth a copy of the whole cache (for 8 sequences of a batch one step in which one
/// crosses 256 or 512 positions waits on that copy). Not `Clone`: written in place.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// The type keys and values are stored in (`None`: as the model computes them). F16 on the
    /// CPU halves what a decode step reads from memory ([`Llama::set_kv_cache_dtype`]).
    dtype: Option<DType>,
    /// Positions the buffers are allocated for when they are (re)allocated below this (0: none
    /// planned).
    planned: usize,
}

struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions a cache holds when first allocated.
const INITIAL_CAPACITY: usize = 256;

impl LayerCache {
    /// Makes room for `n` more positions of rows shaped like `k` (`[b, kv_heads, _, d]`, its
    /// dtype and device): a new buffer holding the filled positions when they do not fit (so a
    /// cache continuing from a snapshot, whose buffers are exactly full, never writes into it).
    /// `planned` positions (0: none) are allocated at once when they hold the new ones;
    /// otherwise capacity doubles (at least [`INITIAL_CAPACITY`]).
    fn reserve(slot: &mut Option<LayerCache>, k: &Tensor, n: usize, planned: usize) -> Result<()> {
        let (b, h, _, d) = k.dims4()?;
        Self::reserve_as(slot, (b, h, d), k.dtype(), k.device(), n, planned)
    }

    /// [`Self::reserve`] for rows of shape `[b, kv_heads, _, d]` (`shape` = (b, kv_heads, d))
    /// of `dtype` on `device`.
    fn reserve_as(
        slot: &mut Option<LayerCache>,
        (b, h, d): (usize, usize, usize),
        dtype: DType,
        device: &Device,
        n: usize,
        planned: usize,
    ) -> Result<()> {
        let len = slot.as_ref().map_or(0, |c| c.len);
        let cap = slot.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if len + n > cap {
            let new_cap = if planned >= len + n {
                planned
            } else {
                (len + n).max(2 * cap).max(INITIAL_CAPACITY)
            };
            let nk = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
            let nv = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
            if let Some(old) = slot.as_ref() {
                nk.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerCache { k: nk, v: nv, len });
        }
        Ok(())
    }

    /// Views of everything cached.
    fn views(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Appends `k`, `v` (`[b, kv_heads, n, d]`) and returns views of everything cached.
    fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
        planned: usize,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        Self::reserve(slot, k, n, planned)?;
        let c = slot.as_mut().expect("allocated by reserve");
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += n;
        c.views()
    }
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of what the cache holds that shares nothing with it, each layer's buffers exactly
    /// as long as its positions: a cache cloned from it reallocates on its first append, so
    /// sequences continuing from one snapshot never write into it or into each other.
    pub fn snapshot(&self) -> Result<KvCache> {
        let own = |t: Tensor| -> Result<Tensor> {
            if t.is_contiguous() {
                t.copy()
            } else {
                t.contiguous()
            }
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|c| -> Result<LayerCache> {
                        Ok(LayerCache {
                            k: own(c.k.narrow(2, 0, c.len)?)?,
                            v: own(c.v.narrow(2, 0, c.len)?)?,
                            len: c.len,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            dtype: self.dtype,
            planned: 0,
        })
    }

    /// A cache continuing from a [`Self::snapshot`] (sharing its buffers until it appends).
    pub(crate) fn continue_from(snapshot: &KvCache) -> KvCache {
        KvCache {
            dtype: snapshot.dtype,
            planned: 0,
            layers: snapshot
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|c| LayerCache {
                        k: c.k.clone(),
                        v: c.v.clone(),
                        len: c.len,
                    })
                })
                .collect(),
        }
    }

    /// Appends layer `layer`'s new keys and values (`[b, kv_heads, n, d]`, stored as the cache's
    /// dtype) and returns views of everything cached.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer];
        match self.dtype {
            Some(dt) if dt != k.dtype() => {
                LayerCache::append(slot, &k.to_dtype(dt)?, &v.to_dtype(dt)?, self.planned)
            }
            _ => LayerCache::append(slot, k, v, self.planned),
        }
    }

    /// [`Self::append`] of one new position on the CPU from f32 rows (`k`, `v`: `kv_heads` rows
    /// of `d`, head by head), written straight into the buffers (rounded to f16 for an f16
    /// cache, as `to_dtype` rounds: to nearest, ties to even) instead of through tensors: at 8
    /// sequences of SmolLM2 the tensor route's ~8 operations a sequence and layer were ~0.5 ms
    /// of a ~9 ms step. Returns the views of everything cached.
    fn append_row_cpu(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        (kv_heads, d): (usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let dtype = self.dtype.unwrap_or(DType::F32);
        let slot = &mut self.layers[layer];
        LayerCache::reserve_as(slot, (1, kv_heads, d), dtype, &Device::Cpu, 1, self.planned)?;
        let c = slot.as_mut().expect("allocated by reserve");
        let pos = c.len;
        c.k.inplace_op1(&WriteCpuRow { row: k, pos, d })?;
        c.v.inplace_op1(&WriteCpuRow { row: v, pos, d })?;
        c.len += 1;
        c.views()
    }

    /// Asks the memory system for the lines that layer `layer`'s next position will be written
    /// to (CPU caches only; a hint, nothing is read or written): a decode step writes each
    /// sequence's new keys and values right after the q/k/v product, into buffers the rest of
    /// the step has pushed out of the processor's caches, and asked for before the product they
    /// arrive while it runs.
    pub(crate) fn prefetch_next_row(&self, layer: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            let Some(Some(c)) = self.layers.get(layer) else {
                return;
            };
            for t in [&c.k, &c.v] {
                let Ok((_, heads, cap, d)) = t.dims4() else {
                    return;
                };
                if c.len >= cap {
                    return;
                }
                let (s, l) = t.storage_and_layout();
                let (base, size) = match &*s {
                    candle_core::Storage::Cpu(CpuStorage::F32(x)) => {
                        (x[l.start_offset()..].as_ptr() as *const u8, 4)
                    }
                    candle_core::Storage::Cpu(CpuStorage::F16(x)) => {
                        (x[l.start_offset()..].as_ptr() as *const u8, 2)
                    }
                    _ => return,
                };
                let st = l.stride();
                for h in 0..heads {
                    let row = base.wrapping_add((h * st[1] + c.len * st[2]) * size);
                    let mut b = 0;
                    while b < d * size {
                        // SAFETY: a prefetch hint only; it never faults or reads into Rust.
                        unsafe { _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_add(b) as *const i8) };
                        b += 64;
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = layer;
    }

    /// Plans `positions` in all: the buffers are then allocated (or, continuing from a
    /// snapshot, reallocated) once at that size instead of growing by doubling.
    pub fn plan_positions(&mut self, positions: usize) {
        self.planned = positions;
    }

    /// Positions the buffers hold without growing (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.k.dim(2).unwrap_or(0))
    }

    /// One decode step's new position of every sequence at layer `layer`: row `i` of `k`/`v`
    /// (`[1, kv_heads, B, d]`) appended to `caches[i]`, as [`Self::append`] would one by one;
    /// returns each sequence's views of everything cached. On CUDA, where every cache stores
    /// the rows' dtype, all sequences are written by one launch (`kernels/kv_append.cu`)
    /// instead of two copies each.
    fn append_rows(
        caches: &mut [&mut KvCache],
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        #[cfg(feature = "cuda")]
        if crate::fused_on(k.device())
            && matches!(k.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && caches
                .iter()
                .all(|c| c.dtype.is_none_or(|dt| dt == k.dtype()))
        {
            let row = k.narrow(2, 0, 1)?;
            for c in caches.iter_mut() {
                LayerCache::reserve(&mut c.layers[layer], &row, 1, c.planned)?;
            }
            {
                let filled: Vec<&LayerCache> = caches
                    .iter()
                    .map(|c| c.layers[layer].as_ref().expect("reserved above"))
                    .collect();
                let slots: Vec<crate::cuda::AppendSlot> = filled
                    .iter()
                    .map(|c| crate::cuda::AppendSlot {
                        k: &c.k,
                        v: &c.v,
                        pos: c.len,
                    })
                    .collect();
                crate::cuda::kv_append(k, v, &slots)?;
            }
            return caches
                .iter_mut()
                .map(|c| {
                    let lc = c.layers[layer].as_mut().expect("reserved above");
                    lc.len += 1;
                    lc.views()
                })
                .collect();
        }
        caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| cache.append(layer, &k.narrow(2, i, 1)?, &v.narrow(2, i, 1)?))
            .collect()
    }

    /// Bytes of the buffers (capacity, not only the filled positions).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|c| (c.k.elem_count() + c.v.elem_count()) * c.k.dtype().size_in_bytes())
            .sum()
    }
}

/// Token embeddings: an f32 table, or a quantized matrix whose rows are dequantized per lookup
/// (a GGUF LM served from its blocks; tied, it is the head's matrix).
enum EmbedTable {
    F32(Embedding),
    Quantized(std::sync::Arc<crate::quant::PackedMatrix>),
}

/// The file's quantized matrices under HF names (see [`crate::gguf::GgufLm::quantized`]).
pub type QuantizedWeights = std::collections::HashMap<String, crate::quant::QuantMatrix>;

/// A linear layer whose weights are `parts` (stacked along the output dimension; names relative
/// to `vb`, e.g. `q_proj`), `in_f` inputs, outputs `parts`' sizes: from the quantized matrices
/// when `quant` has every part (no f32 copy), else from `vb`'s tensors.
fn linear(
    vb: &VarBuilder,
    quant: Option<(&QuantizedWeights, &str)>,
    parts: &[(&str, usize)],
    in_f: usize,
    bias: bool,
) -> Result<Linear> {
    if let Some((q, prefix)) = quant {
        let mats: Option<Vec<&crate::quant::QuantMatrix>> = parts
            .iter()
            .map(|(p, _)| q.get(&format!("{prefix}{p}.weight")))
            .collect();
        if let Some(m) = mats.and_then(|m| crate::quant::QuantMatrix::concat_rows(&m)) {
            let out: usize = parts.iter().map(|(_, o)| o).sum();
            if (m.rows, m.cols) != (out, in_f) {
                candle_core::bail!(
                    "quantized {prefix}{} is [{}, {}], expected [{out}, {in_f}]",
                    parts[0].0,
                    m.rows,
                    m.cols
                );
            }
            let b = if bias {
                let bs = parts
                    .iter()
                    .map(|(p, o)| vb.pp(*p).get(*o, "bias"))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            return Linear::from_quantized(m, b);
        }
    }
    let mut ls = parts
        .iter()
        .map(|(p, o)| Linear::load(vb.pp(*p), in_f, *o, bias))
        .collect::<Result<Vec<_>>>()?;
    if ls.len() == 1 {
        return Ok(ls.remove(0));
    }
    Linear::concat(&ls)
}

/// The language model.
pub struct Llama {
    embed: EmbedTable,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: std::sync::Mutex<Rope>,
    pub cfg: TextConfig,
    device: Device,
    dtype: DType,
    /// What new caches store keys and values as (`None`: `dtype`).
    kv_dtype: Option<DType>,
}

impl Llama {
    /// Loads from a VarBuilder rooted at the LM's `model` prefix; `lm_head` is the VarBuilder of
    /// the untied head (or None for tied embeddings).
    pub fn load(vb: VarBuilder, lm_head: Option<VarBuilder>, cfg: &TextConfig) -> Result<Self> {
        Self::load_with(vb, lm_head, cfg, None)
    }

    /// [`Self::load`] with every matrix `quant` holds taken from it alone (no f32 copy; products
    /// on the CPU's integer kernels, prefill and decode): a GGUF LM read by
    /// [`crate::gguf::load_quantized`], whose `vb` lacks those matrices. A tied head and the
    /// embeddings share the quantized table.
    pub fn load_quantized(
        vb: VarBuilder,
        lm_head: Option<VarBuilder>,
        cfg: &TextConfig,
        quant: &QuantizedWeights,
    ) -> Result<Self> {
        Self::load_with(vb, lm_head, cfg, Some(quant))
    }

    fn load_with(
        vb: VarBuilder,
        lm_head: Option<VarBuilder>,
        cfg: &TextConfig,
        quant: Option<&QuantizedWeights>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let embed = match quant.and_then(|q| q.get("embed_tokens.weight")) {
            Some(m) if (m.rows, m.cols) == (cfg.vocab_size, h) => {
                EmbedTable::Quantized(std::sync::Arc::new(m.packed()))
            }
            _ => EmbedTable::F32(Embedding::new(
                vb.get((cfg.vocab_size, h), "embed_tokens.weight")?,
                h,
            )),
        };
        let qkv_bias = cfg.qkv_bias();
        let mlp_bias = cfg.mlp_bias.unwrap_or(false);
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| {
                let b = vb.pp(format!("layers.{l}"));
                let a = b.pp("self_attn");
                let m = b.pp("mlp");
                let (qa, qm) = (format!("layers.{l}.self_attn."), format!("layers.{l}.mlp."));
                let (qa, qm) = (
                    quant.map(|q| (q, qa.as_str())),
                    quant.map(|q| (q, qm.as_str())),
                );
                Ok(Block {
                    attn: Attention {
                        qkv: linear(
                            &a,
                            qa,
                            &[
                                ("q_proj", nh * hd),
                                ("k_proj", nkv * hd),
                                ("v_proj", nkv * hd),
                            ],
                            h,
                            qkv_bias,
                        )?,
                        o: linear(
                            &a,
                            qa,
                            &[("o_proj", h)],
                            nh * hd,
                            cfg.attention_bias.unwrap_or(false),
                        )?,
                        heads: nh,
                        kv_heads: nkv,
                        head_dim: hd,
                    },
                    mlp: Mlp {
                        gate_up: linear(&m, qm, &[("gate_proj", i), ("up_proj", i)], h, mlp_bias)?,
                        down: linear(&m, qm, &[("down_proj", h)], i, mlp_bias)?,
                    },
                    ln1: RmsNorm::load(b.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                    ln2: RmsNorm::load(b.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match (lm_head, &embed) {
            (Some(vb), _) => match quant.and_then(|q| q.get("lm_head.weight")) {
                Some(m) => Linear::from_quantized(m.clone(), None)?,
                None => Linear::load(vb, h, cfg.vocab_size, false)?,
            },
            (None, EmbedTable::F32(e)) => Linear::from_weights(e.embeddings().clone(), None)?,
            (None, EmbedTable::Quantized(q)) => Linear::from_packed(q.clone()),
        };
        let mut blocks = blocks;
        for b in &mut blocks {
            // SwiGLU inside the gate/up product's tasks (where its weights allow).
            b.mlp.gate_up.interleave_for_swiglu();
        }
        Ok(Self {
            embed,
            blocks,
            norm: RmsNorm::load(vb.pp("norm"), h, cfg.rms_norm_eps)?,
            lm_head,
            rope: std::sync::Mutex::new(Rope::new(cfg, vb.device())?),
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            kv_dtype: None,
        })
    }

    /// Uses the GGUF file's quantized matrices (HF names, see [`crate::gguf::GgufLm`]) for
    /// decode on the CPU. Layers whose parts are not all quantized keep the f32 path. Returns
    /// how many layers (of `7 · layers + 1`) got them.
    pub fn attach_quantized(
        &mut self,
        q: &std::collections::HashMap<String, crate::quant::QuantMatrix>,
    ) -> Result<usize> {
        use crate::quant::QuantMatrix;
        let mut attached = 0;
        let mut set = |lin: &mut Linear, names: &[String]| -> Result<()> {
            let parts: Option<Vec<&QuantMatrix>> = names.iter().map(|n| q.get(n)).collect();
            if let Some(m) = parts.and_then(|p| QuantMatrix::concat_rows(&p)) {
                lin.set_quantized(m)?;
                attached += names.len();
            }
            Ok(())
        };
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let n = |w: &str| format!("layers.{l}.{w}.weight");
            set(
                &mut b.attn.qkv,
                &[
                    n("self_attn.q_proj"),
                    n("self_attn.k_proj"),
                    n("self_attn.v_proj"),
                ],
            )?;
            set(&mut b.attn.o, &[n("self_attn.o_proj")])?;
            set(&mut b.mlp.gate_up, &[n("mlp.gate_proj"), n("mlp.up_proj")])?;
            set(&mut b.mlp.down, &[n("mlp.down_proj")])?;
        }
        // An untied head is `lm_head`; a tied one reads the embeddings.
        if q.contains_key("lm_head.weight") {
            set(&mut self.lm_head, &["lm_head.weight".to_string()])?;
        } else if self.cfg.tie_word_embeddings.unwrap_or(false) {
            set(&mut self.lm_head, &["embed_tokens.weight".to_string()])?;
        }
        for b in &mut self.blocks {
            // SwiGLU inside the gate/up product's tasks (where its weights allow).
            b.mlp.gate_up.interleave_for_swiglu();
        }
        Ok(attached)
    }

    /// Every product from the quantized weights [`Self::attach_quantized`] attached, prefill
    /// too (8-bit activations, as llama.cpp runs a quantized file), and their f32 copies
    /// dropped. Returns the f32 bytes the layers no longer hold (a tied head's are still the
    /// embedding table's).
    pub fn keep_only_quantized(&mut self) -> usize {
        let mut freed = 0;
        for b in &mut self.blocks {
            for lin in [
                &mut b.attn.qkv,
                &mut b.attn.o,
                &mut b.mlp.gate_up,
                &mut b.mlp.down,
            ] {
                freed += lin.keep_only_quantized();
            }
        }
        let head = self.lm_head.keep_only_quantized();
        if !self.cfg.tie_word_embeddings.unwrap_or(false) {
            freed += head;
        } else if head > 0 {
            // The tied table is the head's matrix: lookups read its quantized rows instead.
            freed += head;
            if let Some(q) = self.lm_head.quantized_shared() {
                self.embed = EmbedTable::Quantized(q);
            }
        }
        freed
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.blocks.len()).map(|_| None).collect(),
            dtype: self.kv_dtype,
            planned: 0,
        }
    }

    /// Stores the keys and values of caches made from now on as `dtype`. F16 is for an f32 LM on
    /// the CPU whose processor has AVX2, FMA and F16C and whose head size is a multiple of 8
    /// (the decode kernel reads the cache directly, half the bytes of f32; prompt rows widen it
    /// exactly): decode at long contexts reads mostly the cache. The model's own dtype restores
    /// the default. Anything else is [`EngineError::Unsupported`].
    pub fn set_kv_cache_dtype(&mut self, dtype: DType) -> std::result::Result<(), EngineError> {
        if dtype == self.dtype {
            self.kv_dtype = None;
            return Ok(());
        }
        if dtype != DType::F16 || self.dtype != DType::F32 || !self.device().is_cpu() {
            return Err(EngineError::Unsupported(format!(
                "a {dtype:?} KV cache is for an f32 LM on the CPU (this LM: {:?} on {:?})",
                self.dtype,
                self.device().location()
            )));
        }
        if !crate::attention::f16_kv_supported() {
            return Err(EngineError::Unsupported(
                "an f16 KV cache needs a CPU with AVX2, FMA and F16C".into(),
            ));
        }
        let d = self.cfg.head_dim();
        if !crate::attention::f16_decode_kernel(d) {
            // The decode kernel reads 8 values at a time; others would widen the whole cache
            // every step, slower than keeping it in f32.
            return Err(EngineError::Unsupported(format!(
                "an f16 KV cache needs a head size that is a multiple of 8 (this LM: {d})"
            )));
        }
        self.kv_dtype = Some(dtype);
        Ok(())
    }

    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope.lock().expect("rope lock").inv_freq().to_vec()
    }

    /// Token embeddings `[1, L, h]` (a lookup, no FLOPs).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let q = match &self.embed {
            EmbedTable::F32(e) => {
                let t = Tensor::new(ids, &self.device)?;
                return candle_core::Module::forward(e, &t)?.unsqueeze(0);
            }
            EmbedTable::Quantized(q) => q,
        };
        let mut rows = Vec::with_capacity(ids.len() * q.cols());
        for &id in ids {
            if id as usize >= q.rows() {
                candle_core::bail!("token id {id} outside the vocabulary of {}", q.rows());
            }
            rows.extend(q.dequantize_row(id as usize));
        }
        Tensor::from_vec(rows, (1, ids.len(), q.cols()), &self.device)
    }

    /// Runs the decoder on `[1, L, h]` embeddings after `cache` and returns the final-normed
    /// hidden states `[1, L, h]`.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (_b, len, _h) = embeds.dims3()?;
        let past = cache.len();
        let (cos, sin) = self
            .rope
            .lock()
            .expect("rope lock")
            .tables(past, len, self.dtype)?;
        let masking = Masking::Causal { past };
        // As in `decode_batch`: the other CPU workers stay awake between the layers' ops.
        let _warm = embeds.device().is_cpu().then(crate::cpu_pool::keep_warm);
        let mut x = embeds.clone();
        for (l, block) in self.blocks.iter().enumerate() {
            ctx.check_cancel()?;
            x = block.forward(&x, l, cache, &cos, &sin, masking, ctx)?;
            ctx.tap(|| format!("text.layer_out.{l}"), &x);
        }
        let x = self.norm.forward(&x)?;
        ctx.tap(|| "text.final_norm_out".into(), &x);
        Ok(x)
    }

    /// One decode step for several sequences at once: `embeds` `[B, 1, h]` holds each
    /// sequence's new token, `caches[i]` its KV cache (lengths may differ), `ctxs[i]` where its
    /// FLOPs are counted. The linear layers run as one `[B, h]` product (matrix-vector products
    /// become a small matrix product); attention runs for every sequence over its own cache in
    /// one pass ([`crate::attention::decode_attention_batch`]). Returns
    /// each sequence's next-token logits `[B, vocab]` in f32.
    pub fn decode_batch(
        &self,
        embeds: &Tensor,
        caches: &mut [&mut KvCache],
        ctxs: &[Ctx],
    ) -> Result<Tensor> {
        let (b, one, _h) = embeds.dims3()?;
        if one != 1 || caches.len() != b || ctxs.len() != b {
            candle_core::bail!(
                "decode_batch: {b} sequences of {one} tokens, {} caches",
                caches.len()
            );
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let (cos, sin) = self
            .rope
            .lock()
            .expect("rope lock")
            .tables_at(&positions, self.dtype)?;
        // The step's ~5 parallel ops a layer, each short: the other CPU workers stay awake
        // between them rather than sleeping and being woken for each (`cpu_pool::keep_warm`).
        let _warm = embeds.device().is_cpu().then(crate::cpu_pool::keep_warm);
        let mut x = embeds.clone();
        let mut rows = StepRows::Sequences(caches);
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward_batch(&x, l, &mut rows, &cos, &sin, ctxs)?;
        }
        let x = self.norm.forward(&x)?;
        self.lm_head
            .forward_rows(&x, ctxs)?
            .reshape((b, self.cfg.vocab_size))?
            .to_dtype(DType::F32)
    }

    /// Rebuilds the KV of tokens a sequence had already decoded (`ids`, after what `cache`
    /// holds), as its decode steps wrote it, without their logits (the sequence kept its last
    /// ones): what a sequence taken out of a batch needs to continue where it was. The tokens
    /// run as the rows of [`Self::decode_batch`]'s pass, [`crate::gemv::MAX_BATCH_ROWS`] at a
    /// time, row `i` at its own position and attending to the keys up to it, so on the CPU each
    /// key and value has the bits its decode step gave it (the row kernels give a row the same
    /// bits in a batch of any size, see `gemv.rs`), at the cost of one pass over the weights per
    /// chunk instead of one per token. Counted in `flops` as decoding (no head); stops between
    /// layers when `cancel` is set.
    pub fn replay(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        flops: &vvlm_cost::FlopCounter,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<()> {
        for chunk in ids.chunks(crate::gemv::MAX_BATCH_ROWS) {
            let past = cache.len();
            let positions: Vec<usize> = (past..past + chunk.len()).collect();
            let (cos, sin) = self
                .rope
                .lock()
                .expect("rope lock")
                .tables_at(&positions, self.dtype)?;
            let ctxs: Vec<Ctx> = chunk
                .iter()
                .map(|_| Ctx::new(flops, vvlm_cost::Component::LmDecode).with_cancel(cancel))
                .collect();
            let mut x = self.embed(chunk)?.transpose(0, 1)?.contiguous()?;
            let mut rows = StepRows::Positions(cache);
            for (l, block) in self.blocks.iter().enumerate() {
                ctxs[0].check_cancel()?;
                x = block.forward_batch(&x, l, &mut rows, &cos, &sin, &ctxs)?;
            }
        }
        Ok(())
    }

    /// Logits `[1, n, vocab]` of the given hidden states (counted).
    pub fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.lm_head.forward(hidden, ctx)
    }

    /// Logits of the last position only, `[vocab]` in f32.
    pub fn last_logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let len = hidden.dim(1)?;
        let last = hidden.narrow(1, len - 1, 1)?;
        self.lm_head
            .forward(&last, ctx)?
            .flatten_all()?
            .to_dtype(DType::F32)
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        cos: &Tensor,
        sin: &Tensor,
        masking: Masking,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let tap0 = layer == 0;
        let (b, len, h) = x.dims3()?;
        let y = self.ln1.forward(x)?;
        if tap0 {
            ctx.tap(|| "text.layer0.input_layernorm".into(), &y);
        }
        let a = &self.attn;
        let qkv = a.qkv.forward(&y, ctx)?;
        let (qw, kw) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        let q = qkv.narrow(2, 0, qw)?;
        let k = qkv.narrow(2, qw, kw)?;
        let v = qkv.narrow(2, qw + kw, kw)?;
        if tap0 {
            ctx.tap(|| "text.layer0.self_attn.q_proj".into(), &q);
            ctx.tap(|| "text.layer0.self_attn.k_proj".into(), &k);
            ctx.tap(|| "text.layer0.self_attn.v_proj".into(), &v);
        }
        let (q, k, v) = crate::profile::time(crate::profile::Section::Rope, qkv.device(), || {
            if crate::fused_on(qkv.device()) {
                // One kernel: the per-head layout and RoPE of q and k ([b, heads, len, d] each).
                let all = a.split_rope(&qkv, cos, sin)?;
                return Ok((
                    all.narrow(1, 0, a.heads)?,
                    all.narrow(1, a.heads, a.kv_heads)?,
                    all.narrow(1, a.heads + a.kv_heads, a.kv_heads)?,
                ));
            }
            // Per-head views of the fused product ([b, len, heads + 2·kv_heads, d] narrowed,
            // then [b, heads, len, d]); one copy each into the layout RoPE and the cache take.
            let heads_view = qkv.reshape((b, len, a.heads + 2 * a.kv_heads, a.head_dim))?;
            let part = |start: usize, n: usize| -> Result<Tensor> {
                heads_view
                    .narrow(2, start, n)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            Ok((
                candle_nn::rotary_emb::rope(&part(0, a.heads)?, cos, sin)?,
                candle_nn::rotary_emb::rope(&part(a.heads, a.kv_heads)?, cos, sin)?,
                part(a.heads + a.kv_heads, a.kv_heads)?,
            ))
        })?;
        let (k, v) = crate::profile::time(crate::profile::Section::KvAppend, k.device(), || {
            cache.append(layer, &k, &v)
        })?;
        let o = attention(&q, &k, &v, (a.head_dim as f64).powf(-0.5), masking, ctx)?;
        let o = o.transpose(1, 2)?.reshape((b, len, a.heads * a.head_dim))?;
        let o = a.o.forward(&o, ctx)?;
        if tap0 {
            ctx.tap(|| "text.layer0.self_attn.o_proj".into(), &o);
        }
        let x = (x + o)?;
        let y = self.ln2.forward(&x)?;
        if tap0 {
            ctx.tap(|| "text.layer0.post_attention_layernorm".into(), &y);
        }
        let act = if tap0 && ctx.taps.is_some() {
            // Tapped: the gate and up outputs themselves (the unfused product).
            let gu = self.mlp.gate_up.forward(&y, ctx)?;
            let i = gu.dim(2)? / 2;
            ctx.tap(|| "text.layer0.mlp.gate_proj".into(), &gu.narrow(2, 0, i)?);
            ctx.tap(|| "text.layer0.mlp.up_proj".into(), &gu.narrow(2, i, i)?);
            crate::nn::swiglu_fused(&gu)?
        } else {
            self.mlp.gate_up.forward_swiglu(&y, ctx)?
        };
        let d = self.mlp.down.forward(&act, ctx)?;
        if tap0 {
            ctx.tap(|| "text.layer0.mlp.down_proj".into(), &d);
        }
        let _ = h;
        x + d
    }
}

/// Writes one position's rows (`row`: one `d`-vector per head, f32) at position `pos` of a
/// contiguous CPU cache buffer `[1, heads, capacity, d]` (f32, or f16 rounded to nearest-even).
struct WriteCpuRow<'a> {
    row: &'a [f32],
    pos: usize,
    d: usize,
}

impl candle_core::InplaceOp1 for WriteCpuRow<'_> {
    fn name(&self) -> &'static str {
        "kv-write-row"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (one, heads, cap, d) = layout.shape().dims4()?;
        if one != 1
            || d != self.d
            || self.pos >= cap
            || self.row.len() != heads * d
            || !layout.is_contiguous()
        {
            candle_core::bail!(
                "kv-write-row: {} values at {} into {:?}",
                self.row.len(),
                self.pos,
                layout.shape()
            );
        }
        let start = layout.start_offset();
        for h in 0..heads {
            let at = start + (h * cap + self.pos) * d;
            let src = &self.row[h * d..(h + 1) * d];
            match storage {
                CpuStorage::F32(x) => x[at..at + d].copy_from_slice(src),
                CpuStorage::F16(x) => {
                    use half::slice::HalfFloatSliceExt;
                    x[at..at + d].convert_from_f32_slice(src)
                }
                _ => candle_core::bail!("kv-write-row: an f32 or f16 cache"),
            }
        }
        Ok(())
    }
}

/// Whose positions the rows of a batched pass ([`Block::forward_batch`]) are.
enum StepRows<'a, 'c> {
    /// Row `i` is the next position of `caches[i]` (a decode step of several sequences).
    Sequences(&'a mut [&'c mut KvCache]),
    /// The rows are consecutive new positions of one sequence ([`Llama::replay`]).
    Positions(&'a mut KvCache),
}

impl StepRows<'_, '_> {
    /// Appends the rows' keys and values (row `i` of `k`/`v`, laid out `[B, kv_heads, 1, d]`
    /// when `seq_axis` is 0, `[1, kv_heads, B, d]` when it is 2) and returns what row `i`
    /// attends to: its sequence's keys and values up to and including its own position.
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        seq_axis: usize,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        match self {
            StepRows::Sequences(caches) => {
                if seq_axis == 2 {
                    return KvCache::append_rows(caches, layer, k, v);
                }
                if k.device().is_cpu() && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
                    // Straight from the rows' memory into each cache ([`KvCache::append_row_cpu`]).
                    let (k, v) = (k.contiguous()?, v.contiguous()?);
                    let (rows, kv_heads, one, d) = k.dims4()?;
                    if rows != caches.len() || one != 1 || v.dims() != k.dims() {
                        candle_core::bail!(
                            "kv append: rows {:?} and {:?} for {} caches",
                            k.dims(),
                            v.dims(),
                            caches.len()
                        );
                    }
                    let (ks, kl) = k.storage_and_layout();
                    let (vs, vl) = v.storage_and_layout();
                    let (
                        candle_core::Storage::Cpu(CpuStorage::F32(kd)),
                        candle_core::Storage::Cpu(CpuStorage::F32(vd)),
                    ) = (&*ks, &*vs)
                    else {
                        candle_core::bail!("kv append: f32 rows on the CPU");
                    };
                    let row = kv_heads * d;
                    let (kd, vd) = (&kd[kl.start_offset()..], &vd[vl.start_offset()..]);
                    return caches
                        .iter_mut()
                        .enumerate()
                        .map(|(i, cache)| {
                            cache.append_row_cpu(
                                layer,
                                &kd[i * row..(i + 1) * row],
                                &vd[i * row..(i + 1) * row],
                                (kv_heads, d),
                            )
                        })
                        .collect();
                }
                caches
                    .iter_mut()
                    .enumerate()
                    .map(|(i, cache)| {
                        cache.append(
                            layer,
                            &k.narrow(seq_axis, i, 1)?,
                            &v.narrow(seq_axis, i, 1)?,
                        )
                    })
                    .collect()
            }
            StepRows::Positions(cache) => {
                let rows = k.dim(seq_axis)?;
                let past = cache.layers[layer].as_ref().map_or(0, |c| c.len);
                let (k, v) = if seq_axis == 0 {
                    (k.transpose(0, 2)?, v.transpose(0, 2)?)
                } else {
                    (k.clone(), v.clone())
                };
                let (k, v) = cache.append(layer, &k, &v)?;
                (0..rows)
                    .map(|i| Ok((k.narrow(2, 0, past + i + 1)?, v.narrow(2, 0, past + i + 1)?)))
                    .collect()
            }
        }
    }
}

impl Block {
    /// [`Block::forward`] for `B` rows (`x` `[B, 1, h]`): one new token of each of `B`
    /// sequences, or `B` new tokens of one ([`StepRows`]).
    fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        rows: &mut StepRows,
        cos: &Tensor,
        sin: &Tensor,
        ctxs: &[Ctx],
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let a = &self.attn;
        if let StepRows::Sequences(caches) = rows {
            if x.device().is_cpu() {
                for c in caches.iter() {
                    c.prefetch_next_row(layer);
                }
            }
        }
        let y = self.ln1.forward(x)?;
        let qkv = a.qkv.forward_rows(&y, ctxs)?;
        // q as [1, heads, B, d] (the batch as the time axis of one sequence, so that row i is
        // rotated at sequence i's own position); k and v with sequence i's rows along `seq_axis`.
        // (Profiled as RoPE, with the split of the fused product it comes with.)
        let (q, k, v, seq_axis) =
            crate::profile::time(crate::profile::Section::Rope, qkv.device(), || {
                if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
                    let (q, k, v) =
                        split_rotate_decode_rows(&qkv, cos, sin, a.heads, a.kv_heads, a.head_dim)?;
                    return Ok((q, k, v, 0));
                }
                if crate::fused_on(qkv.device()) {
                    // The batch as the time axis of one sequence ([1, heads, B, d] etc.), in one
                    // kernel.
                    let all = a.split_rope(&qkv.reshape((1, b, ()))?, cos, sin)?;
                    return Ok((
                        all.narrow(1, 0, a.heads)?,
                        all.narrow(1, a.heads, a.kv_heads)?,
                        all.narrow(1, a.heads + a.kv_heads, a.kv_heads)?,
                        2,
                    ));
                }
                let heads_view = qkv.reshape((1, b, a.heads + 2 * a.kv_heads, a.head_dim))?;
                let part = |start: usize, n: usize| -> Result<Tensor> {
                    heads_view
                        .narrow(2, start, n)?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let q = candle_nn::rotary_emb::rope(&part(0, a.heads)?, cos, sin)?;
                let k = candle_nn::rotary_emb::rope(&part(a.heads, a.kv_heads)?, cos, sin)?;
                let v = part(a.heads + a.kv_heads, a.kv_heads)?;
                Ok((q, k, v, 2))
            })?;
        let scale = (a.head_dim as f64).powf(-0.5);
        let kvs = crate::profile::time(crate::profile::Section::KvAppend, k.device(), || {
            rows.append(layer, &k, &v, seq_axis)
        })?;
        // [B, 1, heads·d], each row as its sequence's own decode step computes it.
        let o = crate::profile::time(crate::profile::Section::Attention, q.device(), || {
            crate::attention::decode_attention_batch(&q, &kvs, scale, ctxs)
        })?;
        // The residual adds in the products' ops (`x + o`, `x + d` bit for bit).
        let x = a.o.forward_rows_add(&o, x, ctxs)?;
        let y = self.ln2.forward(&x)?;
        let act = self.mlp.gate_up.forward_rows_swiglu(&y, ctxs)?;
        self.mlp.down.forward_rows_add(&act, &x, ctxs)
    }
}

/// The fused q/k/v product `[b, len, (heads + 2·kv_heads)·d]` split into per-head rows with RoPE
/// applied to q and k, in one pass: `[b, heads + 2·kv_heads, len, d]` (q heads, then k, then
/// v), row `t` rotated by `cos`/`sin` row `t` (`[len, d/2]`) as candle's `rope` rotates (`x1·c −
/// x2·s`, `x1·s + x2·c`, each product rounded, in f32, one rounding to the input type). On
/// CUDA `kernels/split_rope.cu` (one launch instead of three copies and two RoPE ops);
/// `cpu_fwd` is its reference.
pub struct SplitRope {
    /// Heads rotated (q and k: `heads + kv_heads`).
    pub rotated: usize,
    /// All heads of the product (`heads + 2·kv_heads`).
    pub heads: usize,
    pub head_dim: usize,
}

impl SplitRope {
    fn dims(&self, l: &Layout, lc: &Layout) -> Result<(usize, usize, usize)> {
        let (b, len, w) = l.shape().dims3()?;
        let half = self.head_dim / 2;
        if w != self.heads * self.head_dim
            || self.rotated > self.heads
            || !self.head_dim.is_multiple_of(2)
            || lc.dims() != [len, half]
        {
            candle_core::bail!(
                "split-rope: {:?} with cos/sin {:?} for {} heads of {}",
                l.dims(),
                lc.dims(),
                self.heads,
                self.head_dim
            );
        }
        Ok((b, len, half))
    }
}

impl candle_core::CustomOp3 for SplitRope {
    fn name(&self) -> &'static str {
        "split-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, len, half) = self.dims(lx, lc)?;
        if ls.dims() != lc.dims() {
            candle_core::bail!("split-rope: sin {:?} for cos {:?}", ls.dims(), lc.dims());
        }
        let (heads, d) = (self.heads, self.head_dim);
        let run = |x: Vec<f32>, c: Vec<f32>, s: Vec<f32>| -> Vec<f32> {
            let mut out = vec![0f32; x.len()];
            for bi in 0..b {
                for t in 0..len {
                    for h in 0..heads {
                        let src = &x[((bi * len + t) * heads + h) * d..][..d];
                        let dst = &mut out[((bi * heads + h) * len + t) * d..][..d];
                        for p in 0..half {
                            let (x1, x2) = (src[p], src[p + half]);
                            if h < self.rotated {
                                let (cv, sv) = (c[t * half + p], s[t * half + p]);
                                dst[p] = x1 * cv - x2 * sv;
                                dst[p + half] = x1 * sv + x2 * cv;
                            } else {
                                dst[p] = x1;
                                dst[p + half] = x2;
                            }
                        }
                    }
                }
            }
            out
        };
        let values = |s, l| crate::nn::cpu_values_f32(s, l, "split-rope");
        let out = run(values(x, lx)?, values(c, lc)?, values(s, ls)?);
        let out = crate::nn::cpu_storage_like(x, out);
        Ok((out, Shape::from((b, heads, len, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        c: &candle_core::CudaStorage,
        lc: &Layout,
        s: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, len, _) = self.dims(lx, lc)?;
        let out = crate::cuda::split_rope(
            (x, lx),
            (c, lc),
            (s, ls),
            (b, len, self.rotated, self.heads, self.head_dim),
        )?;
        Ok((out, Shape::from((b, self.heads, len, self.head_dim))))
    }
}

/// A decode batch's fused q/k/v rows `[B, 1, (heads + 2·kv_heads)·d]` (CPU, f32) split and
/// rotated in one pass, instead of three strided copies and two RoPE ops per layer: q as
/// `[1, heads, B, d]` (what [`crate::attention::decode_attention_batch`] reads), k and v as
/// `[B, kv_heads, 1, d]` (sequence i's rows a contiguous `narrow(0, i, 1)`, appended to its cache
/// without a copy). `cos`/`sin` `[B, d/2]` hold each row's own position. RoPE is computed as
/// candle's `rope` computes it (`x1·c − x2·s`, `x1·s + x2·c`, each product rounded, no fused
/// multiply-add), so the rows equal the unfused path's bit for bit.
fn split_rotate_decode_rows(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = qkv.dim(0)?;
    let w = (heads + 2 * kv_heads) * d;
    let half = d / 2;
    if qkv.elem_count() != b * w || cos.dims() != [b, half] || sin.dims() != [b, half] {
        candle_core::bail!(
            "decode rows: qkv {:?}, cos {:?}, sin {:?} for {heads}/{kv_heads} heads of {d}",
            qkv.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    // Read in place (the product's output, the step's RoPE rows): no host copies.
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (xg, xl) = qkv.storage_and_layout();
    let (cg, cl) = cos.storage_and_layout();
    let (sg, sl) = sin.storage_and_layout();
    let (
        candle_core::Storage::Cpu(CpuStorage::F32(x)),
        candle_core::Storage::Cpu(CpuStorage::F32(cos)),
        candle_core::Storage::Cpu(CpuStorage::F32(sin)),
    ) = (&*xg, &*cg, &*sg)
    else {
        candle_core::bail!("decode rows: f32 q/k/v and RoPE tables on the CPU");
    };
    let x = &x[xl.start_offset()..][..b * w];
    let cos = &cos[cl.start_offset()..][..b * half];
    let sin = &sin[sl.start_offset()..][..b * half];
    let mut q = vec![0f32; heads * b * d];
    let mut k = vec![0f32; b * kv_heads * d];
    let mut v = vec![0f32; b * kv_heads * d];
    // `x1·c − x2·s`, `x1·s + x2·c` per pair (each product rounded, as candle's `rope`), written
    // as zipped slices so that the compiler vectorises it.
    let rotate = |src: &[f32], dst: &mut [f32], c: &[f32], s: &[f32]| {
        let (x1, x2) = src.split_at(half);
        let (o1, o2) = dst.split_at_mut(half);
        for ((((o1, o2), (&a, &b)), &c), &s) in o1
            .iter_mut()
            .zip(o2.iter_mut())
            .zip(x1.iter().zip(x2))
            .zip(c)
            .zip(s)
        {
            *o1 = a * c - b * s;
            *o2 = a * s + b * c;
        }
    };
    for i in 0..b {
        let row = &x[i * w..(i + 1) * w];
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for h in 0..heads {
            rotate(
                &row[h * d..(h + 1) * d],
                &mut q[(h * b + i) * d..][..d],
                c,
                s,
            );
        }
        for h in 0..kv_heads {
            let o = (i * kv_heads + h) * d;
            rotate(&row[(heads + h) * d..][..d], &mut k[o..o + d], c, s);
            v[o..o + d].copy_from_slice(&row[(heads + kv_heads + h) * d..][..d]);
        }
    }
    drop((xg, cg, sg));
    let dev = qkv.device();
    Ok((
        Tensor::from_vec(q, (1, heads, b, d), dev)?,
        Tensor::from_vec(k, (b, kv_heads, 1, d), dev)?,
        Tensor::from_vec(v, (b, kv_heads, 1, d), dev)?,
    ))
}

/// `f(i, row_i)` for each row of a `[rows, cols]` f32 tensor, in order: read in place where it
/// is a contiguous CPU tensor (a decode step's logits: no copy to the host), else from one copy
/// (`to_vec2`: one transfer from a GPU, not one a row).
pub fn for_each_row<R>(t: &Tensor, mut f: impl FnMut(usize, &[f32]) -> R) -> Result<Vec<R>> {
    let (rows, cols) = t.dims2()?;
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let (s, l) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(x)), Some((a, b))) =
            (&*s, l.contiguous_offsets())
        {
            return Ok(x[a..b]
                .chunks_exact(cols.max(1))
                .take(rows)
                .enumerate()
                .map(|(i, row)| f(i, row))
                .collect());
        }
    }
    Ok(t.to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .iter()
        .enumerate()
        .map(|(i, row)| f(i, row))
        .collect())
}

/// Index of the maximum of a 1-D f32 tensor.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn split_rotated_decode_rows_equal_candles_rope_bit_for_bit() {
        let dev = Device::Cpu;
        let (b, heads, kv_heads, d) = (3, 6, 2, 16);
        let qkv = Tensor::randn(0f32, 1.0, (b, 1, (heads + 2 * kv_heads) * d), &dev).unwrap();
        // Each row at its own position: angles from different positions of one table.
        let angles = Tensor::randn(0f32, 3.0, (b, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (q, k, v) = split_rotate_decode_rows(&qkv, &cos, &sin, heads, kv_heads, d).unwrap();
        // The unfused path: strided parts made contiguous, then candle's rope.
        let view = qkv.reshape((1, b, heads + 2 * kv_heads, d)).unwrap();
        let part = |start: usize, n: usize| heads_of(&view, start, n);
        let want_q = candle_nn::rotary_emb::rope(&part(0, heads), &cos, &sin).unwrap();
        let want_k = candle_nn::rotary_emb::rope(&part(heads, kv_heads), &cos, &sin).unwrap();
        let want_v = part(heads + kv_heads, kv_heads);
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(flat(&q), flat(&want_q));
        for i in 0..b {
            let ki = k.narrow(0, i, 1).unwrap();
            assert!(ki.is_contiguous());
            assert_eq!(flat(&ki), flat(&want_k.narrow(2, i, 1).unwrap()));
            assert_eq!(
                flat(&v.narrow(0, i, 1).unwrap()),
                flat(&want_v.narrow(2, i, 1).unwrap())
            );
        }
        // Rotation by hand for one element: q of head 1, row 2, pair (3, 3 + d/2).
        let x = flat(&qkv);
        let (c, s) = (flat(&cos)[2 * d / 2 + 3], flat(&sin)[2 * d / 2 + 3]);
        let base = 2 * (heads + 2 * kv_heads) * d + d;
        let (x1, x2) = (x[base + 3], x[base + 3 + d / 2]);
        let qv = flat(&q);
        assert_eq!(qv[(b + 2) * d + 3], x1 * c - x2 * s);
        assert_eq!(qv[(b + 2) * d + 3 + d / 2], x1 * s + x2 * c);
    }

    /// Heads `start..start + n` of a `[b, len, heads, d]` view as a contiguous `[b, n, len, d]`
    /// (the unfused path's strided copy, the reference the fused splits are checked against).
    fn heads_of(view: &Tensor, start: usize, n: usize) -> Tensor {
        view.narrow(2, start, n)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    fn tiny_lm() -> Llama {
        tiny_lm_with_head_dim(16)
    }

    fn tiny_lm_with_head_dim(head_dim: usize) -> Llama {
        let cfg: crate::TextConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": head_dim, "vocab_size": 97, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "rope_theta": 10000.0
        }))
        .unwrap();
        let t = crate::demo::random_lm_tensors(&cfg, 11).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(t, DType::F32, &Device::Cpu);
        Llama::load(vb, None, &cfg).unwrap()
    }

    #[test]
    fn a_planned_cache_is_allocated_once_and_decodes_as_a_growing_one() {
        let lm = tiny_lm();
        let c = vvlm_cost::FlopCounter::new();
        let mut ctx = Ctx::new(&c, vvlm_cost::Component::LmDecode);
        let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 97).collect();
        // 20 prompt positions + 280 steps: crosses the unplanned cache's 256 (a doubling).
        let (planned_at, steps) = (290, 280);
        let (mut growing, mut planned) = (lm.new_cache(), lm.new_cache());
        planned.plan_positions(planned_at);
        let mut capacities = std::collections::BTreeSet::new();
        let mut next = [0u32; 2];
        for (i, cache) in [&mut growing, &mut planned].into_iter().enumerate() {
            let h = lm
                .forward_hidden(&lm.embed(&prompt).unwrap(), cache, &mut ctx)
                .unwrap();
            next[i] = argmax(&lm.last_logits(&h, &ctx).unwrap()).unwrap();
        }
        assert_eq!(planned.capacity(), planned_at, "allocated at the plan");
        assert_eq!(growing.capacity(), INITIAL_CAPACITY);
        for step in 0..steps {
            let mut logits = vec![];
            for (i, cache) in [&mut growing, &mut planned].into_iter().enumerate() {
                let h = lm
                    .forward_hidden(&lm.embed(&[next[i]]).unwrap(), cache, &mut ctx)
                    .unwrap();
                logits.push(lm.last_logits(&h, &ctx).unwrap().to_vec1::<f32>().unwrap());
            }
            // The same values whatever the buffers' size, bit for bit.
            assert_eq!(logits[0], logits[1], "step {step}");
            let l = &logits[0];
            next = [(0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32; 2];
            capacities.insert(planned.capacity());
        }
        // Never reallocated below its plan; grown by doubling past it (300 > 290).
        assert_eq!(planned.len(), 300);
        assert_eq!(
            capacities.into_iter().collect::<Vec<_>>(),
            vec![planned_at, 2 * planned_at]
        );
        assert_eq!(growing.capacity(), 2 * INITIAL_CAPACITY);
    }

    #[test]
    fn an_f16_kv_cache_decodes_within_its_rounding_and_batched_as_alone() {
        let exact = tiny_lm();
        let mut lm = tiny_lm();
        assert!(lm.set_kv_cache_dtype(DType::BF16).is_err(), "only f16");
        if !crate::attention::f16_kv_supported() {
            assert!(lm.set_kv_cache_dtype(DType::F16).is_err());
            return;
        }
        lm.set_kv_cache_dtype(DType::F16).unwrap();
        // A head size the 8-lane kernel cannot take is refused (it would widen every step).
        let err = tiny_lm_with_head_dim(12)
            .set_kv_cache_dtype(DType::F16)
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 8"), "{err}");
        let c = vvlm_cost::FlopCounter::new();
        let ctx = || Ctx::new(&c, vvlm_cost::Component::LmDecode);
        let prompt: [u32; 6] = [3, 14, 15, 92, 65, 35];
        // Prefill, then 8 greedy steps, one sequence alone; logits of every step.
        let run = |lm: &Llama, prompt: &[u32]| -> (Vec<Vec<f32>>, KvCache) {
            let mut cache = lm.new_cache();
            let mut ctx = ctx();
            let h = lm
                .forward_hidden(&lm.embed(prompt).unwrap(), &mut cache, &mut ctx)
                .unwrap();
            let mut logits = vec![lm.last_logits(&h, &ctx).unwrap().to_vec1::<f32>().unwrap()];
            for _ in 0..8 {
                let l = logits.last().unwrap();
                let next = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
                let h = lm
                    .forward_hidden(&lm.embed(&[next]).unwrap(), &mut cache, &mut ctx)
                    .unwrap();
                logits.push(lm.last_logits(&h, &ctx).unwrap().to_vec1::<f32>().unwrap());
            }
            (logits, cache)
        };
        let (half, cache) = run(&lm, &prompt);
        let (full, full_cache) = run(&exact, &prompt);
        // Half the bytes, and every step within a few times the keys' and values' f16 rounding
        // (2^-11 relative) of the logits' range (measured: ~1e-4 of it).
        assert_eq!(2 * cache.bytes(), full_cache.bytes());
        for (step, (a, b)) in half.iter().zip(&full).enumerate() {
            let range = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("step {step}: f16 vs f32 cache, max abs {d} of a range {range}");
            assert!(d > 0.0 || step == 0, "step {step}: the cache is f16");
            assert!(
                d <= 4.0 * 2f32.powi(-11) * range.max(1.0),
                "step {step}: {d} of {range}"
            );
        }
        // Two sequences decoding together equal each alone, bit for bit.
        let other: [u32; 3] = [7, 7, 60];
        let (alone_other, _) = run(&lm, &other);
        let (mut c1, mut c2) = (lm.new_cache(), lm.new_cache());
        let mut next = vec![];
        for (p, cache) in [(&prompt[..], &mut c1), (&other[..], &mut c2)] {
            let mut ctx = ctx();
            let h = lm
                .forward_hidden(&lm.embed(p).unwrap(), cache, &mut ctx)
                .unwrap();
            let l = lm.last_logits(&h, &ctx).unwrap().to_vec1::<f32>().unwrap();
            next.push((0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32);
        }
        for step in 1..=8 {
            let embeds = lm
                .embed(&next)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap();
            let ctxs = [ctx(), ctx()];
            let logits = lm
                .decode_batch(&embeds, &mut [&mut c1, &mut c2], &ctxs)
                .unwrap();
            for (row, want) in [&half[step], &alone_other[step]].into_iter().enumerate() {
                let got = logits.get(row).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(&got, want, "step {step}, sequence {row}");
                next[row] = (0..got.len())
                    .max_by(|&a, &b| got[a].total_cmp(&got[b]))
                    .unwrap() as u32;
            }
        }
        // The model's own dtype restores f32 caches.
        lm.set_kv_cache_dtype(DType::F32).unwrap();
        assert_eq!(lm.new_cache().dtype, None);
    }

    /// `SplitRope`'s CPU reference (what `kernels/split_rope.cu` is checked against) against
    /// the composition it replaces on CUDA (per-head copies, then candle's `rope` on q and k):
    /// f32 bit for bit; bf16 within 2^-5 of the largest input (candle's CPU rope rounds each
    /// bf16 product, the op rounds once from f32); a batch of 2, 5 positions, 6 q heads on 2 kv
    /// heads of 16.
    #[test]
    fn split_rope_equals_the_copies_and_candles_rope() {
        let dev = Device::Cpu;
        let (b, len, heads, kv_heads, d) = (2, 5, 6, 2, 16);
        let all = heads + 2 * kv_heads;
        let qkv = Tensor::randn(0f32, 1.0, (b, len, all * d), &dev).unwrap();
        let angles = Tensor::randn(0f32, 2.0, (len, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let op = SplitRope {
            rotated: heads + kv_heads,
            heads: all,
            head_dim: d,
        };
        for dt in [DType::F32, DType::BF16] {
            let (x, c, s) = (
                qkv.to_dtype(dt).unwrap(),
                cos.to_dtype(dt).unwrap(),
                sin.to_dtype(dt).unwrap(),
            );
            let got = x.apply_op3_no_bwd(&c, &s, &op).unwrap();
            assert_eq!(got.dims(), &[b, all, len, d]);
            let view = x.reshape((b, len, all, d)).unwrap();
            let part = |start: usize, n: usize| heads_of(&view, start, n);
            let want = Tensor::cat(
                &[
                    candle_nn::rotary_emb::rope(&part(0, heads), &c, &s).unwrap(),
                    candle_nn::rotary_emb::rope(&part(heads, kv_heads), &c, &s).unwrap(),
                    part(heads + kv_heads, kv_heads),
                ],
                1,
            )
            .unwrap();
            let f = crate::nn::values_f32;
            let err = f(&got)
                .iter()
                .zip(f(&want))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // bf16: candle's CPU rope rounds each product to bf16, the op rounds once from f32:
            // a few ulps of the largest input apart.
            let largest = f(&x).iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = if dt == DType::F32 {
                0.0
            } else {
                2f32.powi(-5) * largest
            };
            assert!(err <= tol, "{dt:?}: {err}");
        }
        let short = Tensor::zeros((len, d / 2 - 1), DType::F32, &dev).unwrap();
        assert!(qkv.apply_op3_no_bwd(&short, &short, &op).is_err());
    }

    #[test]
    fn split_rotate_refuses_mismatched_tables() {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros((2, 1, 4 * 8), DType::F32, &dev).unwrap();
        let t = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        assert!(split_rotate_decode_rows(&qkv, &t, &t, 2, 1, 8).is_err());
    }
}
