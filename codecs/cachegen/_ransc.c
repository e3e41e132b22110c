/* Compiled per-symbol work of the cachegen CPU path (kvmesh-rans32x16, FORMAT.md section 4).
 *
 * Byte-identical to the numpy reference in rans.py and backends.py, which stays as the fallback
 * (native.py loads this module and wraps it). Besides the coder: the elementwise quantize and
 * dequantize steps of quant.py (single IEEE fp32 operations, built with -ffp-contract=off so none is
 * fused), query-aware key rounding (rounding.py), the exact row sums of the protected-row rule,
 * and delta streams (delta.py) inside the
 * statistics, encode and decode loops. Only the Python C API and the buffer protocol are
 * used: pip builds this with build isolation, where numpy's headers are absent.
 *
 * Every function works on a whole chunk: the quantized symbols q [2, L, T, C] uint8 (row-major),
 * and the S = 2*L*C*nseg streams of FORMAT.md (stream k = ((kv*L + l)*C + c)*nseg + g holds
 * q[kv, l, 256g .. 256g+n_k, c]). The streams are read and written in place in q's layout, so no
 * transposed copy is needed. Tables come in per-alphabet blocks located by an offset array of 257
 * int64 entries (offset[B] = -1 where the caller supplied no block for alphabet B).
 *
 * Integer arithmetic only, except the fp32 (de)quantization steps. The GIL is released during the loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PROB_BITS 12
#define M (1u << PROB_BITS)
#define RANS_L (1u << 16)
#define SEGMENT 256
#define NUM_TABLES 64
#define MAX_ALPHABET 256

/* decode error codes, mapped to CodecError messages by native.py */
#define ERR_COUNT_RANGE 1   /* a stream's word count is outside [2, n_k + 2] */
#define ERR_COUNT_SUM 2     /* the word counts do not add up to the words stored */
#define ERR_CENTER 3        /* center >= B */
#define ERR_TABLE 4         /* table index >= NUM_TABLES */
#define ERR_FINAL 6         /* a stream does not end in state L having read exactly its words */
#define ERR_ALPHABET 7      /* a stream's alphabet has no table block */

typedef struct {
    Py_ssize_t layers, tokens, channels, nseg, streams;
} Shape;

static int shape_from(Py_ssize_t layers, Py_ssize_t tokens, Py_ssize_t channels, Shape *sh) {
    /* L * T * C <= 2**40 keeps every size and offset below far from Py_ssize_t overflow */
    const Py_ssize_t limit = (Py_ssize_t)1 << 40;
    if (layers < 1 || tokens < 1 || channels < 1 || tokens > limit / layers
        || channels > limit / (layers * tokens)) {
        PyErr_SetString(PyExc_ValueError, "layers, tokens and channels must be positive, with a product <= 2**40");
        return -1;
    }
    sh->layers = layers;
    sh->tokens = tokens;
    sh->channels = channels;
    sh->nseg = (tokens + SEGMENT - 1) / SEGMENT;
    sh->streams = 2 * layers * channels * sh->nseg;
    return 0;
}

/* Buffer size checks: the wrapper passes correctly typed arrays; these keep a wrong call from
 * touching memory outside them. */
static int need(const Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s buffer holds %zd bytes, needs %zd", what, b->len, bytes);
        return -1;
    }
    return 0;
}

static int check_offsets(const Py_buffer *off, Py_ssize_t table_len, Py_ssize_t (*block)(int),
                         const char *what) {
    if (need(off, 257 * (Py_ssize_t)sizeof(int64_t), what) < 0) return -1;
    const int64_t *o = (const int64_t *)off->buf;
    for (int b = 0; b <= MAX_ALPHABET; b++) {
        if (o[b] < 0) continue;
        if (b < 2 || o[b] > table_len - block(b)) {
            PyErr_Format(PyExc_ValueError, "%s offset of alphabet %d is out of range", what, b);
            return -1;
        }
    }
    return 0;
}

/* block sizes in elements, per alphabet B */
static Py_ssize_t enc_block(int b) { return (Py_ssize_t)NUM_TABLES * 2 * b * 2; }  /* uint64 pairs, twice */
static Py_ssize_t dec_block(int b) { (void)b; return (Py_ssize_t)NUM_TABLES * M; }  /* uint32 */
static Py_ssize_t cost_block(int b) { return (Py_ssize_t)b * NUM_TABLES; }  /* int16 [B][64] */

/* Alphabets in [2, 256], equal within each block of per_block streams (a (K/V, layer) block,
 * which the coders rely on). */
static int check_levels(const int64_t *slev, Py_ssize_t n, Py_ssize_t per_block) {
    for (Py_ssize_t k = 0; k < n; k++) {
        if (slev[k] < 2 || slev[k] > MAX_ALPHABET) {
            PyErr_Format(PyExc_ValueError, "stream %zd has alphabet %lld outside [2, 256]", k,
                         (long long)slev[k]);
            return -1;
        }
        if (slev[k] != slev[k - k % per_block]) {
            PyErr_Format(PyExc_ValueError, "stream %zd's alphabet differs from its layer's", k);
            return -1;
        }
    }
    return 0;
}

/* Streams of the same (K/V, layer) block and segment have the same length and alphabet: the coder
 * runs LANES of them (adjacent channels) side by side, so their independent state chains overlap
 * in the CPU instead of each waiting on its own multiply-add latency. */
#define LANES 4
#define MAX_GROUP 8  /* channels per coded stream, at most (layout.py) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The symbols of nl <= LANES adjacent channels at p, lane j in bits 8j..8j+7. */
ALWAYS_INLINE uint32_t load_lanes(const uint8_t *p, const int nl) {
    uint32_t quad = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&quad, p, (size_t)nl);
#else
    for (int j = 0; j < nl; j++) quad |= (uint32_t)p[j] << (8 * j);
#endif
    return quad;
}

/* ---- histogram -------------------------------------------------------------------------------- */

PyDoc_STRVAR(histogram_doc,
"histogram(q, layers, tokens, channels, out)\n\n"
"Counts each symbol of each stream: out int64 [S, 256] (overwritten) from q uint8 [2, L, T, C].");

