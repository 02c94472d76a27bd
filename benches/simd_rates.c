// Peak issue rates of the instructions the CPU decode kernels are made of, one core: how many
// 256-bit `vpmaddubsw` (u8 x i8 pairs to i16: the AVX2 integer kernels' multiply), 128-bit
// `pmaddubsw`, 256-bit `vpmaddwd`, and 256-bit f32 FMAs retire per nanosecond, each in 12
// independent chains (more than any latency x width here), so throughput-bound, not
// latency-bound. Tells what a processor's AVX2 integer products can reach at most: on a CPU that
// splits 256-bit operations in two (AMD family 23 model 1), `vpmaddubsw` ymm retires at half the
// xmm rate. Built and run by benches/simd_rates.sh.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
#define ITERS 100000000L

int main(void) {
  __m256i a[CHAINS], u = _mm256_set1_epi8(1);
  __m128i b[CHAINS], ux = _mm_set1_epi8(1);
  __m256 f[CHAINS], fm = _mm256_set1_ps(1.0001f);
  for (int k = 0; k < CHAINS; k++) {
    a[k] = _mm256_set1_epi16(k);
    b[k] = _mm_set1_epi16(k);
    f[k] = _mm256_set1_ps(k);
  }
  double t = now();
  for (long i = 0; i < ITERS; i++)
    for (int k = 0; k < CHAINS; k++) a[k] = _mm256_maddubs_epi16(u, a[k]);
  t = now() - t;
  printf("vpmaddubsw ymm: %.2f per ns (%.1f GMAC/s)\n", ITERS * CHAINS / t / 1e9,
         ITERS * CHAINS * 32 / t / 1e9);
  t = now();
  for (long i = 0; i < ITERS; i++)
    for (int k = 0; k < CHAINS; k++) b[k] = _mm_maddubs_epi16(ux, b[k]);
  t = now() - t;
  printf("pmaddubsw xmm:  %.2f per ns (%.1f GMAC/s)\n", ITERS * CHAINS / t / 1e9,
         ITERS * CHAINS * 16 / t / 1e9);
  t = now();
  for (long i = 0; i < ITERS; i++)
    for (int k = 0; k < CHAINS; k++) a[k] = _mm256_madd_epi16(u, a[k]);
  t = now() - t;
  printf("vpmaddwd ymm:   %.2f per ns\n", ITERS * CHAINS / t / 1e9);
  t = now();
  for (long i = 0; i < ITERS; i++)
    for (int k = 0; k < CHAINS; k++) f[k] = _mm256_fmadd_ps(fm, f[k], fm);
  t = now() - t;
  printf("vfmadd ymm f32: %.2f per ns (%.1f GFLOP/s)\n", ITERS * CHAINS / t / 1e9,
         ITERS * CHAINS * 16 / t / 1e9);
  int sink = 0;
  for (int k = 0; k < CHAINS; k++)
    sink += _mm256_extract_epi16(a[k], 0) + _mm_extract_epi16(b[k], 0) + (int)f[k][0];
  return sink == 12345678;
}
