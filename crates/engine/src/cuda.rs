//! The engine's own CUDA kernels (sources in `kernels/`, compiled to PTX by `build.rs` when the
//! `cuda` feature is on), loaded through candle's CUDA device (cudarc) and launched from the
//! custom ops' `cuda_fwd`. Each kernel's CPU reference is the same op's `cpu_fwd`:
//! `bilinear_pool.cu` / `pool::BilinearPool`, `scaled_softmax.cu` / `attention::ScaledSoftmax`;
//! `flash_attention.cu` (`attention::FlashAttention`) has no CPU twin: it is checked against
//! the CPU's fused attention and `attention::reference_attention`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

/// Keeps the memory freed on `device` in its default memory pool for later allocations. cudarc
/// allocates stream-ordered (`cuMemAllocAsync`) from that pool, whose release threshold is 0 by
/// default: every synchronisation (one a decode step, for the logits) handed all freed memory
/// back to the driver, and the next step's allocations mapped it again. Serving stacks keep it
/// (PyTorch's caching allocator never returns memory on its own); the KV budget bounds what the
/// engine holds. `VVLM_CUDA_POOL_RELEASE=1` keeps the driver's default, to compare.
pub fn keep_freed_memory(device: &candle_core::Device) -> Result<()> {
    if let Some(pool) = default_pool(device)? {
        let mut keep = u64::MAX;
        pool_attribute(pool, true, &mut keep)?;
    }
    Ok(())
}

/// The release threshold of `device`'s default memory pool (bytes freed memory may hold before
/// a synchronisation returns it to the driver; `None` without stream-ordered allocation).
pub fn pool_release_threshold(device: &candle_core::Device) -> Result<Option<u64>> {
    let Some(pool) = default_pool(device)? else {
        return Ok(None);
    };
    let mut value = 0u64;
    pool_attribute(pool, false, &mut value)?;
    Ok(Some(value))
}

type MemPool = candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool;

/// The default memory pool of `device`, where cudarc allocates (when the device allocates
/// stream-ordered at all).
fn default_pool(device: &candle_core::Device) -> Result<Option<MemPool>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` receives the device's default pool handle.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .w()?;
    Ok(Some(pool))
}

/// Sets (`set`) or reads the pool's release threshold through `value`.
fn pool_attribute(pool: MemPool, set: bool, value: &mut u64) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    let ptr = (value as *mut u64).cast();
    // SAFETY: the release threshold is a u64 attribute; `pool` is a live pool handle.
    let r = unsafe {
        if set {
            sys::cuMemPoolSetAttribute(pool, attr, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, attr, ptr)
        }
    };
    r.result().w()?;
    Ok(())
}

/// PTX of `kernels/bilinear_pool.cu`.
pub const BILINEAR_POOL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bilinear_pool.ptx"));

/// PTX of `kernels/scaled_softmax.cu`.
pub const SCALED_SOFTMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/scaled_softmax.ptx"));

/// PTX of `kernels/flash_attention.cu`.
pub const FLASH_ATTENTION_PTX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));

/// Attention by `kernels/flash_attention.cu` (see [`crate::attention::FlashAttention`]): `q`
/// `[b, heads, q_len, d]`, `k`/`v` `[b, kv_heads, kv_len, d]` with any strides whose last one is
/// 1 and the others (and the offsets) multiples of 8; `past` for the causal mask. Returns `[b,
/// q_len, heads, d]` contiguous.
pub fn flash_attention(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    scale: f32,
    past: Option<usize>,
) -> Result<(CudaStorage, Shape)> {
    let (b, heads, q_len, d) = lq.shape().dims4()?;
    let (kb, kv_heads, kv_len, kd) = lk.shape().dims4()?;
    if kb != b || kd != d || lv.shape().dims4()? != (b, kv_heads, kv_len, d) {
        candle_core::bail!(
            "flash-attention: incompatible shapes q {:?} k {:?} v {:?}",
            lq.dims(),
            lk.dims(),
            lv.dims()
        );
    }
    if kv_heads == 0 || heads % kv_heads != 0 || d % 8 != 0 || d > 128 || q_len == 0 {
        candle_core::bail!(
            "flash-attention: {heads} heads on {kv_heads}, head size {d}, {q_len} rows"
        );
    }
    if let Some(past) = past {
        if past + q_len != kv_len {
            candle_core::bail!(
                "flash-attention: causal mask needs past {past} + q {q_len} == kv {kv_len}"
            );
        }
    }
    for l in [lq, lk, lv] {
        let st = l.stride();
        if st[3] != 1
            || st[..3]
                .iter()
                .chain([&l.start_offset()])
                .any(|s| s % 8 != 0)
        {
            candle_core::bail!(
                "flash-attention: rows must be contiguous and 16-byte aligned ({:?})",
                st
            );
        }
    }
    let dp = match d {
        0..=32 => 32,
        33..=64 => 64,
        65..=80 => 80,
        _ => 128,
    };
    let dims = FlashDims {
        b,
        heads,
        kv_heads,
        q_len,
        kv_len,
        d,
        past,
        scale,
    };
    let out = match q.dtype() {
        DType::BF16 => launch_flash::<half::bf16>(
            (q, lq),
            (k, lk),
            (v, lv),
            &format!("flash_attention_bf16_d{dp}"),
            dims,
        )?,
        DType::F16 => launch_flash::<half::f16>(
            (q, lq),
            (k, lk),
            (v, lv),
            &format!("flash_attention_f16_d{dp}"),
            dims,
        )?,
        dt => candle_core::bail!("flash-attention: unsupported dtype {dt:?} (bf16 or f16)"),
    };
    Ok((out, Shape::from((b, q_len, heads, d))))
}

#[derive(Clone, Copy)]
struct FlashDims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
    past: Option<usize>,
    scale: f32,
}

