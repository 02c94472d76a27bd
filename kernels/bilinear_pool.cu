// Bilinear s x s downsampling of each frame's g x g token grid, fused with the flatten:
// x [frames, g*g, dim] (row-major grid) -> y [frames, s*s, dim], equal to
// torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False) applied
// per channel. Per output index: src = max((dst + 0.5) * in / out - 0.5, 0), i0 = floor(src),
// i1 = min(i0 + 1, in - 1), l1 = src - i0, l0 = 1 - l1 (f32 arithmetic, as torch's opmath).
// Every product and sum is an explicit round-to-nearest operation (`__fmul_rn`, `__fadd_rn`),
// which nvcc never contracts into an FMA: contracted, `(dst + 0.5) * scale - 0.5` moved a weight
// by an ulp of src and the output by up to 7e-6 from the CPU's on an H200 (gpu-run's first
// smoke test); written so, the kernel is the CPU reference bit for bit in f32.
//
// The CPU reference is `vvlm_engine::pool::BilinearPool::cpu_fwd`, which follows the same
// arithmetic step by step; scripts/gpu-check compares the two on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dtype.cuh"
#include <stdint.h>

__device__ __forceinline__ void source_index(int dst, int in, int out, int* i0, int* i1, float* l1) {
    const float scale = (float)in / (float)out;
    float src = __fsub_rn(__fmul_rn(__fadd_rn((float)dst, 0.5f), scale), 0.5f);
    src = src < 0.0f ? 0.0f : src;
    int lo = (int)floorf(src);
    lo = lo > in - 1 ? in - 1 : lo;
    *i0 = lo;
    *i1 = lo < in - 1 ? lo + 1 : lo;
    *l1 = __fsub_rn(src, (float)lo);
}

// One thread per output element (consecutive threads walk the channel dimension, so every
// load and store is coalesced); a grid-stride loop covers any size.
template <typename T>
__device__ void bilinear_pool(const T* __restrict__ x, T* __restrict__ y, int frames, int grid,
                              int side, int dim) {
    const size_t total = (size_t)frames * side * side * dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)blockDim.x * gridDim.x) {
        const int d = (int)(idx % dim);
        size_t rest = idx / dim;
        const int ox = (int)(rest % side);
        rest /= side;
        const int oy = (int)(rest % side);
        const size_t t = rest / side;
        int y0, y1, x0, x1;
        float ly1, lx1;
        source_index(oy, grid, side, &y0, &y1, &ly1);
        source_index(ox, grid, side, &x0, &x1, &lx1);
        const float ly0 = __fsub_rn(1.0f, ly1), lx0 = __fsub_rn(1.0f, lx1);
        const T* f = x + t * (size_t)grid * grid * dim + d;
        const float a = load(f + ((size_t)y0 * grid + x0) * dim);
        const float b = load(f + ((size_t)y0 * grid + x1) * dim);
        const float c = load(f + ((size_t)y1 * grid + x0) * dim);
        const float e = load(f + ((size_t)y1 * grid + x1) * dim);
        const float top = __fadd_rn(__fmul_rn(lx0, a), __fmul_rn(lx1, b));
        const float bottom = __fadd_rn(__fmul_rn(lx0, c), __fmul_rn(lx1, e));
        store(y + idx, __fadd_rn(__fmul_rn(ly0, top), __fmul_rn(ly1, bottom)));
    }
}

extern "C" __global__ void bilinear_pool_f32(const float* x, float* y, int frames, int grid, int side, int dim) {
    bilinear_pool(x, y, frames, grid, side, dim);
}
extern "C" __global__ void bilinear_pool_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int frames, int grid, int side, int dim) {
    bilinear_pool(x, y, frames, grid, side, dim);
}
extern "C" __global__ void bilinear_pool_f16(const __half* x, __half* y, int frames, int grid, int side, int dim) {
    bilinear_pool(x, y, frames, grid, side, dim);
}
