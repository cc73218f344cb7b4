/* OTLP span encoding: ExportTraceServiceRequest protobuf bytes straight from correlator spans.

   The one implementation of the job (exporters/otlp_proto.py's WireEncoder calls it once per batch);
   building protobuf message objects costs ~70 us per span and a Python byte-writer ~4 us, on a core
   the agent shares. The per-process Resource and the InstrumentationScope fields are encoded once by
   the official protobuf library on the Python side and handed in as finished fields.
   tests/unit/test_otlp_proto.py checks the bytes parse to exactly what build_request() makes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX */
#include <stdint.h>
#include <string.h>

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

/* Every field this file writes. The numbers are fixed by the OTLP .proto files; otlp_proto.py
   checks this table (FIELDS) against the official descriptors at import, so a moved field fails
   loudly instead of writing unknown fields. */
#define OTLP_FIELDS(X)                                                                \
    X(REQ_RESOURCE_SPANS, "ExportTraceServiceRequest.resource_spans", 1, WT_LEN)      \
    X(RS_SCOPE_SPANS, "ResourceSpans.scope_spans", 2, WT_LEN)                         \
    X(SS_SPANS, "ScopeSpans.spans", 2, WT_LEN)                                        \
    X(SPAN_TRACE_ID, "Span.trace_id", 1, WT_LEN)                                      \
    X(SPAN_SPAN_ID, "Span.span_id", 2, WT_LEN)                                        \
    X(SPAN_TRACE_STATE, "Span.trace_state", 3, WT_LEN)                                \
    X(SPAN_PARENT_SPAN_ID, "Span.parent_span_id", 4, WT_LEN)                          \
    X(SPAN_NAME, "Span.name", 5, WT_LEN)                                              \
    X(SPAN_KIND, "Span.kind", 6, WT_VARINT)                                           \
    X(SPAN_START, "Span.start_time_unix_nano", 7, WT_I64)                             \
    X(SPAN_END, "Span.end_time_unix_nano", 8, WT_I64)                                 \
    X(SPAN_ATTRIBUTES, "Span.attributes", 9, WT_LEN)                                  \
    X(SPAN_STATUS, "Span.status", 15, WT_LEN)                                         \
    X(SPAN_FLAGS, "Span.flags", 16, WT_I32)                                           \
    X(KV_KEY, "KeyValue.key", 1, WT_LEN)                                              \
    X(KV_VALUE, "KeyValue.value", 2, WT_LEN)                                          \
    X(AV_STRING, "AnyValue.string_value", 1, WT_LEN)                                  \
    X(AV_BOOL, "AnyValue.bool_value", 2, WT_VARINT)                                   \
    X(AV_INT, "AnyValue.int_value", 3, WT_VARINT)                                     \
    X(AV_DOUBLE, "AnyValue.double_value", 4, WT_I64)                                  \
    X(STATUS_MESSAGE, "Status.message", 2, WT_LEN)                                    \
    X(STATUS_CODE, "Status.code", 3, WT_VARINT)

#define X_TAG(id, name, number, wt) id = ((number) << 3) | (wt),
enum { OTLP_FIELDS(X_TAG) };
#undef X_TAG

/* ---- Output buffer: a bytes object grown in place, shrunk to size at the end. ---- */

typedef struct {
    PyObject *obj; /* bytes; NULL once a resize failed (_PyBytes_Resize frees it) */
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_init(Buf *b, Py_ssize_t cap) {
    b->obj = PyBytes_FromStringAndSize(NULL, cap);
    if (b->obj == NULL) return -1;
    b->data = PyBytes_AS_STRING(b->obj);
    b->len = 0;
    b->cap = cap;
    return 0;
}

static int buf_reserve(Buf *b, Py_ssize_t n) {
    if (n <= b->cap - b->len) return 0;
    if (n > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = b->cap * 2;
    if (cap < b->len + n) cap = b->len + n;
    if (_PyBytes_Resize(&b->obj, cap) < 0) return -1;
    b->data = PyBytes_AS_STRING(b->obj);
    b->cap = cap;
    return 0;
}

static int varint_size(uint64_t v) {
    /* Seven bits a byte; v | 1 because clz(0) is undefined. */
    return (70 - __builtin_clzll(v | 1)) / 7;
}

/* Callers reserve first; the put_* helpers never check capacity. */
static void put_varint(Buf *b, uint64_t v) {
    char *p = b->data + b->len;
    while (v >= 0x80) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    b->len = p - b->data;
}

static void put_raw(Buf *b, const char *s, Py_ssize_t n) {
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
}

static void put_fixed(Buf *b, uint64_t v, int nbytes) {
    /* Little-endian by arithmetic, not by the host's layout. */
    for (int i = 0; i < nbytes; i++) b->data[b->len++] = (char)((v >> (8 * i)) & 0xFF);
}

/* The most bytes one tag, length or value head needs (a ten-byte varint and a one-byte tag). */
#define HEAD_MAX 16

static int put_len_field(Buf *b, uint32_t tag, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, HEAD_MAX + n) < 0) return -1;
    put_varint(b, tag);
    put_varint(b, (uint64_t)n);
    put_raw(b, s, n);
    return 0;
}

