#define _GNU_SOURCE
#include "CDNNL.h"
#include <oneapi/dnnl/dnnl.h>
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Every oneDNN function the shim calls, resolved with dlsym (the header gives their types).
#define DNNL_SYMBOLS(X)                                                                                        \
    X(dnnl_engine_create) X(dnnl_stream_create) X(dnnl_stream_wait) X(dnnl_matmul_desc_init)                  \
    X(dnnl_primitive_desc_create) X(dnnl_primitive_desc_destroy) X(dnnl_primitive_desc_query)                  \
    X(dnnl_primitive_desc_query_md) X(dnnl_primitive_create) X(dnnl_primitive_destroy)                        \
    X(dnnl_primitive_execute) X(dnnl_primitive_attr_create) X(dnnl_primitive_attr_destroy)                     \
    X(dnnl_primitive_attr_set_output_scales) X(dnnl_primitive_attr_set_post_ops) X(dnnl_post_ops_create)       \
    X(dnnl_post_ops_destroy) X(dnnl_post_ops_append_sum) X(dnnl_memory_desc_init_by_strides)                  \
    X(dnnl_memory_desc_init_by_tag) X(dnnl_memory_desc_get_size) X(dnnl_memory_desc_equal)                    \
    X(dnnl_memory_create) X(dnnl_memory_destroy) X(dnnl_memory_set_data_handle)                               \
    X(dnnl_reorder_primitive_desc_create) X(dnnl_convolution_forward_desc_init)                               \
    X(dnnl_convolution_backward_data_desc_init) X(dnnl_get_effective_cpu_isa) X(dnnl_version)

#define DECLARE(name) static __typeof__(&name) p_##name;
DNNL_SYMBOLS(DECLARE)
#undef DECLARE

static void (*p_omp_set_num_threads)(int);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int loadStatus = -1;
static char loadError[512] = "not loaded";
static char versionText[32] = "?";
static dnnl_engine_t engine;
static dnnl_stream_t stream;
static int wantedThreads = 1;
static __thread int appliedThreads;

// Time and work inside oneDNN, by kind (see lora_dnnl_stats). Updated under `lock`, like everything else here.
static lora_dnnl_counter counters[LORA_DNNL_COUNTERS];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void count(int kind, double since, double flops) {
    counters[kind].seconds += now() - since;
    counters[kind].flops += flops;
    counters[kind].calls += 1;
}

void lora_dnnl_stats(lora_dnnl_counter *out, int reset) {
    pthread_mutex_lock(&lock);
    memcpy(out, counters, sizeof counters);
    if (reset) memset(counters, 0, sizeof counters);
    pthread_mutex_unlock(&lock);
}

// libgomp reads OMP_WAIT_POLICY once, in its own initializer, and libvips loads it at program start (libvips →
// libimagequant → libgomp), before any code of ours runs: setting the variable in load() below came too late, and
// oneDNN's threads spun after every call (GOMP's default: ~300k spins), taking the core the engine's own threads
// needed next — ≈ 4 s of a 24 s bf16 1024² UNet forward (bench/RESULTS.md, "Generation"). An executable's
// DT_PREINIT_ARRAY functions run before any library's initializer; setenv there does not last (libc's own
// initializer, which runs next, resets the environment to the one the kernel passed), so when libgomp is already
// loaded and the user has not chosen a policy, the process re-executes itself at once with OMP_WAIT_POLICY=PASSIVE
// added (same pid, arguments and environment otherwise; nothing has been initialised yet, so nothing is lost).
static int isLibgomp(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    return info->dlpi_name && strstr(info->dlpi_name, "/libgomp.so") != NULL;
}

static void passiveWaitPolicy(int argc, char **argv, char **envp) {
    (void)argc;
    size_t n = 0;
    for (; envp[n]; n++)
        if (strncmp(envp[n], "OMP_WAIT_POLICY=", 16) == 0) return;   // the user's choice (or the re-executed process)
    if (!dl_iterate_phdr(isLibgomp, NULL)) return;   // load() sets the variable before libgomp comes in
    char **env = malloc((n + 2) * sizeof *env);
    if (!env) return;
    memcpy(env, envp, n * sizeof *env);
    env[n] = "OMP_WAIT_POLICY=PASSIVE";
    env[n + 1] = NULL;
    execve("/proc/self/exe", argv, env);
    free(env);   // exec failed (no /proc): run on with GOMP's default policy
}
__attribute__((section(".preinit_array"), used)) static void (*const preinitWaitPolicy)(int, char **, char **) =
    passiveWaitPolicy;

