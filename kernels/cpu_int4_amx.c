/* 4-bit weights x bf16 activations on CPUs with AMX (Intel Sapphire Rapids and later).
 *
 * y[m, n] = sum_k x[m, k] * (u[n, k] - off[g, n]) * scale[g, n],  g = k / group,
 * u in 0..15 the stored code, off = 8 + zero point. x and y are bf16, row-major.
 *
 * Each 4-bit weight becomes bf16 once per call, exactly and cheaply: the bf16 bit pattern
 * 0x4300 | u is the number 128 + u. For every 32 k of a block of 16 columns the codes fill a
 * 16 x 32 bf16 tile (row p: the pair k + 2p, k + 2p + 1 of each column, interleaved as
 * tdpbf16ps takes them), x's rows (up to 16) a second tile read in place, and the tile
 * product adds sum(x * (128 + u)) in fp32. At the end of each group the sums are stored,
 * corrected by (128 + off) * sum(x) over the group and scaled into per-row fp32 registers;
 * the products are exact in fp32 (8-bit significands), so the result is the dequantized
 * matmul summed in fp32, rounded once to bf16. Rows beyond 16 take further passes.
 * torch's int4 matmul instead converts every weight again for each 4 rows of x.
 *
 * Weight layout (built by llmzip.kernels.cpu_int4_amx.pack): columns in blocks of 16, K in
 * chunks of 4; chunk c of column block b is 32 bytes at packed[(b * K/4 + c) * 32]; byte w
 * holds the code of column 16 b + w / 2 at k = 4 c + w % 2 in its low nibble and at
 * k = 4 c + 2 + w % 2 in its high nibble. Widened to 16-bit lanes, the low nibbles form one
 * tile row (the pair 4c, 4c + 1) and the high nibbles the next (4c + 2, 4c + 3).
 *
 * Built at first use by llmzip.kernels.cpu_int4_amx (gcc -fopenmp; the OpenMP runtime is
 * the one torch has loaded, so both share one thread pool).
 */
#define _GNU_SOURCE /* syscall */
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROWS 16 /* rows of x per pass over the weights: a tile's rows */
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

int llmzip_amx_ready(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0; /* AMX-BF16, AMX-TILE */
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512bf16")) return 0;
    /* Linux hands the tile state only to processes that ask (ARCH_REQ_XCOMP_PERM, XTILEDATA). */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* NB (1 or 2) adjacent blocks of 16 columns at once: tiles 0..NB-1 accumulate them, tile 2
 * holds x, tiles 3..3+NB-1 the weights; two blocks give the tile unit two independent
 * chains of products. */
static inline __attribute__((always_inline)) AMX_TARGET void amx_blocks(
    const uint16_t *x, int64_t K, const uint8_t *w, const float *scale, const float *off, int64_t N,
    int64_t group, const float *xs, int64_t G, uint16_t *y, const int M, const int NB, uint16_t *bbuf,
    float *cbuf) {
    const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const __m512 b128 = _mm512_set1_ps(128.0f);
    const int64_t chunks = group / 4, block_bytes = (K / 4) * 32;
    __m512 out[2][ROWS];
    for (int j = 0; j < NB; j++)
        for (int m = 0; m < M; m++) out[j][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        _tile_zero(0);
        if (NB == 2) _tile_zero(1);
        for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
            for (int j = 0; j < NB; j++) {
                const uint8_t *wc = w + j * block_bytes + (g * chunks + c0) * 32;
                uint16_t *bj = bbuf + j * 16 * 32;
                for (int c = 0; c < 8; c++) {
                    __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wc + c * 32)));
                    _mm512_store_si512(bj + (2 * c) * 32, _mm512_ternarylogic_epi32(u, low, bias, 0xEA));
                    _mm512_store_si512(bj + (2 * c + 1) * 32, _mm512_or_si512(_mm512_srli_epi16(u, 4), bias));
                }
            }
            _tile_loadd(2, x + g * group + 4 * c0, K * 2);
            _tile_loadd(3, bbuf, 64);
            _tile_dpbf16ps(0, 2, 3);
            if (NB == 2) {
                _tile_loadd(4, bbuf + 16 * 32, 64);
                _tile_dpbf16ps(1, 2, 4);
            }
        }
        _tile_stored(0, cbuf, 64);
        if (NB == 2) _tile_stored(1, cbuf + ROWS * 16, 64);
        for (int j = 0; j < NB; j++) {
            const __m512 s = _mm512_loadu_ps(scale + g * N + 16 * j);
            const __m512 o = _mm512_add_ps(_mm512_loadu_ps(off + g * N + 16 * j), b128);
            for (int m = 0; m < M; m++)
                out[j][m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(o, _mm512_set1_ps(xs[m * G + g]),
                                                               _mm512_load_ps(cbuf + (j * ROWS + m) * 16)), out[j][m]);
        }
    }
    for (int j = 0; j < NB; j++)
        for (int m = 0; m < M; m++)
            _mm256_storeu_si256((__m256i *)(y + m * N + 16 * j), (__m256i)_mm512_cvtneps_pbh(out[j][m]));
}

