/*
 * A layer's steps for float32 on the CPU, each in one call: the linear layers at a few rows,
 * RMSNorm (alone, and with the residual add before it), decoding attention (the rotary step, the
 * cache write, each row's attention), and SwiGLU's silu(gate) * up. model.py holds each step's
 * definition in PyTorch and calls these instead where they run (fused.py: float32 on the CPU,
 * eager, no gradients).
 *
 * Why: in eager PyTorch every small step is a few operator calls at 3-10 us each on a
 * laptop-class CPU, which adds up to more than the matrices' own time for int8 and int4 (README,
 * "The layer's small steps in C"). Here a step is one call and its loops are vectorised by the
 * compiler. The linear layer is here because at one to a few rows its time is reading the
 * weights, and a plain loop that prefetches reads them faster than F.linear on this project's
 * Intel Xeon (README, "float32's matrices in C").
 *
 * Every function computes each row (and each head of a row) alone, in a fixed order, so a
 * row's result never depends on how many rows share the call: the batch invariance that
 * AdaDecode's bitwise guarantee rests on. Built with -ffp-contract=off: the rotary
 * step then gives PyTorch's bits exactly (two products, one sum, each rounded), as does the
 * residual add, and no result depends on whether the compiler chose to fuse a multiply-add.
 * Attention fuses them where it means to, with C's fmaf (fma_lanes), which rounds once on
 * every CPU, so a build for another CPU, or without OpenMP, gives the same bits (test_fused.py
 * checks attention and the linear layer from a plain x86-64 build against this CPU's).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16    /* partial sums kept side by side: one AVX-512 register, two AVX2 ones */

/* exp(x) in float, written so the compiler can vectorise a loop of it (libm's expf is a call per
 * element): x = n*ln2 + r with |r| <= ln2/2, exp(r) by Cephes' expf polynomial, times 2^n as
 * two powers of two built in the exponent bits (so neither overflows on its own). About one ulp
 * from exp; inf past 88.73, 0 or a subnormal far below; NaN for NaN. */
static inline float exp_f(float x) {
    float xc = x < -104.0f ? -104.0f : x > 89.0f ? 89.0f : x;
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t n1 = (int32_t)n / 2, n2 = (int32_t)n - n1;
    int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float f1, f2;
    memcpy(&f1, &b1, sizeof f1);
    memcpy(&f2, &b2, sizeof f2);
    return x != x ? x : p * f1 * f2;
}

/* LANES floats as SPLIT vectors `part` of the CPU's width: one AVX-512 register, two AVX2 ones
 * (GCC's and clang's vector extension). One 16-float vector would be simpler, but where the
 * CPU's registers hold 8 floats GCC keeps such a vector in memory, not in registers: on an
 * AMD EPYC with AVX2 the linear layer ran 4 times slower and attention 5 times (README, "fused.c
 * on AVX2"). Lane for lane the arithmetic is the same, so the bits are. */
#ifndef SPLIT                  /* (a build may set it: test_fused.py checks both ways give the same bits) */
#ifdef __AVX512F__
#define SPLIT 1
#else
#define SPLIT 2
#endif
#endif
_Static_assert(SPLIT == 1 || SPLIT == 2, "16 lanes as one vector or two");
#define PART (LANES / SPLIT)
typedef float part __attribute__((vector_size(PART * sizeof(float))));
typedef int32_t int_part __attribute__((vector_size(PART * sizeof(int32_t))));
typedef float half_lanes __attribute__((vector_size(LANES / 2 * sizeof(float))));
typedef float quarter_lanes __attribute__((vector_size(LANES / 4 * sizeof(float))));
typedef struct { part p[SPLIT]; } lanes;

/* exp_f (above) on a vector: the same operations lane by lane, so the same bits. rintf becomes
 * adding and taking away 1.5 * 2^23, which rounds to the nearest integer, ties to even, as
 * rintf does for |v| < 2^22 (here |v| <= 151); only a zero's sign can differ, and it cancels in
 * r. A loop of exp_f calls is not vectorised by GCC with AVX2 (rintf), so softmax, SwiGLU and
 * the exit check's guess call this on PART values at a time. */
static inline part exp_part(part x) {
    const float round = 12582912.0f;           /* 1.5 * 2^23 */
    int_part lo = x < -104.0f, hi = x > 89.0f, nan = x != x;
    part big = {0}, small = {0};
    big += 89.0f, small += -104.0f;
    part xc = (part)((lo & (int_part)small) | (~lo & ((hi & (int_part)big) | (~hi & (int_part)x))));
    part n = (xc * 1.44269504088896341f + round) - round;
    part r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    part p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int_part ni = __builtin_convertvector(n, int_part), n1 = ni / 2, n2 = ni - n1;
    part f1 = (part)((n1 + 127) << 23), f2 = (part)((n2 + 127) << 23);
    part y = p * f1 * f2;
    return (part)((nan & (int_part)x) | (~nan & (int_part)y));
}

