// A layer's CPU experts at decode sizes (a few tokens per expert): memory-bound GEMV-like work.
//
// out[s:s+c] = W2_j (silu(G_j x) * (U_j x)) for each expert j, with W13_j = [G_j; U_j] ([2I, H]) and W2_j ([H, I]).
// Weights stream from DRAM once per call; activations stay in cache as fp32. Accumulation is fp32; for bf16 the
// intermediate values are rounded to bf16 where torch's bf16 path rounds them (after each linear, after silu, after
// the product), so the result is torch's up to the order of the sums.
//
// Experts with more tokens (prefill) take the tile path of cpu_tiles.h (bf16 activations; AMX hardware or its
// emulation; quantized weights dequantized 16 rows at a time).
//
// Threads, two ways: moe_cpu_experts uses the calling thread's OpenMP team (built with -fopenmp and loaded after
// torch, the library binds to the libgomp torch loaded, so that is torch's team); moe_pool_start hands the same
// work to a pool of the library's own threads and returns at once (the runtime queues GPU work meanwhile).
#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <vector>
#include <version>

namespace {

#ifdef __AVX512F__
constexpr int VL = 16;                        // fp32 lanes of the widest vector this CPU has
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));

inline vf load(const float *p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline vf load(const uint16_t *p) {           // bf16 -> fp32: the bf16 bits are the fp32's high half
    vh h;
    std::memcpy(&h, p, sizeof h);
    vu w = __builtin_convertvector(h, vu) << 16;
    return (vf)w;
}

inline float hsum(vf a) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += a[i];
    return s;
}

