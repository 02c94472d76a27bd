//! The engine's own CUDA kernels (sources in `kernels/`, compiled to PTX by `build.rs` when the
//! `cuda` feature is on), loaded through candle's CUDA device (cudarc) and launched from the
//! custom ops' `cuda_fwd`. Each kernel's CPU reference is the same op's `cpu_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

/// PTX of `kernels/bilinear_pool.cu`.
pub const BILINEAR_POOL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bilinear_pool.ptx"));

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
