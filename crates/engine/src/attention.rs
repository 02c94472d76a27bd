//! Fused scaled-dot-product attention for f32 on the CPU: `softmax(q kᵀ · scale [+ causal]) v`
//! computed per (batch, head, block of query rows) with the block's scores kept in cache,
//! instead of materialising the whole `[b, h, q, kv]` score tensor, then soft-maxing it in a
//! separate pass and multiplying again.
//!
//! Owns the CPU kernel only. Callers pass `q`, `k`, `v` as `[b, heads, len, head_dim]` views
//! with any strides whose last one is 1 (so a linear layer's `[b, len, heads·d]` output is read
//! in place, and a preallocated KV cache is read through a narrowed view); grouped-query
//! attention is expressed by `k`/`v` having fewer heads. The result is laid out
//! `[b, q_len, heads, head_dim]` (what the output projection reads) and returned as a
//! `[b, heads, q_len, head_dim]` view of it, exactly like the unfused path it replaces.
//!
//! FLOPs are counted over the (query, key) pairs a row may see: the whole `q × kv` rectangle
//! without a mask, `q·past + q(q+1)/2` pairs with the causal one (two products of `head_dim`
//! each). That is what this kernel computes (a causal row stops at its last visible key), and
//! its total over a prompt does not depend on how the prompt is split into prefill passes
//! (chunks, a cached prefix), so it equals the analytic count for any schedule. (The unfused
//! path used on GPUs also computes the masked scores, then discards them; they are not counted.)
//!
//! Off the CPU's f32 path ([`device_attention`]: GPUs, and bf16/f16 on the CPU) the scores are
//! materialised by two batched matmuls around [`ScaledSoftmax`], which applies the scale and the
//! causal mask inside the softmax (on CUDA: `kernels/scaled_softmax.cu`, one pass over the
//! scores instead of a scaled copy, a mask tensor, a masked copy and the softmax). On CUDA two
//! fused kernels take over where they apply ([`crate::DeviceKernels::Fused`], the default):
//! [`FlashAttention`] (`kernels/flash_attention.cu`) for bf16/f16 prompts, whose scores never
//! reach memory, and [`DecodeAttention`] (`kernels/decode_attention.cu`) for decode rows, every
//! sequence of a batched step in one launch. FLOPs are counted the same whichever kernel runs.
//! [`reference_attention`] stays the plain composition of candle ops both are tested against.

use crate::nn::Ctx;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Which key positions a query row may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking {
    /// Every key (bidirectional, e.g. a vision encoder).
    None,
    /// Query row `i` sees keys `0..=past + i` (a decoder with `past` cached positions).
    Causal { past: usize },
}

/// Attention on `[b, h, q, d]` / `[b, h_kv, kv, d]` inputs; see the module docs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    masking: Masking,
    ctx: &Ctx,
) -> Result<Tensor> {
    let (b, heads, q_len, d) = q.dims4()?;
    let (kb, kv_heads, kv_len, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims4()? != (b, kv_heads, kv_len, d) || heads % kv_heads != 0 {
        candle_core::bail!(
            "attention: incompatible shapes q {:?} k {:?} v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Masking::Causal { past } = masking {
        if past + q_len != kv_len {
            candle_core::bail!(
                "attention: causal mask needs past {past} + q {q_len} == kv {kv_len}"
            );
        }
    }
    let pairs = match masking {
        Masking::None => q_len * kv_len,
        Masking::Causal { past } => q_len * past + q_len * (q_len + 1) / 2,
    };
    // Scores and the weighted sum of values: `head_dim` multiply-adds per pair each.
    ctx.count_matmul(b * heads, pairs, d, 1);
    ctx.count_matmul(b * heads, pairs, d, 1);
    crate::profile::time(crate::profile::Section::Attention, q.device(), || {
        uncounted_attention(q, k, v, scale, masking)
    })
}

/// [`attention`] without the count (shapes checked by the caller).
fn uncounted_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    masking: Masking,
) -> Result<Tensor> {
    let cpu_f32 = q.device().is_cpu() && q.dtype() == DType::F32;
    if cpu_f32 && k.dtype() == DType::F16 && v.dtype() == DType::F16 {
        let (b, heads, q_len, d) = q.dims4()?;
        if q_len == 1 && f16_decode_kernel(d) {
            // A decode row against an f16 cache: the f16 kernel, as in a batched step.
            let q = q.contiguous()?;
            let kvs: Vec<(Tensor, Tensor)> = (0..b)
                .map(|i| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)))
                .collect::<Result<_>>()?;
            return decode_rows(&q, (q.stride()[0], q.stride()[1]), &kvs, heads, d, scale)?
                .reshape((b, 1, heads, d))?
                .transpose(1, 2);
        }
        // Prompt rows: the cached keys and values widened to f32 (exactly) for the GEMMs.
        return uncounted_attention(q, &kv_to_f32(k)?, &kv_to_f32(v)?, scale, masking);
    }
    if cpu_f32 {
        let op = FusedAttentionF32 {
            scale: scale as f32,
            masking,
        };
        let q = last_dim_contiguous(q)?;
        let k = last_dim_contiguous(k)?;
        let v = last_dim_contiguous(v)?;
        return q.apply_op3_no_bwd(&k, &v, &op)?.transpose(1, 2);
    }
    let (b, heads, q_len, d) = q.dims4()?;
    if q_len == 1 && crate::fused_on(q.device()) {
        let kvs: Vec<(Tensor, Tensor)> = (0..b)
            .map(|i| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)))
            .collect::<Result<_>>()?;
        if cuda_decode_applies(q, &kvs, d) {
            // A decode row on the GPU: the kernel a batched step uses, so alone equals batched.
            return cuda_decode_rows(&q.squeeze(2)?, &kvs, scale)?.reshape((b, heads, 1, d));
        }
    }
    device_attention(q, k, v, scale, masking)
}

/// One decode step of several sequences: row `i` of `q` (`[1, heads, B, d]`, the batch laid out
/// as the time axis) attends to `kvs[i]`, sequence `i`'s cached keys and values (`[1, kv_heads,
/// len_i, d]` views that include its new position), exactly as [`attention`] with
/// `Masking::Causal { past: len_i - 1 }` does for that sequence alone: same kernel, same
/// arithmetic, the same output bit for bit, counted in `ctxs[i]`. On the CPU in f32 every
/// sequence's heads run in one parallel pass (one fork-join per layer instead of one per
/// sequence: at 8 sequences of SmolLM2 that was ~3 ms of a ~23 ms step). Returns
/// `[B, 1, heads·d]`, the rows the output projection reads.
pub fn decode_attention_batch(
    q: &Tensor,
    kvs: &[(Tensor, Tensor)],
    scale: f64,
    ctxs: &[Ctx],
) -> Result<Tensor> {
    let (one, heads, b, d) = q.dims4()?;
    if one != 1 || kvs.len() != b || ctxs.len() != b {
        candle_core::bail!(
            "decode attention: q {:?} for {} caches and {} requests",
            q.dims(),
            kvs.len(),
            ctxs.len()
        );
    }
    let first_kv_heads = match kvs.first() {
        Some((k, _)) => k.dim(1)?,
        None => 1,
    };
    for ((k, v), ctx) in kvs.iter().zip(ctxs) {
        let (kb, kv_heads, len, kd) = k.dims4()?;
        if kb != 1
            || kd != d
            || v.dims4()? != (1, kv_heads, len, d)
            || heads % kv_heads != 0
            || kv_heads != first_kv_heads
        {
            candle_core::bail!(
                "decode attention: incompatible shapes q {:?} k {:?} v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if len == 0 {
            candle_core::bail!("decode attention: a sequence with no cached position");
        }
        // As `attention` counts one query row against `len` keys.
        ctx.count_matmul(heads, len, d, 1);
        ctx.count_matmul(heads, len, d, 1);
    }
    if cuda_decode_applies(q, kvs, d) {
        // [1, heads, B, d] -> [B, heads, d]: every sequence in one launch.
        return cuda_decode_rows(&q.squeeze(0)?.transpose(0, 1)?, kvs, scale)?.reshape((
            b,
            1,
            heads * d,
        ));
    }
    if !(q.device().is_cpu() && q.dtype() == DType::F32) {
        let outs = kvs
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let past = k.dim(2)? - 1;
                let qi = q.narrow(2, i, 1)?.contiguous()?;
                uncounted_attention(&qi, k, v, scale, Masking::Causal { past })
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&outs, 2)?
            .transpose(1, 2)?
            .reshape((b, 1, heads * d));
    }
    let q = q.contiguous()?;
    let out = if f16_decode_kernel(d) {
        decode_rows(&q, (q.stride()[2], q.stride()[1]), kvs, heads, d, scale)?
    } else {
        // No F16C (or a head size the kernel does not take): f16 caches widened exactly, the
        // same arithmetic.
        let wide = kvs
            .iter()
            .map(|(k, v)| match (k.dtype(), v.dtype()) {
                (DType::F16, DType::F16) => Ok((kv_to_f32(k)?, kv_to_f32(v)?)),
                _ => Ok((k.clone(), v.clone())),
            })
            .collect::<Result<Vec<_>>>()?;
        decode_rows(&q, (q.stride()[2], q.stride()[1]), &wide, heads, d, scale)?
    };
    out.reshape((b, 1, heads * d))
}

/// Keys or values of an f16 cache as f32 (exact), for the kernels that read f32.
fn kv_to_f32(t: &Tensor) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F16(x)) = &*s else {
        candle_core::bail!("kv_to_f32 expects f16 on the CPU");
    };
    let x = &x[l.start_offset()..l.start_offset() + t.elem_count()];
    let mut out = vec![0f32; x.len()];
    x.convert_to_f32_slice(&mut out);
    drop(s);
    Tensor::from_vec(out, t.shape(), t.device())
}

