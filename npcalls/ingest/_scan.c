/*
 * npcalls.ingest._scan: one pass over a chunk of acc log text for the common line shape.
 *
 * The numpy parser in acc.py is the reference and the fallback; this module only
 * does, in one pass, what that parser's first steps do to every row, and marks
 * a row SIMPLE only when every check of the numpy path would pass on it for
 * certain.  Every other row is handed back to the numpy path, which decides it
 * exactly as it always has.
 *
 * Rows are what the regular expression ``ACC: (.{0,2048})`` finds (no DOTALL:
 * ``.`` is any byte but a newline), non-overlapping, left to right.
 *
 * A SIMPLE row (the bytes after "ACC: ") is, with no NUL byte anywhere in it:
 *     <kind>: timestamp=D10[;t_ms=D10.D3 | ;time_attr=D10.D3];method=M...;call_id=C;code=DDD(;|end)
 * where ": timestamp=" is the row's first such text, ";method=", ";call_id=",
 * ";code=" are each the first after the previous one, the row does not start
 * with "call ended: ", M is one or more ASCII letters up to the first ';',
 * and the Call-ID C (between ";call_id=" and ";code=") is one or more bytes of
 * printable ASCII without spaces.  Whether C is too long for the table is the
 * caller's question (it has the lengths).
 *
 * Only the plain CPython C API and the buffer protocol: the results are bytes
 * objects the caller wraps with numpy.frombuffer.  Nothing here reads outside
 * the chunk: every access is bounded by the row's end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define REST 2048

enum {
    F_SIMPLE = 1,     /* every check of the numpy path passes: the caller may take the row */
    F_INVITE = 2,     /* method INVITE */
    F_BYE = 4,        /* method BYE */
    F_TWO = 8,        /* the code's first digit is '2' */
    F_MISSED = 16,    /* the row starts with "call missed: " */
    F_ENDED = 32,     /* the row starts with "call ended: " (an OpenSIPS CDR: never simple) */
    F_ANSWERED = 64,  /* a CDR whose duration is not zero */
};

/* First occurrence of needle in [s + from, s + n), as an index, or -1 (glibc's memmem
 * skips ahead far faster than a memchr on the first byte when that byte is common). */
static Py_ssize_t
find(const char *s, Py_ssize_t n, Py_ssize_t from, const char *needle, Py_ssize_t k)
{
    if (from < 0)
        from = 0;
    if (k == 0 || n - from < k)
        return -1;
    const char *q = memmem(s + from, (size_t)(n - from), needle, (size_t)k);
    return q == NULL ? -1 : q - s;
}

/* find() for the fields inside a row: short distances, and a first byte (';', ':') that is
 * rare there, where memchr beats memmem's per-call set-up. */
static Py_ssize_t
find_near(const char *s, Py_ssize_t n, Py_ssize_t from, const char *needle, Py_ssize_t k)
{
    if (from < 0)
        from = 0;
    if (k == 0 || n - from < k)
        return -1;
    const char *p = s + from;
    const char *end = s + n - k + 1;      /* one past the last place a match may start */
    while (p < end) {
        const char *q = memchr(p, needle[0], (size_t)(end - p));
        if (q == NULL)
            return -1;
        if (memcmp(q, needle, (size_t)k) == 0)
            return q - s;
        p = q + 1;
    }
    return -1;
}

