/* The compiled pass behind rlsubnet.analysis.kernels: every probe of a 16-bit (bf16/fp16) chunk pair in two loops.
 *
 * A C extension (built by `pip install`, optional: without a compiler the numpy probes are used), so that loading it
 * costs a dlopen, not an import of a JIT compiler. It takes its arrays through the buffer protocol (no numpy headers
 * at build time) and computes exactly what rlsubnet.analysis.probes._fast16 computes, entry for entry:
 *
 *   1. compaction: the codes of the changed entries (bits differ, not +0 against -0) are gathered, with the sum of
 *      squares of the base chunk in float64 (and the changed mask, when asked for);
 *   2. probes: every changed entry is widened to float32 and every count taken without a branch, so the compiler
 *      vectorises the loop; entries whose float32 difference would not be exact (exponents too far apart, values in
 *      the subnormal range) are only counted here ("slow"), and relative quotients within one float32 ULP of eta are
 *      only counted ("band"); the caller settles both exactly.
 *
 * On x86-64 with AVX-512 (BW, VL, VBMI2) an AVX-512 build is chosen at import: compaction by vpcompressw with the
 * base's norm in the same loop, the bf16 probes and the floor pass written out with intrinsics (probe_bf16_avx512,
 * floor_avx512), fp16 probes the portable C compiled for AVX-512; the portable build is the C bodies compiled for the
 * baseline. No -ffast-math: NaN and infinity semantics are those of IEEE float32, as numpy's. The float64 sums use
 * explicit lanes (eight partial sums), so they vectorise without reassociation flags; with FMA in the AVX-512 build,
 * so the two builds' norms agree to rounding, their counts exactly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLS_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi2,popcnt,fma")))
#else
#define RLS_X86 0
#endif

#define NTOLS 8
#define NEDGES 10
#define NINTS (6 + NTOLS + NEDGES)
#define BLOCK 512

typedef struct {
    int is_bf16;
    const float *tab; /* fp16: the float32 value of every code */
    float tols[NTOLS];
    float lo, hi;
    int32_t emask, shift, gap_s, emin_s, ulp_off, ue_min;
    float edges[NEDGES];
} Params;

typedef struct {
    int64_t ints[NINTS]; /* changed, rel, nonfinite, nan, slow, band, tols..., edges... */
    double sd, sb;
    uint32_t mx;
} Out;

static inline float f32_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* bf16 is a constant at every call, so each body is compiled once per format, without a branch in its loop */
static inline __attribute__((always_inline)) float value16(uint16_t c, const float *tab, const int bf16) {
    return bf16 ? f32_of((uint32_t)c << 16) : tab[c];
}

/* Σ w0² of the chunk, float64, eight lanes */
static inline __attribute__((always_inline)) double sumsq_body(const uint16_t *ra, Py_ssize_t n, const Params *p) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    Py_ssize_t i = 0;
    if (p->is_bf16) {
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) {
                double x = (double)f32_of((uint32_t)ra[i + l] << 16);
                s[l] += x * x;
            }
    } else {
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) {
                double x = (double)p->tab[ra[i + l]];
                s[l] += x * x;
            }
    }
    double t = 0;
    for (; i < n; i++) {
        double x = (double)value16(ra[i], p->tab, p->is_bf16);
        t += x * x;
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

/* the changed entries' codes into ca/cb (branchless: every pair is written at the next free place, which moves on
 * only when it changed); their count */
static inline __attribute__((always_inline)) Py_ssize_t compact_body(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n,
                                                                   uint16_t *ca, uint16_t *cb, uint8_t *mask) {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t a = ra[i], b = rb[i];
        int neq = (a != b) & (((a | b) & 0x7FFF) != 0);
        ca[k] = a;
        cb[k] = b;
        if (mask) mask[i] = (uint8_t)neq;
        k += neq;
    }
    return k;
}

