//! Integer dot products for quantized decode on the CPU: activations quantized to 8 bits per
//! 32-value block (`x ≈ d·q`, `q` in -127..=127, as ggml's Q8_1), multiplied with the
//! checkpoint's Q4_1 / Q8_0 weight blocks in integer arithmetic, one f32 scale per block pair.
//!
//! This is what llama.cpp does at decode: a block's 32 products become one `vpmaddubsw` +
//! `vpmaddwd` (AVX2) or one `vpdpbusd` (AVX-VNNI or AVX512-VNNI) instead of 32 f32 FMAs per
//! activation row, so a batch of rows costs little more than one. The error added is the
//! activations' rounding (half a step of `d = max|x_block|/127`), bounded and tested below.
//!
//! Owns: the activation quantizer and the block-dot kernels with run-time dispatch. Knows nothing
//! of tensors, layers or candle: it takes slices.
//!
//! Every row of a batch is computed by the same instructions in the same order as that row alone
//! (rows are only grouped to share a weight block's unpacking), so a batched decode step's outputs
//! are bit-identical to each sequence's own. The VNNI and AVX2 kernels are bit-identical too:
//! both produce each 4-byte group's exact integer sum in the same lane (no saturation is possible
//! in these ranges: |15·127·2| and |127·127·2| fit an i16).

pub const BLOCK: usize = 32;

/// Activation rows quantized per 32-value block, stored block-major (block `b` of every row,
/// then block `b + 1`) so a batch's kernel walks one array for all its rows.
#[derive(Debug, Clone, Default)]
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    /// `[cols / 32][rows][32]` quants.
    qs: Vec<i8>,
    /// `[cols / 32][rows]` scales `d` (`x ≈ d·q`), then [`PAD`] zeros.
    d: Vec<f32>,
    /// `[cols / 32][rows]` `d·Σq` (the Q4_1 minimum's term), then [`PAD`] zeros.
    s: Vec<f32>,
}

/// Zeros after the per-block arrays, so a group of fewer than 4 rows may load 4 lanes.
const PAD: usize = 4;

impl Q8Rows {
    /// `x` is `[rows, cols]` row-major, `cols` a multiple of 32. `d = max|x|/127`, `q =
    /// round(x/d)` (ties to even); an all-zero block has `d = 0`. Non-finite inputs give finite
    /// garbage (the caller's values were already meaningless).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), rows * cols, "activations are [rows, cols]");
        assert_eq!(cols % BLOCK, 0, "columns a multiple of 32");
        let nb = cols / BLOCK;
        let mut out = Self {
            rows,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; nb * rows + PAD],
            s: vec![0.0; nb * rows + PAD],
        };
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.available() {
            // SAFETY: AVX2 is present (checked).
            unsafe { quantize_avx2(x, rows, nb, &mut out) };
            return out;
        }
        quantize_into(x, rows, nb, &mut out);
        out
    }

    /// Quant `i` of row `r`.
    pub fn quant(&self, r: usize, i: usize) -> i8 {
        self.qs[((i / BLOCK) * self.rows + r) * BLOCK + i % BLOCK]
    }

    /// The scale of row `r`'s block `b`.
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[b * self.rows + r]
    }

    /// `d·Σq` of row `r`'s block `b`.
    pub fn scaled_sum(&self, r: usize, b: usize) -> f32 {
        self.s[b * self.rows + r]
    }

    /// Row `r` as the values its blocks stand for (`d·q`).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        (0..self.cols)
            .map(|i| self.scale(r, i / BLOCK) * self.quant(r, i) as f32)
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], rows: usize, nb: usize, out: &mut Q8Rows) {
    quantize_into(x, rows, nb, out)
}

#[inline(always)]
fn quantize_into(x: &[f32], rows: usize, nb: usize, out: &mut Q8Rows) {
    for r in 0..rows {
        for b in 0..nb {
            let xs: &[f32; BLOCK] = x[(r * nb + b) * BLOCK..(r * nb + b + 1) * BLOCK]
                .try_into()
                .expect("a block");
            let i = b * rows + r;
            let qs: &mut [i8; BLOCK] = (&mut out.qs[i * BLOCK..(i + 1) * BLOCK])
                .try_into()
                .expect("a block");
            let mut amax = 0f32;
            for v in xs {
                amax = amax.max(v.abs());
            }
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let t = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
                *q = t as i8;
                sum += t;
            }
            out.d[i] = d;
            out.s[i] = d * sum as f32;
        }
    }
}