fn launch_flash<T: CudaDType + DeviceRepr>(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    kernel: &str,
    a: FlashDims,
) -> Result<CudaStorage> {
    let dev = q.device();
    let qs = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
    let ks = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
    let vs = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_flash_attention", FLASH_ATTENTION_PTX)?;
    let total = a.b * a.q_len * a.heads * a.d;
    // SAFETY: every output element is written: each block writes all d columns of its rows.
    let out = unsafe { dev.alloc::<T>(total)? };
    let to_i32 = |x: usize, what: &str| -> Result<i32> {
        i32::try_from(x)
            .map_err(|_| candle_core::Error::Msg(format!("flash-attention: {what} {x} too large")))
    };
    let (q_len, kv_len, d) = (
        to_i32(a.q_len, "q_len")?,
        to_i32(a.kv_len, "kv_len")?,
        to_i32(a.d, "d")?,
    );
    let (heads, kv_heads) = (to_i32(a.heads, "heads")?, to_i32(a.kv_heads, "kv heads")?);
    let strides = |l: &Layout| -> [i64; 3] {
        let s = l.stride();
        [s[0] as i64, s[1] as i64, s[2] as i64]
    };
    let (sq, sk, sv) = (strides(lq), strides(lk), strides(lv));
    let causal = i32::from(a.past.is_some());
    let past = to_i32(a.past.unwrap_or(0), "past")?;
    let scale_log2 = a.scale * std::f32::consts::LOG2_E;
    let mut bld = func.builder();
    bld.arg(&qs);
    bld.arg(&ks);
    bld.arg(&vs);
    bld.arg(&out);
    bld.arg(&q_len);
    bld.arg(&kv_len);
    bld.arg(&d);
    bld.arg(&heads);
    bld.arg(&kv_heads);
    for s in sq.iter().chain(&sk).chain(&sv) {
        bld.arg(s);
    }
    bld.arg(&causal);
    bld.arg(&past);
    bld.arg(&scale_log2);
    if a.heads > 65_535 || a.b > 65_535 {
        candle_core::bail!(
            "flash-attention: {} heads x {} sequences exceed one grid",
            a.heads,
            a.b
        );
    }
    let cfg = LaunchConfig {
        grid_dim: (a.q_len.div_ceil(64) as u32, a.heads as u32, a.b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, const T*, const T*, T*, int x5, long long x9,
    // int, int, float), matched above; q, k and v hold the elements their layouts address (rows
    // checked 16-byte aligned), `out` holds b·q_len·heads·d elements.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// PTX of `kernels/decode_attention.cu`.
pub const DECODE_ATTENTION_PTX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));

/// Decode rows by `kernels/decode_attention.cu` (see [`crate::attention::DecodeAttention`]):
/// `q` `[B, heads, d]` contiguous; `kvs[i]` sequence `i`'s `[1, kv_heads, len_i, d]` keys and
/// values (same dtype, this device, last stride 1, even strides and offsets). Returns `[B,
/// heads, d]`.
pub fn decode_attention(
    q: &CudaStorage,
    lq: &Layout,
    kvs: &[(candle_core::Tensor, candle_core::Tensor)],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (b, heads, d) = lq.shape().dims3()?;
    let Some((start, end)) = lq.contiguous_offsets() else {
        candle_core::bail!("decode-attention expects contiguous queries");
    };
    if kvs.len() != b || b == 0 {
        candle_core::bail!("decode-attention: {b} rows for {} caches", kvs.len());
    }
    if d % 2 != 0 || d > 256 {
        candle_core::bail!("decode-attention: head size {d} (even, at most 256)");
    }
    let kernel = format!(
        "decode_attention_{}",
        dtype_suffix(q.dtype(), "decode-attention")?
    );
    let args = (q, (start, end), (b, heads, d), kvs, kernel.as_str(), scale);
    match q.dtype() {
        DType::F32 => launch_decode::<f32>(args),
        DType::BF16 => launch_decode::<half::bf16>(args),
        _ => launch_decode::<half::f16>(args),
    }
    .map(|out| (out, Shape::from((b, heads, d))))
}

/// Per sequence, what the batched cache kernels read: `[k pointer, v pointer, k head stride, k
/// row stride, v head stride, v row stride, n]` (elements; `n` the cached length for decode
/// attention, the position written for an append), one array for the whole batch so that one
/// host-to-device copy carries it.
const CACHE_META: usize = 7;

/// One sequence's cache as [`cache_meta`] reads it: keys' and values' storages and layouts
/// (`[1, kv_heads, _, d]`, last stride 1, checked by the caller) and `n`.
type CacheRef<'a> = (
    &'a candle_core::Storage,
    &'a Layout,
    &'a candle_core::Storage,
    &'a Layout,
    usize,
);

