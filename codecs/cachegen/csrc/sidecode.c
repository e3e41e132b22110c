/* Sections 1-4 in their coded form (FORMAT.md §2 "Coded side sections"; sidecode.py): byte planes,
 * each stored raw or coded with kvmesh-rans32x16 (blocks of SIDE_BLOCK symbols) against an order-0
 * table normalised from the plane's own histogram, optionally of its byte deltas. The Triton path
 * (device_pipeline.py) writes the same bytes; only integer arithmetic. */
#include "ransc.h"

#define SIDE_BLOCK 1024
#define MODE_RAW 0
#define MODE_PLAIN 1
#define MODE_DELTA 2

/* error codes of side_decode, mapped to CodecError messages by sidecode.py */
#define SERR_MODE 1     /* a plane's mode byte is not 0, 1 or 2 */
#define SERR_SIZE 2     /* the section ends early or has bytes left over */
#define SERR_TABLE 3    /* a table is empty, has padding bits set or does not sum to M */
#define SERR_COUNTS 4   /* block word counts out of range or not summing to the words stored */
#define SERR_FINAL 5    /* a block does not end in state L having read exactly its words */

/* FORMAT.md: freq[s] = h[s] ? 1 + floor(h[s] * (M - nz) / m) : 0, the remainder to the smallest s
 * with the largest count. Returns nz. */
static int normalize(const uint32_t *h, int64_t m, uint32_t *freq) {
    int nz = 0, top = 0;
    for (int s = 0; s < 256; s++) {
        nz += h[s] > 0;
        if (h[s] > h[top]) top = s;
    }
    uint32_t sum = 0;
    for (int s = 0; s < 256; s++) {
        freq[s] = h[s] ? 1u + (uint32_t)(((int64_t)h[s] * (int64_t)(M - nz)) / m) : 0u;
        sum += freq[s];
    }
    freq[top] += M - sum;
    return nz;
}

/* One block: its words written backwards so that they end at `end`; returns the word count. */
static Py_ssize_t encode_block(const uint8_t *y, Py_ssize_t n, const uint32_t *freq, const uint32_t *cum,
                               uint16_t *end) {
    uint32_t x = RANS_L;
    uint16_t *w = end;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        const uint32_t f = freq[y[i]], c = cum[y[i]];
        if ((x >> 20) >= f) {
            *--w = (uint16_t)(x & 0xFFFF);
            x >>= 16;
        }
        x = ((x / f) << PROB_BITS) + x % f + c;
    }
    *--w = (uint16_t)(x & 0xFFFF);
    *--w = (uint16_t)(x >> 16);
    return end - w;
}

static int bit_length(uint32_t v) {
    int b = 0;
    while (v) {
        b++;
        v >>= 1;
    }
    return b;
}

/* LSB-first bit writer over a zeroed buffer */
static void put_bits(uint8_t *out, int64_t *pos, uint32_t v, int width) {
    for (int k = 0; k < width; k++, (*pos)++)
        if ((v >> k) & 1) out[*pos >> 3] |= (uint8_t)(1u << (*pos & 7));
}

typedef struct {
    Py_ssize_t size;  /* bytes of the coded plane after its mode byte */
    uint8_t *bytes;   /* those bytes (malloc'd) */
} Coded;

