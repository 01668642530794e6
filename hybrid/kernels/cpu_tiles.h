// The tile path of cpu_kernel.cpp: CPU experts with more than a few tokens (prefill), bf16 activations, on AMX tile
// registers. Quantized weights are dequantized 16 rows at a time into a bf16 buffer the tiles read.
//
// Included once by cpu_kernel.cpp, after `Job`, `to_bf16`, `round_as`. A weight matrix W [N, K] is read straight
// from memory as A tiles (16 rows x 32 values, row stride K); the expert's tokens are packed once per phase into
// B tiles in the pair-interleaved layout the tile multiply wants: block b of 16 tokens, k-chunk c, pair p holds
// (x[t][32c + 2p], x[t][32c + 2p + 1]) for t = 0..15 (missing tokens are zeros). C tiles [16 rows x 16 tokens]
// accumulate in fp32, so each weight byte is read once per 32 tokens and the work stays memory-bound to far more
// tokens than the vector path (which does one fp32 multiply-add per weight per token).
//
// Two implementations of the same tile operations: the hardware one (compiled where -march=native has AMX) and a
// plain C++ emulation with the instruction's semantics, which the tests run on machines without AMX.
#pragma once

#include <atomic>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define MOE_HW_TILES 1
#else
#define MOE_HW_TILES 0
#endif

