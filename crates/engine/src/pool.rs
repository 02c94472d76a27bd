//! Bilinear resizing of each frame's `g x g` token grid to `s x s`, numerically equal to
//! `torch.nn.functional.interpolate(size=(s, s), mode="bilinear", align_corners=False)` with no
//! antialiasing (LLaVA-NeXT's `get_2dPool`, transformers' `apply_pooling`).
//!
//! Per output index: `src = max((dst + 0.5) * in / out - 0.5, 0)`, `i0 = floor(src)`,
//! `i1 = min(i0 + 1, in - 1)`, `lambda = src - i0`. [`pool`] reads the four neighbours of each
//! output token directly ([`BilinearPool`]: a CPU implementation here, and on CUDA the kernel in
//! `kernels/bilinear_pool.cu` with the same arithmetic, which the CPU one is the reference for).
//! [`matrix`] is the same resize as a `[s*s, g*g]` matrix, kept as an independent check.
//! It is a resize, not a model layer: its FLOPs are not counted.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

/// 1-D interpolation weights `[out, in]` as torch computes them (f32 arithmetic).
pub fn weights_1d(input: usize, output: usize) -> Vec<f32> {
    let mut w = vec![0f32; output * input];
    let scale = input as f32 / output as f32;
    for o in 0..output {
        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        w[o * input + i0] += l0;
        w[o * input + i1] += l1;
    }
    w
}

/// The 2-D interpolation matrix `[s*s, g*g]` (row-major flattening on both sides).
pub fn matrix(grid: usize, side: usize, device: &Device) -> Result<Tensor> {
    let w = weights_1d(grid, side);
    let mut m = vec![0f32; side * side * grid * grid];
    for oy in 0..side {
        for ox in 0..side {
            let row = (oy * side + ox) * grid * grid;
            for iy in 0..grid {
                let wy = w[oy * grid + iy];
                if wy == 0.0 {
                    continue;
                }
                for ix in 0..grid {
                    let wx = w[ox * grid + ix];
                    if wx != 0.0 {
                        m[row + iy * grid + ix] = wy * wx;
                    }
                }
            }
        }
    }
    Tensor::from_vec(m, (side * side, grid * grid), device)
}

/// `[frames, g*g, D]` -> `[frames, s*s, D]`.
pub fn pool(features: &Tensor, grid: usize, side: usize) -> Result<Tensor> {
    let (_f, n, _d) = features.dims3()?;
    if n != grid * grid {
        candle_core::bail!("pooling expects {} tokens per frame, got {n}", grid * grid);
    }
    if side == 0 || side > grid {
        candle_core::bail!("pooled side must be in 1..={grid}, got {side}");
    }
    if side == grid {
        return Ok(features.clone());
    }
    let op = BilinearPool { grid, side };
    let x = features.contiguous()?;
    if x.device().is_cpu() && x.dtype() != DType::F32 {
        return x
            .to_dtype(DType::F32)?
            .apply_op1_no_bwd(&op)?
            .to_dtype(x.dtype());
    }
    x.apply_op1_no_bwd(&op)
}

/// The same resize through the interpolation matrix (a batched matmul; any device/dtype).
pub fn pool_by_matrix(features: &Tensor, grid: usize, side: usize) -> Result<Tensor> {
    let (f, n, _d) = features.dims3()?;
    let m = matrix(grid, side, features.device())?.to_dtype(features.dtype())?;
    m.unsqueeze(0)?
        .broadcast_as((f, side * side, n))?
        .contiguous()?
        .matmul(&features.contiguous()?)
}

/// Source indices and weight of one output index (torch's rule, f32 arithmetic).
#[inline]
fn source_index(dst: usize, input: usize, output: usize) -> (usize, usize, f32) {
    let scale = input as f32 / output as f32;
    let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(input - 1);
    let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f32)
}

/// Bilinear `g x g -> s x s` per frame on `[frames, g*g, D]`, fused with the flatten.
/// The CPU implementation is the reference for the CUDA kernel: same formula, same order.
pub struct BilinearPool {
    pub grid: usize,
    pub side: usize,
}

