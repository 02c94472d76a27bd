//! Building blocks that count their FLOPs: linear layers, attention products, and taps that
//! record intermediates for parity checks.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use vvlm_cost::{Component, FlopCounter};

/// Everything a forward pass needs besides its input: where FLOPs go and what to record.
pub struct Ctx<'a> {
    pub flops: &'a FlopCounter,
    pub component: Component,
    pub taps: Option<&'a mut BTreeMap<String, Tensor>>,
    /// Set by the caller to stop the request: checked before every transformer layer.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

/// The message of the error a cancelled forward pass returns.
pub const CANCELLED: &str = "the request was cancelled";

impl<'a> Ctx<'a> {
    pub fn new(flops: &'a FlopCounter, component: Component) -> Self {
        Self {
            flops,
            component,
            taps: None,
            cancel: None,
        }
    }

    /// The same context, stopped by `cancel`.
    pub fn with_cancel(mut self, cancel: Option<&'a std::sync::atomic::AtomicBool>) -> Self {
        self.cancel = cancel;
        self
    }

    /// An error when the request was cancelled (between layers: stages stop within a layer).
    pub fn check_cancel(&self) -> candle_core::Result<()> {
        match self.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(candle_core::Error::Msg(CANCELLED.into()))
            }
            _ => Ok(()),
        }
    }

    pub fn with_taps(
        flops: &'a FlopCounter,
        component: Component,
        taps: &'a mut BTreeMap<String, Tensor>,
    ) -> Self {
        Self {
            flops,
            component,
            taps: Some(taps),
            cancel: None,
        }
    }

    /// Records an intermediate under `name` when taps are on.
    pub fn tap(&mut self, name: impl FnOnce() -> String, t: &Tensor) {
        if let Some(taps) = self.taps.as_deref_mut() {
            // Views (narrowed fused outputs) are stored as plain tensors.
            taps.insert(name(), t.contiguous().unwrap_or_else(|_| t.clone()));
        }
    }

    pub fn tapping(&self) -> bool {
        self.taps.is_some()
    }

    /// Counts a batched `[.., m, k] x [.., k, n]` product.
    pub fn count_matmul(&self, batch: usize, m: usize, k: usize, n: usize) {
        self.flops
            .add(self.component, 2 * (batch * m) as u64 * k as u64 * n as u64);
    }

    /// `a.matmul(b)` for `[.., m, k] x [.., k, n]`, counted.
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = a.dims();
        let (m, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let n = b.dim(D::Minus1)?;
        let batch: usize = dims[..dims.len() - 2].iter().product();
        self.count_matmul(batch, m, k, n);
        a.matmul(b)
    }
}

/// Largest absolute element-wise difference of two same-shaped tensors (any device and dtype,
/// compared in f32 on the host): what parity checks measure.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "max_abs_diff: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        );
    }
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    (host(a)? - host(b)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// A linear layer `y = x W^T + b` with `W: [out, in]`, addressed by checkpoint names.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as checkpoints store it (the gemm reads it transposed in place; measured
    /// faster than a transposed copy for both prefill and single-token decode). `None` once
    /// [`Self::keep_only_quantized`] dropped it.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    /// The same weights quantized (from GGUF), used for decode-shaped products on the CPU.
    quant: Option<std::sync::Arc<crate::quant::PackedMatrix>>,
    /// `quant`'s rows are gate and up interleaved tile by tile ([`Self::interleave_for_swiglu`]):
    /// the SwiGLU products read it as it is; a plain product puts its outputs back in order.
    quant_swiglu: bool,
}

/// The rows of `x` `[.., cols]`: the product of every dimension but the last.
fn leading_rows(x: &Tensor) -> usize {
    let dims = x.dims();
    dims[..dims.len().saturating_sub(1)].iter().product()
}

/// What a layer without its f32 weights says when asked to run where only they can.
const QUANTIZED_ONLY: &str =
    "this layer keeps only its quantized weights (quantized_prefill), which run on the CPU in f32";

