/* The weight gradient of a depthwise conv (one filter per channel, stride 1, no dilation), for the dense
 * training path of adapted depthwise convs (layers/conv_autograd.py):
 *
 *     dW[c][i][j] = sum_n sum_h sum_w  g[n][c][h][w] * x[n][c][h + i - ph][w + j - pw]   (x is 0 outside)
 *
 * g: (N, C, Ho, Wo), x: (N, C, H, W), both contiguous; dW: (C, kh, kw). Channels [c0, c1) per call, so
 * the caller runs disjoint channel ranges on its threads; each channel's sums run in a fixed order, so
 * the result does not depend on the split.
 *
 * Per (n, c) plane the x plane is copied into a zero-padded buffer (row stride Wo + kwc, kwc = kw rounded
 * up to whole vectors), and for each output pixel (h, w) and kernel row i one vector multiply-add does a
 * whole kernel row: acc[i][0..kwc) += g[h][w] * xpad[h + i - ph][w .. w + kwc). The kh·kwc/L vector
 * accumulators stay in registers across w, whatever the plane size (a 4x4 plane costs as little as its
 * 16 pixels, where a dot product per (i, j) would be all loop overhead); even and odd w take two chains
 * of accumulators, so the multiply-adds do not wait on each other. Plane sums go into double
 * accumulators across the batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_KH 16
#define MAX_NV 4

#define DW_GRAD(NAME, T, V, L)                                                                             \
    int NAME(const T *g, const T *x, T *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho,      \
             int64_t Wo, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t c0, int64_t c1) {        \
        int64_t nv = (kw + L - 1) / L, kwc = nv * L, Wp = Wo + kwc;                                       \
        if (kh > MAX_KH || nv > MAX_NV) return 1;                                                         \
        T *xpad = (T *)malloc(sizeof(T) * (size_t)(H * Wp));                                              \
        double *dacc = (double *)malloc(sizeof(double) * (size_t)(kh * kw));                              \
        if (xpad == NULL || dacc == NULL) { free(xpad); free(dacc); return 2; }                           \
        for (int64_t c = c0; c < c1; ++c) {                                                               \
            memset(dacc, 0, sizeof(double) * (size_t)(kh * kw));                                          \
            for (int64_t n = 0; n < N; ++n) {                                                             \
                const T *xp = x + (n * C + c) * H * W, *gp = g + (n * C + c) * Ho * Wo;                   \
                memset(xpad, 0, sizeof(T) * (size_t)(H * Wp));                                            \
                for (int64_t r = 0; r < H; ++r)                                                           \
                    for (int64_t q = 0; q < Wp; ++q)                                                      \
                        if (q - pw >= 0 && q - pw < W) xpad[r * Wp + q] = xp[r * W + q - pw];             \
                V acc[MAX_KH * MAX_NV];                                                                   \
                memset(acc, 0, sizeof(acc));                                                              \
                for (int64_t h = 0; h < Ho; ++h) {                                                        \
                    const T *gr = gp + h * Wo;                                                            \
                    for (int64_t i = 0; i < kh; ++i) {                                                    \
                        int64_t r = h + i - ph;                                                           \
                        if (r < 0 || r >= H) continue;                                                    \
                        const T *xr = xpad + r * Wp;                                                      \
                        V a[MAX_NV], b[MAX_NV]; /* two chains: even and odd w (a multiply-add's latency) */ \
                        memcpy(a, acc + i * MAX_NV, sizeof(a));                                           \
                        memset(b, 0, sizeof(b));                                                          \
                        int64_t w = 0;                                                                    \
                        for (; w + 1 < Wo; w += 2) {                                                      \
                            V ga = (V){0} + gr[w], gb = (V){0} + gr[w + 1];                               \
                            for (int64_t v = 0; v < nv; ++v) {                                            \
                                V xa, xb;                                                                 \
                                memcpy(&xa, xr + w + v * L, sizeof(V));                                   \
                                memcpy(&xb, xr + w + 1 + v * L, sizeof(V));                               \
                                a[v] += ga * xa;                                                          \
                                b[v] += gb * xb;                                                          \
                            }                                                                             \
                        }                                                                                 \
                        for (; w < Wo; ++w) {                                                             \
                            V ga = (V){0} + gr[w];                                                        \
                            for (int64_t v = 0; v < nv; ++v) {                                            \
                                V xa;                                                                     \
                                memcpy(&xa, xr + w + v * L, sizeof(V));                                   \
                                a[v] += ga * xa;                                                          \
                            }                                                                             \
                        }                                                                                 \
                        for (int64_t v = 0; v < nv; ++v) a[v] += b[v];                                    \
                        memcpy(acc + i * MAX_NV, a, sizeof(a));                                           \
                    }                                                                                     \
                }                                                                                         \
                for (int64_t i = 0; i < kh; ++i)                                                          \
                    for (int64_t j = 0; j < kw; ++j) dacc[i * kw + j] += (double)acc[i * MAX_NV + j / L][j % L]; \
            }                                                                                             \
            for (int64_t k = 0; k < kh * kw; ++k) out[c * kh * kw + k] = (T)dacc[k];                      \
        }                                                                                                 \
        free(xpad);                                                                                       \
        free(dacc);                                                                                       \
        return 0;                                                                                         \
    }

typedef float vf8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));

DW_GRAD(pl_dw_grad_f32, float, vf8, 8)
DW_GRAD(pl_dw_grad_f64, double, vd4, 4)
