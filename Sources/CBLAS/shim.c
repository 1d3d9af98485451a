#include "CBLAS.h"
#include <cblas.h>
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define LORA_X86 1
#endif

typedef void (*sgemm_fn)(const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE, const enum CBLAS_TRANSPOSE,
                         const blasint, const blasint, const blasint, const float, const float *, const blasint,
                         const float *, const blasint, const float, float *, const blasint);
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);
typedef char *(*corename_fn)(void);

static sgemm_fn p_sgemm;
static set_threads_fn p_set_threads;
static get_threads_fn p_get_threads;
static corename_fn p_corename;

int lora_blas_load(const char *coretype, char *error, int errorLength) {
    if (p_sgemm) return 0;
    if (coretype) setenv("OPENBLAS_CORETYPE", coretype, 1);
    static const char *names[] = {"libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"};
    void *lib = NULL;
    for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]) && !lib; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        if (error && errorLength > 0) snprintf(error, errorLength, "%s", dlerror());
        return -1;
    }
    p_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    p_set_threads = (set_threads_fn)dlsym(lib, "openblas_set_num_threads");
    p_get_threads = (get_threads_fn)dlsym(lib, "openblas_get_num_threads");
    p_corename = (corename_fn)dlsym(lib, "openblas_get_corename");
    if (!p_sgemm || !p_set_threads || !p_get_threads || !p_corename) {
        if (error && errorLength > 0) snprintf(error, errorLength, "libopenblas lacks cblas_sgemm or openblas_* symbols");
        p_sgemm = NULL;
        return -2;
    }
    return 0;
}

const char *lora_blas_corename(void) { return p_corename ? p_corename() : "not loaded"; }
void lora_blas_set_threads(int threads) { if (p_set_threads) p_set_threads(threads); }
int lora_blas_threads(void) { return p_get_threads ? p_get_threads() : 0; }

void lora_sgemm(int transA, int transB, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    p_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

#ifdef LORA_X86
int lora_cpu_has_avx512_skx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    // EBX: F=16, DQ=17, CD=28, BW=30, VL=31
    unsigned need = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
    if ((b & need) != need) return 0;
    // The OS must save ZMM state: XCR0 bits 1,2 (SSE, AVX) and 5,6,7 (opmask, ZMM).
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xE6) == 0xE6;
}

int lora_cpu_has_avx512_bf16(void) {
    unsigned a, b, c, d;
    if (!lora_cpu_has_avx512_skx()) return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1;
}

int lora_cpu_has_avx2_fma(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int avx2 = (b >> 5) & 1;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return avx2 && ((c >> 12) & 1);
}
#else
int lora_cpu_has_avx512_skx(void) { return 0; }
int lora_cpu_has_avx512_bf16(void) { return 0; }
int lora_cpu_has_avx2_fma(void) { return 0; }
#endif