inline uint16_t to_bf16(float f) {            // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename T> inline float round_as(float f);
template <> inline float round_as<float>(float f) { return f; }
template <> inline float round_as<uint16_t>(float f) { return from_bf16(to_bf16(f)); }

template <typename T> inline void store(T *p, float f);
template <> inline void store<float>(float *p, float f) { *p = f; }
template <> inline void store<uint16_t>(uint16_t *p, float f) { *p = to_bf16(f); }

// y[t * ldt + r] = sum_k w[r * K + k] * x[t * K + k] for r < RN weight rows and t < TN token rows (K % VL == 0):
// a register tile, so each weight vector loaded feeds TN multiply-adds and each input vector RN.
template <typename W, int RN, int TN>
inline void tile(const W *w, const float *x, int K, float *y, long ldt) {
    vf acc[RN][TN] = {};
    for (int k = 0; k < K; k += VL) {
        vf wv[RN];
        for (int r = 0; r < RN; r++) wv[r] = load(w + (size_t)r * K + k);
        for (int t = 0; t < TN; t++) {
            vf xv = load(x + (size_t)t * K + k);
            for (int r = 0; r < RN; r++) acc[r][t] += wv[r] * xv;
        }
    }
    for (int t = 0; t < TN; t++)
        for (int r = 0; r < RN; r++) y[t * ldt + r] = hsum(acc[r][t]);
}

#ifdef __AVX512F__
constexpr int RB = 4, TB = 4;                 // tile: weight rows x tokens (32 vector registers)
#else
constexpr int RB = 2, TB = 4;                 // 16 vector registers
#endif

// RB weight rows (w, K each) against T token rows of x: y[t * ldt + r] for r < RB, t < T.
template <typename W>
inline void rows_all_tokens(const W *w, const float *x, int K, int T, float *y, long ldt) {
    int t = 0;
    for (; t + TB <= T; t += TB) tile<W, RB, TB>(w, x + (size_t)t * K, K, y + t * ldt, ldt);
    switch (T - t) {
        case 3: tile<W, RB, 3>(w, x + (size_t)t * K, K, y + t * ldt, ldt); break;
        case 2: tile<W, RB, 2>(w, x + (size_t)t * K, K, y + t * ldt, ldt); break;
        case 1: tile<W, RB, 1>(w, x + (size_t)t * K, K, y + t * ldt, ldt); break;
        default: break;
    }
}

// The expert owning flat row r of `n` experts with `rows` rows each.
inline void split(long r, int rows, int &j, int &i) {
    j = (int)(r / rows);
    i = (int)(r % rows);
}

inline float to_f32(float f) { return f; }
inline float to_f32(uint16_t h) { return from_bf16(h); }

struct Job {                                  // one call's arguments (see moe_cpu_experts)
    int dtype, n;
    const void *const *w13, *const *w2;
    const int *starts, *counts;
    const void *x;
    const int *xrows;
    void *out;
    int rows, H, I;
    float *xf, *gu, *h;
    int tiles = 0;                            // 0: vector path; 1: AMX tiles; 2: their emulation
    int wfmt = 0;                             // weights: 0 as the activations; else w13's kind + 4 w2's (cpu_quant.h)
    int dot = 0;                              // bf16 dot-product path (cpu_dot.h): 0 off, 1 hardware, 2 emulated
    int lay13 = 0, lay2 = 0;                  // its activation layouts for w13 / w2 (set_dot_layouts); 0: none
    const int *bexp = nullptr, *boff = nullptr;   // tile path: expert of each 16-token block, first block of each
    int nblocks = 0;

    long size(int phase) const {              // work items of each of the four phases
        if (tiles) return phase == 0 || phase == 2 ? (long)nblocks : (long)n * (phase == 1 ? 2 * I : H) / 16;
        switch (phase) {
            case 0: return rows;                  // input rows widened to fp32
            case 1: return (long)n * (lay13 == 2 ? I : 2 * I) / RB;   // blocks of RB gate and up rows of every
                                                                       // expert; 4-bit dot path: gate / up pairs
            case 2: return lay2 ? (long)rows * (I / 128) : (long)rows * I;   // silu(gate) * up (per block)
            default: return (long)n * H / RB;     // blocks of RB down rows of every expert
        }
    }
};

#include "cpu_quant.h"

// silu(gate) * up from the gate and up rows' fp32 sums, rounded to W wherever torch's W path rounds.
template <typename W>
inline float gated(float gate, float up) {
    const float g = round_as<W>(gate), u = round_as<W>(up);
    return round_as<W>(round_as<W>(g / (1.f + std::exp(-g))) * u);
}

// Items [lo, hi) of one phase. xf [rows, H]: input as fp32; gu [rows, 2I]: gate | up; h [rows, I]: silu(gate) * up.
// W: the activations' type (and the weights' where F == 0); F, F2: w13's and w2's kinds (Job::wfmt).
template <typename W, int F, int F2>
void run_phase(const Job &jb, int phase, long lo, long hi) {
    const int H = jb.H, I = jb.I;
    const W *const *w13 = (const W *const *)jb.w13, *const *w2 = (const W *const *)jb.w2;
    const int *starts = jb.starts, *counts = jb.counts;
    float *xf = jb.xf, *gu = jb.gu, *h = jb.h;
    if (phase == 0) {
        for (long r = lo; r < hi; r++) {
            const W *src = (const W *)jb.x + (size_t)(jb.xrows ? jb.xrows[r] : r) * H;
            for (int c = 0; c < H; c++) xf[(size_t)r * H + c] = to_f32(src[c]);
        }
    } else if (phase == 1) {
        for (long r = lo; r < hi; r++) {
            int j, i;
            split(r, 2 * I / RB, j, i);
            if (F) {
                qrows_all_tokens<F>(qmat<F>(jb.w13[j], 2 * I, H), (long)i * RB, xf + (size_t)starts[j] * H,
                                       counts[j], gu + (size_t)starts[j] * 2 * I + i * RB, 2 * I);
                continue;
            }
            rows_all_tokens(w13[j] + (size_t)i * RB * H, xf + (size_t)starts[j] * H, H, counts[j],
                            gu + (size_t)starts[j] * 2 * I + i * RB, 2 * I);
        }
    } else if (phase == 2) {
        for (long r = lo; r < hi; r++) {
            long t = r / I, i = r % I;
            h[r] = gated<W>(gu[t * 2 * I + i], gu[t * 2 * I + I + i]);
        }
    } else {
        W *out = (W *)jb.out;
        for (long r = lo; r < hi; r++) {
            int j, o;
            split(r, H / RB, j, o);
            float y[TB * RB];
            const W *w = w2[j] + (size_t)o * RB * I;
            for (int t0 = 0; t0 < counts[j]; t0 += TB) {
                int tn = counts[j] - t0 < TB ? counts[j] - t0 : TB;
                if (F2)
                    qrows_all_tokens<F2>(qmat<F2>(jb.w2[j], H, I), (long)o * RB, h + (size_t)(starts[j] + t0) * I,
                                           tn, y, RB);
                else
                    rows_all_tokens(w, h + (size_t)(starts[j] + t0) * I, I, tn, y, RB);
                for (int t = 0; t < tn; t++)
                    for (int q = 0; q < RB; q++) store(out + (size_t)(starts[j] + t0 + t) * H + o * RB + q, y[t * RB + q]);
            }
        }
    }
}

}  // namespace

