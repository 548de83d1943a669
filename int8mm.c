/*
 * The int8 matmul kernel: y = x W^T for int8 weights W (N, K), one float32 scale per output
 * channel. int8mm.py defines the same arithmetic in PyTorch (int8mm_reference), packs W and
 * builds this file for the CPU it runs on; the tests check that both give the same bits.
 *
 * Each row of x is written as 16-bit integers, x ~= s*q with q in -32767..32767 and
 * s = max|x| / 32767: finer than bfloat16's 8 bits. Then every product q.w is a sum of
 * integers, exact in whatever order it is added, so
 *   - a row's result never depends on the other rows in its call (batch invariance), and
 *   - the four paths below (AMX tiles, AVX-512 VNNI, AVX2, plain C) give the same bits.
 * y[m, n] = float((s*d) * scale[n]) in double, d being the dot product, then + bias[n] in
 * float32. A row holding a NaN or an inf gives NaN.
 *
 * The byte paths (AMX, VNNI, plain C) multiply bytes: they write q as 256*hi + lo, hi in
 * -128..127 stored as hi + 128 and lo in 0..255, two unsigned byte rows ("levels"), and
 * d = 256*(d_hi - 128*wsum) + d_lo. AVX2's has no unsigned-by-signed byte product that
 * cannot saturate, so it multiplies q as int16 (vpmaddwd): one instruction a row where
 * bytes took four.
 *
 * W is packed (int8mm.pack) into tiles of 16 outputs by 64 inputs, 1 KB each, [N/16][K/64][16][16][4]:
 * tile row r holds, for each of its 16 outputs, inputs 4r..4r+3. That is the layout AMX's
 * TDPBUSD reads, and the vector paths read it too: 4 inputs of x, broadcast, times a tile row
 * gives 16 outputs' partial sums, with no sums across lanes until the end.
 * N and K are padded to 16 and 64 with zero weights.
 *
 * Built with -ffp-contract=off (a fused multiply-add would round differently from PyTorch's
 * separate steps) and -fopenmp (torch's own OpenMP runtime: the same two threads).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI 1
#elif defined(__AVX2__)
#define AVX2 1
#endif
#if defined(VNNI) && defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QMAX 32767  /* q's range: -QMAX..QMAX */
#define ROWS 8      /* rows of x per pass: AMX's 16-row tile holds 8 rows' two levels */
#define AHEAD 8     /* weight tiles (1 KB each) prefetched ahead, into L2: a greedy int8 token 3-10%
                       faster than 2 tiles into L1 (README, "int8's kernel") */

/* AMX tiles need Linux's permission, asked once per process (Linux 5.16+); without it, the VNNI path. */
static int use_amx(void) {
#ifdef AMX
    static int state = -1;
    if (state < 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
#else
    return 0;
#endif
}

const char *int8mm_isa(void) {
#if defined(VNNI)
    return use_amx() ? "amx" : "avx512-vnni";
#elif defined(AVX2)
    return "avx2";
#else
    return "c";
#endif
}

/* the largest |x[k]| for k in from..K-1, or amax if larger, into amax; 0 where one is NaN or inf */
static int max_abs(const float *x, long from, long K, float *amax) {
    for (long k = from; k < K; k++) {
        float a = fabsf(x[k]);
        if (!(a <= FLT_MAX)) return 0;
        if (a > *amax) *amax = a;
    }
    return 1;
}

/* Row x (K floats) as s * q (Kp int16s, 0 past K); 0 when it holds a NaN or an inf.
   With AVX2 (AVX-512 CPUs have it too), 8 floats at a time first: the same operations as the
   scalar loop after it, so the same integers. */
static int split_row(const float *x, long K, long Kp, int16_t *q, float *s) {
    float amax = 0;
    long k = 0;
#ifdef __AVX2__
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), bad = vmax;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), absmask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));                /* NaN or inf */
        vmax = _mm256_max_ps(vmax, a);
    }
    if (_mm256_movemask_ps(bad)) return 0;
    float m[8];
    _mm256_storeu_ps(m, vmax);
    for (int l = 0; l < 8; l++) amax = m[l] > amax ? m[l] : amax;