static void load(void) {
    // libgomp reads it when it loads (as a dependency of libdnnl, just below), unless it is loaded already (above).
    setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
    void *lib = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) lib = dlopen("libdnnl.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        snprintf(loadError, sizeof loadError, "%s", dlerror());
        return;
    }
#define RESOLVE(name)                                                                                          \
    p_##name = (__typeof__(&name))dlsym(lib, #name);                                                           \
    if (!p_##name) {                                                                                           \
        snprintf(loadError, sizeof loadError, "libdnnl lacks %s (oneDNN 2.x is needed)", #name);               \
        return;                                                                                                \
    }
    DNNL_SYMBOLS(RESOLVE)
#undef RESOLVE
    p_omp_set_num_threads = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
    const dnnl_version_t *v = p_dnnl_version();
    snprintf(versionText, sizeof versionText, "%d.%d.%d", v->major, v->minor, v->patch);
    if (v->cpu_runtime != DNNL_RUNTIME_OMP || !p_omp_set_num_threads) {
        snprintf(loadError, sizeof loadError, "libdnnl %s is not built on OpenMP; lora-dist cannot size its threads",
                 versionText);
        return;
    }
    if (p_dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success ||
        p_dnnl_stream_create(&stream, engine, dnnl_stream_default_flags) != dnnl_success) {
        snprintf(loadError, sizeof loadError, "libdnnl %s could not create its CPU engine", versionText);
        return;
    }
    loadStatus = 0;
}

int lora_dnnl_load(char *error, int errorLength) {
    pthread_once(&once, load);
    if (loadStatus != 0 && error && errorLength > 0) snprintf(error, errorLength, "%s", loadError);
    return loadStatus;
}

int lora_dnnl_isa(void) { return loadStatus == 0 ? (int)p_dnnl_get_effective_cpu_isa() : 0; }

int lora_dnnl_has_bf16(void) {
    int isa = lora_dnnl_isa();
    return (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
}

const char *lora_dnnl_version(void) { return versionText; }

void lora_dnnl_set_threads(int threads) { wantedThreads = threads < 1 ? 1 : threads; }

static void applyThreads(void) {
    if (appliedThreads != wantedThreads) {
        p_omp_set_num_threads(wantedThreads);
        appliedThreads = wantedThreads;
    }
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void lora_dnnl_to_bf16(const float *src, unsigned short *dst, size_t count) {
    size_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)v);
    }
    if (i < count) {
        __mmask16 m = (__mmask16)((1u << (count - i)) - 1);
        __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
        _mm256_mask_storeu_epi16(dst + i, m, (__m256i)v);
    }
}
#else
void lora_dnnl_to_bf16(const float *src, unsigned short *dst, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint32_t b;
        memcpy(&b, src + i, 4);
        if ((b & 0x7fffffffu) > 0x7f800000u) dst[i] = (unsigned short)((b >> 16) | 0x40);
        else dst[i] = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
    }
}
#endif

// Growable scratch buffers (used under `lock` only): 0 = A in bf16, 1 = B in bf16, 2 = a convolution's input
// in its primitive's layout, 3 = its output, 4 = a zero bias.
static void *scratch[5];
static size_t scratchBytes[5];

static void *scratchBuffer(int i, size_t bytes) {
    if (bytes > scratchBytes[i]) {
        free(scratch[i]);
        size_t rounded = (bytes + 4095) & ~(size_t)4095;
        if (posix_memalign(&scratch[i], 64, rounded) != 0) {
            scratch[i] = NULL;
            scratchBytes[i] = 0;
            return NULL;
        }
        scratchBytes[i] = rounded;
    }
    return scratch[i];
}

static void implName(const_dnnl_primitive_desc_t pd, char *out, size_t length) {
    const char *name = NULL;
    if (p_dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) == dnnl_success && name)
        snprintf(out, length, "%s", name);
    else
        snprintf(out, length, "?");
}

// MARK: - GEMM

typedef struct {
    int used, transA, transB, M, N, K, lda, ldb, ldc, hasBias;
    long batch, sA, sB, sC;  // batch 0: a plain 2-D product; otherwise [batch, ·, ·] with these batch strides
    float alpha, beta;
    dnnl_primitive_t prim;
    dnnl_memory_t a, b, c, bias;
    char info[64];
} gemm_entry;

