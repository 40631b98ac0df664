/* Static-model interleaved rANS: the compiled half of deltacodec/rans.py.
 *
 * The bitstream is defined in docs/v2-coder-draft.md ("rANS stream"); deltacodec/rans.py holds a
 * plain Python reference of both directions. This file is a plain C99 shared library with no
 * Python API (loaded with ctypes), so one build serves every Python version.
 *
 * State: 32 bits, kept in [2^16, 2^32); renormalisation by 16-bit little-endian words; table
 * precision P in 1..15; N lanes (1..32), symbol g of the stream (counted over all segments) uses
 * lane g mod N.  Every bound below follows from f >= 1 for any symbol a slot maps to and P <= 15,
 * so no input bytes can make a state overflow: the decoder needs no checks inside the loop
 * beyond running out of words.
 */
#include <stdint.h>
#include <string.h>

#define RANS_L 65536u
#define MAX_LANES 32

enum {
    SLD_OK = 0,
    SLD_E_ARGS = -1,       /* bad lanes / precision / sizes */
    SLD_E_SHORT = -2,      /* stream shorter than its lane states, or odd length */
    SLD_E_STATE = -3,      /* an initial state outside [2^16, 2^32) */
    SLD_E_EXHAUSTED = -4,  /* a lane needed a word after the last one */
    SLD_E_FINAL = -5,      /* a final state is not 2^16 */
    SLD_E_TRAILING = -6,   /* words left over after the last symbol */
    SLD_E_SYMBOL = -7,     /* encoder: a symbol with zero frequency or outside the table */
    SLD_E_CAPACITY = -8    /* encoder: output buffer too small */
};

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

/* Encode the concatenation of `nseg` segments. Segment k has seg_n[k] symbols taken from
 * `symbols` (consecutive), precision seg_p[k], and its table at freq/cum + seg_tab[k] with
 * seg_k[k] entries. `scratch` holds at least sum(seg_n) 16-bit words. Returns the stream length
 * in bytes, or a negative SLD_E_* code. */
int64_t sld_rans_encode(int32_t nseg, const int64_t *seg_n, const int32_t *seg_p, const int64_t *seg_tab,
                        const int32_t *seg_k, const uint32_t *freq, const uint32_t *cum,
                        const uint16_t *symbols, int32_t lanes, uint16_t *scratch, int64_t scratch_words,
                        uint8_t *out, int64_t out_cap) {
    if (lanes < 1 || lanes > MAX_LANES || nseg < 0) return SLD_E_ARGS;
    int64_t total = 0;
    for (int32_t k = 0; k < nseg; k++) {
        if (seg_n[k] < 0 || seg_p[k] < 1 || seg_p[k] > 15 || seg_k[k] < 1) return SLD_E_ARGS;
        total += seg_n[k];
    }
    if (scratch_words < total) return SLD_E_CAPACITY;
    uint32_t x[MAX_LANES];
    for (int32_t j = 0; j < lanes; j++) x[j] = RANS_L;
    int64_t w = scratch_words;  /* words are written backwards: scratch[w..] is in read order */
    int64_t g = total;
    for (int32_t k = nseg - 1; k >= 0; k--) {
        const uint32_t *f = freq + seg_tab[k];
        const uint32_t *c = cum + seg_tab[k];
        const uint32_t kk = (uint32_t)seg_k[k];
        const int P = seg_p[k];
        const uint16_t *s = symbols + (g - seg_n[k]);
        for (int64_t i = seg_n[k] - 1; i >= 0; i--) {
            g--;
            uint32_t sym = s[i];
            if (sym >= kk || f[sym] == 0) return SLD_E_SYMBOL;
            uint32_t fs = f[sym];
            int j = (int)(g % lanes);
            uint32_t xv = x[j];
            if ((uint64_t)xv >= ((uint64_t)fs << (32 - P))) {
                scratch[--w] = (uint16_t)(xv & 0xffffu);
                xv >>= 16;
            }
            x[j] = ((xv / fs) << P) + (xv % fs) + c[sym];
        }
    }
    int64_t nw = scratch_words - w;
    int64_t need = 4 * (int64_t)lanes + 2 * nw;
    if (need > out_cap) return SLD_E_CAPACITY;
    for (int32_t j = 0; j < lanes; j++) wr32(out + 4 * j, x[j]);
    uint8_t *o = out + 4 * lanes;
    for (int64_t i = 0; i < nw; i++) {
        uint16_t v = scratch[w + i];
        o[2 * i] = (uint8_t)v;
        o[2 * i + 1] = (uint8_t)(v >> 8);
    }
    return need;
}

