/*
 * The int8 matmul kernel: y = x W^T for int8 weights W (N, K), one float32 scale per output
 * channel. int8mm.py defines the same arithmetic in PyTorch (int8mm_reference), packs W and
 * builds this file for the CPU it runs on; the tests check that both give the same bits.
 *
 * Each row of x is written on two int8 levels, x ~= s1*q1 + s2*q2, with q1, q2 in -127..127,
 * s1 = max|x| / 127 and s2 = s1 / 254: about 15 bits, finer than bfloat16's 8. Then every
 * product q.w is a sum of integers, exact in int32 in whatever order it is added, so
 *   - a row's result never depends on the other rows in its call (batch invariance), and
 *   - the four paths below (AMX tiles, AVX-512 VNNI, AVX2, plain C) give the same bits.
 * y[m, n] = float((s1*d1 + s2*d2) * scale[n]) in double, d1 and d2 being the two levels' dot
 * products, then + bias[n] in float32. A row holding a NaN or an inf gives NaN.
 *
 * W is packed (int8mm.pack) into tiles of 16 outputs by 64 inputs, 1 KB each, [N/16][K/64][16][16][4]:
 * tile row r holds, for each of its 16 outputs, inputs 4r..4r+3. That is the layout AMX's
 * TDPBUSD reads, and the vector paths read it too: 4 bytes of x, broadcast, times a tile row
 * gives 16 outputs' partial sums in one instruction, with no sums across lanes at the end.
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
#if defined(VNNI) || defined(AVX2)
#include <immintrin.h>
#endif

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

/* Row x (K floats) as s[0]*q[0..K) + s[1]*q[Kp..Kp+K); 0 when it holds a NaN or an inf.
   The levels are stored as q + 128 (unsigned) where the kernel multiplies unsigned by signed
   bytes (AMX, VNNI), as q elsewhere; padding past K is 0 either way in value. */
#ifdef VNNI
#define OFFSET 128
static int split_row(const float *x, long K, long Kp, uint8_t *q, float *s) {
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (long k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k));
        bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);     /* NaN or inf */
        vmax = _mm512_max_ps(vmax, a);
    }
    if (bad) return 0;
    float amax = _mm512_reduce_max_ps(vmax);
    float s1 = amax > 1e-30f ? amax / 127.0f : 1.0f, s2 = s1 / 254.0f;
    const __m512 v1 = _mm512_set1_ps(s1), v2 = _mm512_set1_ps(s2), lo = _mm512_set1_ps(-127), hi = _mm512_set1_ps(127);
    const int even = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    memset(q, OFFSET, 2 * Kp);
    for (long k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        __m512 a = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(xv, v1), even), lo), hi);
        __m512 b = _mm512_sub_ps(xv, _mm512_mul_ps(a, v1));
        b = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(b, v2), even), lo), hi);
        const __m512i off = _mm512_set1_epi32(OFFSET);
        _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(a), off)));
        _mm_mask_storeu_epi8(q + Kp + k, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(b), off)));
    }
    s[0] = s1;
    s[1] = s2;
    return 1;
}
#else
#define OFFSET 0
/* the largest |x[k]| for k in from..K-1, or amax if larger, into amax; 0 where one is NaN or inf */
static int max_abs(const float *x, long from, long K, float *amax) {
    for (long k = from; k < K; k++) {
        float a = fabsf(x[k]);
        if (!(a <= FLT_MAX)) return 0;
        if (a > *amax) *amax = a;
    }
    return 1;
}

/* x[k] for k in from..K-1 on the two levels, one at a time */
static void split_each(const float *x, long from, long K, long Kp, float s1, float s2, uint8_t *q) {
    for (long k = from; k < K; k++) {
        float a = fminf(fmaxf(nearbyintf(x[k] / s1), -127.0f), 127.0f);
        float b = fminf(fmaxf(nearbyintf((x[k] - a * s1) / s2), -127.0f), 127.0f);
        q[k] = (uint8_t)(int8_t)a;
        q[Kp + k] = (uint8_t)(int8_t)b;
    }
}