impl candle_core::CustomOp1 for BilinearPool {
    fn name(&self) -> &'static str {
        "bilinear-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("bilinear-pool on the CPU expects f32");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("bilinear-pool expects a contiguous tensor");
        };
        let (frames, n, dim) = l.shape().dims3()?;
        let (g, side) = (self.grid, self.side);
        if n != g * g {
            candle_core::bail!("bilinear-pool expects {} tokens per frame, got {n}", g * g);
        }
        let x = &x[a..b];
        let taps: Vec<(usize, usize, f32)> = (0..side).map(|o| source_index(o, g, side)).collect();
        let mut y = vec![0f32; frames * side * side * dim];
        if dim > 0 {
            y.par_chunks_mut(dim).enumerate().for_each(|(row, out)| {
                let (t, o) = (row / (side * side), row % (side * side));
                let ((y0, y1, ly1), (x0, x1, lx1)) = (taps[o / side], taps[o % side]);
                let (ly0, lx0) = (1.0 - ly1, 1.0 - lx1);
                let f = &x[t * g * g * dim..(t + 1) * g * g * dim];
                let at = |yy: usize, xx: usize| &f[(yy * g + xx) * dim..(yy * g + xx + 1) * dim];
                let (pa, pb, pc, pe) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
                for i in 0..dim {
                    out[i] = ly0 * (lx0 * pa[i] + lx1 * pb[i]) + ly1 * (lx0 * pc[i] + lx1 * pe[i]);
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((frames, side * side, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::bilinear_pool(s, l, self.grid, self.side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_taps_equal_the_interpolation_matrix_for_every_side() {
        let g = 27;
        let x = Tensor::randn(0f32, 1.0, (2, g * g, 40), &Device::Cpu).unwrap();
        for side in 1..g {
            let a = pool(&x, g, side).unwrap();
            let b = pool_by_matrix(&x, g, side).unwrap();
            assert_eq!(a.dims(), &[2, side * side, 40]);
            let err = crate::nn::max_abs_diff(&a, &b).unwrap();
            assert!(err < 2e-6, "side {side}: {err}");
        }
        // Other dtypes go through f32 on the CPU.
        let h = pool(&x.to_dtype(DType::BF16).unwrap(), g, 14).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
    }

    #[test]
    fn weights_match_torch_hand_computed() {
        // in 7 -> out 4: scale 1.75; dst 0: src 0.375 -> (0: .625, 1: .375)
        // dst 3: src 5.625 -> (5: .375, 6: .625)
        let w = weights_1d(7, 4);
        assert!((w[0] - 0.625).abs() < 1e-7 && (w[1] - 0.375).abs() < 1e-7);
        assert!((w[3 * 7 + 5] - 0.375).abs() < 1e-7 && (w[3 * 7 + 6] - 0.625).abs() < 1e-7);
        // in 27 -> out 1: src = 13 exactly -> a single weight on the centre.
        let w = weights_1d(27, 1);
        assert_eq!(w[13], 1.0);
        assert_eq!(w.iter().sum::<f32>(), 1.0);
        // Upper edge clamps: in 3 -> out 2: dst 1 -> src 1.75 -> (1: .25, 2: .75)
        let w = weights_1d(3, 2);
        assert!((w[3 + 1] - 0.25).abs() < 1e-7 && (w[3 + 2] - 0.75).abs() < 1e-7);
        // Lower edge clamps at 0: in 2 -> out 3, dst 0: src = max(0.5*2/3 - 0.5, 0) = 0
        let w = weights_1d(2, 3);
        assert_eq!(w[0], 1.0);
    }

    #[test]
    fn every_row_sums_to_one_for_every_side() {
        for s in 1..=27 {
            let w = weights_1d(27, s);
            for o in 0..s {
                let sum: f32 = w[o * 27..(o + 1) * 27].iter().sum();
                assert!((sum - 1.0).abs() < 1e-6, "s={s} row {o}");
            }
        }
    }

    #[test]
    fn pooling_a_linear_ramp_gives_the_ramp_at_source_coordinates() {
        let g = 27;
        let data: Vec<f32> = (0..g * g).map(|i| (i % g) as f32).collect();
        let t = Tensor::from_vec(data, (1, g * g, 1), &Device::Cpu).unwrap();
        let p = pool(&t, g, 14)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (ox, got) in p.iter().take(14).enumerate() {
            let src = ((ox as f32 + 0.5) * 27.0 / 14.0 - 0.5).max(0.0);
            assert!((got - src).abs() < 1e-4, "{ox}: {got} vs {src}");
        }
        assert!(pool(&t, g, 28).is_err());
        assert!(pool(&t, g, 0).is_err());
    }
}
