// Quantized expert weights for the vector path (included by cpu_kernel.cpp): a matrix [R, C] in quant.py's
// planes, groups of 32 along each row. F = 1 (q8): int8 q [R, C], fp16 d [R, C/32]; w = d q.
// F = 2 (q4): nibbles [R, C/2] (byte i of a group: q[i] low, q[i + 16] high), fp16 d, m [R, C/32]; w = d q + m.
// F = 3 (q4k): nibbles as q4, fp16 d, dmin [R, C/256], uint8 sc, mn [R, C/32]; w = (d sc) q - dmin mn.
// F = 5 (q5): nibbles as q4, fp16 d [R, C/32], uint32 qh [R, C/32] (bit i: q[i]'s fifth bit); w = d q - 16 d, exact.
// Weights are dequantized in registers, in fp32 (d q is exact, + m rounds once, as in torch's reference), and used
// as they are: with bf16 activations they are not rounded to bf16 as a bf16 copy of the dequantized model would
// hold them (that rounding cost 1.3x the kernel's time; it changes products by at most 2^-9 relative, the order of
// the sums' own rounding). Activations stay fp32.
// Included inside cpu_kernel.cpp's anonymous namespace (which includes <immintrin.h> on x86).

std::atomic<int> weight_prefetch{1};          // software prefetch of the next weight rows (moe_set_prefetch)

struct QMat {
    const uint8_t *q;
    const uint16_t *d, *m;                    // fp16 bits (q4k: d and dmin per 256 columns)
    const uint8_t *sc, *mn;                   // q4k: 6-bit scale and min per 32 columns
    int C;                                    // columns (the reduction length)
    const uint8_t *qh = nullptr;              // q5: each group's fifth bits, a little-endian uint32
};

// The kind of w13 (phase 1) or w2 (phase 3) in Job::wfmt = w13's kind + 4 w2's: 5 (q8), 10 (q4), 7 (q4k, q8
// down), 25 (q5), 23 (q4k, q5 down).
inline int matrix_kind(int wfmt, int phase) {
    if (wfmt == 25) return 5;
    if (wfmt == 23) return phase == 1 ? 3 : 5;
    return phase == 1 ? wfmt % 4 : wfmt / 4;
}

template <int F>
inline QMat qmat(const void *base, int R, int C) {
    const uint8_t *b = (const uint8_t *)base;
    const size_t qb = F == 1 ? (size_t)R * C : (size_t)R * C / 2;
    const size_t groups = (size_t)R * C / 32;
    const uint16_t *d = (const uint16_t *)(b + qb);
    if (F == 3) {
        const uint8_t *sc = (const uint8_t *)(d + 2 * groups / 8);
        return QMat{b, d, d + groups / 8, sc, sc + groups, C};
    }
    if (F == 5) return QMat{b, d, nullptr, nullptr, nullptr, C, (const uint8_t *)(d + groups)};
    return QMat{b, d, F == 2 ? d + groups : nullptr, nullptr, nullptr, C};
}

inline float from_fp16(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
    const uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return (s ? -1.f : 1.f) * std::ldexp((float)m, -24);     // zero and subnormals
    const uint32_t u = e == 31 ? s | 0x7f800000u | (m << 13) : s | ((e + 112) << 23) | (m << 13);
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__)
inline vf widen_s8(const int8_t *p) {        // VL int8 -> fp32
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
inline vf nibbles(const uint8_t *p, int high) {   // VL bytes -> their low (or high) nibbles as fp32
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    b = high ? _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15)) : _mm_and_si128(b, _mm_set1_epi8(15));
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#elif defined(__AVX2__)
inline vf widen_s8(const int8_t *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
inline vf nibbles(const uint8_t *p, int high) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    b = high ? _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15)) : _mm_and_si128(b, _mm_set1_epi8(15));
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
#else                                         // plain C++ (compilers widen these lane by lane)
inline vf widen_s8(const int8_t *p) {
    vf v;
    for (int i = 0; i < VL; i++) v[i] = (float)p[i];
    return v;
}
inline vf nibbles(const uint8_t *p, int high) {
    vf v;
    for (int i = 0; i < VL; i++) v[i] = (float)(high ? p[i] >> 4 : p[i] & 15);
    return v;
}
#endif