impl Linear {
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = vb.get((out_features, in_features), "weight")?;
        let b = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Self::from_weights(w, b)
    }

    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Some(weight.contiguous()?),
            bias,
            in_features,
            out_features,
            quant: None,
            quant_swiglu: false,
        })
    }

    /// A layer holding only quantized weights (a GGUF file's blocks, no f32 copy): every
    /// product runs on the CPU's integer kernels, in f32 activations.
    pub fn from_quantized(q: crate::quant::QuantMatrix, bias: Option<Tensor>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.dims1()? != q.rows {
                candle_core::bail!("bias of {} for {} outputs", b.dims1()?, q.rows);
            }
        }
        Ok(Self {
            weight: None,
            bias,
            in_features: q.cols,
            out_features: q.rows,
            quant: Some(std::sync::Arc::new(q.packed())),
            quant_swiglu: false,
        })
    }

    /// A bias-free layer over an already packed quantized matrix (shared, e.g. a tied head).
    pub fn from_packed(q: std::sync::Arc<crate::quant::PackedMatrix>) -> Self {
        Self {
            weight: None,
            bias: None,
            in_features: q.cols(),
            out_features: q.rows(),
            quant: Some(q),
            quant_swiglu: false,
        }
    }

    /// Attaches the quantized form of this layer's weights (same shape), used for products of at
    /// most [`crate::gemv::MAX_ROWS`] rows on the CPU in f32.
    pub fn set_quantized(&mut self, q: crate::quant::QuantMatrix) -> Result<()> {
        if (q.rows, q.cols) != (self.out_features, self.in_features) {
            candle_core::bail!(
                "quantized weights are [{}, {}], the layer is [{}, {}]",
                q.rows,
                q.cols,
                self.out_features,
                self.in_features
            );
        }
        self.quant = Some(std::sync::Arc::new(q.packed()));
        self.quant_swiglu = false;
        Ok(())
    }

    /// For a gate/up layer (gate rows over up rows, no bias) with quantized weights: reorders
    /// them tile by tile ([`crate::quant::QuantMatrix::halves_interleaved_by_tile`]) so that
    /// [`Self::forward_swiglu`] computes `silu(gate)·up` inside the product's parallel tasks on
    /// the CPU ([`crate::quant::PackedMatrix::gemv_swiglu`]). Returns whether it applies (not
    /// without quantized weights, with a bias, or halves of part tiles); a plain product still
    /// answers in gate-then-up order.
    pub fn interleave_for_swiglu(&mut self) -> bool {
        if self.quant_swiglu {
            return true;
        }
        let Some(q) = &self.quant else {
            return false;
        };
        if self.bias.is_some() {
            return false;
        }
        match q.unpack().halves_interleaved_by_tile() {
            Some(inter) => {
                self.quant = Some(std::sync::Arc::new(inter.packed()));
                self.quant_swiglu = true;
                true
            }
            None => false,
        }
    }

    pub fn quantized(&self) -> Option<&crate::quant::PackedMatrix> {
        self.quant.as_deref()
    }

    /// The quantized matrix, shared (a tied embedding reads the head's).
    pub fn quantized_shared(&self) -> Option<std::sync::Arc<crate::quant::PackedMatrix>> {
        self.quant.clone()
    }

    /// Products of every shape (prefill too) from the quantized weights, and the f32 copy
    /// dropped (its memory is freed once nothing else holds it). No-op without quantized
    /// weights. Returns the f32 bytes this layer no longer holds.
    pub fn keep_only_quantized(&mut self) -> usize {
        if self.quant.is_none() {
            return 0;
        }
        self.weight
            .take()
            .map_or(0, |w| w.elem_count() * w.dtype().size_in_bytes())
    }

    /// One layer computing several that read the same input (q/k/v, gate/up): their weights
    /// stacked along the output dimension, so one product (one pass over the input, one
    /// dispatch) replaces several. Outputs are the parts' outputs side by side, in order.
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let weights = parts
            .iter()
            .map(|l| l.weight.as_ref())
            .collect::<Option<Vec<&Tensor>>>()
            .ok_or_else(|| candle_core::Error::Msg(QUANTIZED_ONLY.into()))?;
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if parts.iter().any(|l| l.bias.is_some()) {
            let biases = parts
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.out_features, weights[0].dtype(), weights[0].device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        let mut out = Self::from_weights(weight, bias)?;
        let quants: Option<Vec<crate::quant::QuantMatrix>> = parts
            .iter()
            // (A layer interleaved for SwiGLU holds its rows in another order: not stacked.)
            .map(|l| {
                l.quant
                    .as_deref()
                    .filter(|_| !l.quant_swiglu)
                    .map(|q| q.unpack())
            })
            .collect();
        let quants: Option<Vec<&crate::quant::QuantMatrix>> =
            quants.as_ref().map(|q| q.iter().collect());
        if let Some(q) = quants.and_then(|q| crate::quant::QuantMatrix::concat_rows(&q)) {
            out.quant = Some(std::sync::Arc::new(q.packed()));
        }
        Ok(out)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.count(x, ctx);
        self.compute(x, crate::gemv::MAX_ROWS, true)
    }

    /// [`Self::forward`] over rows that belong to different requests: row `i` is counted in
    /// `ctxs[i]` (each row costs the same), so batched requests are charged what they ran.
    pub fn forward_rows(&self, x: &Tensor, ctxs: &[Ctx]) -> Result<Tensor> {
        self.count_rows(x, ctxs)?;
        // The row-wise kernels for a whole decode batch: each weight row is read once for all
        // the batch's rows, and each output is the same dot product as for a sequence alone.
        self.compute(x, crate::gemv::MAX_BATCH_ROWS, true)
    }

    /// `residual + x·Wᵀ` over rows of different requests (counted as [`Self::forward_rows`]):
    /// on the CPU from quantized weights, the add in the product's op (one op instead of two a
    /// residual; a decode step has two a layer); elsewhere the product, then the add. The same
    /// values either way, bit for bit (`residual + y`, one f32 add each).
    pub fn forward_rows_add(&self, x: &Tensor, residual: &Tensor, ctxs: &[Ctx]) -> Result<Tensor> {
        let rows = leading_rows(x);
        let fused = x.device().is_cpu()
            && x.dtype() == DType::F32
            && residual.dtype() == DType::F32
            && self.bias.is_none()
            && !self.quant_swiglu
            && rows <= crate::gemv::MAX_BATCH_ROWS
            && residual.elem_count() == rows * self.out_features;
        match &self.quant {
            Some(q) if fused => {
                self.count_rows(x, ctxs)?;
                let y = crate::profile::time(crate::profile::Section::Matmul, x.device(), || {
                    x.reshape((rows, self.in_features))?
                        .contiguous()?
                        .apply_op2_no_bwd(
                            &residual.reshape((rows, self.out_features))?.contiguous()?,
                            &crate::quant::QuantGemvAdd(q.clone()),
                        )
                })?;
                y.reshape(residual.shape())
            }
            _ => residual + self.forward_rows(x, ctxs)?,
        }
    }

    /// Counts the product of all of `x`'s rows in `ctx`.
    fn count(&self, x: &Tensor, ctx: &Ctx) {
        ctx.count_matmul(1, leading_rows(x), self.in_features, self.out_features);
    }

    /// Counts row `i` of `x` in `ctxs[i]` (one request each).
    fn count_rows(&self, x: &Tensor, ctxs: &[Ctx]) -> Result<()> {
        let rows = leading_rows(x);
        if rows != ctxs.len() {
            candle_core::bail!("forward_rows: {rows} rows for {} requests", ctxs.len());
        }
        for c in ctxs {
            c.count_matmul(1, 1, self.in_features, self.out_features);
        }
        Ok(())
    }

    /// `silu(gate)·up` of a gate/up layer's output `[.., 2i]` (gate then up), counted as
    /// [`Self::forward`]: from the interleaved quantized weights in one op on the CPU
    /// ([`Self::interleave_for_swiglu`]), else the product then [`swiglu_fused`]. The same
    /// values either way, bit for bit.
    pub fn forward_swiglu(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.count(x, ctx);
        self.compute_swiglu(x, crate::gemv::MAX_ROWS)
    }

    /// [`Self::forward_swiglu`] over rows that belong to different requests (counted as
    /// [`Self::forward_rows`]).
    pub fn forward_rows_swiglu(&self, x: &Tensor, ctxs: &[Ctx]) -> Result<Tensor> {
        self.count_rows(x, ctxs)?;
        self.compute_swiglu(x, crate::gemv::MAX_BATCH_ROWS)
    }

    fn compute_swiglu(&self, x: &Tensor, gemv_rows: usize) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = leading_rows(x);
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        match &self.quant {
            Some(q)
                if self.quant_swiglu && cpu_f32 && (rows <= gemv_rows || self.weight.is_none()) =>
            {
                let y = crate::profile::time(crate::profile::Section::Matmul, x.device(), || {
                    x.reshape((rows, self.in_features))?
                        .contiguous()?
                        .apply_op1_no_bwd(&crate::quant::QuantGemvSwiglu(q.clone()))
                })?;
                let mut out_dims = dims;
                *out_dims.last_mut().unwrap() = self.out_features / 2;
                y.reshape(out_dims)
            }
            _ => swiglu_fused(&self.compute(x, gemv_rows, true)?),
        }
    }

    /// `gelu_tanh(x·Wᵀ + b)` (counted as [`Self::forward`]): on CUDA, with a bias, the bias
    /// and the activation in one pass over the output ([`BiasGeluTanh`]); elsewhere the
    /// product, then [`gelu_tanh`].
    pub fn forward_gelu_tanh(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match &self.bias {
            Some(b) if crate::fused_on(x.device()) => {
                let y = self.product_without_bias(x, ctx)?;
                crate::profile::time(crate::profile::Section::Activation, x.device(), || {
                    y.apply_op2_no_bwd(b, &BiasGeluTanh)
                })
            }
            _ => gelu_tanh(&self.forward(x, ctx)?),
        }
    }

    /// `residual + (x·Wᵀ + b)` (counted as [`Self::forward`]): on CUDA, with a bias, the bias
    /// and the residual in one pass over the output ([`BiasResidual`]); elsewhere the product,
    /// then the add.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match &self.bias {
            Some(b) if crate::fused_on(x.device()) => {
                let y = self.product_without_bias(x, ctx)?;
                y.apply_op3_no_bwd(b, &residual.contiguous()?, &BiasResidual)
            }
            _ => residual + self.forward(x, ctx)?,
        }
    }

    /// `x·Wᵀ` without the bias (a full matmul; counted as [`Self::forward`]).
    fn product_without_bias(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.count(x, ctx);
        self.compute(x, crate::gemv::MAX_ROWS, false)
    }

    /// `x·Wᵀ`, plus the bias when `add_bias`.
    fn compute(&self, x: &Tensor, gemv_rows: usize, add_bias: bool) -> Result<Tensor> {
        crate::profile::time(crate::profile::Section::Matmul, x.device(), || {
            self.compute_untimed(x, gemv_rows, add_bias)
        })
    }

    fn compute_untimed(&self, x: &Tensor, gemv_rows: usize, add_bias: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = leading_rows(x);
        let x2 = x.reshape((rows, self.in_features))?;
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        let mut y = match (&self.quant, &self.weight) {
            (Some(q), w) if cpu_f32 && (rows <= gemv_rows || w.is_none()) => {
                let y = x2
                    .contiguous()?
                    .apply_op1_no_bwd(&crate::quant::QuantGemv(q.clone()))?;
                if self.quant_swiglu {
                    // Rows interleaved by tile for SwiGLU: the outputs back in gate-then-up
                    // order (a tapped forward wants the two halves themselves).
                    let tile = crate::qdot::TILE;
                    y.reshape((rows, self.out_features / (2 * tile), 2, tile))?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((rows, self.out_features))?
                } else {
                    y
                }
            }
            (_, Some(w)) if cpu_f32 && rows <= gemv_rows => {
                x2.contiguous()?.apply_op2_no_bwd(w, &crate::gemv::Gemv)?
            }
            (_, Some(w)) => x2.matmul(&w.t()?)?,
            (_, None) => candle_core::bail!("{QUANTIZED_ONLY}"),
        };
        if let (true, Some(b)) = (add_bias, &self.bias) {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features;
        y.reshape(out_dims)
    }
}