#endif
    if (!max_abs(x, k, K, &amax)) return 0;
    float sc = amax > 1e-30f ? amax / (float)QMAX : 1.0f;
    k = 0;
#ifdef __AVX2__
    const __m256 v = _mm256_set1_ps(sc), lo = _mm256_set1_ps(-QMAX), hi = _mm256_set1_ps(QMAX);
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i ai = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(a, lo), hi));      /* whole numbers: exact */
        _mm_storeu_si128((__m128i *)(q + k), _mm_packs_epi32(_mm256_castsi256_si128(ai), _mm256_extracti128_si256(ai, 1)));
    }
#endif
    for (; k < K; k++) q[k] = (int16_t)fminf(fmaxf(nearbyintf(x[k] / sc), -QMAX), QMAX);
    memset(q + K, 0, (Kp - K) * sizeof(int16_t));
    *s = sc;
    return 1;
}

/* 4 bytes as one int32, 8 as one int64 (memcpy: one load, without breaking C's aliasing rules) */
static inline int32_t load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline int64_t load8(const void *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

#ifdef AVX2
/* *a += p, in a's own register: written as _mm256_add_epi32, GCC 12 gave the sums a second
   set of registers, copied back each step, and with eight sums ran out and kept one on the
   stack (a store and a load in the loop's critical path) */
static inline __attribute__((always_inline)) void add_into(__m256i *a, __m256i p) {
    __asm__("vpaddd %1, %0, %0" : "+x"(*a) : "x"(p));
}

/* One weight tile (64 inputs of 16 outputs) times G rows of q (x: the rows' 64 int16s at this
   tile, Kp apart), added into their sums acc[g][0..3] (int32 lanes). Each tile row (64 bytes,
   16 outputs by 4 inputs) is widened to int16 in 4 registers of 4 outputs, each used by the G
   rows; vpmaddwd sums an output's inputs in pairs. */
static inline __attribute__((always_inline)) void tile_avx2(const int16_t *x, long Kp, const int8_t *t, int G,
                                                            __m256i acc[][4]) {
    __m256i a0 = acc[0][0], a1 = acc[0][1], a2 = acc[0][2], a3 = acc[0][3], b0 = a0, b1 = a1, b2 = a2, b3 = a3;
    if (G > 1) b0 = acc[1][0], b1 = acc[1][1], b2 = acc[1][2], b3 = acc[1][3];
    for (int i = 0; i < 16; i++, t += 64, x += 4) {
        __m256i x0 = _mm256_set1_epi64x(load8(x)), x1 = G > 1 ? _mm256_set1_epi64x(load8(x + Kp)) : x0;  /* 4 inputs, 4 times */
#define MAC(j, a, b) { __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 16 * j))); \
                       add_into(&a, _mm256_madd_epi16(x0, w)); \
                       if (G > 1) add_into(&b, _mm256_madd_epi16(x1, w)); }
        MAC(0, a0, b0) MAC(1, a1, b1) MAC(2, a2, b2) MAC(3, a3, b3)
#undef MAC
    }
    acc[0][0] = a0, acc[0][1] = a1, acc[0][2] = a2, acc[0][3] = a3;
    if (G > 1) acc[1][0] = b0, acc[1][1] = b1, acc[1][2] = b2, acc[1][3] = b3;
}

/* d[m][j] = q[m] . w[j] for one tile column (16 outputs; wt: its Kp/64 tiles) and the pass's
   rows (b and wsum: the byte paths'). Tile by tile, each tile used by every row (two at a
   time) while it is in L1: the weights stream from memory at one pace whatever the rows,
   which let 3-8 rows' multiplies overlap the reading better than a pass over the whole
   column per two rows (README, "int8 on AVX2 at the multiplies' ceiling").
   Every 16 tiles (1024 inputs) a lane has added at most 16*32 products of at most
   32767*127, 2.13e9 < 2^31: then the lanes go into int64. Without the prefetch (AHEAD tiles
   into L2) 8 rows took 10% longer, one row 1%. */
