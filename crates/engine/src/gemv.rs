//! Matrix-vector products for decode-shaped linear layers on the CPU: `y[m, out] = x[m, in] ·
//! Wᵀ` with `W` in the checkpoint's `[out, in]` layout and `m` a handful of rows. Each output
//! is a dot product of two contiguous rows, so the weights stream through memory once, split
//! across threads by output rows, with AVX2+FMA when the CPU has them.
//!
//! A general gemm pays for packing and blocking that a single row cannot amortise; at decode
//! these products are memory-bound and this is what reads the weights at the memory's speed.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

/// Rows of `x` up to which [`Gemv`] is used instead of the general matmul.
pub const MAX_ROWS: usize = 4;

/// Rows up to which a batched decode step uses [`Gemv`]: its outputs are then bit-identical to
/// each sequence's own decode (the same dot product per output), and each weight row is read
/// once for all rows.
pub const MAX_BATCH_ROWS: usize = 64;

/// `x [m, in] · w[out, in]ᵀ` as a candle op on `(x, w)`.
pub struct Gemv;

impl candle_core::CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv-f32"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (sx, sw) else {
            candle_core::bail!("gemv expects f32");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets())
        else {
            candle_core::bail!("gemv expects contiguous inputs");
        };
        let (m, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("gemv: x [{m}, {k}] and w [{n}, {k2}] disagree");
        }
        let mut y = vec![0f32; m * n];
        gemv(&x[x0..x1], &w[w0..w1], &mut y, m, k, n);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, parallel over output columns.
pub fn gemv(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if m == 1 && wide_dots() {
        // Eight weight rows at a time: eight streams from memory in flight per thread (one
        // row at a time read the Llama-1B shape's weights at ~0.7x the speed on an AVX-512
        // Xeon), and each activation vector loaded once for the eight.
        const ROWS: usize = 8;
        let chunk = (n / (rayon::current_num_threads() * 8)).clamp(16, 1024) / ROWS * ROWS;
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            let o0 = c * chunk;
            let mut j = 0;
            while j + ROWS <= out.len() {
                let o = o0 + j;
                // SAFETY: `wide_dots` checked the features.
                let v = unsafe { dot_rows_avx512::<ROWS>(&w[o * k..(o + ROWS) * k], x, k) };
                out[j..j + ROWS].copy_from_slice(&v);
                j += ROWS;
            }
            for (jj, yv) in out.iter_mut().enumerate().skip(j) {
                let o = o0 + jj;
                // SAFETY: as above.
                *yv = unsafe { dot_avx512(&w[o * k..(o + 1) * k], x) };
            }
        });
        return;
    }
    let dot = dot_kernel();
    for_each_output(y, m, n, |o, r| {
        dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k])
    });
}

/// `y[r, o] = f(o, r)` for `m` input rows and `n` outputs, parallel over chunks of outputs (large
/// enough to amortise scheduling, small enough to balance two or more threads). For `m > 1`
/// each chunk writes `[outputs, m]` and the result is transposed once at the end, so one output
/// row of the weights is read for all input rows while it is in cache.
pub(crate) fn for_each_output(
    y: &mut [f32],
    m: usize,
    n: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) {
    let chunk = (n / (rayon::current_num_threads() * 8)).clamp(16, 1024);
    if m == 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            for (j, yv) in out.iter_mut().enumerate() {
                *yv = f(c * chunk + j, 0);
            }
        });
        return;
    }
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(chunk * m)
        .enumerate()
        .for_each(|(c, out)| {
            for (j, ys) in out.chunks_mut(m).enumerate() {
                for (r, yv) in ys.iter_mut().enumerate() {
                    *yv = f(c * chunk + j, r);
                }
            }
        });
    for j in 0..n {
        for r in 0..m {
            y[r * n + j] = yt[j * m + r];
        }
    }
}

/// The dot product for this CPU (AVX-512F where [`wide_dots`], else AVX2+FMA, when present).
/// Every variant runs the same per-lane arithmetic ([`dot_impl`]), so they all return the same
/// bits.
pub(crate) fn dot_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if wide_dots() {
            return |a, b| {
                // SAFETY: the features were detected above.
                unsafe { dot_avx512(a, b) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |a, b| {
                // SAFETY: the features were detected above.
                unsafe { dot_avx2(a, b) }
            };
        }
    }
    dot_portable
}

/// `y += a · x` for this CPU (AVX2+FMA when present).
pub(crate) fn axpy_kernel() -> fn(f32, &[f32], &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |a, x, y| {
                // SAFETY: the features were detected above.
                unsafe { axpy_avx2(a, x, y) }
            };
        }
    }
    axpy_impl::<false>
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_impl::<true>(a, x, y)
}

#[inline(always)]
fn axpy_impl<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = if FMA {
            a.mul_add(xv, *yv)
        } else {
            *yv + a * xv
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_impl::<true>(a, b)
}

/// [`dot_impl`]'s 32 lanes in two 512-bit accumulators instead of four 256-bit ones (LLVM keeps
/// to 256-bit vectors when it vectorises on its own): one row of [`dot_rows_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    dot_rows_avx512::<1>(a, b, n)[0]
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the f32 decode products run the 512-bit kernels: AVX-512F and FMA, on an Intel
/// processor. AMD's AVX-512 (Zen4) runs on 256-bit datapaths, and there the AVX2 dot, one
/// weight row at a time, streams memory fastest: SmolLM2's f32 decode measured 45 tok/s with
/// eight rows a pass in 512-bit registers, 53 with one, 57-70 with the AVX2 dot (the same
/// bits every way); on an Intel Xeon eight rows a pass were 1.4x the AVX2 dot (Llama-1B shape).
#[cfg(target_arch = "x86_64")]
fn wide_dots() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| has_avx512() && cpu_vendor() == *b"GenuineIntel")
}

