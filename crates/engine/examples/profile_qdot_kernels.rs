//! The integer decode kernels alone (`qdot`), one thread, on SmolLM2-135M's matrix shapes (its
//! fused gate/up, down, fused q/k/v, and the 49152-row tied head, which does not fit a cache),
//! for every SIMD kernel set this CPU runs and 1, 4 and 8 activation rows: GFLOP/s counted as
//! 2·rows·in·out, best of 7 windows of 0.1 s. Then the activation quantizers (which run on one
//! thread before each product) at the same shapes: µs per call, fresh and reused buffers.
//! `cargo run --release -p vvlm-engine --example profile_qdot_kernels [-- FORMAT]` (FORMAT
//! `q4_1` or `q8_0`; both by default).
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;
use vvlm_engine::qdot::{Isa, Kernel, Q8Rows, Quantizer, TileOrder};
use vvlm_engine::quant::QuantMatrix;

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let only = std::env::args().nth(1);
    let shapes = [
        ("gate_up", 3072usize, 576usize),
        ("down", 576, 1536),
        ("qkv", 960, 576),
        ("head", 49152, 576),
    ];
    println!(
        "{:<8} {:>6} {:<11} {:>4} | {:>9} {:>10}",
        "matrix", "format", "kernels", "rows", "GFLOP/s", "us/call"
    );
    for (name, out, inp) in shapes {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &d)?;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let label = format!("{dtype:?}").to_lowercase();
            if only.as_ref().is_some_and(|o| *o != label) {
                continue;
            }
            let q = QTensor::quantize(&w, dtype)?;
            let matrix = QuantMatrix::from_qtensor(&q)
                .expect("a Q4_1/Q8_0 tensor")
                .expect("taken");
            // (The portable kernel, the SIMD kernels' scalar reference, runs at ~2 GFLOP/s.)
            for isa in Isa::all_available()
                .into_iter()
                .filter(|&i| i != Isa::Portable)
            {
                // Each kernel set on the record order that a CPU whose best it is packs.
                let packed = matrix.packed_in(TileOrder::for_kernels(isa));
                let tiled = packed.tiled();
                let kernel = Kernel::new(isa, tiled.format).expect("available");
                for rows in [1usize, 4, 8] {
                    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, inp), &d)?
                        .flatten_all()?
                        .to_vec1()?;
                    let xq = Q8Rows::quantize(&x, rows, inp);
                    let mut y = vec![0f32; rows * out];
                    let mut best = f64::MAX;
                    for _ in 0..7 {
                        let t = Instant::now();
                        let mut n = 0;
                        while t.elapsed().as_secs_f64() < 0.1 {
                            kernel.dot_tiles(tiled, 0..tiled.tiles(), &xq, &mut y);
                            n += 1;
                        }
                        best = best.min(t.elapsed().as_secs_f64() / n as f64);
                    }
                    println!(
                        "{name:<8} {label:>6} {:<11} {rows:>4} | {:>9.1} {:>10.1}",
                        format!("{isa:?}"),
                        2.0 * (rows * inp * out) as f64 / best / 1e9,
                        best * 1e6
                    );
                }
            }
        }
    }
    println!(
        "\n{:<6} {:>4} {:<9} | {:>12} {:>13}",
        "cols", "rows", "quantizer", "fresh us", "reused us"
    );
    for cols in [576usize, 1536] {
        for rows in [1usize, 8] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, cols), &d)?
                .flatten_all()?
                .to_vec1()?;
            for quantizer in Quantizer::all_available() {
                let best = |reuse: bool| {
                    let mut kept = Q8Rows::default();
                    let mut best = f64::MAX;
                    for _ in 0..7 {
                        let t = Instant::now();
                        let mut n = 0;
                        while t.elapsed().as_secs_f64() < 0.05 {
                            if reuse {
                                kept.requantize_with(quantizer, &x, rows, cols);
                            } else {
                                let mut fresh = Q8Rows::default();
                                fresh.requantize_with(quantizer, &x, rows, cols);
                                std::hint::black_box(&fresh);
                            }
                            n += 1;
                        }
                        best = best.min(t.elapsed().as_secs_f64() / n as f64);
                    }
                    best * 1e6
                };
                println!(
                    "{cols:<6} {rows:>4} {:<9} | {:>12.2} {:>13.2}",
                    format!("{quantizer:?}"),
                    best(false),
                    best(true)
                );
            }
        }
    }
    Ok(())
}