/* A length-delimited field whose length is known only after its body is written: open_len leaves
   `guess` bytes for the length, close_len writes it and moves the body when it needs another
   number of bytes (a length has one minimal varint form; padded forms are not canonical). Opened
   fields close innermost first, so a move never disturbs an enclosing field's start. */
static Py_ssize_t open_len(Buf *b, uint32_t tag, int guess) {
    if (buf_reserve(b, HEAD_MAX) < 0) return -1;
    put_varint(b, tag);
    b->len += guess;
    return b->len;
}

static int close_len(Buf *b, Py_ssize_t start, int guess) {
    Py_ssize_t body = b->len - start;
    int n = varint_size((uint64_t)body);
    if (n != guess) {
        if (n > guess && buf_reserve(b, n - guess) < 0) return -1;
        memmove(b->data + start - guess + n, b->data + start, (size_t)body);
    }
    Py_ssize_t end = start - guess + n + body;
    b->len = start - guess;
    put_varint(b, (uint64_t)body);
    b->len = end;
    return 0;
}

/* ---- Text: proto3 `string` fields must be valid UTF-8 (the official decoders reject the whole
   message otherwise), and a Python str may carry lone surrogates: undecodable bytes from the wire
   decoded with surrogateescape. Those become backslash escapes ("\udce9"), as in the OTLP-JSON
   file's output, so one odd string costs its readability, never the batch. ---- */

typedef struct {
    const char *p;
    Py_ssize_t n;
    PyObject *owner; /* the escaped copy when one was needed */
} Text;

static int text_get(Text *t, PyObject *s) {
    t->owner = NULL;
    if (PyUnicode_IS_COMPACT_ASCII(s)) { /* most: the characters are their UTF-8 */
        t->p = (const char *)PyUnicode_DATA(s);
        t->n = PyUnicode_GET_LENGTH(s);
        return 0;
    }
    /* CPython caches the UTF-8 in the object. */
    t->p = PyUnicode_AsUTF8AndSize(s, &t->n);
    if (t->p != NULL) return 0;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return -1;
    PyErr_Clear();
    t->owner = PyUnicode_AsEncodedString(s, "utf-8", "backslashreplace");
    if (t->owner == NULL) return -1;
    t->p = PyBytes_AS_STRING(t->owner);
    t->n = PyBytes_GET_SIZE(t->owner);
    return 0;
}

static void text_release(Text *t) { Py_CLEAR(t->owner); }

static int put_str_field(Buf *b, uint32_t tag, PyObject *s, const char *what) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(s)->tp_name);
        return -1;
    }
    Text t;
    if (text_get(&t, s) < 0) return -1;
    int rc = put_len_field(b, tag, t.p, t.n);
    text_release(&t);
    return rc;
}

static int put_bytes_field(Buf *b, uint32_t tag, PyObject *v, const char *what) {
    if (!PyBytes_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(v)->tp_name);
        return -1;
    }
    /* The length is the value's: a malformed id costs one span's validity at the collector, not
       the framing of the whole request. */
    return put_len_field(b, tag, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
}

/* An int of one digit (span kinds and statuses, ports, status codes, sizes): its value read in
   place, without a PyLong_AsLongLongAndOverflow call (which reads the same digits, of any int
   subclass: SpanKind, StatusCode). 1 when v is one (*out set), else 0. */
static inline int compact_value(PyObject *v, long long *out) {
    if (!PyLong_Check(v))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)v))
        return 0;
    *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)v);
