//! Integer dot products for quantized decode on the CPU: activations quantized to 8 bits per
//! 32-value block (`x ≈ d·q`, `q` in -127..=127, as ggml's Q8_1), multiplied with the
//! checkpoint's Q4_1 / Q8_0 weight blocks in integer arithmetic, one f32 scale per block pair.
//!
//! This is what llama.cpp does at decode: products of 4 weight bytes and 4 activation bytes
//! become one lane of a `vpmaddubsw` + `vpmaddwd` (AVX2) or of a `vpdpbusd` (AVX-VNNI or
//! AVX512-VNNI) instead of f32 FMAs. The weights are repacked at load ([`TiledWeights`]: 8 rows
//! interleaved 4 weights at a time, as llama.cpp's repacked GEMM kernels do), so each
//! instruction serves 8 weight rows at once, a block's 8 integer sums land in the 8 lanes of one
//! register, and one scale multiply and one FMA per block serve 8 outputs: no horizontal sums.
//! A batch of up to 4 activation rows shares each unpacked weight vector. The AVX-512 kernels
//! take two tiles (16 rows) per 512-bit instruction, and on Q8_0 multiply `w + 128` as u8 from
//! a start of `-128·Σx` (one `vpdpbusd` per 4 bytes, no sign trick). The error added is the
//! activations' rounding (half a step of `d = max|x_block|/127`), bounded and tested below.
//!
//! Owns: the activation quantizer, the tiled weight layout and the block-dot kernels with
//! run-time dispatch. Knows nothing of tensors, layers or candle: it takes slices.
//!
//! Every output is computed by the same arithmetic whatever batch it is in and whatever the
//! instruction set: exact integer block sums (no saturation is possible: a Q4_1 block's 16
//! products per i16 are at most 16·15·127 = 30,480; a Q8_0 pair at most 2·128·127 = 32,512),
//! then the same f32 FMAs in the same order, written out scalar by scalar in the portable kernel
//! that every SIMD kernel equals bit for bit. So a batched decode step's outputs are
//! bit-identical to each sequence's own.

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
    /// `[cols / 32][rows]` `-128·Σq` (the VNNI Q8_0 kernels' offset correction), then [`PAD`]
    /// zeros.
    offset: Vec<i32>,
}

/// Zeros after the per-block arrays, so a group of fewer than 4 rows may load 4 lanes.
const PAD: usize = 4;