/* every probe of the n changed entries ca/cb */
static inline __attribute__((always_inline)) void probe_body(const uint16_t *ca, const uint16_t *cb, Py_ssize_t n,
                                                           const Params *p, Out *o, const int bf16) {
    const float *tab = p->tab;
    const float t0 = p->tols[0], t1 = p->tols[1], t2 = p->tols[2], t3 = p->tols[3], t4 = p->tols[4], t5 = p->tols[5],
                t6 = p->tols[6], t7 = p->tols[7];
    const float e0 = p->edges[0], e1 = p->edges[1], e2 = p->edges[2], e3 = p->edges[3], e4 = p->edges[4],
                e5 = p->edges[5], e6 = p->edges[6], e7 = p->edges[7], e8 = p->edges[8], e9 = p->edges[9];
    const float lo = p->lo, hi = p->hi;
    const int32_t emask = p->emask, shift = p->shift, gap_s = p->gap_s, emin_s = p->emin_s, ulp_off = p->ulp_off,
                  ue_min = p->ue_min;
    int32_t n_rel = 0, n_nf = 0, n_nan = 0, n_slow = 0, n_band = 0;
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    int32_t g0 = 0, g1 = 0, g2 = 0, g3 = 0, g4 = 0, g5 = 0, g6 = 0, g7 = 0, g8 = 0, g9 = 0;
    uint32_t mx = o->mx;
    float adb[BLOCK];
    for (Py_ssize_t s0 = 0; s0 < n; s0 += BLOCK) {
        int m = (int)(n - s0 < BLOCK ? n - s0 : BLOCK);
        const uint16_t *xa = ca + s0, *xb = cb + s0;
        for (int i = 0; i < m; i++) {
            uint16_t a = xa[i], b = xb[i];
            float fa = value16(a, tab, bf16), fb = value16(b, tab, bf16);
            int32_t ea = a & emask, eb = b & emask;
            int32_t de = ea - eb;
            int32_t fast = ((de <= gap_s) & (de >= -gap_s)) & (ea >= emin_s);
            float absd = fabsf(fb - fa);
            int32_t nan = absd != absd;
            int32_t fin = absd <= FLT_MAX;
            n_slow += 1 - fast;
            n_nf += fast & (1 - fin);
            n_nan += fast & nan;
            float x = nan ? INFINITY : absd; /* NaN exceeds every tolerance */
            a0 += fast & (x > t0);
            a1 += fast & (x > t1);
            a2 += fast & (x > t2);
            a3 += fast & (x > t3);
            a4 += fast & (x > t4);
            a5 += fast & (x > t5);
            a6 += fast & (x > t6);
            a7 += fast & (x > t7);
            float ma = fabsf(fa), mb = fabsf(fb);
            float q = absd / (ma > mb ? ma : mb); /* a NaN operand makes absd, and so q, NaN either way */
            int32_t qfin = fabsf(q) <= FLT_MAX;
            int32_t inband = (q >= lo) & (q <= hi);
            n_band += fast & inband;
            n_rel += fast & (1 - inband) & ((q > hi) | (1 - qfin));
            int32_t ue = (ea >> shift) - ulp_off;
            ue = ue > ue_min ? ue : ue_min;
            float ad = (fin & fast) ? absd : 0.0f;
            /* 2^-ue from its bits; for entries off the fast path ad is 0 and r counts nowhere */
            float r = ad * f32_of((uint32_t)(127 - ue) << 23);
            g0 += r >= e0;
            g1 += r >= e1;
            g2 += r >= e2;
            g3 += r >= e3;
            g4 += r >= e4;
            g5 += r >= e5;
            g6 += r >= e6;
            g7 += r >= e7;
            g8 += r >= e8;
            g9 += r >= e9;
            adb[i] = ad;
        }
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int i = 0;
        for (; i + 8 <= m; i += 8)
            for (int l = 0; l < 8; l++) s[l] += (double)adb[i + l] * (double)adb[i + l];
        double t = 0;
        for (; i < m; i++) t += (double)adb[i] * (double)adb[i];
        /* max |Δ| by bits: every adb entry is a non-negative float, whose bits order as its values */
        for (i = 0; i < m; i++) {
            uint32_t u = bits_of(adb[i]);
            mx = u > mx ? u : mx;
        }
        o->sd += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
    }
    int64_t *v = o->ints;
    v[1] += n_rel; v[2] += n_nf; v[3] += n_nan; v[4] += n_slow; v[5] += n_band;
    v[6] += a0; v[7] += a1; v[8] += a2; v[9] += a3; v[10] += a4; v[11] += a5; v[12] += a6; v[13] += a7;
    v[14] += g0; v[15] += g1; v[16] += g2; v[17] += g3; v[18] += g4; v[19] += g5; v[20] += g6; v[21] += g7;
    v[22] += g8; v[23] += g9;
    o->mx = mx;
}