static PyObject *histogram(PyObject *self, PyObject *args) {
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

PyDoc_STRVAR(choose_doc,
"choose(hist, width, lengths, stream_levels, cost, cost_offsets, center_out, table_out[, cost_out])\n\n"
"Per stream (FORMAT.md): center = the smallest m < width with 2*cum[m] >= n_k (0 if none), then\n"
"the table of least integer cost for the residual histogram (ties: the lowest index).\n"
"hist int64 [S, 256]; lengths int32 [S]; stream_levels int64 [S]; cost int16 blocks [B][64];\n"
"cost_out, when given, int64 [S]: that least cost.");

static PyObject *choose(PyObject *self, PyObject *args) {
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

PyDoc_STRVAR(models_doc,
"models(q, layers, tokens, channels, stream_levels, cost, cost_offsets, delta_halves, center_out, table_out, flag_out)\n\n"
"choose(histogram(q)) without the [S, 256] histogram. Each stream of a half in delta_halves (bit 0:\n"
"K, bit 1: V) is also modelled as a delta stream (delta.py) and flag_out[k] = 1 where that costs\n"
"strictly less; center_out and table_out then hold the delta stream's model.\n"
"q uint8 [2, L, T, C]; stream_levels int64 [S].");

static PyObject *models(PyObject *self, PyObject *args) {
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

/* ---- quantization, elementwise ------------------------------------------------------------------ */

/* One element of quant.quantize: q = min(max(floor((x - lo) * inv + 0.5), 0), top), each step one
 * fp32 operation. v stays far inside int32 range (|v| <= ~257 for the groups quant.py builds). */
static inline uint8_t quant_one(float x, float lo, float inv, float top) {
    float v = x - lo;
    v = v * inv;
    v = v + 0.5f;
    float f = (float)(int32_t)v;  /* truncation, then one step down for negatives: floor */
    f = f > v ? f - 1.0f : f;
    f = f < 0.0f ? 0.0f : f;
    f = f > top ? top : f;
    return (uint8_t)f;
}

PyDoc_STRVAR(quantize_doc,
"quantize(x, layers, tokens, channels, lo, inv, bm1, per_channel, q_out)\n\n"
"The elementwise step of quant.quantize, fused: q = uint8(min(max(floor((x - lo) * inv + 0.5), 0), Bm1)),\n"
"each operation one IEEE fp32 operation as torch does it (built with -ffp-contract=off).\n"
"x fp32 [L, T, C]; bm1 fp32 [L]. per_channel: lo, inv fp32 [L, nseg, C] (groups per layer, 256-token\n"
"segment and channel); else lo, inv fp32 [L, T] (groups per layer and token).");

static PyObject *quantize(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, invb = {0}, bmb = {0}, qb = {0};
    Py_ssize_t layers, tokens, channels;
    int per_channel;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*pw*", &xb, &layers, &tokens, &channels, &lob, &invb, &bmb,
                          &per_channel, &qb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    Py_ssize_t n = layers * tokens * channels;
    Py_ssize_t groups = per_channel ? layers * sh.nseg * channels : layers * tokens;
    if (need(&xb, n * (Py_ssize_t)sizeof(float), "x") < 0 || need(&qb, n, "q") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&invb, groups * (Py_ssize_t)sizeof(float), "inv") < 0
        || need(&bmb, layers * (Py_ssize_t)sizeof(float), "bm1") < 0)
        goto done;
    {
        const float *x = (const float *)xb.buf, *lo = (const float *)lob.buf, *inv = (const float *)invb.buf;
        const float *bm = (const float *)bmb.buf;
        uint8_t *q = (uint8_t *)qb.buf;
        const Py_ssize_t T = tokens, C = channels, nseg = sh.nseg;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++) {
            const float top = bm[l];
            for (Py_ssize_t t = 0; t < T; t++) {
                const float *xr = x + (l * T + t) * C;
                uint8_t *qr = q + (l * T + t) * C;
                if (per_channel) {
                    const Py_ssize_t g = (l * nseg + t / SEGMENT) * C;
                    const float *lr = lo + g, *ir = inv + g;
                    for (Py_ssize_t c = 0; c < C; c++) qr[c] = quant_one(xr[c], lr[c], ir[c], top);
                } else {
                    const float lr = lo[l * T + t], ir = inv[l * T + t];
                    for (Py_ssize_t c = 0; c < C; c++) qr[c] = quant_one(xr[c], lr, ir, top);
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&invb); PyBuffer_Release(&bmb);
    PyBuffer_Release(&qb);
    return ret;
}

PyDoc_STRVAR(round_keys_doc,
"round_keys(x, layers, tokens, channels, lo, inv, step, bm1, cols, factor, recip, heads, head_dim, q_out)\n\n"
"rounding.round_keys for a per-channel grid: per (layer, token, head) the channels are rounded in the\n"
"order cols gives, each one's error fed to the later ones along the profile factor. Every step one\n"
"IEEE fp32 operation in the reference's order (built with -ffp-contract=off), so the symbols equal\n"
"the torch reference's. x fp32 [L, T, C]; lo, inv, step fp32 [L, nseg, C]; bm1 fp32 [L]; cols int64\n"
"[L, C] (head h's channels in rounding order at h*head_dim ..); factor fp32 [L, heads, D, D]; recip\n"
"fp32 [L, heads, D]: the reciprocals of factor's diagonal.");

/* One block of up to RK_TOKENS tokens (t0 ..) of one (layer, head): rounding.round_keys' loop, with
 * the error feedback across the block's tokens (contiguous, fixed length: vectorised). buf: scratch
 * [D][RK_TOKENS]. Each product is rounded before its difference (-ffp-contract=off: no FMA). */
#define RK_TOKENS 32
static void rk_block(float *restrict buf, const float *x, uint8_t *q, const int64_t *cr, const float *f,
                     const float *r, const float *lo, const float *inv, const float *st, float top,
                     Py_ssize_t l, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t T, Py_ssize_t C, Py_ssize_t nseg,
                     Py_ssize_t D) {
    for (Py_ssize_t k = 0; k < D; k++)
        for (Py_ssize_t i = 0; i < RK_TOKENS; i++)
            buf[k * RK_TOKENS + i] = i < nt ? x[(l * T + t0 + i) * C + cr[k]] : 0.0f;
    for (Py_ssize_t k = 0; k < D; k++) {
        const Py_ssize_t c = cr[k];
        const float rk = r[k];
        const float *bk = buf + k * RK_TOKENS;
        float e[RK_TOKENS] = {0};
        for (Py_ssize_t i = 0; i < nt; i++) {
            const Py_ssize_t t = t0 + i, g = (l * nseg + t / SEGMENT) * C + c;
            const uint8_t v = quant_one(bk[i], lo[g], inv[g], top);
            q[(l * T + t) * C + c] = v;
            float y = (float)v * st[g];
            y = y + lo[g];
            const float d = bk[i] - y;
            e[i] = d * rk;
        }
        const float *fr = f + k * D;
        for (Py_ssize_t j = k + 1; j < D; j++) {
            const float fj = fr[j];
            float *restrict bj = buf + j * RK_TOKENS;
            for (Py_ssize_t i = 0; i < RK_TOKENS; i++) {
                const float u = e[i] * fj;
                bj[i] = bj[i] - u;
            }
        }
    }
}

static PyObject *round_keys(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, invb = {0}, stb = {0}, bmb = {0}, colb = {0}, fb = {0}, rb = {0}, qb = {0};
    Py_ssize_t layers, tokens, channels, heads, hd;
    Shape sh;
    PyObject *ret = NULL;
    float *buf = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*y*y*y*y*nnw*", &xb, &layers, &tokens, &channels, &lob, &invb, &stb,
                          &bmb, &colb, &fb, &rb, &heads, &hd, &qb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    if (heads < 1 || hd < 1 || heads * hd != channels) {
        PyErr_SetString(PyExc_ValueError, "heads * head_dim must equal channels");
        goto done;
    }
    Py_ssize_t n = layers * tokens * channels, groups = layers * sh.nseg * channels;
    if (need(&xb, n * (Py_ssize_t)sizeof(float), "x") < 0 || need(&qb, n, "q") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&invb, groups * (Py_ssize_t)sizeof(float), "inv") < 0
        || need(&stb, groups * (Py_ssize_t)sizeof(float), "step") < 0
        || need(&bmb, layers * (Py_ssize_t)sizeof(float), "bm1") < 0
        || need(&colb, layers * channels * (Py_ssize_t)sizeof(int64_t), "cols") < 0
        || need(&fb, layers * heads * hd * hd * (Py_ssize_t)sizeof(float), "factor") < 0
        || need(&rb, layers * heads * hd * (Py_ssize_t)sizeof(float), "recip") < 0)
        goto done;
    {
        const int64_t *cols = (const int64_t *)colb.buf;
        for (Py_ssize_t i = 0; i < layers * channels; i++)
            if (cols[i] < 0 || cols[i] >= channels) {
                PyErr_SetString(PyExc_ValueError, "cols holds a channel out of range");
                goto done;
            }
    }
    buf = (float *)PyMem_RawCalloc((size_t)hd * RK_TOKENS, sizeof(float));
    if (buf == NULL) { PyErr_NoMemory(); goto done; }
    {
        const float *x = (const float *)xb.buf, *lo = (const float *)lob.buf, *inv = (const float *)invb.buf;
        const float *st = (const float *)stb.buf, *bm = (const float *)bmb.buf, *F = (const float *)fb.buf;
        const float *R = (const float *)rb.buf;
        const int64_t *cols = (const int64_t *)colb.buf;
        uint8_t *q = (uint8_t *)qb.buf;
        const Py_ssize_t T = tokens, C = channels, D = hd;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++)
            for (Py_ssize_t h = 0; h < heads; h++)
                for (Py_ssize_t t0 = 0; t0 < T; t0 += RK_TOKENS)
                    rk_block(buf, x, q, cols + l * C + h * D, F + (l * heads + h) * D * D, R + (l * heads + h) * D,
                             lo, inv, st, bm[l], l, t0, T - t0 < RK_TOKENS ? T - t0 : RK_TOKENS, T, C, sh.nseg, D);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(buf);
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&invb); PyBuffer_Release(&stb);
    PyBuffer_Release(&bmb); PyBuffer_Release(&colb); PyBuffer_Release(&fb); PyBuffer_Release(&rb);
    PyBuffer_Release(&qb);
    return ret;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(q, layers, tokens, channels, lo, step, per_channel, y_out)\n\n"
"quant.dequantize's elementwise step in one pass: y = float(q) * step + lo (two IEEE fp32 operations,\n"
"as torch does them). q uint8 [L, T, C] -> y fp32 [L, T, C]; lo, step fp32 [L, nseg, C] (per_channel)\n"
"or [L, T].");

static PyObject *dequantize(PyObject *self, PyObject *args) {
    Py_buffer qb = {0}, lob = {0}, stb = {0}, yb = {0};
    Py_ssize_t layers, tokens, channels;
    int per_channel;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*pw*", &qb, &layers, &tokens, &channels, &lob, &stb, &per_channel, &yb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    Py_ssize_t n = layers * tokens * channels;
    Py_ssize_t groups = per_channel ? layers * sh.nseg * channels : layers * tokens;
    if (need(&qb, n, "q") < 0 || need(&yb, n * (Py_ssize_t)sizeof(float), "y") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&stb, groups * (Py_ssize_t)sizeof(float), "step") < 0)
        goto done;
    {
        const uint8_t *q = (const uint8_t *)qb.buf;
        const float *lo = (const float *)lob.buf, *st = (const float *)stb.buf;
        float *y = (float *)yb.buf;
        const Py_ssize_t T = tokens, C = channels, nseg = sh.nseg;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++) {
            for (Py_ssize_t t = 0; t < T; t++) {
                const uint8_t *qr = q + (l * T + t) * C;
                float *yr = y + (l * T + t) * C;
                if (per_channel) {
                    const Py_ssize_t g = (l * nseg + t / SEGMENT) * C;
                    const float *lr = lo + g, *sr = st + g;
                    for (Py_ssize_t c = 0; c < C; c++) {
                        float v = (float)qr[c] * sr[c];
                        yr[c] = v + lr[c];
                    }
                } else {
                    const float lr = lo[l * T + t], sr = st[l * T + t];
                    for (Py_ssize_t c = 0; c < C; c++) {
                        float v = (float)qr[c] * sr;
                        yr[c] = v + lr;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&qb); PyBuffer_Release(&lob); PyBuffer_Release(&stb); PyBuffer_Release(&yb);
    return ret;
}

/* ---- protected rows: exact sums of fp16 magnitudes ---------------------------------------------- */

PyDoc_STRVAR(row_sums_doc,
"row_sums(h, rows, channels, out)\n\n"
"out[r] = sum over c of |h[r, c]| as float64, exactly, for fp16 bit patterns h uint16 [rows, C]\n"
"(finite values): each term is an integer number of 2**-24 units, summed in int64; C <= 8192 keeps\n"
"the total below 2**53 units, so the float64 result is exact (codec.protected_rows).");

static PyObject *row_sums(PyObject *self, PyObject *args) {
    Py_buffer hb = {0}, ob = {0};
    Py_ssize_t rows, channels;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnw*", &hb, &rows, &channels, &ob)) return NULL;
    if (rows < 0 || channels < 1 || channels > 8192) {
        PyErr_SetString(PyExc_ValueError, "rows >= 0 and 1 <= channels <= 8192 required");
        goto done;
    }
    if (need(&hb, rows * channels * (Py_ssize_t)sizeof(uint16_t), "h") < 0
        || need(&ob, rows * (Py_ssize_t)sizeof(double), "out") < 0)
        goto done;
    {
        const uint16_t *h = (const uint16_t *)hb.buf;
        double *out = (double *)ob.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint16_t *hr = h + r * channels;
            int64_t acc = 0;
            for (Py_ssize_t c = 0; c < channels; c++) {
                unsigned e = (hr[c] >> 10) & 31u, m = hr[c] & 1023u;
                /* subnormal: m units; normal: (1024 + m) * 2**(e - 1) units of 2**-24 */
                acc += e ? (int64_t)(1024u + m) << (e - 1) : (int64_t)m;
            }
            out[r] = (double)acc * 0x1p-24;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&hb); PyBuffer_Release(&ob);
    return ret;
}

PyDoc_STRVAR(predict_doc,
"predict(x, rows, features, channels, w, b, out)\n\n"
"Cross-layer prediction (predict.py): out[t, j] = b[j], then for i = 0 .. F-1 in order\n"
"out[t, j] = out[t, j] + x[t, i] * w[i, j], the product rounded to fp32, then the sum (built with\n"
"-ffp-contract=off: no fused multiply-add). x fp32 [rows, F], w fp32 [F, C], b fp32 [C], out fp32 [rows, C].");

/* Register-blocked: 4 rows x 16 columns of accumulators stay in vector registers over the whole
 * sum; every lane still computes acc = acc + x * w for i = 0 .. F-1 in order (vector mul and add are
 * the IEEE fp32 operations; -ffp-contract=off keeps them unfused), so the result is the scalar loop's.
 * GCC's vector extensions; target_clones picks the AVX2 build at load time where the CPU has it. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PREDICT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PREDICT_CLONES
#endif

PREDICT_CLONES
static void predict_rows(const float *x, Py_ssize_t rows, Py_ssize_t F, Py_ssize_t C, const float *w,
                         const float *b, float *out) {
    Py_ssize_t t = 0;
    const Py_ssize_t cv = C - C % 16;
    for (; t + 4 <= rows; t += 4) {
        const float *x0 = x + t * F, *x1 = x0 + F, *x2 = x1 + F, *x3 = x2 + F;
        for (Py_ssize_t j = 0; j < cv; j += 16) {
            const v8f b0 = *(const v8fu *)(b + j), b1 = *(const v8fu *)(b + j + 8);
            v8f a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
            for (Py_ssize_t i = 0; i < F; i++) {
                const v8f w0 = *(const v8fu *)(w + i * C + j), w1 = *(const v8fu *)(w + i * C + j + 8);
                const float s0 = x0[i], s1 = x1[i], s2 = x2[i], s3 = x3[i];
                const v8f v0 = {s0, s0, s0, s0, s0, s0, s0, s0}, v1 = {s1, s1, s1, s1, s1, s1, s1, s1};
                const v8f v2 = {s2, s2, s2, s2, s2, s2, s2, s2}, v3 = {s3, s3, s3, s3, s3, s3, s3, s3};
                a00 = a00 + v0 * w0; a01 = a01 + v0 * w1;
                a10 = a10 + v1 * w0; a11 = a11 + v1 * w1;
                a20 = a20 + v2 * w0; a21 = a21 + v2 * w1;
                a30 = a30 + v3 * w0; a31 = a31 + v3 * w1;
            }
            *(v8fu *)(out + t * C + j) = a00; *(v8fu *)(out + t * C + j + 8) = a01;
            *(v8fu *)(out + (t + 1) * C + j) = a10; *(v8fu *)(out + (t + 1) * C + j + 8) = a11;
            *(v8fu *)(out + (t + 2) * C + j) = a20; *(v8fu *)(out + (t + 2) * C + j + 8) = a21;
            *(v8fu *)(out + (t + 3) * C + j) = a30; *(v8fu *)(out + (t + 3) * C + j + 8) = a31;
        }
    }
    for (; t < rows; t++) {
        const float *xr = x + t * F;
        for (Py_ssize_t j = 0; j < cv; j += 16) {
            v8f a0 = *(const v8fu *)(b + j), a1 = *(const v8fu *)(b + j + 8);
            for (Py_ssize_t i = 0; i < F; i++) {
                const float s = xr[i];
                const v8f v = {s, s, s, s, s, s, s, s};
                a0 = a0 + v * *(const v8fu *)(w + i * C + j);
                a1 = a1 + v * *(const v8fu *)(w + i * C + j + 8);
            }
            *(v8fu *)(out + t * C + j) = a0; *(v8fu *)(out + t * C + j + 8) = a1;
        }
    }
    /* the columns past the last block of 16, one at a time */
    for (Py_ssize_t r = 0; r < rows && cv < C; r++) {
        const float *xr = x + r * F;
        for (Py_ssize_t j = cv; j < C; j++) {
            float acc = b[j];
            for (Py_ssize_t i = 0; i < F; i++) acc = acc + xr[i] * w[i * C + j];
            out[r * C + j] = acc;
        }
    }
}

static PyObject *predict(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, wb = {0}, bb = {0}, ob = {0};
    Py_ssize_t rows, features, channels;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*w*", &xb, &rows, &features, &channels, &wb, &bb, &ob)) return NULL;
    if (rows < 0 || features < 1 || channels < 1) {
        PyErr_SetString(PyExc_ValueError, "rows >= 0, features >= 1 and channels >= 1 required");
        goto done;
    }
    if (need(&xb, rows * features * (Py_ssize_t)sizeof(float), "x") < 0
        || need(&wb, features * channels * (Py_ssize_t)sizeof(float), "w") < 0
        || need(&bb, channels * (Py_ssize_t)sizeof(float), "b") < 0
        || need(&ob, rows * channels * (Py_ssize_t)sizeof(float), "out") < 0)
        goto done;
    {
        const float *x = (const float *)xb.buf, *w = (const float *)wb.buf, *b = (const float *)bb.buf;
        float *out = (float *)ob.buf;
        Py_BEGIN_ALLOW_THREADS
        predict_rows(x, rows, features, channels, w, b, out);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&wb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return ret;
}

/* ---- encode ----------------------------------------------------------------------------------- */


/* An encode entry is two uint64: rcp, then bias | (M - f) << 16 | f << 32; a table is its B
 * entries, then the same B entries again. The step x = (x // f) * M + x % f + c is computed as
 * x + (x // f) * (M - f) + c with x // f = mulhi(x, rcp), exact for 1 <= x < 2**32:
 * - f >= 2: rcp = floor((2**64 - 1) / f) + 1 and bias = c. rcp * f = 2**64 + e with 0 <= e <= f,
 *   so x * rcp / 2**64 exceeds x / f by less than 2**32 * f / 2**64 / f, far from the next
 *   multiple of 1/f (x / f is a multiple of 1/f);
 * - f = 1: rcp = 2**64 - 1 gives x - 1, and bias = c + M - 1 makes up for it (as ryg_rans does). */
ALWAYS_INLINE uint64_t mulhi64(uint64_t a, uint64_t b) {
    return (uint64_t)(((unsigned __int128)a * b) >> 64);
}

/* Codes nl coded streams of G adjacent channels each (lane j holds channels j*G .. j*G + G - 1 of
 * the block at p). Channel c's n symbols lie at p + c with stride `stride`; lane j codes, token by
 * token and channel by channel, the residuals r = (q - center[c]) mod B as the reference computes
 * them ((q + B - center) % B), each with its channel's table tab[c], and writes its words backwards
 * so that they end at wp[j]; wp[j] returns the first word. The G*n + 2 words below wp[j] are the
 * lane's own scratch. A delta channel (dl[c]) codes d[i] = (q[i] - q[i-1] + B/2) mod B for i >= 1
 * in place of q[i] (delta.py), read straight from q. */
ALWAYS_INLINE void encode_lanes(const int nl, const int G, const uint8_t *p, Py_ssize_t stride, Py_ssize_t n,
                                unsigned b, const unsigned *center, const uint64_t *const *tab, uint16_t **wp,
                                const unsigned *dl) {
    const unsigned h = b / 2;
    uint64_t x[LANES];
    uint16_t *w[LANES];
    const uint64_t *shifted[LANES * MAX_GROUP];
    for (int j = 0; j < nl; j++) {
        x[j] = RANS_L;
        w[j] = wp[j];
    }
    /* a table holds its B entries twice, so entry (q - center) mod B of a symbol q < B is entry q
     * of the table shifted by B - center: no modular reduction per symbol */
    for (int c = 0; c < nl * G; c++) shifted[c] = tab[c] + 2 * (Py_ssize_t)(b - center[c]);
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        const uint8_t *row = p + i * stride;
        for (int u = G - 1; u >= 0; u--) {
            for (int j = 0; j < nl; j++) {
                const int c = j * G + u;
                unsigned q = row[c];
                if (dl[c] && i > 0) {
                    unsigned prev = p[(i - 1) * stride + c];
                    int v = (int)q - (int)prev + (int)h;
                    if (q < b && prev < b) {
                        v += v < 0 ? (int)b : 0;
                        v -= v >= (int)b ? (int)b : 0;
                    } else {  /* symbols outside the alphabet: only a forged call; the reference's remainder */
                        v %= (int)b;
                        v += v < 0 ? (int)b : 0;
                    }
                    q = (unsigned)v;
                }
                const uint64_t *e = q < b ? shifted[c] + 2 * (Py_ssize_t)q
                                          : tab[c] + 2 * (Py_ssize_t)((q + b - center[c]) % b);
                uint64_t rcp = e[0], fc = e[1];
                uint64_t bias = fc & 0xFFFF, cmpl = (fc >> 16) & 0xFFFF, f = fc >> 32;
                /* branch-free renormalisation (data-dependent, so a branch would mispredict often):
                 * the word is always stored below w, which moves only when it is emitted */
                uint64_t emit = x[j] >= (f << 20);
                w[j][-1] = (uint16_t)(x[j] & 0xFFFF);
                w[j] -= emit;
                x[j] = emit ? x[j] >> 16 : x[j];
                x[j] = x[j] + mulhi64(x[j], rcp) * cmpl + bias;  /* (x // f) * M + x % f + c */
            }
        }
    }
    for (int j = 0; j < nl; j++) {
        *--w[j] = (uint16_t)(x[j] & 0xFFFF);
        *--w[j] = (uint16_t)(x[j] >> 16);
        wp[j] = w[j];
    }
}

/* The stream checks both directions share; returns an error code or 0. */
static int check_stream(const int64_t *o, unsigned b, unsigned center, unsigned table) {
    if (o[b] < 0) return ERR_ALPHABET;
    if (center >= b) return ERR_CENTER;
    if (table >= NUM_TABLES) return ERR_TABLE;
    return 0;
}

/* G channels per coded stream: a power of two <= MAX_GROUP dividing the channel count. */
static int check_group(Py_ssize_t group, Py_ssize_t channels) {
    if (group < 1 || group > MAX_GROUP || (group & (group - 1)) || channels % group) {
        PyErr_Format(PyExc_ValueError, "%zd channels per coded stream: not a power of two <= %d dividing %zd",
                     group, MAX_GROUP, channels);
        return -1;
    }
    return 0;
}

/* The lanes of a block with G known at compile time for the common group sizes. */
#define WITH_GROUP(G, CALL)                         \
    switch (G) {                                    \
    case 1: { const int g_ = 1; CALL; } break;      \
    case 2: { const int g_ = 2; CALL; } break;      \
    case 4: { const int g_ = 4; CALL; } break;      \
    default: { const int g_ = (int)(G); CALL; } break; \
    }

PyDoc_STRVAR(encode_doc,
"encode(q, layers, tokens, channels, group, stream_levels, center, table, enc, enc_offsets, words_out, counts_out, flags)\n"
"    -> int\n\n"
"Codes every coded stream (G = group adjacent channels of one segment, token by token) with the\n"
"residuals r = (q - center) mod B of its channels' model streams, each with its table\n"
"(kvmesh-rans32x16); words go to words_out (uint16, coded streams concatenated in order; capacity\n"
"2*L*C*T + 2*S), word counts to counts_out (int32 [S / G]). center, table and flags are per model\n"
"stream (S); a model stream whose flag is set codes its delta symbols (delta.py) instead of q.\n"
"Returns the number of words written.");

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer q = {0}, lev = {0}, cen = {0}, tab = {0}, enc = {0}, off = {0}, wout = {0}, cout = {0}, flg = {0};
    Py_ssize_t layers, tokens, channels, group;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*y*y*y*w*w*y*", &q, &layers, &tokens, &channels, &group, &lev, &cen,
                          &tab, &enc, &off, &wout, &cout, &flg))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0 || check_group(group, channels) < 0) goto done;
    Py_ssize_t S = sh.streams, SC = S / group, cps = channels / group;
    Py_ssize_t cap = 2 * layers * channels * tokens + 2 * S;
    if (need(&q, 2 * layers * tokens * channels, "q") < 0
        || need(&lev, S * (Py_ssize_t)sizeof(int64_t), "stream_levels") < 0
        || need(&cen, S, "center") < 0 || need(&tab, S, "table") < 0
        || need(&wout, cap * (Py_ssize_t)sizeof(uint16_t), "words") < 0
        || need(&cout, SC * (Py_ssize_t)sizeof(int32_t), "counts") < 0 || need(&flg, S, "flags") < 0
        || check_offsets(&off, enc.len / (Py_ssize_t)sizeof(uint64_t), enc_block, "encode table") < 0
        || check_levels((const int64_t *)lev.buf, S, channels * sh.nseg) < 0)
        goto done;
    {
        const uint8_t *qp = (const uint8_t *)q.buf, *cp = (const uint8_t *)cen.buf, *tp = (const uint8_t *)tab.buf;
        const uint8_t *fp = (const uint8_t *)flg.buf;
        const int64_t *slev = (const int64_t *)lev.buf, *o = (const int64_t *)off.buf;
        const uint64_t *et = (const uint64_t *)enc.buf;
        uint16_t *words = (uint16_t *)wout.buf;
        int32_t *counts = (int32_t *)cout.buf;
        Py_ssize_t pos = 0, bad = -1;
        int why = 0;
        const int G = (int)group;
        Py_ssize_t per_coded = G * tokens + 2 * sh.nseg;  /* worst-case words of one coded stream's segments */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < S; k++) {
            why = check_stream(o, (unsigned)slev[k], cp[k], tp[k]);
            if (why) { bad = k; break; }
        }
        /* Each coded stream first codes into its worst-case slot (slots of G*n_k + 2 words in
         * stream order, filled from the slot's end); a pass in stream order then packs them, moving
         * words only towards the front, so no move overwrites words not yet moved. */
        for (Py_ssize_t blk = 0; blk < 2 * layers && bad < 0; blk++) {
            unsigned b = (unsigned)slev[blk * channels * sh.nseg];
            for (Py_ssize_t g = 0; g < sh.nseg; g++) {
                Py_ssize_t t0 = g * SEGMENT;
                Py_ssize_t n = tokens - t0 < SEGMENT ? tokens - t0 : SEGMENT;
                Py_ssize_t slot_end = G * (t0 + n) + 2 * (g + 1);  /* within a coded stream's run of slots */
                for (Py_ssize_t s0 = 0; s0 < cps; s0 += LANES) {
                    int nl = cps - s0 < LANES ? (int)(cps - s0) : LANES;
                    const uint8_t *pl = qp + (blk * tokens + t0) * channels + s0 * G;
                    const uint64_t *tl[LANES * MAX_GROUP];
                    unsigned cl[LANES * MAX_GROUP], dl[LANES * MAX_GROUP];
                    uint16_t *wl[LANES];
                    for (int j = 0; j < nl; j++) {
                        wl[j] = words + (blk * cps + s0 + j) * per_coded + slot_end;
                        for (int u = 0; u < G; u++) {
                            Py_ssize_t k = (blk * channels + (s0 + j) * G + u) * sh.nseg + g;
                            tl[j * G + u] = et + o[b] + (Py_ssize_t)tp[k] * b * 4;
                            cl[j * G + u] = cp[k];
                            dl[j * G + u] = fp[k] != 0;
                        }
                    }
                    if (nl == LANES) {
                        WITH_GROUP(G, encode_lanes(LANES, g_, pl, channels, n, b, cl, tl, wl, dl));
                    } else {
                        for (int j = 0; j < nl; j++)
                            WITH_GROUP(G, encode_lanes(1, g_, pl + j * G, channels, n, b, cl + j * G, tl + j * G,
                                                       wl + j, dl + j * G));
                    }
                    for (int j = 0; j < nl; j++) {
                        Py_ssize_t kc = (blk * cps + s0 + j) * sh.nseg + g;
                        counts[kc] = (int32_t)(words + (blk * cps + s0 + j) * per_coded + slot_end - wl[j]);
                    }
                }
            }
        }
        if (bad < 0) {
            Py_ssize_t slot_end = 0;
            for (Py_ssize_t k = 0; k < SC; k++) {
                Py_ssize_t g = k % sh.nseg;
                slot_end += G * (tokens - g * SEGMENT < SEGMENT ? tokens - g * SEGMENT : SEGMENT) + 2;
                memmove(words + pos, words + slot_end - counts[k], (size_t)counts[k] * sizeof(uint16_t));
                pos += counts[k];
            }
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0) {
            PyErr_Format(PyExc_ValueError, "stream %zd: %s", bad,
                         why == ERR_ALPHABET ? "no encode table for its alphabet"
                         : why == ERR_CENTER ? "center outside its alphabet" : "table index out of range");
            goto done;
        }
        ret = PyLong_FromSsize_t(pos);
    }