#else
    Py_ssize_t n = Py_SIZE(v);
    if (n < -1 || n > 1)
        return 0;
    *out = (long long)n * (long long)((PyLongObject *)v)->ob_digit[0];
#endif
    return 1;
}

/* An enum field (open enums are int32 on the wire): negative values are ten-byte varints. */
static int enum_value(PyObject *v, const char *what, int32_t *out) {
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(v)->tp_name);
        return -1;
    }
    long long c;
    if (compact_value(v, &c)) {
        *out = (int32_t)c; /* one digit: well inside int32 */
        return 0;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s out of the int32 range of an OTLP enum", what);
        return -1;
    }
    *out = (int32_t)x;
    return 0;
}

static int fixed64_value(PyObject *v, const char *what, uint64_t *out) {
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(v)->tp_name);
        return -1;
    }
    /* The signed conversion is CPython's fast one; only values from 2**63 (and the negative ones it
       rejects) take the unsigned one. */
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x >= 0 && !overflow) {
        *out = (uint64_t)x;
        return 0;
    }
    if (x == -1 && PyErr_Occurred()) return -1;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)u;
    return 0;
}

/* One KeyValue of Span.attributes. The type order is otlp_proto.any_value's: bool before int (bool
   is an int subclass), an int outside int64 as its decimal string_value (int_value cannot hold it,
   and a clamped number would be a wrong one), float as double_value, anything else as str(value). */