/* the floor of a chunk: frozen entries (per-code table), of which changed; per-exponent counts */
static inline __attribute__((always_inline)) void floor_body(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n,
                                                           const uint8_t *frozen, int mant, int bins, int64_t *exp_n,
                                                           int64_t *exp_c, int64_t *nf_out, int64_t *nfc_out) {
    /* four sub-histograms, so consecutive entries of one exponent do not wait on each other's stores */
    uint32_t hn[4][256], hc[4][256];
    memset(hn, 0, sizeof hn);
    memset(hc, 0, sizeof hc);
    int64_t nf = 0, nfc = 0;
    unsigned emask = (unsigned)bins - 1;
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int l = 0; l < 4; l++) {
            uint16_t a = ra[i + l], b = rb[i + l];
            uint32_t neq = (a != b) & (((a | b) & 0x7FFF) != 0);
            uint32_t f = frozen[a];
            nf += f;
            nfc += f & neq;
            unsigned e = ((unsigned)a >> mant) & emask;
            hn[l][e] += 1;
            hc[l][e] += neq;
        }
    }
    for (; i < n; i++) {
        uint16_t a = ra[i], b = rb[i];
        uint32_t neq = (a != b) & (((a | b) & 0x7FFF) != 0);
        uint32_t f = frozen[a];
        nf += f;
        nfc += f & neq;
        unsigned e = ((unsigned)a >> mant) & emask;
        hn[0][e] += 1;
        hc[0][e] += neq;
    }
    for (int e = 0; e < bins; e++) {
        exp_n[e] += (int64_t)hn[0][e] + hn[1][e] + hn[2][e] + hn[3][e];
        exp_c[e] += (int64_t)hc[0][e] + hc[1][e] + hc[2][e] + hc[3][e];
    }
    *nf_out = nf;
    *nfc_out = nfc;
}

/* -- the portable build and, on x86-64, the AVX-512 build of the same bodies -------------------------------- */
static double sumsq_generic(const uint16_t *ra, Py_ssize_t n, const Params *p) { return sumsq_body(ra, n, p); }
static Py_ssize_t compact_generic(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n, uint16_t *ca, uint16_t *cb,
                                  uint8_t *mask) { return compact_body(ra, rb, n, ca, cb, mask); }
static void probe_generic(const uint16_t *ca, const uint16_t *cb, Py_ssize_t n, const Params *p, Out *o) {
    if (p->is_bf16)
        probe_body(ca, cb, n, p, o, 1);
    else
        probe_body(ca, cb, n, p, o, 0);
}
static void floor_generic(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n, const uint8_t *frozen, int mant,
                          int bins, int64_t *exp_n, int64_t *exp_c, int64_t *nf, int64_t *nfc) {
    floor_body(ra, rb, n, frozen, mant, bins, exp_n, exp_c, nf, nfc);
}

#if RLS_X86
AVX512 static double sumsq_avx512(const uint16_t *ra, Py_ssize_t n, const Params *p) { return sumsq_body(ra, n, p); }