static inline part load_part(const float *p) {
    part v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline lanes load(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the LANES partial sums added pairwise, halves onto halves: a fixed order, in a few vector adds */
static inline float lanes_sum(lanes acc) {
    half_lanes h[2];
    quarter_lanes q[2];
    memcpy(h, &acc, sizeof h);
    h[0] += h[1];
    memcpy(q, &h[0], sizeof q);
    q[0] += q[1];
    return (q[0][0] + q[0][2]) + (q[0][1] + q[0][3]);
}

/* sum of a[i] * b[i] in LANES interleaved partial sums, then the lanes (lanes_sum), then the tail */
static inline float dot(const float *a, const float *b, long n) {
    lanes acc = {{{0}}};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int h = 0; h < SPLIT; h++) acc.p[h] += load_part(a + i + h * PART) * load_part(b + i + h * PART);
    float s = lanes_sum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* dot(a[t], b[r]) for the W rows r of b (n floats apart) and R rows t of a (lda floats apart),
 * W, R <= 4, into out[t * ldo + r]: W R independent chains for the CPU to overlap, b's lanes
 * loaded once for all R rows of a, each sum in dot's order (the same bits as W R calls of dot).
 * `ahead`, where not NULL, is prefetched alongside (b's rows W * n floats on, for `linear`).
 * Inlined where W and R are constants, so the sums stay in registers. */
static inline __attribute__((always_inline)) void dots(const float *a, long lda, int R, const float *b, int W, long n,
                                                       float *out, long ldo, const float *ahead) {
    lanes acc[4][4];
    for (int t = 0; t < R; t++)          /* only the R W sums: zeroing all 16 cost a memset a call */
        for (int r = 0; r < W; r++) acc[t][r] = (lanes){{{0}}};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int h = 0; h < SPLIT; h++) {
            long j = i + h * PART;
            part ai[4];
            for (int t = 0; t < R; t++) ai[t] = load_part(a + t * lda + j);
            for (int r = 0; r < W; r++) {
                if (ahead) __builtin_prefetch(ahead + r * n + j);
                part br = load_part(b + r * n + j);
                for (int t = 0; t < R; t++) acc[t][r].p[h] += ai[t] * br;
            }
        }
    for (int t = 0; t < R; t++)
        for (int r = 0; r < W; r++) {
            float s = lanes_sum(acc[t][r]);
            for (long j = i; j < n; j++) s += a[t * lda + j] * b[r * n + j];
            out[t * ldo + r] = s;
        }
}

/* sum of x[i] in the same order as dot's */
static inline float sum(const float *x, long n) {
    lanes acc = {{{0}}};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int h = 0; h < SPLIT; h++) acc.p[h] += load_part(x + i + h * PART);
    float s = lanes_sum(acc);
    for (; i < n; i++) s += x[i];
    return s;
}

/* dots() for 4 rows of w (wo, K floats apart) and R rows of x, R a constant where inlined. 32
 * AVX-512 registers hold 4 x 4 sums of LANES floats and their operands; 16 AVX2 ones hold 4 x 1
 * or 2 x 2 (each sum two registers), so there, past two or more rows of x, the 4 rows of w go
 * as two pairs (README, "fused.c on AVX2"). The same sums in the same order either way, so the
 * same bits. */
static inline __attribute__((always_inline)) void dots4(const float *xt, long K, int R, const float *wo, float *yt,
                                                        long N, const float *ahead) {
#ifdef __AVX512F__
    dots(xt, K, R, wo, 4, K, yt, N, ahead);
#else
    if (R == 1)
        dots(xt, K, 1, wo, 4, K, yt, N, ahead);
    else
        for (int r = 0; r < 4; r += 2) {          /* a pair of w's rows, past x's rows 0-1, then 2-3 */
            dots(xt, K, 2, wo + r * K, 2, K, yt + r, N, ahead ? ahead + r * K : NULL);
            if (R == 3) dots(xt + 2 * K, K, 1, wo + r * K, 2, K, yt + 2 * N + r, N, NULL);
            if (R == 4) dots(xt + 2 * K, K, 2, wo + r * K, 2, K, yt + 2 * N + r, N, NULL);
        }
#endif
}

/* A linear layer for T rows x (T, K): y[t, o] = dot(x[t], w[o]) (+ b[o]), w (N, K) row-major,
 * b NULL or (N,). Each output is dot's sum, alone, so a row's result does not depend on the
 * other rows of the call. At a few rows the time is reading w once from memory: four rows of
 * w at a time, used by up to four x rows at once while they sit in L1, the next four
 * prefetched meanwhile, each thread one contiguous stretch of w. */
void linear(const float *x, const float *w, const float *b, float *y, long T, long N, long K) {
    #pragma omp parallel for schedule(static) if (N * K > 65536)
    for (long o = 0; o < N; o += 4) {
        if (o + 4 <= N) {
            const float *ahead = o + 8 <= N ? w + (o + 4) * K : NULL;
            for (long t = 0; t < T; t += 4) {
                const float *xt = x + t * K, *wo = w + o * K;
                float *yt = y + t * N + o;
                switch (T - t) {          /* a constant R for each dots4, so its sums stay in registers */
                case 1:  dots4(xt, K, 1, wo, yt, N, ahead); break;
                case 2:  dots4(xt, K, 2, wo, yt, N, ahead); break;
                case 3:  dots4(xt, K, 3, wo, yt, N, ahead); break;
                default: dots4(xt, K, 4, wo, yt, N, ahead);
                }
            }
        } else
            for (long t = 0; t < T; t++)
                for (long r = o; r < N; r++) y[t * N + r] = dot(x + t * K, w + r * K, K);
        if (b)
            for (long t = 0; t < T; t++)
                for (long r = o; r < N && r < o + 4; r++) y[t * N + r] += b[r];
    }
}

/* out = x * rsqrt(mean(x^2) + eps) * w for one row of N. The mean of squares is summed in
 * double (more exact than PyTorch's float sums), the rest in float as PyTorch orders it. */
static void norm_row(const float *x, const float *w, double eps, float *out, long N) {
    double acc[LANES / 2] = {0}, ss = 0;
    long i = 0;
    for (; i + LANES / 2 <= N; i += LANES / 2)
        for (int l = 0; l < LANES / 2; l++) acc[l] += (double)x[i + l] * x[i + l];
    for (int l = 0; l < LANES / 2; l++) ss += acc[l];
    for (; i < N; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / N + eps));
    for (i = 0; i < N; i++) out[i] = x[i] * r * w[i];
}

