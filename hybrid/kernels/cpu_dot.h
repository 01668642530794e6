// The bf16 dot-product path of cpu_kernel.cpp's vector path: bf16 activations against bf16, q4 or q4k weights, on
// AVX512-BF16's pair dot product (16 fp32 lanes += 32 bf16 x bf16 products, each product exact in fp32).
//
// Included once by cpu_kernel.cpp, after `Job`, `QMat`, `qscales`, `qprefetch` and `run_fmt`. The plain vector path
// spends ~5 instructions per 16 weights on a 4-bit weight (widen, convert, scale, then the multiply-add); at one
// token per expert those and the read order, not DRAM bandwidth, bound a 4-bit expert on 15 cores (eval/results/
// cpu_lane_h200). Here a 4-bit weight q (0..15) is looked up as a
// bf16 value (exact) by a word permute, the pair dot product multiplies it by the bf16 activation, and the scales
// come per group of 32 out of the sum: w x = (d q + m) x summed over a group is d (sum q x) + m (sum x). Activations
// of a bf16 model are bf16 values (the intermediate h is rounded to bf16 where torch rounds it), so every product
// is exact and sums stay fp32: the function is the plain path's up to the order of the sums.
//
// Activation layouts, written once per call: "natural" (bf16 rows, for bf16 weights) and "blocked" (q4 / q4k):
// per block of 128 values, the 128 bf16 values in the order a 64-byte load of four groups' nibbles yields them,
// then 16 floats: group g's sum / 4 in lanes 4g..4g+3 (the lanes of the dot products that carry group g).
//
// Two implementations of the same operations: the hardware one (where -march=native has AVX512-BF16) and a plain
// C++ emulation with the instruction's semantics, which the tests run on every CPU.
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MOE_HW_DOT 1
#else
#define MOE_HW_DOT 0
#endif

namespace {

constexpr int DB = 128;                       // values per blocked activation block (four groups of 32)
constexpr int DBS = DB + 2 * 16;              // its uint16 footprint: 128 bf16, then 16 floats

inline uint16_t bf16_of_nibble(int j) {       // bf16 bits of the integer j & 15 (exact)
    float f = (float)(j & 15);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

// Where the word permute's 5-bit index lands: entry j holds bf16(j & 15), so bit 4 (the next nibble's low bit)
// needs no mask.
struct NibbleTable {
    alignas(64) uint16_t v[32];
    NibbleTable() {
        for (int j = 0; j < 32; j++) v[j] = bf16_of_nibble(j);
    }
};
const NibbleTable nibble_table;

#if MOE_HW_DOT
struct HwDot {
    typedef __m512 V;
    typedef __m512i B;
    static V zero() { return _mm512_setzero_ps(); }
    static B load(const uint16_t *p) { return _mm512_loadu_si512(p); }
    static V loadf(const uint16_t *p) { return _mm512_loadu_ps(p); }
    static V dot(V acc, B a, B b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float hsum(V v) { return _mm512_reduce_add_ps(v); }
    // 64 bytes = four groups' nibbles -> their 128 weights as bf16: word w of n[s] is nibble s of bytes 2w, 2w+1.
    static void nibbles(const uint8_t *p, B n[4]) {
        const B t = _mm512_load_si512(nibble_table.v), w = _mm512_loadu_si512(p);
        n[0] = _mm512_permutexvar_epi16(w, t);
        n[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), t);
        n[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), t);
        n[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), t);
    }
    static V quads(const float *s) {          // lanes 4g..4g+3 = s[g], g < 4
        const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s)));
    }
};
#endif