#define GEMM_SLOTS 1024
static gemm_entry gemms[GEMM_SLOTS];

static int gemmMatches(const gemm_entry *e, const gemm_entry *k) {
    return e->used && e->transA == k->transA && e->transB == k->transB && e->M == k->M && e->N == k->N &&
           e->K == k->K && e->lda == k->lda && e->ldb == k->ldb && e->ldc == k->ldc && e->alpha == k->alpha &&
           e->beta == k->beta && e->hasBias == k->hasBias && e->batch == k->batch && e->sA == k->sA &&
           e->sB == k->sB && e->sC == k->sC;
}

// `k` holds the shape fields; `e` becomes a cache entry for them.
static dnnl_status_t gemmCreate(gemm_entry *e, const gemm_entry *k) {
    int tA = k->transA, tB = k->transB, M = k->M, N = k->N, K = k->K, lda = k->lda, ldb = k->ldb, ldc = k->ldc;
    float alpha = k->alpha, beta = k->beta;
    int hasBias = k->hasBias;
    dnnl_memory_desc_t a, b, c, bias;
    dnnl_dims_t biasd = {1, N}, biass = {N, 1};
    dnnl_status_t st;
    if (k->batch == 0) {
        dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
        dnnl_dims_t as = {tA ? 1 : lda, tA ? lda : 1}, bs = {tB ? 1 : ldb, tB ? ldb : 1}, cs = {ldc, 1};
        if ((st = p_dnnl_memory_desc_init_by_strides(&a, 2, ad, dnnl_bf16, as)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&b, 2, bd, dnnl_bf16, bs)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&c, 2, cd, dnnl_f32, cs)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&bias, 2, biasd, dnnl_f32, biass)))
            return st;
    } else {
        dnnl_dims_t ad = {k->batch, M, K}, bd = {k->batch, K, N}, cd = {k->batch, M, N};
        dnnl_dims_t as = {k->sA, tA ? 1 : lda, tA ? lda : 1}, bs = {k->sB, tB ? 1 : ldb, tB ? ldb : 1},
                    cs = {k->sC, ldc, 1};
        if ((st = p_dnnl_memory_desc_init_by_strides(&a, 3, ad, dnnl_bf16, as)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&b, 3, bd, dnnl_bf16, bs)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&c, 3, cd, dnnl_f32, cs)) ||
            (st = p_dnnl_memory_desc_init_by_strides(&bias, 2, biasd, dnnl_f32, biass)))
            return st;
        hasBias = 0;
    }
    dnnl_matmul_desc_t desc;
    if ((st = p_dnnl_matmul_desc_init(&desc, &a, &b, hasBias ? &bias : NULL, &c))) return st;
    dnnl_primitive_attr_t attr;
    if ((st = p_dnnl_primitive_attr_create(&attr))) return st;
    dnnl_post_ops_t ops = NULL;
    if (alpha != 1.0f) st = p_dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha);
    if (!st && beta != 0.0f) {
        // C = alpha·A·B + beta·C: the sum post-op adds beta times what dst held before.
        if (!(st = p_dnnl_post_ops_create(&ops)) && !(st = p_dnnl_post_ops_append_sum(ops, beta)))
            st = p_dnnl_primitive_attr_set_post_ops(attr, ops);
    }
    dnnl_primitive_desc_t pd = NULL;
    if (!st) st = p_dnnl_primitive_desc_create(&pd, &desc, attr, engine, NULL);
    if (ops) p_dnnl_post_ops_destroy(ops);
    p_dnnl_primitive_attr_destroy(attr);
    if (st) return st;
    implName(pd, e->info, sizeof e->info);
    st = p_dnnl_primitive_create(&e->prim, pd);
    if (!st) st = p_dnnl_memory_create(&e->a, &a, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->b, &b, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->c, &c, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->bias, &bias, engine, DNNL_MEMORY_NONE);
    p_dnnl_primitive_desc_destroy(pd);
    if (st) return st;
    char info[64];
    memcpy(info, e->info, sizeof info);
    dnnl_primitive_t prim = e->prim;
    dnnl_memory_t ma = e->a, mb = e->b, mc = e->c, mbias = e->bias;
    *e = *k;
    memcpy(e->info, info, sizeof info);
    e->prim = prim, e->a = ma, e->b = mb, e->c = mc, e->bias = mbias;
    e->used = 1;
    return dnnl_success;
}

