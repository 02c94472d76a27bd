//! Quantized weight matrices for decode on the CPU: the GGUF file's own Q4_1 and Q8_0 blocks,
//! multiplied without dequantizing the matrix. Decode reads every weight once per token, so
//! reading 4.5-8.5 bits instead of 32 is what bounds its speed; the activations are quantized to
//! 8 bits per block and multiplied in integer arithmetic ([`crate::qdot`], as llama.cpp does), so
//! a batch of rows costs little more than one.
//!
//! The weights are exactly the file's (`d·q + m` for Q4_1, `d·q` for Q8_0), the same values the
//! f32 path dequantizes; results differ from it by the activations' rounding (bounded in
//! `qdot`'s tests) and summation order. The packed layout keeps the file's f16 scales beside
//! each block's quants (as many bytes as the file: decode reads them all every token);
//! [`QuantMatrix`] widens them to f32 for load-time reshaping. Prefill of more than a few rows
//! keeps the f32 matrices.
//!
//! [`QuantMatrix`] holds the file's rows as ggml lays them out, for load-time reshaping (head
//! permutation, q/k/v and gate/up concatenation); [`PackedMatrix`] is the same matrix in the
//! kernels' tiled layout, which a layer keeps (only one of the two is held per layer).

use crate::qdot;
use crate::EngineError;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, Layout, Result, Shape};
use half::f16;
use std::sync::Arc;

const BLOCK: usize = 32;

/// The block formats taken (the file's d and m are f16).
pub use crate::qdot::WeightFormat as QuantFormat;

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
        self.format.quant_bytes()
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

    /// The rows of a stacked pair of equal halves (gate over up) reordered tile by tile: the
    /// first half's rows `8j..8j+8`, then the second half's same rows, for every `j`, so one
    /// tile pair holds a gate tile and its up tile ([`PackedMatrix::gemv_swiglu`]). `None` when
    /// the halves are not whole tiles.
    pub fn halves_interleaved_by_tile(&self) -> Option<Self> {
        const TILE: usize = qdot::TILE;
        let half = self.rows / 2;
        if !self.rows.is_multiple_of(2) || half == 0 || !half.is_multiple_of(TILE) {
            return None;
        }
        let nb = self.cols / BLOCK;
        let (qb, per_row_m) = (
            nb * self.format.quant_bytes(),
            if self.m.is_empty() { 0 } else { nb },
        );
        let mut out = Self {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            qs: Vec::with_capacity(self.qs.len()),
            d: Vec::with_capacity(self.d.len()),
            m: Vec::with_capacity(self.m.len()),
        };
        for j in 0..half / TILE {
            for r in (j * TILE..(j + 1) * TILE).chain(half + j * TILE..half + (j + 1) * TILE) {
                out.qs.extend_from_slice(&self.qs[r * qb..(r + 1) * qb]);
                out.d.extend_from_slice(&self.d[r * nb..(r + 1) * nb]);
                out.m
                    .extend_from_slice(&self.m[r * per_row_m..(r + 1) * per_row_m]);
            }
        }
        Some(out)
    }

    /// The weights as f32 `[rows * cols]` (for tests and checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        dequantize_blocks(self.format, &self.qs, &self.d, &self.m, &mut w);
        w
    }

    /// The matrix in the decode kernels' tiled layout.
    pub fn packed(&self) -> PackedMatrix {
        self.packed_in(qdot::TileOrder::for_kernels(qdot::Isa::best()))
    }

    /// [`Self::packed`] with the records in `order` (for benchmarks of each kernel set in the
    /// order it walks).
    pub fn packed_in(&self, order: qdot::TileOrder) -> PackedMatrix {
        PackedMatrix(qdot::TiledWeights::from_rows_in(
            order,
            self.format,
            self.rows,
            self.cols,
            &self.qs,
            &self.d,
            &self.m,
        ))
    }
}