/* The coded form (mode 1 or 2) of the m symbols y. */
static int code_plane(const uint8_t *y, Py_ssize_t m, Coded *out) {
    uint32_t h[256] = {0}, freq[256], cum[257];
    for (Py_ssize_t i = 0; i < m; i++) h[y[i]]++;
    const int nz = normalize(h, m, freq);
    cum[0] = 0;
    for (int s = 0; s < 256; s++) cum[s + 1] = cum[s] + freq[s];
    const Py_ssize_t nb = (m + SIDE_BLOCK - 1) / SIDE_BLOCK;
    uint16_t *scratch = malloc(sizeof(uint16_t) * (size_t)(m + 2 * nb));
    uint16_t *counts = malloc(sizeof(uint16_t) * (size_t)nb);
    Py_ssize_t *starts = malloc(sizeof(Py_ssize_t) * (size_t)nb);
    if (!scratch || !counts || !starts) {
        free(scratch), free(counts), free(starts);
        return -1;
    }
    Py_ssize_t words = 0, at = 0;
    uint32_t lo = 0xFFFF, hi = 0;
    for (Py_ssize_t b = 0; b < nb; b++) {
        const Py_ssize_t n = b == nb - 1 ? m - b * SIDE_BLOCK : SIDE_BLOCK;
        at += n + 2;
        const Py_ssize_t cnt = encode_block(y + b * SIDE_BLOCK, n, freq, cum, scratch + at);
        counts[b] = (uint16_t)cnt;
        starts[b] = at - cnt;
        words += cnt;
        lo = cnt < lo ? (uint32_t)cnt : lo;
        hi = cnt > hi ? (uint32_t)cnt : hi;
    }
    const int width = bit_length(hi - lo);
    const Py_ssize_t ntab = 32 + (12 * (Py_ssize_t)nz + 7) / 8;
    const Py_ssize_t ncnt = 3 + (nb * width + 7) / 8;
    out->size = ntab + 4 + ncnt + 2 * words;
    out->bytes = calloc((size_t)out->size, 1);
    if (!out->bytes) {
        free(scratch), free(counts), free(starts);
        return -1;
    }
    uint8_t *p = out->bytes;
    int64_t bit = 0;
    for (int s = 0; s < 256; s++)
        if (h[s]) p[s >> 3] |= (uint8_t)(1u << (s & 7));
    for (int s = 0; s < 256; s++)
        if (h[s]) put_bits(p + 32, &bit, freq[s] - 1, 12);
    p += ntab;
    for (int k = 0; k < 4; k++) p[k] = (uint8_t)((uint64_t)words >> (8 * k));
    p += 4;
    p[0] = (uint8_t)(lo & 255), p[1] = (uint8_t)(lo >> 8), p[2] = (uint8_t)width;
    bit = 0;
    for (Py_ssize_t b = 0; b < nb; b++) put_bits(p + 3, &bit, counts[b] - lo, width);
    p += ncnt;
    for (Py_ssize_t b = 0; b < nb; b++)
        for (Py_ssize_t i = 0; i < counts[b]; i++) {
            const uint16_t v = scratch[starts[b] + i];
            *p++ = (uint8_t)(v & 255);
            *p++ = (uint8_t)(v >> 8);
        }
    free(scratch), free(counts), free(starts);
    return 0;
}

/* b: the section's bytes as planes are cut from them (sections 1-3 byte-split). */
static void split_bytes(const uint8_t *raw, Py_ssize_t n, uint8_t *b) {
    const Py_ssize_t half = (n + 1) / 2;
    for (Py_ssize_t i = 0; i < n; i++) b[(i & 1) ? half + i / 2 : i / 2] = raw[i];
}

RANSC_DOC(ransc_side_encode_doc,
"side_encode(raw, planes, split) -> bytes: a section's coded form (FORMAT.md §2): raw's bytes\n"
"(byte-split first when split) cut into `planes` equal planes, each the smallest of raw, rANS and\n"
"rANS of its byte deltas; raw itself when that is not shorter (an empty raw: empty).");

