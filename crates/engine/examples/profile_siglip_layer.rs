//! Times the parts of one so400m-shaped SigLIP encoder layer on 729 tokens (release build):
//! `cargo run --release -p vvlm-engine --example profile_siglip_layer`.
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn time<F: FnMut() -> Tensor>(name: &str, flops: f64, mut f: F) {
    let _ = f();
    let t = Instant::now();
    let n = 5;
    for _ in 0..n {
        let _ = f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:<28} {:8.2} ms {:8.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}

fn main() -> candle_core::Result<()> {
    let tuned = vvlm_engine::tune_cpu_allocator();
    println!("allocator tuned: {tuned}");
    let d = Device::Cpu;
    let (p, h, i, heads) = (729usize, 1152usize, 4304usize, 16usize);
    let hd = h / heads;
    let x = Tensor::randn(0f32, 1.0, (p, h), &d)?;
    let w = Tensor::randn(0f32, 0.02, (h, h), &d)?;
    let w1 = Tensor::randn(0f32, 0.02, (i, h), &d)?;
    let w2 = Tensor::randn(0f32, 0.02, (h, i), &d)?;
    let wt = w.t()?.contiguous()?;
    let y1 = Tensor::randn(0f32, 1.0, (p, i), &d)?;
    time(
        "qkv/out linear [out,in].t()",
        2.0 * (p * h * h) as f64,
        || x.matmul(&w.t().unwrap()).unwrap(),
    );
    time("qkv/out linear [in,out]", 2.0 * (p * h * h) as f64, || {
        x.matmul(&wt).unwrap()
    });
    let w3 = Tensor::randn(0f32, 0.02, (3 * h, h), &d)?;
    time("fused qkv linear (3x)", 6.0 * (p * h * h) as f64, || {
        x.matmul(&w3.t().unwrap()).unwrap()
    });
    time("fc1 linear", 2.0 * (p * h * i) as f64, || {
        x.matmul(&w1.t().unwrap()).unwrap()
    });
    time("fc2 linear", 2.0 * (p * h * i) as f64, || {
        y1.matmul(&w2.t().unwrap()).unwrap()
    });
    let q = Tensor::randn(0f32, 1.0, (1, heads, p, hd), &d)?;
    let kt = Tensor::randn(0f32, 1.0, (1, heads, hd, p), &d)?;
    time("QK^T (16 heads)", 2.0 * (heads * p * p * hd) as f64, || {
        q.matmul(&kt).unwrap()
    });
    let sc = Tensor::randn(0f32, 1.0, (1, heads, p, p), &d)?;
    time("softmax (candle)", 0.0, || {
        candle_nn::ops::softmax_last_dim(&sc).unwrap()
    });
    let v = Tensor::randn(0f32, 1.0, (1, heads, p, hd), &d)?;
    time("AV (16 heads)", 2.0 * (heads * p * p * hd) as f64, || {
        sc.matmul(&v).unwrap()
    });
    {
        let flops = vvlm_cost::FlopCounter::new();
        let ctx = vvlm_engine::Ctx::new(&flops, vvlm_cost::Component::Vision);
        let qkv = Tensor::randn(0f32, 1.0, (1, p, 3 * h), &d)?;
        let view = |i: usize| {
            qkv.narrow(2, i * h, h)
                .unwrap()
                .reshape((1, p, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (view(0), view(1), view(2));
        time(
            "fused attention (ours)",
            4.0 * (heads * p * p * hd) as f64,
            || {
                vvlm_engine::attention::attention(
                    &q,
                    &k,
                    &v,
                    0.1,
                    vvlm_engine::attention::Masking::None,
                    &ctx,
                )
                .unwrap()
            },
        );
    }
    time("gelu tanh (ours)", 0.0, || {
        vvlm_engine::nn::gelu_tanh(&y1).unwrap()
    });
    time("gelu tanh (candle)", 0.0, || y1.gelu().unwrap());
    let g = Tensor::ones(h, DType::F32, &d)?;
    let b = Tensor::zeros(h, DType::F32, &d)?;
    time("layer norm", 0.0, || {
        candle_nn::ops::layer_norm(&x, &g, &b, 1e-6).unwrap()
    });
    time("bias add", 0.0, || x.broadcast_add(&b).unwrap());
    let x3 = x.reshape((1, p, heads, hd))?;
    time("split heads (transpose+copy)", 0.0, || {
        x3.transpose(1, 2).unwrap().contiguous().unwrap()
    });
    time("k.t().contiguous()", 0.0, || {
        q.t().unwrap().contiguous().unwrap()
    });
    Ok(())
}