/// `gelu_tanh(y + bias)` over `y` `[.., cols]` and `bias` `[cols]` in one pass, in f32
/// arithmetic rounded once (the composition rounds `y + bias` first). On CUDA
/// `kernels/epilogue.cu`; `cpu_fwd` is its reference.
pub struct BiasGeluTanh;

/// `residual + (y + bias)` over `y`, `residual` `[.., cols]` and `bias` `[cols]` in one pass,
/// in f32 arithmetic rounded once. On CUDA `kernels/epilogue.cu`; `cpu_fwd` is its reference.
pub struct BiasResidual;

/// transformers' `gelu_pytorch_tanh` in f32.
fn gelu_tanh_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
}

/// A contiguous f32/bf16/f16 CPU tensor's values as f32 (what the CPU references of the CUDA
/// kernels compute in); `op` names the caller in errors.
pub(crate) fn cpu_values_f32(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> Result<Vec<f32>> {
    use candle_core::CpuStorage as S;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} expects contiguous inputs");
    };
    Ok(match s {
        S::F32(x) => x[a..b].to_vec(),
        S::BF16(x) => x[a..b].iter().map(|v| v.to_f32()).collect(),
        S::F16(x) => x[a..b].iter().map(|v| v.to_f32()).collect(),
        _ => candle_core::bail!("{op}: f32, bf16 or f16"),
    })
}

/// f32 values as a CPU storage of `like`'s dtype (f32, bf16 or f16), rounded once.
pub(crate) fn cpu_storage_like(
    like: &candle_core::CpuStorage,
    v: Vec<f32>,
) -> candle_core::CpuStorage {
    use candle_core::CpuStorage as S;
    match like {
        S::BF16(_) => S::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        S::F16(_) => S::F16(v.into_iter().map(half::f16::from_f32).collect()),
        _ => S::F32(v),
    }
}

/// The epilogues' CPU reference: `f(y, bias, residual)` per element in f32, `[.., cols]`.
fn epilogue_cpu(
    y: (&candle_core::CpuStorage, &candle_core::Layout),
    bias: (&candle_core::CpuStorage, &candle_core::Layout),
    residual: Option<(&candle_core::CpuStorage, &candle_core::Layout)>,
    f: impl Fn(f32, f32, f32) -> f32,
) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let values = |s, l| cpu_values_f32(s, l, "epilogue");
    let cols = bias.1.shape().dims1()?;
    if y.1.dims().last() != Some(&cols) || cols == 0 {
        candle_core::bail!("epilogue: bias of {cols} for {:?}", y.1.dims());
    }
    let (yv, bv) = (values(y.0, y.1)?, values(bias.0, bias.1)?);
    let rv = match residual {
        Some((s, l)) if l.dims() == y.1.dims() => Some(values(s, l)?),
        Some((_, l)) => {
            candle_core::bail!("epilogue: residual {:?} for {:?}", l.dims(), y.1.dims())
        }
        None => None,
    };
    let out: Vec<f32> = yv
        .iter()
        .enumerate()
        .map(|(i, &v)| f(v, bv[i % cols], rv.as_ref().map_or(0.0, |r| r[i])))
        .collect();
    let storage = cpu_storage_like(y.0, out);
    Ok((storage, y.1.shape().clone()))
}

impl candle_core::CustomOp2 for BiasGeluTanh {
    fn name(&self) -> &'static str {
        "bias-gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        y: &candle_core::CpuStorage,
        ly: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        epilogue_cpu((y, ly), (b, lb), None, |y, b, _| gelu_tanh_f32(y + b))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        lb: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::cuda::epilogue((y, ly), (b, lb), None)
    }
}

impl candle_core::CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        y: &candle_core::CpuStorage,
        ly: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
        r: &candle_core::CpuStorage,
        lr: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        epilogue_cpu((y, ly), (b, lb), Some((r, lr)), |y, b, r| r + (y + b))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        lb: &candle_core::Layout,
        r: &candle_core::CudaStorage,
        lr: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::cuda::epilogue((y, ly), (b, lb), Some((r, lr)))
    }
}

/// SwiGLU on a fused gate/up product `[.., 2i]` in one pass, in f32 arithmetic rounded once:
/// `g / (1 + e^-g) · u` (candle's silu, then the product). On CUDA `kernels/epilogue.cu`;
/// `cpu_fwd` is its reference (the CPU's own f32 path is [`SwigluFusedF32`]).
pub struct SwigluDevice;

impl candle_core::CustomOp1 for SwigluDevice {
    fn name(&self) -> &'static str {
        "swiglu-device"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let two_i = l.dims().last().copied().unwrap_or(0);
        if two_i == 0 || !two_i.is_multiple_of(2) {
            candle_core::bail!("swiglu: last dimension {two_i} (even, > 0)");
        }
        let i = two_i / 2;
        let x = cpu_values_f32(s, l, "swiglu")?;
        let out: Vec<f32> = x
            .chunks(two_i)
            .flat_map(|row| {
                let (g, u) = row.split_at(i);
                g.iter()
                    .zip(u)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect::<Vec<f32>>()
            })
            .collect();
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked above") = i;
        Ok((cpu_storage_like(s, out), candle_core::Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::cuda::swiglu(s, l)
    }
}

/// LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::time(crate::profile::Section::Norm, x.device(), || {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        })
    }
}