static void gemmRelease(gemm_entry *e) {
    if (!e->used) return;
    p_dnnl_primitive_destroy(e->prim);
    p_dnnl_memory_destroy(e->a);
    p_dnnl_memory_destroy(e->b);
    p_dnnl_memory_destroy(e->c);
    p_dnnl_memory_destroy(e->bias);
    memset(e, 0, sizeof *e);
}

// A [rows, cols] fp32 with row stride ld → packed bf16 [rows, cols].
static void packBF16(const float *src, int rows, int cols, int ld, unsigned short *dst) {
    if (ld == cols) {
        lora_dnnl_to_bf16(src, dst, (size_t)rows * cols);
        return;
    }
    for (int r = 0; r < rows; r++) lora_dnnl_to_bf16(src + (size_t)r * ld, dst + (size_t)r * cols, cols);
}

// The cached primitive for `key`'s shape, created on first use (NULL with *st set on failure). Under `lock`.
static gemm_entry *gemmFind(const gemm_entry *key, dnnl_status_t *st) {
    uint64_t h = 1469598103934665603ull;
    long fields[14] = {key->transA, key->transB, key->M, key->N, key->K, key->lda, key->ldb, key->ldc,
                       (long)(key->beta * 7) + (key->alpha != 1.0f ? 13 : 0), key->hasBias, key->batch, key->sA,
                       key->sB, key->sC};
    for (int i = 0; i < 14; i++) h = (h ^ (uint64_t)fields[i]) * 1099511628211ull;
    for (int probe = 0; probe < 16; probe++) {
        gemm_entry *s = &gemms[(h + probe) % GEMM_SLOTS];
        if (gemmMatches(s, key)) return s;
        if (!s->used) return (*st = gemmCreate(s, key)) ? NULL : s;
    }
    gemm_entry *e = &gemms[h % GEMM_SLOTS];  // 16 colliding shapes: replace the first.
    gemmRelease(e);
    return (*st = gemmCreate(e, key)) ? NULL : e;
}

int lora_dnnl_gemm(int transA, int transB, int M, int N, int K, float alpha,
                   const void *A, int aIsBF16, int lda, const void *B, int bIsBF16, int ldb,
                   float beta, float *C, int ldc, const float *bias, char *info) {
    if (loadStatus != 0) return dnnl_runtime_error;
    if (M == 0 || N == 0) return 0;
    if (bias && (alpha != 1.0f || beta != 0.0f)) return dnnl_invalid_arguments;
    if (K == 0 && bias) {
        for (int i = 0; i < M; i++) memcpy(C + (size_t)i * ldc, bias, (size_t)N * 4);
        return 0;
    }
    if (K == 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = beta == 0 ? 0 : beta * C[(size_t)i * ldc + j];
        return 0;
    }
    pthread_mutex_lock(&lock);
    applyThreads();
    dnnl_status_t st = dnnl_success;
    gemm_entry *e = NULL;
    // fp32 operands are converted into packed bf16 copies that keep their orientation.
    const void *a = A, *b = B;
    double t0 = now();
    if (!aIsBF16) {
        int rows = transA ? K : M, cols = transA ? M : K;
        unsigned short *buf = scratchBuffer(0, (size_t)rows * cols * 2);
        if (!buf) { pthread_mutex_unlock(&lock); return dnnl_out_of_memory; }
        packBF16((const float *)A, rows, cols, lda, buf);
        a = buf, lda = cols;
    }
    if (!bIsBF16) {
        int rows = transB ? N : K, cols = transB ? K : N;
        unsigned short *buf = scratchBuffer(1, (size_t)rows * cols * 2);
        if (!buf) { pthread_mutex_unlock(&lock); return dnnl_out_of_memory; }
        packBF16((const float *)B, rows, cols, ldb, buf);
        b = buf, ldb = cols;
    }
    if (!aIsBF16 || !bIsBF16) count(LORA_DNNL_PACK, t0, 0);
    gemm_entry key = {0};
    key.transA = transA, key.transB = transB, key.M = M, key.N = N, key.K = K, key.lda = lda, key.ldb = ldb;
    key.ldc = ldc, key.alpha = alpha, key.beta = beta, key.hasBias = bias != NULL;
    e = gemmFind(&key, &st);
    if (!e) goto done;
    p_dnnl_memory_set_data_handle(e->a, (void *)a);
    p_dnnl_memory_set_data_handle(e->b, (void *)b);
    p_dnnl_memory_set_data_handle(e->c, C);
    p_dnnl_memory_set_data_handle(e->bias, (void *)bias);
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->a}, {DNNL_ARG_WEIGHTS, e->b}, {DNNL_ARG_DST, e->c},
                               {DNNL_ARG_BIAS, e->bias}};
    t0 = now();
    st = p_dnnl_primitive_execute(e->prim, stream, e->hasBias ? 4 : 3, args);
    if (!st) st = p_dnnl_stream_wait(stream);
    count(LORA_DNNL_MATMUL, t0, 2.0 * M * N * K);
    if (info) snprintf(info, 256, "%s", e->info);