/// The [`CACHE_META`] array of `caches` on the device, and the guards that order the kernel's
/// accesses after earlier writes (drop them after the launch is queued).
fn cache_meta<'a, T: CudaDType + DeviceRepr + 'a>(
    dev: &candle_core::CudaDevice,
    stream: &'a candle_core::cuda_backend::cudarc::driver::CudaStream,
    caches: &[CacheRef<'a>],
    what: &str,
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaSlice<i64>,
    Vec<candle_core::cuda_backend::cudarc::driver::SyncOnDrop<'a>>,
)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let mut meta = Vec::with_capacity(CACHE_META * caches.len());
    let mut syncs = Vec::with_capacity(2 * caches.len());
    for &(ks, kl, vs, vl, n) in caches {
        for (storage, layout) in [(ks, kl), (vs, vl)] {
            let candle_core::Storage::Cuda(c) = storage else {
                candle_core::bail!("{what}: a cache is not on the GPU");
            };
            let (ptr, sync) = c.as_cuda_slice::<T>()?.device_ptr(stream);
            meta.push((ptr + (layout.start_offset() * std::mem::size_of::<T>()) as u64) as i64);
            syncs.push(sync);
        }
        for l in [kl, vl] {
            meta.extend([l.stride()[1] as i64, l.stride()[2] as i64]);
        }
        meta.push(n as i64);
    }
    Ok((dev.clone_htod(&meta)?, syncs))
}

/// The kernels' name suffix for a dtype (`f32`, `bf16`, `f16`).
fn dtype_suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?}"),
    })
}

type DecodeArgs<'a> = (
    &'a CudaStorage,
    (usize, usize),
    (usize, usize, usize),
    &'a [(candle_core::Tensor, candle_core::Tensor)],
    &'a str,
    f32,
);