/* RMSNorm, M rows of N */
void rms_norm(const float *x, const float *w, double eps, float *out, long M, long N) {
    for (long m = 0; m < M; m++)
        norm_row(x + m * N, w, eps, out + m * N, N);
}

/* The residual add and the norm after it: h = x + y, out = RMSNorm(h), M rows of N */
void add_rms_norm(const float *x, const float *y, const float *w, double eps, float *h, float *out, long M, long N) {
    for (long m = 0; m < M; m++) {
        for (long i = 0; i < N; i++) h[m * N + i] = x[m * N + i] + y[m * N + i];
        norm_row(h + m * N, w, eps, out + m * N, N);
    }
}

/* a * b + c in each lane with one rounding (C's fmaf): the same bits on every CPU and
 * compiler, one vector instruction where the CPU has fused multiply-adds */
static inline __attribute__((always_inline)) part fma_part(part a, part b, part c) {
    part r;
    for (int l = 0; l < PART; l++) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return r;
}

static inline part splat(float x) {
    part v;
    for (int l = 0; l < PART; l++) v[l] = x;
    return v;
}

/* Sums across lanes for 16 vectors at once (LANES is 16): each step adds pairs of lanes that
 * belong to the same vector and packs two vectors' halves into one. fold8(a, b) is
 * [a[i] + a[i+8] (8 lanes), b[i] + b[i+8] (8 lanes)], fold4 does the same on 4-lane groups,
 * and so on; after four steps lane r holds vector r's sum, always added in the same order.
 * With 16 lanes as two parts of 8 (SPLIT 2), fold8 adds a vector's two parts, and fold4 ...
 * fold1 do within a part what they do within 16 lanes. */