namespace {

constexpr int TT = 16;                        // tokens per B tile; weight rows per A tile
constexpr int TKV = 32;                       // bf16 values per tile row (64 bytes)
constexpr int TBLOCK = TT * TKV;              // uint16 values per packed k-chunk of one token block

#if MOE_HW_TILES
struct HwTiles {                              // C tiles 0, 1; A tile 4; B tiles 6, 7
    static void config() {
        alignas(64) unsigned char cfg[64] = {};
        cfg[0] = 1;                           // palette 1
        for (int t = 0; t < 8; t++) {
            cfg[16 + 2 * t] = 64;             // bytes per row
            cfg[48 + t] = 16;                 // rows
        }
        _tile_loadconfig(cfg);
    }
    static void release() { _tile_release(); }
    static void zero() { _tile_zero(0); _tile_zero(1); }
    static void load_a(const void *p, long stride) { _tile_loadd(4, p, stride); }
    static void load_b0(const void *p) { _tile_loadd(6, p, 64); }
    static void load_b1(const void *p) { _tile_loadd(7, p, 64); }
    static void dp0() { _tile_dpbf16ps(0, 4, 6); }
    static void dp1() { _tile_dpbf16ps(1, 4, 7); }
    static void store0(float *p) { _tile_stored(0, p, 64); }
    static void store1(float *p) { _tile_stored(1, p, 64); }
};
#endif

struct EmuTiles {                             // the same operations in plain C++ (tests on machines without AMX)
    struct State {
        float c[2][TT][TT];
        uint16_t a[TT][TKV], b[2][TT][TKV];
    };
    static State &s() {
        thread_local State st;
        return st;
    }
    static void config() {}
    static void release() {}
    static void zero() { std::memset(s().c, 0, sizeof s().c); }
    static void load_a(const void *p, long stride) {
        for (int r = 0; r < TT; r++) std::memcpy(s().a[r], (const char *)p + r * stride, 64);
    }
    static void load_b0(const void *p) { std::memcpy(s().b[0], p, sizeof s().b[0]); }
    static void load_b1(const void *p) { std::memcpy(s().b[1], p, sizeof s().b[1]); }
    static void dp(int i) {                   // C[m][n] += sum_p A[m][2p+q] * B[p][2n+q], q = 0, 1
        State &st = s();
        for (int m = 0; m < TT; m++)
            for (int n = 0; n < TT; n++) {
                float acc = st.c[i][m][n];
                for (int p = 0; p < TT; p++)
                    for (int q = 0; q < 2; q++) acc += from_bf16(st.a[m][2 * p + q]) * from_bf16(st.b[i][p][2 * n + q]);
                st.c[i][m][n] = acc;
            }
    }
    static void dp0() { dp(0); }
    static void dp1() { dp(1); }
    static void store0(float *p) { std::memcpy(p, s().c[0], sizeof s().c[0]); }
    static void store1(float *p) { std::memcpy(p, s().c[1], sizeof s().c[1]); }
};

// Token t of a packed block (K values per token) <- src (K bf16 values), or zeros where src is null.
inline void pack_token(const uint16_t *src, uint16_t *block, int t, int K) {
    for (int c = 0; c < K / TKV; c++)
        for (int p = 0; p < TT; p++) {
            uint16_t *d = block + (size_t)c * TBLOCK + p * TKV + 2 * t;
            d[0] = src ? src[c * TKV + 2 * p] : 0;
            d[1] = src ? src[c * TKV + 2 * p + 1] : 0;
        }
}

// out block [16 rows x 16 tokens] of W (N rows of K, starting at row r0) against packed token blocks b, b + 1
// (`two`): c0, c1 receive the C tiles, row-major [row][token].
// pf: where the thread's next 16 weight rows start (TT * K values, contiguous), or null: each k-chunk also
// prefetches 1/(K/TKV) of them (16 cache lines) into L2, so the next block's rows, one 4 KB page each, are not
// left to the hardware prefetcher, which starts over at every page.
template <typename P>
inline void tile_rows(const uint16_t *w, int K, const uint16_t *xb, bool two, float *c0, float *c1,
                      const char *pf = nullptr) {
    P::zero();
    const uint16_t *xb1 = xb + (size_t)TT * K;
    for (int c = 0; c < K / TKV; c++) {
        if (pf)
            for (int l = 0; l < TT; l++) __builtin_prefetch(pf + (size_t)(c * TT + l) * 64, 0, 2);
        P::load_a(w + c * TKV, 2L * K);
        P::load_b0(xb + (size_t)c * TBLOCK);
        P::dp0();
        if (two) {
            P::load_b1(xb1 + (size_t)c * TBLOCK);
            P::dp1();
        }
    }
    P::store0(c0);
    if (two) P::store1(c1);
}

// Rows r0..r0+15 of a quantized matrix (kind F, cpu_quant.h) dequantized into `out` [16, K] bf16, each weight
// rounded once to bf16 as a bf16 copy of the dequantized model holds it (the GPU's prefill scratch does the same).
template <int F>
inline void dequant_tile_rows(const QMat &w, long r0, uint16_t *out) {
    typedef uint16_t vh __attribute__((vector_size(2 * VL)));
    const size_t K = w.C;
    dequant_rows<F>(w, r0, TT, [out, K](int r, int k, const vf *v) {
        uint16_t *o = out + r * K + k;
        for (int i = 0; i < 32 / VL; i++) {              // to_bf16 lane by lane (finite values: no NaN case)
            vu u;
            std::memcpy(&u, &v[i], sizeof u);
            const vh h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, vh);
            std::memcpy(o + i * VL, &h, sizeof h);
        }
    });
}

// The 16 weight rows from row rb * 16 of expert j's matrix in `phase` (1: w13 [2I, H], 3: w2 [H, I]) as bf16
// rows of K: where they are for bf16 weights, else dequantized into this thread's buffer.
inline const uint16_t *tile_weights(const Job &jb, int phase, int j, int rb) {
    const int K = phase == 1 ? jb.H : jb.I, N = phase == 1 ? 2 * jb.I : jb.H;
    const void *base = phase == 1 ? jb.w13[j] : jb.w2[j];
    if (!jb.wfmt) return (const uint16_t *)base + (size_t)rb * TT * K;
    thread_local std::vector<uint16_t> buf;
    buf.resize((size_t)TT * K);
    switch (matrix_kind(jb.wfmt, phase)) {
        case 1: dequant_tile_rows<1>(qmat<1>(base, N, K), (long)rb * TT, buf.data()); break;
        case 2: dequant_tile_rows<2>(qmat<2>(base, N, K), (long)rb * TT, buf.data()); break;
        case 3: dequant_tile_rows<3>(qmat<3>(base, N, K), (long)rb * TT, buf.data()); break;
        default: dequant_tile_rows<5>(qmat<5>(base, N, K), (long)rb * TT, buf.data()); break;
    }
    return buf.data();
}