/// A [`QuantMatrix`] packed for the decode kernels ([`qdot::TiledWeights`]: rows interleaved
/// in tiles of 8): what a layer keeps and multiplies with. Load-time reshaping (row permutation,
/// concatenation) happens on [`QuantMatrix`] before packing.
#[derive(Debug, Clone)]
pub struct PackedMatrix(qdot::TiledWeights);

impl PackedMatrix {
    pub fn format(&self) -> QuantFormat {
        self.0.format
    }

    /// The kernels' tiled layout (for kernel benchmarks).
    pub fn tiled(&self) -> &qdot::TiledWeights {
        &self.0
    }

    pub fn rows(&self) -> usize {
        self.0.rows
    }

    pub fn cols(&self) -> usize {
        self.0.cols
    }

    /// Row `r` as f32, the values candle's dequantization gives (`d·q + m`, `d·q`): what an
    /// embedding lookup reads when the f32 table was dropped.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let row = self.0.row(r);
        let mut out = vec![0f32; self.0.cols];
        dequantize_blocks(self.0.format, &row.qs, &row.d, &row.m, &mut out);
        out
    }

    /// Back to ggml's row layout (for concatenation after packing, and checks).
    pub fn unpack(&self) -> QuantMatrix {
        let w = &self.0;
        let mut out = QuantMatrix {
            format: w.format,
            rows: w.rows,
            cols: w.cols,
            qs: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
        };
        for r in 0..w.rows {
            let row = w.row(r);
            out.qs.extend_from_slice(&row.qs);
            out.d.extend_from_slice(&row.d);
            out.m.extend_from_slice(&row.m);
        }
        out
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, parallel over tiles of W's rows: `x` is quantized to 8
    /// bits per 32-block once, then each tile's blocks are multiplied with every activation row
    /// in integer arithmetic ([`crate::qdot`]).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], m: usize) {
        self.gemv_with(qdot::Kernel::best(self.0.format), x, y, m)
    }

    /// [`Self::gemv`] on a given kernel (tests compare instruction sets).
    pub fn gemv_with(&self, kernel: qdot::Kernel, x: &[f32], y: &mut [f32], m: usize) {
        assert_eq!(y.len(), m * self.0.rows, "outputs are [m, rows]");
        // SAFETY: `y` holds the [m, rows] outputs, checked above.
        unsafe { self.gemv_raw(kernel, x, y.as_mut_ptr(), m, None) }
    }

    /// `residual + x · Wᵀ` (`residual` `[m, rows]`, or none) into a new `[m, rows]` buffer.
    /// The buffer is not zeroed first: every output is written once by the task that computes
    /// it, the residual added there (`y + r`, as a separate add computes it). At 8 decode rows
    /// of SmolLM2 the zeroing and the serial add were ~5 MB of stores a step on the driving
    /// thread alone.
    pub fn gemv_new(&self, x: &[f32], m: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let len = m * self.0.rows;
        if let Some(r) = residual {
            assert_eq!(r.len(), len, "the residual is [m, rows]");
        }
        let kernel = qdot::Kernel::best(self.0.format);
        // SAFETY: `gemv_raw` writes every output (every tile of every activation row).
        unsafe { written_by(len, |y| self.gemv_raw(kernel, x, y, m, residual)) }
    }

    /// The product into `y` (`[m, rows]`, written, never read), plus `residual` when given.
    ///
    /// # Safety
    /// `y .. y + m·rows` must be valid for writes and not accessed elsewhere during the call.
    unsafe fn gemv_raw(
        &self,
        kernel: qdot::Kernel,
        x: &[f32],
        y: *mut f32,
        m: usize,
        residual: Option<&[f32]>,
    ) {
        use rayon::prelude::*;
        let n = self.0.rows;
        let k = self.0.cols;
        assert_eq!(x.len(), m * k, "activations are [m, cols]");
        let out = Out(y);
        // Adds the residual to rows `rows` of columns `cols` (already written).
        let add = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            if let Some(res) = residual {
                for r in rows {
                    let dst = out;
                    // SAFETY: the caller's task wrote exactly these outputs and owns them.
                    let ys = unsafe {
                        std::slice::from_raw_parts_mut(dst.0.add(r * n + cols.start), cols.len())
                    };
                    for (y, &v) in ys
                        .iter_mut()
                        .zip(&res[r * n + cols.start..r * n + cols.end])
                    {
                        // `y + r` is `r + y` bit for bit (IEEE addition commutes).
                        *y += v;
                    }
                }
            }
        };
        if m > PREFILL_ROW_BLOCK {
            // Prefill-sized: parallel over blocks of activation rows, each quantized by its own
            // task (in parallel, and still in cache for the products) and multiplied with every
            // tile; a block's outputs are contiguous rows of `y`.
            (0..m.div_ceil(PREFILL_ROW_BLOCK))
                .into_par_iter()
                .for_each(|blk| {
                    let dst = out;
                    let r0 = blk * PREFILL_ROW_BLOCK;
                    let r1 = (r0 + PREFILL_ROW_BLOCK).min(m);
                    let xq = qdot::Q8Rows::quantize(&x[r0 * k..r1 * k], r1 - r0, k);
                    // SAFETY: rows r0..r1 of `y`, this task's alone.
                    unsafe {
                        kernel.dot_tiles_strided(
                            &self.0,
                            0..self.0.tiles(),
                            &xq,
                            dst.0.add(r0 * n),
                            n,
                        )
                    };
                    add(r0..r1, 0..n);
                });
            return;
        }
        let xq = QuantizedActivations::of(x, m, k);
        let xq = &*xq;
        // Chunks of tiles of output rows; each chunk's weights are read once for all
        // activation rows, and each chunk writes its column range of every row of `y` in
        // place. Each output's arithmetic is that of the row alone (`qdot`), so a batch's
        // outputs equal each sequence's own bit for bit.
        let tiles = self.0.tiles();
        let chunk_tiles = decode_chunk_tiles(tiles);
        let chunk = chunk_tiles * qdot::TILE;
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let dst = out;
            let t0 = c * chunk_tiles;
            let t1 = (t0 + chunk_tiles).min(tiles);
            // SAFETY: `y` is [m, n]; chunk c writes columns c·chunk.. of each row, up to n.
            unsafe { kernel.dot_tiles_strided(&self.0, t0..t1, xq, dst.0.add(c * chunk), n) };
            add(0..m, c * chunk..((c + 1) * chunk).min(n));
        });
    }
}

