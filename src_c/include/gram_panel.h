/* The inner loops of _gram.inverse_gram, for one panel of GRAM_NB rows of Li and the groups
 * a0 <= a < a1 of k columns of A:
 *
 *     x_c[t] = sum over the entries (r, v) of column ak + c of A with r < i1 of  v * pan[r*GRAM_NB + t],
 *     out[a, c, e] += sum_t x_c[t] x_e[t]     (e <= c: the lower triangle of the panel's W_a^T W_a)
 *
 * (pan: the panel's strip of Li, GRAM_NB values per row r; x: k * GRAM_NB of work space; out:
 * l x k x k, C order).  This is most of the blocked gradient's sparse work and is bound by
 * arithmetic, so on x86-64 (GCC or Clang) it is compiled twice, for the baseline instruction
 * set and for AVX2 with fused multiply-adds, and gram_select() picks the second where the CPU has
 * both (the module calls it once, when it loads).  InstEval's gradient (2-core Xeon): 6.7 ms at
 * the baseline, 5.4 ms with AVX2 and FMA.  The two differ in rounding only (FMA contracts
 * v * pan + x); one machine always runs the same one. */
#ifndef FASTLMM_GRAM_PANEL_H
#define FASTLMM_GRAM_PANEL_H

#include <stddef.h>

#define GRAM_NB 32

#if defined(__GNUC__) || defined(__clang__)
#define GRAM_INLINE static inline __attribute__((always_inline))
#define GRAM_RESTRICT __restrict__
#else
#define GRAM_INLINE static inline
#define GRAM_RESTRICT
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GRAM_DISPATCH 1
#else
#define GRAM_DISPATCH 0
#endif

GRAM_INLINE
void gram_body(const int *GRAM_RESTRICT cp, const int *GRAM_RESTRICT ci, const double *GRAM_RESTRICT cx,
               ptrdiff_t k, ptrdiff_t a0, ptrdiff_t a1, const ptrdiff_t *GRAM_RESTRICT first, ptrdiff_t i1,
               const double *GRAM_RESTRICT pan, double *GRAM_RESTRICT x, double *GRAM_RESTRICT out)
{
    ptrdiff_t a, c, e, ll, t;
    for (a = a0; a < a1; a++) {
        if (first[a] >= i1)
            continue;
        for (c = 0; c < k; c++) {
            /* a local accumulator: registers across the entries (it cannot alias the strip) */
            double acc[GRAM_NB];
            const ptrdiff_t col = a * k + c, hi = cp[col + 1];
            for (t = 0; t < GRAM_NB; t++)
                acc[t] = 0.0;
            for (ll = cp[col]; ll < hi; ll++) {
                const ptrdiff_t r = ci[ll];
                const double v = cx[ll];
                const double *pr;
                if (r >= i1)
                    break;      /* rows sorted: the rest meet the zeros of Li above the panel */
                pr = pan + r * GRAM_NB;
                for (t = 0; t < GRAM_NB; t++)
                    acc[t] += v * pr[t];
            }
            for (t = 0; t < GRAM_NB; t++)
                x[c * GRAM_NB + t] = acc[t];
        }
        for (c = 0; c < k; c++) {
            const double *xc = x + c * GRAM_NB;
            for (e = 0; e <= c; e++) {
                const double *xe = x + e * GRAM_NB;
                double s = 0.0;
                for (t = 0; t < GRAM_NB; t++)
                    s += xc[t] * xe[t];
                out[(a * k + c) * k + e] += s;
            }
        }
    }
}

typedef void (*gram_fn)(const int *, const int *, const double *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                        const ptrdiff_t *, ptrdiff_t, const double *, double *, double *);

static void gram_base(const int *cp, const int *ci, const double *cx, ptrdiff_t k, ptrdiff_t a0, ptrdiff_t a1,
                      const ptrdiff_t *first, ptrdiff_t i1, const double *pan, double *x, double *out)
{
    gram_body(cp, ci, cx, k, a0, a1, first, i1, pan, x, out);
}

#if GRAM_DISPATCH
__attribute__((target("avx2,fma")))
static void gram_avx2(const int *cp, const int *ci, const double *cx, ptrdiff_t k, ptrdiff_t a0, ptrdiff_t a1,
                      const ptrdiff_t *first, ptrdiff_t i1, const double *pan, double *x, double *out)
{
    gram_body(cp, ci, cx, k, a0, a1, first, i1, pan, x, out);
}
#endif

static gram_fn gram_selected = gram_base;

/* Picks the variant for this CPU; returns 1 for AVX2 with FMA, 0 for the baseline. */
static int gram_select(void)
{
#if GRAM_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        gram_selected = gram_avx2;
        return 1;
    }
#endif
    gram_selected = gram_base;
    return 0;
}

static void gram_panel_groups(const int *cp, const int *ci, const double *cx, ptrdiff_t k, ptrdiff_t a0,
                              ptrdiff_t a1, const ptrdiff_t *first, ptrdiff_t i1, const double *pan,
                              double *x, double *out)
{
    gram_selected(cp, ci, cx, k, a0, a1, first, i1, pan, x, out);
}

#endif