// The scales of row r's groups g0..g0+n-1 (n <= 8, g0 % 8 == 0 for q4k) into d[0..n) and m[0..n) (w = d q + m;
// q8 leaves m alone): once per 8 groups, so the inner loop only broadcasts them (per group, the scalar conversions
// had cost as much as the group's vector work: 1.3-1.4x the time of a 1-token q4 / q4k expert on one core). Every
// value is exact: fp16 -> fp32, and d sc, dmin mn have at most 17 significant bits.
template <int F>
inline void qscales(const QMat &w, long r, int g0, int n, float *d, float *m) {
    const size_t g = (size_t)r * (w.C / 32) + g0;
    if (F == 3) {
        const float dd = from_fp16(w.d[g / 8]), dm = from_fp16(w.m[g / 8]);
#if defined(__AVX2__)
        if (n == 8) {
            const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w.sc + g))));
            const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w.mn + g))));
            _mm256_storeu_ps(d, _mm256_mul_ps(_mm256_set1_ps(dd), sc));
            _mm256_storeu_ps(m, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps(dm), mn)));
            return;
        }
#endif
        for (int j = 0; j < n; j++) {
            d[j] = dd * (float)w.sc[g + j];
            m[j] = -(dm * (float)w.mn[g + j]);
        }
        return;
    }
#if defined(__F16C__)
    if (n == 8) {
        _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.d + g))));
        if (F == 2) _mm256_storeu_ps(m, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.m + g))));
        if (F == 5) _mm256_storeu_ps(m, _mm256_mul_ps(_mm256_loadu_ps(d), _mm256_set1_ps(-16.f)));
        return;
    }
#endif
    for (int j = 0; j < n; j++) {
        d[j] = from_fp16(w.d[g + j]);
        if (F == 2) m[j] = from_fp16(w.m[g + j]);
        if (F == 5) m[j] = -16.f * d[j];
    }
}

// 16 where bit `first + i` of a q5 group's fifth bits is set, else 0, for lanes i < VL.
inline vf fifth_bits(const uint8_t *qh, int first) {
    uint32_t h;
    std::memcpy(&h, qh, 4);
    vu idx, hv = (vu){} + h;
    for (int i = 0; i < VL; i++) idx[i] = (uint32_t)(first + i);
    return __builtin_convertvector((hv >> idx) & 1u, vf) * 16.f;
}

// Row r's weights at columns k..k+31 (k % 32 == 0) as 32 / VL fp32 vectors, in column order, given its scales.
template <int F>
inline void qgroup(const QMat &w, long r, int k, float d, float m, vf *out) {
    if (F == 1) {
        const int8_t *q = (const int8_t *)w.q + (size_t)r * w.C + k;
        for (int v = 0; v < 32 / VL; v++) out[v] = widen_s8(q + v * VL) * d;
    } else {
        const uint8_t *q = w.q + (size_t)r * (w.C / 2) + k / 2;
        for (int v = 0; v < 32 / VL; v++) {
            vf n = nibbles(q + (v * VL) % 16, v * VL / 16);
            if (F == 5) n += fifth_bits(w.qh + ((size_t)r * (w.C / 32) + k / 32) * 4, v * VL);
            out[v] = n * d + m;
        }
    }
}

// Into L2, the cache lines of row r (the next one) that hold groups g0..g0+7 and, every 32 groups, their scales.
// Without it one thread streamed a 1-token 4-bit expert from DRAM 1.25-1.5x slower on the GPU box; farther ahead
// gained nothing (eval/results/cpu_lane_h200). Past the matrix's end a prefetch reads nothing it may not:
// prefetches never fault. Always inlined: GCC 12 deems a function of prefetches alone pure and drops calls to it.
template <int F>
__attribute__((always_inline)) inline void qprefetch(const QMat &w, long r, int g0) {
    const size_t row = F == 1 ? (size_t)w.C : (size_t)w.C / 2, G = w.C / 32;
    const uint8_t *q = w.q + r * row + (size_t)g0 * (F == 1 ? 32 : 16);
    for (int l = 0; l < (F == 1 ? 4 : 2); l++) __builtin_prefetch(q + 64 * l, 0, 2);
    if (g0 % 32 == 0) {
        const size_t g = r * G + g0;
        if (F == 3) {
            __builtin_prefetch(w.sc + g, 0, 2);
            __builtin_prefetch(w.mn + g, 0, 2);
        } else {
            __builtin_prefetch(w.d + g, 0, 2);
            if (F == 2) __builtin_prefetch(w.m + g, 0, 2);
            if (F == 5) __builtin_prefetch(w.qh + 4 * g, 0, 2);
        }
    }
}