/// Whether decode rows can read an f16 cache directly (AVX2, FMA and F16C; a head size the
/// 8-lane kernel takes). Otherwise an f16 cache is widened to f32 first: the same results.
pub fn f16_decode_kernel(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d.is_multiple_of(8)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Whether the decode rows run [`attend_group_avx512`] (AVX-512 F, VL and DQ beside AVX2, FMA and
/// F16C; `d` a multiple of 8, as the 8-lane kernels need). `VVLM_ATTENTION_AVX512=0` turns it
/// off (to compare the two on one machine; the results are the same bit for bit).
pub fn avx512_attention(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        f16_decode_kernel(d)
            && *ON.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::env::var("VVLM_ATTENTION_AVX512").map_or(true, |v| v != "0")
            })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Whether this CPU can keep a KV cache in f16 and read it in the decode kernels.
pub fn f16_kv_supported() -> bool {
    f16_decode_kernel(64)
}

/// One decode row per (sequence, head): sequence `i`'s query for head `h` at
/// `q[i·qs.0 + h·qs.1 ..][..d]` (CPU f32, last stride 1) against `kvs[i]` (`[1, kv_heads, len_i,
/// d]`, f32, or f16 where [`f16_decode_kernel`]), all in one parallel pass; returns `[B, heads,
/// d]`. Each row is computed by [`small_rows_block`] (f32) or the same arithmetic on widened f16
/// values, so a row equals that sequence's decode step alone bit for bit.
fn decode_rows(
    q: &Tensor,
    qs: (usize, usize),
    kvs: &[(Tensor, Tensor)],
    heads: usize,
    d: usize,
    scale: f64,
) -> Result<Tensor> {
    let b = kvs.len();
    if b == 0 {
        return Tensor::zeros((0, heads, d), DType::F32, q.device());
    }
    let kvs = kvs
        .iter()
        .map(|(k, v)| Ok((last_dim_contiguous(k)?, last_dim_contiguous(v)?)))
        .collect::<Result<Vec<_>>>()?;
    // Every sequence's keys and values as (pointer, row stride) per kv head, read under their
    // storages' read locks, held until the pass ends.
    let guards: Vec<_> = kvs
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let f16_kernel = f16_decode_kernel(d);
    let mut seqs = Vec::with_capacity(b);
    for ((ks, kl), (vs, vl)) in &guards {
        use candle_core::Storage::Cpu;
        let (k, v) = match (&**ks, &**vs) {
            (Cpu(CpuStorage::F32(kd)), Cpu(CpuStorage::F32(vd))) => (
                KvPtr::F32(kd[kl.start_offset()..].as_ptr()),
                KvPtr::F32(vd[vl.start_offset()..].as_ptr()),
            ),
            (Cpu(CpuStorage::F16(kd)), Cpu(CpuStorage::F16(vd))) if f16_kernel => (
                KvPtr::F16(kd[kl.start_offset()..].as_ptr()),
                KvPtr::F16(vd[vl.start_offset()..].as_ptr()),
            ),
            _ => candle_core::bail!(
                "decode attention: keys and values must both be f32 (or f16 where this CPU has \
                 F16C) on the CPU"
            ),
        };
        let (kst, vst) = (kl.stride(), vl.stride());
        seqs.push(SeqKv {
            k,
            v,
            strides: (kst[1], kst[2], vst[1], vst[2]),
            len: kl.dims()[2],
        });
    }
    let max_len = seqs.iter().map(|s| s.len).max().unwrap_or(0);
    let (qg, ql) = q.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(qd)) = &*qg else {
        candle_core::bail!("decode attention expects f32 queries on the CPU");
    };
    let qd = &qd[ql.start_offset()..];
    let mut out = vec![0f32; b * heads * d];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let rep = heads / kvs[0].0.dim(1)?;
    let scale = scale as f32;
    let exp_softmax = softmax_kernel();
    let (dot, axpy) = (crate::gemv::dot_kernel(), crate::gemv::axpy_kernel());
    let all = Seqs(&seqs);
    let group = heads_per_unit(b, heads / rep, rep, d);
    let units_per_seq = heads / group;
    // The 512-bit kernels for whole kv groups where the CPU has AVX-512 (the same results bit
    // for bit). Measured on a Xeon (SmolLM2, 512 + 128 tokens, `vvlm-engine-bench batch`,
    // three interleaved rounds): 8 sequences on an f32 cache 1.04-1.15x, on an f16 one the
    // same; one sequence a head at a time, where they are not used, 0.94-0.97x on f16.
    let wide = group > 1 && avx512_attention(d);
    (0..b * units_per_seq).into_par_iter().for_each_init(
        || vec![0f32; group * max_len],
        |scores, unit| {
            let all = &all;
            let (i, h) = (unit / units_per_seq, unit % units_per_seq * group);
            let s = &all.0[i];
            let hk = h / rep;
            let out = out_ptr;
            let (ks0, ks1, vs0, vs1) = s.strides;
            let qp = qd.as_ptr().wrapping_add(i * qs.0 + h * qs.1);
            let op = out.0.wrapping_add((i * heads + h) * d);
            // SAFETY: q holds rows (i, h..h + group) at the given strides; sequence i's keys
            // and values are `len` rows of head hk at the recorded strides, alive under
            // `guards`; each unit writes output rows (i, h..h + group) only.
            unsafe {
                let (k_at, v_at) = (hk * ks0, hk * vs0);
                let rows = &mut scores[..group * s.len];
                match (s.k, s.v) {
                    #[cfg(target_arch = "x86_64")]
                    (KvPtr::F32(k), KvPtr::F32(v)) if wide => attend_group_avx512(
                        (qp, qs.1),
                        (k.add(k_at), ks1),
                        (v.add(v_at), vs1),
                        (op, d),
                        group,
                        d,
                        scale,
                        rows,
                        exp_softmax,
                    ),
                    #[cfg(target_arch = "x86_64")]
                    (KvPtr::F16(k), KvPtr::F16(v)) if wide => attend_group_avx512(
                        (qp, qs.1),
                        (k.add(k_at), ks1),
                        (v.add(v_at), vs1),
                        (op, d),
                        group,
                        d,
                        scale,
                        rows,
                        exp_softmax,
                    ),
                    (KvPtr::F32(k), KvPtr::F32(v)) if group == 1 => small_rows_block(
                        (qp, d),
                        (k.add(k_at), ks1),
                        (v.add(v_at), vs1),
                        (op, d),
                        1,
                        s.len,
                        d,
                        |_| s.len,
                        scale,
                        rows,
                        (dot, axpy, exp_softmax),
                    ),
                    #[cfg(target_arch = "x86_64")]
                    (KvPtr::F32(k), KvPtr::F32(v)) => attend_group_avx2(
                        // The group's query rows (`qs.1` apart) and output rows (`d` apart).
                        (qp, qs.1),
                        (k.add(k_at), ks1),
                        (v.add(v_at), vs1),
                        (op, d),
                        group,
                        d,
                        scale,
                        rows,
                        exp_softmax,
                    ),
                    #[cfg(target_arch = "x86_64")]
                    (KvPtr::F16(k), KvPtr::F16(v)) => attend_group_avx2_f16(
                        // The group's query rows (`qs.1` apart) and output rows (`d` apart).
                        (qp, qs.1),
                        (k.add(k_at), ks1),
                        (v.add(v_at), vs1),
                        (op, d),
                        group,
                        d,
                        scale,
                        rows,
                        exp_softmax,
                    ),
                    // Not built: groups and f16 caches only where the AVX2 kernels run
                    // (`heads_per_unit`, `f16_decode_kernel`).
                    _ => {}
                }
            }
        },
    );
    drop(guards);
    drop(qg);
    Tensor::from_vec(out, (b, heads, d), q.device())
}

/// Query heads per work unit of a batched decode step: every head of a kv group in one unit
/// ([`attend_group`]: each cached row read once for the group) when there are enough (sequence,
/// kv head) units to keep the threads busy, at least 4 each; otherwise one head per unit, as
/// many units as there are rows (one sequence: 9 units for SmolLM2 instead of 3). Either way
/// each row's arithmetic is the same.
fn heads_per_unit(b: usize, kv_heads: usize, rep: usize, d: usize) -> usize {
    let grouped_kernel = f16_decode_kernel(d);
    if grouped_kernel && rep > 1 && b * kv_heads >= 4 * rayon::current_num_threads() {
        rep
    } else {
        1
    }
}

/// Where one sequence's cached keys and values start, by element type.
#[derive(Clone, Copy)]
enum KvPtr {
    F32(*const f32),
    F16(*const half::f16),
}

struct SeqKv {
    k: KvPtr,
    v: KvPtr,
    /// (k head stride, k row stride, v head stride, v row stride)
    strides: (usize, usize, usize, usize),
    len: usize,
}

struct Seqs<'a>(&'a [SeqKv]);
// SAFETY: the pointers are only read, under the storages' read locks held for the whole pass.
unsafe impl Send for Seqs<'_> {}
unsafe impl Sync for Seqs<'_> {}

/// Attention as two batched matmuls around [`ScaledSoftmax`] (any device and dtype): what runs
/// off the CPU's fused f32 kernel.
pub fn device_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    masking: Masking,
) -> Result<Tensor> {
    let (b, heads, q_len, d) = q.dims4()?;
    if flash_attention_applies(q, k, v)? {
        let op = FlashAttention {
            scale: scale as f32,
            masking,
        };
        let aligned = |t: &Tensor| -> Result<Tensor> {
            let (stride, offset) = (t.stride(), t.layout().start_offset());
            if stride[3] == 1 && stride[..3].iter().chain([&offset]).all(|s| s % 8 == 0) {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        return aligned(q)?
            .apply_op3_no_bwd(&aligned(k)?, &aligned(v)?, &op)?
            .transpose(1, 2);
    }
    let kv_heads = k.dim(1)?;
    let rep = heads / kv_heads;
    let qg = q.contiguous()?.reshape((b, kv_heads, rep * q_len, d))?;
    let scores = qg.matmul(&k.t()?.contiguous()?)?;
    let op = ScaledSoftmax {
        scale: scale as f32,
        causal: match masking {
            Masking::Causal { past } => Some((q_len, past)),
            Masking::None => None,
        },
    };
    scores
        .apply_op1_no_bwd(&op)?
        .matmul(&v.contiguous()?)?
        .reshape((b, heads, q_len, d))
}

/// Softmax over the last dimension of `scale · scores`, with the causal mask applied inside:
/// for scores `[.., rows, kv]` laid out `[b, kv_heads, rep · q_len, kv]`, row `r` is query
/// position `i = r % q_len` and sees keys `j <= past + i` (`causal = Some((q_len, past))`);
/// hidden keys get probability 0. Arithmetic in f32 whatever the dtype: `m` = the visible
/// maximum of `scale · x`, `y = exp(scale · x - m) · (1 / Σ exp(scale · x - m))`.
/// `cpu_fwd` is the reference of the CUDA kernel `kernels/scaled_softmax.cu`.
#[derive(Debug, Clone, Copy)]
pub struct ScaledSoftmax {
    pub scale: f32,
    pub causal: Option<(usize, usize)>,
}

impl ScaledSoftmax {
    /// Keys visible to row `row` of a row length `kv`.
    fn visible(&self, row: usize, kv: usize) -> usize {
        match self.causal {
            Some((q_len, past)) => kv.min(past + row % q_len + 1),
            None => kv,
        }
    }

    fn rows<T: Copy + Send + Sync>(
        &self,
        x: &[T],
        kv: usize,
        to: impl Fn(T) -> f32 + Sync,
        from: impl Fn(f32) -> T + Sync,
        zero: T,
    ) -> Vec<T> {
        let mut y = vec![zero; x.len()];
        y.par_chunks_mut(kv)
            .zip(x.par_chunks(kv))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let vis = self.visible(row, kv);
                let m = xr[..vis]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| m.max(self.scale * to(v)));
                let s: f32 = xr[..vis]
                    .iter()
                    .map(|&v| (self.scale * to(v) - m).exp())
                    .sum();
                let inv = 1.0 / s;
                for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    *o = from(if j < vis {
                        (self.scale * to(v) - m).exp() * inv
                    } else {
                        0.0
                    });
                }
            });
        y
    }
}