/// RMSNorm (Llama), computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::time(crate::profile::Section::Norm, x.device(), || {
            self.forward_untimed(x)
        })
    }

    fn forward_untimed(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        if dt == DType::F32 && x.device().is_cpu() && self.weight.dtype() == DType::F32 {
            return x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &RmsNormF32 { eps: self.eps });
        }
        if dt == DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps);
        }
        if crate::fused_on(x.device()) && matches!(dt, DType::BF16 | DType::F16) {
            // The same arithmetic in one kernel (`kernels/rms_norm.cu`) instead of nine ops.
            return x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &RmsNormLowPrecision { eps: self.eps });
        }
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps as f64)?.sqrt()?)?
            .to_dtype(dt)?;
        normed.broadcast_mul(&self.weight)
    }
}

/// [`RmsNorm`] of f32 rows on the CPU, candle's `rms_norm` arithmetic (`x / sqrt(Σx²/n + eps) ·
/// w`, each step rounded to f32) with the sum of squares taken in 8 lanes (then added pairwise)
/// instead of one chain, on the AVX2 build where the CPU has it: candle's one-lane sum and
/// scalar division were ~6.7 µs of every norm of an 8-sequence SmolLM2 decode step (two per
/// layer). Only the sum's order differs from candle's (a last-bit change of `r` at most).
/// A few rows run on the calling thread; more, a row per task.
struct RmsNormF32 {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNormF32 {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        use rayon::prelude::*;
        let (S::F32(x), S::F32(w)) = (x, w) else {
            candle_core::bail!("rms-norm-f32 expects f32 rows and weight");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets())
        else {
            candle_core::bail!("rms-norm-f32 expects contiguous rows and weight");
        };
        let n = lx.shape().dims().last().copied().unwrap_or(0);
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        if n == 0 || w.len() != n {
            candle_core::bail!("rms-norm-f32: rows of {n} and a weight of {}", w.len());
        }
        let mut dst = vec![0f32; x.len()];
        let rows = rms_rows_kernel();
        if x.len() / n <= 32 {
            rows(x, w, n, self.eps, &mut dst);
        } else {
            dst.par_chunks_mut(n)
                .zip(x.par_chunks(n))
                .for_each(|(d, s)| rows(s, w, n, self.eps, d));
        }
        Ok((S::F32(dst), lx.shape().clone()))
    }
}

/// [`rms_rows`], compiled for AVX2+FMA when the CPU has them (the same arithmetic either way:
/// the lanes are explicit, and nothing is fused).
fn rms_rows_kernel() -> fn(&[f32], &[f32], usize, f32, &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return |x, w, n, eps, d| {
                // SAFETY: the feature was detected above.
                unsafe { rms_rows_avx2(x, w, n, eps, d) }
            };
        }
    }
    rms_rows
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rms_rows_avx2(x: &[f32], w: &[f32], n: usize, eps: f32, d: &mut [f32]) {
    rms_rows(x, w, n, eps, d)
}

/// Rows of `n` values of `x` normalised into `d`: `d = x / sqrt(Σx²/n + eps) · w`.
#[inline(always)]
fn rms_rows(x: &[f32], w: &[f32], n: usize, eps: f32, d: &mut [f32]) {
    const LANES: usize = 8;
    for (dr, xr) in d.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        let mut lanes = [0f32; LANES];
        let mut chunks = xr.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                lanes[l] += c[l] * c[l];
            }
        }
        for (l, &v) in chunks.remainder().iter().enumerate() {
            lanes[l] += v * v;
        }
        let [a, b, c, e, f, g, h, i] = lanes;
        let sum2 = ((a + b) + (c + e)) + ((f + g) + (h + i));
        let r = (sum2 / n as f32 + eps).sqrt();
        for ((o, &v), &wv) in dr.iter_mut().zip(xr).zip(w) {
            *o = v / r * wv;
        }
    }
}

/// [`RmsNorm`] of bf16/f16 rows in one pass, with the composition's arithmetic: per row of `x`
/// `[.., n]`, `r = sqrt(Σ x² · (1/n) + eps)` in f32, then `T(T(x / r) · w)` (the normalised value
/// rounded to the input type before the weight multiplies it, as transformers' LlamaRMSNorm
/// does). On CUDA `kernels/rms_norm.cu`; `cpu_fwd` is its reference.
pub struct RmsNormLowPrecision {
    pub eps: f32,
}

impl candle_core::CustomOp2 for RmsNormLowPrecision {
    fn name(&self) -> &'static str {
        "rms-norm-low-precision"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        // The normalised value's rounding to the input type, before the weight.
        let round: fn(f32) -> f32 = match (x, w) {
            (S::BF16(_), S::BF16(_)) => |v| half::bf16::from_f32(v).to_f32(),
            (S::F16(_), S::F16(_)) => |v| half::f16::from_f32(v).to_f32(),
            _ => candle_core::bail!("rms-norm-low-precision: bf16 or f16, both the same"),
        };
        let n = lw.shape().dims1()?;
        if lx.dims().last() != Some(&n) || n == 0 {
            candle_core::bail!("rms-norm: weight of {n} for {:?}", lx.dims());
        }
        let (xv, wv) = (
            cpu_values_f32(x, lx, "rms-norm")?,
            cpu_values_f32(w, lw, "rms-norm")?,
        );
        let out: Vec<f32> = xv
            .chunks(n)
            .flat_map(|row| {
                let s: f32 = row.iter().map(|&v| v * v).sum();
                // `s · (1/n)`, as candle's mean computes it.
                let r = (s * (1.0 / n as f32) + self.eps).sqrt();
                row.iter()
                    .zip(&wv)
                    .map(|(&v, &w)| round(v / r) * w)
                    .collect::<Vec<f32>>()
            })
            .collect();
        let out = cpu_storage_like(x, out);
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        lw: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::cuda::rms_norm((x, lx), (w, lw), self.eps)
    }
}

/// Additive causal mask `[q, past + q]` (0 where visible, -inf above the diagonal).
pub fn causal_mask(q_len: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let kv = past + q_len;
    if !device.is_cpu() {
        return causal_mask_by_ops(q_len, past, dtype, device);
    }
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..kv).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (q_len, kv), device)?.to_dtype(dtype)
}

/// [`causal_mask`] built with tensor ops on the device itself (for GPUs: no `q x kv` host buffer
/// uploaded per layer). Key `j` is hidden from query row `i` when `j > past + i`.
pub fn causal_mask_by_ops(
    q_len: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let kv = past + q_len;
    let rows = Tensor::arange(past as u32, kv as u32, device)?.unsqueeze(1)?;
    let cols = Tensor::arange(0u32, kv as u32, device)?.unsqueeze(0)?;
    let hidden = cols.broadcast_gt(&rows)?;
    let ninf = Tensor::full(f32::NEG_INFINITY, (q_len, kv), device)?.to_dtype(dtype)?;
    let zero = Tensor::zeros((q_len, kv), dtype, device)?;
    hidden.where_cond(&ninf, &zero)
}