static int put_attribute(Buf *b, PyObject *key, PyObject *value) {
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "attribute keys must be str, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    Text k, v = {NULL, 0, NULL};
    if (text_get(&k, key) < 0) return -1;
    PyObject *str = NULL; /* the string a non-str value is sent as */
    char head[HEAD_MAX];  /* a scalar AnyValue's whole body */
    int head_n = 0;
    int rc = -1;

    /* An exact str first: most values are, and it cannot be any of the other types. */
    if (PyUnicode_CheckExact(value)) {
        str = Py_NewRef(value);
    } else if (value == Py_True || value == Py_False) {
        head[0] = AV_BOOL;
        head[1] = value == Py_True;
        head_n = 2;
    } else if (PyLong_Check(value)) {
        int overflow = 0;
        long long x;
        if (!compact_value(value, &x)) {
            x = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (x == -1 && PyErr_Occurred()) goto done;
        }
        if (overflow) {
            str = PyObject_Str(value);
            if (str == NULL) goto done;
        } else {
            /* int64 on the wire: a negative is its 64-bit two's complement, a ten-byte varint. */
            uint64_t u = (uint64_t)x;
            head[0] = AV_INT;
            head_n = 1;
            while (u >= 0x80) {
                head[head_n++] = (char)((u & 0x7F) | 0x80);
                u >>= 7;
            }
            head[head_n++] = (char)u;
        }
    } else if (PyFloat_Check(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        head[0] = AV_DOUBLE;
        for (int i = 0; i < 8; i++) head[1 + i] = (char)((bits >> (8 * i)) & 0xFF);
        head_n = 9;
    } else {
        str = PyObject_Str(value);
        if (str == NULL) goto done;
    }

    Py_ssize_t av_len;
    if (str != NULL) {
        if (text_get(&v, str) < 0) goto done;
        av_len = 1 + varint_size((uint64_t)v.n) + v.n;
    } else {
        av_len = head_n;
    }
    Py_ssize_t kv_len = 1 + varint_size((uint64_t)k.n) + k.n + 1 + varint_size((uint64_t)av_len) + av_len;
    if (buf_reserve(b, HEAD_MAX + kv_len) < 0) goto done;
    put_varint(b, SPAN_ATTRIBUTES);
    put_varint(b, (uint64_t)kv_len);
    put_varint(b, KV_KEY);
    put_varint(b, (uint64_t)k.n);
    put_raw(b, k.p, k.n);
    put_varint(b, KV_VALUE);
    put_varint(b, (uint64_t)av_len);
    if (str != NULL) {
        put_varint(b, AV_STRING);
        put_varint(b, (uint64_t)v.n);
        put_raw(b, v.p, v.n);
    } else {
        put_raw(b, head, head_n);
    }
    rc = 0;
done:
    text_release(&v);
    text_release(&k);
    Py_XDECREF(str);
    return rc;
}

static int put_attributes(Buf *b, PyObject *attrs) {
    if (!PyDict_Check(attrs)) {
        PyErr_Format(PyExc_TypeError, "span attributes must be a dict, not %.100s", Py_TYPE(attrs)->tp_name);
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    /* The values are the objects least likely to be in cache (a batch's spans were built a while
       ago, each with its own strings and ints), and each is reached only through the dict: asking
       for all of them first lets their misses overlap instead of queueing one by one (about a
       fifth of the cost of a batch in bench/hotpath.py). */
    while (PyDict_Next(attrs, &pos, &k, &v)) __builtin_prefetch(v);
    pos = 0;
    while (PyDict_Next(attrs, &pos, &k, &v)) {
        /* Owned for the call: str(value) may run code that changes the dict. */
        Py_INCREF(k);
        Py_INCREF(v);
        int rc = put_attribute(b, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (rc < 0) return -1;
    }
    return 0;
}

/* ---- Span ---- */

enum {
    A_TRACE_ID, A_SPAN_ID, A_PARENT_SPAN_ID, A_NAME, A_KIND, A_START_NS, A_END_NS, A_ATTRIBUTES,
    A_STATUS, A_STATUS_MESSAGE, A_TRACE_STATE, A_PID, A_COUNT
};
static const char *const attr_names[A_COUNT] = {
    "trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns", "attributes",
    "status", "status_message", "trace_state", "pid",
};
static PyObject *attr_strs[A_COUNT]; /* interned */

/* Where a slots class (correlator.spans.Span) keeps each field: its member descriptors' offsets,
   read directly instead of a generic getattr per field (a type-cache lookup and a descriptor call
   each, about a quarter of the encoding's time). Resolved once per call for the first span's type, and
   used while that type keeps its version tag (any change to the class gets a new one); any other
   object, or a class whose fields are not plain slots, takes getattr. */
typedef struct {
    PyTypeObject *type; /* strong: its address must stay its own while compared */
    unsigned int version;
    Py_ssize_t offset[A_COUNT];
} Layout;

static void layout_resolve(Layout *l, PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    l->type = NULL;
    if (t->tp_getattro != PyObject_GenericGetAttr) return;
    for (int i = 0; i < A_COUNT; i++) {
        PyObject *d = _PyType_Lookup(t, attr_strs[i]); /* borrowed; sets no error */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX) return;
        l->offset[i] = m->offset;
    }
    /* The lookups gave the type a version tag unless it cannot have one: then no caching. */
    if (!PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG)) return;
    l->version = t->tp_version_tag;
    l->type = (PyTypeObject *)Py_NewRef((PyObject *)t);
}

/* A new reference to one field of a span. */
static PyObject *span_field(const Layout *l, PyObject *span, int i) {
    PyTypeObject *t = Py_TYPE(span);
    if (t != l->type || !PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG) || t->tp_version_tag != l->version)
        return PyObject_GetAttr(span, attr_strs[i]);
    PyObject *v = *(PyObject **)((char *)span + l->offset[i]);
    if (v == NULL) {
        /* An unset slot, as T_OBJECT_EX's getattr reports it. */
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%s'", t->tp_name, attr_names[i]);
        return NULL;
    }
    return Py_NewRef(v);
}

/* Most spans are 128 bytes to 16 KiB: a two-byte length, moved only when it is not. */
#define SPAN_LEN_GUESS 2
/* A ResourceSpans or ScopeSpans of a batch: 16 KiB to 2 MiB. */
#define GROUP_LEN_GUESS 3
#define STATUS_LEN_GUESS 1