impl candle_core::CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("scaled-softmax expects a contiguous tensor");
        };
        let kv = l.dims().last().copied().unwrap_or(0);
        if kv == 0 {
            candle_core::bail!("scaled-softmax over an empty last dimension");
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.rows(&x[start..end], kv, |v| v, |v| v, 0.0)),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.rows(
                &x[start..end],
                kv,
                |v| v.to_f32(),
                half::bf16::from_f32,
                half::bf16::ZERO,
            )),
            CpuStorage::F16(x) => CpuStorage::F16(self.rows(
                &x[start..end],
                kv,
                |v| v.to_f32(),
                half::f16::from_f32,
                half::f16::ZERO,
            )),
            other => candle_core::bail!(
                "scaled-softmax: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::scaled_softmax(s, l, self.scale, self.causal)
    }
}

/// Query rows from which the flash kernel replaces the matmuls (its blocks take 64 rows; a
/// decode row or two would leave the tensor cores idle and one block per head on the GPU).
pub const FLASH_MIN_ROWS: usize = 16;

/// Whether [`device_attention`] runs `kernels/flash_attention.cu` for these inputs.
fn flash_attention_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    let (_, heads, q_len, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    Ok(crate::fused_on(q.device())
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q_len >= FLASH_MIN_ROWS
        && d.is_multiple_of(8)
        && d <= 128
        && heads % kv_heads == 0)
}

/// Whether decode rows of head size `d` on `q`'s device run `kernels/decode_attention.cu`
/// (CUDA, f32/bf16/f16 caches of `q`'s dtype, even head sizes up to 256).
fn cuda_decode_applies(q: &Tensor, kvs: &[(Tensor, Tensor)], d: usize) -> bool {
    crate::fused_on(q.device())
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && d.is_multiple_of(2)
        && d <= 256
        && kvs.iter().all(|(k, v)| {
            // The kernel reads element pairs: rows contiguous, strides and offsets even.
            [k, v].iter().all(|t| {
                let (st, offset) = (t.stride(), t.layout().start_offset());
                t.dtype() == q.dtype()
                    && t.rank() == 4
                    && st[3] == 1
                    && [st[1], st[2], offset].iter().all(|s| s.is_multiple_of(2))
            })
        })
}

/// One decode row per (sequence, head) by `kernels/decode_attention.cu`: the op's input is `q`
/// `[B, heads, d]` (contiguous), `kvs[i]` sequence `i`'s `[1, kv_heads, len_i, d]` keys and
/// values on the same device (any strides whose last one is 1); the result is `[B, heads, d]`.
/// Every key of a sequence is visible to its row (the causal mask of a decode step). No CPU
/// implementation: the CPU's decode kernel and [`reference_attention`] are what it is checked
/// against.
pub struct DecodeAttention {
    pub kvs: Vec<(Tensor, Tensor)>,
    pub scale: f32,
}

impl candle_core::CustomOp1 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("decode-attention runs on CUDA only (the CPU has its own decode kernel)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::decode_attention(q, l, &self.kvs, self.scale)
    }
}

/// [`DecodeAttention`] for rows laid out `[B, heads, d]` (any strides): `[B, heads, d]`.
fn cuda_decode_rows(q: &Tensor, kvs: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor> {
    let op = DecodeAttention {
        kvs: kvs.to_vec(),
        scale: scale as f32,
    };
    q.contiguous()?.apply_op1_no_bwd(&op)
}

/// Attention by `kernels/flash_attention.cu` (CUDA, bf16/f16): `q` `[b, heads, q_len, d]`, `k`/`v`
/// `[b, kv_heads, kv_len, d]`, each with a contiguous last dimension and rows 16-byte aligned;
/// the result is `[b, q_len, heads, d]` (the caller transposes it). No CPU implementation: the
/// CPU's fused f32 kernel and [`reference_attention`] are what it is checked against.
pub struct FlashAttention {
    pub scale: f32,
    pub masking: Masking,
}

impl candle_core::CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash-attention runs on CUDA only (the CPU has its own fused kernel)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let past = match self.masking {
            Masking::Causal { past } => Some(past),
            Masking::None => None,
        };
        crate::cuda::flash_attention((q, lq), (k, lk), (v, lv), self.scale, past)
    }
}

fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.stride()[3] == 1 || t.dim(3)? == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The unfused composition of candle ops (any device and dtype): the independent reference the
/// fused CPU kernel and [`device_attention`] are tested against.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    masking: Masking,
) -> Result<Tensor> {
    let (b, heads, q_len, d) = q.dims4()?;
    let (_, kv_heads, kv_len, _) = k.dims4()?;
    let rep = heads / kv_heads;
    let qg = q.contiguous()?.reshape((b, kv_heads, rep * q_len, d))?;
    let scores = (qg.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match masking {
        Masking::Causal { past } if q_len > 1 => {
            let m = crate::nn::causal_mask(q_len, past, scores.dtype(), scores.device())?;
            scores
                .reshape((b, kv_heads, rep, q_len, kv_len))?
                .broadcast_add(&m)?
                .reshape((b, kv_heads, rep * q_len, kv_len))?
        }
        _ => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v.contiguous()?)?
        .reshape((b, heads, q_len, d))
}

struct FusedAttentionF32 {
    scale: f32,
    masking: Masking,
}

/// A raw output pointer shared by the workers; each writes a disjoint set of rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the blocks handed to different workers write disjoint elements of the buffer, which
// outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Query rows per work unit: the unit's scores (`rows × kv` f32) stay within ~256 KiB of L2
/// (half of a Zen3 core's; measured 3-8% faster than 128 KiB for a 2048-token prompt).
fn rows_per_block(q_len: usize, kv_len: usize) -> usize {
    (64 * 1024 / kv_len.max(1)).clamp(8, 128).min(q_len.max(1))
}

impl candle_core::CustomOp3 for FusedAttentionF32 {
    fn name(&self) -> &'static str {
        "fused-attention-f32"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (sq, sk, sv) else {
            candle_core::bail!("fused attention expects f32");
        };
        let (b, heads, q_len, d) = lq.shape().dims4()?;
        let (_, kv_heads, kv_len, _) = lk.shape().dims4()?;
        let rep = heads / kv_heads;
        let (qs, ks, vs) = (lq.stride(), lk.stride(), lv.stride());
        let (q0, k0, v0) = (lq.start_offset(), lk.start_offset(), lv.start_offset());
        let mut out = vec![0f32; b * q_len * heads * d];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let block = rows_per_block(q_len, kv_len);
        let blocks_per_head = q_len.div_ceil(block);
        let units = b * heads * blocks_per_head;
        let (scale, masking) = (self.scale, self.masking);
        let exp_softmax = softmax_kernel();
        let (dot, axpy) = (crate::gemv::dot_kernel(), crate::gemv::axpy_kernel());
        (0..units).into_par_iter().for_each_init(
            || vec![0f32; block * kv_len],
            |scores, unit| {
                let (bh, blk) = (unit / blocks_per_head, unit % blocks_per_head);
                let (bi, h) = (bh / heads, bh % heads);
                let hk = h / rep;
                let r0 = blk * block;
                let rows = block.min(q_len - r0);
                let out = out_ptr;
                // SAFETY: offsets and strides come from the tensors' layouts, so every element
                // addressed lies inside its storage; `scores` holds rows × kv_len; each unit
                // writes only output rows r0..r0+rows of head h of batch bi.
                unsafe {
                    let qp = q.as_ptr().add(q0 + bi * qs[0] + h * qs[1] + r0 * qs[2]);
                    let kp = k.as_ptr().add(k0 + bi * ks[0] + hk * ks[1]);
                    let vp = v.as_ptr().add(v0 + bi * vs[0] + hk * vs[1]);
                    if rows <= SMALL_ROWS && qs[3] == 1 {
                        // Decode-shaped: dot products and axpys over the cached rows beat a
                        // gemm that would pack all of K and V for one query row.
                        small_rows_block(
                            (qp, qs[2]),
                            (kp, ks[2]),
                            (vp, vs[2]),
                            (out.0.add(((bi * q_len + r0) * heads + h) * d), heads * d),
                            rows,
                            kv_len,
                            d,
                            |r| match masking {
                                Masking::None => kv_len,
                                Masking::Causal { past } => past + r0 + r + 1,
                            },
                            scale,
                            scores,
                            (dot, axpy, exp_softmax),
                        );
                        return;
                    }
                    // Keys past the block's last visible one (causal) are never computed: a
                    // prompt's blocks see on average half the keys.
                    let kv_seen = match masking {
                        Masking::None => kv_len,
                        Masking::Causal { past } => (past + r0 + rows).min(kv_len),
                    };
                    // scores[rows, kv_seen] (row stride kv_len) = scale · q[rows, d] · kᵀ
                    gemm::gemm(
                        rows,
                        kv_seen,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        kv_len as isize,
                        false,
                        qp,
                        qs[3] as isize,
                        qs[2] as isize,
                        kp,
                        ks[2] as isize,
                        ks[3] as isize,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for r in 0..rows {
                        let row = &mut scores[r * kv_len..(r + 1) * kv_len];
                        let visible = match masking {
                            Masking::None => kv_len,
                            Masking::Causal { past } => past + r0 + r + 1,
                        };
                        exp_softmax(&mut row[..visible]);
                        row[visible..kv_seen].fill(0.0);
                    }
                    // out[rows, d] (row stride heads·d) = p[rows, kv_seen] · v[kv_seen, d]
                    let op = out.0.add(((bi * q_len + r0) * heads + h) * d);
                    gemm::gemm(
                        rows,
                        d,
                        kv_seen,
                        op,
                        1,
                        (heads * d) as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        kv_len as isize,
                        vp,
                        vs[3] as isize,
                        vs[2] as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, q_len, heads, d))))
    }
}

/// Query rows per unit up to which the dot-product path replaces the gemms.
const SMALL_ROWS: usize = 4;

type Kernels = (
    fn(&[f32], &[f32]) -> f32,
    fn(f32, &[f32], &mut [f32]),
    fn(&mut [f32]),
);

/// One unit of few query rows: `(pointer, row stride)` for q, k, v and the output; rows of q,
/// k and v are contiguous `d`-vectors (last stride 1).
///
/// # Safety
/// The pointers and strides must address `rows` q rows, `kv_len` k and v rows and `rows`
/// output rows of `d` elements each, valid for the duration of the call.
#[allow(clippy::too_many_arguments)]
unsafe fn small_rows_block(
    q: (*const f32, usize),
    k: (*const f32, usize),
    v: (*const f32, usize),
    out: (*mut f32, usize),
    rows: usize,
    kv_len: usize,
    d: usize,
    visible: impl Fn(usize) -> usize,
    scale: f32,
    scores: &mut [f32],
    (dot, axpy, softmax): Kernels,
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        for r in 0..rows {
            let vis = visible(r);
            attend_group_avx2(
                (q.0.add(r * q.1), 0),
                k,
                v,
                (out.0.add(r * out.1), 0),
                1,
                d,
                scale,
                &mut scores[r * kv_len..r * kv_len + vis],
                softmax,
            );
        }
        return;
    }
    for r in 0..rows {
        let qr = std::slice::from_raw_parts(q.0.add(r * q.1), d);
        let vis = visible(r);
        let row = &mut scores[r * kv_len..r * kv_len + vis];
        for (j, s) in row.iter_mut().enumerate() {
            *s = scale * dot(qr, std::slice::from_raw_parts(k.0.add(j * k.1), d));
        }
        softmax(row);
        let o = std::slice::from_raw_parts_mut(out.0.add(r * out.1), d);
        o.fill(0.0);
        for (j, &p) in row.iter().enumerate() {
            axpy(p, std::slice::from_raw_parts(v.0.add(j * v.1), d), o);
        }
    }
}