struct EmuDot {                               // the same operations in plain C++ (tests on every CPU)
    struct V { float f[16]; };
    struct B { uint16_t h[32]; };
    static V zero() { return V{}; }
    static B load(const uint16_t *p) {
        B b;
        std::memcpy(b.h, p, sizeof b.h);
        return b;
    }
    static V loadf(const uint16_t *p) {
        V v;
        std::memcpy(v.f, p, sizeof v.f);
        return v;
    }
    static V dot(V acc, B a, B b) {           // the instruction's order: the odd pair's product first
        for (int l = 0; l < 16; l++) {
            acc.f[l] += from_bf16(a.h[2 * l + 1]) * from_bf16(b.h[2 * l + 1]);
            acc.f[l] += from_bf16(a.h[2 * l]) * from_bf16(b.h[2 * l]);
        }
        return acc;
    }
    static V fma(V a, V b, V c) {
        for (int l = 0; l < 16; l++) c.f[l] = std::fma(a.f[l], b.f[l], c.f[l]);
        return c;
    }
    static float hsum(V v) {
        float s = 0.f;
        for (int l = 0; l < 16; l++) s += v.f[l];
        return s;
    }
    static void nibbles(const uint8_t *p, B n[4]) {
        for (int w = 0; w < 32; w++) {
            const unsigned word = p[2 * w] | (unsigned)p[2 * w + 1] << 8;
            for (int s = 0; s < 4; s++) n[s].h[w] = nibble_table.v[(word >> (4 * s)) & 31];
        }
    }
    static V quads(const float *s) {
        V v;
        for (int l = 0; l < 16; l++) v.f[l] = s[l / 4];
        return v;
    }
};

inline uint16_t bf16_bits(uint16_t h) { return h; }
inline uint16_t bf16_bits(float f) { return to_bf16(f); }  // f holds a bf16 value: exact

// One block of 128 activations (bf16 values, as bf16 or as floats) into the blocked layout: word w of part s holds
// the value that nibble s of word w of the weights' 64-byte load multiplies (group w / 8, bytes 2j, 2j + 1,
// j = w % 8: values 2j, 2j + 16, 2j + 1, 2j + 17 of the group), then the groups' sums / 4.
template <typename In>
inline void block_activations(const In *x, uint16_t *dst) {
    static const int off[4] = {0, 16, 1, 17};
    float sums[4] = {};
    for (int g = 0; g < 4; g++) {
        for (int s = 0; s < 4; s++)
            for (int j = 0; j < 8; j++) dst[32 * s + 8 * g + j] = bf16_bits(x[32 * g + 2 * j + off[s]]);
        for (int e = 0; e < 32; e++) sums[g] += to_f32(x[32 * g + e]);
    }
    float q[16];
    for (int l = 0; l < 16; l++) q[l] = sums[l / 4] / 4.f;
    std::memcpy(dst + DB, q, sizeof q);
}

// y[t * ldt + r] = sum_k W[r0 + r, k] x_t[k] for r < RN, t < TN: bf16 weights, natural activations (stride xs).
template <class D, int RN, int TN>
inline void dot_tile_bf16(const uint16_t *w, int K, const uint16_t *x, long xs, float *y, long ldt) {
    typename D::V acc[RN][TN];
    for (int r = 0; r < RN; r++)
        for (int t = 0; t < TN; t++) acc[r][t] = D::zero();
    for (int k = 0; k < K; k += 32) {
        typename D::B wv[RN];
        for (int r = 0; r < RN; r++) wv[r] = D::load(w + (size_t)r * K + k);
        for (int t = 0; t < TN; t++) {
            const typename D::B xv = D::load(x + t * xs + k);
            for (int r = 0; r < RN; r++) acc[r][t] = D::dot(acc[r][t], wv[r], xv);
        }
    }
    for (int t = 0; t < TN; t++)
        for (int r = 0; r < RN; r++) y[t * ldt + r] = D::hsum(acc[r][t]);
}