/// Exact-erf GELU as a module (the projector's activation).
pub struct GeluErf;
impl Module for GeluErf {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.gelu_erf()
    }
}

/// Tanh-approximation GELU (`gelu_pytorch_tanh`), parallel over chunks and with a rational tanh
/// (Eigen's, accurate to a few ulp in f32): candle's own applies libm's `tanhf` element by element
/// on one thread, which costs SigLIP so400m more than a second per frame on two cores.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    crate::profile::time(crate::profile::Section::Activation, x.device(), || {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            return x.gelu();
        }
        x.contiguous()?.apply_op1_no_bwd(&GeluTanhF32)
    })
}

/// Eigen's `generic_fast_tanh_float` rational approximation.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    p = p * x2 + -8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    p *= x;
    let mut q = x2 * 1.198_258_4e-6 + 1.185_347e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    p / q
}

struct GeluTanhF32;

impl candle_core::CustomOp1 for GeluTanhF32 {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = match storage {
            candle_core::CpuStorage::F32(v) => v,
            _ => candle_core::bail!("gelu-tanh-f32 expects f32"),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-tanh-f32 expects a contiguous tensor");
        };
        let src = &src[start..end];
        let mut dst = vec![0f32; src.len()];
        const K: f32 = 0.797_884_6; // sqrt(2 / pi)
        dst.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(d, s)| {
                for (o, &v) in d.iter_mut().zip(s) {
                    *o = 0.5 * v * (1.0 + fast_tanh(K * v * (1.0 + 0.044_715 * v * v)));
                }
            });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// SwiGLU on a fused gate/up product `[.., 2i]` (gate first): `silu(gate) * up`, `[.., i]`.
pub fn swiglu_fused(gate_up: &Tensor) -> Result<Tensor> {
    crate::profile::time(
        crate::profile::Section::Activation,
        gate_up.device(),
        || {
            let i = gate_up.dim(D::Minus1)? / 2;
            if crate::fused_on(gate_up.device()) {
                // One pass and one launch (`kernels/epilogue.cu`).
                return gate_up.contiguous()?.apply_op1_no_bwd(&SwigluDevice);
            }
            if gate_up.dtype() != DType::F32 || !gate_up.device().is_cpu() {
                let g = gate_up.narrow(D::Minus1, 0, i)?;
                let u = gate_up.narrow(D::Minus1, i, i)?;
                return candle_nn::ops::silu(&g)? * u;
            }
            gate_up.contiguous()?.apply_op1_no_bwd(&SwigluFusedF32)
        },
    )
}

struct SwigluFusedF32;

impl candle_core::CustomOp1 for SwigluFusedF32 {
    fn name(&self) -> &'static str {
        "swiglu-fused-f32"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(x) = s else {
            candle_core::bail!("swiglu-fused-f32 expects f32");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("swiglu-fused-f32 expects a contiguous tensor");
        };
        let dims = l.shape().dims();
        let two_i = *dims.last().unwrap_or(&0);
        if !two_i.is_multiple_of(2) {
            candle_core::bail!("swiglu-fused-f32: odd last dimension {two_i}");
        }
        let i = two_i / 2;
        let x = &x[a..b];
        let mut dst = vec![0f32; x.len() / 2];
        if let Some(rows_per_task) = (4 * 1024usize).checked_div(i) {
            // Rows in parallel, ~4K values per task (a decode batch of 8 SmolLM2 rows: 3 tasks).
            let rows_per_task = rows_per_task.max(1);
            let rows = swiglu_rows_kernel();
            dst.par_chunks_mut(rows_per_task * i)
                .zip(x.par_chunks(rows_per_task * two_i))
                .for_each(|(d, s)| rows(d, s, i));
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = i;
        }
        Ok((candle_core::CpuStorage::F32(dst), out_dims.into()))
    }
}

/// `d[r] = silu(g_r) · u_r` for rows `s[r] = [g_r | u_r]` of `2i` values, on the AVX2+FMA
/// build of the same code when the CPU has it (`exp` is [`crate::attention::exp_f32`] on every
/// path, a polynomial the compiler vectorises, so results do not depend on the instruction set;
/// libm's scalar `expf` was ~1.3 ms of a ~23 ms 8-sequence SmolLM2 decode step).
pub(crate) fn swiglu_rows_kernel() -> fn(&mut [f32], &[f32], usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |d, s, i| {
                // SAFETY: the features were detected above.
                unsafe { swiglu_rows_avx2(d, s, i) }
            };
        }
    }
    swiglu_rows
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_rows_avx2(d: &mut [f32], s: &[f32], i: usize) {
    swiglu_rows(d, s, i)
}

#[inline(always)]
fn swiglu_rows(d: &mut [f32], s: &[f32], i: usize) {
    for (dr, sr) in d.chunks_mut(i).zip(s.chunks(2 * i)) {
        let (g, u) = sr.split_at(i);
        for ((o, &g), &u) in dr.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + crate::attention::exp_f32(-g)) * u;
        }
    }
}

/// SwiGLU of a fused gate/up product's outputs as the decode kernels leave them: `m` rows of
/// `w` values, each row [8 gates, their 8 ups] tile pairs, to `w / 2` outputs a row at
/// `dst + r·stride` (`silu(g) · u`, `exp` as [`swiglu_rows`]: the same values bit for bit). One
/// call covers a task's rows and tiles (calling [`swiglu_rows_kernel`] per tile pair was ~3% of
/// an 8-sequence decode step in calls through the pointer).
///
/// # Safety
/// `gu` holds `m·w` values (`w` a multiple of 16); `dst + r·stride .. + w/2` must be valid for
/// writes for every row `r < m` and not overlap `gu`.
pub(crate) type SwigluTilePairs = unsafe fn(&[f32], usize, usize, *mut f32, usize);

/// The [`SwigluTilePairs`] kernel for this CPU (AVX2 and FMA, or portable).
pub(crate) fn swiglu_tile_pairs_kernel() -> SwigluTilePairs {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return swiglu_tile_pairs_avx2;
        }
    }
    swiglu_tile_pairs
}

/// [`SwigluTilePairs`] by [`swiglu_rows`] a tile pair at a time (the reference).
unsafe fn swiglu_tile_pairs(gu: &[f32], w: usize, m: usize, dst: *mut f32, stride: usize) {
    assert!(
        gu.len() >= m * w && w.is_multiple_of(16),
        "tile pairs of 16"
    );
    for r in 0..m {
        let o = dst.add(r * stride);
        for (p, pair) in gu[r * w..(r + 1) * w].chunks_exact(16).enumerate() {
            let mut out = [0f32; 8];
            swiglu_rows(&mut out, pair, 8);
            std::ptr::copy_nonoverlapping(out.as_ptr(), o.add(8 * p), 8);
        }
    }
}