static int
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* The value of the n decimal digits at p, or -1 if one is not a digit. */
static int64_t
digits(const unsigned char *p, int n)
{
    int64_t v = 0;
    for (int i = 0; i < n; i++) {
        if (!is_digit(p[i]))
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* Does [p, p + k) hold exactly the text lit (k = strlen(lit))? */
#define LIT(p, lit) (memcmp((p), (lit), sizeof(lit) - 1) == 0)

/*
 * The time of a row's time section r[kpos, p_m) when it has one of the usual
 * layouts (those of acc.py's _ACC_TIME_TEMPLATES); -1 otherwise.
 */
static int64_t
usual_time(const unsigned char *r, Py_ssize_t kpos, Py_ssize_t p_m)
{
    const unsigned char *p = r + kpos;            /* ": timestamp=" */
    Py_ssize_t len = p_m - kpos;
    int64_t s, i, f;
    if (len == 22) {                              /* : timestamp=D10 */
        s = digits(p + 12, 10);
        return s < 0 ? -1 : s * 1000000000LL;
    }
    if (len == 42 && LIT(p + 22, ";t_ms=") && p[38] == '.') {
        s = digits(p + 12, 10);
        i = digits(p + 28, 10);
        f = digits(p + 39, 3);
    }
    else if (len == 47 && LIT(p + 22, ";time_attr=") && p[43] == '.') {
        s = digits(p + 12, 10);
        i = digits(p + 33, 10);
        f = digits(p + 44, 3);
    }
    else
        return -1;
    if (s < 0 || i < 0 || f < 0)
        return -1;
    return i * 1000000000LL + f * 1000000LL;
}

/* The last-field start of a row (after its last ';', 0 if none). */
static int64_t
last_field(const unsigned char *r, Py_ssize_t n)
{
    const unsigned char *q = n > 0 ? memrchr(r, ';', (size_t)n) : NULL;
    return q == NULL ? 0 : q - r + 1;
}

/* Fill one row's outputs; r is the row, n its length. */
static void
scan_row(const unsigned char *r, Py_ssize_t n, int64_t *t, int64_t *t2, int64_t *cid_at,
         int64_t *cid_len, int64_t *cid_raw, int64_t *tail, uint8_t *flags)
{
    const char *c = (const char *)r;
    uint8_t fl = 0;
    Py_ssize_t i;

    /* the start of the last field (after the last ';'), for the cut-short check */
    *tail = last_field(r, n);
    *t = *t2 = 0;
    *cid_at = *cid_len = *cid_raw = 0;
    if (n >= 12 && LIT(r, "call ended: "))
        fl |= F_ENDED;
    if (n >= 13 && LIT(r, "call missed: "))
        fl |= F_MISSED;
    *flags = fl;
    if (fl & F_ENDED)
        return;
    if (memchr(r, 0, (size_t)n) != NULL)
        return;
    Py_ssize_t kpos = find_near(c, n, 0, ": timestamp=", 12);
    if (kpos <= 0)
        return;
    Py_ssize_t p_m = find_near(c, n, kpos, ";method=", 8);
    if (p_m <= kpos)
        return;
    Py_ssize_t p_c = find_near(c, n, p_m, ";call_id=", 9);
    if (p_c <= p_m)
        return;
    Py_ssize_t p_k = find_near(c, n, p_c, ";code=", 6);
    if (p_k <= p_c)
        return;
    int64_t tv = usual_time(r, kpos, p_m);
    if (tv < 0)
        return;
    /* the method: ASCII letters up to the first ';' (there is one: at p_c at the latest) */
    Py_ssize_t ms = p_m + 8, me = ms;
    while (me < p_c && r[me] != ';')
        me++;
    if (me == ms)
        return;
    for (i = ms; i < me; i++) {
        unsigned char b = r[i];
        if (!((b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z')))
            return;
    }
    if (me - ms == 6 && LIT(r + ms, "INVITE"))
        fl |= F_INVITE;
    else if (me - ms == 3 && LIT(r + ms, "BYE"))
        fl |= F_BYE;
    /* the code: three digits, then ';' or the row's end */
    Py_ssize_t k0 = p_k + 6;
    if (k0 + 3 > n || !is_digit(r[k0]) || !is_digit(r[k0 + 1]) || !is_digit(r[k0 + 2]))
        return;
    if (k0 + 3 < n && r[k0 + 3] != ';')
        return;
    if (r[k0] == '2')
        fl |= F_TWO;
    /* the Call-ID: printable ASCII, no space, not empty */
    Py_ssize_t cs = p_c + 9;
    if (p_k <= cs)
        return;
    for (i = cs; i < p_k; i++) {
        if (r[i] < 33 || r[i] > 126)
            return;
    }
    *t = tv;
    *cid_at = cs;
    *cid_len = *cid_raw = p_k - cs;
    *flags = fl | F_SIMPLE;
}

/* D10.D<f>; end_time=D10.D<f>; duration= at the row's start (acc.py's _CDR_TEMPLATES) */
static Py_ssize_t
cdr_template(const unsigned char *r, Py_ssize_t n, int f, int64_t *st, int64_t *en)
{
    Py_ssize_t size = 2 * (11 + f) + 11 + 11;     /* 11 + f digits and dot, twice; the names */
    if (n < size)
        return -1;
    const unsigned char *p = r;
    int64_t s = digits(p, 10);
    if (s < 0 || p[10] != '.')
        return -1;
    int64_t sf = digits(p + 11, f);
    p += 11 + f;
    if (sf < 0 || !LIT(p, "; end_time="))
        return -1;
    p += 11;
    int64_t e = digits(p, 10);
    if (e < 0 || p[10] != '.')
        return -1;
    int64_t ef = digits(p + 11, f);
    p += 11 + f;
    if (ef < 0 || !LIT(p, "; duration="))
        return -1;
    int64_t mul = f == 3 ? 1000000LL : 1000LL;
    *st = s * 1000000000LL + sf * mul;
    *en = e * 1000000000LL + ef * mul;
    return size;
}

/*
 * A Kamailio dialog CDR row (after " start_time="), SIMPLE when, with no NUL in it:
 *     D10.D3; end_time=D10.D3; duration=DUR;...; call_id=C[;...]   (or 6 fraction digits)
 * DUR: digits with at most one dot, at least one digit; ANSWERED unless all zeros.
 * C: up to the next ';' or the row's end, trailing blanks, tabs and CRs dropped,
 * then one or more bytes of printable ASCII without spaces and without '#'.
 */
static void
scan_cdr_row(const unsigned char *r, Py_ssize_t n, int64_t *t, int64_t *t2, int64_t *cid_at,
             int64_t *cid_len, int64_t *cid_raw, int64_t *tail, uint8_t *flags)
{
    const char *c = (const char *)r;
    Py_ssize_t i;
    *tail = last_field(r, n);
    *t = *t2 = 0;
    *cid_at = *cid_len = *cid_raw = 0;
    *flags = 0;
    if (memchr(r, 0, (size_t)n) != NULL)
        return;
    int64_t st, en;
    Py_ssize_t ds = cdr_template(r, n, 3, &st, &en);
    if (ds < 0)
        ds = cdr_template(r, n, 6, &st, &en);
    if (ds < 0)
        return;
    Py_ssize_t de = find_near(c, n, ds, ";", 1);
    if (de <= ds)
        return;
    int dots = 0, nonzero = 0;
    for (i = ds; i < de; i++) {
        if (r[i] == '.')
            dots++;
        else if (!is_digit(r[i]))
            return;
        else if (r[i] != '0')
            nonzero = 1;
    }
    if (dots > 1 || de - ds == dots)
        return;
    Py_ssize_t p_c = find_near(c, n, de, "; call_id=", 10);
    if (p_c < de)
        return;
    Py_ssize_t cs = p_c + 10;
    Py_ssize_t ce = find_near(c, n, cs, ";", 1);
    if (ce < 0)
        ce = n;
    Py_ssize_t raw = ce - cs;
    while (ce > cs && (r[ce - 1] == ' ' || r[ce - 1] == '\t' || r[ce - 1] == '\r'))
        ce--;
    if (ce <= cs)
        return;
    for (i = cs; i < ce; i++) {
        if (r[i] < 33 || r[i] > 126 || r[i] == '#')
            return;
    }
    *t = st;
    *t2 = en;
    *cid_at = cs;
    *cid_len = ce - cs;
    *cid_raw = raw;
    *flags = F_SIMPLE | (nonzero ? F_ANSWERED : 0);
}

typedef struct {
    char *data;
    Py_ssize_t cap;
} Buf;

static int
grow(Buf *b, Py_ssize_t need)
{
    if (need <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < need)
        cap *= 2;
    char *d = PyMem_Realloc(b->data, (size_t)cap);
    if (d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

/* Which fields, in this order, each of n int64 (flags: uint8). */
#define NCOL 8

PyDoc_STRVAR(rows_doc,
"rows(chunk, cdr, /)\n"
"--\n\n"
"Find the rows of ``ACC: (.{0,2048})`` (cdr false) or of `` start_time=(.{0,2048})``\n"
"(cdr true) in chunk and read those of the common shape.\n\n"
"Returns (n, off, length, t, t2, cid_at, cid_len, cid_raw, tail, flags, bol): n rows;\n"
"the other items are bytes holding n native int64 each (flags: n uint8).  off is\n"
"where each row's marker (acc) or text (cdr) starts in the chunk; length the\n"
"row's length after the marker; cid_at and tail are relative to the row's text.\n"
"t (start for a CDR), t2 (a CDR's end), cid_at, cid_len (the Call-ID's length)\n"
"and cid_raw (before trailing blanks were dropped) are only meaningful for rows\n"
"flagged SIMPLE.  bol (cdr only): whether a line starts with ``start_time=``.");

static PyObject *
rows(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int cdr;
    if (!PyArg_ParseTuple(args, "y*p:rows", &view, &cdr))
        return NULL;
    /* CDR rows: "start_time=" is searched for and the byte before it looked at, which
     * also tells whether a CDR line without any prefix (at a line's start) is there */
    const char *marker = cdr ? "start_time=" : "ACC: ";
    Py_ssize_t mlen = cdr ? 11 : 5;
    int bol = 0;
    const char *s = (const char *)view.buf;
    Py_ssize_t size = view.len;
    Buf col[NCOL + 1];
    memset(col, 0, sizeof(col));
    Py_ssize_t n = 0, pos = 0, from = 0;     /* pos: where the regex would go on */
    PyObject *res = NULL;

    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        Py_ssize_t at = find(s, size, from, marker, mlen);
        if (at < 0)
            break;
        if (cdr) {
            if (at == 0 || s[at - 1] == '\n')
                bol = 1;
            if (at == 0 || at - 1 < pos || s[at - 1] != ' ') {
                from = at + 1;
                continue;
            }
        }
        Py_ssize_t r0 = at + mlen, lim = size - r0 < REST ? size - r0 : REST;
        const char *nl = memchr(s + r0, '\n', (size_t)lim);
        Py_ssize_t len = nl ? nl - (s + r0) : lim;
        int failed = 0;
        for (int j = 0; j < NCOL; j++)
            failed |= grow(&col[j], (n + 1) * 8);
        failed |= grow(&col[NCOL], n + 1);
        if (failed) {
            n = -1;
            break;
        }
        int64_t *c[NCOL];
        for (int j = 0; j < NCOL; j++)
            c[j] = (int64_t *)col[j].data + n;
        *c[0] = cdr ? r0 : at;
        *c[1] = len;
        (cdr ? scan_cdr_row : scan_row)((const unsigned char *)s + r0, len, c[2], c[3], c[4],
                                        c[5], c[6], c[7], (uint8_t *)col[NCOL].data + n);
        n++;
        pos = from = r0 + len;
    }
    Py_END_ALLOW_THREADS
    /* grow() may only set the error with the GIL held: it did not, report here */
    if (n < 0) {
        PyErr_NoMemory();
        goto done;
    }
    res = PyTuple_New(NCOL + 3);
    if (res == NULL)
        goto done;
    PyObject *count = PyLong_FromSsize_t(n);
    if (count == NULL) {
        Py_CLEAR(res);
        goto done;
    }
    PyTuple_SET_ITEM(res, 0, count);
    PyTuple_SET_ITEM(res, NCOL + 2, PyBool_FromLong(bol));
    for (int j = 0; j <= NCOL; j++) {
        PyObject *b = PyBytes_FromStringAndSize(col[j].data ? col[j].data : "",
                                                j < NCOL ? n * 8 : n);
        if (b == NULL) {
            Py_CLEAR(res);
            goto done;
        }
        PyTuple_SET_ITEM(res, j + 1, b);
    }
done:
    for (int j = 0; j <= NCOL; j++)
        PyMem_Free(col[j].data);
    PyBuffer_Release(&view);
    return res;
}

PyDoc_STRVAR(take_doc,
"take(chunk, start, length, k, /)\n"
"--\n\n"
"Bytes chunk[start[i]:start[i] + length[i]] of each i, cut to k and padded with\n"
"zeros to k, side by side (n * k bytes, n = len(start); start and length are\n"
"buffers of native int64).  Parts outside the chunk read as zeros.");

static PyObject *
take(PyObject *self, PyObject *args)
{
    Py_buffer data, st, ln;
    Py_ssize_t k;
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*n:take", &data, &st, &ln, &k))
        return NULL;
    Py_ssize_t n = st.len / 8;
    if (k < 0 || st.len % 8 || ln.len != st.len || (k && n > PY_SSIZE_T_MAX / k)) {
        PyErr_SetString(PyExc_ValueError, "take: bad sizes");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n * k);
    if (out == NULL)
        goto done;
    char *o = PyBytes_AS_STRING(out);
    const char *s = (const char *)data.buf;
    const int64_t *a = (const int64_t *)st.buf, *l = (const int64_t *)ln.buf;
    Py_ssize_t size = data.len;
    Py_BEGIN_ALLOW_THREADS
    memset(o, 0, (size_t)(n * k));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (a[i] >= size || l[i] <= 0)
            continue;
        int64_t b = a[i], e = a[i] + (l[i] < k ? l[i] : k);
        if (b < 0)
            b = 0;
        if (e > size)
            e = size;
        if (e > b)
            memcpy(o + i * k + (b - a[i]), s + b, (size_t)(e - b));
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&st);
    PyBuffer_Release(&ln);
    return out;
}

static PyMethodDef methods[] = {
    {"rows", rows, METH_VARARGS, rows_doc},
    {"take", take, METH_VARARGS, take_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan",
    "One-pass scanner of acc log chunks (the compiled fast path of npcalls.ingest.acc).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SIMPLE", F_SIMPLE) < 0 ||
        PyModule_AddIntConstant(m, "INVITE", F_INVITE) < 0 ||
        PyModule_AddIntConstant(m, "BYE", F_BYE) < 0 ||
        PyModule_AddIntConstant(m, "TWO", F_TWO) < 0 ||
        PyModule_AddIntConstant(m, "MISSED", F_MISSED) < 0 ||
        PyModule_AddIntConstant(m, "ENDED", F_ENDED) < 0 ||
        PyModule_AddIntConstant(m, "ANSWERED", F_ANSWERED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