// One q4 / q4k row (F = 2 / 3) against TN tokens of blocked activations: per block, the row's four groups dot the
// token's four parts, then their scales and minimums apply per group.
template <class D, int F, int TN>
inline void dot_row_q4(const QMat &w, long r, const uint16_t *x, long xs, float *y, long ldt) {
    const int K = w.C, G = K / 32;
    typename D::V acc[TN];
    for (int t = 0; t < TN; t++) acc[t] = D::zero();
    float d[8], m[8] = {};
    const bool prefetch = weight_prefetch.load(std::memory_order_relaxed);
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int n = G - g0 < 8 ? G - g0 : 8;                 // 4 or 8: K % 128 == 0
        if (prefetch) qprefetch<F>(w, r + 1, g0);
        qscales<F>(w, r, g0, n, d, m);
        for (int b = 0; b < n; b += 4) {
            const long blk = (g0 + b) / 4;
            typename D::B q[4];
            D::nibbles(w.q + (size_t)r * (K / 2) + blk * 64, q);
            const typename D::V dv = D::quads(d + b), mv = D::quads(m + b);
            for (int t = 0; t < TN; t++) {
                const uint16_t *xb = x + t * xs + blk * DBS;
                typename D::V s = D::dot(D::zero(), q[0], D::load(xb));
                s = D::dot(s, q[1], D::load(xb + 32));
                s = D::dot(s, q[2], D::load(xb + 64));
                s = D::dot(s, q[3], D::load(xb + 96));
                acc[t] = D::fma(mv, D::loadf(xb + DB), D::fma(s, dv, acc[t]));
            }
        }
    }
    for (int t = 0; t < TN; t++) y[t * ldt] = D::hsum(acc[t]);
}

// Gate row r and up row r + I of a q4 / q4k w13 (F = 2 / 3) side by side, each summed exactly as dot_row_q4 sums
// it: the two rows are I rows (a page or more) apart, so each is a stream of its own for the hardware prefetcher
// (two rows of one page interleaved were slower, eval/results/cpu_lane_h200), and the token's activations are
// loaded once for both.
template <class D, int F, int TN>
inline void dot_pair_q4(const QMat &w, long r, long r2, const uint16_t *x, long xs, float *y, float *y2, long ldt) {
    const int K = w.C, G = K / 32;
    typename D::V acc[TN], acc2[TN];
    for (int t = 0; t < TN; t++) acc[t] = acc2[t] = D::zero();
    float d[8], m[8] = {}, d2[8], m2[8] = {};
    const bool prefetch = weight_prefetch.load(std::memory_order_relaxed);
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int n = G - g0 < 8 ? G - g0 : 8;
        if (prefetch) {
            qprefetch<F>(w, r + 1, g0);
            qprefetch<F>(w, r2 + 1, g0);
        }
        qscales<F>(w, r, g0, n, d, m);
        qscales<F>(w, r2, g0, n, d2, m2);
        for (int b = 0; b < n; b += 4) {
            const long blk = (g0 + b) / 4;
            typename D::B q[4], q2[4];
            D::nibbles(w.q + (size_t)r * (K / 2) + blk * 64, q);
            D::nibbles(w.q + (size_t)r2 * (K / 2) + blk * 64, q2);
            const typename D::V dv = D::quads(d + b), mv = D::quads(m + b);
            const typename D::V dv2 = D::quads(d2 + b), mv2 = D::quads(m2 + b);
            for (int t = 0; t < TN; t++) {
                const uint16_t *xb = x + t * xs + blk * DBS;
                const typename D::B x0 = D::load(xb), x1 = D::load(xb + 32), x2 = D::load(xb + 64),
                                    x3 = D::load(xb + 96);
                const typename D::V xsum = D::loadf(xb + DB);
                typename D::V s = D::dot(D::dot(D::dot(D::dot(D::zero(), q[0], x0), q[1], x1), q[2], x2), q[3], x3);
                typename D::V s2 = D::dot(D::dot(D::dot(D::dot(D::zero(), q2[0], x0), q2[1], x1), q2[2], x2),
                                          q2[3], x3);
                acc[t] = D::fma(mv, xsum, D::fma(s, dv, acc[t]));
                acc2[t] = D::fma(mv2, xsum, D::fma(s2, dv2, acc2[t]));
            }
        }
    }
    for (int t = 0; t < TN; t++) {
        y[t * ldt] = D::hsum(acc[t]);
        y2[t * ldt] = D::hsum(acc2[t]);
    }
}