/* 32 entries a step: one compare, two vpcompressw stores, the mask's 32 bits as 32 bytes */
AVX512 static Py_ssize_t compact_avx512(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n, uint16_t *ca,
                                        uint16_t *cb, uint8_t *mask) {
    Py_ssize_t k = 0, i = 0;
    const __m512i low15 = _mm512_set1_epi16(0x7FFF);
    for (; i + 32 <= n; i += 32) {
        __m512i a = _mm512_loadu_si512((const void *)(ra + i));
        __m512i b = _mm512_loadu_si512((const void *)(rb + i));
        __mmask32 ne = _mm512_cmpneq_epi16_mask(a, b);
        __mmask32 nz = _mm512_test_epi16_mask(_mm512_or_si512(a, b), low15);
        __mmask32 m = ne & nz;
        _mm512_mask_compressstoreu_epi16(ca + k, m, a);
        _mm512_mask_compressstoreu_epi16(cb + k, m, b);
        if (mask) _mm256_storeu_si256((__m256i *)(mask + i), _mm256_maskz_set1_epi8(m, 1));
        k += __builtin_popcount((unsigned)m);
    }
    return k + compact_body(ra + i, rb + i, n - i, ca + k, cb + k, mask ? mask + i : NULL);
}

/* bf16: the compaction above with the base's Σ w0² in the same pass (the codes are in registers already): each
 * 16 codes widened to float32 by a shift, to float64, squared and added into four accumulators */
AVX512 static Py_ssize_t compact_sumsq_bf16_avx512(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n, uint16_t *ca,
                                                   uint16_t *cb, uint8_t *mask, double *sb) {
    Py_ssize_t k = 0, i = 0;
    const __m512i low15 = _mm512_set1_epi16(0x7FFF);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), s2 = _mm512_setzero_pd(), s3 = _mm512_setzero_pd();
    for (; i + 32 <= n; i += 32) {
        __m512i a = _mm512_loadu_si512((const void *)(ra + i));
        __m512i b = _mm512_loadu_si512((const void *)(rb + i));
        __mmask32 m = _mm512_cmpneq_epi16_mask(a, b) & _mm512_test_epi16_mask(_mm512_or_si512(a, b), low15);
        _mm512_mask_compressstoreu_epi16(cb + k, m, b);
        _mm512_mask_compressstoreu_epi16(ca + k, m, a);
        if (mask) _mm256_storeu_si256((__m256i *)(mask + i), _mm256_maskz_set1_epi8(m, 1));
        k += __builtin_popcount((unsigned)m);
        __m512 flo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(a)), 16));
        __m512 fhi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a, 1)), 16));
        __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(flo));
        __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(flo), 1)));
        __m512d d2 = _mm512_cvtps_pd(_mm512_castps512_ps256(fhi));
        __m512d d3 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fhi), 1)));
        s0 = _mm512_fmadd_pd(d0, d0, s0);
        s1 = _mm512_fmadd_pd(d1, d1, s1);
        s2 = _mm512_fmadd_pd(d2, d2, s2);
        s3 = _mm512_fmadd_pd(d3, d3, s3);
    }
    double t = 0;
    for (Py_ssize_t j = i; j < n; j++) {
        double x = (double)f32_of((uint32_t)ra[j] << 16);
        t += x * x;
    }
    *sb = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3))) + t;
    return k + compact_body(ra + i, rb + i, n - i, ca + k, cb + k, mask ? mask + i : NULL);
}

/* bf16 probes written out for AVX-512: the counts of probe_body for 16 changed entries a step, each count a masked
 * compare and a masked add into its own 16 int32 lanes, the float64 sum of squares in 8 lanes with FMA; the last
 * steps take a lane mask. The same counts as probe_body, entry for entry (the sums to rounding). */