#define AMX_CASE(R)                                                                          \
    case R:                                                                                  \
        if (NB == 2) amx_blocks(x, K, w, scale, off, N, group, xs, G, y, R, 2, bbuf, cbuf); \
        else amx_blocks(x, K, w, scale, off, N, group, xs, G, y, R, 1, bbuf, cbuf);         \
        break;

static AMX_TARGET void amx_block_rows(const uint16_t *x, int64_t K, const uint8_t *w, const float *scale,
                                      const float *off, int64_t N, int64_t group, const float *xs, int64_t G,
                                      uint16_t *y, int M, int NB, uint16_t *bbuf, float *cbuf) {
    switch (M) {
        AMX_CASE(1) AMX_CASE(2) AMX_CASE(3) AMX_CASE(4) AMX_CASE(5) AMX_CASE(6) AMX_CASE(7) AMX_CASE(8)
        AMX_CASE(9) AMX_CASE(10) AMX_CASE(11) AMX_CASE(12) AMX_CASE(13) AMX_CASE(14) AMX_CASE(15) AMX_CASE(16)
    }
}

static AMX_TARGET void amx_configure(int M) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 5; t++) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[1] = (uint8_t)M; /* sums: M x 16 fp32 */
    cfg.rows[2] = (uint8_t)M;               /* x: M x 32 bf16 */
    cfg.rows[3] = cfg.rows[4] = 16;         /* weights: 16 pairs of k x 16 columns */
    _tile_loadconfig(&cfg);
}

/* x [M, K] bf16, packed as above, scale/off [K / group, N] fp32, y [M, N] bf16.
 * Needs N % 16 == 0, group % 32 == 0, K % group == 0 and llmzip_amx_ready().
 * Returns 0, or -1 if out of memory. */
AMX_TARGET int llmzip_int4_linear_amx(const uint16_t *x, int64_t M, int64_t K, int64_t N, int64_t group,
                                      const uint8_t *packed, const float *scale, const float *off, uint16_t *y) {
    const int64_t G = K / group, blocks = N / 16;
    float *xs = malloc(sizeof(float) * (size_t)(M * G));
    if (!xs) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                union { uint32_t i; float f; } v = {.i = (uint32_t)x[m * K + k] << 16};
                s += v.f;
            }
            xs[m * G + g] = s;
        }
#pragma omp parallel
    {
        uint16_t bbuf[2 * 16 * 32] __attribute__((aligned(64)));
        float cbuf[2 * ROWS * 16] __attribute__((aligned(64)));
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < (blocks + 1) / 2; p++) { /* pairs of column blocks */
            const int64_t b = 2 * p;
            const int nb = b + 1 < blocks ? 2 : 1;
            const uint8_t *w = packed + b * (K / 4) * 32;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
                int rows = (int)(M - m0 < ROWS ? M - m0 : ROWS);
                if (rows != configured) {
                    amx_configure(rows);
                    configured = rows;
                }
                amx_block_rows(x + m0 * K, K, w, scale + b * 16, off + b * 16, N, group, xs + m0 * G, G,
                               y + m0 * N + b * 16, rows, nb, bbuf, cbuf);
            }
        }
        if (configured >= 0) _tile_release();
    }
    free(xs);
    return 0;
}