/* With AVX2, 8 floats at a time first: the same operations as split_each, so the same bytes */
static int split_row(const float *x, long K, long Kp, uint8_t *q, float *s) {
    float amax = 0;
    long k = 0;
#ifdef AVX2
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
    float s1 = amax > 1e-30f ? amax / 127.0f : 1.0f, s2 = s1 / 254.0f;
    memset(q, OFFSET, 2 * Kp);
    k = 0;
#ifdef AVX2
    const __m256 v1 = _mm256_set1_ps(s1), v2 = _mm256_set1_ps(s2), lo = _mm256_set1_ps(-127), hi = _mm256_set1_ps(127);
    const int even = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        __m256 a = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(xv, v1), even), lo), hi);
        __m256 b = _mm256_sub_ps(xv, _mm256_mul_ps(a, v1));
        b = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(b, v2), even), lo), hi);
        __m256i ai = _mm256_cvtps_epi32(a), bi = _mm256_cvtps_epi32(b);            /* whole numbers: exact */
        __m128i a16 = _mm_packs_epi32(_mm256_castsi256_si128(ai), _mm256_extracti128_si256(ai, 1));
        __m128i b16 = _mm_packs_epi32(_mm256_castsi256_si128(bi), _mm256_extracti128_si256(bi, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(a16, a16));
        _mm_storel_epi64((__m128i *)(q + Kp + k), _mm_packs_epi16(b16, b16));
    }
#endif
    split_each(x, k, K, Kp, s1, s2, q);
    s[0] = s1;
    s[1] = s2;
    return 1;
}
#endif

/* 4 bytes of x as one int32 (memcpy: one load, without breaking C's aliasing rules) */
static inline int32_t load4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* d[2m + l][j] = sum_k q_l[m][k] * w[j][k] for one tile column (16 outputs; wt: its KB tiles)
   and rows rows of q (each 2 * Kp bytes: the two levels). Sums of q + 128 less 128 * wsum. */
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

static void dots_amx(const uint8_t *q, long Kp, const int8_t *wt, const int32_t *wsum, int rows, int32_t d[2 * ROWS][16]) {
    _tile_zero(2);
    for (long kb = 0; kb < Kp / 64; kb++) {
        for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)(wt + (kb + AHEAD) * 1024 + l), _MM_HINT_T1);
        _tile_loadd(0, q + kb * 64, Kp);          /* rows past `rows` hold stale bytes: their sums are not read */
        _tile_loadd(1, wt + kb * 1024, 64);
        _tile_dpbusd(2, 0, 1);
    }
    _tile_stored(2, d, 64);
    for (int r = 0; r < 2 * rows; r++)
        for (int j = 0; j < 16; j++) d[r][j] -= OFFSET * wsum[j];
}
#endif

#ifdef AVX2
/* AVX2 has no byte dot product into int32: |x| times w with x's sign (maddubs: byte pairs of
   at most 2 * 127 * 127, never saturated), then pairs of those (madd). G level-rows at once
   share each weight load: the sums of 4 level-rows fill 8 of the 16 registers. */
static inline __attribute__((always_inline)) void dots_avx2(const uint8_t *q, long Kp, const int8_t *wt, int G,
                                                            int32_t d[][16]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo[4], hi[4];
    for (int g = 0; g < G; g++) lo[g] = hi[g] = _mm256_setzero_si256();
    for (long kb = 0; kb < Kp / 64; kb++) {
        const int8_t *t = wt + kb * 1024;
        for (int i = 0; i < 16; i++) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(t + 64 * i)), w1 = _mm256_loadu_si256((const __m256i *)(t + 64 * i + 32));
            for (int g = 0; g < G; g++) {
                __m256i xv = _mm256_set1_epi32(load4(q + g * Kp + kb * 64 + 4 * i)), ax = _mm256_sign_epi8(xv, xv);
                lo[g] = _mm256_add_epi32(lo[g], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)), ones));
                hi[g] = _mm256_add_epi32(hi[g], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)), ones));
            }
        }
    }
    for (int g = 0; g < G; g++) {
        _mm256_storeu_si256((__m256i *)d[g], lo[g]);
        _mm256_storeu_si256((__m256i *)(d[g] + 8), hi[g]);
    }
}
#endif