// RB weight rows from r0 (row-major bf16 `w` with K columns, or the q4-family matrix `qm`) against T tokens of
// activations in layout `lay` (1 natural, 2 blocked), in blocks of up to TB tokens. 4-bit rows go one at a time
// (qrows_all_tokens says why); bf16 rows (4 KB, a page each) in register tiles of RB.
template <class D, int F>
inline void dot_rows(const void *w, const QMat &qm, long r0, int K, int lay, const uint16_t *x, int T, float *y,
                     long ldt) {
    const long xs = lay == 1 ? K : (long)K / DB * DBS;
    for (int t0 = 0; t0 < T; t0 += TB) {
        const int tn = T - t0 < TB ? T - t0 : TB;
        const uint16_t *xt = x + t0 * xs;
        float *yt = y + t0 * ldt;
        const uint16_t *wr = (const uint16_t *)w + (size_t)r0 * K;
#define MOE_DOT_CASE(N) \
        case N: \
            if constexpr (F != 0) { \
                for (int r = 0; r < RB; r++) dot_row_q4<D, F, N>(qm, r0 + r, xt, xs, yt + r, ldt); \
            } else dot_tile_bf16<D, RB, N>(wr, K, xt, xs, yt, ldt); \
            break;
        switch (tn) {
            MOE_DOT_CASE(1) MOE_DOT_CASE(2) MOE_DOT_CASE(3) MOE_DOT_CASE(4)
            default: break;
        }
#undef MOE_DOT_CASE
    }
}

// RB gate rows from r0 of a q4 / q4k w13 and the RB up rows I below them (dot_pair_q4), against T tokens of blocked
// activations in blocks of up to TB tokens: y row r0 + r and r0 + r + I.
template <class D, int F>
inline void dot_pairs(const QMat &qm, long r0, int I, const uint16_t *x, int T, float *y, long ldt) {
    const long xs = (long)qm.C / DB * DBS;
    for (int t0 = 0; t0 < T; t0 += TB) {
        const int tn = T - t0 < TB ? T - t0 : TB;
        const uint16_t *xt = x + t0 * xs;
        float *yt = y + t0 * ldt;
#define MOE_PAIR_CASE(N) \
        case N: \
            for (int r = 0; r < RB; r++) \
                dot_pair_q4<D, F, N>(qm, r0 + r, r0 + r + I, xt, xs, yt + r, yt + r + I, ldt); \
            break;
        switch (tn) {
            MOE_PAIR_CASE(1) MOE_PAIR_CASE(2) MOE_PAIR_CASE(3) MOE_PAIR_CASE(4)
            default: break;
        }
#undef MOE_PAIR_CASE
    }
}

