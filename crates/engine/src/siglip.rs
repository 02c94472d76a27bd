//! SigLIP vision tower (no pooling head): patch embedding as a matrix product, learned position
//! embeddings, pre-LN encoder layers. Returns the output of a chosen layer before
//! `post_layernorm`, as LLaVA-OneVision selects its features.

use crate::attention::{attention, Masking};
use crate::config::SiglipVisionConfig;
use crate::nn::{Ctx, LayerNorm, Linear};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

pub struct Embeddings {
    patch: Linear,
    position: Tensor,
    cfg: SiglipVisionConfig,
}

impl Embeddings {
    pub fn load(vb: VarBuilder, cfg: &SiglipVisionConfig) -> Result<Self> {
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let w = vb
            .get((h, c, p, p), "patch_embedding.weight")?
            .reshape((h, c * p * p))?;
        let b = vb.get(h, "patch_embedding.bias")?;
        let n = cfg.grid() * cfg.grid();
        Ok(Self {
            patch: Linear::from_weights(w, Some(b))?,
            position: vb.get((n, h), "position_embedding.weight")?,
            cfg: cfg.clone(),
        })
    }

    /// `[frames, C, H, W]` pixels -> `[frames, patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (f, c, hh, ww) = pixels.dims4()?;
        let (p, g) = (self.cfg.patch_size, self.cfg.grid());
        if hh != self.cfg.image_size || ww != self.cfg.image_size || c != self.cfg.num_channels {
            candle_core::bail!(
                "pixels are {c}x{hh}x{ww}, the vision tower expects {}x{}x{}",
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size
            );
        }
        // Non-overlapping patches flattened in the conv weight's (C, kh, kw) order. A stride-p
        // convolution without padding ignores the last `size % p` rows and columns (so400m/14 at
        // 384 px sees 378 px).
        let used = g * p;
        let pixels = if used != hh {
            pixels.narrow(2, 0, used)?.narrow(3, 0, used)?
        } else {
            pixels.clone()
        };
        let patches = pixels
            .reshape((f, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((f, g * g, c * p * p))?;
        let x = self.patch.forward(&patches, ctx)?;
        if ctx.tapping() {
            let conv = x
                .transpose(1, 2)?
                .reshape((f, self.cfg.hidden_size, g, g))?;
            ctx.tap(|| "vision.patch_conv_out".into(), &conv);
        }
        x.broadcast_add(&self.position)
    }
}

pub struct EncoderLayer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    /// q, k and v stacked: `[3·hidden, hidden]`.
    qkv: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    head_dim: usize,
    tanh_gelu: bool,
}

impl EncoderLayer {
    pub fn load(vb: VarBuilder, cfg: &SiglipVisionConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::load(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            ln2: LayerNorm::load(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            qkv: Linear::concat(&[
                Linear::load(a.pp("q_proj"), h, h, true)?,
                Linear::load(a.pp("k_proj"), h, h, true)?,
                Linear::load(a.pp("v_proj"), h, h, true)?,
            ])?,
            out: Linear::load(a.pp("out_proj"), h, h, true)?,
            fc1: Linear::load(vb.pp("mlp.fc1"), h, i, true)?,
            fc2: Linear::load(vb.pp("mlp.fc2"), i, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            tanh_gelu: cfg.hidden_act == "gelu_pytorch_tanh",
        })
    }

    pub fn forward(&self, x: &Tensor, layer: usize, ctx: &mut Ctx) -> Result<Tensor> {
        let (f, n, h) = x.dims3()?;
        let tap0 = layer == 0;
        let y = self.ln1.forward(x)?;
        if tap0 {
            ctx.tap(|| "vision.layer0.layer_norm1".into(), &y);
        }
        let qkv = self.qkv.forward(&y, ctx)?;
        let q = qkv.narrow(2, 0, h)?;
        let k = qkv.narrow(2, h, h)?;
        let v = qkv.narrow(2, 2 * h, h)?;
        if tap0 {
            ctx.tap(|| "vision.layer0.self_attn.q_proj".into(), &q);
            ctx.tap(|| "vision.layer0.self_attn.k_proj".into(), &k);
            ctx.tap(|| "vision.layer0.self_attn.v_proj".into(), &v);
        }
        // Per-head views straight into the fused product (no copies): [f, n, 3, heads, d] ->
        // part i -> [f, heads, n, d].
        let heads_view = qkv.reshape((f, n, 3, self.heads, self.head_dim))?;
        let split = |i: usize| heads_view.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let attn = attention(
            &split(0)?,
            &split(1)?,
            &split(2)?,
            (self.head_dim as f64).powf(-0.5),
            Masking::None,
            ctx,
        )?;
        let attn = attn.transpose(1, 2)?.reshape((f, n, h))?;
        // Unless this layer's intermediates are tapped (parity checks), the biases, activation
        // and residual adds go into the linear layers' epilogues (one pass each on CUDA).
        let fused = !(tap0 && ctx.taps.is_some());
        let x = if fused {
            self.out.forward_add(&attn, x, ctx)?
        } else {
            let o = self.out.forward(&attn, ctx)?;
            ctx.tap(|| "vision.layer0.self_attn.out_proj".into(), &o);
            (x + o)?
        };
        let y = self.ln2.forward(&x)?;
        if tap0 {
            ctx.tap(|| "vision.layer0.layer_norm2".into(), &y);
        }
        let y = if fused && self.tanh_gelu {
            self.fc1.forward_gelu_tanh(&y, ctx)?
        } else {
            let y = self.fc1.forward(&y, ctx)?;
            if tap0 {
                ctx.tap(|| "vision.layer0.mlp.fc1".into(), &y);
            }
            if self.tanh_gelu {
                crate::nn::gelu_tanh(&y)?
            } else {
                crate::profile::time(crate::profile::Section::Activation, y.device(), || {
                    y.gelu_erf()
                })?
            }
        };
        if fused {
            return self.fc2.forward_add(&y, &x, ctx);
        }
        let y = self.fc2.forward(&y, ctx)?;
        ctx.tap(|| "vision.layer0.mlp.fc2".into(), &y);
        x + y
    }
}

/// The tower, truncated to the layers that produce the selected features.
pub struct SiglipVision {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    pub cfg: SiglipVisionConfig,
}

impl SiglipVision {
    /// Loads `layers_run` encoder layers (those after it are never executed, so not loaded).
    pub fn load(vb: VarBuilder, cfg: &SiglipVisionConfig, layers_run: usize) -> Result<Self> {
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..layers_run)
            .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// `[frames, C, H, W]` -> features `[frames, patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_with(pixels, ctx, &mut || {})
    }

    /// [`Self::forward`], calling `after_layer` after each encoder layer (where a caller may
    /// run other work: the layers' arithmetic does not change).
    pub fn forward_with(
        &self,
        pixels: &Tensor,
        ctx: &mut Ctx,
        after_layer: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixels, ctx)?;
        ctx.tap(|| "vision.embeddings".into(), &x);
        for (i, layer) in self.layers.iter().enumerate() {
            ctx.check_cancel()?;
            x = layer.forward(&x, i, ctx)?;
            ctx.tap(|| format!("vision.layer_out.{i}"), &x);
            after_layer();
        }
        Ok(x)
    }
}