#include "cpu_dot.h"
#include "cpu_tiles.h"

namespace {

// The tile path's block tables, kept in `buf`: first block of each expert (boff), expert of each block (bexp).
inline void set_blocks(Job &jb, std::vector<int> &buf) {
    if (!jb.tiles) return;
    buf.clear();
    for (int j = 0, b = 0; j < jb.n; b += (jb.counts[j] + TT - 1) / TT, j++) buf.push_back(b);
    for (int j = 0; j < jb.n; j++)
        for (int k = 0; k < (jb.counts[j] + TT - 1) / TT; k++) buf.push_back(j);
    jb.boff = buf.data(), jb.bexp = buf.data() + jb.n, jb.nblocks = (int)buf.size() - jb.n;
}

template <typename W>
inline void run_fmt(const Job &jb, int phase, long lo, long hi) {
    if (jb.wfmt == 1 + 4 * 1) run_phase<W, 1, 1>(jb, phase, lo, hi);
    else if (jb.wfmt == 2 + 4 * 2) run_phase<W, 2, 2>(jb, phase, lo, hi);
    else if (jb.wfmt == 3 + 4 * 1) run_phase<W, 3, 1>(jb, phase, lo, hi);
    else if (jb.wfmt == 5 + 4 * 5) run_phase<W, 5, 5>(jb, phase, lo, hi);
    else if (jb.wfmt == 3 + 4 * 5) run_phase<W, 3, 5>(jb, phase, lo, hi);
    else run_phase<W, 0, 0>(jb, phase, lo, hi);
}

inline void run_items(const Job &jb, int phase, long lo, long hi) {
    if (jb.lay13) {
#if MOE_HW_DOT
        if (jb.dot == 1) return run_dot<HwDot>(jb, phase, lo, hi);
#endif
        return run_dot<EmuDot>(jb, phase, lo, hi);
    }
#if MOE_HW_TILES
    if (jb.tiles == 1) return run_tile_phase<HwTiles>(jb, phase, lo, hi);
#endif
    if (jb.tiles) run_tile_phase<EmuTiles>(jb, phase, lo, hi);
    else if (jb.dtype == 0) run_fmt<float>(jb, phase, lo, hi);
    else run_fmt<uint16_t>(jb, phase, lo, hi);
}

inline void tiles_on(const Job &jb) {         // tile registers are per thread: configure before, free after
#if MOE_HW_TILES
    if (jb.tiles == 1) HwTiles::config();
#endif
}

inline void tiles_off(const Job &jb) {
#if MOE_HW_TILES
    if (jb.tiles == 1) HwTiles::release();
#endif
}

// Member `part` of `parts` runs its static share of every phase, calling sync() between phases.
template <typename Sync>
void run_share(const Job &jb, int part, int parts, Sync sync) {
    tiles_on(jb);
    for (int phase = 0; phase < 4; phase++) {
        long n = jb.size(phase);
        run_items(jb, phase, n * part / parts, n * (part + 1) / parts);
        if (phase < 3) sync();
    }
    tiles_off(jb);
}

}  // namespace

#include "cpu_pool.h"

namespace {

Pool *pool = nullptr;

}  // namespace