fn launch_decode<T: CudaDType + DeviceRepr>(
    (q, (start, end), (b, heads, d), kvs, kernel, scale): DecodeArgs<'_>,
) -> Result<CudaStorage> {
    let dev = q.device();
    let stream = dev.cuda_stream();
    // Every cache's storage read-locked until the launch is queued.
    let guards: Vec<_> = kvs
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let mut kv_heads = None;
    let mut caches: Vec<CacheRef> = Vec::with_capacity(b);
    for ((ks, kl), (vs, vl)) in &guards {
        let (one, kvh, len, kd) = kl.shape().dims4()?;
        if one != 1 || kd != d || vl.shape().dims4()? != (1, kvh, len, d) || len == 0 {
            candle_core::bail!(
                "decode-attention: cache {:?} / {:?} for head size {d}",
                kl.dims(),
                vl.dims()
            );
        }
        if kvh == 0 || heads % kvh != 0 || kv_heads.is_some_and(|h| h != kvh) {
            candle_core::bail!("decode-attention: {heads} heads on {kvh} kv heads");
        }
        kv_heads = Some(kvh);
        for l in [*kl, *vl] {
            let st = l.stride();
            let even = [st[1], st[2], l.start_offset()]
                .iter()
                .all(|s| s.is_multiple_of(2));
            if st[3] != 1 || !even {
                candle_core::bail!("decode-attention: cache strides {st:?} (even, last 1)");
            }
        }
        if len > i32::MAX as usize {
            candle_core::bail!("decode-attention: {len} positions");
        }
        caches.push((&**ks, *kl, &**vs, *vl, len));
    }
    let kv_heads = kv_heads.unwrap_or(1);
    if heads > 65_535 || b > 65_535 {
        candle_core::bail!("decode-attention: {heads} heads x {b} sequences exceed one grid");
    }
    let (meta, syncs) = cache_meta::<T>(dev, &stream, &caches, "decode-attention")?;
    let qs = q.as_cuda_slice::<T>()?.slice(start..end);
    let func =
        dev.get_or_load_custom_func(kernel, "vvlm_decode_attention", DECODE_ATTENTION_PTX)?;
    // SAFETY: the kernel writes all d elements of every (sequence, head) row.
    let out = unsafe { dev.alloc::<T>(b * heads * d)? };
    let (heads_i, kv_heads_i, d_i) = (heads as i32, kv_heads as i32, d as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut bld = func.builder();
    bld.arg(&qs);
    bld.arg(&out);
    bld.arg(&meta);
    bld.arg(&heads_i);
    bld.arg(&kv_heads_i);
    bld.arg(&d_i);
    bld.arg(&scale_log2);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, b as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, T*, const i64*, int, int, int, float),
    // matched above; `meta` addresses each live cache (read-locked in `guards`) of `len` rows at
    // the strides checked above; `out` holds b·heads·d elements.
    unsafe { bld.launch(cfg) }.w()?;
    drop(syncs);
    drop(guards);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// PTX of `kernels/kv_append.cu`.
pub const KV_APPEND_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_append.ptx"));

/// One cache buffer pair a batched append writes into: keys and values `[1, kv_heads, cap, d]`
/// (this device, k's dtype, last stride 1) and the position written.
pub struct AppendSlot<'a> {
    pub k: &'a candle_core::Tensor,
    pub v: &'a candle_core::Tensor,
    pub pos: usize,
}

