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
}

impl<'a> Ctx<'a> {
    pub fn new(flops: &'a FlopCounter, component: Component) -> Self {
        Self {
            flops,
            component,
            taps: None,
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
        }
    }

    /// Records an intermediate under `name` when taps are on.
    pub fn tap(&mut self, name: impl FnOnce() -> String, t: &Tensor) {
        if let Some(taps) = self.taps.as_deref_mut() {
            taps.insert(name(), t.clone());
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

/// A linear layer `y = x W^T + b` with `W: [out, in]`, addressed by checkpoint names.
#[derive(Debug, Clone)]
pub struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

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
        // Store W^T contiguous: the CPU gemm streams it row-major without a transpose.
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            weight_t,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features))?;
        ctx.count_matmul(1, rows, self.in_features, self.out_features);
        let mut y = x2.matmul(&self.weight_t)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features;
        y.reshape(out_dims)
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
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
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
        let dt = x.dtype();
        if dt == DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps);
        }
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps as f64)?.sqrt()?)?
            .to_dtype(dt)?;
        normed.broadcast_mul(&self.weight)
    }
}

/// Multi-head attention core: `softmax(q k^T * scale + mask) v` for `[b, h, q, d]` inputs,
/// counted as two products (`QK^T` and `AV`) over the full `q x kv` rectangle.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    ctx: &Ctx,
) -> Result<Tensor> {
    let scores = (ctx.matmul(&q.contiguous()?, &k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    ctx.matmul(&probs, &v.contiguous()?)
}

/// Additive causal mask `[q, past + q]` (0 where visible, -inf above the diagonal).
pub fn causal_mask(q_len: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let kv = past + q_len;
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..kv).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (q_len, kv), device)?.to_dtype(dtype)
}

/// Exact-erf GELU as a module (the projector's activation).
pub struct GeluErf;
impl Module for GeluErf {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.gelu_erf()
    }
}