/// [`attend_group`] on an f32 cache.
///
/// # Safety
/// AVX2 and FMA present; `q` and `o` address `heads` query rows and `heads` writable output rows
/// of `d` at their strides (the outputs touched by no one else during the call), `k`, `v`
/// `rows.len() / heads` key and value rows of `d` at theirs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx2(
    q: (*const f32, usize),
    k: (*const f32, usize),
    v: (*const f32, usize),
    o: (*mut f32, usize),
    heads: usize,
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    attend_group::<f32>(q, k, v, o, heads, d, scale, rows, softmax)
}

/// [`attend_group`] on an f16 cache: each key and value row widened by `vcvtph2ps` (exact) as
/// it is loaded, then the same f32 arithmetic, so the result equals the f32 kernel's on the
/// widened cache bit for bit while reading half the bytes.
///
/// # Safety
/// As [`attend_group_avx2`], and F16C present; k and v rows are f16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx2_f16(
    q: (*const f32, usize),
    k: (*const half::f16, usize),
    v: (*const half::f16, usize),
    o: (*mut f32, usize),
    heads: usize,
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    attend_group::<half::f16>(q, k, v, o, heads, d, scale, rows, softmax)
}

/// [`attend_group`] with 512-bit vectors where it pays ([`attend_heads_512`]), on an f32 cache or
/// an f16 one (rows widened by `vcvtph2ps` as loaded).
///
/// # Safety
/// As [`attend_group_avx2`], and F16C and AVX-512 F, VL and DQ present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx512<E: Load16>(
    q: (*const f32, usize),
    k: (*const E, usize),
    v: (*const E, usize),
    o: (*mut f32, usize),
    heads: usize,
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    attend_group_512::<E>(q, k, v, o, heads, d, scale, rows, softmax)
}

/// Sixteen cached values, or eight of each of two rows, as f32 lanes (AVX-512).
#[cfg(target_arch = "x86_64")]
trait Load16: Load8 {
    /// Elements `p..p + 16`.
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Elements `a..a + 8` in lanes 0..8 and `b..b + 8` in lanes 8..16.
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load8x2(a: *const f32, b: *const f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_insertf32x8::<1>(
            _mm512_castps256_ps512(_mm256_loadu_ps(a)),
            _mm256_loadu_ps(b),
        )
    }
}

#[cfg(target_arch = "x86_64")]
impl Load16 for half::f16 {
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load8x2(a: *const half::f16, b: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)),
            _mm_loadu_si128(b as *const __m128i),
        ))
    }
}

/// [`attend_group`] with 512-bit vectors for groups of up to 8 heads ([`attend_heads_512`]),
/// the 256-bit kernels otherwise: the same results bit for bit.
///
/// # Safety
/// As [`attend_group_avx512`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_512<E: Load16>(
    q: (*const f32, usize),
    k: (*const E, usize),
    v: (*const E, usize),
    o: (*mut f32, usize),
    heads: usize,
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    macro_rules! by_heads {
        ($($g:literal)*) => {
            match heads {
                $($g => attend_heads_512::<E, $g>(q, k, v, o, d, scale, rows, softmax),)*
                _ => attend_group::<E>(q, k, v, o, heads, d, scale, rows, softmax),
            }
        };
    }
    by_heads!(1 2 3 4 5 6 7 8)
}

/// [`attend_heads`] in 512-bit vectors: the scores two keys a vector (lanes 0..8 key `j`'s 8
/// lane sums, 8..16 key `j + 1`'s: each lane's FMAs those of the 8-lane kernel, then the same
/// reduction of each key's 8 lanes), the values 16 columns a vector (each column's FMAs in key
/// order, as there): equal to [`attend_heads`] bit for bit, with half the multiply and widening
/// instructions.
///
/// # Safety
/// As [`attend_group_avx512`] with `heads = G`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_heads_512<E: Load16, const G: usize>(
    q: (*const f32, usize),
    k: (*const E, usize),
    v: (*const E, usize),
    o: (*mut f32, usize),
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    let n = rows.len() / G;
    let mut qs = [q.0; G];
    let mut os = [o.0; G];
    for g in 0..G {
        qs[g] = q.0.add(g * q.1);
        os[g] = o.0.add(g * o.1);
    }
    // The first values, read right after the scores (then prefetched as they are read).
    prefetch_rows(v, 0, VALUE_PREFETCH.min(n), d);
    score_keys_heads::<E, Wide, G>(qs, k, d, scale, rows, n);
    for row in rows.chunks_exact_mut(n) {
        softmax(row);
    }
    // Accumulators in registers: G·W of 32, beside G weights and a loaded value.
    let width = if G <= 4 { 4 } else { 2 };
    let mut c0 = 0;
    while c0 + 16 <= d {
        let left = (d - c0) / 16;
        let w = if width == 4 && left >= 4 {
            4
        } else if left >= 2 {
            2
        } else {
            1
        };
        match w {
            4 => values_pass_512::<E, G, 4>(rows, n, v, os, c0),
            2 => values_pass_512::<E, G, 2>(rows, n, v, os, c0),
            _ => values_pass_512::<E, G, 1>(rows, n, v, os, c0),
        }
        c0 += 16 * w;
    }
    if c0 < d {
        // A last 8 columns (d an odd multiple of 8).
        values_pass::<E, G, 1>(rows, n, v, os, c0);
    }
}

/// [`KeyPairSums`] in 512-bit vectors: key `j`'s 8 lane sums in lanes 0..8 and key `j + 1`'s in
/// 8..16 of one vector per head (the query's 8 values in both halves), the same FMAs lane by
/// lane as [`Narrow`]'s; returned as the two halves.
#[cfg(target_arch = "x86_64")]
struct Wide;

#[cfg(target_arch = "x86_64")]
impl<E: Load16> KeyPairSums<E> for Wide {
    #[inline(always)]
    unsafe fn sums<const G: usize>(
        q: [*const f32; G],
        k: (*const E, usize),
        d: usize,
        j: usize,
    ) -> [[std::arch::x86_64::__m256; 2]; G] {
        use std::arch::x86_64::*;
        let (k0, k1) = (k.0.add(j * k.1), k.0.add((j + 1) * k.1));
        let mut a = [_mm512_setzero_ps(); G];
        let mut i = 0;
        while i < d {
            let x = E::load8x2(k0.add(i), k1.add(i));
            for g in 0..G {
                let qv = _mm512_broadcast_f32x8(_mm256_loadu_ps(q[g].add(i)));
                a[g] = _mm512_fmadd_ps(qv, x, a[g]);
            }
            i += 8;
        }
        let mut halves = [[_mm256_setzero_ps(); 2]; G];
        for g in 0..G {
            halves[g] = [
                _mm512_castps512_ps256(a[g]),
                _mm512_extractf32x8_ps::<1>(a[g]),
            ];
        }
        halves
    }
}

/// [`values_pass`] in 512-bit vectors: columns `c0..c0 + 16·W`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// (Indexes: the accumulators are a G x W grid walked in lockstep with the weights and values.)
#[allow(clippy::needless_range_loop)]
unsafe fn values_pass_512<E: Load16, const G: usize, const W: usize>(
    rows: &[f32],
    n: usize,
    v: (*const E, usize),
    o: [*mut f32; G],
    c0: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); W]; G];
    for j in 0..n {
        let vp = v.0.add(j * v.1 + c0);
        if j + VALUE_PREFETCH < n {
            prefetch_span(vp.add(VALUE_PREFETCH * v.1), 16 * W);
        }
        let mut p = [_mm512_setzero_ps(); G];
        for g in 0..G {
            p[g] = _mm512_set1_ps(*rows.get_unchecked(g * n + j));
        }
        for u in 0..W {
            let x = E::load16(vp.add(16 * u));
            for g in 0..G {
                acc[g][u] = _mm512_fmadd_ps(p[g], x, acc[g][u]);
            }
        }
    }
    for g in 0..G {
        for u in 0..W {
            _mm512_storeu_ps(o[g].add(c0 + 16 * u), acc[g][u]);
        }
    }
}