_Static_assert(LANES == 16, "fold8 ... fold1 and dot16 are written for 16 lanes");
#define PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#if SPLIT == 1
static inline lanes fold8(lanes a, lanes b) {
    return (lanes){{PICK(a.p[0], b.p[0], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    PICK(a.p[0], b.p[0], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)}};
}
static inline lanes fold4(lanes a, lanes b) {
    return (lanes){{PICK(a.p[0], b.p[0], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                    PICK(a.p[0], b.p[0], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)}};
}
static inline lanes fold2(lanes a, lanes b) {
    return (lanes){{PICK(a.p[0], b.p[0], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                    PICK(a.p[0], b.p[0], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31)}};
}
static inline lanes fold1(lanes a, lanes b) {
    return (lanes){{PICK(a.p[0], b.p[0], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                    PICK(a.p[0], b.p[0], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)}};
}
#else
static inline part fold4_8(part x, part y) {
    return PICK(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + PICK(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline part fold2_8(part x, part y) {
    return PICK(x, y, 0, 1, 4, 5, 8, 9, 12, 13) + PICK(x, y, 2, 3, 6, 7, 10, 11, 14, 15);
}
static inline part fold1_8(part x, part y) {
    return PICK(x, y, 0, 2, 4, 6, 8, 10, 12, 14) + PICK(x, y, 1, 3, 5, 7, 9, 11, 13, 15);
}
static inline lanes fold8(lanes a, lanes b) { return (lanes){{a.p[0] + a.p[1], b.p[0] + b.p[1]}}; }
static inline lanes fold4(lanes a, lanes b) { return (lanes){{fold4_8(a.p[0], a.p[1]), fold4_8(b.p[0], b.p[1])}}; }
static inline lanes fold2(lanes a, lanes b) { return (lanes){{fold2_8(a.p[0], a.p[1]), fold2_8(b.p[0], b.p[1])}}; }
static inline lanes fold1(lanes a, lanes b) { return (lanes){{fold1_8(a.p[0], a.p[1]), fold1_8(b.p[0], b.p[1])}}; }
#endif

/* q . k[r] for 16 keys k[r] (ld floats apart) at once, n (a multiple of LANES) floats each:
 * per key, LANES partial sums of fused multiply-adds, then fold's sums across lanes. For a
 * head of 64 a score costs about 7 vector operations this way, against about 16 for `dot`
 * (8 for the products and sums, 8 for its lanes_sum). Lane r of the result is key r's score.
 * The keys' sums are made KEYS at a time, as many as the registers hold: all 16 with AVX-512,
 * 4 with AVX2. */
#define KEYS (SPLIT == 1 ? 16 : 4)
static inline __attribute__((always_inline)) lanes dot16(const float *q, const float *k, long ld, long n) {
    lanes f8[8], f4[4];
    #pragma GCC unroll 4
    for (int g = 0; g < 16; g += KEYS) {
        lanes acc[KEYS];
        #pragma GCC unroll 16
        for (int r = 0; r < KEYS; r++) acc[r] = (lanes){{{0}}};
        for (long i = 0; i < n; i += LANES)
            #pragma GCC unroll 2
            for (int h = 0; h < SPLIT; h++) {
                part qi = load_part(q + i + h * PART);
                const float *kr = k + g * ld + i + h * PART;
                #pragma GCC unroll 16                 /* the sums stay in registers */
                for (int r = 0; r < KEYS; r++, kr += ld) acc[r].p[h] = fma_part(qi, load_part(kr), acc[r].p[h]);
            }
        for (int r = 0; r < KEYS / 2; r++) f8[g / 2 + r] = fold8(acc[2 * r], acc[2 * r + 1]);
    }
    for (int r = 0; r < 4; r++) f4[r] = fold4(f8[2 * r], f8[2 * r + 1]);
    return fold1(fold2(f4[0], f4[1]), fold2(f4[2], f4[3]));
}

/* A head's softmax over its n scaled scores p, in place and not yet divided: the maximum,
 * then exp(p - max); returns their sum, which the values' weighted sum is divided by. */
static float softmax_unscaled(float *p, long n) {
    float mx = -INFINITY;                   /* a maximum is exact in any order; NaNs are passed over */
    long j = 0;
    if (n >= PART) {                        /* a part at a time: 16 lanes as a struct went through the stack */
        part m = load_part(p);
        for (j = PART; j + PART <= n; j += PART) {
            part x = load_part(p + j);
            int_part more = x > m;
            m = (part)(((int_part)x & more) | ((int_part)m & ~more));
        }
        for (int l = 0; l < PART; l++) mx = m[l] > mx ? m[l] : mx;
    }
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    if (mx != mx || mx == INFINITY || mx == -INFINITY) mx = 0;    /* NaN or inf scores propagate below */
    for (j = 0; j + PART <= n; j += PART) {
        part e = exp_part(load_part(p + j) - mx);
        memcpy(p + j, &e, sizeof e);
    }
    for (; j < n; j++) p[j] = exp_f(p[j] - mx);
    return sum(p, n);
}

/* softmax_values' weighted sums for three query heads of one KV head at once, from their
 * softmax (softmax_unscaled): o_r = sum_j p_r[j] V[j] / total[r], V (n, D) with D a multiple
 * of 4 * LANES. Head by head, V is read three times; here each value vector is loaded once
 * for the three heads, 2 * PART outputs at a time, for columns 0..cols-1 of V's D (a multiple
 * of 2 * PART; V may start at a later column). Each output is added as values1
 * adds it (the even keys' chain, the odd keys' chain, then their sum), so a head gets the
 * same bits either way. What an extra row adds to attention went from 11.1 to 10.0 us (9
 * heads, 3 KV heads, D 64, 300 keys; README, "The thirteenth session"). A function of its
 * own: inlined into attention's parallel part, GCC ran out of registers in its loop. */
static __attribute__((noinline)) void values3(const float *p0, const float *p1, const float *p2,
                                              const float *total, long n, const float *V, long D, long cols,
                                              float *o0, float *o1, float *o2) {
    float *o[3] = {o0, o1, o2};
    for (long d = 0; d < cols; d += 2 * PART) {
        part e00 = {0}, e01 = {0}, e10 = {0}, e11 = {0}, e20 = {0}, e21 = {0},    /* even keys: head, half */
             d00 = {0}, d01 = {0}, d10 = {0}, d11 = {0}, d20 = {0}, d21 = {0};    /* odd keys */
        const float *v = V + d;
        long j = 0;
        for (; j + 1 < n; j += 2, v += 2 * D) {
            part a0 = load_part(v), a1 = load_part(v + PART), b0 = load_part(v + D), b1 = load_part(v + D + PART);
#ifdef __AVX512F__
            /* kept in registers: else GCC folds each load into all three heads' multiply-adds */
            __asm__("" : "+v"(a0), "+v"(a1), "+v"(b0), "+v"(b1));
#endif
            part s = splat(p0[j]), t = splat(p1[j]), u = splat(p2[j]);
            e00 = fma_part(s, a0, e00), e01 = fma_part(s, a1, e01);
            e10 = fma_part(t, a0, e10), e11 = fma_part(t, a1, e11);
            e20 = fma_part(u, a0, e20), e21 = fma_part(u, a1, e21);
            s = splat(p0[j + 1]), t = splat(p1[j + 1]), u = splat(p2[j + 1]);
            d00 = fma_part(s, b0, d00), d01 = fma_part(s, b1, d01);
            d10 = fma_part(t, b0, d10), d11 = fma_part(t, b1, d11);
            d20 = fma_part(u, b0, d20), d21 = fma_part(u, b1, d21);
        }
        if (j < n) {                               /* an odd number of keys: the last one */
            part a0 = load_part(v), a1 = load_part(v + PART), s = splat(p0[j]), t = splat(p1[j]), u = splat(p2[j]);
            e00 = fma_part(s, a0, e00), e01 = fma_part(s, a1, e01);
            e10 = fma_part(t, a0, e10), e11 = fma_part(t, a1, e11);
            e20 = fma_part(u, a0, e20), e21 = fma_part(u, a1, e21);
        }
        part y[6] = {(e00 + d00) / total[0], (e01 + d01) / total[0], (e10 + d10) / total[1],
                     (e11 + d11) / total[1], (e20 + d20) / total[2], (e21 + d21) / total[2]};
        for (int r = 0; r < 3; r++) memcpy(o[r] + d, y + 2 * r, 2 * sizeof(part));
    }
}

/* One head's attention from its softmax p (softmax_unscaled: n of them, summing to total):
 * p . V / total, V (n, D), into o, the values weighted and summed key by key (fused
 * multiply-adds), one division at the end. A function of its own, as values3: inlined into
 * attention's parallel part, it cost a one-row call 0.7 us more once values3 was there. */
static __attribute__((noinline)) void values1(const float *p, float total, long n, const float *V, long D, float *o) {
    long j;
    /* in blocks of 4 * LANES outputs, the even keys' sums apart from the odd keys' (8 chains
     * for the CPU to overlap, 4 * PART outputs at a time in registers); then the rest, one
     * chain each, PART outputs at a time and then one (the same sums either way) */
    long d = 0;
    for (; d + 4 * LANES <= D; d += 4 * LANES)
        for (long e = d; e < d + 4 * LANES; e += 4 * PART) {
            part even[4] = {{0}}, odd[4] = {{0}};
            for (j = 0; j + 1 < n; j += 2) {
                part p0 = splat(p[j]), p1 = splat(p[j + 1]);
                const float *v0 = V + j * D + e, *v1 = v0 + D;
                #pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    even[c] = fma_part(p0, load_part(v0 + c * PART), even[c]);
                    odd[c] = fma_part(p1, load_part(v1 + c * PART), odd[c]);
                }
            }
            if (j < n)                             /* an odd number of keys: the last one */
                for (int c = 0; c < 4; c++) even[c] = fma_part(splat(p[j]), load_part(V + j * D + e + c * PART), even[c]);
            for (int c = 0; c < 4; c++) {
                part y = (even[c] + odd[c]) / total;
                memcpy(o + e + c * PART, &y, sizeof y);
            }
        }
    for (; d + PART <= D; d += PART) {
        part acc = {0};
        for (j = 0; j < n; j++)
            acc = fma_part(splat(p[j]), load_part(V + j * D + d), acc);
        acc /= total;
        memcpy(o + d, &acc, sizeof acc);
    }
    for (; d < D; d++) {
        float acc = 0;
        for (j = 0; j < n; j++)
            acc = __builtin_fmaf(p[j], V[j * D + d], acc);
        o[d] = acc / total;
    }
}

/* Decoding attention for T rows at positions pos..pos+T-1, each row alone (no mask: row t reads
 * keys 0..pos+t), from the q/k/v projection's output qkv (T rows `stride` floats apart, each
 * [q: H heads, k: H_kv heads, v: H_kv heads] of D). First, row by row, the rotary step on q and
 * k (x * cos + roll(x, D/2) * sin; `sin` carries the half-rotation's sign: model.py,
 * Transformer.new_cache), k and v written into the layer's cache k, v (H_kv, S, D), heads
 * kv_stride floats apart, at positions pos+t, q into `out` (T, H, D). Then every (row, head)
 * alone: softmax(q.k * scale) . v over the row's keys (dot16, softmax_unscaled, values1 or values3),
 * query head h reading KV head h / (H / H_kv), over `out`'s q. */
void attention(const float *qkv, long stride, const float *cos, const float *sin, float *k, float *v,
               long kv_stride, float *out, long T, long H, long H_kv, long D, long pos, float scale) {
    long half = D / 2, G = H / H_kv;
    for (long t = 0; t < T; t++) {
        const float *row = qkv + t * stride, *c = cos + t * D, *s = sin + t * D;
        for (long h = 0; h < H + H_kv; h++) {
            const float *x = row + h * D;
            float *dst = h < H ? out + (t * H + h) * D : k + (h - H) * kv_stride + (pos + t) * D;
            for (long i = 0; i < half; i++) dst[i] = x[i] * c[i] + x[i + half] * s[i];
            for (long i = half; i < D; i++) dst[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        for (long h = 0; h < H_kv; h++)
            memcpy(v + h * kv_stride + (pos + t) * D, row + (H + H_kv + h) * D, D * sizeof(float));
    }
    /* The scores, then each (row, head) alone. A key's score is dot16's sum whichever call,
     * thread or block of keys computes it, so the work is cut to keep both threads busy:
     * first blocks of 64 keys for a KV head's G query heads (16 keys at a time, read once for
     * the G heads), then, after the threads meet, each head's softmax and values. Two threads
     * pay off from a few hundred keys on (an OpenMP region costs a few us). */
    long S = pos + T, blocks = (S + 63) / 64, Dp = (D + LANES - 1) / LANES * LANES;
    float *P = malloc((T * H * S + T * H) * sizeof(float));   /* row t, head h's scores at P + (t * H + h) * S */
    if (!P) {                                       /* no memory: NaN rows, not a crash */
        for (long i = 0; i < T * H * D; i++) out[i] = NAN;
        return;
    }
    float *totals = P + T * H * S;                  /* and the sum of its softmax at totals[t * H + h] */
    #pragma omp parallel if (T * H * S * D > 50000)
    {
        /* where D is not a multiple of LANES, q and k are copied with zeros after them; so are
         * the keys of a block of fewer than 16 (the row's last), for dot16 to read 16 */
        float qpad[D == Dp ? 1 : G * Dp], kpad[16 * Dp];
        #pragma omp for schedule(static)
        for (long item = 0; item < T * H_kv * blocks; item++) {
            long g = item / (blocks * T), j = item / T % blocks * 64, t = item % T, n = pos + t + 1;
            long end = j + 64 < n ? j + 64 : n;
            const float *K = k + g * kv_stride, *q = out + (t * H + g * G) * D;   /* the group's heads: adjacent */
            float *p = P + (t * H + g * G) * S;
            if (D != Dp) {
                memset(qpad, 0, G * Dp * sizeof(float));
                for (long c = 0; c < G; c++) memcpy(qpad + c * Dp, q + c * D, D * sizeof(float));
                q = qpad;
            }
            for (long i = j; i < end; i += 16) {
                long keys = end - i < 16 ? end - i : 16;
                const float *kb = K + i * D;
                if (keys < 16 || D != Dp) {
                    memset(kpad, 0, 16 * Dp * sizeof(float));
                    for (long r = 0; r < keys; r++) memcpy(kpad + r * Dp, K + (i + r) * D, D * sizeof(float));
                    kb = kpad;
                }
                for (long c = 0; c < G; c++) {
                    lanes s = dot16(q + c * Dp, kb, kb == kpad ? Dp : D, Dp);
                    for (int h = 0; h < SPLIT; h++) s.p[h] *= scale;
                    if (keys == 16)                /* one vector store (a copy of `keys` floats is a slow rep movs) */
                        memcpy(p + c * S + i, &s, sizeof s);
                    else
                        memcpy(p + c * S + i, &s, keys * sizeof(float));
                }
            }
        }
        /* then each (row, head)'s softmax, in place, its sum into totals */
        #pragma omp for schedule(static)
        for (long item = 0; item < T * H; item++) totals[item] = softmax_unscaled(P + item * S, pos + item / H + 1);
        /* then the values: a KV head's query heads three at a time (values3: V read once for
         * three), each three in two halves of D for the two threads, where D allows; the rest
         * of G one head at a time (values1). A head's bits are the same either way (each output
         * summed in the same order), so a row's do not depend on the call. Items go KV head by
         * KV head, then rows, so a call's rows read the same V one after the other. */
        long threes = D % (4 * LANES) == 0 ? G / 3 : 0, items = 2 * threes + G - 3 * threes;
        #pragma omp for schedule(static)
        for (long item = 0; item < T * H_kv * items; item++) {
            long g = item / (items * T), c = item / T % items, t = item % T, n = pos + t + 1;
            const float *V = v + g * kv_stride;
            if (c < 2 * threes) {
                long h = g * G + 3 * (c / 2), half = c % 2 * (D / 2);
                float *p = P + (t * H + h) * S, *o = out + (t * H + h) * D + half;
                values3(p, p + S, p + 2 * S, totals + t * H + h, n, V + half, D, D / 2, o, o + D, o + 2 * D);
            } else {
                long h = g * G + 3 * threes + c - 2 * threes;
                values1(P + (t * H + h) * S, totals[t * H + h], n, V, D, out + (t * H + h) * D);
            }
        }
    }
    free(P);
}

/* SwiGLU's middle: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, for M rows of
 * [gate (F), up (F)] (the fused gate/up projection's output). */
void silu_mul(const float *gu, float *out, long M, long F) {
    for (long m = 0; m < M; m++, gu += 2 * F, out += F) {
        long f = 0;
        for (; f + PART <= F; f += PART) {
            part g = load_part(gu + f), y = g / (1.0f + exp_part(-g)) * load_part(gu + F + f);
            memcpy(out + f, &y, sizeof y);
        }
        for (; f < F; f++)
            out[f] = gu[f] / (1.0f + exp_f(-gu[f])) * gu[F + f];
    }
}

/* The index of each row's largest value, for M rows x (M, N), into out (M): the first one,
 * and the first NaN where there is one, as torch.argmax. PyTorch's CPU argmax compares one
 * element at a time (about 116 us over the default model's 49,152 logits on the Intel Xeon);
 * this keeps LANES running maxima and where each was first seen, then takes the largest. */
void argmax_rows(const float *x, long M, long N, long *out) {
    for (long m = 0; m < M; m++, x += N) {
        float best = -INFINITY;
        long k = 0, j = 0;
        int nan = 0;
        if (N >= LANES) {
            lanes mx = load(x);
            int_part lane[SPLIT], at[SPLIT], bad[SPLIT];              /* bad: -1 in a lane that saw a NaN */
            for (int h = 0; h < SPLIT; h++) {
                for (int l = 0; l < PART; l++) lane[h][l] = h * PART + l;
                at[h] = lane[h];                                  /* where each lane's maximum is */
                bad[h] = mx.p[h] != mx.p[h];
            }
            for (j = LANES; j + LANES <= N; j += LANES) {
                lanes v = load(x + j);
                for (int h = 0; h < SPLIT; h++) {
                    int_part more = v.p[h] > mx.p[h];              /* strictly: a lane keeps its first maximum */
                    mx.p[h] = (part)(((int_part)v.p[h] & more) | ((int_part)mx.p[h] & ~more));
                    at[h] = (at[h] & ~more) | ((lane[h] + (int32_t)j) & more);
                    bad[h] |= v.p[h] != v.p[h];
                }
            }
            best = mx.p[0][0], k = at[0][0];
            for (int h = 0; h < SPLIT; h++)
                for (int l = 0; l < PART; l++) {
                    if (mx.p[h][l] > best || (mx.p[h][l] == best && at[h][l] < k)) best = mx.p[h][l], k = at[h][l];
                    nan |= bad[h][l];
                }
        }
        for (; j < N; j++) {                                  /* the tail, after every lane's elements */
            if (x[j] > best) best = x[j], k = j;
            nan |= x[j] != x[j];
        }
        if (nan)
            for (k = 0; x[k] == x[k]; k++) {}                 /* the first NaN */
        out[m] = k;
    }
}

/* A linear layer as block() calls it: y (T, N) = x (T, K) times the layer's weights w (and two
 * more arrays p1, p2 where the kernel needs them), + b where b is not NULL; 0, or 1 when out of
 * memory. int8mm.c's int8mm has this type (w packed int8, p1 its row sums, p2 its scales). */
typedef int (*matmul)(const float *x, const void *w, const void *p1, const void *p2, const float *b, float *y,
                      long T, long K, long N);

/* float32's linear as a matmul (p1, p2 unused) */
static int linear_mm(const float *x, const void *w, const void *p1, const void *p2, const float *b, float *y,
                     long T, long K, long N) {
    (void)p1, (void)p2;
    linear(x, w, b, y, T, N, K);
    return 0;
}

/* TransformerBlock.forward (model.py) for T decoding rows x (T, dim), in one call: the functions
 * above, called in the PyTorch forward's order on the same values, so the same bits as calling
 * them one by one (test_fused.py checks), without a Python call per step. k, v: the layer's
 * cache as in `attention`; g1, g2 the two norms' weights. The four linear layers (q/k/v, o,
 * gate/up, down) are mats[4 * i .. 4 * i + 3] = w, p1, p2, bias, multiplied by kernels[i], or
 * by `linear` (float32 weights) where kernels[i] is NULL: int8's layers pass int8mm. Returns 0,
 * or 1 when out of memory. */
int block(const float *x, float *out, long T, long dim, long F, const float *g1, const float *g2, double eps,
          const float *cos, const float *sin, float *k, float *v, long kv_stride, long pos, long H, long H_kv,
          long D, float scale, matmul *kernels, const void **mats) {
    long Q = (H + 2 * H_kv) * D, A = H * D;
    matmul mm[4];
    for (int i = 0; i < 4; i++) mm[i] = kernels[i] ? kernels[i] : linear_mm;
#define MAT(i) mats[4 * i], mats[4 * i + 1], mats[4 * i + 2], (const float *)mats[4 * i + 3]
    if (T == 0) return 0;
    float *xn = malloc(T * (4 * dim + Q + A + 3 * F) * sizeof(float));
    if (!xn) return 1;
    float *y = xn + T * dim, *h = y + T * dim, *hn = h + T * dim, *qkv = hn + T * dim, *att = qkv + T * Q,
          *gu = att + T * A, *act = gu + 2 * T * F;
    int oom = 0;
    rms_norm(x, g1, eps, xn, T, dim);                               /* before_attention */
    oom |= mm[0](xn, MAT(0), qkv, T, dim, Q);
    attention(qkv, Q, cos, sin, k, v, kv_stride, att, T, H, H_kv, D, pos, scale);
    oom |= mm[1](att, MAT(1), y, T, A, dim);                        /* after_attention */
    add_rms_norm(x, y, g2, eps, h, hn, T, dim);
    oom |= mm[2](hn, MAT(2), gu, T, dim, 2 * F);                    /* FeedForward */
    silu_mul(gu, act, T, F);
    oom |= mm[3](act, MAT(3), y, T, F, dim);
    for (long i = 0; i < T * dim; i++) out[i] = h[i] + y[i];
#undef MAT
    free(xn);
    return oom;
}

/* One layer's arguments to block() apart from the rows, the positions and the cache: made once
 * per layer in Python (fused.py, BlockPlan) */
typedef struct {
    long F, H, H_kv, D;
    double eps;
    float scale;
    const float *g1, *g2;
    matmul kernels[4];
    const void *mats[16];
} layer_plan;

/* block() for n layers in turn, plans[0..n-1], on T rows x (T, dim): the last layer's output
 * into out. Layer i's cache is k and v advanced by i * layer_stride floats (the cache holds
 * every layer in one tensor, kvcache.py). One call from Python instead of n: per layer its
 * Python side cost more than int8's matrices in a layer (README, "A run of layers in one
 * call"). Returns 0, or 1 when out of memory. */
int layers(const float *x, float *out, long T, long dim, const float *cos, const float *sin, float *k, float *v,
           long layer_stride, long kv_stride, long pos, long n, const layer_plan *plans) {
    float *tmp = n > 1 ? malloc(T * dim * sizeof(float)) : NULL;
    if (n > 1 && !tmp) return 1;
    const float *in = x;
    int oom = 0;
    for (long i = 0; i < n && !oom; i++) {
        const layer_plan *p = plans + i;
        float *dst = (n - 1 - i) % 2 == 0 ? out : tmp;     /* the last layer writes into out */
        oom = block(in, dst, T, dim, p->F, p->g1, p->g2, p->eps, cos, sin, k + i * layer_stride,
                    v + i * layer_stride, kv_stride, pos, p->H, p->H_kv, p->D, p->scale, (matmul *)p->kernels,
                    (const void **)p->mats);
        in = dst;
    }
    free(tmp);
    return oom;
}

/* One row's guess from its logits z (V of them), into f: [top-1 index, p1, p2, entropy, lse]
 * (heads.py, ExitHeads.features). e: V floats of scratch, exp(z - max). The top-1 is the first
 * maximum; a NaN logit is the top-1, as torch.topk has it, and every figure NaN, as they are
 * where the maximum is infinite. */
static void guess(const float *z, long V, float *e, float *f) {
    long j1 = 0, j2 = -1;
    for (long j = 0; j < V; j++) {
        if (z[j] != z[j]) {
            j1 = j;
            break;
        }
        if (z[j] > z[j1]) j1 = j;
    }
    float m = z[j1];
    f[0] = (float)j1;
    if (m != m || m == INFINITY || m == -INFINITY) {
        f[1] = f[2] = f[3] = f[4] = NAN;
        return;
    }
    for (long j = 0; j < V; j++)
        if (j != j1 && (j2 < 0 || z[j] > z[j2])) j2 = j;
    long j = 0;
    for (; j + PART <= V; j += PART) {
        part v = exp_part(load_part(z + j) - m);
        memcpy(e + j, &v, sizeof v);
    }
    for (; j < V; j++) e[j] = exp_f(z[j] - m);
    float s = sum(e, V), lse = m + logf(s);      /* s >= 1: the top-1's own term is exp(0) */
    f[1] = 1.0f / s;
    f[2] = j2 < 0 ? 0.0f : e[j2] / s;
    f[3] = lse - dot(e, z, V) / s;               /* entropy: lse - sum(softmax(z) * z) */
    f[4] = lse;
}

/* An exit head's check (heads.py, ExitHeads.features) for T rows h (T, dim), in one call: u = A h,
 * plus silu(B u) where the head has a residual block, the final RMSNorm (weights g), the
 * vocabulary projection P (the LM head, or its shortlist's V rows: logits z), then each row's
 * guess (above) into out (T, 5). A, B and P are mats[4 * i ..] for i = 0, 1, 2, multiplied as in
 * block (kernels[i], or `linear` where it is NULL); mats[4] NULL: no residual block. A row's
 * figures do not depend on the other rows (each step computes rows alone). Returns 0, or 1 when
 * out of memory. */
int head_check(const float *h, float *out, long T, long dim, long V, const float *g, double eps,
               matmul *kernels, const void **mats) {
    matmul mm[3];
    for (int i = 0; i < 3; i++) mm[i] = kernels[i] ? kernels[i] : linear_mm;
#define MAT(i) mats[4 * i], mats[4 * i + 1], mats[4 * i + 2], (const float *)mats[4 * i + 3]
    if (T == 0) return 0;
    float *u = malloc((T * (3 * dim + V) + V) * sizeof(float));
    if (!u) return 1;
    float *w = u + T * dim, *n = w + T * dim, *z = n + T * dim, *e = z + T * V;
    int oom = mm[0](h, MAT(0), u, T, dim, dim);
    if (mats[4]) {
        oom |= mm[1](u, MAT(1), w, T, dim, dim);
        for (long i = 0; i < T * dim; i++) u[i] += w[i] / (1.0f + exp_f(-w[i]));
    }
    rms_norm(u, g, eps, n, T, dim);
    oom |= mm[2](n, MAT(2), z, T, dim, V);
    for (long t = 0; t < T; t++) guess(z + t * V, V, e, out + 5 * t);
#undef MAT
    free(u);
    return oom;
}