/// Writes row `i` of `k`/`v` (`[1, kv_heads, B, d]`, contiguous) at position `dst[i].pos` of
/// sequence `i`'s cache buffers, all sequences in one launch (`kernels/kv_append.cu`). The
/// caller owns the buffers exclusively (nothing else reads or writes them during the call) and
/// has made room (`pos` < capacity).
pub fn kv_append(
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    dst: &[AppendSlot<'_>],
) -> Result<()> {
    let (one, kv_heads, b, d) = k.dims4()?;
    if one != 1 || v.dims4()? != (1, kv_heads, b, d) || dst.len() != b || b == 0 {
        candle_core::bail!(
            "kv-append: rows {:?} / {:?} for {} caches",
            k.dims(),
            v.dims(),
            dst.len()
        );
    }
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let kernel = format!("kv_append_{}", dtype_suffix(k.dtype(), "kv-append")?);
    match k.dtype() {
        DType::F32 => launch_kv_append::<f32>(&k, &v, dst, &kernel, (b, kv_heads, d)),
        DType::BF16 => launch_kv_append::<half::bf16>(&k, &v, dst, &kernel, (b, kv_heads, d)),
        _ => launch_kv_append::<half::f16>(&k, &v, dst, &kernel, (b, kv_heads, d)),
    }
}

fn launch_kv_append<T: CudaDType + DeviceRepr>(
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    dst: &[AppendSlot<'_>],
    kernel: &str,
    (b, kv_heads, d): (usize, usize, usize),
) -> Result<()> {
    use candle_core::Storage;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cuda(kc), Storage::Cuda(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("kv-append: rows not on the GPU");
    };
    let dev = kc.device();
    let stream = dev.cuda_stream();
    let guards: Vec<_> = dst
        .iter()
        .map(|s| (s.k.storage_and_layout(), s.v.storage_and_layout(), s.pos))
        .collect();
    let mut caches: Vec<CacheRef> = Vec::with_capacity(b);
    for ((dks, dkl), (dvs, dvl), p) in &guards {
        for layout in [*dkl, *dvl] {
            let (one, h, cap, dd) = layout.shape().dims4()?;
            let st = layout.stride();
            if one != 1 || h != kv_heads || dd != d || *p >= cap || st[3] != 1 {
                candle_core::bail!(
                    "kv-append: cache {:?} (strides {st:?}) for position {p}",
                    layout.dims()
                );
            }
        }
        // The buffers are written through pointers taken under read locks: the caller owns
        // them exclusively (see `kv_append`), as candle's own in-place `slice_set` assumes.
        caches.push((&**dks, *dkl, &**dvs, *dvl, *p));
    }
    let (meta, syncs) = cache_meta::<T>(dev, &stream, &caches, "kv-append")?;
    let kq = kc.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let vq = vc.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_kv_append", KV_APPEND_PTX)?;
    let (b_i, h_i, d_i) = (b as i32, kv_heads as i32, d as i32);
    let mut bld = func.builder();
    bld.arg(&kq);
    bld.arg(&vq);
    bld.arg(&meta);
    bld.arg(&b_i);
    bld.arg(&h_i);
    bld.arg(&d_i);
    // SAFETY: the kernel's signature is (const T*, const T*, const i64*, int, int, int), matched
    // above; the rows hold kv_heads·b·d elements; each destination holds position `pos` (checked
    // below its capacity) at the strides in `meta`.
    unsafe { bld.launch(LaunchConfig::for_num_elems((b * kv_heads * d) as u32)) }.w()?;
    drop(syncs);
    drop(guards);
    Ok(())
}

/// PTX of `kernels/epilogue.cu`.
pub const EPILOGUE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx"));

/// A linear layer's epilogue in one pass (`kernels/epilogue.cu`): `gelu_tanh(y + bias)`, or
/// with `residual`, `residual + (y + bias)`. `y` (and `residual`, same shape) `[.., cols]`,
/// `bias` `[cols]`, all contiguous and of one dtype.
pub fn epilogue(
    (y, ly): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let cols = lb.shape().dims1()?;
    let n = ly.shape().elem_count();
    if ly.dims().last() != Some(&cols) || cols == 0 || cols > i32::MAX as usize {
        candle_core::bail!("epilogue: bias of {cols} for {:?}", ly.dims());
    }
    let offsets = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("epilogue: contiguous inputs".into()))
    };
    let (ys, bs) = (offsets(ly)?, offsets(lb)?);
    let rs = match residual {
        Some((_, lr)) if lr.dims() != ly.dims() => {
            candle_core::bail!("epilogue: residual {:?} for {:?}", lr.dims(), ly.dims())
        }
        Some((_, lr)) => Some(offsets(lr)?),
        None => None,
    };
    let suffix = dtype_suffix(y.dtype(), "epilogue")?;
    let kernel = match residual {
        Some(_) => format!("bias_residual_{suffix}"),
        None => format!("bias_gelu_tanh_{suffix}"),
    };
    let out = match y.dtype() {
        DType::F32 => launch_epilogue::<f32>(
            y,
            ys,
            b,
            bs,
            residual.map(|(r, _)| r).zip(rs),
            &kernel,
            n,
            cols,
        )?,
        DType::BF16 => launch_epilogue::<half::bf16>(
            y,
            ys,
            b,
            bs,
            residual.map(|(r, _)| r).zip(rs),
            &kernel,
            n,
            cols,
        )?,
        _ => launch_epilogue::<half::f16>(
            y,
            ys,
            b,
            bs,
            residual.map(|(r, _)| r).zip(rs),
            &kernel,
            n,
            cols,
        )?,
    };
    Ok((out, ly.shape().clone()))
}