impl PackedMatrix {
    /// `y[m, rows/2] = silu(g) · u` of the product `x[m, cols] · Wᵀ`, for a matrix whose rows
    /// are gate and up interleaved tile by tile ([`QuantMatrix::halves_interleaved_by_tile`]):
    /// each task multiplies its tiles (a gate tile and its up tile side by side, one pair for
    /// the AVX-512 kernels) and applies SwiGLU to them while they are in its cache, so the
    /// product's `[m, rows]` is never written out and read back by another thread. Each output
    /// is bit for bit `swiglu` of [`Self::gemv`]'s on the same weights in gate-then-up order.
    pub fn gemv_swiglu(&self, x: &[f32], y: &mut [f32], m: usize) {
        self.gemv_swiglu_with(qdot::Kernel::best(self.0.format), x, y, m)
    }

    /// [`Self::gemv_swiglu`] on a given kernel (tests compare instruction sets).
    pub fn gemv_swiglu_with(&self, kernel: qdot::Kernel, x: &[f32], y: &mut [f32], m: usize) {
        assert_eq!(y.len(), m * (self.0.rows / 2), "outputs are [m, rows / 2]");
        // SAFETY: `y` holds the [m, rows / 2] outputs, checked above.
        unsafe { self.gemv_swiglu_raw(kernel, x, y.as_mut_ptr(), m) }
    }