impl Q8Rows {
    /// `x` is `[rows, cols]` row-major, `cols` a multiple of 32. `d = max|x|/127`, `q =
    /// round(x/d)` (ties to even); an all-zero block has `d = 0`. Non-finite inputs give finite
    /// garbage (the caller's values were already meaningless).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        let mut out = Self::default();
        out.requantize(x, rows, cols);
        out
    }

    /// [`Self::quantize`] into this value's buffers, which grow as needed and are never
    /// shrunk: a decode step quantizes ~120 activations, and fresh zeroed buffers for each were
    /// ~7% of the quantizing time (`profile_qdot_kernels`).
    pub fn requantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.requantize_with(Quantizer::best(), x, rows, cols)
    }

    /// [`Self::requantize`] with a given quantizer (tests and benchmarks compare them).
    pub fn requantize_with(&mut self, quantizer: Quantizer, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "activations are [rows, cols]");
        assert_eq!(cols % BLOCK, 0, "columns a multiple of 32");
        let nb = cols / BLOCK;
        self.rows = rows;
        self.cols = cols;
        let blocks = nb * rows;
        if self.qs.len() < x.len() {
            self.qs.resize(x.len(), 0);
        }
        for v in [&mut self.d, &mut self.s] {
            if v.len() < blocks + PAD {
                v.resize(blocks + PAD, 0.0);
            }
            v[blocks..blocks + PAD].fill(0.0);
        }
        if self.offset.len() < blocks + PAD {
            self.offset.resize(blocks + PAD, 0);
        }
        self.offset[blocks..blocks + PAD].fill(0);
        match quantizer {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Quantizer::Avx512` is only chosen where the CPU has its features.
            Quantizer::Avx512 => unsafe { quantize_avx512(x, rows, nb, self) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, AVX2.
            Quantizer::Avx2 => unsafe { quantize_avx2(x, rows, nb, self) },
            Quantizer::Portable => quantize_into(x, rows, nb, self),
        }
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

/// The activation quantizers, all with the same results ([`quantize_into`]'s arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantizer {
    /// [`quantize_avx512`]: AVX-512 F/BW/VL/DQ.
    Avx512,
    /// [`quantize_avx2`]: AVX2 and FMA.
    Avx2,
    Portable,
}

impl Quantizer {
    /// The fastest this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Quantizer> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Quantizer::all_available()
                .into_iter()
                .next()
                .unwrap_or(Quantizer::Portable)
        })
    }

    /// Every quantizer this CPU can run, the fastest first.
    pub fn all_available() -> Vec<Quantizer> {
        let mut all = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                all.push(Quantizer::Avx512);
            }
            if avx2 {
                all.push(Quantizer::Avx2);
            }
        }
        all.push(Quantizer::Portable);
        all
    }
}

/// [`quantize_into`] in AVX-512: per 16 blocks of a row, each block's `|x|` maximum (a block
/// is two 16-lane vectors), then the 16 scales `max/127` and their inverses in one vector
/// division each (the AVX2 quantizer divides block by block, two scalar divisions a block on
/// its critical path), then each block's quants (`x·(1/d)` rounded to nearest-even, clamped to
/// ±127, narrowed with `vpmovsdb`) and their sum. The same f32 operations as
/// [`quantize_into`], so the same quants, scales and sums for every finite input (tested).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn quantize_avx512(x: &[f32], rows: usize, nb: usize, out: &mut Q8Rows) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), rows * nb * BLOCK, "activations are [rows, cols]");
    assert!(
        out.qs.len() >= x.len() && out.d.len() >= rows * nb,
        "buffers sized by the caller"
    );
    let abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fff_ffff));
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let (zero, one, div) = (
        _mm512_setzero_ps(),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(127.0),
    );
    let mut amax = [0f32; 16];
    let mut ds = [0f32; 16];
    let mut ids = [0f32; 16];
    for r in 0..rows {
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(16);
            // SAFETY (all loads): blocks (r, b0..b0 + n) are inside `x` (asserted above).
            let block = |j: usize| x.as_ptr().add((r * nb + b0 + j) * BLOCK);
            for (j, m) in amax.iter_mut().enumerate().take(n) {
                let p = block(j);
                let a = _mm512_and_ps(_mm512_loadu_ps(p), abs_mask);
                let b = _mm512_and_ps(_mm512_loadu_ps(p.add(16)), abs_mask);
                *m = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
            }
            let d = _mm512_div_ps(_mm512_loadu_ps(amax.as_ptr()), div);
            // `1/d` where `d > 0`, else 0 (as the scalar quantizer).
            let id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, zero), one, d);
            _mm512_storeu_ps(ds.as_mut_ptr(), d);
            _mm512_storeu_ps(ids.as_mut_ptr(), id);
            for j in 0..n {
                let p = block(j);
                let idv = _mm512_set1_ps(ids[j]);
                let q =
                    [p, p.add(16)].map(|p| {
                        let t = _mm512_roundscale_ps::<
                            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                        >(_mm512_mul_ps(_mm512_loadu_ps(p), idv));
                        // min first: a NaN product becomes 127 (as the AVX2 quantizer).
                        _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(t, hi), lo))
                    });
                let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
                let i = (b0 + j) * rows + r;
                let dst = out.qs.as_mut_ptr().add(i * BLOCK) as *mut __m128i;
                _mm_storeu_si128(dst, _mm512_cvtsepi32_epi8(q[0]));
                _mm_storeu_si128(dst.add(1), _mm512_cvtsepi32_epi8(q[1]));
                let d = ds[j];
                *out.d.get_unchecked_mut(i) = d;
                *out.s.get_unchecked_mut(i) = d * sum as f32;
                *out.offset.get_unchecked_mut(i) = -128 * sum;
            }
            b0 += n;
        }
    }
}

/// [`quantize_into`] in AVX2, block by block: the same f32 operations (`|x|` maximum, `max/127`,
/// `1/d`, `x·(1/d)` rounded to nearest-even, clamped to ±127), so the same quants, scales and
/// sums for every finite input (tested against it). It runs before every product's parallel
/// part, on one thread, so its speed is the decode step's serial time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], rows: usize, nb: usize, out: &mut Q8Rows) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), rows * nb * BLOCK, "activations are [rows, cols]");
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // `packs` works within 128-bit lanes: this puts the 8 dwords of bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for r in 0..rows {
        for b in 0..nb {
            // SAFETY: block (r, b) is inside `x` (asserted above).
            let p = x.as_ptr().add((r * nb + b) * BLOCK);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = v.map(|v| {
                let t = _mm256_round_ps(
                    _mm256_mul_ps(v, idv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                // min first: a NaN product becomes 127 (finite garbage, as documented).
                _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(t, hi), lo))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            let i = b * rows + r;
            _mm256_storeu_si256(out.qs.as_mut_ptr().add(i * BLOCK) as *mut __m256i, bytes);
            out.d[i] = d;
            out.s[i] = d * sum as f32;
            out.offset[i] = -128 * sum;
        }
    }
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
            out.offset[i] = -128 * sum;
        }
    }
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
    /// `vpdpbusd` (AVX512-VNNI, with F/BW/VL; Ice Lake and later Xeons, Zen4): two tiles at a
    /// time in 512-bit vectors, a last odd tile in 256-bit ones.
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit vectors, AVX-VNNI encoding (Alder Lake and later clients).
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    Portable,
}

/// The process's kernels, fixed at the first product (or by [`Isa::choose`]).
static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512vnni") && has!("avx512vl") && has!("avx512bw") {
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

    /// The kernels every product runs: the best this CPU has (detected once), or what
    /// [`Isa::choose`] fixed before.
    pub fn best() -> Self {
        *CHOSEN.get_or_init(Isa::detect)
    }

    /// Fixes the kernels for the process (an operator's choice, to compare kernel sets on one
    /// processor or to avoid one): refused when this CPU cannot run them, or when the kernels
    /// were already fixed otherwise (matrices are laid out for the kernels when they load).
    pub fn choose(self) -> Result<(), String> {
        if !self.available() {
            return Err(format!(
                "this CPU cannot run the {self:?} kernels (it has {:?})",
                Isa::detect()
            ));
        }
        let fixed = *CHOSEN.get_or_init(|| self);
        if fixed != self {
            return Err(format!(
                "the CPU kernels are already {fixed:?} for this process"
            ));
        }
        Ok(())
    }

    /// The name settings use for these kernels ([`crate::CpuKernels`]).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx_vnni",
            Isa::Avx512Vnni => "avx512_vnni",
        }
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx512Vnni => {
                    avx2 && has!("avx512vnni") && has!("avx512vl") && has!("avx512bw")
                }
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

/// Weight rows per tile: the 8 lanes of a 256-bit vector of i32/f32, one weight row each.
pub const TILE: usize = 8;

/// A quantized `[rows, cols]` matrix in the kernels' layout: rows in tiles of [`TILE`] (the last
/// padded with zero rows), each tile's blocks one after another, and inside a block the tile's
/// rows interleaved 4 weights at a time, so one `vpmaddubsw`/`vpdpbusd` with 4 activation bytes
/// broadcast computes 4 products for each of 8 weight rows and a block's 8 sums land in the 8
/// lanes of one register: no horizontal sums, and one scale multiply per block serves 8 rows.
/// (llama.cpp's "repacked" Q4_0 GEMM kernels interleave rows the same way.)
///
/// The scales stay the file's f16 (widened to f32 in the kernel, exactly), and each (tile,
/// block) is one record of quants then scales, so decode, which reads every weight once per
/// token and is bound by those bytes, reads 20 bytes per 32 Q4_1 weights (34 for Q8_0) in one
/// forward stream, as many as the file holds.
///
/// The record of tile `t`'s block `b` ([`Self::record`]: tiles in pairs, block by block; an odd
/// last tile has a zero twin), [`Self::record_bytes`] long:
/// - Q4_1: 4 vectors of 32 bytes (byte `4j + k` of vector `p` holds row `j`'s weight `8p + k` in
///   its low nibble and weight `8p + 4 + k` in its high nibble), then the 8 rows' scales `d` as
///   f16, then their minimums `m` as f16.
/// - Q8_0: 8 vectors (byte `4j + k` of vector `g` is row `j`'s weight `4g + k`), then the 8
///   rows' scales `d` as f16.
#[derive(Debug, Clone)]
pub struct TiledWeights {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    order: TileOrder,
    /// The records, on huge pages where the OS gives them (`huge_pages`).
    data: crate::huge_pages::WeightBytes,
}

/// How a [`TiledWeights`]' (tile, block) records follow each other in memory. Decode streams
/// the whole matrix from memory every token, so the order is the one the kernels walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileOrder {
    /// Each tile's blocks, then the next tile's: the walk of the kernels that take one tile.
    Tiles,
    /// Tiles in pairs, block by block (tile 2p's block b, tile 2p + 1's block b, then block
    /// b + 1 of both): the walk of the AVX-512 kernels that take two tiles at once in 512-bit
    /// vectors. (A one-tile kernel reading this order skips every other record: it streamed
    /// ~1.6x slower in a measurement, so each CPU gets the order its kernels walk.)
    Pairs,
}

impl TileOrder {
    /// The order `isa`'s kernels walk.
    pub fn for_kernels(isa: Isa) -> Self {
        match isa {
            Isa::Avx512Vnni => TileOrder::Pairs,
            _ => TileOrder::Tiles,
        }
    }
}

/// One quantized row in ggml's own block layout (Q4_1: 16 bytes a block, low nibbles weights
/// 0..16, high nibbles 16..32; Q8_0: 32 signed bytes), with its per-block scales (and minimums).
#[derive(Debug, Clone, PartialEq)]
pub struct RowBlocks {
    pub qs: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl TiledWeights {
    /// From rows in ggml's block layout, row-major: `qs` `[rows][cols/32][quant bytes]`, `d`
    /// (and `m` for Q4_1, empty for Q8_0) `[rows][cols/32]`. The scales are kept as f16, as
    /// ggml stores them: values that are not f16 (no GGUF block has one) are rounded to f16.
    pub fn from_rows(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        qs: &[u8],
        d: &[f32],
        m: &[f32],
    ) -> Self {
        let order = TileOrder::for_kernels(Isa::best());
        Self::from_rows_in(order, format, rows, cols, qs, d, m)
    }

    /// [`Self::from_rows`] with the records in `order` (every kernel takes either order; the
    /// order only decides which streams well).
    pub fn from_rows_in(
        order: TileOrder,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        qs: &[u8],
        d: &[f32],
        m: &[f32],
    ) -> Self {
        assert_eq!(cols % BLOCK, 0, "columns a multiple of 32");
        let nb = cols / BLOCK;
        let wbytes = format.quant_bytes();
        assert_eq!(qs.len(), rows * nb * wbytes, "quants of every block");
        assert_eq!(d.len(), rows * nb, "a scale per block");
        let q4 = format == WeightFormat::Q4_1;
        assert_eq!(m.len(), if q4 { rows * nb } else { 0 }, "minimums (Q4_1)");
        let tiles = rows.div_ceil(TILE);
        let tb = TILE * wbytes;
        let rec = Self::record_len(format);
        let mut out = Self {
            format,
            rows,
            cols,
            order,
            data: crate::huge_pages::WeightBytes::zeroed(tiles.div_ceil(2) * 2 * nb * rec),
        };
        for r in 0..rows {
            let (t, j) = (r / TILE, r % TILE);
            for b in 0..nb {
                let i = Self::record_at(order, t, b, nb);
                let src = &qs[(r * nb + b) * wbytes..(r * nb + b + 1) * wbytes];
                let record = &mut out.data[i * rec..(i + 1) * rec];
                let (dst, scales) = record.split_at_mut(tb);
                match format {
                    WeightFormat::Q4_1 => {
                        for pos in 0..BLOCK {
                            let v = if pos < 16 {
                                src[pos] & 15
                            } else {
                                src[pos - 16] >> 4
                            };
                            // Position `pos` = 8p + 4h + k: vector p, nibble h, byte 4j + k.
                            let (p, h, k) = (pos / 8, (pos / 4) % 2, pos % 4);
                            dst[p * 32 + 4 * j + k] |= v << (4 * h);
                        }
                    }
                    WeightFormat::Q8_0 => {
                        for pos in 0..BLOCK {
                            dst[(pos / 4) * 32 + 4 * j + pos % 4] = src[pos];
                        }
                    }
                }
                let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
                scales[2 * j..2 * j + 2].copy_from_slice(&half(d[r * nb + b]));
                if q4 {
                    scales[2 * (TILE + j)..2 * (TILE + j) + 2]
                        .copy_from_slice(&half(m[r * nb + b]));
                }
            }
        }
        out
    }

    /// The index of tile `t`'s block `b` record in `order`.
    #[inline(always)]
    fn record_at(order: TileOrder, t: usize, b: usize, nb: usize) -> usize {
        match order {
            TileOrder::Tiles => t * nb + b,
            TileOrder::Pairs => ((t / 2) * nb + b) * 2 + t % 2,
        }
    }

    /// [`Self::record_at`] for this matrix.
    #[inline(always)]
    fn record(&self, t: usize, b: usize) -> usize {
        Self::record_at(self.order, t, b, self.cols / BLOCK)
    }

    /// The order of the records.
    pub fn order(&self) -> TileOrder {
        self.order
    }

    /// Bytes of one (tile, block) record: the 8 rows' quants, then their f16 scales (and
    /// minimums).
    fn record_len(format: WeightFormat) -> usize {
        TILE * format.quant_bytes()
            + match format {
                WeightFormat::Q4_1 => 4 * TILE,
                WeightFormat::Q8_0 => 2 * TILE,
            }
    }

    /// Bytes of one (tile, block) record.
    pub fn record_bytes(&self) -> usize {
        Self::record_len(self.format)
    }

    /// Record `i`'s quants.
    #[inline(always)]
    fn quants(&self, i: usize) -> *const u8 {
        debug_assert!((i + 1) * self.record_bytes() <= self.data.len());
        // SAFETY (of the caller's reads): record i lies inside `data` (asserted in debug
        // builds; the kernels' callers check the tile range).
        unsafe { self.data.as_ptr().add(i * self.record_bytes()) }
    }

    /// Record `i`'s 8 scales (f16), then (Q4_1) its 8 minimums.
    #[inline(always)]
    fn scales(&self, i: usize) -> *const u8 {
        // SAFETY: as `quants`; the scales follow the quants inside the record.
        unsafe { self.quants(i).add(TILE * self.format.quant_bytes()) }
    }

    /// Row `j`'s scale (and Q4_1 minimum) in record `i`, widened.
    fn scale_min(&self, i: usize, j: usize) -> (f32, f32) {
        let rec = self.record_bytes();
        let s = &self.data[i * rec + TILE * self.format.quant_bytes()..(i + 1) * rec];
        let h = |o: usize| half::f16::from_le_bytes([s[o], s[o + 1]]).to_f32();
        match self.format {
            WeightFormat::Q4_1 => (h(2 * j), h(2 * (TILE + j))),
            WeightFormat::Q8_0 => (h(2 * j), 0.0),
        }
    }

    /// Row `r` back in ggml's block layout (the inverse of [`Self::from_rows`]).
    pub fn row(&self, r: usize) -> RowBlocks {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let nb = self.cols / BLOCK;
        let wbytes = self.format.quant_bytes();
        let rec = self.record_bytes();
        let q4 = self.format == WeightFormat::Q4_1;
        let (t, j) = (r / TILE, r % TILE);
        let mut out = RowBlocks {
            qs: vec![0; nb * wbytes],
            d: Vec::with_capacity(nb),
            m: Vec::with_capacity(if q4 { nb } else { 0 }),
        };
        for b in 0..nb {
            let i = self.record(t, b);
            let src = &self.data[i * rec..(i + 1) * rec];
            let dst = &mut out.qs[b * wbytes..(b + 1) * wbytes];
            match self.format {
                WeightFormat::Q4_1 => {
                    for pos in 0..BLOCK {
                        let (p, h, k) = (pos / 8, (pos / 4) % 2, pos % 4);
                        let v = (src[p * 32 + 4 * j + k] >> (4 * h)) & 15;
                        if pos < 16 {
                            dst[pos] |= v;
                        } else {
                            dst[pos - 16] |= v << 4;
                        }
                    }
                }
                WeightFormat::Q8_0 => {
                    for pos in 0..BLOCK {
                        dst[pos] = src[(pos / 4) * 32 + 4 * j + pos % 4];
                    }
                }
            }
            let (d, m) = self.scale_min(i, j);
            out.d.push(d);
            if q4 {
                out.m.push(m);
            }
        }
        out
    }

    /// Tiles (groups of [`TILE`] rows, the last possibly partial).
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
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

    /// `out[r * n + j] = w_{row0 + j} · x_r` for the weight rows of tiles `tiles` (`row0 =
    /// tiles.start · 8`, `n` those tiles' real rows) and every activation row of `x`: `out` is
    /// `[x.rows, n]`, the layout of `x · Wᵀ` restricted to those rows.
    ///
    /// Every output is computed by the same arithmetic whatever the other rows of `x` and `w`
    /// and whatever the instruction set: the block's integer sum (exact), then per block
    /// `acc = fma(sum, d_w·d_x, acc)` and (Q4_1) `acc_m = fma(m, d_x·Σq_x, acc_m)`, blocks in
    /// order, result `acc + acc_m`. So a batched decode step's outputs equal each sequence's
    /// own bit for bit, on every kernel. Panics if the shapes disagree.
    pub fn dot_tiles(
        &self,
        w: &TiledWeights,
        tiles: std::ops::Range<usize>,
        x: &Q8Rows,
        out: &mut [f32],
    ) {
        let row0 = tiles.start * TILE;
        let n = (tiles.end * TILE).min(w.rows).saturating_sub(row0);
        assert_eq!(
            out.len(),
            n * x.rows,
            "one output per weight and activation row"
        );
        // SAFETY: `out` holds x.rows rows of n outputs, checked above (the other shapes are
        // checked by `dot_tiles_strided`).
        unsafe { self.dot_tiles_strided(w, tiles, x, out.as_mut_ptr(), n) }
    }

    /// [`Self::dot_tiles`] writing activation row `r`'s outputs at `out + r·stride` (a column
    /// range of a wider `[x.rows, stride]` output, so that tasks over different tiles write one
    /// shared output in place).
    ///
    /// # Safety
    /// `out + r·stride .. + n` must be valid for writes for every activation row `r` (`n` the
    /// tiles' real rows) and not be accessed by anything else during the call.
    pub unsafe fn dot_tiles_strided(
        &self,
        w: &TiledWeights,
        tiles: std::ops::Range<usize>,
        x: &Q8Rows,
        out: *mut f32,
        stride: usize,
    ) {
        assert_eq!(
            w.format, self.format,
            "kernel and weights disagree on format"
        );
        assert_eq!(w.cols, x.cols, "weights and activations disagree on width");
        assert!(x.cols > 0, "no columns");
        assert!(tiles.end <= w.tiles(), "tiles past the matrix");
        let row0 = tiles.start * TILE;
        let mut y = [[0f32; TILE]; 4];
        #[cfg(target_arch = "x86_64")]
        let mut y2 = [[0f32; 2 * TILE]; 8];
        let mut t = tiles.start;
        while t < tiles.end {
            let dst = out.add(t * TILE - row0);
            #[cfg(target_arch = "x86_64")]
            if self.isa == Isa::Avx512Vnni
                && w.order == TileOrder::Pairs
                && t.is_multiple_of(2)
                && t + 1 < tiles.end
            {
                // A pair of tiles in the 16 lanes of 512-bit vectors: half the instructions
                // per product, one stream of records (tile t is full, as t + 1 follows it, and
                // the two tiles' outputs are adjacent).
                let cnt = TILE + (w.rows - (t + 1) * TILE).min(TILE);
                by_row_groups(x.rows, &mut y2, dst, stride, cnt, |r0, y| {
                    // SAFETY: `new`/`best` checked the features; the shapes are checked above.
                    x86::pair_avx512vnni(w, t, x, r0, y)
                });
                t += 2;
                continue;
            }
            let cnt = (w.rows - t * TILE).min(TILE);
            by_row_groups(x.rows, &mut y, dst, stride, cnt, |r0, y| {
                self.group(w, t, x, r0, y)
            });
            t += 1;
        }
    }

    /// Activation rows `r0..r0 + y.len()` (at most 4) against tile `t`.
    fn group(&self, w: &TiledWeights, t: usize, x: &Q8Rows, r0: usize, y: &mut [[f32; TILE]]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `new`/`best` checked the features; `dot_tiles` checked the shapes.
            Isa::Avx512Vnni => unsafe { x86::group_avx512vnni(w, t, x, r0, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::AvxVnni => unsafe { x86::group_avxvnni(w, t, x, r0, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::group_avx2(w, t, x, r0, y) },
            _ => portable_group(w, t, x, r0, y),
        }
    }
}

/// Runs `kernel(r0, rows)` for the activation rows in groups of at most `G` (`rows` the group's
/// outputs, `W` per row) and copies each row's first `cnt` outputs to `dst + row·stride`.
///
/// # Safety
/// `dst + row·stride .. + cnt` must be valid for writes for every activation row.
#[inline(always)]
unsafe fn by_row_groups<const W: usize, const G: usize>(
    rows: usize,
    buf: &mut [[f32; W]; G],
    dst: *mut f32,
    stride: usize,
    cnt: usize,
    mut kernel: impl FnMut(usize, &mut [[f32; W]]),
) {
    let mut r0 = 0;
    while r0 < rows {
        let g = (rows - r0).min(G);
        kernel(r0, &mut buf[..g]);
        for (r, yr) in buf[..g].iter().enumerate() {
            let to = dst.add((r0 + r) * stride);
            if cnt == W {
                // A whole tile (all but a matrix's last): a fixed-size copy, two or one vector
                // stores, where a `cnt`-long copy was a `memcpy` call per tile and row (~100k
                // calls a step at 8 decode rows of SmolLM2).
                // SAFETY: the caller guarantees row r0 + r's W outputs are writable.
                (to as *mut [f32; W]).write_unaligned(*yr);
            } else {
                // SAFETY: the caller guarantees row r0 + r's cnt outputs are writable.
                std::ptr::copy_nonoverlapping(yr.as_ptr(), to, cnt);
            }
        }
        r0 += g;
    }
}

/// The kernels' arithmetic written out one scalar at a time (the reference the SIMD kernels
/// equal bit for bit: `mul_add` is the same single-rounding FMA).
fn portable_group(w: &TiledWeights, t: usize, x: &Q8Rows, r0: usize, y: &mut [[f32; TILE]]) {
    let nb = x.cols / BLOCK;
    let rec = w.record_bytes();
    for (r, yr) in y.iter_mut().enumerate() {
        for (j, yv) in yr.iter_mut().enumerate() {
            let (mut acc, mut acc_m) = (0f32, 0f32);
            for b in 0..nb {
                let i = w.record(t, b);
                let wq = &w.data[i * rec..(i + 1) * rec];
                let (dw, mw) = w.scale_min(i, j);
                let xi = b * x.rows + r0 + r;
                let xq = &x.qs[xi * BLOCK..(xi + 1) * BLOCK];
                let mut isum = 0i32;
                for (pos, &xv) in xq.iter().enumerate() {
                    let wv = match w.format {
                        WeightFormat::Q4_1 => {
                            let (p, h, k) = (pos / 8, (pos / 4) % 2, pos % 4);
                            ((wq[p * 32 + 4 * j + k] >> (4 * h)) & 15) as i32
                        }
                        WeightFormat::Q8_0 => wq[(pos / 4) * 32 + 4 * j + pos % 4] as i8 as i32,
                    };
                    isum += wv * xv as i32;
                }
                acc = (isum as f32).mul_add(dw * x.d[xi], acc);
                if w.format == WeightFormat::Q4_1 {
                    acc_m = mw.mul_add(x.s[xi], acc_m);
                }
            }
            *yv = acc + acc_m;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q8Rows, TiledWeights, WeightFormat, BLOCK, TILE};
    use std::arch::x86_64::*;

    /// Integer sums of u8·i8 products, 4 adjacent bytes per 32-bit lane, accumulated.
    trait Dot4 {
        /// Whether `add_full` takes any u8 times any i8 exactly (`vpdpbusd` sums in i32; AVX2's
        /// `vpmaddubsw` saturates its i16 pairs, so it needs |w|·(x with w's sign) instead).
        const EXACT_U8: bool;
        /// The running sum's representation (AVX2: i16 pairs, exact while few enough are added).
        unsafe fn zero() -> __m256i;
        /// `acc + dot4(u, s)` where the partial sums of Q4_1 blocks fit the representation.
        unsafe fn add_small(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
        /// `acc + dot4(u, s)` for full-range bytes (Q8_0), `acc` as i32 lanes.
        unsafe fn add_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
        /// The small accumulator as i32 lanes.
        unsafe fn finish_small(acc: __m256i) -> __m256i;
    }

    /// AVX2: `vpmaddubsw` (u8·i8 pairs to i16) then `vpmaddwd` by 1 (pairs to i32). For Q4_1
    /// the i16 pairs of a whole block are added first: 16 products of |15·127| each, at most
    /// 30,480, fit an i16, so one `vpmaddwd` per block suffices.
    struct Maddubs;
    impl Dot4 for Maddubs {
        const EXACT_U8: bool = false;
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn add_small(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s))
        }
        #[inline(always)]
        unsafe fn add_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            // Two products of at most 128·127 each fit the i16 (32,512): no saturation.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
            _mm256_add_epi32(acc, p)
        }
        #[inline(always)]
        unsafe fn finish_small(acc: __m256i) -> __m256i {
            _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
        }
    }

    struct Dpbusd512;
    impl Dot4 for Dpbusd512 {
        const EXACT_U8: bool = true;
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn add_small(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, u, s)
        }
        #[inline(always)]
        unsafe fn add_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, u, s)
        }
        #[inline(always)]
        unsafe fn finish_small(acc: __m256i) -> __m256i {
            acc
        }
    }

    struct DpbusdAvx;
    impl Dot4 for DpbusdAvx {
        const EXACT_U8: bool = true;
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn add_small(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, u, s)
        }
        #[inline(always)]
        unsafe fn add_full(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, u, s)
        }
        #[inline(always)]
        unsafe fn finish_small(acc: __m256i) -> __m256i {
            acc
        }
    }

    type Out<'a> = &'a mut [[f32; TILE]];

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2(w: &TiledWeights, t: usize, x: &Q8Rows, r0: usize, y: Out) {
        group::<Maddubs>(w, t, x, r0, y)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn group_avx512vnni(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: Out,
    ) {
        group::<Dpbusd512>(w, t, x, r0, y)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn group_avxvnni(w: &TiledWeights, t: usize, x: &Q8Rows, r0: usize, y: Out) {
        group::<DpbusdAvx>(w, t, x, r0, y)
    }

    #[inline(always)]
    unsafe fn group<D: Dot4>(w: &TiledWeights, t: usize, x: &Q8Rows, r0: usize, y: Out) {
        match (w.format, y.len()) {
            (WeightFormat::Q4_1, 1) => q4_1::<D, 1>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 2) => q4_1::<D, 2>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 3) => q4_1::<D, 3>(w, t, x, r0, y),
            (WeightFormat::Q4_1, _) => q4_1::<D, 4>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 1) => q8_0::<D, 1>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 2) => q8_0::<D, 2>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 3) => q8_0::<D, 3>(w, t, x, r0, y),
            (WeightFormat::Q8_0, _) => q8_0::<D, 4>(w, t, x, r0, y),
        }
    }

    /// Activation bytes `4g..4g + 4` of block row `xi`, in every lane.
    #[inline(always)]
    unsafe fn broadcast4(x: &Q8Rows, xi: usize, g: usize) -> __m256i {
        let p = x.qs.as_ptr().add(xi * BLOCK + 4 * g) as *const i32;
        _mm256_set1_epi32(p.read_unaligned())
    }

    /// Bytes past the record a kernel is computing at which it asks for the weights to come
    /// ([`non_temporal_prefetch`]), when it computes 4 or more activation rows: 8 pair records
    /// of Q4_1.
    /// Decode streams every weight from memory once a token; with several activation rows a
    /// block's arithmetic keeps the core busy long enough that the hardware prefetcher alone
    /// fell behind. SmolLM2's 8-row products (`examples/profile_batch_step`, Zen4, 2 threads,
    /// fastest of 64): AVX-512 VNNI 5.5-5.6 -> 4.8-4.9 ms (3 of 3 rounds), AVX2 9.0-10.1 ->
    /// 8.1-9.2 ms (4 of 4). With one row the loads keep up on their own (AVX-512 the same,
    /// AVX2 slightly slower with the hints), so fewer than 4 rows issue none.
    const PREFETCH_AHEAD: usize = 2560;

    /// Whether [`prefetch_ahead`] asks non-temporally (`prefetchnta`) rather than `prefetcht0`:
    /// on AMD processors, unless `VVLM_WEIGHT_PREFETCH` says `t0` (or `nta` elsewhere). A step
    /// streams ~80 MB of weights not read again until the next step; as ordinary fills they
    /// would push the step's KV caches and activations out of the last-level cache (the likely
    /// reason it pays, not confirmed by counters: these VMs expose none). Zen4 (2 vCPU, 32 MiB
    /// L3), 8 sequences: `profile_batch_step` step p50 faster in 6 of 6 interleaved rounds
    /// (medians 11.7 -> 9.2 ms, a noisy hour); `benches/batch_ab.sh`, four runs, TPOT p50 at 8
    /// faster in 20 of 30 rounds, medians 9.59 -> 8.87, 9.36 -> 9.11, 9.48 -> 9.99 and 9.63 ->
    /// 9.25 ms (~3%, at this host's noise); one row (no hints) and prefill unchanged within
    /// noise. On an Intel Xeon (AVX-512) the same hint made the products 2.5x slower (there
    /// `prefetchnta` fills the first-level cache only, and the lines were gone before use), so
    /// Intel keeps `prefetcht0`.
    fn non_temporal_prefetch() -> bool {
        let amd = || crate::gemv::cpu_vendor() == *b"AuthenticAMD";
        static NTA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NTA.get_or_init(|| match std::env::var("VVLM_WEIGHT_PREFETCH").as_deref() {
            Ok("nta") => true,
            Ok("t0") => false,
            Ok(other) => {
                tracing::warn!(
                    "VVLM_WEIGHT_PREFETCH={other:?} is neither `t0` nor `nta`; using this \
                     processor's default"
                );
                amd()
            }
            Err(_) => amd(),
        })
    }

    /// Asks for the `bytes` of weights [`PREFETCH_AHEAD`] past `record` when the kernel computes
    /// `rows` >= 4 activation rows starting at row `r0` = 0 (a tile's later row groups, as in
    /// prefill, find its weights in cache: hints there cost prefill ~6%). A hint: addresses
    /// past the matrix are not read.
    #[inline(always)]
    unsafe fn prefetch_ahead(rows: usize, r0: usize, record: *const u8, bytes: usize) {
        if rows < 4 || r0 != 0 {
            return;
        }
        let ahead = record.wrapping_add(PREFETCH_AHEAD);
        if non_temporal_prefetch() {
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_NTA>(ahead.wrapping_add(line) as *const i8);
            }
        } else {
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
            }
        }
    }

    /// Tile `t` against activation rows `r0..r0 + R` (Q4_1): per block, the 8 rows' integer
    /// sums in 8 lanes; then one FMA by `d_w·d_x` and one by `m·(d_x·Σq)` per activation row.
    #[inline(always)]
    unsafe fn q4_1<D: Dot4, const R: usize>(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: Out,
    ) {
        let nb = x.cols / BLOCK;
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let i = w.record(t, b);
            let q = w.quants(i);
            prefetch_ahead(R, r0, q, w.record_bytes());
            let mut sums = [D::zero(); R];
            for p in 0..4 {
                let v = _mm256_loadu_si256(q.add(p * 32) as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (r, s) in sums.iter_mut().enumerate() {
                    let xi = b * x.rows + r0 + r;
                    *s = D::add_small(*s, lo, broadcast4(x, xi, 2 * p));
                    *s = D::add_small(*s, hi, broadcast4(x, xi, 2 * p + 1));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.scales(i) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(w.scales(i).add(16) as *const __m128i));
            for r in 0..R {
                let xi = b * x.rows + r0 + r;
                let f = _mm256_cvtepi32_ps(D::finish_small(sums[r]));
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xi)));
                acc[r] = _mm256_fmadd_ps(f, scale, acc[r]);
                acc_m[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*x.s.get_unchecked(xi)), acc_m[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(y[r].as_mut_ptr(), _mm256_add_ps(acc[r], acc_m[r]));
        }
    }

    /// [`q4_1`] / [`q8_0`] on tiles `t` and `t + 1` at once in 512-bit vectors (lanes 0..8 tile
    /// `t`'s rows, 8..16 tile `t + 1`'s): every lane's arithmetic is the 256-bit kernels' (the
    /// exact integer block sum, then the same f32 multiply and FMAs in the same order), so the
    /// outputs equal theirs bit for bit. `y[r]` receives both tiles' 16 outputs.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn pair_avx512vnni(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: &mut [[f32; 2 * TILE]],
    ) {
        match (w.format, y.len()) {
            (WeightFormat::Q4_1, 1) => pair_q4_1::<1>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 2) => pair_q4_1::<2>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 3) => pair_q4_1::<3>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 4) => pair_q4_1::<4>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 5) => pair_q4_1::<5>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 6) => pair_q4_1::<6>(w, t, x, r0, y),
            (WeightFormat::Q4_1, 7) => pair_q4_1::<7>(w, t, x, r0, y),
            (WeightFormat::Q4_1, _) => pair_q4_1::<8>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 1) => pair_q8_0::<1>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 2) => pair_q8_0::<2>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 3) => pair_q8_0::<3>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 4) => pair_q8_0::<4>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 5) => pair_q8_0::<5>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 6) => pair_q8_0::<6>(w, t, x, r0, y),
            (WeightFormat::Q8_0, 7) => pair_q8_0::<7>(w, t, x, r0, y),
            (WeightFormat::Q8_0, _) => pair_q8_0::<8>(w, t, x, r0, y),
        }
    }

    /// 32 bytes of tile `t`'s record and the same 32 of tile `t + 1`'s, as one vector.
    #[inline(always)]
    unsafe fn load_pair(a: *const u8, b: *const u8) -> __m512i {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)),
            _mm256_loadu_si256(b as *const __m256i),
        )
    }

    /// 8 f16 scales of each of two records, widened to 16 f32 lanes.
    #[inline(always)]
    unsafe fn scales_pair(a: *const u8, b: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)),
            _mm_loadu_si128(b as *const __m128i),
        ))
    }

    #[inline(always)]
    unsafe fn broadcast4_512(x: &Q8Rows, xi: usize, g: usize) -> __m512i {
        let p = x.qs.as_ptr().add(xi * BLOCK + 4 * g) as *const i32;
        _mm512_set1_epi32(p.read_unaligned())
    }

    #[inline(always)]
    unsafe fn pair_q4_1<const R: usize>(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: &mut [[f32; 2 * TILE]],
    ) {
        let nb = x.cols / BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let i0 = w.record(t, b);
            let i1 = i0 + 1;
            let (q0, q1) = (w.quants(i0), w.quants(i1));
            prefetch_ahead(R, r0, q0, 2 * w.record_bytes());
            let mut sums = [_mm512_setzero_si512(); R];
            for p in 0..4 {
                let v = load_pair(q0.add(p * 32), q1.add(p * 32));
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), low);
                for (r, s) in sums.iter_mut().enumerate() {
                    let xi = b * x.rows + r0 + r;
                    *s = _mm512_dpbusd_epi32(*s, lo, broadcast4_512(x, xi, 2 * p));
                    *s = _mm512_dpbusd_epi32(*s, hi, broadcast4_512(x, xi, 2 * p + 1));
                }
            }
            let dw = scales_pair(w.scales(i0), w.scales(i1));
            let mw = scales_pair(w.scales(i0).add(16), w.scales(i1).add(16));
            for r in 0..R {
                let xi = b * x.rows + r0 + r;
                let f = _mm512_cvtepi32_ps(sums[r]);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xi)));
                acc[r] = _mm512_fmadd_ps(f, scale, acc[r]);
                acc_m[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.s.get_unchecked(xi)), acc_m[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(y[r].as_mut_ptr(), _mm512_add_ps(acc[r], acc_m[r]));
        }
    }

    #[inline(always)]
    unsafe fn pair_q8_0<const R: usize>(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: &mut [[f32; 2 * TILE]],
    ) {
        let nb = x.cols / BLOCK;
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let i0 = w.record(t, b);
            let i1 = i0 + 1;
            let (q0, q1) = (w.quants(i0), w.quants(i1));
            prefetch_ahead(R, r0, q0, 2 * w.record_bytes());
            // Σ (w + 128)·x − 128·Σx, as the 256-bit VNNI kernel.
            let mut sums = [_mm512_setzero_si512(); R];
            for (r, s) in sums.iter_mut().enumerate() {
                *s = _mm512_set1_epi32(*x.offset.get_unchecked(b * x.rows + r0 + r));
            }
            for g in 0..8 {
                let u = _mm512_xor_si512(load_pair(q0.add(g * 32), q1.add(g * 32)), flip);
                for (r, s) in sums.iter_mut().enumerate() {
                    *s = _mm512_dpbusd_epi32(*s, u, broadcast4_512(x, b * x.rows + r0 + r, g));
                }
            }
            let dw = scales_pair(w.scales(i0), w.scales(i1));
            for r in 0..R {
                let xi = b * x.rows + r0 + r;
                let f = _mm512_cvtepi32_ps(sums[r]);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(xi)));
                acc[r] = _mm512_fmadd_ps(f, scale, acc[r]);
            }
        }
        for r in 0..R {
            // `+ 0` as the portable kernel's `acc + acc_m`.
            _mm512_storeu_ps(
                y[r].as_mut_ptr(),
                _mm512_add_ps(acc[r], _mm512_setzero_ps()),
            );
        }
    }

    /// As [`q4_1`] for Q8_0 (signed weights; with `vpdpbusd`, `(w + 128)·x` summed from
    /// `-128·Σx`, otherwise: `|w|` times `x` with `w`'s sign, in u8·i8 form).
    #[inline(always)]
    unsafe fn q8_0<D: Dot4, const R: usize>(
        w: &TiledWeights,
        t: usize,
        x: &Q8Rows,
        r0: usize,
        y: Out,
    ) {
        let nb = x.cols / BLOCK;
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let i = w.record(t, b);
            let q = w.quants(i);
            prefetch_ahead(R, r0, q, w.record_bytes());
            let mut sums = [_mm256_setzero_si256(); R];
            if D::EXACT_U8 {
                // Σ (w + 128)·x − 128·Σx: the weights as u8 by flipping their sign bit, the
                // correction as each sum's starting value; the same exact integer total.
                let flip = _mm256_set1_epi8(-128);
                for (r, s) in sums.iter_mut().enumerate() {
                    *s = _mm256_set1_epi32(*x.offset.get_unchecked(b * x.rows + r0 + r));
                }
                for g in 0..8 {
                    let v = _mm256_loadu_si256(q.add(g * 32) as *const __m256i);
                    let u = _mm256_xor_si256(v, flip);
                    for (r, s) in sums.iter_mut().enumerate() {
                        *s = D::add_full(*s, u, broadcast4(x, b * x.rows + r0 + r, g));
                    }
                }
            } else {
                for g in 0..8 {
                    let v = _mm256_loadu_si256(q.add(g * 32) as *const __m256i);
                    let abs = _mm256_sign_epi8(v, v);
                    for (r, s) in sums.iter_mut().enumerate() {
                        let xi = b * x.rows + r0 + r;
                        *s = D::add_full(*s, abs, _mm256_sign_epi8(broadcast4(x, xi, g), v));
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.scales(i) as *const __m128i));
            for r in 0..R {
                let xi = b * x.rows + r0 + r;
                let f = _mm256_cvtepi32_ps(sums[r]);
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xi)));
                acc[r] = _mm256_fmadd_ps(f, scale, acc[r]);
            }
        }
        for r in 0..R {
            // `+ 0` as the portable kernel's `acc + acc_m` (turns -0 into +0 the same way).
            _mm256_storeu_ps(
                y[r].as_mut_ptr(),
                _mm256_add_ps(acc[r], _mm256_setzero_ps()),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index arithmetic is the point of these checks
mod tests {
    use super::*;

    /// The process's kernels are the detected ones unless chosen first; choosing them again is
    /// accepted, another set afterwards or one this CPU cannot run is refused with the reason.
    #[test]
    fn kernels_once_fixed_stay_and_unrunnable_ones_are_refused() {
        let fixed = Isa::best();
        assert!(fixed.available());
        assert_eq!(fixed.choose(), Ok(()));
        for isa in [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni] {
            if isa == fixed {
                continue;
            }
            let err = isa.choose().unwrap_err();
            let why = if isa.available() {
                "already"
            } else {
                "cannot run"
            };
            assert!(err.contains(why), "{isa:?}: {err}");
        }
        assert_eq!(Isa::best(), fixed);
        // Each set's name is the setting that chooses it.
        for (isa, kernels) in [
            (Isa::Portable, crate::CpuKernels::Portable),
            (Isa::Avx2, crate::CpuKernels::Avx2),
            (Isa::AvxVnni, crate::CpuKernels::AvxVnni),
            (Isa::Avx512Vnni, crate::CpuKernels::Avx512Vnni),
        ] {
            assert_eq!(isa.name().parse::<crate::CpuKernels>(), Ok(kernels));
        }
    }

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
            // Scales are f16 in every GGUF block (and in the tiled layout).
            let f16 = |v: f32| half::f16::from_f32(v).to_f32();
            let d = f16(0.01 + v[k + b].abs() * 0.05);
            out.d.push(d);
            match format {
                WeightFormat::Q4_1 => {
                    let m = f16(-8.0 * d + v[k + nb + b] * 0.01);
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

    /// `n` rows of `k` weights (row `j` from seed `seed + j`), tiled, with each row's
    /// dequantized values.
    fn matrix(format: WeightFormat, n: usize, k: usize, seed: u64) -> (TiledWeights, Vec<Weights>) {
        let rows: Vec<Weights> = (0..n)
            .map(|j| weights(format, k, seed + j as u64))
            .collect();
        let cat = |f: fn(&Weights) -> &[u8]| rows.iter().flat_map(f).copied().collect::<Vec<u8>>();
        let qs = cat(|w| &w.qs);
        let d: Vec<f32> = rows.iter().flat_map(|w| w.d.iter().copied()).collect();
        let m: Vec<f32> = rows.iter().flat_map(|w| w.m.iter().copied()).collect();
        (TiledWeights::from_rows(format, n, k, &qs, &d, &m), rows)
    }

    /// The same matrix in the other record order than [`matrix`] gives on this CPU.
    fn other_order(w: &TiledWeights) -> TiledWeights {
        let order = match w.order() {
            TileOrder::Tiles => TileOrder::Pairs,
            TileOrder::Pairs => TileOrder::Tiles,
        };
        let rows: Vec<RowBlocks> = (0..w.rows).map(|r| w.row(r)).collect();
        let cat =
            |f: fn(&RowBlocks) -> &[u8]| rows.iter().flat_map(f).copied().collect::<Vec<u8>>();
        let d: Vec<f32> = rows.iter().flat_map(|r| r.d.iter().copied()).collect();
        let m: Vec<f32> = rows.iter().flat_map(|r| r.m.iter().copied()).collect();
        TiledWeights::from_rows_in(order, w.format, w.rows, w.cols, &cat(|r| &r.qs), &d, &m)
    }

    /// `x · Wᵀ` over every tile on one kernel, `[x.rows, w.rows]`.
    fn product(isa: Isa, w: &TiledWeights, x: &Q8Rows) -> Vec<f32> {
        let mut y = vec![0f32; x.rows * w.rows];
        Kernel::new(isa, w.format)
            .unwrap()
            .dot_tiles(w, 0..w.tiles(), x, &mut y);
        y
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

    /// The SIMD quantizer gives the scalar one's quants, scales and sums bit for bit, on
    /// blocks with ties (values at half steps), zeros, a single non-zero, negative extremes and
    /// ordinary values.
    #[test]
    fn simd_quantizer_equals_the_scalar_one() {
        // 20 blocks a row: a full group of 16 for the AVX-512 quantizer and a partial one.
        let (rows, cols) = (5, 20 * 32);
        let mut x = values(rows * cols, 12);
        x[32..64].fill(0.0);
        x[64..96].fill(0.0);
        x[70] = -3.0;
        for i in 0..32 {
            // amax 127 makes the step 1: every x.5 is a tie.
            x[96 + i] = i as f32 - 15.5;
        }
        x[96 + 31] = 127.0;
        x[128] = f32::MIN_POSITIVE;
        let nb = cols / BLOCK;
        let mut scalar = Q8Rows {
            rows,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; nb * rows + PAD],
            s: vec![0.0; nb * rows + PAD],
            offset: vec![0; nb * rows + PAD],
        };
        quantize_into(&x, rows, nb, &mut scalar);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let quantizers = Quantizer::all_available();
        assert_eq!(quantizers.last(), Some(&Quantizer::Portable));
        for quantizer in quantizers {
            // Fresh buffers, and buffers reused from a larger product (longer than needed, with
            // other values where this one's padding is).
            let mut fresh = Q8Rows::default();
            fresh.requantize_with(quantizer, &x, rows, cols);
            let mut reused = Q8Rows::default();
            let big = values((rows + 3) * (cols + 64), 5);
            reused.requantize_with(quantizer, &big, rows + 3, cols + 64);
            reused.requantize_with(quantizer, &x, rows, cols);
            for (simd, how) in [(&fresh, "fresh"), (&reused, "reused")] {
                let used = nb * rows + PAD;
                assert_eq!(simd.qs[..x.len()], scalar.qs, "{quantizer:?} {how}");
                assert_eq!(
                    bits(&simd.d[..used]),
                    bits(&scalar.d),
                    "{quantizer:?} {how}"
                );
                assert_eq!(
                    bits(&simd.s[..used]),
                    bits(&scalar.s),
                    "{quantizer:?} {how}"
                );
                assert_eq!(simd.offset[..used], scalar.offset, "{quantizer:?} {how}");
                // The ties went to even: -15.5 -> -16, -14.5 -> -14.
                assert_eq!(simd.quant(0, 96), -16);
                assert_eq!(simd.quant(0, 97), -14);
            }
        }
    }

    #[test]
    fn tiling_keeps_every_row_and_block() {
        // 11 rows: one full tile and a partial one (its padding rows must not show).
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let (tiled, rows) = matrix(format, 11, 96, 21);
            assert_eq!(tiled.tiles(), 2);
            for t in [&tiled, &other_order(&tiled)] {
                for (r, w) in rows.iter().enumerate() {
                    let back = t.row(r);
                    let o = t.order();
                    assert_eq!(back.qs, w.qs, "{format:?} {o:?} row {r} quants");
                    assert_eq!(back.d, w.d, "{format:?} {o:?} row {r} scales");
                    assert_eq!(back.m, w.m, "{format:?} {o:?} row {r} minimums");
                }
            }
        }
    }

    /// Against f64 sums of the dequantized weights times the dequantized activations: the
    /// kernels' only freedom is f32 summation order (relative error ~1e-6 of Σ|terms|).
    #[test]
    fn kernels_equal_the_dequantized_dot_product() {
        let (k, n, m) = (512, 11, 5);
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let (tiled, rows) = matrix(format, n, k, 11);
            let x = values(m * k, 7);
            let q = Q8Rows::quantize(&x, m, k);
            for isa in isas() {
                let y = product(isa, &tiled, &q);
                for r in 0..m {
                    for (j, w) in rows.iter().enumerate() {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for i in 0..k {
                            let xd = q.scale(r, i / 32) as f64 * q.quant(r, i) as f64;
                            want += w.w[i] as f64 * xd;
                            mag += (w.w[i] as f64 * xd).abs();
                        }
                        let got = y[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag,
                            "{format:?} {isa:?} x row {r}, w row {j}: {got} vs {want}"
                        );
                    }
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
            let (tiled, rows) = matrix(format, 1, k, 5);
            let w = &rows[0];
            let x = values(k, 9);
            let q = Q8Rows::quantize(&x, 1, k);
            let y = product(Isa::best(), &tiled, &q);
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
        let (k, n, m) = (224, 19, 7);
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let (tiled, _) = matrix(format, n, k, 2);
            let x = values(m * k, 4);
            let q = Q8Rows::quantize(&x, m, k);
            for isa in isas() {
                let all = product(isa, &tiled, &q);
                for r in 0..m {
                    // The row quantized alone, as a sequence decoding by itself has it.
                    let alone = Q8Rows::quantize(&x[r * k..(r + 1) * k], 1, k);
                    let one = product(isa, &tiled, &alone);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&all[r * n..(r + 1) * n]),
                        bits(&one),
                        "{format:?} {isa:?} {r}"
                    );
                }
                // A range of tiles gives those rows' outputs as the whole product does.
                let kernel = Kernel::new(isa, format).unwrap();
                let mut part = vec![0f32; m * (n - 8)];
                kernel.dot_tiles(&tiled, 1..3, &q, &mut part);
                for r in 0..m {
                    assert_eq!(
                        &part[r * (n - 8)..(r + 1) * (n - 8)],
                        &all[r * n + 8..(r + 1) * n]
                    );
                }
            }
        }
    }

    /// Every SIMD kernel does the portable kernel's arithmetic exactly (the integer sums are
    /// exact, the float steps the same FMAs in the same order): equal bit for bit.
    #[test]
    fn simd_kernels_equal_the_portable_one_bit_for_bit() {
        let (k, n) = (768, 13);
        // 6 rows: one group; 17: two full groups of 8 (AVX-512) or four of 4, and a last row.
        for (format, m) in [WeightFormat::Q4_1, WeightFormat::Q8_0]
            .into_iter()
            .flat_map(|f| [(f, 6), (f, 17)])
        {
            let (tiled, _) = matrix(format, n, k, 8);
            let x = values(m * k, 1);
            let q = Q8Rows::quantize(&x, m, k);
            let want = product(Isa::Portable, &tiled, &q);
            assert!(want.iter().any(|v| v.abs() > 0.1), "a non-trivial product");
            // Both record orders, whichever this CPU packs by default.
            let other = other_order(&tiled);
            assert_ne!(other.order(), tiled.order());
            for isa in isas() {
                for w in [&tiled, &other] {
                    let y = product(isa, w, &q);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&y),
                        bits(&want),
                        "{format:?}: {isa:?} on {:?} differs from portable",
                        w.order()
                    );
                }
            }
        }
    }

    /// Where the CPU has it, the fastest kernel is not the portable one (the dispatch works).
    #[test]
    fn dispatch_picks_simd_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            assert_ne!(Isa::best(), Isa::Portable);
        }
        assert!(Isa::all_available().contains(&Isa::best()));
    }
}
