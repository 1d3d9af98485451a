// The machine's fp32 and bf16 arithmetic peaks, for bench/bf16/report.py: every thread runs independent chains of
// vfmadd231ps zmm (16 fp32 multiply-adds = 32 FLOP per instruction) or vdpbf16ps zmm (32 bf16 products summed
// pairwise into 16 fp32 lanes = 64 FLOP per instruction); 12 accumulators hide the latency.
//   cc -O2 -fopenmp -mavx512f -mavx512bf16 bench/bf16/peak.c -o bench/out/peak && bench/out/peak 2
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12
#define ITERS 20000000L

static double fp32(void) {
    __m512 acc[CHAINS], a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < ITERS; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

static double bf16(void) {
    __m512 acc[CHAINS];
    __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(0.5f));
    __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.25f), _mm512_set1_ps(1e-3f));
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < ITERS; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    omp_set_num_threads(threads);
    for (int kind = 0; kind < 2; kind++) {
        double best = 0, sink = 0;
        for (int rep = 0; rep < 3; rep++) {
            double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
            sink += kind == 0 ? fp32() : bf16();
            double t = omp_get_wtime() - t0;
            double flops = (double)threads * ITERS * CHAINS * (kind == 0 ? 32.0 : 64.0);
            if (flops / t > best) best = flops / t;
        }
        printf("{\"peak\":\"%s\",\"threads\":%d,\"gflops\":%.1f,\"sink\":%g}\n", kind == 0 ? "fp32_fma" : "bf16_dot",
               threads, best / 1e9, sink);
    }
    return 0;
}