    /// [`Self::gemv_swiglu`] into a new `[m, rows / 2]` buffer, not zeroed first (every output
    /// is written once, by the task that computes it).
    pub fn gemv_swiglu_new(&self, x: &[f32], m: usize) -> Vec<f32> {
        let len = m * (self.0.rows / 2);
        let kernel = qdot::Kernel::best(self.0.format);
        // SAFETY: `gemv_swiglu_raw` writes every output.
        unsafe { written_by(len, |y| self.gemv_swiglu_raw(kernel, x, y, m)) }
    }

    /// The fused product into `y` (`[m, rows / 2]`, written, never read).
    ///
    /// # Safety
    /// `y .. y + m·rows/2` must be valid for writes and not accessed elsewhere during the call.
    unsafe fn gemv_swiglu_raw(&self, kernel: qdot::Kernel, x: &[f32], y: *mut f32, m: usize) {
        use rayon::prelude::*;
        const TILE: usize = qdot::TILE;
        let (n, k) = (self.0.rows, self.0.cols);
        let half = n / 2;
        assert!(
            n.is_multiple_of(2 * TILE),
            "gate and up halves of whole tiles"
        );
        assert_eq!(x.len(), m * k, "activations are [m, cols]");
        let swiglu = crate::nn::swiglu_tile_pairs_kernel();
        let tiles = self.0.tiles();
        let out = Out(y);
        if m > PREFILL_ROW_BLOCK {
            // Prefill-sized: blocks of activation rows, every tile each, then SwiGLU.
            // (Each worker reuses one product buffer: a fresh one per block was ~5% of a
            // 512-token prefill in page faults.)
            (0..m.div_ceil(PREFILL_ROW_BLOCK))
                .into_par_iter()
                .for_each_init(Vec::new, |gu: &mut Vec<f32>, blk| {
                    let dst = out;
                    let r0 = blk * PREFILL_ROW_BLOCK;
                    let rows = (m - r0).min(PREFILL_ROW_BLOCK);
                    let xq = qdot::Q8Rows::quantize(&x[r0 * k..(r0 + rows) * k], rows, k);
                    gu.resize(rows * n, 0.0);
                    let gu = &mut gu[..rows * n];
                    kernel.dot_tiles(&self.0, 0..tiles, &xq, gu);
                    // SAFETY: rows r0.. of `y`, this task's alone; a row's products are
                    // [gate tile, up tile] pairs: SwiGLU of 8 from 16.
                    unsafe { swiglu(gu, n, rows, dst.0.add(r0 * half), half) };
                });
            return;
        }
        let xq = QuantizedActivations::of(x, m, k);
        let xq = &*xq;
        // As `gemv`'s chunks (an even number of tiles: whole gate/up pairs).
        let chunk_tiles = decode_chunk_tiles(tiles);
        (0..tiles.div_ceil(chunk_tiles))
            .into_par_iter()
            .for_each_init(Vec::new, |gu: &mut Vec<f32>, c| {
                let dst = out;
                let (t0, t1) = (c * chunk_tiles, ((c + 1) * chunk_tiles).min(tiles));
                let w = (t1 - t0) * TILE;
                gu.resize(m * w, 0.0);
                let gu = &mut gu[..m * w];
                kernel.dot_tiles(&self.0, t0..t1, xq, gu);
                // SAFETY: `y` is [m, half]; chunk c writes columns t0/2·8 .. + w/2 of each row.
                unsafe { swiglu(gu, w, m, dst.0.add(t0 / 2 * TILE), half) };
            });
    }
}

/// [`PackedMatrix::gemv_swiglu`] as an op: `[m, cols]` f32 activations to `[m, rows / 2]`.
pub struct QuantGemvSwiglu(pub Arc<PackedMatrix>);

impl candle_core::CustomOp1 for QuantGemvSwiglu {
    fn name(&self) -> &'static str {
        "quant-gemv-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = activations(s, l, self.0.cols(), "quant-gemv-swiglu")?;
        let half = self.0.rows() / 2;
        let y = self.0.gemv_swiglu_new(x, m);
        Ok((CpuStorage::F32(y), Shape::from((m, half))))
    }
}