#define CNT(acc, k) acc = _mm512_mask_add_epi32(acc, (k), acc, one)
AVX512 static void probe_bf16_avx512(const uint16_t *ca, const uint16_t *cb, Py_ssize_t n, const Params *p, Out *o) {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i emask = _mm512_set1_epi32(p->emask), gap = _mm512_set1_epi32(p->gap_s),
                  ngap = _mm512_set1_epi32(-p->gap_s), emin = _mm512_set1_epi32(p->emin_s),
                  uoff = _mm512_set1_epi32(p->ulp_off), umin = _mm512_set1_epi32(p->ue_min),
                  c127 = _mm512_set1_epi32(127), absmask = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512 fmax = _mm512_set1_ps(FLT_MAX), inf = _mm512_set1_ps(INFINITY), lo = _mm512_set1_ps(p->lo),
                 hi = _mm512_set1_ps(p->hi);
    __m512 t[NTOLS], e[NEDGES];
    __m512i at[NTOLS], ge[NEDGES];
    for (int j = 0; j < NTOLS; j++) { t[j] = _mm512_set1_ps(p->tols[j]); at[j] = _mm512_setzero_si512(); }
    for (int j = 0; j < NEDGES; j++) { e[j] = _mm512_set1_ps(p->edges[j]); ge[j] = _mm512_setzero_si512(); }
    __m512i n_rel = _mm512_setzero_si512(), n_nf = n_rel, n_nan = n_rel, n_slow = n_rel, n_band = n_rel;
    __m512i mxv = _mm512_set1_epi32((int)o->mx);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    const int shift = p->shift;
    for (Py_ssize_t i = 0; i < n; i += 16) {
        __mmask16 valid = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, (const void *)(ca + i)));
        __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, (const void *)(cb + i)));
        __m512 fa = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), fb = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
        __m512i ea = _mm512_and_si512(a, emask), eb = _mm512_and_si512(b, emask);
        __m512i de = _mm512_sub_epi32(ea, eb);
        __mmask16 fast = _mm512_mask_cmple_epi32_mask(valid, de, gap);
        fast = _mm512_mask_cmpge_epi32_mask(fast, de, ngap);
        fast = _mm512_mask_cmpge_epi32_mask(fast, ea, emin);
        __m512 absd = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(fb, fa)), absmask));
        __mmask16 nan = _mm512_cmp_ps_mask(absd, absd, _CMP_UNORD_Q);
        __mmask16 fin = _mm512_cmp_ps_mask(absd, fmax, _CMP_LE_OQ);
        CNT(n_slow, valid & ~fast);
        CNT(n_nf, fast & ~fin);
        CNT(n_nan, fast & nan);
        __m512 x = _mm512_mask_blend_ps(nan, absd, inf);
        for (int j = 0; j < NTOLS; j++) CNT(at[j], _mm512_mask_cmp_ps_mask(fast, x, t[j], _CMP_GT_OQ));
        __m512 ma = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(fa), absmask));
        __m512 mb = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(fb), absmask));
        __m512 q = _mm512_div_ps(absd, _mm512_max_ps(ma, mb)); /* max_ps(ma, mb): ma > mb ? ma : mb, as in C */
        __mmask16 qfin = _mm512_cmp_ps_mask(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(q), absmask)),
                                            fmax, _CMP_LE_OQ);
        __mmask16 inband = _mm512_cmp_ps_mask(q, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(q, hi, _CMP_LE_OQ);
        CNT(n_band, fast & inband);
        CNT(n_rel, fast & ~inband & (_mm512_cmp_ps_mask(q, hi, _CMP_GT_OQ) | ~qfin));
        __m512i ue = _mm512_max_epi32(_mm512_sub_epi32(_mm512_srai_epi32(ea, shift), uoff), umin);
        __m512 ad = _mm512_maskz_mov_ps(fin & fast, absd);
        __m512 r = _mm512_mul_ps(ad, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(c127, ue), 23)));
        for (int j = 0; j < NEDGES; j++) CNT(ge[j], _mm512_mask_cmp_ps_mask(valid, r, e[j], _CMP_GE_OQ));
        __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(ad));
        __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ad), 1)));
        s0 = _mm512_fmadd_pd(d0, d0, s0);
        s1 = _mm512_fmadd_pd(d1, d1, s1);
        mxv = _mm512_max_epu32(mxv, _mm512_castps_si512(ad));
    }
    int64_t *v = o->ints;
    v[1] += _mm512_reduce_add_epi32(n_rel); v[2] += _mm512_reduce_add_epi32(n_nf);
    v[3] += _mm512_reduce_add_epi32(n_nan); v[4] += _mm512_reduce_add_epi32(n_slow);
    v[5] += _mm512_reduce_add_epi32(n_band);
    for (int j = 0; j < NTOLS; j++) v[6 + j] += _mm512_reduce_add_epi32(at[j]);
    for (int j = 0; j < NEDGES; j++) v[6 + NTOLS + j] += _mm512_reduce_add_epi32(ge[j]);
    o->sd += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    o->mx = (uint32_t)_mm512_reduce_max_epu32(mxv);
}
#undef CNT