PyObject *ransc_side_encode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer raw;
    int planes, split;
    if (!PyArg_ParseTuple(args, "y*ii", &raw, &planes, &split)) return NULL;
    const Py_ssize_t n = raw.len;
    if (planes < 1 || planes > 16 || n % planes) {
        PyBuffer_Release(&raw);
        return PyErr_Format(PyExc_ValueError, "section of %zd bytes does not cut into %d planes", n, planes);
    }
    const Py_ssize_t m = n / planes;
    uint8_t *b = malloc((size_t)n + 1), *d = malloc((size_t)m + 1);
    uint8_t *out = malloc((size_t)(n + planes) + 1);
    PyObject *res = NULL;
    if (!b || !d || !out) {
        PyErr_NoMemory();
        goto done;
    }
    int failed = 0;
    Py_ssize_t pos = 0;
    Py_BEGIN_ALLOW_THREADS
    if (split) split_bytes(raw.buf, n, b);
    else memcpy(b, raw.buf, (size_t)n);
    for (int p = 0; p < planes && !failed; p++) {
        const uint8_t *y = b + p * m;
        d[0] = m ? y[0] : 0;
        for (Py_ssize_t i = 1; i < m; i++) d[i] = (uint8_t)(y[i] - y[i - 1]);
        Coded plain = {0, NULL}, delta = {0, NULL};
        if (code_plane(y, m, &plain) < 0 || code_plane(d, m, &delta) < 0) {
            failed = 1;
        } else {
            /* the smallest; ties go to the lower mode */
            int mode = MODE_RAW;
            Py_ssize_t best = m;
            if (plain.size < best) mode = MODE_PLAIN, best = plain.size;
            if (delta.size < best) mode = MODE_DELTA, best = delta.size;
            out[pos++] = (uint8_t)mode;
            const uint8_t *src = mode == MODE_RAW ? y : mode == MODE_PLAIN ? plain.bytes : delta.bytes;
            memcpy(out + pos, src, (size_t)best);
            pos += best;
        }
        free(plain.bytes), free(delta.bytes);
    }
    Py_END_ALLOW_THREADS
    /* the coded form only when shorter: a section of exactly n bytes is raw (unsplit) */
    if (failed) PyErr_NoMemory();
    else res = pos < n ? PyBytes_FromStringAndSize((const char *)out, pos)
                       : PyBytes_FromStringAndSize((const char *)raw.buf, n);
done:
    free(b), free(d), free(out);
    PyBuffer_Release(&raw);
    return res;
}

/* ---- decode ----------------------------------------------------------------------------------- */

static uint32_t get_bits(const uint8_t *in, int64_t *pos, int width) {
    uint32_t v = 0;
    for (int k = 0; k < width; k++, (*pos)++) v |= (uint32_t)((in[*pos >> 3] >> (*pos & 7)) & 1) << k;
    return v;
}

/* Decodes one coded plane of m symbols from in[0..avail); returns the bytes it took or -SERR_*. */
static Py_ssize_t decode_plane(const uint8_t *in, Py_ssize_t avail, Py_ssize_t m, uint8_t *y) {
    if (avail < 32) return -SERR_SIZE;
    uint32_t freq[256] = {0}, cum[257];
    uint16_t slot_sym[M];
    int nz = 0;
    for (int s = 0; s < 256; s++) nz += (in[s >> 3] >> (s & 7)) & 1;
    const Py_ssize_t ntab = 32 + (12 * (Py_ssize_t)nz + 7) / 8;
    if (nz == 0) return -SERR_TABLE;
    if (avail < ntab + 4 + 3) return -SERR_SIZE;
    int64_t bit = 0;
    uint32_t sum = 0;
    for (int s = 0; s < 256; s++)
        if ((in[s >> 3] >> (s & 7)) & 1) sum += freq[s] = get_bits(in + 32, &bit, 12) + 1;
    if (sum != M || (bit & 7 && in[32 + (bit >> 3)] >> (bit & 7))) return -SERR_TABLE;
    cum[0] = 0;
    for (int s = 0; s < 256; s++) {
        cum[s + 1] = cum[s] + freq[s];
        for (uint32_t k = cum[s]; k < cum[s + 1]; k++) slot_sym[k] = (uint16_t)s;
    }
    const uint8_t *p = in + ntab;
    const uint64_t words = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
    p += 4;
    const uint32_t base = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const int width = p[2];
    const Py_ssize_t nb = (m + SIDE_BLOCK - 1) / SIDE_BLOCK;
    if (width > 16) return -SERR_COUNTS;
    const Py_ssize_t ncnt = 3 + (nb * width + 7) / 8;
    const Py_ssize_t head = ntab + 4 + ncnt;
    if (avail < head || (uint64_t)(avail - head) / 2 < words) return -SERR_SIZE;
    const uint8_t *cp = p + 3;
    const uint8_t *wp = in + head;
    /* every count checked before any block is decoded (the device path checks them first too) */
    bit = 0;
    uint64_t total = 0;
    for (Py_ssize_t b = 0; b < nb; b++) {
        const uint32_t cnt = base + get_bits(cp, &bit, width);
        const Py_ssize_t n = b == nb - 1 ? m - b * SIDE_BLOCK : SIDE_BLOCK;
        total += cnt;
        if (cnt < 2 || cnt > (uint32_t)n + 2) return -SERR_COUNTS;
    }
    if (total != words) return -SERR_COUNTS;
    bit = 0;
    Py_ssize_t read = 0;
    for (Py_ssize_t b = 0; b < nb; b++) {
        const uint32_t cnt = base + get_bits(cp, &bit, width);
        const Py_ssize_t n = b == nb - 1 ? m - b * SIDE_BLOCK : SIDE_BLOCK;
        const uint8_t *w = wp + 2 * read;
        uint32_t x = ((uint32_t)(w[0] | w[1] << 8) << 16) | (uint32_t)(w[2] | w[3] << 8);
        uint32_t at = 2;
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint32_t slot = x & (M - 1), s = slot_sym[slot];
            x = freq[s] * (x >> PROB_BITS) + slot - cum[s];
            if (x < RANS_L) {
                if (at >= cnt) return -SERR_FINAL;
                x = (x << 16) | (uint32_t)(w[2 * at] | w[2 * at + 1] << 8);
                at++;
            }
            y[b * SIDE_BLOCK + i] = (uint8_t)s;
        }
        if (x != RANS_L || at != cnt) return -SERR_FINAL;
        read += cnt;
    }
    return head + 2 * (Py_ssize_t)words;
}