static void dots(const int16_t *q, const uint8_t *b, long Kp, const int8_t *wt, const int32_t *wsum, int rows,
                 int64_t d[ROWS][16]) {
    (void)b, (void)wsum;
    __m256i acc[ROWS][4];
    for (int m = 0; m < rows; m++) memset(d[m], 0, sizeof d[m]);
    for (long kb0 = 0; kb0 < Kp / 64; kb0 += 16) {
        long kb1 = kb0 + 16 < Kp / 64 ? kb0 + 16 : Kp / 64;
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_si256();
        for (long kb = kb0; kb < kb1; kb++) {
            const int8_t *t = wt + kb * 1024;
            for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)(t + AHEAD * 1024 + l), _MM_HINT_T1);
            int m = 0;
            for (; m + 2 <= rows; m += 2) tile_avx2(q + m * Kp + kb * 64, Kp, t, 2, acc + m);
            if (m < rows) tile_avx2(q + m * Kp + kb * 64, Kp, t, 1, acc + m);
        }
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < 4; j++) {
                int32_t lane[8];            /* outputs 4j..4j+3, two partial sums each */
                _mm256_storeu_si256((__m256i *)lane, acc[m][j]);
                for (int o = 0; o < 4; o++) d[m][4 * j + o] += (int64_t)lane[2 * o] + lane[2 * o + 1];
            }
    }
}
#else
/* The byte paths. q's row as two byte rows (levels), Kp apart: hi + 128, then lo. */
static void to_bytes(const int16_t *q, long Kp, uint8_t *b) {
    for (long k = 0; k < Kp; k++) {
        b[k] = (uint8_t)((q[k] >> 8) + 128);      /* q >> 8: floor(q / 256), -128..127 */
        b[Kp + k] = (uint8_t)(q[k] & 255);
    }
}

/* d32[r][j] = sum_k b[r][k] * w[j][k] for one tile column (16 outputs; wt: its KB tiles) and
   2 * rows byte rows of b (each Kp bytes), sums of unsigned by signed bytes: at most
   255 * 127 * K, within int32 for K below int8mm.py's MAX_K. */
#ifdef AMX
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

static void tiles_on(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 3; t++) {      /* tile 0: 16 rows of x's levels; 1: a weight tile; 2: the sums */
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

static void byte_dots_amx(const uint8_t *b, long Kp, const int8_t *wt, int32_t d32[2 * ROWS][16]) {
    _tile_zero(2);
    for (long kb = 0; kb < Kp / 64; kb++) {
        for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)(wt + (kb + AHEAD) * 1024 + l), _MM_HINT_T1);
        _tile_loadd(0, b + kb * 64, Kp);          /* rows past `rows` hold stale bytes: their sums are not read */
        _tile_loadd(1, wt + kb * 1024, 64);
        _tile_dpbusd(2, 0, 1);
    }
    _tile_stored(2, d32, 64);
}
#endif

static void byte_dots(const uint8_t *b, long Kp, const int8_t *wt, int rows, int32_t d32[2 * ROWS][16]) {
    for (int r = 0; r < 2 * rows; r++) {
        const uint8_t *x = b + r * Kp;
#if defined(VNNI)
        /* four accumulators (tile rows r mod 4) so that the additions overlap */
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (long kb = 0; kb < Kp / 64; kb++) {
            const int8_t *t = wt + kb * 1024;
            const uint8_t *xs = x + kb * 64;
            _mm_prefetch((const char *)(t + AHEAD * 1024), _MM_HINT_T1);
            for (int i = 0; i < 16; i += 4) {
                a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(load4(xs + 4 * i)), _mm512_loadu_si512(t + 64 * i));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(load4(xs + 4 * i + 4)), _mm512_loadu_si512(t + 64 * i + 64));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(load4(xs + 4 * i + 8)), _mm512_loadu_si512(t + 64 * i + 128));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(load4(xs + 4 * i + 12)), _mm512_loadu_si512(t + 64 * i + 192));
            }
        }
        _mm512_storeu_si512(d32[r], _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
#else
        for (int j = 0; j < 16; j++) {
            int32_t s = 0;
            for (long kb = 0; kb < Kp / 64; kb++)
                for (int i = 0; i < 64; i++) s += x[kb * 64 + i] * wt[kb * 1024 + (i / 4) * 64 + 4 * j + i % 4];
            d32[r][j] = s;
        }
#endif
    }
}