/* One decode step of lane state `xx`: look the slot up, advance, refill from the word stream.
 * ent[slot] = f << 16 | (slot - cum[s]). FAST_STEP's refill is branch-free (the comparison is
 * unpredictable at high rates) and loads a word unconditionally, so it runs only while at least
 * 8 bytes remain (4 steps read at most 4 words); SAFE_STEP checks before it reads. */
#define FAST_STEP(xx, dst)                                                   \
    do {                                                                     \
        uint32_t sl_ = (xx) & mask;                                          \
        uint64_t ev_ = ent64[sl_];                                           \
        uint32_t e_ = (uint32_t)ev_;                                         \
        dst;                                                                 \
        (xx) = (e_ >> 16) * ((xx) >> P) + (e_ & 0xffffu);                    \
        uint32_t nd_ = (xx) < RANS_L;                                        \
        uint32_t y_ = ((xx) << 16) | (uint32_t)(p[0] | (p[1] << 8));         \
        (xx) = nd_ ? y_ : (xx);                                              \
        p += 2 * nd_;                                                        \
    } while (0)

#define SAFE_STEP(xx, dst)                                                   \
    do {                                                                     \
        uint32_t sl_ = (xx) & mask;                                          \
        uint64_t ev_ = ent64[sl_];                                           \
        uint32_t e_ = (uint32_t)ev_;                                         \
        dst;                                                                 \
        (xx) = (e_ >> 16) * ((xx) >> P) + (e_ & 0xffffu);                    \
        if ((xx) < RANS_L) {                                                 \
            if (end - p < 2) return SLD_E_EXHAUSTED;                         \
            (xx) = ((xx) << 16) | (uint32_t)(p[0] | (p[1] << 8));            \
            p += 2;                                                          \
        }                                                                    \
    } while (0)

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Decode `nseg` segments. Segment k uses the per-slot entries at offset seg_slot[k] of `ent_all`:
 * low 32 bits f << 16 | (slot - cum[s]), high 32 bits the symbol (out_sym mode) or the float32
 * bits of its reconstruction value (value mode: one load per symbol). Output: symbols into
 * out_sym (uint16) when it is non-NULL, else values into out_val (float32).
 * Returns SLD_OK or a negative SLD_E_* code. */
