// A linear layer's epilogue in one pass over its output (instead of a bias add, then the
// activation or the residual add, each reading and writing the whole output):
//   bias_gelu_tanh: out = gelu_tanh(y + bias)     (SigLIP's fc1, the projector's first layer)
//   bias_residual:  out = residual + (y + bias)   (SigLIP's out-projection and fc2)
//   swiglu:         out = silu(g) * u of gate_up = [g | u] rows [rows, 2 cols] (Llama's MLP:
//                   one pass and one launch instead of a SiLU over a strided view and a multiply)
// in f32 arithmetic, rounded once to T. y, residual, out: [rows, cols] contiguous; bias: [cols].
// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as transformers'
// gelu_pytorch_tanh and candle's gelu.
//
// CPU reference: `vvlm_engine::nn::BiasGeluTanh::cpu_fwd` / `BiasResidual::cpu_fwd` /
// `SwigluDevice::cpu_fwd` (the same
// formulas, checked in CI against candle's ops); crates/engine/tests/cuda_parity.rs compares.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include "dtype.cuh"

template <typename T>
__device__ void bias_gelu_tanh(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                               long long n, int cols) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = load(y + i) + load(bias + i % cols);
        store(out + i, 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))));
    }
}

template <typename T>
__device__ void bias_residual(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ residual,
                              T* __restrict__ out, long long n, int cols) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        store(out + i, load(residual + i) + (load(y + i) + load(bias + i % cols)));
    }
}

template <typename T>
__device__ void swiglu(const T* __restrict__ gu, T* __restrict__ out, long long n, int cols) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / cols, c = i % cols;
        const float g = load(gu + row * 2 * cols + c), u = load(gu + row * 2 * cols + cols + c);
        store(out + i, g / (1.0f + expf(-g)) * u);
    }
}

#define EPILOGUES(SUFFIX, T)                                                                              \
    extern "C" __global__ void bias_gelu_tanh_##SUFFIX(const T* y, const T* bias, T* out, long long n,     \
                                                       int cols) {                                         \
        bias_gelu_tanh(y, bias, out, n, cols);                                                             \
    }                                                                                                      \
    extern "C" __global__ void bias_residual_##SUFFIX(const T* y, const T* bias, const T* residual, T* out, \
                                                      long long n, int cols) {                             \
        bias_residual(y, bias, residual, out, n, cols);                                                    \
    }                                                                                                      \
    extern "C" __global__ void swiglu_##SUFFIX(const T* gu, T* out, long long n, int cols) {               \
        swiglu(gu, out, n, cols);                                                                          \
    }

EPILOGUES(f32, float)
EPILOGUES(bf16, __nv_bfloat16)
EPILOGUES(f16, __half)
