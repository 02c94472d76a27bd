//! Quantized weight matrices for decode on the CPU: the GGUF file's own Q4_1 and Q8_0 blocks,
//! multiplied with f32 activations without dequantizing the matrix. Decode reads every weight
//! once per token, so reading 4.5-8.5 bits instead of 32 is what bounds its speed.
//!
//! The weights are exactly the file's (`d·q + m` for Q4_1, `d·q` for Q8_0), the same values the
//! f32 path dequantizes, so results differ from it only by summation order. Scales are stored
//! as f32 beside the packed quants (converted once at load). Prefill keeps the f32 matrices.

use crate::EngineError;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, Layout, Result, Shape};
use half::f16;
use std::sync::Arc;

const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 32 weights = f16 scale d, f16 min m, 32 4-bit q: `w = d·q + m`.
    Q4_1,
    /// 32 weights = f16 scale d, 32 int8 q: `w = d·q`.
    Q8_0,
}

/// A `[rows, cols]` matrix of quantized rows (`cols` a multiple of 32).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Packed quants, row-major: 16 bytes a block (Q4_1: low nibbles are weights 0..16, high
    /// nibbles 16..32) or 32 (Q8_0).
    qs: Vec<u8>,
    /// Per block: d (and m for Q4_1), row-major.
    d: Vec<f32>,
    m: Vec<f32>,
}

impl QuantMatrix {
    /// From a GGUF tensor of type Q4_1 or Q8_0 (`None` for any other type).
    pub fn from_qtensor(q: &QTensor) -> std::result::Result<Option<Self>, EngineError> {
        let format = match q.dtype() {
            GgmlDType::Q4_1 => QuantFormat::Q4_1,
            GgmlDType::Q8_0 => QuantFormat::Q8_0,
            _ => return Ok(None),
        };
        let (rows, cols) = q.shape().dims2()?;
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let raw = q.data()?;
        let nb = rows * cols / BLOCK;
        let (bytes, qbytes) = match format {
            QuantFormat::Q4_1 => (20, 16),
            QuantFormat::Q8_0 => (34, 32),
        };
        if raw.len() != nb * bytes {
            return Err(EngineError::Checkpoint(format!(
                "quantized tensor has {} bytes, expected {}",
                raw.len(),
                nb * bytes
            )));
        }
        let mut qs = Vec::with_capacity(nb * qbytes);
        let mut d = Vec::with_capacity(nb);
        let mut m = Vec::with_capacity(if format == QuantFormat::Q4_1 { nb } else { 0 });
        let f = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        for blk in raw.chunks_exact(bytes) {
            d.push(f(&blk[0..2]));
            match format {
                QuantFormat::Q4_1 => {
                    m.push(f(&blk[2..4]));
                    qs.extend_from_slice(&blk[4..20]);
                }
                QuantFormat::Q8_0 => qs.extend_from_slice(&blk[2..34]),
            }
        }
        Ok(Some(Self {
            format,
            rows,
            cols,
            qs,
            d,
            m,
        }))
    }

    fn qbytes(&self) -> usize {
        match self.format {
            QuantFormat::Q4_1 => 16,
            QuantFormat::Q8_0 => 32,
        }
    }

    /// Rows reordered: row `i` of the result is row `perm[i]` of `self`.
    pub fn permute_rows(&self, perm: &[usize]) -> Self {
        let nb = self.cols / BLOCK;
        let qb = self.qbytes() * nb;
        let mut out = Self {
            qs: Vec::with_capacity(self.qs.len()),
            d: Vec::with_capacity(self.d.len()),
            m: Vec::with_capacity(self.m.len()),
            ..*self
        };
        for &r in perm {
            out.qs.extend_from_slice(&self.qs[r * qb..(r + 1) * qb]);
            out.d.extend_from_slice(&self.d[r * nb..(r + 1) * nb]);
            if self.format == QuantFormat::Q4_1 {
                out.m.extend_from_slice(&self.m[r * nb..(r + 1) * nb]);
            }
        }
        out
    }

