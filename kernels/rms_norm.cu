// RMSNorm for bf16/f16 activations with the engine's f32 semantics in one pass (one block per
// row) instead of nine ops (to f32, square, sum, scale, + eps, sqrt, divide, back, times the
// weight): per row of x [rows, n],
//   s = sum_j x_j^2 (f32);  r = sqrt(s * (1/n) + eps);
//   out_j = T(T(x_j / r) * w_j)     (the normalised value rounded to T, then the product)
// as `vvlm_engine::nn::RmsNorm` computes it for non-f32 inputs (transformers' LlamaRMSNorm:
// the f32 result cast to the input dtype, then multiplied by the weight in that dtype).
//
// CPU reference: `vvlm_engine::nn::RmsNormLowPrecision::cpu_fwd` (the same formula, checked in
// CI against the composition); crates/engine/tests/cuda_parity.rs compares the two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include "dtype.cuh"

__device__ __forceinline__ float round_to(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float round_to(float v, const __half*) { return __half2float(__float2half(v)); }

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int n, float eps) {
    __shared__ float partial[32];
    const T* xr = x + (long long)blockIdx.x * n;
    T* orow = out + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = load(xr + j);
        s = fmaf(v, v, s);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) partial[0] = s;
    }
    __syncthreads();
    const float r = sqrtf(partial[0] * (1.0f / (float)n) + eps);  // s * (1/n), as candle's mean
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float normed = round_to(load(xr + j) / r, xr);
        store(orow + j, normed * load(w + j));
    }
}

extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int n, float eps) {
    rms_norm(x, w, out, n, eps);
}
extern "C" __global__ void rms_norm_f16(const __half* x, const __half* w, __half* out, int n, float eps) {
    rms_norm(x, w, out, n, eps);
}