/// The processor's vendor string (CPUID leaf 0: EBX, EDX, ECX).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_vendor() -> [u8; 12] {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 0 exists on every x86-64 processor.
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// The dot products of `R` consecutive weight rows (`w` is `[R, k]`) with one activation row, in
/// 512-bit registers (half the instructions per weight of the AVX2 kernel): each row's lanes,
/// tail and reduction are [`dot_impl`]'s, so each output has the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_rows_avx512<const R: usize>(w: &[f32], x: &[f32], k: usize) -> [f32; R] {
    use std::arch::x86_64::*;
    const L: usize = 32;
    assert!(w.len() >= R * k && x.len() >= k);
    let full = k - k % L;
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    let mut i = 0;
    while i < full {
        let (x0, x1) = (_mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(px.add(i + 16)));
        for r in 0..R {
            let row = pw.add(r * k + i);
            lo[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row), x0, lo[r]);
            hi[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(16)), x1, hi[r]);
        }
        i += L;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut acc = [0f32; L];
        _mm512_storeu_ps(acc.as_mut_ptr(), lo[r]);
        _mm512_storeu_ps(acc.as_mut_ptr().add(16), hi[r]);
        out[r] = reduce(acc, &w[r * k + full..(r + 1) * k], &x[full..k]);
    }
    out
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_impl::<false>(a, b)
}

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    // Four 8-wide accumulators hide the FMA latency.
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    reduce(acc, ra, rb)
}

/// The remainder's products summed in order, then the 32 lanes summed in a fixed tree.
#[inline(always)]
fn reduce(acc: [f32; 32], ra: &[f32], rb: &[f32]) -> f32 {
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    for l in 0..8 {
        s += (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendor read by `cpuid` (which picks the f32 kernels and the integer kernels'
    /// weight prefetch hint) is the one the kernel reports in /proc/cpuinfo.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn the_vendor_is_the_kernels() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim())
            .expect("a vendor_id line");
        assert_eq!(
            cpu_vendor() == *b"AuthenticAMD",
            vendor == "AuthenticAMD",
            "{vendor}"
        );
    }
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_matmul_for_decode_shapes() {
        for (m, k, n) in [(1, 576, 1536), (3, 100, 37), (4, 7, 2000), (1, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let got = x.apply_op2_no_bwd(&w, &Gemv).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let err = crate::nn::max_abs_diff(&got, &want).unwrap();
            assert!(err < 1e-4 * (k as f32).sqrt(), "{m}x{k}x{n}: {err}");
        }
    }

    #[test]
    fn portable_and_simd_dots_agree() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_kernel()(&a, &b) as f64 - want).abs() < 1e-3);
        assert!((dot_portable(&a, &b) as f64 - want).abs() < 1e-3);
    }

    /// A batched decode step's outputs equal each sequence's own only if every dot this CPU
    /// may pick returns the same bits: each SIMD variant against the scalar one (`mul_add` is
    /// the same single-rounding FMA), at lengths with and without a remainder.
    #[test]
    fn every_dot_variant_returns_the_portable_bits() {
        for n in [0, 1, 31, 32, 33, 576, 1000, 1536 + 7] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() / 7.0).collect();
            let want = dot_impl::<true>(&a, &b);
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") {
                    // SAFETY: detected.
                    assert_eq!(
                        unsafe { dot_avx2(&a, &b) }.to_bits(),
                        want.to_bits(),
                        "avx2, {n}"
                    );
                }
                if has!("avx512f") && has!("fma") {
                    // SAFETY: detected.
                    let got = unsafe { dot_avx512(&a, &b) };
                    assert_eq!(got.to_bits(), want.to_bits(), "avx512, {n}");
                } else {
                    eprintln!("no AVX-512F here: the 512-bit dot was not checked");
                }
            }
            assert_eq!(
                dot_kernel()(&a, &b).to_bits(),
                want.to_bits(),
                "chosen, {n}"
            );
        }
    }

    /// One sequence's product (the several-rows-at-a-time path on an Intel AVX-512 processor)
    /// and the same row inside a batch of three (one dot per output) give the same bits, and
    /// each equals the scalar dot.
    #[test]
    fn one_row_and_a_batch_row_have_the_same_bits() {
        for (k, n) in [(576, 1536), (100, 37), (2048 + 5, 203), (32, 8)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..3 * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
                .collect();
            let mut one = vec![0f32; n];
            gemv(&x[..k], &w, &mut one, 1, k, n);
            let mut three = vec![0f32; 3 * n];
            gemv(&x, &w, &mut three, 3, k, n);
            // The eight-rows kernel itself, wherever AVX-512F is (gemv runs it on Intel's).
            #[cfg(target_arch = "x86_64")]
            if has_avx512() && n >= 8 {
                for o in (0..n - 7).step_by(8) {
                    // SAFETY: detected.
                    let got = unsafe { dot_rows_avx512::<8>(&w[o * k..(o + 8) * k], &x[..k], k) };
                    for (r, g) in got.iter().enumerate() {
                        let want = dot_impl::<true>(&w[(o + r) * k..(o + r + 1) * k], &x[..k]);
                        assert_eq!(g.to_bits(), want.to_bits(), "eight rows, {}", o + r);
                    }
                }
            }
            for o in 0..n {
                let want = dot_impl::<true>(&w[o * k..(o + 1) * k], &x[..k]);
                assert_eq!(
                    one[o].to_bits(),
                    want.to_bits(),
                    "one row, output {o} ({k}x{n})"
                );
                assert_eq!(
                    three[o].to_bits(),
                    want.to_bits(),
                    "batch row, output {o} ({k}x{n})"
                );
            }
        }
    }
}