// Items [lo, hi) of one phase of a job on this path (Job::lay13 / lay2 say which layout each matrix reads; a w2
// with none, q8, takes the plain path's phases 2 and 3). Scratch: xf holds the blocked or natural input, h the
// intermediate likewise when w2 reads it.
template <class D, int F, int F2>
void run_dot_phase(const Job &jb, int phase, long lo, long hi) {
    const int H = jb.H, I = jb.I;
    uint16_t *xd = (uint16_t *)jb.xf, *hd = (uint16_t *)jb.h;
    const long xs = jb.lay13 == 1 ? H : (long)H / DB * DBS, hs = jb.lay2 == 1 ? I : (long)I / DB * DBS;
    if (phase == 0) {
        for (long r = lo; r < hi; r++) {
            const uint16_t *src = (const uint16_t *)jb.x + (size_t)(jb.xrows ? jb.xrows[r] : r) * H;
            if (jb.lay13 == 1) std::memcpy(xd + r * xs, src, sizeof(uint16_t) * H);
            else for (int b = 0; b < H / DB; b++) block_activations(src + b * DB, xd + r * xs + b * DBS);
        }
    } else if (phase == 1) {
        for (long r = lo; r < hi; r++) {
            int j, i;
            if constexpr (F != 0) {                     // 4-bit: gate and up rows in pairs (Job::size)
                split(r, I / RB, j, i);
                dot_pairs<D, F>(qmat<F>(jb.w13[j], 2 * I, H), (long)i * RB, I, xd + jb.starts[j] * xs,
                                jb.counts[j], jb.gu + (size_t)jb.starts[j] * 2 * I + i * RB, 2 * I);
            } else {
                split(r, 2 * I / RB, j, i);
                dot_rows<D, F>(jb.w13[j], QMat{}, (long)i * RB, H, jb.lay13, xd + jb.starts[j] * xs, jb.counts[j],
                               jb.gu + (size_t)jb.starts[j] * 2 * I + i * RB, 2 * I);
            }
        }
    } else if (F2 == 1 || !jb.lay2) {
        run_phase<uint16_t, F, F2>(jb, phase, lo, hi);
    } else if (phase == 2) {
        for (long it = lo; it < hi; it++) {             // one block of 128 intermediate values of one token
            const long t = it / (I / DB), c0 = (it % (I / DB)) * DB;
            float v[DB];
            const float *g = jb.gu + t * 2 * I + c0;
            for (int c = 0; c < DB; c++) v[c] = gated<uint16_t>(g[c], g[I + c]);
            if (jb.lay2 == 1) for (int c = 0; c < DB; c++) hd[t * hs + c0 + c] = to_bf16(v[c]);
            else block_activations(v, hd + t * hs + c0 / DB * DBS);
        }
    } else if constexpr (F2 == 0 || F2 == 2) {     // downs on this path: bf16 or q4
        uint16_t *out = (uint16_t *)jb.out;
        for (long r = lo; r < hi; r++) {
            int j, o;
            split(r, H / RB, j, o);
            const int c = jb.counts[j];
            QMat qm{};
            if constexpr (F2 != 0) qm = qmat<F2>(jb.w2[j], H, I);
            float y[64 * RB];
            for (int t0 = 0; t0 < c; t0 += 64) {
                const int tn = c - t0 < 64 ? c - t0 : 64;
                dot_rows<D, F2>(jb.w2[j], qm, (long)o * RB, I, jb.lay2, hd + (jb.starts[j] + t0) * hs, tn, y, RB);
                for (int t = 0; t < tn; t++)
                    for (int q = 0; q < RB; q++)
                        out[(size_t)(jb.starts[j] + t0 + t) * H + o * RB + q] = to_bf16(y[t * RB + q]);
            }
        }
    }
}

template <class D>
inline void run_dot(const Job &jb, int phase, long lo, long hi) {
    if (jb.wfmt == 2 + 4 * 2) run_dot_phase<D, 2, 2>(jb, phase, lo, hi);
    else if (jb.wfmt == 3 + 4 * 1) run_dot_phase<D, 3, 1>(jb, phase, lo, hi);
    else if (jb.wfmt == 3 + 4 * 5) run_dot_phase<D, 3, 5>(jb, phase, lo, hi);
    else run_dot_phase<D, 0, 0>(jb, phase, lo, hi);
}

// Mean tokens per expert up to which 4-bit weights take this path: on the GPU box's 15 cores, from DRAM, it ran
// 1.2-1.6x faster than the plain path at 1 token, about level at 2 and 1.1-1.2x slower at 4 (eval/results/
// cpu_lane_h200): past a few tokens the pair dot products, not the bytes, bound it.
constexpr int DOT_Q4_MAX_MEAN = 2;

// Which layouts a job reads on this path (`dot` 1 hardware, 2 emulated): none unless the activations are bf16,
// the vector path runs, both sizes are whole blocks and the weights are bf16, q4 or q4k (gate / up) and bf16 or
// q4 (down), 4-bit ones only at DOT_Q4_MAX_MEAN tokens per expert or fewer.
inline void set_dot_layouts(Job &jb) {
    jb.lay13 = jb.lay2 = 0;
    if (!jb.dot || jb.dtype != 1 || jb.tiles || jb.H % DB || jb.I % DB) return;
    if (jb.wfmt != 0 && jb.rows > DOT_Q4_MAX_MEAN * jb.n) return;
    if (jb.wfmt == 0) jb.lay13 = jb.lay2 = 1;
    else if (jb.wfmt == 2 + 4 * 2) jb.lay13 = jb.lay2 = 2;
    else if (jb.wfmt == 3 + 4 * 1 || jb.wfmt == 3 + 4 * 5) jb.lay13 = 2;
}

}  // namespace