done:
    pthread_mutex_unlock(&lock);
    return st;
}

int lora_dnnl_gemm_batched(int batch, int transA, int transB, int M, int N, int K, float alpha,
                           const unsigned short *A, int lda, long strideA, const unsigned short *B, int ldb, long strideB,
                           float beta, float *C, int ldc, long strideC, char *info) {
    if (loadStatus != 0) return dnnl_runtime_error;
    if (batch <= 0 || M == 0 || N == 0) return 0;
    if (K == 0) {
        for (long p = 0; p < batch; p++)
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) {
                    float *c = C + p * strideC + (size_t)i * ldc + j;
                    *c = beta == 0 ? 0 : beta * *c;
                }
        return 0;
    }
    pthread_mutex_lock(&lock);
    applyThreads();
    dnnl_status_t st = dnnl_success;
    gemm_entry key = {0};
    key.transA = transA, key.transB = transB, key.M = M, key.N = N, key.K = K, key.lda = lda, key.ldb = ldb;
    key.ldc = ldc, key.alpha = alpha, key.beta = beta, key.batch = batch, key.sA = strideA, key.sB = strideB;
    key.sC = strideC;
    gemm_entry *e = gemmFind(&key, &st);
    if (!e) goto done;
    p_dnnl_memory_set_data_handle(e->a, (void *)A);
    p_dnnl_memory_set_data_handle(e->b, (void *)B);
    p_dnnl_memory_set_data_handle(e->c, C);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, e->a}, {DNNL_ARG_WEIGHTS, e->b}, {DNNL_ARG_DST, e->c}};
    double t0 = now();
    st = p_dnnl_primitive_execute(e->prim, stream, 3, args);
    if (!st) st = p_dnnl_stream_wait(stream);
    count(LORA_DNNL_BATCHED, t0, 2.0 * batch * M * N * K);
    if (info) snprintf(info, 256, "%s", e->info);
done:
    pthread_mutex_unlock(&lock);
    return st;
}

// MARK: - Convolution

typedef struct {
    int used, backward;
    lora_conv_shape s;
    dnnl_primitive_t prim, reorderIn, reorderOut;  // reorders: NULL when the layouts already match
    dnnl_memory_desc_t weights;                    // the layout prepared weights must have
    dnnl_memory_t inUser, inConv, w, bias, outConv, outUser;
    size_t inBytes, outBytes;
    char info[96];
} conv_entry;

#define CONV_SLOTS 1024
static conv_entry convs[CONV_SLOTS];

static void convRelease(conv_entry *e) {
    if (!e->used) return;
    p_dnnl_primitive_destroy(e->prim);
    if (e->reorderIn) p_dnnl_primitive_destroy(e->reorderIn);
    if (e->reorderOut) p_dnnl_primitive_destroy(e->reorderOut);
    dnnl_memory_t ms[6] = {e->inUser, e->inConv, e->w, e->bias, e->outConv, e->outUser};
    for (int i = 0; i < 6; i++) p_dnnl_memory_destroy(ms[i]);
    memset(e, 0, sizeof *e);
}

static int outSize(int n, int k, int s, int p) { return (n + 2 * p - k) / s + 1; }

// The activations' layout inside oneDNN: `any` lets it choose (nChw16c on AVX-512); LORA_DIST_DNNL_CONV_LAYOUT=nhwc
// forces NHWC (its brgconv kernels).
static dnnl_format_tag_t convLayout(void) {
    const char *v = getenv("LORA_DIST_DNNL_CONV_LAYOUT");
    return v && strcmp(v, "nhwc") == 0 ? dnnl_nhwc : dnnl_format_tag_any;
}