/// One weight row: packed quants (Q4_1: 16 bytes a block, low nibbles weights 0..16, high
/// nibbles 16..32; Q8_0: 32 signed bytes), the per-block scales, and (Q4_1) minimums.
#[derive(Clone, Copy)]
pub struct WeightRow<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

/// A quantized weight block's format (ggml's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// 32 weights = scale d, min m, 32 4-bit q: `w = d·q + m`.
    Q4_1,
    /// 32 weights = scale d, 32 int8 q: `w = d·q`.
    Q8_0,
}

impl WeightFormat {
    /// Bytes of packed quants per 32-weight block (scales kept apart).
    pub fn quant_bytes(self) -> usize {
        match self {
            WeightFormat::Q4_1 => 16,
            WeightFormat::Q8_0 => 32,
        }
    }
}

/// The instruction set a kernel uses, chosen once per process from what the CPU reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// `vpdpbusd` on 256-bit vectors, AVX512-VNNI+VL encoding (Ice Lake and later Xeons, Zen4).
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit vectors, AVX-VNNI encoding (Alder Lake and later clients).
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512vnni") && has!("avx512vl") {
                return Isa::Avx512Vnni;
            }
            if avx2 && has!("avxvnni") {
                return Isa::AvxVnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The best this CPU has (detected once).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx512Vnni => avx2 && has!("avx512vnni") && has!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every kernel set this CPU can run, the portable one first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }
}

/// The block-dot kernel for one weight format on one instruction set, checked once to run on
/// this CPU.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    isa: Isa,
    format: WeightFormat,
}

impl Kernel {
    /// `None` if this CPU lacks `isa`.
    pub fn new(isa: Isa, format: WeightFormat) -> Option<Self> {
        isa.available().then_some(Self { isa, format })
    }