done:
    PyBuffer_Release(&q); PyBuffer_Release(&lev); PyBuffer_Release(&cen); PyBuffer_Release(&tab);
    PyBuffer_Release(&enc); PyBuffer_Release(&off); PyBuffer_Release(&wout); PyBuffer_Release(&cout);
    PyBuffer_Release(&flg);
    return ret;
}

/* ---- decode ----------------------------------------------------------------------------------- */

/* Decodes nl coded streams of G adjacent channels each (see encode_lanes): lane j reads its words
 * from wstart[j] and writes channel c = j*G + u's n symbols at p + c (stride `stride`). As the
 * reference: at most one word in per symbol, x < 2**32 throughout, and a lane that reads past its
 * words goes on (into the next stream's words or the caller's padding of G*SEGMENT + 2 words, so
 * in bounds) and fails the final check. Returns a bit mask of the lanes that fail: final state
 * not L, or not exactly at end[j]. */
ALWAYS_INLINE unsigned decode_lanes(const int nl, const int G, uint8_t *p, Py_ssize_t stride, Py_ssize_t n,
                                    unsigned b, const unsigned *center, const uint32_t *const *tab,
                                    const uint16_t *const *wstart, const uint16_t *const *end, const unsigned *dl) {
    uint32_t x[LANES];
    const uint16_t *w[LANES];
    /* a delta channel (dl[c]) restores q[i] = (q[i-1] + d[i] - B/2) mod B as it goes: add[c] is
     * q[i-1] + B - B/2 after each symbol of a delta channel, else 0 */
    unsigned add[LANES * MAX_GROUP];
    const unsigned h = b / 2;
    for (int j = 0; j < nl; j++) {
        x[j] = ((uint32_t)wstart[j][0] << 16) | wstart[j][1];
        w[j] = wstart[j] + 2;
    }
    for (int c = 0; c < nl * G; c++) add[c] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *row = p + i * stride;
        for (int u = 0; u < G; u++) {
            for (int j = 0; j < nl; j++) {
                const int c = j * G + u;
                uint32_t e = tab[c][x[j] & (M - 1)];
                unsigned s = (e & 0xFF) + center[c];
                if (s >= b) s -= b;
                s += add[c];  /* < 3B: two conditional subtractions reduce it */
                s -= s >= b ? b : 0;
                s -= s >= b ? b : 0;
                add[c] = dl[c] ? s + b - h : 0;
                row[c] = (uint8_t)s;
                x[j] = (((e >> 8) & 0xFFF) + 1) * (x[j] >> PROB_BITS) + (e >> 20);
                /* branch-free renormalisation: the next word is always loaded */
                uint32_t want = x[j] < RANS_L;
                uint32_t nx = (x[j] << 16) | *w[j];
                x[j] = want ? nx : x[j];
                w[j] += want;
            }
        }
    }
    unsigned fail = 0;
    for (int j = 0; j < nl; j++)
        if (x[j] != RANS_L || w[j] != end[j]) fail |= 1u << j;
    return fail;
}