static dnnl_status_t reorderBetween(const dnnl_memory_desc_t *from, const dnnl_memory_desc_t *to,
                                    dnnl_primitive_t *out) {
    if (p_dnnl_memory_desc_equal(from, to)) { *out = NULL; return dnnl_success; }
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = p_dnnl_reorder_primitive_desc_create(&pd, from, engine, to, engine, NULL);
    if (st) return st;
    st = p_dnnl_primitive_create(out, pd);
    p_dnnl_primitive_desc_destroy(pd);
    return st;
}

static dnnl_status_t convCreate(conv_entry *e, const lora_conv_shape *s, int backward) {
    int ho = outSize(s->h, s->kh, s->stride, s->padding), wo = outSize(s->w, s->kw, s->stride, s->padding);
    dnnl_dims_t xd = {s->n, s->cin, s->h, s->w}, wd = {s->cout, s->cin, s->kh, s->kw}, bd = {s->cout};
    dnnl_dims_t yd = {s->n, s->cout, ho, wo};
    dnnl_dims_t strides = {s->stride, s->stride}, pl = {s->padding, s->padding};
    dnnl_dims_t pr = {(ho - 1) * s->stride + s->kh - s->h - s->padding, (wo - 1) * s->stride + s->kw - s->w - s->padding};
    dnnl_format_tag_t layout = convLayout();
    dnnl_memory_desc_t xb, xf, wb, b, yb, yf, xUser, yUser;
    dnnl_status_t st;
    if ((st = p_dnnl_memory_desc_init_by_tag(&xb, 4, xd, dnnl_bf16, layout)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&xf, 4, xd, dnnl_f32, layout)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&wb, 4, wd, dnnl_bf16, dnnl_format_tag_any)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&b, 1, bd, dnnl_f32, dnnl_x)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&yb, 4, yd, dnnl_bf16, layout)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&yf, 4, yd, dnnl_f32, layout)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&xUser, 4, xd, dnnl_f32, dnnl_nchw)) ||
        (st = p_dnnl_memory_desc_init_by_tag(&yUser, 4, yd, dnnl_f32, dnnl_nchw)))
        return st;
    // Forward: bf16 x, bf16 w → fp32 y (+ fp32 bias, always present: a zero one when the layer has none).
    dnnl_convolution_desc_t fwd;
    if ((st = p_dnnl_convolution_forward_desc_init(&fwd, dnnl_forward_training, dnnl_convolution_direct, &xb, &wb,
                                                   &b, &yf, strides, pl, pr)))
        return st;
    dnnl_primitive_desc_t fpd;
    if ((st = p_dnnl_primitive_desc_create(&fpd, &fwd, NULL, engine, NULL))) return st;
    dnnl_primitive_desc_t pd = fpd;
    const dnnl_memory_desc_t *in, *out;
    if (backward) {
        // Input gradient: bf16 dY, bf16 w → fp32 dX; the forward descriptor is its hint.
        dnnl_convolution_desc_t bwd;
        st = p_dnnl_convolution_backward_data_desc_init(&bwd, dnnl_convolution_direct, &xf, &wb, &yb, strides, pl, pr);
        if (!st) st = p_dnnl_primitive_desc_create(&pd, &bwd, NULL, engine, fpd);
        p_dnnl_primitive_desc_destroy(fpd);
        if (st) return st;
        in = p_dnnl_primitive_desc_query_md(pd, dnnl_query_diff_dst_md, 0);
        out = p_dnnl_primitive_desc_query_md(pd, dnnl_query_diff_src_md, 0);
    } else {
        in = p_dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
        out = p_dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    }
    e->weights = *p_dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    implName(pd, e->info, sizeof e->info);
    const dnnl_memory_desc_t *inUser = backward ? &yUser : &xUser, *outUser = backward ? &xUser : &yUser;
    e->inBytes = p_dnnl_memory_desc_get_size(in);
    e->outBytes = p_dnnl_memory_desc_get_size(out);
    st = p_dnnl_primitive_create(&e->prim, pd);
    if (!st) st = reorderBetween(inUser, in, &e->reorderIn);
    if (!st) st = reorderBetween(out, outUser, &e->reorderOut);
    if (!st) st = p_dnnl_memory_create(&e->inUser, inUser, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->inConv, in, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->w, &e->weights, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->bias, &b, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->outConv, out, engine, DNNL_MEMORY_NONE);
    if (!st) st = p_dnnl_memory_create(&e->outUser, outUser, engine, DNNL_MEMORY_NONE);
    p_dnnl_primitive_desc_destroy(pd);
    if (st) return st;  // (a failed entry's partial objects are leaked: creation fails only on bad shapes)
    e->used = 1;
    e->backward = backward;
    e->s = *s;
    return dnnl_success;
}