AVX512 static void probe_avx512(const uint16_t *ca, const uint16_t *cb, Py_ssize_t n, const Params *p, Out *o) {
    if (p->is_bf16)
        probe_bf16_avx512(ca, cb, n, p, o);
    else
        probe_body(ca, cb, n, p, o, 0);
}
/* four sub-histograms of exponent fields (bytes), added into h */
static inline __attribute__((always_inline)) void hist4(const uint8_t *e, Py_ssize_t n, uint32_t h[4][256]) {
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        h[0][e[i]] += 1;
        h[1][e[i + 1]] += 1;
        h[2][e[i + 2]] += 1;
        h[3][e[i + 3]] += 1;
    }
    for (; i < n; i++) h[0][e[i]] += 1;
}

#define FBLOCK 4096
/* the floor of a chunk, 32 entries a step: the per-code table as 65,536 bits (8 KiB, in L1) looked up by two gathers,
 * frozen and frozen-and-changed counted by popcount, the exponent fields of every entry and (compressed) of the
 * changed ones written as bytes and counted by hist4 each block. The same numbers as floor_body. */
AVX512 static void floor_avx512(const uint16_t *ra, const uint16_t *rb, Py_ssize_t n, const uint8_t *frozen, int mant,
                                int bins, int64_t *exp_n, int64_t *exp_c, int64_t *nf_out, int64_t *nfc_out) {
    uint32_t bits[2048];
    for (int w = 0; w < 1024; w++) {
        uint64_t m = _mm512_test_epi8_mask(_mm512_loadu_si512((const void *)(frozen + 64 * w)), _mm512_set1_epi8(1));
        memcpy(bits + 2 * w, &m, 8);
    }
    uint32_t hn[4][256], hc[4][256];
    memset(hn, 0, sizeof hn);
    memset(hc, 0, sizeof hc);
    uint8_t eb[FBLOCK], ec[FBLOCK];
    const __m512i low15 = _mm512_set1_epi16(0x7FFF), emask = _mm512_set1_epi16((short)(bins - 1));
    const __m512i low5 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
    const __m128i sh = _mm_cvtsi32_si128(mant);
    int64_t nf = 0, nfc = 0;
    Py_ssize_t i = 0;
    while (i + 32 <= n) {
        Py_ssize_t end = i + FBLOCK <= n ? i + FBLOCK : n - (n - i) % 32, k = 0, j0 = i;
        for (; i < end; i += 32) {
            __m512i a = _mm512_loadu_si512((const void *)(ra + i));
            __m512i b = _mm512_loadu_si512((const void *)(rb + i));
            __mmask32 neq = _mm512_cmpneq_epi16_mask(a, b) & _mm512_test_epi16_mask(_mm512_or_si512(a, b), low15);
            __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(a));
            __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a, 1));
            __m512i wl = _mm512_i32gather_epi32(_mm512_srli_epi32(lo, 5), (const void *)bits, 4);
            __m512i wh = _mm512_i32gather_epi32(_mm512_srli_epi32(hi, 5), (const void *)bits, 4);
            __mmask16 fl = _mm512_test_epi32_mask(_mm512_srlv_epi32(wl, _mm512_and_si512(lo, low5)), one);
            __mmask16 fh = _mm512_test_epi32_mask(_mm512_srlv_epi32(wh, _mm512_and_si512(hi, low5)), one);
            __mmask32 fz = (__mmask32)fl | ((__mmask32)fh << 16);
            nf += __builtin_popcount((unsigned)fz);
            nfc += __builtin_popcount((unsigned)(fz & neq));
            __m256i e = _mm512_cvtepi16_epi8(_mm512_and_si512(_mm512_srl_epi16(a, sh), emask));
            _mm256_storeu_si256((__m256i *)(eb + (i - j0)), e);
            _mm256_mask_compressstoreu_epi8(ec + k, neq, e);
            k += __builtin_popcount((unsigned)neq);
        }
        hist4(eb, end - j0, hn);
        hist4(ec, k, hc);
    }
    for (int e = 0; e < bins; e++) {
        exp_n[e] += (int64_t)hn[0][e] + hn[1][e] + hn[2][e] + hn[3][e];
        exp_c[e] += (int64_t)hc[0][e] + hc[1][e] + hc[2][e] + hc[3][e];
    }
    int64_t tf = 0, tfc = 0;
    floor_body(ra + i, rb + i, n - i, frozen, mant, bins, exp_n, exp_c, &tf, &tfc);
    *nf_out = nf + tf;
    *nfc_out = nfc + tfc;
}
#endif