int32_t sld_rans_decode(const uint8_t *in, int64_t len, int32_t nseg, const int64_t *seg_n, const int32_t *seg_p,
                        const int64_t *seg_slot, const uint64_t *ent_all, int32_t lanes, uint16_t *out_sym,
                        float *out_val) {
    if (lanes < 1 || lanes > MAX_LANES || nseg < 0 || len < 0) return SLD_E_ARGS;
    if (len < 4 * (int64_t)lanes || (len - 4 * (int64_t)lanes) % 2) return SLD_E_SHORT;
    uint32_t x[MAX_LANES];
    for (int32_t j = 0; j < lanes; j++) {
        x[j] = rd32(in + 4 * j);
        if (x[j] < RANS_L) return SLD_E_STATE;
    }
    const uint8_t *p = in + 4 * lanes;
    const uint8_t *end = in + len;
    int64_t g = 0;
    for (int32_t k = 0; k < nseg; k++) {
        const int P = seg_p[k];
        if (P < 1 || P > 15 || seg_n[k] < 0) return SLD_E_ARGS;
        const uint32_t mask = (1u << P) - 1u;
        const uint64_t *ent64 = ent_all + seg_slot[k];
        const int64_t n = seg_n[k];
        int64_t i = 0;
        if (out_sym) {
            uint16_t *o = out_sym + g;
            for (; i < n; i++) {
                int j = (int)((g + i) % lanes);
                uint32_t xx = x[j];
                SAFE_STEP(xx, o[i] = (uint16_t)(ev_ >> 32));
                x[j] = xx;
            }
        } else {
            float *o = out_val + g;
            if (lanes == 4) {
                for (; i < n && ((g + i) & 3); i++) {
                    uint32_t xx = x[(g + i) & 3];
                    SAFE_STEP(xx, o[i] = bits_to_float((uint32_t)(ev_ >> 32)));
                    x[(g + i) & 3] = xx;
                }
                uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
                for (; i + 4 <= n && end - p >= 8; i += 4) {
                    FAST_STEP(x0, o[i] = bits_to_float((uint32_t)(ev_ >> 32)));
                    FAST_STEP(x1, o[i + 1] = bits_to_float((uint32_t)(ev_ >> 32)));
                    FAST_STEP(x2, o[i + 2] = bits_to_float((uint32_t)(ev_ >> 32)));
                    FAST_STEP(x3, o[i + 3] = bits_to_float((uint32_t)(ev_ >> 32)));
                }
                x[0] = x0; x[1] = x1; x[2] = x2; x[3] = x3;
            }
            for (; i < n; i++) {
                int j = (int)((g + i) % lanes);
                uint32_t xx = x[j];
                SAFE_STEP(xx, o[i] = bits_to_float((uint32_t)(ev_ >> 32)));
                x[j] = xx;
            }
        }
        g += n;
    }
    for (int32_t j = 0; j < lanes; j++)
        if (x[j] != RANS_L) return SLD_E_FINAL;
    return p == end ? SLD_OK : SLD_E_TRAILING;
}

/* Explicit-table frequencies (docs/v2-coder-draft.md, "explicit tables"): for every symbol
 * s != z in order, EG_k(f_s) with k = max(0, bitlen(previous coded f) - 2); f_z is the rest of
 * 2^P and must be >= 1. Bits are LSB-first from bit *bitpos of buf (nbytes long); *bitpos is
 * advanced. Returns 0, or -1 (out of bits), -2 (prefix too long / value too large),
 * -3 (frequencies reach 2^P before z). */
static inline int get_bit(const uint8_t *buf, int64_t nbits, int64_t *pos) {
    if (*pos >= nbits) return -1;
    int b = (buf[*pos >> 3] >> (*pos & 7)) & 1;
    (*pos)++;
    return b;
}

static inline int get_bits(const uint8_t *buf, int64_t nbits, int64_t *pos, int k, uint64_t *out) {
    uint64_t v = 0;
    if (*pos + k > nbits) return -1;
    for (int i = 0; i < k; i++) {
        v |= (uint64_t)((buf[(*pos + i) >> 3] >> ((*pos + i) & 7)) & 1) << i;
    }
    *pos += k;
    *out = v;
    return 0;
}

int32_t sld_read_explicit_freqs(const uint8_t *buf, int64_t nbytes, int64_t *bitpos, int32_t k, int32_t z,
                                int32_t precision, int64_t *freqs) {
    const int64_t nbits = 8 * nbytes;
    const uint64_t total = (uint64_t)1 << precision;
    uint64_t acc = 0, prev = 0;
    int64_t pos = *bitpos;
    for (int32_t s = 0; s < k; s++) {
        if (s == z) continue;
        int order = 0;
        if (prev) {
            int bl = 0;
            for (uint64_t t = prev; t; t >>= 1) bl++;
            order = bl > 2 ? bl - 2 : 0;
        }
        int m = 0, b;
        while ((b = get_bit(buf, nbits, &pos)) == 0) {
            if (++m > 40) return -2;
        }
        if (b < 0) return -1;
        uint64_t low = 0, tail = 0;
        if (get_bits(buf, nbits, &pos, m, &low) < 0) return -1;
        uint64_t hi = (((uint64_t)1 << m) | low) - 1;
        if (hi > (total >> order)) return -2;
        if (get_bits(buf, nbits, &pos, order, &tail) < 0) return -1;
        uint64_t v = (hi << order) | tail;
        acc += v;
        if (acc >= total) return -3;
        freqs[s] = (int64_t)v;
        prev = v;
    }
    freqs[z] = (int64_t)(total - acc);
    *bitpos = pos;
    return 0;
}