/* d[m][j] = q[m] . w[j] from both levels' sums: d = 256 * (d_hi - 128 * wsum) + d_lo */
static void dots(const int16_t *q, const uint8_t *b, long Kp, const int8_t *wt, const int32_t *wsum, int rows,
                 int64_t d[ROWS][16]) {
    (void)q;
    int32_t d32[2 * ROWS][16];
#ifdef AMX
    if (use_amx()) byte_dots_amx(b, Kp, wt, d32);
    else
#endif
    byte_dots(b, Kp, wt, rows, d32);
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 16; j++) d[m][j] = 256 * ((int64_t)d32[2 * m][j] - 128 * (int64_t)wsum[j]) + d32[2 * m + 1][j];
}
#endif

/* y (M, N) = x (M, K) W^T as above; wp: W packed, wsum[n] = sum_k W[n, k].
   Returns 0, or 1 when out of memory. */
int int8mm(const float *x, const int8_t *wp, const int32_t *wsum, const float *scale, const float *bias,
           float *y, long M, long K, long N) {
    long Kp = (K + 63) / 64 * 64, tiles = (N + 15) / 16, Mp = (M + ROWS - 1) / ROWS * ROWS;
    int16_t *q = aligned_alloc(64, Mp * Kp * sizeof(int16_t));
    float *s = malloc(M * sizeof(float));
    int *finite = malloc(M * sizeof(int));
#ifdef AVX2
    uint8_t *b = NULL;                                       /* AVX2 multiplies q itself */
    int bytes = 0;
#else
    uint8_t *b = aligned_alloc(64, 2 * Mp * Kp);             /* row m's two levels at 2 * m * Kp */
    int bytes = 1;
#endif
    if (!q || !s || !finite || (bytes && !b)) {
        free(q); free(s); free(finite); free(b);
        return 1;
    }
    int amx = use_amx();                                     /* asked here, before the threads */
    (void)amx;
    if (M == 1) finite[0] = split_row(x, K, Kp, q, s);      /* one row: here, with no barrier to wait at */
    #pragma omp parallel
    {
#ifdef AMX
        if (amx) tiles_on();
#endif
        if (M > 1) {                         /* several rows: the threads split them (each row alone) */
            #pragma omp for schedule(static)
            for (long m = 0; m < M; m++) finite[m] = split_row(x + m * K, K, Kp, q + m * Kp, s + m);
        }
#ifndef AVX2
        #pragma omp for schedule(static)
        for (long m = 0; m < M; m++) to_bytes(q + m * Kp, Kp, b + 2 * m * Kp);   /* the byte paths' two levels */
#endif
        int64_t d[ROWS][16];
        int32_t pad[16];
        #pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            long n0 = t * 16, nn = N - n0 < 16 ? N - n0 : 16;
            const int8_t *wt = wp + t * (Kp / 64) * 1024;
            const int32_t *ws = wsum + n0;
            if (nn < 16) {                   /* the last tile of an N not a multiple of 16: sums read as 16 */
                memset(pad, 0, sizeof pad);
                memcpy(pad, ws, nn * sizeof(int32_t));
                ws = pad;
            }
            for (long m0 = 0; m0 < M; m0 += ROWS) {     /* the tile column stays in L1/L2 from one pass to the next */
                int rows = M - m0 < ROWS ? (int)(M - m0) : ROWS;
                dots(q + m0 * Kp, b ? b + 2 * m0 * Kp : NULL, Kp, wt, ws, rows, d);
                for (int m = 0; m < rows; m++) {
                    double sm = s[m0 + m];
                    float *out = y + (m0 + m) * N + n0;
                    for (long j = 0; j < nn; j++) {
                        float r = (float)((sm * (double)d[m][j]) * scale[n0 + j]);
                        out[j] = finite[m0 + m] ? (bias ? r + bias[n0 + j] : r) : NAN;
                    }
                }
            }
        }
#ifdef AMX
        if (amx) _tile_release();
#endif
    }
    free(q); free(s); free(finite); free(b);
    return 0;
}