static int put_span(Buf *b, const Layout *l, PyObject *span, uint32_t flags) {
    PyObject *a[A_PID] = {NULL}; /* every field but the pid, which group_by_pid read */
    int rc = -1;
    for (int i = 0; i < A_PID; i++) {
        a[i] = span_field(l, span, i);
        if (a[i] == NULL) goto done;
    }
    int32_t kind, status;
    uint64_t start, end;
    if (enum_value(a[A_KIND], "span kind", &kind) < 0 || enum_value(a[A_STATUS], "span status", &status) < 0
        || fixed64_value(a[A_START_NS], "start_ns", &start) < 0 || fixed64_value(a[A_END_NS], "end_ns", &end) < 0)
        goto done;
    Py_ssize_t body = open_len(b, SS_SPANS, SPAN_LEN_GUESS);
    if (body < 0) goto done;
    if (put_bytes_field(b, SPAN_TRACE_ID, a[A_TRACE_ID], "trace_id") < 0
        || put_bytes_field(b, SPAN_SPAN_ID, a[A_SPAN_ID], "span_id") < 0)
        goto done;
    /* Empty strings and ids are proto3 defaults: omitted, as the official encoder omits them. */
    int has_state = PyObject_IsTrue(a[A_TRACE_STATE]);
    if (has_state < 0 || (has_state && put_str_field(b, SPAN_TRACE_STATE, a[A_TRACE_STATE], "trace_state") < 0))
        goto done;
    PyObject *parent = a[A_PARENT_SPAN_ID];
    if (parent != Py_None && !(PyBytes_Check(parent) && PyBytes_GET_SIZE(parent) == 0)
        && put_bytes_field(b, SPAN_PARENT_SPAN_ID, parent, "parent_span_id") < 0)
        goto done;
    if (put_str_field(b, SPAN_NAME, a[A_NAME], "span name") < 0 || buf_reserve(b, 3 * HEAD_MAX) < 0) goto done;
    put_varint(b, SPAN_KIND);
    put_varint(b, (uint64_t)(int64_t)kind);
    put_varint(b, SPAN_START);
    put_fixed(b, start, 8);
    put_varint(b, SPAN_END);
    put_fixed(b, end, 8);
    if (put_attributes(b, a[A_ATTRIBUTES]) < 0) goto done;
    int has_message = PyObject_IsTrue(a[A_STATUS_MESSAGE]);
    if (has_message < 0) goto done;
    if (status || has_message) {
        Py_ssize_t st = open_len(b, SPAN_STATUS, STATUS_LEN_GUESS);
        if (st < 0 || (has_message && put_str_field(b, STATUS_MESSAGE, a[A_STATUS_MESSAGE], "status_message") < 0))
            goto done;
        if (status) {
            if (buf_reserve(b, HEAD_MAX) < 0) goto done;
            put_varint(b, STATUS_CODE);
            put_varint(b, (uint64_t)(int64_t)status);
        }
        if (close_len(b, st, STATUS_LEN_GUESS) < 0) goto done;
    }
    if (buf_reserve(b, HEAD_MAX) < 0) goto done;
    put_varint(b, SPAN_FLAGS);
    put_fixed(b, flags, 4);
    rc = close_len(b, body, SPAN_LEN_GUESS);
done:
    for (int i = 0; i < A_PID; i++) Py_XDECREF(a[i]);
    return rc;
}

/* ---- Request ---- */

/* The spans by pid, in first-appearance order (otlp_proto.group_by_pid's order): a dict of lists
   this call owns, so the Python code run later (resource_field, str(value)) cannot change what
   is being encoded. */