RANSC_DOC(ransc_side_decode_doc,
"side_decode(section, n, planes, split) -> bytes | int: the n raw bytes of a coded section\n"
"(side_encode's inverse), or an error code (SERR_*) when the section is corrupt.");

PyObject *ransc_side_decode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer sec;
    Py_ssize_t n;
    int planes, split;
    if (!PyArg_ParseTuple(args, "y*nii", &sec, &n, &planes, &split)) return NULL;
    if (planes < 1 || planes > 16 || n < 0 || n % planes) {
        PyBuffer_Release(&sec);
        return PyErr_Format(PyExc_ValueError, "%zd bytes do not cut into %d planes", n, planes);
    }
    const Py_ssize_t m = n / planes;
    if (sec.len != n && m / SIDE_BLOCK > sec.len / 4) {  /* every block takes >= 2 words: no huge allocation */
        PyBuffer_Release(&sec);
        return PyLong_FromLong(SERR_SIZE);
    }
    uint8_t *b = malloc((size_t)n + 1), *raw = malloc((size_t)n + 1);
    PyObject *res = NULL;
    if (!b || !raw) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t err = 0, pos = 0;
    if (sec.len == n) {  /* raw */
        res = PyBytes_FromStringAndSize((const char *)sec.buf, n);
        goto done;
    }
    const uint8_t *in = sec.buf;
    const Py_ssize_t len = sec.len;
    Py_BEGIN_ALLOW_THREADS
    for (int p = 0; p < planes && n && !err; p++) {
        uint8_t *y = b + p * m;
        if (pos >= len) {
            err = SERR_SIZE;
            break;
        }
        const int mode = in[pos++];
        if (mode == MODE_RAW) {
            if (len - pos < m) err = SERR_SIZE;
            else memcpy(y, in + pos, (size_t)m), pos += m;
        } else if (mode == MODE_PLAIN || mode == MODE_DELTA) {
            const Py_ssize_t used = decode_plane(in + pos, len - pos, m, y);
            if (used < 0) err = -used;
            else {
                pos += used;
                if (mode == MODE_DELTA)
                    for (Py_ssize_t i = 1; i < m; i++) y[i] = (uint8_t)(y[i] + y[i - 1]);
            }
        } else {
            err = SERR_MODE;
        }
    }
    if (!err && pos != len) err = SERR_SIZE;
    if (!err && split) {
        const Py_ssize_t half = (n + 1) / 2;
        for (Py_ssize_t i = 0; i < n; i++) raw[i] = b[(i & 1) ? half + i / 2 : i / 2];
    } else if (!err) {
        memcpy(raw, b, (size_t)n);
    }
    Py_END_ALLOW_THREADS
    res = err ? PyLong_FromSsize_t(err) : PyBytes_FromStringAndSize((const char *)raw, n);
done:
    free(b), free(raw);
    PyBuffer_Release(&sec);
    return res;
}