// The entry for (shape, direction), created on first use. Called under `lock`.
static conv_entry *convEntry(const lora_conv_shape *s, int backward, dnnl_status_t *st) {
    uint64_t h = 1469598103934665603ull;
    const int *k = (const int *)s;
    for (size_t i = 0; i < sizeof *s / sizeof(int); i++) h = (h ^ (uint32_t)k[i]) * 1099511628211ull;
    h = (h ^ (uint32_t)backward) * 1099511628211ull;
    for (int probe = 0; probe < 16; probe++) {
        conv_entry *e = &convs[(h + probe) % CONV_SLOTS];
        if (e->used && e->backward == backward && memcmp(&e->s, s, sizeof *s) == 0) return e;
        if (!e->used) {
            *st = convCreate(e, s, backward);
            return *st ? NULL : e;
        }
    }
    // 16 colliding geometries (every bucket size makes its own): replace the first. Prepared weights stay valid: a
    // geometry's primitive is recreated with the same weights layout.
    conv_entry *e = &convs[h % CONV_SLOTS];
    convRelease(e);
    *st = convCreate(e, s, backward);
    return *st ? NULL : e;
}

typedef struct {
    size_t bytes;
    int backward;
    dnnl_memory_desc_t layout;
    void *data;
} prepared_weights;