// Items [lo, hi) of one phase of the tile path (see Job::size): 16-token blocks in phases 0 and 2, blocks of
// 16 weight rows in 1 and 3. Scratch, by padded token row p (16 per block):
// xf -> packed input (uint16, 16 x H per block), gu [p, 2I] fp32 gate | up, h -> packed silu(gate) * up.
template <typename P>
void run_tile_phase(const Job &jb, int phase, long lo, long hi) {
    const int H = jb.H, I = jb.I;
    const uint16_t *const *w13 = (const uint16_t *const *)jb.w13, *const *w2 = (const uint16_t *const *)jb.w2;
    uint16_t *xp = (uint16_t *)jb.xf, *hp = (uint16_t *)jb.h;
    float *gu = jb.gu;
    alignas(64) float c[2][TT * TT];
    if (phase == 0 || phase == 2) {           // whole 16-token blocks: a block's cache lines have one writer
        for (long b = lo; b < hi; b++)
            for (int t = 0; t < TT; t++) {
                const int j = jb.bexp[b], tl = (int)(b - jb.boff[j]) * TT + t;
                if (phase == 0) {
                    const uint16_t *src = nullptr;
                    if (tl < jb.counts[j]) {
                        const long row = jb.starts[j] + tl;
                        src = (const uint16_t *)jb.x + (size_t)(jb.xrows ? jb.xrows[row] : row) * H;
                    }
                    pack_token(src, xp + (size_t)b * TT * H, t, H);
                    continue;
                }
                const float *g = gu + ((size_t)b * TT + t) * 2 * I;
                uint16_t *block = hp + (size_t)b * TT * I;
                for (int i = 0; i < I; i++) {
                    float gv = round_as<uint16_t>(g[i]), uv = round_as<uint16_t>(g[I + i]);
                    float s = round_as<uint16_t>(gv / (1.f + std::exp(-gv)));
                    block[(size_t)(i / TKV) * TBLOCK + ((i % TKV) / 2) * TKV + 2 * t + (i % 2)] = to_bf16(s * uv);
                }
            }
        return;
    }
    const int K = phase == 1 ? H : I, N = phase == 1 ? 2 * I : H, nrb = N / TT;
    const uint16_t *xs = phase == 1 ? xp : hp;
    const bool prefetch = weight_prefetch.load(std::memory_order_relaxed);
    for (long r = lo; r < hi; r++) {
        const int j = (int)(r / nrb), rb = (int)(r % nrb), nb = (jb.counts[j] + TT - 1) / TT;
        const uint16_t *w = tile_weights(jb, phase, j, rb);
        const char *pf = nullptr;
        if (prefetch && !jb.wfmt && r + 1 < hi) {
            const int jn = (int)((r + 1) / nrb), rn = (int)((r + 1) % nrb);
            pf = (const char *)((phase == 1 ? w13[jn] : w2[jn]) + (size_t)rn * TT * K);
        }
        for (int q = 0; q < nb; q += 2) {
            const bool two = q + 1 < nb;
            tile_rows<P>(w, K, xs + (size_t)(jb.boff[j] + q) * TT * K, two, c[0], c[1], q == 0 ? pf : nullptr);
            for (int s = 0; s < (two ? 2 : 1); s++) {
                const int b = jb.boff[j] + q + s, t0 = (q + s) * TT;
                if (phase == 1) {
                    for (int t = 0; t < TT; t++)
                        for (int m = 0; m < TT; m++) gu[((size_t)b * TT + t) * 2 * I + rb * TT + m] = c[s][m * TT + t];
                    continue;
                }
                uint16_t *out = (uint16_t *)jb.out;
                for (int t = 0; t < TT && t0 + t < jb.counts[j]; t++)
                    for (int m = 0; m < TT; m++)
                        out[(size_t)(jb.starts[j] + t0 + t) * H + rb * TT + m] = to_bf16(c[s][m * TT + t]);
            }
        }
    }
}

inline int hw_tiles() {                       // 1 where AMX is compiled in and the OS lets this process use it
#if MOE_HW_TILES
    static const int ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
#else
    return 0;
#endif
}

}  // namespace