static double (*sumsq_fn)(const uint16_t *, Py_ssize_t, const Params *) = sumsq_generic;
static Py_ssize_t (*compact_fn)(const uint16_t *, const uint16_t *, Py_ssize_t, uint16_t *, uint16_t *, uint8_t *) =
    compact_generic;
static void (*probe_fn)(const uint16_t *, const uint16_t *, Py_ssize_t, const Params *, Out *) = probe_generic;
static void (*floor_fn)(const uint16_t *, const uint16_t *, Py_ssize_t, const uint8_t *, int, int, int64_t *, int64_t *,
                        int64_t *, int64_t *) = floor_generic;
static const char *isa = "portable";

/* -- Python face --------------------------------------------------------------------------------------------- */
static int need(Py_buffer *b, Py_ssize_t itemsize, Py_ssize_t n, const char *what) {
    if (b->len != itemsize * n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, b->len, itemsize * n);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(probe16_doc,
             "probe16(ra, rb, is_bf16, tab, tols, lo, hi, emask, shift, gap_s, emin_s, ulp_off, ue_min, edges, mask)\n"
             "-> (ints, sumsq_delta, sumsq_base, max_bits)\n\n"
             "ra, rb: uint16 codes of one chunk; tab: float32[65536] (fp16 values; ignored for bf16); tols: float32[8]; "
             "edges: float32[10]; mask: a writable uint8 buffer of the chunk's length for the changed mask, or None. "
             "ints = (changed, relative changed, non-finite, NaN, slow, band, exceed tol 0..7, >= edge 0..9), "
             "counted as rlsubnet.analysis.probes._fast16 counts them.");

static PyObject *py_probe16(PyObject *self, PyObject *args) {
    Py_buffer ra = {0}, rb = {0}, tab = {0}, tols = {0}, edges = {0}, mk = {0};
    PyObject *mask_obj;
    int is_bf16;
    float lo, hi;
    int emask, shift, gap_s, emin_s, ulp_off, ue_min;
    if (!PyArg_ParseTuple(args, "y*y*py*y*ffiiiiiiy*O", &ra, &rb, &is_bf16, &tab, &tols, &lo, &hi, &emask, &shift,
                          &gap_s, &emin_s, &ulp_off, &ue_min, &edges, &mask_obj))
        return NULL;
    PyObject *res = NULL;
    uint16_t *scratch = NULL;
    Py_ssize_t n = ra.len / 2;
    uint8_t *mask = NULL;
    if (mask_obj != Py_None) {
        if (PyObject_GetBuffer(mask_obj, &mk, PyBUF_WRITABLE) < 0) goto done;
        if (!need(&mk, 1, n, "mask")) goto done;
        mask = (uint8_t *)mk.buf;
    }
    if (!need(&rb, 2, n, "rb") || !need(&tols, 4, NTOLS, "tols") || !need(&edges, 4, NEDGES, "edges") ||
        (ra.len % 2 && !need(&ra, 2, n, "ra")) || (!is_bf16 && !need(&tab, 4, 65536, "tab")))
        goto done;
    Params p;
    p.is_bf16 = is_bf16;
    p.tab = (const float *)tab.buf;
    memcpy(p.tols, tols.buf, sizeof p.tols);
    memcpy(p.edges, edges.buf, sizeof p.edges);
    p.lo = lo; p.hi = hi; p.emask = emask; p.shift = shift; p.gap_s = gap_s; p.emin_s = emin_s; p.ulp_off = ulp_off;
    p.ue_min = ue_min;
    Out o;
    memset(&o, 0, sizeof o);
    scratch = (uint16_t *)PyMem_RawMalloc((size_t)(2 * n + 64) * sizeof(uint16_t));
    if (!scratch) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t k;
#if RLS_X86
    if (is_bf16 && compact_fn == compact_avx512)
        k = compact_sumsq_bf16_avx512((const uint16_t *)ra.buf, (const uint16_t *)rb.buf, n, scratch, scratch + n + 32,
                                      mask, &o.sb);
    else
#endif
    {
        o.sb = sumsq_fn((const uint16_t *)ra.buf, n, &p);
        k = compact_fn((const uint16_t *)ra.buf, (const uint16_t *)rb.buf, n, scratch, scratch + n + 32, mask);
    }
    o.ints[0] = k;
    probe_fn(scratch, scratch + n + 32, k, &p, &o);
    Py_END_ALLOW_THREADS
    PyObject *ints = PyTuple_New(NINTS);
    if (!ints) goto done;
    for (int j = 0; j < NINTS; j++) PyTuple_SET_ITEM(ints, j, PyLong_FromLongLong(o.ints[j]));
    res = Py_BuildValue("NddI", ints, o.sd, o.sb, (unsigned int)o.mx);
done:
    PyMem_RawFree(scratch);
    PyBuffer_Release(&ra); PyBuffer_Release(&rb); PyBuffer_Release(&tab); PyBuffer_Release(&tols);
    PyBuffer_Release(&edges);
    if (mk.obj) PyBuffer_Release(&mk);
    return res;
}

PyDoc_STRVAR(floor16_doc,
             "floor16(ra, rb, frozen, mant, bins, exp_n, exp_c) -> (frozen entries, of which changed)\n\n"
             "frozen: uint8[65536], 1 where a code is below the floor; exp_n, exp_c: writable int64[bins], added to.");

static PyObject *py_floor16(PyObject *self, PyObject *args) {
    Py_buffer ra = {0}, rb = {0}, fr = {0}, en = {0}, ec = {0};
    int mant, bins;
    if (!PyArg_ParseTuple(args, "y*y*y*iiw*w*", &ra, &rb, &fr, &mant, &bins, &en, &ec)) return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = ra.len / 2;
    if (bins < 1 || bins > 256 || (bins & (bins - 1)) || mant < 0 || mant > 15) {
        PyErr_SetString(PyExc_ValueError, "bins must be a power of two up to 256, mant in [0, 15]");
        goto done;
    }
    if (!need(&rb, 2, n, "rb") || !need(&fr, 1, 65536, "frozen") || !need(&en, 8, bins, "exp_n") ||
        !need(&ec, 8, bins, "exp_c"))
        goto done;
    int64_t nf = 0, nfc = 0;
    Py_BEGIN_ALLOW_THREADS
    floor_fn((const uint16_t *)ra.buf, (const uint16_t *)rb.buf, n, (const uint8_t *)fr.buf, mant, bins,
             (int64_t *)en.buf, (int64_t *)ec.buf, &nf, &nfc);
    Py_END_ALLOW_THREADS
    res = Py_BuildValue("LL", (long long)nf, (long long)nfc);
done:
    PyBuffer_Release(&ra); PyBuffer_Release(&rb); PyBuffer_Release(&fr); PyBuffer_Release(&en); PyBuffer_Release(&ec);
    return res;
}

static PyMethodDef methods[] = {
    {"probe16", py_probe16, METH_VARARGS, probe16_doc},
    {"floor16", py_floor16, METH_VARARGS, floor16_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "The compiled pass for 16-bit chunk pairs (see _native.c).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#if RLS_X86
    __builtin_cpu_init();
    if (!getenv("RLSUBNET_NATIVE_PORTABLE") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi2")) {
        sumsq_fn = sumsq_avx512;
        compact_fn = compact_avx512;
        probe_fn = probe_avx512;
        floor_fn = floor_avx512;
        isa = "avx512";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (m && PyModule_AddIntConstant(m, "MAX_TOLS", NTOLS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