    /// The parts' rows one after another (same format and width), as [`crate::nn::Linear::concat`].
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
        {
            return None;
        }
        let mut out = Self {
            format: first.format,
            rows: 0,
            cols: first.cols,
            qs: vec![],
            d: vec![],
            m: vec![],
        };
        for p in parts {
            out.rows += p.rows;
            out.qs.extend_from_slice(&p.qs);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Some(out)
    }

    /// The weights as f32 `[rows * cols]` (for tests and checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for (b, out) in w.chunks_exact_mut(BLOCK).enumerate() {
            let q = &self.qs[b * self.qbytes()..(b + 1) * self.qbytes()];
            let d = self.d[b];
            match self.format {
                QuantFormat::Q4_1 => {
                    let m = self.m[b];
                    for i in 0..16 {
                        out[i] = d * (q[i] & 15) as f32 + m;
                        out[i + 16] = d * (q[i] >> 4) as f32 + m;
                    }
                }
                QuantFormat::Q8_0 => {
                    for i in 0..32 {
                        out[i] = d * (q[i] as i8) as f32;
                    }
                }
            }
        }
        w
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, parallel over rows of W.
    pub fn gemv(&self, x: &[f32], y: &mut [f32], m: usize) {
        let (n, k, nb) = (self.rows, self.cols, self.cols / BLOCK);
        // Per-block sums of x (Q4_1's `m · Σx` term), once per input row.
        let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        let qb = nb * self.qbytes();
        let row = |o: usize| RowRef {
            qs: &self.qs[o * qb..(o + 1) * qb],
            d: &self.d[o * nb..(o + 1) * nb],
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[o * nb..(o + 1) * nb]
            },
        };
        if m > 1 && m <= crate::gemv::MAX_BATCH_ROWS {
            // Several rows (a decode batch): each weight block is unpacked once and used for
            // every row, with each row's arithmetic exactly that of the one-row kernel.
            let rows = rows_kernel(self.format);
            crate::gemv::for_each_output_rows(y, m, n, m * 33, |o, ys, scratch| {
                rows(&row(o), x, &xsum, k, ys, scratch)
            });
            return;
        }
        let dot = row_dot_kernel(self.format);
        crate::gemv::for_each_output(y, m, n, |o, r| {
            dot(&row(o), &x[r * k..(r + 1) * k], &xsum[r * nb..(r + 1) * nb])
        });
    }
}

/// (row, x, xsum, k, y, scratch of m·33 values).
type RowsDot = fn(&RowRef, &[f32], &[f32], usize, &mut [f32], &mut [f32]);

