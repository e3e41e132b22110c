/* kvmesh-rans32x16 encode and decode of the coded streams (FORMAT.md section 4), delta streams
 * taken and undone on the fly. */
#include "ransc.h"

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

RANSC_DOC(ransc_encode_doc,
"encode(q, layers, tokens, channels, group, stream_levels, center, table, enc, enc_offsets, words_out, counts_out, flags)\n"
"    -> int\n\n"
"Codes every coded stream (G = group adjacent channels of one segment, token by token) with the\n"
"residuals r = (q - center) mod B of its channels' model streams, each with its table\n"
"(kvmesh-rans32x16); words go to words_out (uint16, coded streams concatenated in order; capacity\n"
"2*L*C*T + 2*S), word counts to counts_out (int32 [S / G]). center, table and flags are per model\n"
"stream (S); a model stream whose flag is set codes its delta symbols (delta.py) instead of q.\n"
"Returns the number of words written.");

PyObject *ransc_encode(PyObject *self, PyObject *args) {
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

RANSC_DOC(ransc_decode_doc,
"decode(words, nwords, counts, layers, tokens, channels, group, stream_levels, center, table, dec, dec_offsets,\n"
"       q_out, flags) -> None or (error code, stream)\n\n"
"Inverse of encode: writes q uint8 [2, L, T, C]. words holds the nwords stored words, then at\n"
"least group*SEGMENT + 2 words of padding; counts holds the S / group coded streams' word counts.\n"
"A decode entry (uint32, per table and slot) is symbol | (f - 1) << 8 | (slot - cum) << 20.\n"
"Whatever the input words, nothing outside the buffers is read or written; an inconsistent stream\n"
"returns (code, stream index: a coded stream for codes 1, 2 and 6, else a model stream). A model\n"
"stream whose flag (uint8 [S]) is set holds delta symbols: q is restored from them (delta.py).");

PyObject *ransc_decode(PyObject *self, PyObject *args) {
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