    /// The fastest kernel for `format` on this CPU.
    pub fn best(format: WeightFormat) -> Self {
        Self {
            isa: Isa::best(),
            format,
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[r * n + j] = w_j · x_r` (`out` is `[x.rows, n]`, the layout of `x · Wᵀ`) for the `n`
    /// consecutive weight rows `w_j` in `w` (each `x.cols` wide) and every activation row of
    /// `x`. Panics if the shapes disagree.
    pub fn dot_matrix(&self, w: &WeightRow, x: &Q8Rows, out: &mut [f32]) {
        let format = self.format;
        let nb = x.cols / BLOCK;
        let wbytes = format.quant_bytes();
        assert!(nb > 0, "no columns");
        assert_eq!(w.d.len() % nb, 0, "weights and activations disagree");
        let n = w.d.len() / nb;
        assert_eq!(
            out.len(),
            n * x.rows,
            "one output per weight and activation row"
        );
        assert_eq!(w.qs.len(), n * nb * wbytes);
        assert!(format == WeightFormat::Q8_0 || w.m.len() == n * nb);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `new`/`best` checked the features; the shapes were checked above.
            Isa::Avx512Vnni => unsafe { x86::matrix_avx512vnni(format, w, x, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::AvxVnni => unsafe { x86::matrix_avxvnni(format, w, x, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::matrix_avx2(format, w, x, out) },
            _ => {
                let mut y = vec![0f32; x.rows];
                for j in 0..n {
                    portable_group(format, &w.row(j, nb, wbytes), x, 0, &mut y);
                    for (r, v) in y.iter().enumerate() {
                        out[r * n + j] = *v;
                    }
                }
            }
        }
    }
}

impl<'a> WeightRow<'a> {
    /// Row `j` of consecutive rows of `nb` blocks of `wbytes` bytes.
    #[inline(always)]
    fn row(&self, j: usize, nb: usize, wbytes: usize) -> WeightRow<'a> {
        WeightRow {
            qs: &self.qs[j * nb * wbytes..(j + 1) * nb * wbytes],
            d: &self.d[j * nb..(j + 1) * nb],
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[j * nb..(j + 1) * nb]
            },
        }
    }
}

fn portable_group(format: WeightFormat, w: &WeightRow, x: &Q8Rows, r0: usize, y: &mut [f32]) {
    for (j, yv) in y.iter_mut().enumerate() {
        let r = r0 + j;
        let mut acc = 0f32;
        let mut mins = 0f32;
        for b in 0..w.d.len() {
            let i = b * x.rows + r;
            let xq = &x.qs[i * BLOCK..(i + 1) * BLOCK];
            let isum: i32 = match format {
                WeightFormat::Q4_1 => {
                    let q = &w.qs[b * 16..(b + 1) * 16];
                    (0..16)
                        .map(|i| {
                            (q[i] & 15) as i32 * xq[i] as i32
                                + (q[i] >> 4) as i32 * xq[16 + i] as i32
                        })
                        .sum()
                }
                WeightFormat::Q8_0 => {
                    let q = &w.qs[b * 32..(b + 1) * 32];
                    (0..32).map(|i| q[i] as i8 as i32 * xq[i] as i32).sum()
                }
            };
            acc += w.d[b] * x.d[i] * isum as f32;
            if format == WeightFormat::Q4_1 {
                mins += w.m[b] * x.s[i];
            }
        }
        *yv = acc + mins;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q8Rows, WeightFormat, WeightRow, BLOCK};
    use std::arch::x86_64::*;

    /// Sums of 4 adjacent u8·i8 products, lane by lane.
    trait Dot4 {
        unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i;
    }

    struct Maddubs;
    impl Dot4 for Maddubs {
        #[inline(always)]
        unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    struct Dpbusd512;
    impl Dot4 for Dpbusd512 {
        #[inline(always)]
        unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    struct DpbusdAvx;
    impl Dot4 for DpbusdAvx {
        #[inline(always)]
        unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    type Args<'a> = (
        WeightFormat,
        &'a WeightRow<'a>,
        &'a Q8Rows,
        usize,
        &'a mut [f32],
    );

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matrix_avx2(f: WeightFormat, w: &WeightRow, x: &Q8Rows, out: &mut [f32]) {
        matrix::<Maddubs>(f, w, x, out)
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn matrix_avx512vnni(
        f: WeightFormat,
        w: &WeightRow,
        x: &Q8Rows,
        out: &mut [f32],
    ) {
        matrix::<Dpbusd512>(f, w, x, out)
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn matrix_avxvnni(
        f: WeightFormat,
        w: &WeightRow,
        x: &Q8Rows,
        out: &mut [f32],
    ) {
        matrix::<DpbusdAvx>(f, w, x, out)
    }

    /// Every weight row against every activation row, in groups of up to four activation rows
    /// that share each unpacked weight block (every row's arithmetic is the same whatever group
    /// it is in).
    #[inline(always)]
    unsafe fn matrix<D: Dot4>(f: WeightFormat, w: &WeightRow, x: &Q8Rows, out: &mut [f32]) {
        let nb = x.cols / BLOCK;
        let wbytes = f.quant_bytes();
        let n = out.len() / x.rows;
        let mut y = [0f32; 4];
        for j in 0..n {
            let row = w.row(j, nb, wbytes);
            let mut r0 = 0;
            while r0 < x.rows {
                let g = (x.rows - r0).min(4);
                group::<D>((f, &row, x, r0, &mut y[..g]));
                for (r, v) in y[..g].iter().enumerate() {
                    *out.get_unchecked_mut((r0 + r) * n + j) = *v;
                }
                r0 += g;
            }
        }
    }

    #[inline(always)]
    unsafe fn group<D: Dot4>(a: Args) {
        match (a.0, a.4.len()) {
            (WeightFormat::Q4_1, 1) => q4_1::<D, 1>(a),
            (WeightFormat::Q4_1, 2) => q4_1::<D, 2>(a),
            (WeightFormat::Q4_1, 3) => q4_1::<D, 3>(a),
            (WeightFormat::Q4_1, _) => q4_1::<D, 4>(a),
            (WeightFormat::Q8_0, 1) => q8_0::<D, 1>(a),
            (WeightFormat::Q8_0, 2) => q8_0::<D, 2>(a),
            (WeightFormat::Q8_0, 3) => q8_0::<D, 3>(a),
            (WeightFormat::Q8_0, _) => q8_0::<D, 4>(a),
        }
    }

    /// The 8 lanes summed in a fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Rows `r0..r0 + R` of `x` against one Q4_1 weight row. Per row and block: the integer dot
    /// of the block, times the activation's then the weight's scale, into 8 lanes; the minimum's
    /// term `m·(d·Σq)` into lane `r` of a 4-lane accumulator (the same lane arithmetic whatever
    /// the group, so a row's result does not depend on its neighbours). Even and odd blocks go to
    /// two accumulators, so one row alone is not bound by the latency of a single FMA chain.
    #[inline(always)]
    unsafe fn q4_1<D: Dot4, const R: usize>((_, w, x, r0, y): Args) {
        let nb = w.d.len();
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut mins = [_mm_setzero_ps(); 2];
        let mut b = 0;
        while b + 1 < nb {
            q4_1_block::<D, R>(w, x, r0, b, &mut acc[0], &mut mins[0]);
            q4_1_block::<D, R>(w, x, r0, b + 1, &mut acc[1], &mut mins[1]);
            b += 2;
        }
        if b < nb {
            q4_1_block::<D, R>(w, x, r0, b, &mut acc[0], &mut mins[0]);
        }
        let mut mv = [0f32; 4];
        _mm_storeu_ps(mv.as_mut_ptr(), _mm_add_ps(mins[0], mins[1]));
        for (r, (yv, mv)) in y.iter_mut().zip(mv).enumerate() {
            *yv = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + mv;
        }
    }

    #[inline(always)]
    unsafe fn q4_1_block<D: Dot4, const R: usize>(
        w: &WeightRow,
        x: &Q8Rows,
        r0: usize,
        b: usize,
        acc: &mut [__m256; R],
        mins: &mut __m128,
    ) {
        let raw = _mm_loadu_si128(w.qs.as_ptr().add(b * 16) as *const __m128i);
        let low = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        let wq = _mm256_set_m128i(hi, lo);
        let dw = _mm256_set1_ps(*w.d.get_unchecked(b));
        let i0 = b * x.rows + r0;
        // Lanes past the group read later rows or the padding; they are not used.
        *mins = _mm_fmadd_ps(
            _mm_set1_ps(*w.m.get_unchecked(b)),
            _mm_loadu_ps(x.s.as_ptr().add(i0)),
            *mins,
        );
        for (r, a) in acc.iter_mut().enumerate() {
            let q = _mm256_loadu_si256(x.qs.as_ptr().add((i0 + r) * BLOCK) as *const __m256i);
            let p = _mm256_cvtepi32_ps(D::dot4(wq, q));
            let t = _mm256_mul_ps(p, _mm256_broadcast_ss(&*x.d.as_ptr().add(i0 + r)));
            *a = _mm256_fmadd_ps(t, dw, *a);
        }
    }

    /// As [`q4_1`] for Q8_0 weights (signed: `|w|` times `x` with `w`'s sign, in u8·i8 form).
    #[inline(always)]
    unsafe fn q8_0<D: Dot4, const R: usize>((_, w, x, r0, y): Args) {
        let nb = w.d.len();
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut b = 0;
        while b + 1 < nb {
            q8_0_block::<D, R>(w, x, r0, b, &mut acc[0]);
            q8_0_block::<D, R>(w, x, r0, b + 1, &mut acc[1]);
            b += 2;
        }
        if b < nb {
            q8_0_block::<D, R>(w, x, r0, b, &mut acc[0]);
        }
        for (r, yv) in y.iter_mut().enumerate() {
            *yv = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
        }
    }

    #[inline(always)]
    unsafe fn q8_0_block<D: Dot4, const R: usize>(
        w: &WeightRow,
        x: &Q8Rows,
        r0: usize,
        b: usize,
        acc: &mut [__m256; R],
    ) {
        let wq = _mm256_loadu_si256(w.qs.as_ptr().add(b * 32) as *const __m256i);
        let aw = _mm256_sign_epi8(wq, wq);
        let dw = _mm256_set1_ps(*w.d.get_unchecked(b));
        let i0 = b * x.rows + r0;
        for (r, a) in acc.iter_mut().enumerate() {
            let q = _mm256_loadu_si256(x.qs.as_ptr().add((i0 + r) * BLOCK) as *const __m256i);
            let p = _mm256_cvtepi32_ps(D::dot4(aw, _mm256_sign_epi8(q, wq)));
            let t = _mm256_mul_ps(p, _mm256_broadcast_ss(&*x.d.as_ptr().add(i0 + r)));
            *a = _mm256_fmadd_ps(t, dw, *a);
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index arithmetic is the point of these checks
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream (no test depends on a seed's luck).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Weights {
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
        /// The dequantized values, written out from the block definitions.
        w: Vec<f32>,
    }

    fn weights(format: WeightFormat, k: usize, seed: u64) -> Weights {
        let nb = k / BLOCK;
        let v = values(k * 2, seed);
        let mut out = Weights {
            qs: vec![],
            d: vec![],
            m: vec![],
            w: vec![0.0; k],
        };
        for b in 0..nb {
            let d = 0.01 + v[k + b].abs() * 0.05;
            out.d.push(d);
            match format {
                WeightFormat::Q4_1 => {
                    let m = -8.0 * d + v[k + nb + b] * 0.01;
                    out.m.push(m);
                    for i in 0..16 {
                        let lo = ((v[b * 32 + i] + 1.0) * 7.99) as u8;
                        let hi = ((v[b * 32 + 16 + i] + 1.0) * 7.99) as u8;
                        out.qs.push(lo | (hi << 4));
                        out.w[b * 32 + i] = d * lo as f32 + m;
                        out.w[b * 32 + 16 + i] = d * hi as f32 + m;
                    }
                }
                WeightFormat::Q8_0 => {
                    for i in 0..32 {
                        // Include the extremes -128 and 127 a hostile file could carry.
                        let q = match (b * 32 + i) % 97 {
                            0 => -128i8,
                            1 => 127,
                            _ => (v[b * 32 + i] * 127.0) as i8,
                        };
                        out.qs.push(q as u8);
                        out.w[b * 32 + i] = d * q as f32;
                    }
                }
            }
        }
        out
    }

    impl Weights {
        fn row(&self) -> WeightRow<'_> {
            WeightRow {
                qs: &self.qs,
                d: &self.d,
                m: &self.m,
            }
        }
    }

    fn isas() -> Vec<Isa> {
        Isa::all_available()
    }

    #[test]
    fn quantizer_rounds_each_block_to_its_own_scale() {
        let mut x = values(96, 3);
        x[32..64].fill(0.0);
        x[70] = 5.0;
        // Two rows: the second row's blocks are quantized on their own scales too.
        let x2: Vec<f32> = x
            .iter()
            .chain(x.iter().map(|v| v * 0.5).collect::<Vec<_>>().iter())
            .copied()
            .collect();
        let q = Q8Rows::quantize(&x2, 2, 96);
        assert_eq!(q.scale(0, 1), 0.0);
        assert!((32..64).all(|i| q.quant(0, i) == 0));
        assert_eq!(q.quant(0, 70), 127);
        assert_eq!(q.quant(1, 70), 127);
        assert!((q.scale(0, 2) - 5.0 / 127.0).abs() < 1e-7);
        assert!((q.scale(1, 2) - 2.5 / 127.0).abs() < 1e-7);
        for r in 0..2 {
            for b in 0..3 {
                let d = q.scale(r, b);
                let mut sum = 0i32;
                for i in b * 32..(b + 1) * 32 {
                    // Within half a step, and the rounding is to the nearest step.
                    let v = x2[r * 96 + i];
                    assert!((d * q.quant(r, i) as f32 - v).abs() <= d * 0.5 + 1e-7);
                    sum += q.quant(r, i) as i32;
                }
                assert_eq!(q.scaled_sum(r, b), d * sum as f32);
            }
        }
        assert_eq!(q.dequantize_row(1)[70], 2.5);
    }

    /// Against f64 sums of the dequantized weights times the dequantized activations: the
    /// kernels' only freedom is f32 summation order (relative error ~1e-6 of Σ|terms|).
    #[test]
    fn kernels_equal_the_dequantized_dot_product() {
        let k = 512;
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let w = weights(format, k, 11);
            let x = values(5 * k, 7);
            let q = Q8Rows::quantize(&x, 5, k);
            for isa in isas() {
                let mut y = vec![0f32; 5];
                Kernel::new(isa, format)
                    .unwrap()
                    .dot_matrix(&w.row(), &q, &mut y);
                for r in 0..5 {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for i in 0..k {
                        let xd = q.scale(r, i / 32) as f64 * q.quant(r, i) as f64;
                        want += w.w[i] as f64 * xd;
                        mag += (w.w[i] as f64 * xd).abs();
                    }
                    let e = (y[r] as f64 - want).abs();
                    assert!(
                        e <= 1e-5 * mag,
                        "{format:?} {isa:?} row {r}: {} vs {want}",
                        y[r]
                    );
                }
            }
        }
    }

    /// Against the unquantized activations: the error is at most the rounding's bound,
    /// Σ_b (d_b/2)·Σ_i |w_i| (plus f32 noise).
    #[test]
    fn activation_rounding_error_stays_within_its_bound() {
        let k = 1024;
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let w = weights(format, k, 5);
            let x = values(k, 9);
            let q = Q8Rows::quantize(&x, 1, k);
            let mut y = [0f32];
            Kernel::best(format).dot_matrix(&w.row(), &q, &mut y);
            let exact: f64 = (0..k).map(|i| w.w[i] as f64 * x[i] as f64).sum();
            let bound: f64 = (0..k)
                .map(|i| q.scale(0, i / 32) as f64 * 0.5 * (w.w[i] as f64).abs())
                .sum();
            let e = (y[0] as f64 - exact).abs();
            assert!(
                e <= bound * 1.001 + 1e-4,
                "{format:?}: error {e}, bound {bound}"
            );
            // And it is a real approximation, not a coincidence of scale.
            assert!(
                e < 0.05 * exact.abs().max(1.0),
                "{format:?}: {y:?} vs {exact}"
            );
        }
    }

    #[test]
    fn a_row_in_a_batch_equals_the_row_alone_bit_for_bit() {
        // An odd number of blocks: the last one goes to the first accumulator alone.
        let k = 224;
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let w = weights(format, k, 2);
            let x = values(7 * k, 4);
            let q = Q8Rows::quantize(&x, 7, k);
            for isa in isas() {
                let mut all = vec![0f32; 7];
                Kernel::new(isa, format)
                    .unwrap()
                    .dot_matrix(&w.row(), &q, &mut all);
                for r in 0..7 {
                    // The row quantized alone, as a sequence decoding by itself has it.
                    let alone = Q8Rows::quantize(&x[r * k..(r + 1) * k], 1, k);
                    let mut one = [0f32];
                    Kernel::new(isa, format)
                        .unwrap()
                        .dot_matrix(&w.row(), &alone, &mut one);
                    assert_eq!(all[r].to_bits(), one[0].to_bits(), "{format:?} {isa:?} {r}");
                }
            }
        }
    }

    /// The SIMD kernels compute the same integer sums as the portable one: they agree to f32
    /// summation order, and the VNNI and AVX2 kernels bit for bit.
    #[test]
    fn simd_kernels_agree_with_the_portable_one() {
        let k = 768;
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let w = weights(format, k, 8);
            let x = values(3 * k, 1);
            let q = Q8Rows::quantize(&x, 3, k);
            let mut want = vec![0f32; 3];
            Kernel::new(Isa::Portable, format)
                .unwrap()
                .dot_matrix(&w.row(), &q, &mut want);
            let mut seen = vec![];
            for isa in isas() {
                let mut y = vec![0f32; 3];
                Kernel::new(isa, format)
                    .unwrap()
                    .dot_matrix(&w.row(), &q, &mut y);
                for r in 0..3 {
                    assert!((y[r] - want[r]).abs() <= 1e-4 * want[r].abs().max(1.0));
                }
                seen.push((isa, y));
            }
            if let Some(a) = seen.iter().find(|(i, _)| *i == Isa::Avx2) {
                for (isa, y) in seen.iter().filter(|(i, _)| *i != Isa::Portable) {
                    assert_eq!(&a.1, y, "{format:?}: {isa:?} differs from AVX2");
                }
            }
        }
    }
}
