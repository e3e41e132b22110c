/* Statistics: per-stream histograms, the center and table choice (FORMAT.md section 4), and the
 * fused pass that also chooses delta streams. */
#include "ransc.h"

/* ---- histogram -------------------------------------------------------------------------------- */

RANSC_DOC(ransc_histogram_doc,
"histogram(q, layers, tokens, channels, out)\n\n"
"Counts each symbol of each stream: out int64 [S, 256] (overwritten) from q uint8 [2, L, T, C].");

PyObject *ransc_histogram(PyObject *self, PyObject *args) {
    Py_buffer q = {0}, out = {0};
    Py_ssize_t layers, tokens, channels;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &q, &layers, &tokens, &channels, &out)) return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    if (need(&q, 2 * layers * tokens * channels, "q") < 0) goto done;
    if (need(&out, sh.streams * SEGMENT * (Py_ssize_t)sizeof(int64_t), "histogram") < 0) goto done;
    {
        const uint8_t *qp = (const uint8_t *)q.buf;
        int64_t *h = (int64_t *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        /* LANES adjacent channels' streams at once (one load fetches their symbols; separate
         * counters, so runs of one symbol do not chain every increment on the previous store);
         * counts stay in L1, and each output row is written once, zeros included */
        uint32_t cnt[LANES][256];
        for (Py_ssize_t blk = 0; blk < 2 * layers; blk++) {
            for (Py_ssize_t g = 0; g < sh.nseg; g++) {
                Py_ssize_t t0 = g * SEGMENT;
                Py_ssize_t n = tokens - t0 < SEGMENT ? tokens - t0 : SEGMENT;
                for (Py_ssize_t c0 = 0; c0 < channels; c0 += LANES) {
                    int nl = channels - c0 < LANES ? (int)(channels - c0) : LANES;
                    const uint8_t *p = qp + (blk * tokens + t0) * channels + c0;
                    memset(cnt, 0, sizeof cnt);
                    if (nl == LANES) {
                        for (Py_ssize_t i = 0; i < n; i++) {
                            uint32_t quad = load_lanes(p + i * channels, LANES);
                            for (int j = 0; j < LANES; j++) cnt[j][(quad >> (8 * j)) & 0xFF]++;
                        }
                    } else {
                        for (Py_ssize_t i = 0; i < n; i++)
                            for (int j = 0; j < nl; j++) cnt[j][p[i * channels + j]]++;
                    }
                    for (int j = 0; j < nl; j++) {
                        int64_t *row = h + ((blk * channels + c0 + j) * sh.nseg + g) * 256;
                        for (int v = 0; v < 256; v++) row[v] = cnt[j][v];
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&out);
    return ret;
}

/* ---- center and table choice ------------------------------------------------------------------ */

/* a32[t] = sum over j < nnz of v[j] * cost[s[j]][t], for int16 costs and counts below 2**15
 * whose exact sums fit int32 (the caller checks). */
#if defined(__SSE2__) && !defined(RANSC_SCALAR)  /* RANSC_SCALAR: test the portable path */
#include <emmintrin.h>
static void cost_rows(const int16_t *cb, const int *s, const int64_t *v, int nnz, int32_t *a32) {
    /* pmaddwd takes two residuals at once: (v1, v2) . (cost1[t], cost2[t]) for four tables */
    __m128i acc[NUM_TABLES / 4];
    for (int q = 0; q < NUM_TABLES / 4; q++) acc[q] = _mm_setzero_si128();
    const __m128i zero = _mm_setzero_si128();
    for (int j = 0; j < nnz; j += 2) {
        const int16_t *r1 = cb + (Py_ssize_t)s[j] * NUM_TABLES;
        const int16_t *r2 = j + 1 < nnz ? cb + (Py_ssize_t)s[j + 1] * NUM_TABLES : NULL;
        uint32_t v2 = j + 1 < nnz ? (uint32_t)v[j + 1] : 0;
        __m128i vv = _mm_set1_epi32((int)((uint32_t)v[j] | (v2 << 16)));
        for (int q = 0; q < NUM_TABLES / 8; q++) {
            __m128i a = _mm_loadu_si128((const __m128i *)(r1 + 8 * q));
            __m128i b = r2 ? _mm_loadu_si128((const __m128i *)(r2 + 8 * q)) : zero;
            acc[2 * q] = _mm_add_epi32(acc[2 * q], _mm_madd_epi16(_mm_unpacklo_epi16(a, b), vv));
            acc[2 * q + 1] = _mm_add_epi32(acc[2 * q + 1], _mm_madd_epi16(_mm_unpackhi_epi16(a, b), vv));
        }
    }
    for (int q = 0; q < NUM_TABLES / 4; q++) _mm_storeu_si128((__m128i *)(a32 + 4 * q), acc[q]);
}
#else
static void cost_rows(const int16_t *cb, const int *s, const int64_t *v, int nnz, int32_t *a32) {
    for (int t = 0; t < NUM_TABLES; t++) a32[t] = 0;
    for (int j = 0; j < nnz; j++) {
        const int16_t *row = cb + (Py_ssize_t)s[j] * NUM_TABLES;
        int32_t w = (int32_t)v[j];
        for (int t = 0; t < NUM_TABLES; t++) a32[t] += w * (int32_t)row[t];
    }
}
#endif

/* One stream's center, table and least cost from its symbol counts hk[0 .. width) (FORMAT.md
 * section 4); cb is its alphabet's cost block; small_costs: every cost lies in [0, 2**13]. */
static void choose_one(const int64_t *hk, int width, int b, int64_t len, const int16_t *cb, int small_costs,
                       uint8_t *center_out, uint8_t *table_out, int64_t *least_out) {
    int64_t cum = 0, twice_n = len;
    int center = 0;
    for (int m = 0; m < width; m++) {
        cum += hk[m];
        if (2 * cum >= twice_n) { center = m; break; }
    }
    /* the distinct residuals first: a stream holds few, and only they add cost rows */
    int nz_s[MAX_ALPHABET];
    int64_t nz_v[MAX_ALPHABET], total = 0;
    int nnz = 0, big = 0;
    int c0 = center % b;  /* hr[s] = h[(s + center) mod B], without a division per s */
    for (int s = 0; s < b; s++) {
        int idx = s + c0;
        if (idx >= b) idx -= b;
        int64_t v = hk[idx];
        /* branch-free: which residuals occur is data, so a branch would mispredict */
        nz_s[nnz] = s;
        nz_v[nnz] = v;
        nnz += v != 0;
        total += v;
        big |= (uint64_t)v >= (1u << 15);  /* negative counts too (only a forged call) */
    }
    int64_t acc[NUM_TABLES];
    if (small_costs && !big && total <= (1 << 17)) {
        /* exact in int32: counts in [0, 2**15) adding up to <= 2**17, costs <= 2**13 */
        int32_t a32[NUM_TABLES];
        cost_rows(cb, nz_s, nz_v, nnz, a32);
        for (int t = 0; t < NUM_TABLES; t++) acc[t] = a32[t];
    } else {
        for (int t = 0; t < NUM_TABLES; t++) acc[t] = 0;
        for (int j = 0; j < nnz; j++) {
            const int16_t *row = cb + (Py_ssize_t)nz_s[j] * NUM_TABLES;
            for (int t = 0; t < NUM_TABLES; t++) acc[t] += nz_v[j] * row[t];
        }
    }
    int best = 0;
    int64_t least = acc[0];
    for (int t = 1; t < NUM_TABLES; t++) {
        int better = acc[t] < least;  /* strict: ties keep the lowest index */
        best = better ? t : best;
        least = better ? acc[t] : least;
    }
    *center_out = (uint8_t)center;
    *table_out = (uint8_t)best;
    *least_out = least;
}

/* Every cost in [0, 2**13]: then choose_one may sum in int32 (see there). */
static int costs_are_small(const int16_t *cst, Py_ssize_t ncost) {
    int small = 1;
    for (Py_ssize_t i = 0; i < ncost; i++) small &= cst[i] >= 0 && cst[i] <= (1 << 13);
    return small;
}

RANSC_DOC(ransc_choose_doc,
"choose(hist, width, lengths, stream_levels, cost, cost_offsets, center_out, table_out[, cost_out])\n\n"
"Per stream (FORMAT.md): center = the smallest m < width with 2*cum[m] >= n_k (0 if none), then\n"
"the table of least integer cost for the residual histogram (ties: the lowest index).\n"
"hist int64 [S, 256]; lengths int32 [S]; stream_levels int64 [S]; cost int16 blocks [B][64];\n"
"cost_out, when given, int64 [S]: that least cost.");

PyObject *ransc_choose(PyObject *self, PyObject *args) {
    Py_buffer hist = {0}, lens = {0}, lev = {0}, cost = {0}, off = {0}, cen = {0}, tab = {0}, cout = {0};
    Py_ssize_t width;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*w*w*|w*", &hist, &width, &lens, &lev, &cost, &off, &cen, &tab, &cout))
        return NULL;
    Py_ssize_t S = lens.len / (Py_ssize_t)sizeof(int32_t);
    if (width < 1 || width > 256) {
        PyErr_SetString(PyExc_ValueError, "width must lie in [1, 256]");
        goto done;
    }
    if (need(&hist, S * 256 * (Py_ssize_t)sizeof(int64_t), "histogram") < 0
        || need(&lev, S * (Py_ssize_t)sizeof(int64_t), "stream_levels") < 0
        || need(&cen, S, "center") < 0 || need(&tab, S, "table") < 0
        || (cout.buf != NULL && need(&cout, S * (Py_ssize_t)sizeof(int64_t), "cost_out") < 0)
        || check_offsets(&off, cost.len / (Py_ssize_t)sizeof(int16_t), cost_block, "cost") < 0
        || check_levels((const int64_t *)lev.buf, S, 1) < 0)
        goto done;
    {
        const int64_t *h = (const int64_t *)hist.buf;
        const int32_t *n = (const int32_t *)lens.buf;
        const int64_t *slev = (const int64_t *)lev.buf;
        const int16_t *cst = (const int16_t *)cost.buf;
        const int64_t *o = (const int64_t *)off.buf;
        uint8_t *co = (uint8_t *)cen.buf, *to = (uint8_t *)tab.buf;
        int64_t *lo = (int64_t *)cout.buf;  /* NULL when not asked for */
        Py_ssize_t missing = -1;
        Py_ssize_t ncost = cost.len / (Py_ssize_t)sizeof(int16_t);
        Py_BEGIN_ALLOW_THREADS
        const int small_costs = costs_are_small(cst, ncost);
        for (Py_ssize_t k = 0; k < S && missing < 0; k++) {
            const int64_t *hk = h + k * 256;
            int b = (int)slev[k];
            if (o[b] < 0) { missing = k; break; }
            int64_t least;
            choose_one(hk, (int)width, b, (int64_t)n[k], cst + o[b], small_costs, co + k, to + k, &least);
            if (lo) lo[k] = least;
        }
        Py_END_ALLOW_THREADS
        if (missing >= 0) {
            PyErr_Format(PyExc_ValueError, "no cost table for the alphabet of stream %zd", missing);
            goto done;
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&hist); PyBuffer_Release(&lens); PyBuffer_Release(&lev); PyBuffer_Release(&cost);
    PyBuffer_Release(&off); PyBuffer_Release(&cen); PyBuffer_Release(&tab);
    if (cout.buf != NULL) PyBuffer_Release(&cout);
    return ret;
}

/* ---- fused statistics: histogram + table choice (+ delta streams) in one pass ------------------- */

RANSC_DOC(ransc_models_doc,
"models(q, layers, tokens, channels, stream_levels, cost, cost_offsets, delta_halves, center_out, table_out, flag_out)\n\n"
"choose(histogram(q)) without the [S, 256] histogram. Each stream of a half in delta_halves (bit 0:\n"
"K, bit 1: V) is also modelled as a delta stream (delta.py) and flag_out[k] = 1 where that costs\n"
"strictly less; center_out and table_out then hold the delta stream's model.\n"
"q uint8 [2, L, T, C]; stream_levels int64 [S].");

PyObject *ransc_models(PyObject *self, PyObject *args) {
    Py_buffer q = {0}, lev = {0}, cost = {0}, off = {0}, cen = {0}, tab = {0}, flg = {0};
    Py_ssize_t layers, tokens, channels;
    int halves;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*iw*w*w*", &q, &layers, &tokens, &channels, &lev, &cost, &off,
                          &halves, &cen, &tab, &flg))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    const Py_ssize_t S = sh.streams;
    if (need(&q, 2 * layers * tokens * channels, "q") < 0
        || need(&lev, S * (Py_ssize_t)sizeof(int64_t), "stream_levels") < 0
        || need(&cen, S, "center") < 0 || need(&tab, S, "table") < 0 || need(&flg, S, "flags") < 0
        || check_offsets(&off, cost.len / (Py_ssize_t)sizeof(int16_t), cost_block, "cost") < 0
        || check_levels((const int64_t *)lev.buf, S, channels * sh.nseg) < 0)
        goto done;
    {
        const uint8_t *qp = (const uint8_t *)q.buf;
        const int64_t *slev = (const int64_t *)lev.buf;
        const int16_t *cst = (const int16_t *)cost.buf;
        const int64_t *o = (const int64_t *)off.buf;
        uint8_t *co = (uint8_t *)cen.buf, *to = (uint8_t *)tab.buf, *fo = (uint8_t *)flg.buf;
        Py_ssize_t missing = -1;
        Py_ssize_t ncost = cost.len / (Py_ssize_t)sizeof(int16_t);
        int width = 0;
        for (Py_ssize_t k = 0; k < S; k++) width = slev[k] > width ? (int)slev[k] : width;
        Py_BEGIN_ALLOW_THREADS
        const int small_costs = costs_are_small(cst, ncost);
        uint32_t cnt[LANES][256], cntd[LANES][256], cnt2[LANES][256], cntd2[LANES][256];
        int64_t hk[256];
        for (Py_ssize_t blk = 0; blk < 2 * layers && missing < 0; blk++) {
            const int b = (int)slev[blk * channels * sh.nseg], h = b / 2;
            const int with_delta = (halves >> (blk >= layers)) & 1;
            if (o[b] < 0) { missing = blk * channels * sh.nseg; break; }
            const int16_t *cb = cst + o[b];
            for (Py_ssize_t g = 0; g < sh.nseg; g++) {
                Py_ssize_t t0 = g * SEGMENT;
                Py_ssize_t n = tokens - t0 < SEGMENT ? tokens - t0 : SEGMENT;
                for (Py_ssize_t c0 = 0; c0 < channels; c0 += LANES) {
                    int nl = channels - c0 < LANES ? (int)(channels - c0) : LANES;
                    const uint8_t *p = qp + (blk * tokens + t0) * channels + c0;
                    /* only counts below width are ever read (symbols are below their alphabet; a
                     * forged larger one lands in a column nobody reads), so only those are cleared */
                    for (int j = 0; j < LANES; j++) {
                        memset(cnt[j], 0, (size_t)width * sizeof(uint32_t));
                        memset(cntd[j], 0, (size_t)width * sizeof(uint32_t));
                    }
                    if (nl == LANES && with_delta) {
                        /* one load per row for all lanes; a stream's first symbol counts as it is.
                         * Delta symbols cluster on B/2, so odd rows count into a second set of
                         * counters: two chains of increments per counter instead of one. */
                        for (int j = 0; j < LANES; j++) {
                            memset(cnt2[j], 0, (size_t)width * sizeof(uint32_t));
                            memset(cntd2[j], 0, (size_t)width * sizeof(uint32_t));
                        }
                        uint32_t prevq = load_lanes(p, LANES);
                        for (int j = 0; j < LANES; j++) {
                            cnt[j][(prevq >> (8 * j)) & 0xFF]++;
                            cntd[j][(prevq >> (8 * j)) & 0xFF]++;
                        }
                        Py_ssize_t i = 1;
                        for (; i + 1 < n; i += 2) {
                            uint32_t qa = load_lanes(p + i * channels, LANES);
                            uint32_t qb = load_lanes(p + (i + 1) * channels, LANES);
                            for (int j = 0; j < LANES; j++) {
                                int u = (int)((prevq >> (8 * j)) & 0xFF);
                                int va = (int)((qa >> (8 * j)) & 0xFF), vb = (int)((qb >> (8 * j)) & 0xFF);
                                int da = va - u + h, db = vb - va + h;
                                da += b & -(da < 0);
                                da -= b & -(da >= b);
                                db += b & -(db < 0);
                                db -= b & -(db >= b);
                                cnt[j][va]++;
                                cnt2[j][vb]++;
                                cntd[j][da & 0xFF]++;
                                cntd2[j][db & 0xFF]++;
                            }
                            prevq = qb;
                        }
                        for (; i < n; i++) {
                            uint32_t quad = load_lanes(p + i * channels, LANES);
                            for (int j = 0; j < LANES; j++) {
                                int v = (int)((quad >> (8 * j)) & 0xFF), u = (int)((prevq >> (8 * j)) & 0xFF);
                                int d = v - u + h;
                                d += b & -(d < 0);
                                d -= b & -(d >= b);
                                cnt[j][v]++;
                                cntd[j][d & 0xFF]++;
                            }
                            prevq = quad;
                        }
                        for (int j = 0; j < LANES; j++)
                            for (int v = 0; v < width; v++) {
                                cnt[j][v] += cnt2[j][v];
                                cntd[j][v] += cntd2[j][v];
                            }
                    } else if (nl == LANES) {
                        for (Py_ssize_t i = 0; i < n; i++) {
                            uint32_t quad = load_lanes(p + i * channels, LANES);
                            for (int j = 0; j < LANES; j++) cnt[j][(quad >> (8 * j)) & 0xFF]++;
                        }
                    } else {
                        for (int j = 0; j < nl; j++) {
                            cnt[j][p[j]]++;
                            if (with_delta) cntd[j][p[j]]++;
                        }
                        for (Py_ssize_t i = 1; i < n; i++) {
                            const uint8_t *row = p + i * channels;
                            for (int j = 0; j < nl; j++) {
                                int v = row[j];
                                cnt[j][v]++;
                                if (with_delta) {
                                    int d = v - (int)row[j - channels] + h;
                                    d += b & -(d < 0);
                                    d -= b & -(d >= b);
                                    cntd[j][d & 0xFF]++;
                                }
                            }
                        }
                    }
                    for (int j = 0; j < nl; j++) {
                        Py_ssize_t k = ((blk * channels + c0 + j) * sh.nseg + g);
                        int64_t least, least_d;
                        uint8_t cd, td;
                        for (int v = 0; v < width; v++) hk[v] = cnt[j][v];
                        choose_one(hk, width, b, (int64_t)n, cb, small_costs, co + k, to + k, &least);
                        fo[k] = 0;
                        if (with_delta) {
                            for (int v = 0; v < width; v++) hk[v] = cntd[j][v];
                            choose_one(hk, width, b, (int64_t)n, cb, small_costs, &cd, &td, &least_d);
                            if (least_d < least) { co[k] = cd; to[k] = td; fo[k] = 1; }
                        }
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (missing >= 0) {
            PyErr_Format(PyExc_ValueError, "no cost table for the alphabet of stream %zd", missing);
            goto done;
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&q); PyBuffer_Release(&lev); PyBuffer_Release(&cost); PyBuffer_Release(&off);
    PyBuffer_Release(&cen); PyBuffer_Release(&tab); PyBuffer_Release(&flg);
    return ret;
}