/// [`SwigluTilePairs`] eight lanes at a time ([`crate::attention::exp_f32x8`]: each lane as
/// `exp_f32`; a NaN gate gives NaN either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_tile_pairs_avx2(gu: &[f32], w: usize, m: usize, dst: *mut f32, stride: usize) {
    use std::arch::x86_64::*;
    assert!(
        gu.len() >= m * w && w.is_multiple_of(16),
        "tile pairs of 16"
    );
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    for r in 0..m {
        let src = gu.as_ptr().add(r * w);
        let o = dst.add(r * stride);
        for p in 0..w / 16 {
            let g = _mm256_loadu_ps(src.add(16 * p));
            let u = _mm256_loadu_ps(src.add(16 * p + 8));
            let e = crate::attention::exp_f32x8(_mm256_xor_ps(g, sign));
            let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            _mm256_storeu_ps(o.add(8 * p), y);
        }
    }
}

/// A tensor's values as f32 (tests compare kernels element by element).
#[cfg(test)]
pub(crate) fn values_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("an f32-convertible tensor")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate/up layer interleaved for SwiGLU answers `forward_swiglu` and `forward_rows_swiglu`
    /// exactly as SwiGLU of the plain layer's product (decode rows, a decode batch, prompt rows
    /// from the quantized weights alone), counted as the product; a plain product of it still
    /// answers in gate-then-up order; a layer with a bias is left as it is.
    /// `forward_rows_add` on quantized weights (the add in the product's op) equals the
    /// product then candle's add, bit for bit, for 1 to 8 rows of Q4_1 and Q8_0 weights, and is
    /// counted as the product alone; a residual of the wrong size is an error, not a panic.
    #[test]
    fn a_product_with_its_residual_add_equals_the_two_ops() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (n, k) = (40, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = crate::quant::QuantMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let layer = Linear::from_quantized(q, None).unwrap();
            for rows in [1usize, 3, 8] {
                let x = Tensor::randn(0f32, 1.0, (rows, 1, k), &dev).unwrap();
                let residual = Tensor::randn(0f32, 1.0, (rows, 1, n), &dev).unwrap();
                let (fused_flops, plain_flops) =
                    (vvlm_cost::FlopCounter::new(), vvlm_cost::FlopCounter::new());
                let ctxs = |f| -> Vec<Ctx> {
                    (0..rows)
                        .map(|_| Ctx::new(f, vvlm_cost::Component::LmDecode))
                        .collect()
                };
                let fused = layer
                    .forward_rows_add(&x, &residual, &ctxs(&fused_flops))
                    .unwrap();
                let plain =
                    (&residual + layer.forward_rows(&x, &ctxs(&plain_flops)).unwrap()).unwrap();
                assert_eq!(fused.dims(), &[rows, 1, n]);
                let bits = |t: &Tensor| -> Vec<u32> {
                    values_f32(t).iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(&fused), bits(&plain), "{dtype:?}, {rows} rows");
                let decode = |f: &vvlm_cost::FlopCounter| f.get(vvlm_cost::Component::LmDecode);
                assert_eq!(decode(&fused_flops), decode(&plain_flops));
                assert_eq!(decode(&fused_flops), (2 * rows * n * k) as u64);
            }
            let x = Tensor::randn(0f32, 1.0, (2, 1, k), &dev).unwrap();
            let short = Tensor::zeros((2, 1, n - 1), DType::F32, &dev).unwrap();
            let flops = vvlm_cost::FlopCounter::new();
            let two: Vec<Ctx> = (0..2)
                .map(|_| Ctx::new(&flops, vvlm_cost::Component::LmDecode))
                .collect();
            assert!(layer.forward_rows_add(&x, &short, &two).is_err());
        }
    }

    #[test]
    fn a_gate_up_layer_interleaved_for_swiglu_answers_as_the_composition() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (i, h) = (24, 64);
        let w = Tensor::randn(0f32, 1.0, (2 * i, h), &dev).unwrap();
        let q = crate::quant::QuantMatrix::from_qtensor(
            &QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(),
        )
        .unwrap()
        .unwrap();
        let plain = Linear::from_quantized(q.clone(), None).unwrap();
        let mut fused = Linear::from_quantized(q.clone(), None).unwrap();
        assert!(fused.interleave_for_swiglu());
        let flops = vvlm_cost::FlopCounter::new();
        let ctx = Ctx::new(&flops, vvlm_cost::Component::LmDecode);
        for rows in [1usize, 3, 100] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, h), &dev).unwrap();
            let want = values_f32(&swiglu_fused(&plain.forward(&x, &ctx).unwrap()).unwrap());
            let before = flops.get(vvlm_cost::Component::LmDecode);
            let got = fused.forward_swiglu(&x, &ctx).unwrap();
            assert_eq!(got.dims(), &[1, rows, i]);
            assert_eq!(values_f32(&got), want, "{rows} rows");
            assert_eq!(
                flops.get(vvlm_cost::Component::LmDecode) - before,
                (2 * rows * 2 * i * h) as u64
            );
        }
        let x = Tensor::randn(0f32, 1.0, (8, 1, h), &dev).unwrap();
        let ctxs: Vec<Ctx> = (0..8)
            .map(|_| Ctx::new(&flops, vvlm_cost::Component::LmDecode))
            .collect();
        assert_eq!(
            values_f32(&fused.forward_rows_swiglu(&x, &ctxs).unwrap()),
            values_f32(&swiglu_fused(&plain.forward_rows(&x, &ctxs).unwrap()).unwrap())
        );
        // A plain product (a tapped forward) still answers in gate-then-up order.
        for x in [
            x.clone(),
            Tensor::randn(0f32, 1.0, (1, 100, h), &dev).unwrap(),
        ] {
            assert_eq!(
                values_f32(&fused.forward(&x, &ctx).unwrap()),
                values_f32(&plain.forward(&x, &ctx).unwrap())
            );
        }
        let bias = Tensor::zeros(2 * i, DType::F32, &dev).unwrap();
        let mut biased = Linear::from_quantized(q, Some(bias)).unwrap();
        assert!(!biased.interleave_for_swiglu());
    }

    /// The f32 CPU RMSNorm by hand on one row, then on decode-sized (serial) and prompt-sized
    /// (parallel) inputs and a width that is not a multiple of 8 against the same formula in
    /// f64, within the rounding error bound of each one's f32 arithmetic: a sum of n positive
    /// squares along a chain of k additions is within (k + 1)·u relative (u = 2^-24), the mean
    /// and `+ eps` add 2u, the square root halves that and adds u, the division and the weight
    /// 2u more. Ours sums in 8 lanes (k = n/8 + 3: ~8e-6 at 2048), candle's `rms_norm` in one
    /// (k = n: ~6e-5 at 2048; a 1e-6 bound on it failed a CI run on one random draw). Bad
    /// weights refused.
    #[test]
    fn the_f32_rms_norm_equals_the_formula_in_f64() {
        let dev = Device::Cpu;
        // Row [3, 4], eps 0: r = sqrt((9 + 16) / 2) = sqrt(12.5).
        let norm = RmsNorm {
            weight: Tensor::new(&[1f32, 2.0], &dev).unwrap(),
            eps: 0.0,
        };
        let got = values_f32(
            &norm
                .forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap())
                .unwrap(),
        );
        let r = 12.5f32.sqrt();
        assert_eq!(got, vec![3.0 / r, 4.0 / r * 2.0]);
        let eps = 1e-5;
        for (rows, n) in [(1usize, 576usize), (8, 576), (40, 576), (3, 2048), (5, 13)] {
            let x = Tensor::randn(0f32, 2.0, (1, rows, n), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.3, n, &dev).unwrap();
            let norm = RmsNorm {
                weight: w.clone(),
                eps: eps as f32,
            };
            let got = values_f32(&norm.forward(&x).unwrap());
            let candle = values_f32(&candle_nn::ops::rms_norm(&x, &w, eps as f32).unwrap());
            let (xs, ws) = (values_f32(&x), values_f32(&w));
            // The relative bound for a sum along a chain of `k` additions (see above).
            let bound = |k: usize| ((k as f64 + 3.0) / 2.0 + 3.0) * 2f64.powi(-24);
            let (ours, theirs) = (bound(n.div_ceil(8) + 3), bound(n));
            for (r, row) in xs.chunks(n).enumerate() {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
                let rms = (ms + eps).sqrt();
                for (c, (&v, &wc)) in row.iter().zip(&ws).enumerate() {
                    let want = v as f64 / rms * wc as f64;
                    for (name, out, rel) in [("vvlm", &got, ours), ("candle", &candle, theirs)] {
                        let err = (out[r * n + c] as f64 - want).abs();
                        assert!(err <= rel * want.abs() + 1e-30, "{name} {rows}x{n}: {err}");
                    }
                }
            }
        }
        let short = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(x
            .apply_op2_no_bwd(&short, &RmsNormF32 { eps: 1e-5 })
            .is_err());
    }

    /// The one-pass RMSNorm's CPU reference against the composition `RmsNorm` runs elsewhere:
    /// bf16 and f16 rows of 2048 and 576 (SmolLM2's), within two ulps of the output (the sum's
    /// order differs; a last-bit change of `x / r` can flip its rounding to the input type, and
    /// the product with the weight rounds again); shapes and dtypes refused.
    #[test]
    fn the_one_pass_rms_norm_equals_the_composition() {
        let dev = Device::Cpu;
        for n in [2048usize, 576] {
            let x = Tensor::randn(0f32, 3.0, (2, 7, n), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.2, n, &dev).unwrap();
            for (dt, ulp) in [(DType::BF16, 2f32.powi(-7)), (DType::F16, 2f32.powi(-10))] {
                let (x, w) = (x.to_dtype(dt).unwrap(), w.to_dtype(dt).unwrap());
                let norm = RmsNorm {
                    weight: w.clone(),
                    eps: 1e-5,
                };
                let want = norm.forward(&x).unwrap();
                let got = x
                    .apply_op2_no_bwd(&w, &RmsNormLowPrecision { eps: 1e-5 })
                    .unwrap();
                let f = values_f32;
                for (g, e) in f(&got).iter().zip(f(&want)) {
                    assert!(
                        (g - e).abs() <= 2.0 * ulp * e.abs().max(2f32.powi(-10)),
                        "{dt:?} n {n}: {g} vs {e}"
                    );
                }
            }
        }
        let x = Tensor::zeros((2, 8), DType::BF16, &dev).unwrap();
        let op = RmsNormLowPrecision { eps: 1e-5 };
        assert!(x
            .apply_op2_no_bwd(&Tensor::zeros(7, DType::BF16, &dev).unwrap(), &op)
            .is_err());
        assert!(x
            .apply_op2_no_bwd(&Tensor::zeros(8, DType::F16, &dev).unwrap(), &op)
            .is_err());
    }

    /// The device SwiGLU's CPU reference against candle's `silu(g) · u`: f32 within 1e-6 of
    /// each value's magnitude, bf16 within two ulps (the composition rounds `silu(g)` first).
    #[test]
    fn the_device_swiglu_equals_silu_times_up() {
        let dev = Device::Cpu;
        let gu = Tensor::randn(0f32, 2.0, (3, 4, 2 * 40), &dev).unwrap();
        for (dt, rel) in [(DType::F32, 1e-6), (DType::BF16, 2.0 * 2f32.powi(-7))] {
            let x = gu.to_dtype(dt).unwrap();
            let got = x.apply_op1_no_bwd(&SwigluDevice).unwrap();
            assert_eq!(got.dims(), &[3, 4, 40]);
            let g = x.narrow(2, 0, 40).unwrap();
            let u = x.narrow(2, 40, 40).unwrap();
            let want = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
            let f = values_f32;
            for (a, b) in f(&got).iter().zip(f(&want)) {
                assert!(
                    (a - b).abs() <= rel * b.abs().max(1.0),
                    "{dt:?}: {a} vs {b}"
                );
            }
        }
        let odd = Tensor::zeros((2, 7), DType::F32, &dev).unwrap();
        assert!(odd.apply_op1_no_bwd(&SwigluDevice).is_err());
    }

    /// The epilogues' CPU reference against candle's ops: f32 `gelu(y + b)` within 1e-6 of
    /// each value's magnitude (libm's tanh either way), `x + (y + b)` bit for bit; bf16 within two
    /// ulps of the output (the composition rounds `y + b` first); shapes refused.
    #[test]
    fn the_epilogues_equal_the_composition_they_fuse() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 2.0, (3, 5, 48), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 5, 48), &dev).unwrap();
        let flat = values_f32;
        let close = |got: &Tensor, want: &Tensor, rel: f32| {
            for (g, w) in flat(got).iter().zip(flat(want)) {
                assert!((g - w).abs() <= rel * w.abs().max(1.0), "{g} vs {w}");
            }
        };
        let gelu = y.apply_op2_no_bwd(&b, &BiasGeluTanh).unwrap();
        close(&gelu, &y.broadcast_add(&b).unwrap().gelu().unwrap(), 1e-6);
        let res = y.apply_op3_no_bwd(&b, &x, &BiasResidual).unwrap();
        assert_eq!(
            flat(&res),
            flat(&(&x + y.broadcast_add(&b).unwrap()).unwrap())
        );
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        // Two bf16 ulps (up to 2^-7 of a value each): the composition's two roundings and the
        // activation's slope can put it one ulp further from the exact value than one rounding.
        let two_roundings = 2.0 * 2f32.powi(-7);
        close(
            &bf(&y).apply_op2_no_bwd(&bf(&b), &BiasGeluTanh).unwrap(),
            &bf(&y).broadcast_add(&bf(&b)).unwrap().gelu().unwrap(),
            two_roundings,
        );
        close(
            &bf(&y)
                .apply_op3_no_bwd(&bf(&b), &bf(&x), &BiasResidual)
                .unwrap(),
            &(bf(&x) + bf(&y).broadcast_add(&bf(&b)).unwrap()).unwrap(),
            two_roundings,
        );
        let short = Tensor::zeros(47, DType::F32, &dev).unwrap();
        assert!(y.apply_op2_no_bwd(&short, &BiasGeluTanh).is_err());
        let other = Tensor::zeros((3, 48), DType::F32, &dev).unwrap();
        assert!(y.apply_op3_no_bwd(&b, &other, &BiasResidual).is_err());
    }

    #[test]
    fn device_built_causal_mask_equals_the_host_one() {
        for (q, past) in [(1, 0), (5, 0), (4, 7), (1, 9)] {
            let a = causal_mask(q, past, DType::F32, &Device::Cpu).unwrap();
            let b = causal_mask_by_ops(q, past, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "q {q} past {past}"
            );
        }
    }

    #[test]
    fn fused_swiglu_matches_split() {
        let gu = Tensor::randn(0f32, 2.0, (3, 5, 2 * 700), &Device::Cpu).unwrap();
        let g = gu.narrow(2, 0, 700).unwrap();
        let u = gu.narrow(2, 700, 700).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let got = swiglu_fused(&gu).unwrap();
        assert_eq!(got.dims(), &[3, 5, 700]);
        // candle's silu uses libm's exp; ours a polynomial within 2 ulp (`exp_matches_libm`):
        // a few 1e-7 relative, so 1e-6 of each value's magnitude (at least 1).
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
        // The dispatched kernel (AVX2 where present) equals the portable code bit for bit.
        let x: Vec<f32> = gu.flatten_all().unwrap().to_vec1().unwrap();
        let mut portable = vec![0f32; x.len() / 2];
        swiglu_rows(&mut portable, &x, 700);
        let mut dispatched = vec![0f32; x.len() / 2];
        swiglu_rows_kernel()(&mut dispatched, &x, 700);
        assert_eq!(portable, dispatched);
        assert_eq!(portable, got);
    }

    /// SwiGLU over [8 gates, 8 ups] tile pairs equals `swiglu_rows` of each pair (8 values a
    /// row) bit for bit, portable and dispatched, including extreme gates; it writes each row's
    /// outputs at its stride and nothing between them.
    #[test]
    fn swiglu_of_tile_pairs_equals_the_rows_kernel() {
        let (m, w, stride) = (3usize, 64usize, 40usize);
        let mut gu: Vec<f32> = Tensor::randn(0f32, 3.0, m * w, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, v) in [-100.0, 100.0, 0.0, -0.0, 88.0, -88.0, 1e-30, f32::MAX]
            .into_iter()
            .enumerate()
        {
            gu[16 * i + i % 8] = v;
        }
        let mut want = vec![f32::NAN; m * stride];
        for r in 0..m {
            for p in 0..w / 16 {
                let mut one = [0f32; 8];
                swiglu_rows(&mut one, &gu[r * w + 16 * p..r * w + 16 * (p + 1)], 8);
                want[r * stride + 8 * p..r * stride + 8 * (p + 1)].copy_from_slice(&one);
            }
        }
        for kernel in [
            swiglu_tile_pairs as SwigluTilePairs,
            swiglu_tile_pairs_kernel(),
        ] {
            let mut got = vec![f32::NAN; m * stride];
            // SAFETY: 3 rows of 32 outputs at a stride of 40 in a buffer of 120.
            unsafe { kernel(&gu, w, m, got.as_mut_ptr(), stride) };
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                    "output {i}: {g} vs {e}"
                );
            }
            // The gaps between rows untouched.
            assert!(got[32..40].iter().all(|v| v.is_nan()));
        }
    }

    #[test]
    fn concatenated_linear_equals_its_parts() {
        let dev = Device::Cpu;
        let part = |o: usize, bias: bool| {
            Linear::from_weights(
                Tensor::randn(0f32, 1.0, (o, 16), &dev).unwrap(),
                bias.then(|| Tensor::randn(0f32, 1.0, o, &dev).unwrap()),
            )
            .unwrap()
        };
        let (a, b) = (part(8, true), part(4, false));
        let ab = Linear::concat(&[a.clone(), b.clone()]).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
        let flops = FlopCounter::new();
        let ctx = Ctx::new(&flops, Component::Vision);
        let want = Tensor::cat(
            &[a.forward(&x, &ctx).unwrap(), b.forward(&x, &ctx).unwrap()],
            2,
        )
        .unwrap();
        let got = ab.forward(&x, &ctx).unwrap();
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        // Counted the same as the parts: 2 · rows · in · (8 + 4) each time.
        assert_eq!(flops.get(Component::Vision), 2 * 2 * (6 * 16 * 12));
    }

    /// A layer that kept only its quantized weights runs every shape from them: a 100-row
    /// product (prefill-sized, past the decode paths' row limits) equals each row alone bit
    /// for bit (the integer kernels' per-row arithmetic), stays within the activations'
    /// rounding of the f32 product, counts the same FLOPs, and the f32 copy is gone.
    #[test]
    fn a_quantized_only_layer_runs_prefill_from_its_blocks() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (40, 64), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let deq = q.dequantize(&dev).unwrap();
        let mut lin = Linear::from_weights(deq.clone(), None).unwrap();
        let exact = lin.clone();
        lin.set_quantized(
            crate::quant::QuantMatrix::from_qtensor(&q)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(lin.keep_only_quantized(), 40 * 64 * 4);
        assert_eq!(lin.keep_only_quantized(), 0, "already dropped");
        let x = Tensor::randn(0f32, 1.0, (100, 64), &dev).unwrap();
        let flops = FlopCounter::new();
        let ctx = Ctx::new(&flops, Component::LmPrefill);
        let all = lin.forward(&x, &ctx).unwrap();
        assert_eq!(flops.get(Component::LmPrefill), 2 * 100 * 64 * 40);
        let all_rows = all.to_vec2::<f32>().unwrap();
        for (r, want) in all_rows.iter().enumerate() {
            let one = lin
                .forward(&x.narrow(0, r, 1).unwrap(), &ctx)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(&one, want, "row {r}");
        }
        // Activations rounded to 8 bits per 32-block: |error| <= Σ|w|·d/2 per output; with
        // |x| <~ 4.5 and |w| <~ 0.25 that is < 64·0.25·0.018 ≈ 0.3; measured ~0.02.
        let d = max_abs_diff(&all, &exact.forward(&x, &ctx).unwrap()).unwrap();
        assert!(d < 0.1, "{d}");
        let err = Linear::concat(&[lin.clone(), lin]).unwrap_err().to_string();
        assert!(err.contains("only its quantized weights"), "{err}");
    }

    #[test]
    fn fast_tanh_matches_libm() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((fast_tanh(x) - x.tanh()).abs());
        }
        assert!(worst < 5e-7, "max abs error {worst}");
        assert_eq!(fast_tanh(50.0), fast_tanh(7.905_311));
        assert!((fast_tanh(50.0) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn gelu_tanh_matches_candles() {
        let x = Tensor::arange(-6000i64, 6000, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1e-3, 0.0)
            .unwrap()
            .reshape((12, 1000))
            .unwrap();
        let a = gelu_tanh(&x).unwrap();
        let b = x.gelu().unwrap();
        let d = max_abs_diff(&a, &b).unwrap();
        assert!(d < 1e-6, "{d}");
    }
}