static PyObject *group_by_pid(PyObject *seq, const Layout *l) {
    PyObject *groups = PyDict_New();
    if (groups == NULL) return NULL;
    /* Size and item re-read every step: getattr may run code that changes a list. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *span = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        PyObject *pid = span_field(l, span, A_PID);
        int rc = -1;
        if (pid != NULL) {
            PyObject *group = PyDict_GetItemWithError(groups, pid);
            if (group != NULL) {
                rc = PyList_Append(group, span);
            } else if (!PyErr_Occurred() && (group = PyList_New(1)) != NULL) {
                PyList_SET_ITEM(group, 0, Py_NewRef(span));
                rc = PyDict_SetItem(groups, pid, group);
                Py_DECREF(group);
            }
            Py_DECREF(pid);
        }
        Py_DECREF(span);
        if (rc < 0) {
            Py_DECREF(groups);
            return NULL;
        }
    }
    return groups;
}

/* Bytes per span to start the buffer with: most spans fit, so it rarely grows. */
#define SPAN_SIZE_HINT 320

static PyObject *encode_spans(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "encode_spans(spans, resource_field, scope_field, flags)");
        return NULL;
    }
    PyObject *resource_field = args[1], *scope_field = args[2];
    if (!PyBytes_Check(scope_field)) {
        PyErr_SetString(PyExc_TypeError, "scope_field must be bytes");
        return NULL;
    }
    unsigned long flags = PyLong_AsUnsignedLong(args[3]);
    if (flags == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (flags > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "flags is a fixed32");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "spans must be a sequence");
    if (seq == NULL) return NULL;
    Layout layout = {NULL, 0, {0}};
    if (PySequence_Fast_GET_SIZE(seq) > 0) layout_resolve(&layout, PySequence_Fast_GET_ITEM(seq, 0));
    PyObject *groups = group_by_pid(seq, &layout);
    Py_DECREF(seq); /* the groups hold the spans */
    if (groups == NULL) {
        Py_XDECREF(layout.type);
        return NULL;
    }
    Buf b = {NULL, NULL, 0, 0};
    Py_ssize_t n_spans = 0, pos = 0;
    PyObject *pid, *group;
    while (PyDict_Next(groups, &pos, &pid, &group)) n_spans += PyList_GET_SIZE(group);
    if (buf_init(&b, 64 + (n_spans < PY_SSIZE_T_MAX / 4 / SPAN_SIZE_HINT ? n_spans : 0) * SPAN_SIZE_HINT) < 0)
        goto fail;

    pos = 0;
    while (PyDict_Next(groups, &pos, &pid, &group)) {
        PyObject *res = PyObject_CallOneArg(resource_field, pid);
        if (res == NULL) goto fail;
        if (!PyBytes_Check(res)) {
            PyErr_Format(PyExc_TypeError, "resource_field must return bytes, not %.100s", Py_TYPE(res)->tp_name);
            Py_DECREF(res);
            goto fail;
        }
        Py_ssize_t rs = open_len(&b, REQ_RESOURCE_SPANS, GROUP_LEN_GUESS);
        int ok = rs >= 0 && buf_reserve(&b, PyBytes_GET_SIZE(res)) == 0;
        if (ok) put_raw(&b, PyBytes_AS_STRING(res), PyBytes_GET_SIZE(res));
        Py_DECREF(res);
        if (!ok) goto fail;
        Py_ssize_t ss = open_len(&b, RS_SCOPE_SPANS, GROUP_LEN_GUESS);
        if (ss < 0 || buf_reserve(&b, PyBytes_GET_SIZE(scope_field)) < 0) goto fail;
        put_raw(&b, PyBytes_AS_STRING(scope_field), PyBytes_GET_SIZE(scope_field));
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(group); i++)
            if (put_span(&b, &layout, PyList_GET_ITEM(group, i), (uint32_t)flags) < 0) goto fail;
        if (close_len(&b, ss, GROUP_LEN_GUESS) < 0 || close_len(&b, rs, GROUP_LEN_GUESS) < 0) goto fail;
    }
    Py_DECREF(groups);
    Py_XDECREF(layout.type);
    if (_PyBytes_Resize(&b.obj, b.len) < 0) return NULL;
    return b.obj;
fail:
    Py_DECREF(groups);
    Py_XDECREF(layout.type);
    Py_XDECREF(b.obj);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_spans", (PyCFunction)(void (*)(void))encode_spans, METH_FASTCALL,
     "encode_spans(spans, resource_field, scope_field, flags) -> bytes\n\n"
     "ExportTraceServiceRequest bytes: one ResourceSpans per pid in first-appearance order, each its\n"
     "resource_field(pid) (a whole ResourceSpans.resource field), one ScopeSpans (scope_field, a whole\n"
     "ScopeSpans.scope field) and the pid's spans, each with Span.flags = flags."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_wire", NULL, -1, methods, NULL, NULL, NULL, NULL};

static PyObject *fields_table(void) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
#define X_ENTRY(id, name, number, wt)                                       \
    {                                                                        \
        PyObject *v = Py_BuildValue("(ii)", (number), (wt));                 \
        if (v == NULL || PyDict_SetItemString(d, (name), v) < 0) {           \
            Py_XDECREF(v);                                                   \
            Py_DECREF(d);                                                    \
            return NULL;                                                     \
        }                                                                    \
        Py_DECREF(v);                                                        \
    }
    OTLP_FIELDS(X_ENTRY)
#undef X_ENTRY
    return d;
}

PyMODINIT_FUNC PyInit__wire(void) {
    for (int i = 0; i < A_COUNT; i++)
        if (attr_strs[i] == NULL && (attr_strs[i] = PyUnicode_InternFromString(attr_names[i])) == NULL) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    PyObject *fields = fields_table();
    if (fields == NULL || PyModule_AddObject(m, "FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