#[allow(clippy::too_many_arguments)]
fn launch_epilogue<T: CudaDType + DeviceRepr>(
    y: &CudaStorage,
    (y0, y1): (usize, usize),
    b: &CudaStorage,
    (b0, b1): (usize, usize),
    residual: Option<(&CudaStorage, (usize, usize))>,
    kernel: &str,
    n: usize,
    cols: usize,
) -> Result<CudaStorage> {
    let dev = y.device();
    let yv = y.as_cuda_slice::<T>()?.slice(y0..y1);
    let bv = b.as_cuda_slice::<T>()?.slice(b0..b1);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_epilogue", EPILOGUE_PTX)?;
    // SAFETY: every element is written by the kernel (a grid-stride loop over all n).
    let out = unsafe { dev.alloc::<T>(n)? };
    let (n_i, cols_i) = (n as i64, cols as i32);
    let mut bld = func.builder();
    bld.arg(&yv);
    bld.arg(&bv);
    let rv;
    if let Some((r, (r0, r1))) = residual {
        rv = r.as_cuda_slice::<T>()?.slice(r0..r1);
        bld.arg(&rv);
    }
    bld.arg(&out);
    bld.arg(&n_i);
    bld.arg(&cols_i);
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 32) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernels' signatures are (const T*, const T*, [const T*,] T*, long long, int),
    // matched above; y (and the residual) hold n elements, the bias cols, out n.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// SwiGLU of a fused gate/up product `[.., 2i]` (`kernels/epilogue.cu`, see
/// [`crate::nn::SwigluDevice`]): `[.., i]`.
pub fn swiglu(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("swiglu expects a contiguous tensor");
    };
    let two_i = l.dims().last().copied().unwrap_or(0);
    if two_i == 0 || !two_i.is_multiple_of(2) || two_i / 2 > i32::MAX as usize {
        candle_core::bail!("swiglu: last dimension {two_i} (even, > 0)");
    }
    let i = two_i / 2;
    let n = (end - start) / 2;
    let kernel = format!("swiglu_{}", dtype_suffix(s.dtype(), "swiglu")?);
    let out = match s.dtype() {
        DType::F32 => launch_swiglu::<f32>(s, (start, end), &kernel, n, i)?,
        DType::BF16 => launch_swiglu::<half::bf16>(s, (start, end), &kernel, n, i)?,
        _ => launch_swiglu::<half::f16>(s, (start, end), &kernel, n, i)?,
    };
    let mut dims = l.dims().to_vec();
    *dims.last_mut().expect("checked above") = i;
    Ok((out, Shape::from(dims)))
}

fn launch_swiglu<T: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    (start, end): (usize, usize),
    kernel: &str,
    n: usize,
    i: usize,
) -> Result<CudaStorage> {
    let dev = s.device();
    let x = s.as_cuda_slice::<T>()?.slice(start..end);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_epilogue", EPILOGUE_PTX)?;
    // SAFETY: every output element is written (a grid-stride loop over all n).
    let out = unsafe { dev.alloc::<T>(n)? };
    let (n_i, i_i) = (n as i64, i as i32);
    let mut bld = func.builder();
    bld.arg(&x);
    bld.arg(&out);
    bld.arg(&n_i);
    bld.arg(&i_i);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, T*, long long, int), matched above; the
    // input holds 2n elements (rows of 2i), the output n.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// PTX of `kernels/rms_norm.cu`.
pub const RMS_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

/// RMSNorm of bf16/f16 rows in one pass (`kernels/rms_norm.cu`, see
/// [`crate::nn::RmsNormLowPrecision`]): `x` `[.., n]` and `w` `[n]`, contiguous, one dtype.
pub fn rms_norm(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let n = lw.shape().dims1()?;
    let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets())
    else {
        candle_core::bail!("rms-norm expects contiguous inputs");
    };
    if lx.dims().last() != Some(&n) || n == 0 || n > i32::MAX as usize {
        candle_core::bail!("rms-norm: weight of {n} for {:?}", lx.dims());
    }
    let rows = (x1 - x0) / n;
    if rows > u32::MAX as usize {
        candle_core::bail!("rms-norm: {rows} rows exceed one grid");
    }
    let kernel = format!("rms_norm_{}", dtype_suffix(x.dtype(), "rms-norm")?);
    let out = match x.dtype() {
        DType::BF16 => {
            launch_rms_norm::<half::bf16>(x, (x0, x1), w, (w0, w1), &kernel, (rows, n), eps)?
        }
        DType::F16 => {
            launch_rms_norm::<half::f16>(x, (x0, x1), w, (w0, w1), &kernel, (rows, n), eps)?
        }
        dt => candle_core::bail!("rms-norm: {dt:?} (bf16 or f16; f32 has candle's kernel)"),
    };
    Ok((out, lx.shape().clone()))
}