/* Fill the 2^P decoder entries of one table (see sld_rans_decode): for each symbol s, f_s slots
 * from cum_s on get f_s << 16 | (slot - cum_s) in the low word and, in the high word, the
 * float32 bits of values[s] (values non-NULL) or s. Frequencies must sum to 2^P (checked). */
int32_t sld_build_slots(int32_t k, int32_t precision, const int64_t *freqs, const float *values, uint64_t *out) {
    const int64_t total = (int64_t)1 << precision;
    int64_t pos = 0;
    for (int32_t s = 0; s < k; s++) {
        int64_t f = freqs[s];
        if (f < 0 || pos + f > total) return SLD_E_ARGS;
        uint64_t high;
        if (values) {
            uint32_t u;
            memcpy(&u, &values[s], 4);
            high = (uint64_t)u << 32;
        } else {
            high = (uint64_t)(uint32_t)s << 32;
        }
        uint64_t base = high | ((uint64_t)f << 16);
        for (int64_t b = 0; b < f; b++) out[pos + b] = base | (uint64_t)b;
        pos += f;
    }
    return pos == total ? SLD_OK : SLD_E_ARGS;
}

/* ECSQ assignment (encoder side; deltacodec/ecsq.py _assign is the reference). For each x:
 * the nearest offset value (|i| = 0, 1, >= 2 regions), then, with `bounds` non-NULL, moved
 * across the rate-distortion boundaries: bounds[k] separates indices base+k and base+k+1
 * (k = 0..nb-1), and a value sits in cell i when bounds[i-base-1] <= x < bounds[i-base].
 * stats (6 doubles) accumulate, for |i| == 1 and |i| >= 2: count, sum |i|, sum |x| (for the
 * offsets' least-squares refit). Returns 0, or -1 if an index leaves [-65535, 65535]. */
int32_t sld_ecsq_assign(const float *x, int64_t n, double step, int32_t t1, int32_t t2, const double *bounds,
                        int64_t nb, int64_t base, int32_t *out, double *stats) {
    const double inv = 1.0 / step;
    const double th1 = t1 / 256.0, th2 = t2 / 256.0;
    const double b01 = (1.0 - th1) * 0.5, b12 = 1.5 - 0.5 * (th1 + th2);
    double c1 = 0, a1 = 0, s1 = 0, c2 = 0, a2 = 0, s2 = 0;
    for (int64_t k = 0; k < n; k++) {
        double v = (double)x[k];
        double u = v * inv;
        double au = u < 0 ? -u : u;
        int64_t ia;
        if (au < b01) ia = 0;
        else if (au < b12) ia = 1;
        else {
            ia = (int64_t)(au + 0.5 + th2);  /* floor: au + 0.5 + th2 > 0 here */
            if (ia < 2) ia = 2;
        }
        int64_t i = u < 0 ? -ia : ia;
        if (bounds) {
            /* move down while below the cell's lower bound, up while at/above its upper bound */
            for (int guard = 0; guard < 64; guard++) {
                int64_t pos = i - base;
                if (pos >= 1 && pos - 1 < nb && v < bounds[pos - 1]) { i--; continue; }
                if (pos >= 0 && pos < nb && v >= bounds[pos]) { i++; continue; }
                break;
            }
        }
        if (i > 65535 || i < -65535) return -1;
        out[k] = (int32_t)i;
        int64_t a = i < 0 ? -i : i;
        double av = v < 0 ? -v : v;
        if (a == 1) { c1 += 1; a1 += 1; s1 += av; }
        else if (a >= 2) { c2 += 1; a2 += (double)a; s2 += av; }
    }
    stats[0] += c1; stats[1] += a1; stats[2] += s1;
    stats[3] += c2; stats[4] += a2; stats[5] += s2;
    return 0;
}