/// Eight cached values as f32 lanes.
#[cfg(target_arch = "x86_64")]
trait Load8: Copy {
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

#[cfg(target_arch = "x86_64")]
impl Load8 for half::f16 {
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Keys read per head in turn by [`attend_group`]: 32 f32 rows of 64 (8 KiB) stay in L1 for the
/// group's other heads. A multiple of 4, so the score quads start where one head's do.
#[cfg(target_arch = "x86_64")]
const GROUP_KEY_BLOCK: usize = 32;

/// Decode rows against their visible keys (`rows.len() / heads` of them) for the query heads
/// that share one kv head (grouped-query attention; one head is a group of one): per head the
/// scores ([`score_keys`]), the softmax, then `o = Σ p_j v_j` ([`accumulate_values`]). Groups
/// of up to 8 heads ([`attend_heads`]) load each cached row once for all their heads; a larger
/// group goes over blocks of [`GROUP_KEY_BLOCK`] keys (then values) taken by every head in
/// turn, so each cached row is read from memory once for the group, the values' accumulators
/// stored to the output between blocks and loaded back (exact). Either way each head's result
/// equals that head alone bit for bit. `d` a multiple of 8.
///
/// # Safety
/// As [`attend_group_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group<E: Load8>(
    q: (*const f32, usize),
    k: (*const E, usize),
    v: (*const E, usize),
    o: (*mut f32, usize),
    heads: usize,
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    let n = rows.len() / heads;
    macro_rules! by_heads {
        ($($g:literal)*) => {
            match heads {
                $($g => return attend_heads::<E, $g>(q, k, v, o, d, scale, rows, softmax),)*
                _ => {}
            }
        };
    }
    by_heads!(1 2 3 4 5 6 7 8);
    // More heads a group than the kernels are built for: blocks of keys taken by every head in
    // turn (each cached row read from memory once, widened once a head).
    let block = GROUP_KEY_BLOCK;
    let blocks = || (0..n).step_by(block).map(move |j| j..(j + block).min(n));
    for keys in blocks() {
        for (g, row) in rows.chunks_exact_mut(n).enumerate() {
            score_keys(q.0.add(g * q.1), k, d, scale, row, keys.clone());
        }
    }
    for row in rows.chunks_exact_mut(n) {
        softmax(row);
    }
    for keys in blocks() {
        for (g, row) in rows.chunks_exact(n).enumerate() {
            accumulate_values(row, v, o.0.add(g * o.1), d, keys.clone());
        }
    }
}

/// [`attend_group`] for `G` heads (a kv group of a size the kernels are built for): every key
/// row is loaded (and, from an f16 cache, widened) once for all `G` heads, in the scores and
/// again in the values, instead of once a head. Each head's arithmetic is [`score_keys`]' and
/// [`accumulate_values`]' over all its keys, unchanged (the same FMAs in the same order, each
/// key's sum reduced the same way), so the result equals one head at a time bit for bit.
///
/// # Safety
/// As [`attend_group_avx2`] with `heads = G`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_heads<E: Load8, const G: usize>(
    q: (*const f32, usize),
    k: (*const E, usize),
    v: (*const E, usize),
    o: (*mut f32, usize),
    d: usize,
    scale: f32,
    rows: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    let n = rows.len() / G;
    if G == 1 {
        score_keys(q.0, k, d, scale, rows, 0..n);
        softmax(rows);
        accumulate_values(rows, v, o.0, d, 0..n);
        return;
    }
    let mut qs = [q.0; G];
    let mut os = [o.0; G];
    for g in 0..G {
        qs[g] = q.0.add(g * q.1);
        os[g] = o.0.add(g * o.1);
    }
    // The first values, read right after the scores (then prefetched as they are read).
    prefetch_rows(v, 0, VALUE_PREFETCH.min(n), d);
    score_keys_heads::<E, Narrow, G>(qs, k, d, scale, rows, n);
    for row in rows.chunks_exact_mut(n) {
        softmax(row);
    }
    accumulate_values_heads::<E, G>(rows, n, v, os, d);
}

/// [`score_keys`] over keys `0..n` for `G` query heads at once (`rows` holds one row of `n`
/// scores a head): per four keys, each key's 8 lanes summed over `d` with one FMA a step as
/// there (the key loaded once for the heads), then the same `vhaddps` reduction, two keys at a
/// time ([`KeyPairSums`]: 256- or 512-bit); the last `n % 4` keys one at a time, reduced as
/// there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_keys_heads<E: Load8, P: KeyPairSums<E>, const G: usize>(
    q: [*const f32; G],
    k: (*const E, usize),
    d: usize,
    scale: f32,
    rows: &mut [f32],
    n: usize,
) {
    use std::arch::x86_64::*;
    let quads = n / 4 * 4;
    let sv = _mm_set1_ps(scale);
    // The first keys all at once, then [`KEY_PREFETCH`] ahead as they are scored.
    prefetch_rows(k, 0, KEY_PREFETCH.min(n), d);
    let mut j = 0;
    while j < quads {
        // The keys [`KEY_PREFETCH`] rows ahead on their way while these four are scored.
        prefetch_rows(k, j + KEY_PREFETCH, (j + KEY_PREFETCH + 4).min(n), d);
        let a01 = P::sums::<G>(q, k, d, j);
        let mut h01 = [_mm256_setzero_ps(); G];
        for g in 0..G {
            h01[g] = _mm256_hadd_ps(a01[g][0], a01[g][1]);
        }
        let a23 = P::sums::<G>(q, k, d, j + 2);
        for g in 0..G {
            let s = _mm256_hadd_ps(h01[g], _mm256_hadd_ps(a23[g][0], a23[g][1]));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            _mm_storeu_ps(rows.as_mut_ptr().add(g * n + j), _mm_mul_ps(s, sv));
        }
        j += 4;
    }
    while j < n {
        let kp = k.0.add(j * k.1);
        let mut a = [_mm256_setzero_ps(); G];
        let mut i = 0;
        while i < d {
            let x = E::load8(kp.add(i));
            for (g, ag) in a.iter_mut().enumerate() {
                *ag = _mm256_fmadd_ps(_mm256_loadu_ps(q[g].add(i)), x, *ag);
            }
            i += 8;
        }
        for (g, ag) in a.iter().enumerate() {
            let h = _mm_add_ps(_mm256_castps256_ps128(*ag), _mm256_extractf128_ps(*ag, 1));
            let h = _mm_hadd_ps(h, h);
            let h = _mm_hadd_ps(h, h);
            rows[g * n + j] = _mm_cvtss_f32(h) * scale;
        }
        j += 1;
    }
}

/// How many key rows ahead of the ones being scored [`score_keys_heads`] asks the memory system
/// for: a decode step's keys and values are cold (the weights streamed through the caches since
/// the layer last read them) and each unit's rows are a short stream the hardware prefetcher
/// barely ramps up on.
const KEY_PREFETCH: usize = 16;

/// How many value rows ahead of the one being accumulated the values passes ask for (as
/// [`KEY_PREFETCH`]).
const VALUE_PREFETCH: usize = 16;

/// Asks for the cache lines of `n` values from `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_span<E>(p: *const E, n: usize) {
    use std::arch::x86_64::*;
    let start = p as usize & !63;
    let end = p.add(n) as usize;
    let mut line = start;
    while line < end {
        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
        line += 64;
    }
}

/// Asks for rows `from..to` (`d` values each, `p.1` apart) to be brought into the caches.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_rows<E>(p: (*const E, usize), from: usize, to: usize, d: usize) {
    use std::arch::x86_64::*;
    let bytes = d * std::mem::size_of::<E>();
    for j in from..to {
        let row = p.0.add(j * p.1) as *const i8;
        let mut b = 0;
        while b < bytes {
            _mm_prefetch::<_MM_HINT_T0>(row.add(b));
            b += 64;
        }
    }
}

/// Keys `j` and `j + 1`'s 8-lane sums `q_g·k` for every head `g` (each key row loaded once),
/// as `[key j, key j + 1]` per head: the one step [`score_keys_heads`] takes in 256-bit
/// ([`Narrow`]) or 512-bit ([`Wide`]) vectors.
#[cfg(target_arch = "x86_64")]
trait KeyPairSums<E: Load8> {
    unsafe fn sums<const G: usize>(
        q: [*const f32; G],
        k: (*const E, usize),
        d: usize,
        j: usize,
    ) -> [[std::arch::x86_64::__m256; 2]; G];
}

/// [`KeyPairSums`] in 256-bit vectors, one per key and head.
#[cfg(target_arch = "x86_64")]
struct Narrow;

#[cfg(target_arch = "x86_64")]
impl<E: Load8> KeyPairSums<E> for Narrow {
    #[inline(always)]
    unsafe fn sums<const G: usize>(
        q: [*const f32; G],
        k: (*const E, usize),
        d: usize,
        j: usize,
    ) -> [[std::arch::x86_64::__m256; 2]; G] {
        use std::arch::x86_64::*;
        let (k0, k1) = (k.0.add(j * k.1), k.0.add((j + 1) * k.1));
        let mut a = [[_mm256_setzero_ps(); 2]; G];
        let mut i = 0;
        while i < d {
            let (x0, x1) = (E::load8(k0.add(i)), E::load8(k1.add(i)));
            for g in 0..G {
                let qv = _mm256_loadu_ps(q[g].add(i));
                a[g][0] = _mm256_fmadd_ps(qv, x0, a[g][0]);
                a[g][1] = _mm256_fmadd_ps(qv, x1, a[g][1]);
            }
            i += 8;
        }
        a
    }
}

/// Columns of 8 that [`accumulate_values_heads`] keeps in registers per pass for `g` heads
/// (`g` accumulators a column, `g` broadcast weights and a loaded value within 16 registers).
#[cfg(target_arch = "x86_64")]
const fn value_chunks(g: usize) -> usize {
    match g {
        0..=1 => 8,
        2..=3 => 4,
        4 => 2,
        _ => 1,
    }
}