/// Blocks in ggml's layout (`qs` of consecutive blocks, a scale `d` and for Q4_1 a minimum `m`
/// each) as f32 values, written into `out` (32 per block).
fn dequantize_blocks(format: QuantFormat, qs: &[u8], d: &[f32], m: &[f32], out: &mut [f32]) {
    let qb = format.quant_bytes();
    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
        let q = &qs[b * qb..(b + 1) * qb];
        match format {
            QuantFormat::Q4_1 => {
                for i in 0..16 {
                    out[i] = d[b] * (q[i] & 15) as f32 + m[b];
                    out[i + 16] = d[b] * (q[i] >> 4) as f32 + m[b];
                }
            }
            QuantFormat::Q8_0 => {
                for i in 0..32 {
                    out[i] = d[b] * (q[i] as i8) as f32;
                }
            }
        }
    }
}

thread_local! {
    /// The calling thread's buffers for a decode product's quantized activations, kept between
    /// products ([`QuantizedActivations`]).
    static ACTIVATION_BUFFERS: std::cell::Cell<Option<qdot::Q8Rows>> =
        const { std::cell::Cell::new(None) };
}

/// A decode product's activations quantized into the calling thread's kept buffers (taken for
/// the product and put back when dropped; a product that starts while this thread's buffers
/// are out, one run by this thread while it waits inside another, gets fresh ones).
struct QuantizedActivations(Option<qdot::Q8Rows>);

impl QuantizedActivations {
    fn of(x: &[f32], rows: usize, cols: usize) -> Self {
        let mut q = ACTIVATION_BUFFERS.with(|b| b.take()).unwrap_or_default();
        q.requantize(x, rows, cols);
        Self(Some(q))
    }
}

impl std::ops::Deref for QuantizedActivations {
    type Target = qdot::Q8Rows;
    fn deref(&self) -> &qdot::Q8Rows {
        self.0.as_ref().expect("held until dropped")
    }
}

impl Drop for QuantizedActivations {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            ACTIVATION_BUFFERS.with(|b| b.set(Some(q)));
        }
    }
}

/// Tiles per task of a decode-sized product: large enough to amortise scheduling, small enough
/// to balance the threads (8 tasks a thread); an even number, since the tiles are stored in
/// pairs (one stream) and a pair is never split between two threads.
fn decode_chunk_tiles(tiles: usize) -> usize {
    (tiles / (rayon::current_num_threads() * 8)).clamp(2, 128) / 2 * 2
}

/// A new buffer of `len` values filled by `write` (given its start), not zeroed first.
///
/// # Safety
/// `write` must write all `len` values before it returns, and nothing else.
unsafe fn written_by(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut y = Vec::<f32>::with_capacity(len);
    write(y.as_mut_ptr());
    // SAFETY: all `len` values were written (the caller's guarantee).
    unsafe { y.set_len(len) };
    y
}

/// An output buffer shared by a product's tasks, each writing its own column range of every
/// row.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks write disjoint column ranges of the buffer, which outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// The f32 activations `[m, cols]` a product op was given (CPU, contiguous, `cols` columns);
/// `op` names it in errors.
fn activations<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    cols: usize,
    op: &str,
) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("{op} expects f32 activations");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} expects contiguous activations");
    };
    let (m, k) = l.shape().dims2()?;
    if k != cols {
        candle_core::bail!("{op}: x has {k} columns, W has {cols}");
    }
    Ok((&x[a..b], m))
}

/// Activation rows per task for products of more rows than this (prefill): 64 rows of the
/// widest SmolLM2/Llama input (8192 columns) quantize to 512 KiB, an L2's worth.
const PREFILL_ROW_BLOCK: usize = 64;

/// `x [m, cols] · Wᵀ` for a quantized `W` as a candle op on `x` (CPU, f32, contiguous).
pub struct QuantGemv(pub Arc<PackedMatrix>);