fn launch_rms_norm<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    (x0, x1): (usize, usize),
    w: &CudaStorage,
    (w0, w1): (usize, usize),
    kernel: &str,
    (rows, n): (usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let xv = x.as_cuda_slice::<T>()?.slice(x0..x1);
    let wv = w.as_cuda_slice::<T>()?.slice(w0..w1);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_rms_norm", RMS_NORM_PTX)?;
    // SAFETY: every element of every row is written.
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let n_i = n as i32;
    let mut bld = func.builder();
    bld.arg(&xv);
    bld.arg(&wv);
    bld.arg(&out);
    bld.arg(&n_i);
    bld.arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, const T*, T*, int, float), matched above; x
    // and out hold rows·n elements, w n; one block (a multiple of 32 threads) per row.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// PTX of `kernels/split_rope.cu`.
pub const SPLIT_ROPE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/split_rope.ptx"));

/// The fused q/k/v rows split per head with RoPE on q and k (`kernels/split_rope.cu`, see
/// [`crate::llama::SplitRope`]): `x` `[b, len, heads·d]`, `cos`/`sin` `[len, d/2]`, contiguous,
/// one dtype (shapes checked by the op). Returns `[b, heads, len, d]`'s storage.
pub fn split_rope(
    (x, lx): (&CudaStorage, &Layout),
    (c, lc): (&CudaStorage, &Layout),
    (s, ls): (&CudaStorage, &Layout),
    (b, len, rotated, heads, d): (usize, usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let offsets = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("split-rope: contiguous inputs".into()))
    };
    let (xo, co, so) = (offsets(lx)?, offsets(lc)?, offsets(ls)?);
    let total = b * len * heads * d;
    if [b, len, heads, d].iter().any(|&v| v > i32::MAX as usize) {
        candle_core::bail!("split-rope: {b} x {len} x {heads} x {d} too large");
    }
    let kernel = format!("split_rope_{}", dtype_suffix(x.dtype(), "split-rope")?);
    let dims = [b, len, rotated, heads, d].map(|v| v as i32);
    match x.dtype() {
        DType::F32 => launch_split_rope::<f32>(x, xo, c, co, s, so, &kernel, dims, total),
        DType::BF16 => launch_split_rope::<half::bf16>(x, xo, c, co, s, so, &kernel, dims, total),
        _ => launch_split_rope::<half::f16>(x, xo, c, co, s, so, &kernel, dims, total),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_split_rope<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    (x0, x1): (usize, usize),
    c: &CudaStorage,
    (c0, c1): (usize, usize),
    s: &CudaStorage,
    (s0, s1): (usize, usize),
    kernel: &str,
    [b, len, rotated, heads, d]: [i32; 5],
    total: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let xv = x.as_cuda_slice::<T>()?.slice(x0..x1);
    let cv = c.as_cuda_slice::<T>()?.slice(c0..c1);
    let sv = s.as_cuda_slice::<T>()?.slice(s0..s1);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_split_rope", SPLIT_ROPE_PTX)?;
    // SAFETY: every element of every head's row is written (a pair per thread, all pairs).
    let out = unsafe { dev.alloc::<T>(total)? };
    let mut bld = func.builder();
    bld.arg(&xv);
    bld.arg(&cv);
    bld.arg(&sv);
    bld.arg(&out);
    for v in [&b, &len, &rotated, &heads, &d] {
        bld.arg(v);
    }
    let pairs = total / 2;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(256).clamp(1, 65_535 * 32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, const T*, const T*, T*, int x5), matched
    // above; x and out hold b·len·heads·d elements, cos and sin len·d/2 (checked by the op).
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Softmax of `scale · x` over the last dimension with the causal mask inside (see
/// [`crate::attention::ScaledSoftmax`], its CPU reference), f32/bf16/f16, one block per row.
pub fn scaled_softmax(
    s: &CudaStorage,
    l: &Layout,
    scale: f32,
    causal: Option<(usize, usize)>,
) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("scaled-softmax expects a contiguous tensor");
    };
    let kv = l.dims().last().copied().unwrap_or(0);
    if kv == 0 || kv > i32::MAX as usize {
        candle_core::bail!("scaled-softmax: bad row length {kv}");
    }
    let rows = (end - start) / kv;
    if rows > i32::MAX as usize {
        candle_core::bail!("scaled-softmax: {rows} rows exceed one grid");
    }
    let (q_len, past, on) = match causal {
        Some((q, p)) => (q.max(1), p, 1),
        None => (1, 0, 0),
    };
    let args = SoftmaxArgs {
        start,
        end,
        rows,
        kv,
        q_len,
        past,
        causal: on,
        scale,
    };
    let out = match s.dtype() {
        DType::F32 => launch_softmax::<f32>(s, "scaled_softmax_f32", args)?,
        DType::BF16 => launch_softmax::<half::bf16>(s, "scaled_softmax_bf16", args)?,
        DType::F16 => launch_softmax::<half::f16>(s, "scaled_softmax_f16", args)?,
        dt => candle_core::bail!("scaled-softmax: unsupported dtype {dt:?}"),
    };
    Ok((out, l.shape().clone()))
}