/// [`accumulate_values`] over keys `0..n` for `G` heads at once (`rows` holds each head's `n`
/// weights; `o[g]` its output row): in passes over the columns, each key's values loaded once
/// for the heads; each column of each head starts from zero and adds its keys in order with one
/// FMA each, as there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn accumulate_values_heads<E: Load8, const G: usize>(
    rows: &[f32],
    n: usize,
    v: (*const E, usize),
    o: [*mut f32; G],
    d: usize,
) {
    let width = value_chunks(G);
    let mut c0 = 0;
    while c0 < d {
        let w = ((d - c0) / 8).min(width);
        match w {
            8 => values_pass::<E, G, 8>(rows, n, v, o, c0),
            4 => values_pass::<E, G, 4>(rows, n, v, o, c0),
            2 => values_pass::<E, G, 2>(rows, n, v, o, c0),
            _ => {
                for u in 0..w {
                    values_pass::<E, G, 1>(rows, n, v, o, c0 + 8 * u);
                }
            }
        }
        c0 += 8 * w;
    }
}

/// Columns `c0..c0 + 8·W` of [`accumulate_values_heads`], the `G·W` accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// (Indexes: the accumulators are a G x W grid walked in lockstep with the weights and values.)
#[allow(clippy::needless_range_loop)]
unsafe fn values_pass<E: Load8, const G: usize, const W: usize>(
    rows: &[f32],
    n: usize,
    v: (*const E, usize),
    o: [*mut f32; G],
    c0: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); W]; G];
    for j in 0..n {
        let vp = v.0.add(j * v.1 + c0);
        if j + VALUE_PREFETCH < n {
            prefetch_span(vp.add(VALUE_PREFETCH * v.1), 8 * W);
        }
        let mut p = [_mm256_setzero_ps(); G];
        for g in 0..G {
            p[g] = _mm256_set1_ps(*rows.get_unchecked(g * n + j));
        }
        for u in 0..W {
            let x = E::load8(vp.add(8 * u));
            for g in 0..G {
                acc[g][u] = _mm256_fmadd_ps(p[g], x, acc[g][u]);
            }
        }
    }
    for g in 0..G {
        for u in 0..W {
            _mm256_storeu_ps(o[g].add(c0 + 8 * u), acc[g][u]);
        }
    }
}

/// `row[j] = scale · q·k_j` for the keys `keys` (AVX2): four keys at a time (the query loaded
/// once for four, the four sums reduced together by `vhaddps`), then one at a time; the four-key
/// groups start at `keys.start`, which callers keep a multiple of 4, so a key's sum is reduced
/// the same way however the keys are split.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_keys<E: Load8>(
    q: *const f32,
    k: (*const E, usize),
    d: usize,
    scale: f32,
    row: &mut [f32],
    keys: std::ops::Range<usize>,
) {
    use std::arch::x86_64::*;
    let n = keys.end;
    let quads = keys.start + (n - keys.start) / 4 * 4;
    let sv = _mm_set1_ps(scale);
    let mut j = keys.start;
    while j < quads {
        let kp = [
            k.0.add(j * k.1),
            k.0.add((j + 1) * k.1),
            k.0.add((j + 2) * k.1),
            k.0.add((j + 3) * k.1),
        ];
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < d {
            let qv = _mm256_loadu_ps(q.add(i));
            for t in 0..4 {
                a[t] = _mm256_fmadd_ps(qv, E::load8(kp[t].add(i)), a[t]);
            }
            i += 8;
        }
        // [a0 a1 a2 a3] lane sums: pairwise hadds, then the two 128-bit halves.
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        _mm_storeu_ps(row.as_mut_ptr().add(j), _mm_mul_ps(s, sv));
        j += 4;
    }
    while j < n {
        let kp = k.0.add(j * k.1);
        let mut a = _mm256_setzero_ps();
        let mut i = 0;
        while i < d {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), E::load8(kp.add(i)), a);
            i += 8;
        }
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let h = _mm_hadd_ps(h, h);
        let h = _mm_hadd_ps(h, h);
        row[j] = _mm_cvtss_f32(h) * scale;
        j += 1;
    }
}

/// `o += Σ_{j in keys} row[j] · v_j` (AVX2; `o` starts from zero when `keys` starts at 0), with
/// `o` held in registers across the keys, 64 columns at a time (no load/store of `o` per key,
/// which chained every key's update on the previous one's store). Each column adds its keys in
/// order with one FMA each, so splitting the keys into consecutive ranges changes nothing.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn accumulate_values<E: Load8>(
    row: &[f32],
    v: (*const E, usize),
    o: *mut f32,
    d: usize,
    keys: std::ops::Range<usize>,
) {
    use std::arch::x86_64::*;
    let first = keys.start == 0;
    let row = &row[keys.clone()];
    let mut c0 = 0;
    while c0 < d {
        let w = ((d - c0) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        if !first {
            for (u, a) in acc.iter_mut().enumerate().take(w) {
                *a = _mm256_loadu_ps(o.add(c0 + 8 * u));
            }
        }
        // The full-width case with a constant trip count, so the 8 accumulators stay in registers.
        if w == 8 {
            for (jj, &p) in row.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                let vp = v.0.add((keys.start + jj) * v.1 + c0);
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, E::load8(vp.add(8 * u)), *a);
                }
            }
        } else {
            for (jj, &p) in row.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                let vp = v.0.add((keys.start + jj) * v.1 + c0);
                for (u, a) in acc.iter_mut().enumerate().take(w) {
                    *a = _mm256_fmadd_ps(pv, E::load8(vp.add(8 * u)), *a);
                }
            }
        }
        for (u, a) in acc.iter().enumerate().take(w) {
            _mm256_storeu_ps(o.add(c0 + 8 * u), *a);
        }
        c0 += 8 * w;
    }
}

/// The in-place row softmax, compiled for AVX2+FMA when the CPU has them.
fn softmax_kernel() -> fn(&mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |row| {
                // SAFETY: the features were detected above.
                unsafe { softmax_row_avx2(row) }
            };
        }
    }
    softmax_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_impl(row)
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_row(row: &mut [f32]) {
    softmax_row_impl(row)
}

