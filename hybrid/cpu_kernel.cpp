// A layer's CPU experts at decode sizes (a few tokens per expert): memory-bound GEMV-like work.
//
// out[s:s+c] = W2_j (silu(G_j x) * (U_j x)) for each expert j, with W13_j = [G_j; U_j] ([2I, H]) and W2_j ([H, I]).
// Weights stream from DRAM once per call; activations stay in cache as fp32. Accumulation is fp32; for bf16 the
// intermediate values are rounded to bf16 where torch's bf16 path rounds them (after each linear, after silu, after
// the product), so the result is torch's up to the order of the sums.
//
// Threads: the calling thread's OpenMP team. Built with -fopenmp and loaded after torch, this library binds to the
// libgomp torch already loaded, so it reuses torch's worker threads (torch.set_num_threads) instead of a second team.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

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

// y[t * ldy] = sum_k w[k] * x[t * K + k] for t < TN: one weight row against TN token rows (K % VL == 0).
template <typename W, int TN>
inline void row_dot(const W *w, const float *x, int K, float *y, int ldy) {
    vf a0{}, a1{}, a2{}, a3{};
    const float *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    for (int k = 0; k < K; k += VL) {
        vf wv = load(w + k);
        a0 += wv * load(x + k);
        if (TN > 1) a1 += wv * load(x1 + k);
        if (TN > 2) a2 += wv * load(x2 + k);
        if (TN > 3) a3 += wv * load(x3 + k);
    }
    y[0] = hsum(a0);
    if (TN > 1) y[ldy] = hsum(a1);
    if (TN > 2) y[2 * ldy] = hsum(a2);
    if (TN > 3) y[3 * ldy] = hsum(a3);
}

template <typename W>
inline void row_all_tokens(const W *w, const float *x, int K, int T, float *y, int ldy) {
    int t = 0;
    for (; t + 4 <= T; t += 4) row_dot<W, 4>(w, x + (size_t)t * K, K, y + (size_t)t * ldy, ldy);
    switch (T - t) {
        case 3: row_dot<W, 3>(w, x + (size_t)t * K, K, y + (size_t)t * ldy, ldy); break;
        case 2: row_dot<W, 2>(w, x + (size_t)t * K, K, y + (size_t)t * ldy, ldy); break;
        case 1: row_dot<W, 1>(w, x + (size_t)t * K, K, y + (size_t)t * ldy, ldy); break;
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

template <typename W>
void experts(int n, const W *const *w13, const W *const *w2, const int *starts, const int *counts,
             const W *x, const int *xrows, W *out, int rows, int H, int I, float *xf, float *gu, float *h) {
    // xf [rows, H]: input as fp32; gu [rows, 2I]: gate | up; h [rows, I]: silu(gate) * up, as rounded values.
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const W *src = x + (size_t)(xrows ? xrows[r] : r) * H;
            for (int c = 0; c < H; c++) xf[(size_t)r * H + c] = to_f32(src[c]);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < (long)n * 2 * I; r++) {          // every expert's gate and up rows, split evenly
            int j, i;
            split(r, 2 * I, j, i);
            row_all_tokens(w13[j] + (size_t)i * H, xf + (size_t)starts[j] * H, H, counts[j],
                           gu + (size_t)starts[j] * 2 * I + i, 2 * I);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < (long)rows * I; r++) {
            long t = r / I, i = r % I;
            float g = round_as<W>(gu[t * 2 * I + i]), u = round_as<W>(gu[t * 2 * I + I + i]);
            float s = round_as<W>(g / (1.f + std::exp(-g)));
            h[r] = round_as<W>(s * u);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < (long)n * H; r++) {              // every expert's down rows
            int j, o;
            split(r, H, j, o);
            float y[64];
            for (int t0 = 0; t0 < counts[j]; t0 += 64) {
                int tn = counts[j] - t0 < 64 ? counts[j] - t0 : 64;
                row_all_tokens(w2[j] + (size_t)o * I, h + (size_t)(starts[j] + t0) * I, I, tn, y, 1);
                for (int t = 0; t < tn; t++) store(out + (size_t)(starts[j] + t0 + t) * H + o, y[t]);
            }
        }
    }
}

}  // namespace

extern "C" {

// dtype 0: float32, 1: bfloat16 (as raw uint16). Rows of out are grouped by expert: expert j owns rows
// [starts[j], starts[j] + counts[j]); row r's input is x[xrows[r]] (x[r] if xrows is null).
// Scratch: xf [rows*H], gu [rows*2I], h [rows*I] floats. H, I % 16 == 0.
int moe_cpu_experts(int dtype, int n, const void *const *w13, const void *const *w2, const int *starts,
                    const int *counts, const void *x, const int *xrows, void *out, int rows, int H, int I,
                    float *xf, float *gu, float *h) {
    if (H % 16 || I % 16) return 1;
    if (dtype == 0)
        experts<float>(n, (const float *const *)w13, (const float *const *)w2, starts, counts,
                       (const float *)x, xrows, (float *)out, rows, H, I, xf, gu, h);
    else if (dtype == 1)
        experts<uint16_t>(n, (const uint16_t *const *)w13, (const uint16_t *const *)w2, starts, counts,
                          (const uint16_t *)x, xrows, (uint16_t *)out, rows, H, I, xf, gu, h);
    else
        return 2;
    return 0;
}

int moe_cpu_threads(void) { return omp_get_max_threads(); }

}