impl candle_core::CustomOp1 for QuantGemv {
    fn name(&self) -> &'static str {
        "quant-gemv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = activations(s, l, self.0.cols(), "quant-gemv")?;
        let y = self.0.gemv_new(x, m, None);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.rows()))))
    }
}

/// `residual + x [m, cols] · Wᵀ` for a quantized `W` as a candle op on `(x, residual)` (CPU,
/// f32, contiguous; `residual` `[m, rows]`): [`QuantGemv`], then each output added to its
/// residual in the same op (`residual + y`, as the separate add computes it).
pub struct QuantGemvAdd(pub Arc<PackedMatrix>);

impl candle_core::CustomOp2 for QuantGemvAdd {
    fn name(&self) -> &'static str {
        "quant-gemv-add"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = activations(s, l, self.0.cols(), "quant-gemv-add")?;
        let n = self.0.rows();
        let (CpuStorage::F32(r), Some((a, b))) = (rs, rl.contiguous_offsets()) else {
            candle_core::bail!("quant-gemv-add expects a contiguous f32 residual");
        };
        if rl.dims() != [m, n] {
            candle_core::bail!("quant-gemv-add: residual {:?} for [{m}, {n}]", rl.dims());
        }
        let y = self.0.gemv_new(x, m, Some(&r[a..b]));
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
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
                .unwrap()
                .packed();
            // 7 rows: a decode batch (tiles in parallel); 150: a prefill (blocks of 64 rows in
            // parallel, the last one partial).
            for m in [7, 150] {
                let x: Vec<f32> = (0..m * 256)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let mut all = vec![0f32; m * 70];
                qm.gemv(&x, &mut all, m);
                for r in 0..m {
                    let mut one = vec![0f32; 70];
                    qm.gemv(&x[r * 256..(r + 1) * 256], &mut one, 1);
                    assert_eq!(
                        &all[r * 70..(r + 1) * 70],
                        &one[..],
                        "{dtype:?} {m} rows, row {r}"
                    );
                }
            }
        }
    }

    /// The products into new, unzeroed buffers (what the ops use) equal the products into
    /// zeroed ones, and with a residual the product then the add, bit for bit: one row, a
    /// decode batch (tiles in parallel, the residual added by each tile chunk's task) and a
    /// prefill (row blocks, the last partial); the SwiGLU product likewise.
    #[test]
    fn unzeroed_outputs_with_their_residual_equal_the_product_then_the_add() {
        let dev = Device::Cpu;
        let (n, k) = (80, 256);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let qm = QuantMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let (plain, fused) = (
                qm.packed(),
                qm.halves_interleaved_by_tile().unwrap().packed(),
            );
            for m in [1usize, 7, 150] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let residual: Vec<f32> =
                    (0..m * n).map(|i| ((i * 13) % 29) as f32 - 14.5).collect();
                let mut y = vec![0f32; m * n];
                plain.gemv(&x, &mut y, m);
                assert_eq!(plain.gemv_new(&x, m, None), y, "{dtype:?} {m} rows");
                let added: Vec<f32> = residual.iter().zip(&y).map(|(r, y)| r + y).collect();
                assert_eq!(
                    plain.gemv_new(&x, m, Some(&residual)),
                    added,
                    "{dtype:?} {m} rows, with the residual"
                );
                let mut swiglu = vec![0f32; m * n / 2];
                fused.gemv_swiglu(&x, &mut swiglu, m);
                assert_eq!(
                    fused.gemv_swiglu_new(&x, m),
                    swiglu,
                    "{dtype:?} {m} rows, SwiGLU"
                );
            }
        }
    }

    /// The gate/up product with SwiGLU in its tasks, on every kernel set this CPU runs, equals
    /// SwiGLU (the engine's op) of the plain product of the same weights in gate-then-up order,
    /// bit for bit: one row, a decode batch (tiles in parallel) and a prefill (row blocks, the
    /// last partial); its interleaved rows are the halves' rows tile by tile; halves of part
    /// tiles are refused.
    #[test]
    fn the_swiglu_product_equals_swiglu_of_the_product() {
        let dev = Device::Cpu;
        let (half, cols) = (40, 128);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (2 * half, cols), &dev).unwrap();
            let qm = QuantMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let inter = qm.halves_interleaved_by_tile().unwrap();
            let (a, b) = (qm.dequantize(), inter.dequantize());
            for j in 0..half / 8 {
                for i in 0..8 {
                    let row = |m: &[f32], r: usize| m[r * cols..(r + 1) * cols].to_vec();
                    assert_eq!(
                        row(&b, 16 * j + i),
                        row(&a, 8 * j + i),
                        "gate row {}",
                        8 * j + i
                    );
                    assert_eq!(row(&b, 16 * j + 8 + i), row(&a, half + 8 * j + i));
                }
            }
            let (plain, fused) = (qm.packed(), inter.packed());
            for isa in [
                qdot::Isa::Portable,
                qdot::Isa::Avx2,
                qdot::Isa::AvxVnni,
                qdot::Isa::Avx512Vnni,
            ] {
                let Some(kernel) = qdot::Kernel::new(isa, qm.format) else {
                    continue;
                };
                for m in [1usize, 7, 150] {
                    let x: Vec<f32> = (0..m * cols)
                        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                        .collect();
                    let mut gu = vec![0f32; m * 2 * half];
                    plain.gemv_with(kernel, &x, &mut gu, m);
                    let want = crate::nn::swiglu_fused(
                        &Tensor::from_vec(gu, (m, 2 * half), &dev).unwrap(),
                    )
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                    let mut got = vec![0f32; m * half];
                    fused.gemv_swiglu_with(kernel, &x, &mut got, m);
                    let first_difference = got.iter().zip(&want).position(|(a, b)| a != b);
                    assert_eq!(first_difference, None, "{dtype:?} {isa:?} {m} rows");
                }
            }
        }
        let w = Tensor::randn(0f32, 1.0, (2 * 12, 64), &dev).unwrap();
        let qm = QuantMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap())
            .unwrap()
            .unwrap();
        assert!(
            qm.halves_interleaved_by_tile().is_none(),
            "halves of 12 rows"
        );
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
        // The product equals x' · dequantized(W)ᵀ, x' the activations as their 8-bit blocks
        // stand for them (the quantizer is checked in `qdot`), to f32 summation order.
        for m in [1, 3, 9] {
            let x = Tensor::randn(0f32, 1.0, (m, 256), &dev).unwrap();
            let got = x
                .apply_op1_no_bwd(&QuantGemv(Arc::new(qm.packed())))
                .unwrap();
            let xq = qdot::Q8Rows::quantize(&x.flatten_all().unwrap().to_vec1().unwrap(), m, 256);
            let xd: Vec<f32> = (0..m).flat_map(|r| xq.dequantize_row(r)).collect();
            let xd = Tensor::from_vec(xd, (m, 256), &dev).unwrap();
            let want = xd.matmul(&deq.t().unwrap()).unwrap();
            let e = crate::nn::max_abs_diff(&got, &want).unwrap();
            assert!(e < 1e-3, "{format:?} m={m}: {e}");
            // And within a few percent of the unquantized activations' product.
            let exact = x.matmul(&deq.t().unwrap()).unwrap();
            let rel = crate::nn::max_abs_diff(&got, &exact).unwrap()
                / exact
                    .abs()
                    .unwrap()
                    .max_keepdim(1)
                    .unwrap()
                    .max_keepdim(0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[0];
            assert!(rel < 0.02, "{format:?} m={m}: relative error {rel}");
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
        // Packing for the kernels and unpacking keep every block.
        let back = c.packed().unpack();
        assert_eq!((back.rows, back.cols, back.format), (140, 256, format));
        assert_eq!(back.dequantize(), c.dequantize());
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
