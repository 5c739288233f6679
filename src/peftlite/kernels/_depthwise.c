/* The weight gradient of a depthwise conv (one filter per channel, stride 1, no dilation), for the dense
 * training path of adapted depthwise convs (layers/conv_autograd.py):
 *
 *     dW[c][i][j] = sum_n sum_h sum_w  g[n][c][h][w] * x[n][c][h + i - ph][w + j - pw]   (x is 0 outside)
 *
 * g: (N, C, Ho, Wo), x: (N, C, H, W), both contiguous; dW: (C, kh, kw). Channels [c0, c1) per call, so
 * the caller runs disjoint channel ranges on its threads; each channel's sums run in a fixed order, so
 * the result does not depend on the split. Each (i, j) is a dot product of the g plane with the shifted
 * x plane, row by row: the inner loop runs along w, contiguous in both. Sums of one plane are formed in
 * the element type and added into a double accumulator across the batch.
 */
#include <stdint.h>

#define DW_GRAD(NAME, T)                                                                                   \
    void NAME(const T *g, const T *x, T *out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho,     \
              int64_t Wo, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t c0, int64_t c1) {       \
        for (int64_t c = c0; c < c1; ++c) {                                                               \
            for (int64_t i = 0; i < kh; ++i) {                                                            \
                for (int64_t j = 0; j < kw; ++j) {                                                        \
                    int64_t w0 = pw - j > 0 ? pw - j : 0;                                                 \
                    int64_t w1 = W + pw - j < Wo ? W + pw - j : Wo;                                       \
                    double acc = 0.0;                                                                     \
                    for (int64_t n = 0; n < N; ++n) {                                                     \
                        const T *gp = g + (n * C + c) * Ho * Wo;                                          \
                        const T *xp = x + (n * C + c) * H * W + (j - pw);                                 \
                        T s = 0;                                                                          \
                        for (int64_t h = 0; h < Ho; ++h) {                                                \
                            int64_t r = h + i - ph;                                                       \
                            if (r < 0 || r >= H) continue;                                                \
                            const T *gr = gp + h * Wo, *xr = xp + r * W;                                  \
                            for (int64_t w = w0; w < w1; ++w) s += gr[w] * xr[w];                        \
                        }                                                                                 \
                        acc += (double)s;                                                                 \
                    }                                                                                     \
                    out[(c * kh + i) * kw + j] = (T)acc;                                                  \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
    }

DW_GRAD(pl_dw_grad_f32, float)
DW_GRAD(pl_dw_grad_f64, double)
