//! The engine's own CUDA kernels (sources in `kernels/`, compiled to PTX by `build.rs` when the
//! `cuda` feature is on), loaded through candle's CUDA device (cudarc) and launched from the
//! custom ops' `cuda_fwd`. Each kernel's CPU reference is the same op's `cpu_fwd`:
//! `bilinear_pool.cu` / `pool::BilinearPool`, `scaled_softmax.cu` / `attention::ScaledSoftmax`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

/// PTX of `kernels/bilinear_pool.cu`.
pub const BILINEAR_POOL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bilinear_pool.ptx"));

/// PTX of `kernels/scaled_softmax.cu`.
pub const SCALED_SOFTMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/scaled_softmax.ptx"));

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
