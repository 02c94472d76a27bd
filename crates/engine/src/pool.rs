//! Bilinear resizing of each frame's `g x g` token grid to `s x s`, numerically equal to
//! `torch.nn.functional.interpolate(size=(s, s), mode="bilinear", align_corners=False)` with no
//! antialiasing (LLaVA-NeXT's `get_2dPool`, transformers' `apply_pooling`).
//!
//! Per output index: `src = max((dst + 0.5) * in / out - 0.5, 0)`, `i0 = floor(src)`,
//! `i1 = min(i0 + 1, in - 1)`, `lambda = src - i0`. The resize is separable, so it is applied as
//! one `[s*s, g*g]` interpolation matrix (at most 4 non-zeros a row) per frame. It is a resize, not
//! a model layer: its FLOPs are not counted.

use candle_core::{Device, Result, Tensor};

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
    let (f, n, _d) = features.dims3()?;
    if n != grid * grid {
        candle_core::bail!("pooling expects {} tokens per frame, got {n}", grid * grid);
    }
    if side == 0 || side > grid {
        candle_core::bail!("pooled side must be in 1..={grid}, got {side}");
    }
    if side == grid {
        return Ok(features.clone());
    }
    let m = matrix(grid, side, features.device())?.to_dtype(features.dtype())?;
    m.unsqueeze(0)?
        .broadcast_as((f, side * side, n))?
        .contiguous()?
        .matmul(&features.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
