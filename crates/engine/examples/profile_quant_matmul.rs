//! Times SmolLM2-135M-shaped products on the CPU (release build): the quantized decode kernels
//! (`qdot`, Q4_1 and Q8_0 tiles) at 1 to 512 activation rows against candle's f32 GEMM on the
//! dequantized matrix, GFLOP/s counted as 2·rows·in·out:
//! `cargo run --release -p vvlm-engine --example profile_quant_matmul`.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;
use vvlm_engine::quant::QuantMatrix;

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while n < 3 || t.elapsed().as_secs_f64() < 0.3 {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn main() -> candle_core::Result<()> {
    vvlm_engine::tune_cpu_allocator();
    let d = Device::Cpu;
    // (name, out, in): SmolLM2's gate/up (fused), down, and q/k/v (fused) products.
    let shapes = [
        ("gate_up", 3072usize, 576usize),
        ("down", 576, 1536),
        ("qkv", 960, 576),
    ];
    println!(
        "{:<8} {:>5} {:>6} | {:>12} {:>12} {:>12}",
        "matrix", "rows", "format", "quant GF/s", "f32 GF/s", "quant/f32"
    );
    for (name, out, inp) in shapes {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &d)?;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype)?;
            let packed = QuantMatrix::from_qtensor(&q)
                .expect("a Q4_1/Q8_0 tensor")
                .expect("taken")
                .packed();
            let wf = q.dequantize(&d)?;
            for rows in [1usize, 4, 8, 64, 512] {
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &d)?;
                let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut y = vec![0f32; rows * out];
                let tq = time(|| packed.gemv(&xv, &mut y, rows));
                let tf = time(|| {
                    let _ = x.matmul(&wf.t().unwrap()).unwrap();
                });
                let flops = 2.0 * (rows * inp * out) as f64;
                println!(
                    "{name:<8} {rows:>5} {:>6} | {:>12.1} {:>12.1} {:>11.2}x",
                    format!("{dtype:?}"),
                    flops / tq / 1e9,
                    flops / tf / 1e9,
                    tf / tq
                );
            }
        }
    }
    Ok(())
}