PyDoc_STRVAR(decode_doc,
"decode(words, nwords, counts, layers, tokens, channels, group, stream_levels, center, table, dec, dec_offsets,\n"
"       q_out, flags) -> None or (error code, stream)\n\n"
"Inverse of encode: writes q uint8 [2, L, T, C]. words holds the nwords stored words, then at\n"
"least group*SEGMENT + 2 words of padding; counts holds the S / group coded streams' word counts.\n"
"A decode entry (uint32, per table and slot) is symbol | (f - 1) << 8 | (slot - cum) << 20.\n"
"Whatever the input words, nothing outside the buffers is read or written; an inconsistent stream\n"
"returns (code, stream index: a coded stream for codes 1, 2 and 6, else a model stream). A model\n"
"stream whose flag (uint8 [S]) is set holds delta symbols: q is restored from them (delta.py).");

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer wb = {0}, cb = {0}, lev = {0}, cen = {0}, tab = {0}, dec = {0}, off = {0}, qout = {0}, flg = {0};
    Py_ssize_t layers, tokens, channels, group;
    Shape sh;
    PyObject *ret = NULL;
    int64_t *start = NULL;
    Py_ssize_t nwords;
    if (!PyArg_ParseTuple(args, "y*ny*nnnny*y*y*y*y*w*y*", &wb, &nwords, &cb, &layers, &tokens, &channels, &group,
                          &lev, &cen, &tab, &dec, &off, &qout, &flg))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0 || check_group(group, channels) < 0) goto done;
    Py_ssize_t S = sh.streams, SC = S / group, cps = channels / group;
    if (nwords < 0 || nwords > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "nwords out of range");
        goto done;
    }
    if (need(&wb, (nwords + group * SEGMENT + 2) * (Py_ssize_t)sizeof(uint16_t), "words (with padding)") < 0
        || need(&cb, SC * (Py_ssize_t)sizeof(int32_t), "counts") < 0
        || need(&lev, S * (Py_ssize_t)sizeof(int64_t), "stream_levels") < 0
        || need(&cen, S, "center") < 0 || need(&tab, S, "table") < 0
        || need(&qout, 2 * layers * tokens * channels, "q") < 0 || need(&flg, S, "flags") < 0
        || check_offsets(&off, dec.len / (Py_ssize_t)sizeof(uint32_t), dec_block, "decode table") < 0
        || check_levels((const int64_t *)lev.buf, S, channels * sh.nseg) < 0)
        goto done;
    start = PyMem_RawMalloc((size_t)SC * sizeof(int64_t));
    if (start == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint16_t *words = (const uint16_t *)wb.buf;
        const int32_t *counts = (const int32_t *)cb.buf;
        const uint8_t *cp = (const uint8_t *)cen.buf, *tp = (const uint8_t *)tab.buf;
        const int64_t *slev = (const int64_t *)lev.buf, *o = (const int64_t *)off.buf;
        const uint32_t *dt = (const uint32_t *)dec.buf;
        const uint8_t *fp = (const uint8_t *)flg.buf;
        uint8_t *qp = (uint8_t *)qout.buf;
        Py_ssize_t bad = -1;
        int why = 0;
        const int G = (int)group;
        Py_BEGIN_ALLOW_THREADS
        /* every check that needs no decoding first, so a forged header costs no decode work */
        Py_ssize_t total = 0;
        for (Py_ssize_t k = 0; k < SC; k++) {
            Py_ssize_t g = k % sh.nseg;
            Py_ssize_t n = tokens - g * SEGMENT < SEGMENT ? tokens - g * SEGMENT : SEGMENT;
            if (counts[k] < 2 || counts[k] > G * n + 2) { bad = k; why = ERR_COUNT_RANGE; break; }
            start[k] = total;
            total += counts[k];
        }
        for (Py_ssize_t k = 0; k < S && bad < 0; k++) {
            why = check_stream(o, (unsigned)slev[k], cp[k], tp[k]);
            if (why) bad = k;
        }
        if (bad < 0 && total != nwords) { bad = 0; why = ERR_COUNT_SUM; }
        for (Py_ssize_t blk = 0; blk < 2 * layers && bad < 0; blk++) {
            unsigned b = (unsigned)slev[blk * channels * sh.nseg];
            for (Py_ssize_t g = 0; g < sh.nseg && bad < 0; g++) {
                Py_ssize_t t0 = g * SEGMENT;
                Py_ssize_t n = tokens - t0 < SEGMENT ? tokens - t0 : SEGMENT;
                for (Py_ssize_t s0 = 0; s0 < cps; s0 += LANES) {
                    int nl = cps - s0 < LANES ? (int)(cps - s0) : LANES;
                    uint8_t *pl = qp + (blk * tokens + t0) * channels + s0 * G;
                    const uint32_t *tl[LANES * MAX_GROUP];
                    unsigned cl[LANES * MAX_GROUP], dl[LANES * MAX_GROUP];
                    const uint16_t *wl[LANES], *el[LANES];
                    Py_ssize_t kl[LANES];
                    for (int j = 0; j < nl; j++) {
                        Py_ssize_t kc = (blk * cps + s0 + j) * sh.nseg + g;
                        kl[j] = kc;
                        wl[j] = words + start[kc];
                        el[j] = wl[j] + counts[kc];
                        for (int u = 0; u < G; u++) {
                            Py_ssize_t k = (blk * channels + (s0 + j) * G + u) * sh.nseg + g;
                            tl[j * G + u] = dt + o[b] + (Py_ssize_t)tp[k] * M;
                            cl[j * G + u] = cp[k];
                            dl[j * G + u] = fp[k] != 0;
                        }
                    }
                    unsigned fail = 0;
                    if (nl == LANES) {
                        WITH_GROUP(G, fail = decode_lanes(LANES, g_, pl, channels, n, b, cl, tl, wl, el, dl));
                    } else {
                        for (int j = 0; j < nl; j++)
                            WITH_GROUP(G, fail |= decode_lanes(1, g_, pl + j * G, channels, n, b, cl + j * G,
                                                               tl + j * G, wl + j, el + j, dl + j * G) << j);
                    }
                    if (fail) {
                        bad = kl[__builtin_ctz(fail)];
                        why = ERR_FINAL;
                        break;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0) {
            ret = Py_BuildValue("(in)", why, bad);
            goto done;
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(start);
    PyBuffer_Release(&wb); PyBuffer_Release(&cb); PyBuffer_Release(&lev); PyBuffer_Release(&cen);
    PyBuffer_Release(&tab); PyBuffer_Release(&dec); PyBuffer_Release(&off); PyBuffer_Release(&qout);
    PyBuffer_Release(&flg);
    return ret;
}

static PyMethodDef methods[] = {
    {"histogram", histogram, METH_VARARGS, histogram_doc},
    {"choose", choose, METH_VARARGS, choose_doc},
    {"encode", encode, METH_VARARGS, encode_doc},
    {"decode", decode, METH_VARARGS, decode_doc},
    {"models", models, METH_VARARGS, models_doc},
    {"quantize", quantize, METH_VARARGS, quantize_doc},
    {"row_sums", row_sums, METH_VARARGS, row_sums_doc},
    {"dequantize", dequantize, METH_VARARGS, dequantize_doc},
    {"round_keys", round_keys, METH_VARARGS, round_keys_doc},
    {"predict", predict, METH_VARARGS, predict_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ransc",
    "Compiled rANS coder for the cachegen CPU path (byte-identical to rans.py; see native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__ransc(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ERR_COUNT_RANGE", ERR_COUNT_RANGE) < 0
        || PyModule_AddIntConstant(m, "ERR_COUNT_SUM", ERR_COUNT_SUM) < 0
        || PyModule_AddIntConstant(m, "ERR_CENTER", ERR_CENTER) < 0
        || PyModule_AddIntConstant(m, "ERR_TABLE", ERR_TABLE) < 0
        || PyModule_AddIntConstant(m, "ERR_FINAL", ERR_FINAL) < 0
        || PyModule_AddIntConstant(m, "ERR_ALPHABET", ERR_ALPHABET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