/// The largest non-NaN value of `x` (−∞ when there is none), eight lanes at a time (inlined, so
/// compiled for AVX2 inside the callers built for it).
#[inline(always)]
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(m.iter())
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[inline(always)]
fn softmax_row_impl(row: &mut [f32]) {
    const LANES: usize = 8;
    let max = max_f32(row);
    if max == f32::NEG_INFINITY {
        // Nothing visible: define the row as zeros rather than NaN.
        row.fill(0.0);
        return;
    }
    let mut s = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_f32(c[l] - max);
            c[l] = e;
            s[l] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        let e = exp_f32(*x - max);
        *x = e;
        sum += e;
    }
    sum += s.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `exp(x)` for `x <= 0` (Cephes' `expf`: range reduction by ln 2 and a degree-6 polynomial,
/// within 2 ulp), written so the compiler vectorises it. Inputs below -87.3 give ~1e-38.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n by building the exponent bits; n is in [-126, 127] after the clamp. Adding 1.5·2^23
    // puts the integer n in the low mantissa bits (exactly, |n| < 2^22), so no float-to-int
    // conversion is needed (Rust's saturates, which kept this loop from vectorising).
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4b40_0000);
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// [`exp_f32`] of eight lanes (AVX2): the same operations in the same order, so each lane equals
/// `exp_f32` of it bit for bit, except that a NaN lane gives `exp_f32` of the lower clamp bound
/// (callers that may see NaN mask it). For callers compiled with AVX2 (inlined into them).
///
/// # Safety
/// AVX2 present (the caller's `target_feature`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_f32x8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let k = _mm256_set1_ps;
    let x = _mm256_min_ps(_mm256_max_ps(x, k(-87.336_55)), k(88.376_26));
    let n = _mm256_floor_ps(_mm256_add_ps(
        _mm256_mul_ps(x, k(std::f32::consts::LOG2_E)),
        k(0.5),
    ));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, k(0.693_359_4))),
        _mm256_mul_ps(n, k(-2.121_944_4e-4)),
    );
    let mut p = k(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), k(c));
    }
    let y = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
        k(1.0),
    );
    let n_bits = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(n, k(12_582_912.0))),
        _mm256_set1_epi32(0x4b40_0000),
    );
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};
    use vvlm_cost::{Component, FlopCounter};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::nn::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -(i as f32) * 4.3e-4;
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_lane_exp_equals_the_scalar_one_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        #[target_feature(enable = "avx2")]
        unsafe fn lanes(x: &[f32; 8]) -> [f32; 8] {
            use std::arch::x86_64::*;
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), exp_f32x8(_mm256_loadu_ps(x.as_ptr())));
            out
        }
        // Past both clamp bounds, through the range, and values whose n is at the edges.
        let mut xs: Vec<f32> = (0..=40_000).map(|i| -100.0 + i as f32 * 4.7e-3).collect();
        xs.extend([
            0.0,
            -0.0,
            88.376_26,
            -87.336_55,
            1e-30,
            -1e-30,
            f32::MIN,
            f32::MAX,
        ]);
        for c in xs.chunks(8) {
            let mut x = [0f32; 8];
            x[..c.len()].copy_from_slice(c);
            // SAFETY: AVX2 detected above.
            let got = unsafe { lanes(&x) };
            for (g, &xi) in got.iter().zip(&x) {
                assert_eq!(g.to_bits(), exp_f32(xi).to_bits(), "exp({xi})");
            }
        }
    }

    /// Deterministic inputs (a random draw once landed at 5.4e-7 against an old 5e-7 bound):
    /// each probability carries `exp_f32`'s relative error (< 3e-7, tested above) in its
    /// numerator and in the sum, plus a few roundings, so the bound is 1e-6 on values <= 1.
    #[test]
    fn softmax_row_matches_candle() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let vals: Vec<f32> = (0..7 * 1001)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0
            })
            .collect();
        let x = Tensor::from_vec(vals, (7, 1001), &Device::Cpu).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let mut data = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for row in data.chunks_mut(1001) {
            softmax_kernel()(row);
        }
        let got = Tensor::from_vec(data, (7, 1001), &Device::Cpu).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-6, "{err}");
    }

    fn check(b: usize, heads: usize, kv_heads: usize, q_len: usize, masking: Masking, d: usize) {
        let dev = Device::Cpu;
        let past = match masking {
            Masking::Causal { past } => past,
            Masking::None => 0,
        };
        let kv_len = past + q_len;
        // q as a linear layer's output viewed per head: [b, q, h·d] -> [b, h, q, d] (strided).
        let q = Tensor::randn(0f32, 1.0, (b, q_len, heads * d), &dev)
            .unwrap()
            .reshape((b, q_len, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        // k, v as a preallocated cache narrowed to the filled positions.
        let cap = kv_len + 5;
        let k = Tensor::randn(0f32, 1.0, (b, kv_heads, cap, d), &dev)
            .unwrap()
            .narrow(2, 0, kv_len)
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kv_heads, cap, d), &dev)
            .unwrap()
            .narrow(2, 0, kv_len)
            .unwrap();
        let scale = (d as f64).powf(-0.5);
        let flops = FlopCounter::new();
        let ctx = Ctx::new(&flops, Component::Vision);
        let got = attention(&q, &k, &v, scale, masking, &ctx).unwrap();
        let want = reference_attention(&q, &k, &v, scale, masking).unwrap();
        assert_eq!(got.dims(), want.dims());
        let err = max_abs_diff(&got, &want);
        assert!(
            err < 2e-6,
            "{b} {heads}/{kv_heads} q{q_len} {masking:?}: {err}"
        );
        // Visible pairs, counted by hand: all q x kv, or row i sees past + i + 1 keys.
        let pairs: usize = match masking {
            Masking::None => q_len * kv_len,
            Masking::Causal { past } => (0..q_len).map(|i| past + i + 1).sum(),
        };
        assert_eq!(
            flops.get(Component::Vision),
            4 * (b * heads * pairs * d) as u64
        );
    }

    #[test]
    fn a_decode_batch_row_equals_its_sequence_alone() {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (6, 2, 64);
        // Different cache lengths, one a single position; caches are narrowed views of larger
        // buffers, as the KV cache is.
        let lens = [1usize, 7, 130, 33];
        let b = lens.len();
        let q = Tensor::randn(0f32, 1.0, (1, heads, b, d), &dev).unwrap();
        let kvs: Vec<(Tensor, Tensor)> = lens
            .iter()
            .map(|&n| {
                let t = || {
                    Tensor::randn(0f32, 1.0, (1, kv_heads, n + 9, d), &dev)
                        .unwrap()
                        .narrow(2, 0, n)
                        .unwrap()
                };
                (t(), t())
            })
            .collect();
        let scale = 0.125;
        let counters: Vec<FlopCounter> = (0..b).map(|_| FlopCounter::new()).collect();
        let ctxs: Vec<Ctx> = counters
            .iter()
            .map(|c| Ctx::new(c, Component::LmDecode))
            .collect();
        // On one thread the units are whole kv groups (4 sequences x 2 kv heads >= 4 per
        // thread); on 64 threads one head each: both equal to each sequence alone.
        let on_threads = |n: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
                .install(|| decode_attention_batch(&q, &kvs, scale, &ctxs).unwrap())
        };
        let (grouped, per_head) = (on_threads(1), on_threads(64));
        assert_eq!(
            grouped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            per_head.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let got = grouped;
        assert_eq!(got.dims(), &[b, 1, heads * d]);
        for (i, (k, v)) in kvs.iter().enumerate() {
            let qi = q.narrow(2, i, 1).unwrap().contiguous().unwrap();
            let alone_flops = FlopCounter::new();
            let masking = Masking::Causal { past: lens[i] - 1 };
            let alone = attention(
                &qi,
                k,
                v,
                scale,
                masking,
                &Ctx::new(&alone_flops, Component::LmDecode),
            )
            .unwrap();
            let flat = |t: Tensor| -> Vec<f32> {
                t.transpose(1, 2)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let row: Vec<f32> = got
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(row, flat(alone), "sequence {i}: bit for bit");
            let want = flat(reference_attention(&qi, k, v, scale, masking).unwrap());
            let err = row
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 2e-6, "sequence {i}: {err}");
            // Counted by hand: 2 products of d multiply-adds per head and key.
            let by_hand = 4 * (heads * lens[i] * d) as u64;
            // (The batch ran twice above, on one thread and on 64: counted each time.)
            assert_eq!(counters[i].get(Component::LmDecode), 2 * by_hand);
            assert_eq!(alone_flops.get(Component::LmDecode), by_hand);
        }
    }

    #[test]
    fn an_f16_cache_attends_as_its_exactly_widened_f32_copy() {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (6, 2, 64);
        let c = FlopCounter::new();
        let ctx = Ctx::new(&c, Component::LmDecode);
        // Caches as narrowed views of larger f16 buffers; `wide` the same values in f32.
        let cache = |n: usize| {
            let t = Tensor::randn(0f32, 1.0, (1, kv_heads, n + 9, d), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap();
            t.narrow(2, 0, n).unwrap()
        };
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        // A decode row (the f16 kernel where the CPU has F16C) and prompt rows (widened for
        // the GEMMs): each equal to the f32 kernels on the widened cache, bit for bit.
        for (q_len, past) in [(1usize, 40usize), (1, 0), (5, 30), (130, 0)] {
            let n = past + q_len;
            let (k, v) = (cache(n), cache(n));
            let q = Tensor::randn(0f32, 1.0, (1, heads, q_len, d), &dev).unwrap();
            let masking = Masking::Causal { past };
            let got = attention(&q, &k, &v, 0.125, masking, &ctx).unwrap();
            let want = attention(&q, &wide(&k), &wide(&v), 0.125, masking, &ctx).unwrap();
            assert_eq!(flat(&got), flat(&want), "q {q_len} after {past}");
            let reference = reference_attention(&q, &wide(&k), &wide(&v), 0.125, masking).unwrap();
            assert!(
                max_abs_diff(&got, &reference) < 2e-6,
                "q {q_len} after {past}"
            );
        }
        // A batch over f16 caches of different lengths: each row as its sequence alone.
        let lens = [1usize, 17, 300];
        let kvs: Vec<(Tensor, Tensor)> = lens.iter().map(|&n| (cache(n), cache(n))).collect();
        let q = Tensor::randn(0f32, 1.0, (1, heads, lens.len(), d), &dev).unwrap();
        let ctxs: Vec<Ctx> = lens
            .iter()
            .map(|_| Ctx::new(&c, Component::LmDecode))
            .collect();
        // Grouped units (one thread: 3 sequences x 2 kv heads >= 4) and one head per unit.
        let on_threads = |n: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
                .install(|| decode_attention_batch(&q, &kvs, 0.125, &ctxs).unwrap())
        };
        let got = on_threads(1);
        assert_eq!(flat(&got), flat(&on_threads(64)));
        for (i, (k, v)) in kvs.iter().enumerate() {
            let qi = q.narrow(2, i, 1).unwrap().contiguous().unwrap();
            let masking = Masking::Causal { past: lens[i] - 1 };
            let alone = attention(&qi, k, v, 0.125, masking, &ctx).unwrap();
            let widened = attention(&qi, &wide(k), &wide(v), 0.125, masking, &ctx).unwrap();
            let row = flat(&got.get(i).unwrap());
            assert_eq!(row, flat(&alone.transpose(1, 2).unwrap()), "sequence {i}");
            assert_eq!(row, flat(&widened.transpose(1, 2).unwrap()), "sequence {i}");
        }
    }

    /// Every kv group size the grouped kernels are built for (2..=8 heads a group: each key
    /// loaded once for the group), and 9 (key blocks taken by each head in turn), on f32 and
    /// f16 caches, with a head size whose columns split unevenly into register passes (80): a
    /// batch's rows computed by whole groups equal the same rows computed one head at a time,
    /// bit for bit, and the f64-free reference within 2e-6.
    #[test]
    fn every_group_size_equals_its_heads_one_at_a_time() {
        let dev = Device::Cpu;
        let c = FlopCounter::new();
        let kv_heads = 2;
        // A single position, a length with a tail of 2 after the key quads, and a longer one.
        let lens = [1usize, 6, 37];
        for rep in 1..=9 {
            for d in [64usize, 80] {
                for dtype in [DType::F32, DType::F16] {
                    let heads = rep * kv_heads;
                    let q = Tensor::randn(0f32, 1.0, (1, heads, lens.len(), d), &dev).unwrap();
                    let kvs: Vec<(Tensor, Tensor)> = lens
                        .iter()
                        .map(|&n| {
                            let t = || {
                                Tensor::randn(0f32, 1.0, (1, kv_heads, n, d), &dev)
                                    .unwrap()
                                    .to_dtype(dtype)
                                    .unwrap()
                            };
                            (t(), t())
                        })
                        .collect();
                    let ctxs: Vec<Ctx> = lens
                        .iter()
                        .map(|_| Ctx::new(&c, Component::LmDecode))
                        .collect();
                    // One thread: 3 sequences x 2 kv heads >= 4 units, so whole groups; 64
                    // threads: one head a unit.
                    let on_threads = |n: usize| {
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(n)
                            .build()
                            .unwrap()
                            .install(|| decode_attention_batch(&q, &kvs, 0.125, &ctxs).unwrap())
                    };
                    let flat =
                        |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
                    let grouped = on_threads(1);
                    let case = format!("{rep} heads a group, d {d}, {dtype:?}");
                    assert_eq!(flat(&grouped), flat(&on_threads(64)), "{case}");
                    for (i, (k, v)) in kvs.iter().enumerate() {
                        let qi = q.narrow(2, i, 1).unwrap().contiguous().unwrap();
                        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                        let masking = Masking::Causal { past: lens[i] - 1 };
                        let want =
                            reference_attention(&qi, &wide(k), &wide(v), 0.125, masking).unwrap();
                        let row = grouped.get(i).unwrap();
                        let err = max_abs_diff(
                            &row.reshape((heads, d)).unwrap(),
                            &want.reshape((heads, d)).unwrap(),
                        );
                        assert!(err < 2e-6, "{case}, sequence {i}: {err}");
                    }
                }
            }
        }
    }

    /// The 512-bit kernels against the 256-bit ones, called directly (the decode rows run one
    /// or the other for the whole process): every group size (1..=9; 9 falls back to the
    /// 256-bit key blocks), head sizes whose columns split into 16s, 16s and an 8 (72, 80) or
    /// not (64), lengths with and without a tail after the key quads, f32 and f16: the same
    /// outputs bit for bit. Skipped where the CPU lacks AVX-512 F/VL/DQ.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_512_bit_kernels_equal_the_256_bit_ones_bit_for_bit() {
        if !avx512_attention(64) {
            eprintln!("no AVX-512 F/VL/DQ here: nothing to compare");
            return;
        }
        let softmax = softmax_kernel();
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                    (x % 20_000) as f32 / 10_000.0 - 1.0
                })
                .collect()
        };
        for heads in 1..=9usize {
            for d in [64usize, 72, 80] {
                for n in [1usize, 4, 6, 37, 130] {
                    let q = values(heads * d, 1);
                    let (k, v) = (values(n * d, 2), values(n * d, 3));
                    let (kh, vh): (Vec<half::f16>, Vec<half::f16>) = (
                        k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                        v.iter().map(|&x| half::f16::from_f32(x)).collect(),
                    );
                    let run = |wide: bool, f16: bool| -> Vec<f32> {
                        let mut out = vec![0f32; heads * d];
                        let mut rows = vec![0f32; heads * n];
                        let (qp, op) = ((q.as_ptr(), d), (out.as_mut_ptr(), d));
                        // SAFETY: the features are checked above (AVX-512 implies the AVX2
                        // set here); q and out hold `heads` rows of d, k and v n rows of d.
                        unsafe {
                            match (wide, f16) {
                                (true, false) => attend_group_avx512(
                                    qp,
                                    (k.as_ptr(), d),
                                    (v.as_ptr(), d),
                                    op,
                                    heads,
                                    d,
                                    0.125,
                                    &mut rows,
                                    softmax,
                                ),
                                (false, false) => attend_group_avx2(
                                    qp,
                                    (k.as_ptr(), d),
                                    (v.as_ptr(), d),
                                    op,
                                    heads,
                                    d,
                                    0.125,
                                    &mut rows,
                                    softmax,
                                ),
                                (true, true) => attend_group_avx512(
                                    qp,
                                    (kh.as_ptr(), d),
                                    (vh.as_ptr(), d),
                                    op,
                                    heads,
                                    d,
                                    0.125,
                                    &mut rows,
                                    softmax,
                                ),
                                (false, true) => attend_group_avx2_f16(
                                    qp,
                                    (kh.as_ptr(), d),
                                    (vh.as_ptr(), d),
                                    op,
                                    heads,
                                    d,
                                    0.125,
                                    &mut rows,
                                    softmax,
                                ),
                            }
                        }
                        out
                    };
                    for f16 in [false, true] {
                        let (wide, narrow) = (run(true, f16), run(false, f16));
                        assert!(
                            narrow.iter().any(|x| x.abs() > 1e-3),
                            "a non-trivial output"
                        );
                        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&wide),
                            bits(&narrow),
                            "{heads} heads, d {d}, {n} keys, f16 {f16}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_batch_refuses_mismatched_inputs() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
        let kv = |h: usize, n: usize| Tensor::zeros((1, h, n, 8), DType::F32, &dev).unwrap();
        let c = FlopCounter::new();
        let ctxs =
            |n: usize| -> Vec<Ctx> { (0..n).map(|_| Ctx::new(&c, Component::LmDecode)).collect() };
        // One cache for two rows; heads not a multiple of kv heads; an empty cache.
        let one = vec![(kv(2, 3), kv(2, 3))];
        assert!(decode_attention_batch(&q, &one, 1.0, &ctxs(2)).is_err());
        let odd = vec![(kv(3, 3), kv(3, 3)), (kv(3, 3), kv(3, 3))];
        assert!(decode_attention_batch(&q, &odd, 1.0, &ctxs(2)).is_err());
        // Sequences of one batch disagreeing on their kv heads.
        let mixed = vec![(kv(2, 3), kv(2, 3)), (kv(4, 3), kv(4, 3))];
        assert!(decode_attention_batch(&q, &mixed, 1.0, &ctxs(2)).is_err());
        let empty = vec![(kv(2, 3), kv(2, 3)), (kv(2, 0), kv(2, 0))];
        assert!(decode_attention_batch(&q, &empty, 1.0, &ctxs(2)).is_err());
        // No sequences: no rows, no panic.
        let none = Tensor::zeros((1, 4, 0, 8), DType::F32, &dev).unwrap();
        let out = decode_attention_batch(&none, &[], 1.0, &[]).unwrap();
        assert_eq!(out.dims(), &[0, 1, 32]);
    }

    #[test]
    fn fused_matches_unfused_bidirectional() {
        check(2, 4, 4, 37, Masking::None, 72);
        check(1, 3, 3, 300, Masking::None, 16); // several row blocks
    }

    #[test]
    fn fused_matches_unfused_causal_and_grouped() {
        check(1, 8, 2, 19, Masking::Causal { past: 0 }, 64);
        check(1, 8, 2, 19, Masking::Causal { past: 11 }, 64);
        check(1, 9, 3, 1, Masking::Causal { past: 40 }, 64); // a decode step
        check(2, 4, 2, 3, Masking::Causal { past: 10 }, 32); // few rows: dot-product path
        check(2, 4, 1, 200, Masking::Causal { past: 3 }, 8);
        // Many blocks of rows, each computing only the keys up to its last visible one.
        check(1, 4, 2, 600, Masking::Causal { past: 0 }, 64);
        check(1, 4, 2, 300, Masking::Causal { past: 700 }, 32);
    }

    /// The decode path's shapes: head widths of one and two 64-column passes and a ragged one
    /// (72 = 64 + 8), a width that is not a multiple of 8 (the portable path), key counts with
    /// and without a tail after the groups of four, a long context, a few rows at once.
    #[test]
    fn decode_rows_match_unfused() {
        check(1, 9, 3, 1, Masking::Causal { past: 2047 }, 64);
        check(2, 4, 2, 1, Masking::Causal { past: 130 }, 128);
        check(1, 4, 2, 2, Masking::Causal { past: 33 }, 72);
        check(1, 4, 4, 4, Masking::Causal { past: 5 }, 12);
        check(1, 2, 1, 1, Masking::Causal { past: 0 }, 64); // one key
        check(3, 6, 3, 1, Masking::None, 64);
    }

    #[test]
    fn scaled_softmax_by_hand() {
        // Scores ln 1, ln 2, ln 3 (scale 1): probabilities 1/6, 2/6, 3/6. Causal with q_len 2
        // and past 1: row 0 sees keys 0..=1 (1/3, 2/3, 0), row 1 all three.
        let l = |v: f32| v.ln();
        let x = Tensor::new(
            &[[l(1.0), l(2.0), l(3.0)], [l(1.0), l(2.0), l(3.0)]],
            &Device::Cpu,
        )
        .unwrap();
        let all = x
            .apply_op1_no_bwd(&ScaledSoftmax {
                scale: 1.0,
                causal: None,
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let causal = x
            .apply_op1_no_bwd(&ScaledSoftmax {
                scale: 1.0,
                causal: Some((2, 1)),
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&all[0], &[1.0 / 6.0, 2.0 / 6.0, 0.5]), "{all:?}");
        assert!(
            close(&causal[0], &[1.0 / 3.0, 2.0 / 3.0, 0.0]),
            "{causal:?}"
        );
        assert!(
            close(&causal[1], &[1.0 / 6.0, 2.0 / 6.0, 0.5]),
            "{causal:?}"
        );
        // The scale multiplies the scores: scale 2 on ln 1, ln 2 -> 1:4.
        let y = Tensor::new(&[[0f32, l(2.0)]], &Device::Cpu)
            .unwrap()
            .apply_op1_no_bwd(&ScaledSoftmax {
                scale: 2.0,
                causal: None,
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(close(&y[0], &[0.2, 0.8]), "{y:?}");
    }

    /// [`device_attention`] (the GPU's path) against the plain candle composition, f32 and bf16,
    /// causal with a past, bidirectional, grouped-query heads, a decode row.
    #[test]
    fn device_attention_matches_the_candle_composition() {
        let dev = Device::Cpu;
        for (heads, kv_heads, q_len, masking, d) in [
            (8, 2, 19, Masking::Causal { past: 11 }, 64),
            (4, 4, 37, Masking::None, 72),
            (9, 3, 1, Masking::Causal { past: 40 }, 64),
            (4, 1, 70, Masking::Causal { past: 0 }, 8),
        ] {
            let past = match masking {
                Masking::Causal { past } => past,
                Masking::None => 0,
            };
            let q = Tensor::randn(0f32, 1.0, (2, heads, q_len, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, kv_heads, past + q_len, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, kv_heads, past + q_len, d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let want = reference_attention(&q, &k, &v, scale, masking).unwrap();
            let got = device_attention(&q, &k, &v, scale, masking).unwrap();
            let err = max_abs_diff(&got, &want);
            assert!(
                err < 2e-6,
                "f32 {heads}/{kv_heads} q{q_len} {masking:?}: {err}"
            );
            // bf16 inputs and outputs, against the f32 reference of the same rounded inputs:
            // within a few bf16 roundings (2^-8 relative) of outputs of magnitude <= ~3
            // (measured 0.004-0.011; a key shown one position early fails both checks).
            let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let round = |t: &Tensor| bf(t).to_dtype(DType::F32).unwrap();
            let want =
                reference_attention(&round(&q), &round(&k), &round(&v), scale, masking).unwrap();
            let got = device_attention(&bf(&q), &bf(&k), &bf(&v), scale, masking).unwrap();
            let err = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
            assert!(
                err < 0.03,
                "bf16 {heads}/{kv_heads} q{q_len} {masking:?}: {err}"
            );
        }
    }

    #[test]
    fn causal_rows_ignore_future_keys() {
        // Changing a future key/value must not change earlier rows.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap();
        let flops = FlopCounter::new();
        let ctx = Ctx::new(&flops, Component::LmPrefill);
        let m = Masking::Causal { past: 0 };
        let a = attention(&q, &k, &v, 0.3, m, &ctx).unwrap();
        let k2 = Tensor::cat(
            &[
                &k.i((.., .., ..5, ..)).unwrap(),
                &(k.i((.., .., 5.., ..)).unwrap() * 9.0).unwrap(),
            ],
            2,
        )
        .unwrap();
        let b = attention(&q, &k2, &v, 0.3, m, &ctx).unwrap();
        let early = |t: &Tensor| t.i((.., .., ..5, ..)).unwrap();
        assert_eq!(max_abs_diff(&early(&a), &early(&b)), 0.0);
        assert!(max_abs_diff(&a, &b) > 0.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let flops = FlopCounter::new();
        let ctx = Ctx::new(&flops, Component::LmPrefill);
        assert!(attention(&q, &k, &k, 1.0, Masking::None, &ctx).is_err());
        let k = Tensor::zeros((1, 3, 5, 8), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, 1.0, Masking::Causal { past: 0 }, &ctx).is_err());
    }
}