extern "C" {

// Checks shared by both entry points: 0, or the error code the caller reports.
static int check(int dtype, int H, int I, int tiles, int wfmt, int dot) {
    if (dot < 0 || dot > 2 || (dot == 1 && !MOE_HW_DOT)) return 7;
    if (H % 16 || I % 16) return 1;
    if (wfmt != 0 && wfmt != 5 && wfmt != 10 && wfmt != 7 && wfmt != 25 && wfmt != 23) return 6;
    if (wfmt && (H % (matrix_kind(wfmt, 1) == 3 ? 256 : 32) || I % 32)) return 6;
    if (dtype != 0 && dtype != 1) return 2;
    if (tiles < 0 || tiles > 2 || (tiles && (dtype != 1 || H % 32 || I % 32))) return 4;
    if (tiles == 1 && !hw_tiles()) return 5;
    return 0;
}

// dtype 0: float32, 1: bfloat16 (as raw uint16). Rows of out are grouped by expert: expert j owns rows
// [starts[j], starts[j] + counts[j]); row r's input is x[xrows[r]] (x[r] if xrows is null). H, I % 16 == 0.
// tiles 0: vector path, scratch xf [rows*H], gu [rows*2I], h [rows*I] floats. tiles 1 (AMX) / 2 (emulated):
// bf16, H, I % 32 == 0; with P = 16 * sum(ceil(counts / 16)) padded rows, scratch xf [P*H/2], gu [P*2I], h [P*I/2].
// wfmt 0: weights in the activations' dtype; else quantized (cpu_quant.h), w13's kind + 4 x w2's: 5 (q8, q8),
// 10 (q4, q4), 7 (q4k, q8), 25 (q5, q5), 23 (q4k, q5); vector path, H, I % 32 == 0 (q4k: H % 256); w13[j] / w2[j]
// point at their planes.
// dot 1 / 2: bf16 activations against bf16, q4 or q4k weights take the dot-product path (cpu_dot.h; 1: AVX512-BF16,
// where moe_dot() says so; 2: its emulation) where H, I % 128 == 0; 0: never.
int moe_cpu_experts(int dtype, int n, const void *const *w13, const void *const *w2, const int *starts,
                    const int *counts, const void *x, const int *xrows, void *out, int rows, int H, int I,
                    float *xf, float *gu, float *h, int tiles, int wfmt, int dot) {
    if (int err = check(dtype, H, I, tiles, wfmt, dot)) return err;
    Job jb{dtype, n, w13, w2, starts, counts, x, xrows, out, rows, H, I, xf, gu, h, tiles, wfmt, dot};
    set_dot_layouts(jb);
    std::vector<int> blocks;
    set_blocks(jb, blocks);
#pragma omp parallel
    run_share(jb, omp_get_thread_num(), omp_get_num_threads(), [] {
#pragma omp barrier
    });
    return 0;
}

// The same work on the library's own thread pool (created by the first call with `threads` members), returning
// at once; moe_pool_wait() blocks until it is done (-> ns from start to its last item). One job at a time; its
// buffers must outlive the wait.
int moe_pool_start(int threads, long spin_ns, int dtype, int n, const void *const *w13, const void *const *w2,
                   const int *starts, const int *counts, const void *x, const int *xrows, void *out, int rows,
                   int H, int I, float *xf, float *gu, float *h, int tiles, int wfmt, int dot) {
    if (int err = check(dtype, H, I, tiles, wfmt, dot)) return err;
    if (threads < 1) return 3;
    if (pool == nullptr) pool = new Pool(threads, spin_ns);
    Job jb{dtype, n, w13, w2, starts, counts, x, xrows, out, rows, H, I, xf, gu, h, tiles, wfmt, dot};
    set_dot_layouts(jb);
    pool->start(jb);
    return 0;
}

long moe_pool_wait(void) { return pool == nullptr ? 0 : pool->wait(); }

// Idle members stop spinning and sleep until the next job: call before CPU work on other threads (torch's team).
void moe_pool_park(void) {
    if (pool != nullptr) pool->park();
}

int moe_pool_threads(void) { return pool == nullptr ? 0 : pool->size(); }

// moe_pool_wait's caller works on jobs of more than `rows` rows (0, the default: on every job) and only waits for
// the members on the others; -> the setting before.
int moe_pool_join_above(int rows) { return join_above.exchange(rows > 0 ? rows : 0, std::memory_order_relaxed); }

// How many pool members take the next jobs (at least 1; the rest sleep): fewer while other processes keep cores
// busy. Call between jobs.
void moe_pool_limit(int members) { members_wanted.store(members > 1 ? members : 1, std::memory_order_relaxed); }

int moe_cpu_threads(void) { return omp_get_max_threads(); }

// 1 where the AMX tile path runs on this machine (compiled in, allowed by the OS), else 0.
int moe_tiles(void) { return hw_tiles(); }

// 1 where the dot-product path runs on AVX512-BF16 here (compiled in), else 0.
int moe_dot(void) { return MOE_HW_DOT; }

// The activation layouts (4 * w13's + w2's, set_dot_layouts) a job of these arguments reads; 0: the plain path.
int moe_dot_layouts(int dtype, int n, int rows, int H, int I, int tiles, int wfmt, int dot) {
    Job jb{};
    jb.dtype = dtype, jb.n = n, jb.rows = rows, jb.H = H, jb.I = I, jb.tiles = tiles, jb.wfmt = wfmt, jb.dot = dot;
    set_dot_layouts(jb);
    return 4 * jb.lay13 + jb.lay2;
}

// Software prefetch of the next weight rows (tile path and quantized vector path): 1 on (the default), 0 off.
void moe_set_prefetch(int on) { weight_prefetch.store(on, std::memory_order_relaxed); }

}