// y[t * ldt] = sum_k W[r, k] * x[t * K + k] for t < TN (K = w.C), 8 groups' scales at a time, the next row
// prefetched meanwhile; one accumulator per vector of a group, so a group's multiply-adds do not wait on each other
// (one core, one token: q8 1.2x, q4 / q4k 1.1x in cache).
template <int F, int TN>
inline void qrow(const QMat &w, long r, const float *x, float *y, long ldt) {
    constexpr int NV = 32 / VL;
    const int K = w.C, G = K / 32;
    vf acc[TN][NV] = {};
    float d[8], m[8] = {};
    const bool prefetch = weight_prefetch.load(std::memory_order_relaxed);
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int n = G - g0 < 8 ? G - g0 : 8;
        if (prefetch) qprefetch<F>(w, r + 1, g0);
        qscales<F>(w, r, g0, n, d, m);
        for (int j = 0; j < n; j++) {
            const int k = (g0 + j) * 32;
            vf wv[NV];
            qgroup<F>(w, r, k, d[j], m[j], wv);
            for (int t = 0; t < TN; t++)
                for (int v = 0; v < NV; v++) acc[t][v] += wv[v] * load(x + (size_t)t * K + k + v * VL);
        }
    }
    for (int t = 0; t < TN; t++) {
        vf sum = acc[t][0];
        for (int v = 1; v < NV; v++) sum += acc[t][v];
        y[t * ldt] = hsum(sum);
    }
}

// Rows r0..r0+rows-1 of w dequantized group by group: put(r, k, v) takes row r0+r's weights at columns k..k+31
// (v: 32 / VL fp32 vectors in column order).
template <int F, typename Put>
__attribute__((always_inline)) inline void dequant_rows(const QMat &w, long r0, int rows, Put put) {
    const int K = w.C;
    float d[8], m[8] = {};
    for (int r = 0; r < rows; r++)
        for (int g0 = 0; g0 < K / 32; g0 += 8) {
            const int n = K / 32 - g0 < 8 ? K / 32 - g0 : 8;
            qscales<F>(w, r0 + r, g0, n, d, m);
            for (int j = 0; j < n; j++) {
                vf v[32 / VL];
                qgroup<F>(w, r0 + r, (g0 + j) * 32, d[j], m[j], v);
                put(r, (g0 + j) * 32, v);
            }
        }
}

// RB rows from r0 against T token rows of x, as rows_all_tokens does for unquantized weights. Up to TB tokens
// dequantize in registers one row at a time, so each row's bytes stream in address order, which the hardware
// prefetcher follows: four interleaved 1-2 KB rows ran 1.1-1.3x slower from DRAM at 1-4 tokens (eval/results/
// cpu_lane_h200). More tokens dequantize the RB rows once into a buffer (L1-sized) that every token block reads.
template <int F>
inline void qrows_all_tokens(const QMat &w, long r0, const float *x, int T_, float *y, long ldt) {
    const int K = w.C;
    if (T_ > TB) {
        thread_local std::vector<float> rows;
        rows.resize((size_t)RB * K);
        dequant_rows<F>(w, r0, RB, [&](int r, int k, const vf *v) {
            std::memcpy(rows.data() + (size_t)r * K + k, v, 32 * sizeof(float));
        });
        rows_all_tokens(rows.data(), x, K, T_, y, ldt);
        return;
    }
    for (int r = 0; r < RB; r++) switch (T_) {      // one row at a time (see above)
        case 4: qrow<F, 4>(w, r0 + r, x, y + r, ldt); break;
        case 3: qrow<F, 3>(w, r0 + r, x, y + r, ldt); break;
        case 2: qrow<F, 2>(w, r0 + r, x, y + r, ldt); break;
        case 1: qrow<F, 1>(w, r0 + r, x, y + r, ldt); break;
        default: break;
    }
}