fn rows_kernel(format: QuantFormat) -> RowsDot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return match format {
                // SAFETY (both): the features were detected above.
                QuantFormat::Q4_1 => |r, x, s, k, y, t| unsafe { q4_1_rows_avx2(r, x, s, k, y, t) },
                QuantFormat::Q8_0 => |r, x, s, k, y, t| unsafe { q8_0_rows_avx2(r, x, s, k, y, t) },
            };
        }
    }
    match format {
        QuantFormat::Q4_1 => q4_1_rows::<false>,
        QuantFormat::Q8_0 => q8_0_rows::<false>,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_rows_avx2(
    r: &RowRef,
    x: &[f32],
    xsum: &[f32],
    k: usize,
    y: &mut [f32],
    t: &mut [f32],
) {
    q4_1_rows::<true>(r, x, xsum, k, y, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_rows_avx2(
    r: &RowRef,
    x: &[f32],
    xsum: &[f32],
    k: usize,
    y: &mut [f32],
    t: &mut [f32],
) {
    q8_0_rows::<true>(r, x, xsum, k, y, t)
}

/// [`q4_1_row`] for `y.len()` rows of `x` (`k` columns each) at once: the block's nibbles are
/// unpacked once; each row's accumulation is the one-row kernel's, operation for operation.
#[inline(always)]
fn q4_1_rows<const FMA: bool>(
    r: &RowRef,
    x: &[f32],
    xsum: &[f32],
    k: usize,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let m = y.len();
    let nb = k / BLOCK;
    let (acc, rest) = scratch.split_at_mut(16 * m);
    let mins = &mut rest[..m];
    acc.fill(0.0);
    mins.fill(0.0);
    for (b, (q, &d)) in r.qs.chunks_exact(16).zip(r.d).enumerate() {
        let mut hi = [0f32; 16];
        let mut lo = [0f32; 16];
        for i in 0..16 {
            hi[i] = (q[i] >> 4) as f32;
            lo[i] = (q[i] & 15) as f32;
        }
        let mb = r.m[b];
        for (row, a) in acc.chunks_exact_mut(16).enumerate() {
            // Fixed-size views: no bounds checks in the lane loop, so it vectorises.
            let xs: &[f32; BLOCK] = x[row * k + b * BLOCK..row * k + (b + 1) * BLOCK]
                .try_into()
                .expect("a block");
            let a: &mut [f32; 16] = a.try_into().expect("16 lanes");
            for i in 0..16 {
                let p = fmadd::<FMA>(hi[i], xs[16 + i], lo[i] * xs[i]);
                a[i] = fmadd::<FMA>(d, p, a[i]);
            }
            mins[row] = fmadd::<FMA>(mb, xsum[row * nb + b], mins[row]);
        }
    }
    for row in 0..m {
        y[row] = acc[row * 16..(row + 1) * 16].iter().sum::<f32>() + mins[row];
    }
}

/// [`q8_0_row`] for several rows at once (see [`q4_1_rows`]).
#[inline(always)]
fn q8_0_rows<const FMA: bool>(
    r: &RowRef,
    x: &[f32],
    _xsum: &[f32],
    k: usize,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let m = y.len();
    let acc = &mut scratch[..32 * m];
    acc.fill(0.0);
    for (b, (q, &d)) in r.qs.chunks_exact(32).zip(r.d).enumerate() {
        let mut qf = [0f32; 32];
        for i in 0..32 {
            qf[i] = (q[i] as i8) as f32;
        }
        for (row, a) in acc.chunks_exact_mut(32).enumerate() {
            let xs: &[f32; BLOCK] = x[row * k + b * BLOCK..row * k + (b + 1) * BLOCK]
                .try_into()
                .expect("a block");
            let a: &mut [f32; 32] = a.try_into().expect("32 lanes");
            for i in 0..32 {
                a[i] = fmadd::<FMA>(d, qf[i] * xs[i], a[i]);
            }
        }
    }
    for row in 0..m {
        y[row] = acc[row * 32..(row + 1) * 32].iter().sum();
    }
}

struct RowRef<'a> {
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

type RowDot = fn(&RowRef, &[f32], &[f32]) -> f32;

fn row_dot_kernel(format: QuantFormat) -> RowDot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return match format {
                // SAFETY (both): the features were detected above.
                QuantFormat::Q4_1 => |r, x, s| unsafe { q4_1_avx2(r, x, s) },
                QuantFormat::Q8_0 => |r, x, s| unsafe { q8_0_avx2(r, x, s) },
            };
        }
    }
    match format {
        QuantFormat::Q4_1 => q4_1_row::<false>,
        QuantFormat::Q8_0 => q8_0_row::<false>,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_avx2(r: &RowRef, x: &[f32], xsum: &[f32]) -> f32 {
    q4_1_row::<true>(r, x, xsum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_avx2(r: &RowRef, x: &[f32], xsum: &[f32]) -> f32 {
    q8_0_row::<true>(r, x, xsum)
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Σ_b d_b·(q·x)_b + m_b·Σx_b, with 16 lane accumulators (vectorised by the compiler).
#[inline(always)]
fn q4_1_row<const FMA: bool>(r: &RowRef, x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut mins = 0f32;
    for (b, ((q, &d), xs)) in
        r.qs.chunks_exact(16)
            .zip(r.d)
            .zip(x.chunks_exact(BLOCK))
            .enumerate()
    {
        let (lo, hi) = xs.split_at(16);
        for i in 0..16 {
            let p = fmadd::<FMA>((q[i] >> 4) as f32, hi[i], (q[i] & 15) as f32 * lo[i]);
            acc[i] = fmadd::<FMA>(d, p, acc[i]);
        }
        mins = fmadd::<FMA>(r.m[b], xsum[b], mins);
    }
    acc.iter().sum::<f32>() + mins
}

#[inline(always)]
fn q8_0_row<const FMA: bool>(r: &RowRef, x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for ((q, &d), xs) in r.qs.chunks_exact(32).zip(r.d).zip(x.chunks_exact(BLOCK)) {
        for i in 0..32 {
            acc[i] = fmadd::<FMA>(d, (q[i] as i8) as f32 * xs[i], acc[i]);
        }
    }
    acc.iter().sum()
}

/// `x [m, cols] · Wᵀ` for a quantized `W` as a candle op on `x` (CPU, f32, contiguous).
pub struct QuantGemv(pub Arc<QuantMatrix>);

impl candle_core::CustomOp1 for QuantGemv {
    fn name(&self) -> &'static str {
        "quant-gemv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("quant-gemv expects f32 activations");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("quant-gemv expects contiguous activations");
        };
        let (m, k) = l.shape().dims2()?;
        if k != self.0.cols {
            candle_core::bail!("quant-gemv: x has {k} columns, W has {}", self.0.cols);
        }
        let mut y = vec![0f32; m * self.0.rows];
        self.0.gemv(&x[a..b], &mut y, m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.rows))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn several_rows_equal_each_row_alone_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (70, 256), &dev).unwrap();
            let qm = QuantMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let m = 7;
            let x: Vec<f32> = (0..m * 256)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let mut all = vec![0f32; m * 70];
            qm.gemv(&x, &mut all, m);
            for r in 0..m {
                let mut one = vec![0f32; 70];
                qm.gemv(&x[r * 256..(r + 1) * 256], &mut one, 1);
                assert_eq!(&all[r * 70..(r + 1) * 70], &one[..], "{dtype:?} row {r}");
            }
        }
    }

    fn check(dtype: GgmlDType, format: QuantFormat) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 256), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        assert_eq!(qm.format, format);
        // Our unpacking equals candle's dequantization of the same blocks.
        let deq = q.dequantize(&dev).unwrap();
        let ours = Tensor::from_vec(qm.dequantize(), (70, 256), &dev).unwrap();
        assert!(crate::nn::max_abs_diff(&ours, &deq).unwrap() < 1e-6);
        // The product equals x · dequantized(W)ᵀ.
        for m in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (m, 256), &dev).unwrap();
            let got = x
                .apply_op1_no_bwd(&QuantGemv(Arc::new(qm.clone())))
                .unwrap();
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            let e = crate::nn::max_abs_diff(&got, &want).unwrap();
            assert!(e < 1e-3, "{format:?} m={m}: {e}");
        }
        // Row permutation and concatenation move whole rows.
        let perm: Vec<usize> = (0..70).rev().collect();
        let p = qm.permute_rows(&perm);
        let pd = p.dequantize();
        let d = qm.dequantize();
        assert_eq!(&pd[..256], &d[69 * 256..]);
        let c = QuantMatrix::concat_rows(&[&qm, &p]).unwrap();
        assert_eq!(c.rows, 140);
        assert_eq!(&c.dequantize()[70 * 256..], &pd[..]);
    }

    #[test]
    fn q4_1_rows_match_candles_dequantization() {
        check(GgmlDType::Q4_1, QuantFormat::Q4_1);
    }

    #[test]
    fn q8_0_rows_match_candles_dequantization() {
        check(GgmlDType::Q8_0, QuantFormat::Q8_0);
    }

    #[test]
    fn other_formats_are_not_taken() {
        let w = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::F32).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).unwrap().is_none());
    }
}