#[derive(Clone, Copy)]
struct SoftmaxArgs {
    start: usize,
    end: usize,
    rows: usize,
    kv: usize,
    q_len: usize,
    past: usize,
    causal: i32,
    scale: f32,
}

fn launch_softmax<T: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    kernel: &str,
    a: SoftmaxArgs,
) -> Result<CudaStorage> {
    let dev = s.device();
    let x = s.as_cuda_slice::<T>()?.slice(a.start..a.end);
    let func = dev.get_or_load_custom_func(kernel, "vvlm_scaled_softmax", SCALED_SOFTMAX_PTX)?;
    // SAFETY: the kernel writes every element of every row (0 where a key is hidden).
    let out = unsafe { dev.alloc::<T>(a.rows * a.kv)? };
    let (kv, q_len, past) = (a.kv as i32, a.q_len as i32, a.past as i32);
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&out);
    b.arg(&kv);
    b.arg(&q_len);
    b.arg(&past);
    b.arg(&a.causal);
    b.arg(&a.scale);
    // Threads: the row length rounded up to a warp, at most 256 (they stride over longer rows).
    let threads = a.kv.div_ceil(32).clamp(1, 8) as u32 * 32;
    let cfg = LaunchConfig {
        grid_dim: (a.rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel's signature is (const T*, T*, int, int, int, int, float); `x` holds
    // rows * kv inputs, `out` as many outputs; one block per row.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `[frames, g*g, D]` -> `[frames, s*s, D]` on the GPU (f32, bf16, f16).
pub fn bilinear_pool(
    s: &CudaStorage,
    l: &Layout,
    grid: usize,
    side: usize,
) -> Result<(CudaStorage, Shape)> {
    let (frames, n, dim) = l.shape().dims3()?;
    if n != grid * grid {
        candle_core::bail!(
            "bilinear-pool expects {} tokens per frame, got {n}",
            grid * grid
        );
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("bilinear-pool expects a contiguous tensor");
    };
    let shape = Shape::from((frames, side * side, dim));
    let args = (frames, grid, side, dim, start, end);
    let out = match s.dtype() {
        DType::F32 => launch::<f32>(s, "bilinear_pool_f32", args)?,
        DType::BF16 => launch::<half::bf16>(s, "bilinear_pool_bf16", args)?,
        DType::F16 => launch::<half::f16>(s, "bilinear_pool_f16", args)?,
        dt => candle_core::bail!("bilinear-pool: unsupported dtype {dt:?}"),
    };
    Ok((out, shape))
}

fn launch<T: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    kernel: &str,
    (frames, grid, side, dim, start, end): (usize, usize, usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = s.device();
    let x = s.as_cuda_slice::<T>()?.slice(start..end);
    let total = frames * side * side * dim;
    let func = dev.get_or_load_custom_func(kernel, "vvlm_bilinear_pool", BILINEAR_POOL_PTX)?;
    // SAFETY: every element of `out` is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<T>(total)? };
    let (f, g, sd, d) = (frames as i32, grid as i32, side as i32, dim as i32);
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&out);
    b.arg(&f);
    b.arg(&g);
    b.arg(&sd);
    b.arg(&d);
    // SAFETY: the kernel's signature is (const T*, T*, int, int, int, int) and the buffers hold
    // frames*g*g*dim inputs and `total` outputs.
    unsafe { b.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