static void dots(const uint8_t *q, long Kp, const int8_t *wt, const int32_t *wsum, int rows, int32_t d[2 * ROWS][16]) {
#if defined(AVX2)
    int r = 0;
    for (; r + 4 <= 2 * rows; r += 4) dots_avx2(q + r * Kp, Kp, wt, 4, d + r);     /* two rows' levels */
    if (r < 2 * rows) dots_avx2(q + r * Kp, Kp, wt, 2, d + r);                     /* one row's */
#else
    for (int r = 0; r < 2 * rows; r++) {
        const uint8_t *x = q + r * Kp;
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
        __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        _mm512_storeu_si512(d[r], _mm512_sub_epi32(sum, _mm512_mullo_epi32(_mm512_loadu_si512(wsum), _mm512_set1_epi32(OFFSET))));
#else
        for (int j = 0; j < 16; j++) {
            int32_t s = 0;
            for (long kb = 0; kb < Kp / 64; kb++)
                for (int i = 0; i < 64; i++) s += (int8_t)x[kb * 64 + i] * wt[kb * 1024 + (i / 4) * 64 + 4 * j + i % 4];
            d[r][j] = s;
        }
#endif
    }
#endif
    (void)wsum;
}

/* y (M, N) = x (M, K) W^T as above; wp: W packed, wsum[n] = sum_k W[n, k].
   Returns 0, or 1 when out of memory. */
int int8mm(const float *x, const int8_t *wp, const int32_t *wsum, const float *scale, const float *bias,
           float *y, long M, long K, long N) {
    long Kp = (K + 63) / 64 * 64, tiles = (N + 15) / 16, Mp = (M + ROWS - 1) / ROWS * ROWS;
    uint8_t *q = aligned_alloc(64, 2 * Mp * Kp);
    float *s = malloc(2 * M * sizeof(float));
    int *finite = malloc(M * sizeof(int));
    if (!q || !s || !finite) {
        free(q); free(s); free(finite);
        return 1;
    }
    if (M == 1) finite[0] = split_row(x, K, Kp, q, s);      /* one row: here, with no barrier to wait at */
    int amx = use_amx();
    (void)amx;
    #pragma omp parallel
    {
#ifdef AMX
        if (amx) tiles_on();
#endif
        if (M > 1) {                         /* several rows: the threads split them (each row alone) */
            #pragma omp for schedule(static)
            for (long m = 0; m < M; m++) finite[m] = split_row(x + m * K, K, Kp, q + 2 * m * Kp, s + 2 * m);
        }
        int32_t d[2 * ROWS][16], pad[16];
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
#ifdef AMX
                if (amx) dots_amx(q + 2 * m0 * Kp, Kp, wt, ws, rows, d);
                else
#endif
                dots(q + 2 * m0 * Kp, Kp, wt, ws, rows, d);
                for (int m = 0; m < rows; m++) {
                    double s1 = s[2 * (m0 + m)], s2 = s[2 * (m0 + m) + 1];
                    float *out = y + (m0 + m) * N + n0;
                    for (long j = 0; j < nn; j++) {
                        float r = (float)((s1 * d[2 * m][j] + s2 * d[2 * m + 1][j]) * scale[n0 + j]);
                        out[j] = finite[m0 + m] ? (bias ? r + bias[n0 + j] : r) : NAN;
                    }
                }
            }
        }
#ifdef AMX
        if (amx) _tile_release();
#endif
    }
    free(q); free(s); free(finite);
    return 0;
}