static uint64_t layoutHash(const dnnl_memory_desc_t *md) {
    // The descriptor is plain data that oneDNN fills completely (zeros where unused).
    uint64_t h = 1469598103934665603ull;
    const unsigned char *b = (const unsigned char *)md;
    for (size_t i = 0; i < sizeof *md; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

unsigned long long lora_dnnl_conv_weights_layout(const lora_conv_shape *s, int backward, int *status) {
    if (loadStatus != 0) return 0;
    pthread_mutex_lock(&lock);
    applyThreads();
    dnnl_status_t st = dnnl_success;
    conv_entry *e = convEntry(s, backward, &st);
    uint64_t h = e ? layoutHash(&e->weights) : 0;
    if (status) *status = st;
    pthread_mutex_unlock(&lock);
    return h;
}

void *lora_dnnl_conv_prepare(const lora_conv_shape *s, int backward, const void *w, int wIsBF16, size_t *bytes,
                             int *status) {
    if (loadStatus != 0) return NULL;
    pthread_mutex_lock(&lock);
    applyThreads();
    dnnl_status_t st = dnnl_success;
    prepared_weights *p = NULL;
    conv_entry *e = convEntry(s, backward, &st);
    if (!e) goto done;
    dnnl_dims_t wd = {s->cout, s->cin, s->kh, s->kw};
    dnnl_memory_desc_t user;
    if ((st = p_dnnl_memory_desc_init_by_tag(&user, 4, wd, wIsBF16 ? dnnl_bf16 : dnnl_f32, dnnl_oihw))) goto done;
    p = calloc(1, sizeof *p);
    p->bytes = p_dnnl_memory_desc_get_size(&e->weights);
    p->backward = backward;
    p->layout = e->weights;
    if (posix_memalign(&p->data, 64, p->bytes) != 0) { free(p); p = NULL; goto done; }
    dnnl_primitive_t reorder;
    dnnl_memory_t from, to;
    if ((st = reorderBetween(&user, &e->weights, &reorder)) == dnnl_success) {
        if (!reorder) {
            memcpy(p->data, w, p->bytes);
        } else {
            p_dnnl_memory_create(&from, &user, engine, (void *)w);
            p_dnnl_memory_create(&to, &e->weights, engine, p->data);
            dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
            p_dnnl_primitive_execute(reorder, stream, 2, args);
            p_dnnl_stream_wait(stream);
            p_dnnl_memory_destroy(from);
            p_dnnl_memory_destroy(to);
            p_dnnl_primitive_destroy(reorder);
        }
        if (bytes) *bytes = p->bytes;
    } else {
        free(p->data);
        free(p);
        p = NULL;
    }
done:
    if (status) *status = st;
    pthread_mutex_unlock(&lock);
    return p;
}

void lora_dnnl_conv_release(void *prepared) {
    prepared_weights *p = prepared;
    if (!p) return;
    free(p->data);
    free(p);
}

static dnnl_status_t reorderInto(dnnl_primitive_t r, dnnl_memory_t from, dnnl_memory_t to) {
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
    return p_dnnl_primitive_execute(r, stream, 2, args);
}

static int convRun(const lora_conv_shape *s, int backward, const float *in, const void *prepared, const float *bias,
                   float *out, char *info) {
    const prepared_weights *p = prepared;
    if (loadStatus != 0 || !p || p->backward != backward) return dnnl_invalid_arguments;
    pthread_mutex_lock(&lock);
    applyThreads();
    dnnl_status_t st = dnnl_success;
    conv_entry *e = convEntry(s, backward, &st);
    if (!e) goto done;
    if (!p_dnnl_memory_desc_equal(&p->layout, &e->weights)) { st = dnnl_invalid_arguments; goto done; }
    p_dnnl_memory_set_data_handle(e->inUser, (void *)in);
    double t0 = now();
    if (e->reorderIn) {
        void *buf = scratchBuffer(2, e->inBytes);
        if (!buf) { st = dnnl_out_of_memory; goto done; }
        p_dnnl_memory_set_data_handle(e->inConv, buf);
        if ((st = reorderInto(e->reorderIn, e->inUser, e->inConv))) goto done;
        count(LORA_DNNL_REORDER, t0, 0);
    } else {
        p_dnnl_memory_set_data_handle(e->inConv, (void *)in);
    }
    void *o = out;
    if (e->reorderOut) {
        o = scratchBuffer(3, e->outBytes);
        if (!o) { st = dnnl_out_of_memory; goto done; }
    }
    p_dnnl_memory_set_data_handle(e->outConv, o);
    p_dnnl_memory_set_data_handle(e->w, p->data);
    int ho = outSize(s->h, s->kh, s->stride, s->padding), wo = outSize(s->w, s->kw, s->stride, s->padding);
    double flops = 2.0 * s->n * s->cout * ho * wo * s->cin * s->kh * s->kw;
    t0 = now();
    if (backward) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_DIFF_DST, e->inConv}, {DNNL_ARG_WEIGHTS, e->w}, {DNNL_ARG_DIFF_SRC, e->outConv}};
        st = p_dnnl_primitive_execute(e->prim, stream, 3, args);
    } else {
        if (!bias) {
            float *zero = scratchBuffer(4, (size_t)s->cout * 4);
            if (!zero) { st = dnnl_out_of_memory; goto done; }
            memset(zero, 0, (size_t)s->cout * 4);
            bias = zero;
        }
        p_dnnl_memory_set_data_handle(e->bias, (void *)bias);
        dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->inConv}, {DNNL_ARG_WEIGHTS, e->w}, {DNNL_ARG_BIAS, e->bias},
                                   {DNNL_ARG_DST, e->outConv}};
        st = p_dnnl_primitive_execute(e->prim, stream, 4, args);
    }
    if (!st) st = p_dnnl_stream_wait(stream);
    if (!st) count(backward ? LORA_DNNL_CONV_BACKWARD_DATA : LORA_DNNL_CONV_FORWARD, t0, flops);
    if (!st && e->reorderOut) {
        t0 = now();
        p_dnnl_memory_set_data_handle(e->outUser, out);
        st = reorderInto(e->reorderOut, e->outConv, e->outUser);
        if (!st) st = p_dnnl_stream_wait(stream);
        count(LORA_DNNL_REORDER, t0, 0);
    }
    if (info) snprintf(info, 256, "%s", e->info);
done:
    pthread_mutex_unlock(&lock);
    return st;
}

int lora_dnnl_conv_forward(const lora_conv_shape *s, const float *x, const void *prepared, const float *bias, float *y,
                           char *info) {
    return convRun(s, 0, x, prepared, bias, y, info);
}

int lora_dnnl_conv_backward_data(const lora_conv_shape *s, const float *dy, const void *prepared, float *dx, char *info) {
    return convRun(s, 1, dy, prepared, NULL, dx, info);
}
