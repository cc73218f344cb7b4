/* The decoding of the kernel's ring-buffer records (bpf/kspan.h) into correlator values: the one
 * implementation of record_type, decode_exchange, decode_metric and decode_segment, called once
 * per record by the agent (tracer/records.py re-exports them and calls setup() once at import).
 *
 * Records may be foreign, short or malformed (a recording from another version, a damaged file):
 * every byte read is bounds-checked against the record's length, and a bad record raises
 * ValueError with the message the correlator's callers log, never reads past the buffer.
 *
 * The values are built without running Python code: the slots dataclasses (Exchange, ParentHint,
 * ExchangeId, Segment, SegmentRecord) are allocated and their member slots filled directly, as
 * their generated __init__ would (a Python-level __init__ call costs more than the whole decode).
 * setup() verifies each class is exactly what that needs (see slotted_setup) and fails the
 * import otherwise, so a changed dataclass cannot be filled wrongly. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <linux/types.h>
#include <sys/socket.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../bpf/kspan.h"

/* The kernel writes its records in host order and the headers are copied here as C structs;
 * kspan's hosts (x86-64, arm64) are little-endian, as the recordings' format assumes. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kspan records are little-endian"
#endif

#define REQ_AT offsetof(struct kspan_exchange, req_head)
#define RESP_AT offsetof(struct kspan_exchange, resp_head)
#define TAIL_AT offsetof(struct kspan_exchange, resp_tail)
#define IDS_AT offsetof(struct kspan_exchange, trace_id)
#define IDS_LEN (REQ_AT - IDS_AT)
#define EXCHANGE_SIZE sizeof(struct kspan_exchange)
/* Recordings made before the kernel fixed identities (recording version 1): the same record
 * without the identity bytes before req_head. */
#define LEGACY_SIZE (EXCHANGE_SIZE - IDS_LEN)
#define SEGMENT_HEADER offsetof(struct kspan_segment, data)
/* Recordings made before tcp_seq/ctx_seq: the header ended at parent_span_id. */
#define SEGMENT_HEADER_V1 offsetof(struct kspan_segment, ctx_seq)

/* struct kspan_h2_entry (bpf/http_exchange.h): transfer offset, bytes copied, flags. */
#define H2_ENTRY 8

/* ------------------------------------------------------------------------------------------ */
/* Slots dataclasses filled directly. */

#define MAX_SLOTS 40

typedef struct {
    PyTypeObject *type;
    Py_ssize_t n;
    Py_ssize_t off[MAX_SLOTS];
} slotted;

/* The instance layout build_slotted relies on, checked once: a plain class (object's __new__ and
 * allocator, no __dict__, no __post_init__, the __init__ @dataclass generated, which only stores
 * its arguments: it is compiled from source text, "<string>") whose __slots__ are exactly
 * `names`, in order, each a writable object member of this very class. That is what
 * @dataclass(slots=True) makes of the correlator's classes; anything else (a field added or
 * moved, a hand-written __init__, a base class) fails the import instead of leaving a slot unset,
 * skipping what an __init__ would have done, or filling the wrong slot. */
static int slotted_setup(slotted *s, PyObject *cls, const char *const *names, Py_ssize_t n)
{
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "tracer._records.setup: %R is not a class", cls);
        return -1;
    }
    PyTypeObject *t = (PyTypeObject *)cls;
    if (t->tp_new != PyBaseObject_Type.tp_new || t->tp_alloc != PyType_GenericAlloc || t->tp_dictoffset != 0 ||
        t->tp_base != &PyBaseObject_Type || n > MAX_SLOTS) {
        PyErr_Format(PyExc_TypeError, "tracer._records.setup: %s is not a plain slots dataclass", t->tp_name);
        return -1;
    }
    int plain_init = 0;
    PyObject *init = PyObject_GetAttrString(cls, "__init__");
    PyObject *code = init != NULL ? PyObject_GetAttrString(init, "__code__") : NULL;
    PyObject *file = code != NULL ? PyObject_GetAttrString(code, "co_filename") : NULL;
    if (file != NULL)
        plain_init = PyUnicode_Check(file) && PyUnicode_CompareWithASCIIString(file, "<string>") == 0;
    Py_XDECREF(file);
    Py_XDECREF(code);
    Py_XDECREF(init);
    PyErr_Clear(); /* an __init__ without Python code is not the generated one either */
    int has_post_init = PyObject_HasAttrString(cls, "__post_init__");
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL)
        return -1;
    int ok = plain_init && !has_post_init && PyTuple_Check(slots) && PyTuple_GET_SIZE(slots) == n;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(slots, i);
        ok = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, names[i]) == 0;
        if (!ok)
            break;
        PyObject *d = PyObject_GetAttr(cls, name);
        if (d == NULL) {
            Py_DECREF(slots);
            return -1;
        }
        if (Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_common.d_type == t) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            ok = m->type == T_OBJECT_EX && !(m->flags & READONLY) && m->offset >= (Py_ssize_t)sizeof(PyObject) &&
                 m->offset + (Py_ssize_t)sizeof(PyObject *) <= t->tp_basicsize;
            s->off[i] = m->offset;
        } else {
            ok = 0;
        }
        Py_DECREF(d);
    }
    Py_DECREF(slots);
    if (!ok) {
        PyErr_Format(PyExc_TypeError,
                     "tracer._records.setup: %s's slots are not the %zd fields tracer/_records.c fills", t->tp_name, n);
        return -1;
    }
    Py_INCREF(cls);
    Py_XSETREF(s->type, t);
    s->n = n;
    return 0;
}

/* A new instance holding v[0..n-1], whose references it steals (on failure too). Allocation is
 * the only thing that can run Python code (a collection's finalizers), and it happens before
 * the instance exists: no code ever sees it half filled. */
static PyObject *build_slotted(const slotted *s, PyObject **v)
{
    PyObject *o = NULL;
    for (Py_ssize_t i = 0; i < s->n; i++)
        if (v[i] == NULL)
            goto fail;
    o = s->type->tp_alloc(s->type, 0);
    if (o == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < s->n; i++)
        *(PyObject **)((char *)o + s->off[i]) = v[i];
    return o;
fail:
    for (Py_ssize_t i = 0; i < s->n; i++)
        Py_XDECREF(v[i]);
    return NULL;
}

static const char *const EXCHANGE_FIELDS[] = {
    "pid", "tid", "role", "end", "source", "tls", "conn_id", "family", "local_addr", "local_port",
    "remote_addr", "remote_port", "req_start_ns", "req_end_ns", "resp_start_ns", "resp_end_ns", "req_bytes",
    "resp_bytes", "status", "parent", "req_head", "resp_head", "resp_tail", "req_head_truncated",
    "resp_head_truncated", "interim_response", "parent_ambiguous", "trace_id", "span_id", "parent_span_id",
    "sampled", "kernel_ids", "remote_parent",
};
#define N_EXCHANGE ((Py_ssize_t)(sizeof(EXCHANGE_FIELDS) / sizeof(EXCHANGE_FIELDS[0])))
static const char *const PARENT_HINT_FIELDS[] = {"kind", "pid", "exchange"};
static const char *const EXCHANGE_ID_FIELDS[] = {"conn_id", "req_start_ns"};
static const char *const SEGMENT_FIELDS[] = {
    "conn_id", "pid", "tid", "egress", "start_ns", "end_ns", "length", "data", "pos",
};
#define N_SEGMENT ((Py_ssize_t)(sizeof(SEGMENT_FIELDS) / sizeof(SEGMENT_FIELDS[0])))
static const char *const SEGMENT_RECORD_FIELDS[] = {
    "seg", "proto", "client", "closed", "seq", "from_start", "tls", "family", "local_addr", "local_port",
    "remote_addr", "remote_port", "parent_kind", "trace_id", "parent_span_id", "sampled", "ambiguous",
    "seq_known", "peer", "ctx_seq", "ctx_end", "pieces",
};
#define N_SEGMENT_RECORD ((Py_ssize_t)(sizeof(SEGMENT_RECORD_FIELDS) / sizeof(SEGMENT_RECORD_FIELDS[0])))
/* MetricExchange is a NamedTuple: a tuple subclass built through tuple's own __new__. */
static const char *const METRIC_FIELDS[] = {
    "pid", "role", "end", "tls", "status", "responded", "start_ns", "end_ns", "family", "local_addr",
    "local_port", "remote_addr", "remote_port", "parent_kind", "parent_pid", "span_id", "parent_span_id",
    "req_head",
};
#define N_METRIC ((Py_ssize_t)(sizeof(METRIC_FIELDS) / sizeof(METRIC_FIELDS[0])))

/* ------------------------------------------------------------------------------------------ */
/* State set by setup(): one interpreter, one set of correlator classes. */

static int ready;
static slotted exchange_cls, parent_hint_cls, exchange_id_cls, segment_cls, segment_record_cls;
static PyTypeObject *metric_cls;
/* Enum members by value (the record fields are u8); NULL: not a member. */
static PyObject *roles[256], *ends[256], *sources[256], *parent_kinds[256];
static PyObject *format_addr;
static PyObject *empty_bytes, *empty_str, *empty_tuple;

/* Addresses: correlator/red.py's format_addr, memoised by the raw bytes. Every record carries two
 * addresses and a host's records name the same few over and over, so the Python function runs
 * only on a miss: one formatting rule, in red.py. Direct-mapped, bounded: a miss replaces. */

#define ADDR_BITS 12
typedef struct {
    uint8_t key[16];
    uint16_t family;
    PyObject *text;
} addr_slot;
static addr_slot addr_memo[1 << ADDR_BITS];

static void addr_memo_clear(void)
{
    for (size_t i = 0; i < sizeof addr_memo / sizeof addr_memo[0]; i++)
        Py_CLEAR(addr_memo[i].text);
}

static PyObject *addr_text(uint16_t family, const uint8_t raw[16])
{
    uint8_t key[16] = {0};
    if (family == AF_INET)
        memcpy(key, raw, 4); /* format_addr reads only an IPv4 address's first 4 bytes */
    else if (family == AF_INET6)
        memcpy(key, raw, 16);
    else
        return Py_NewRef(empty_str); /* family 0 (unknown) or not an IP family */
    uint64_t a, b;
    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 8);
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ULL) ^ family) * 0xFF51AFD7ED558CCDULL;
    addr_slot *s = &addr_memo[h >> (64 - ADDR_BITS)];
    if (s->text != NULL && s->family == family && memcmp(s->key, key, 16) == 0)
        return Py_NewRef(s->text);
    PyObject *text = PyObject_CallFunction(format_addr, "Hy#", family, (const char *)raw, (Py_ssize_t)16);
    if (text == NULL)
        return NULL;
    if (!PyUnicode_CheckExact(text)) {
        PyErr_Format(PyExc_TypeError, "format_addr returned %R, not a str", text);
        Py_DECREF(text);
        return NULL;
    }
    memcpy(s->key, key, 16);
    s->family = family;
    Py_XSETREF(s->text, Py_NewRef(text));
    return text;
}

static int enum_table(PyObject *table[256], PyObject *cls)
{
    PyObject *it = PyObject_GetIter(cls);
    if (it == NULL)
        return -1;
    for (int i = 0; i < 256; i++)
        Py_CLEAR(table[i]);
    PyObject *member;
    while ((member = PyIter_Next(it)) != NULL) {
        long v = PyLong_AsLong(member);
        if (v < 0 || v > 255) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "tracer._records.setup: %R does not fit a record's u8", member);
            Py_DECREF(member);
            Py_DECREF(it);
            return -1;
        }
        Py_XSETREF(table[v], member);
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

static int metric_setup(PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "tracer._records.setup: metric must be a NamedTuple");
        return -1;
    }
    PyObject *fields = PyObject_GetAttrString(cls, "_fields");
    if (fields == NULL)
        return -1;
    int ok = PyTuple_Check(fields) && PyTuple_GET_SIZE(fields) == N_METRIC;
    for (Py_ssize_t i = 0; ok && i < N_METRIC; i++) {
        PyObject *f = PyTuple_GET_ITEM(fields, i);
        ok = PyUnicode_Check(f) && PyUnicode_CompareWithASCIIString(f, METRIC_FIELDS[i]) == 0;
    }
    Py_DECREF(fields);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "tracer._records.setup: metric's fields are not the ones _records.c fills");
        return -1;
    }
    Py_INCREF(cls);
    Py_XSETREF(metric_cls, (PyTypeObject *)cls);
    return 0;
}

static PyObject *py_setup(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"exchange", "parent_hint", "exchange_id", "metric", "segment", "segment_record",
                             "roles", "ends", "sources", "parent_kinds", "format_addr", NULL};
    PyObject *ex, *ph, *eid, *mx, *seg, *segrec, *ro, *en, *so, *pk, *fa;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOOOOOOOO:setup", kwlist, &ex, &ph, &eid, &mx, &seg, &segrec, &ro,
                                     &en, &so, &pk, &fa))
        return NULL;
    if (!PyCallable_Check(fa)) {
        PyErr_SetString(PyExc_TypeError, "tracer._records.setup: format_addr must be callable");
        return NULL;
    }
    ready = 0;
    if (slotted_setup(&exchange_cls, ex, EXCHANGE_FIELDS, N_EXCHANGE) < 0 ||
        slotted_setup(&parent_hint_cls, ph, PARENT_HINT_FIELDS, 3) < 0 ||
        slotted_setup(&exchange_id_cls, eid, EXCHANGE_ID_FIELDS, 2) < 0 ||
        slotted_setup(&segment_cls, seg, SEGMENT_FIELDS, N_SEGMENT) < 0 ||
        slotted_setup(&segment_record_cls, segrec, SEGMENT_RECORD_FIELDS, N_SEGMENT_RECORD) < 0 ||
        metric_setup(mx) < 0 || enum_table(roles, ro) < 0 || enum_table(ends, en) < 0 ||
        enum_table(sources, so) < 0 || enum_table(parent_kinds, pk) < 0)
        return NULL;
    Py_INCREF(fa);
    Py_XSETREF(format_addr, fa);
    addr_memo_clear(); /* texts of the previous format_addr */
    ready = 1;
    Py_RETURN_NONE;
}

static int check_ready(void)
{
    if (ready)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "tracer._records.setup() was not called (tracer/records.py calls it)");
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Inputs: bytes (what the ring buffer and recordings give) without a buffer export, anything else
 * with a buffer through the buffer protocol. */

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    Py_buffer view;
    int viewed;
} input;

static int input_get(PyObject *o, input *in)
{
    if (PyBytes_Check(o)) {
        in->p = (const uint8_t *)PyBytes_AS_STRING(o);
        in->n = PyBytes_GET_SIZE(o);
        in->viewed = 0;
        return 0;
    }
    if (PyObject_GetBuffer(o, &in->view, PyBUF_SIMPLE) < 0)
        return -1;
    in->p = in->view.buf;
    in->n = in->view.len;
    in->viewed = 1;
    return 0;
}

static void input_release(input *in)
{
    if (in->viewed)
        PyBuffer_Release(&in->view);
}

/* One record through one decoder. legacy: exchange records' layout (-1: by the length). */
static PyObject *decode(PyObject *data, PyObject *(*from)(const input *, int), int legacy)
{
    if (check_ready() < 0)
        return NULL;
    input in;
    if (input_get(data, &in) < 0)
        return NULL;
    PyObject *r = from(&in, legacy);
    input_release(&in);
    return r;
}

/* The bytes [at, at + min(len, cap)), cut at the record's end. */
static PyObject *head_bytes(const input *in, size_t at, size_t len, size_t cap)
{
    if (len > cap)
        len = cap;
    if ((Py_ssize_t)at >= in->n)
        return Py_NewRef(empty_bytes);
    if (len > (size_t)in->n - at)
        len = (size_t)in->n - at;
    return PyBytes_FromStringAndSize((const char *)in->p + at, (Py_ssize_t)len);
}

/* A u64 id as OTLP wants it: the 8 big-endian bytes of the kernel's little-endian value; b"" for 0. */
static PyObject *id_bytes(uint64_t v)
{
    if (v == 0)
        return Py_NewRef(empty_bytes);
    uint64_t be = __builtin_bswap64(v);
    return PyBytes_FromStringAndSize((const char *)&be, 8);
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

#define U(x) PyLong_FromUnsignedLongLong((unsigned long long)(x))
#define B(x) Py_NewRef((x) ? Py_True : Py_False)

/* Pids, tids and ports repeat from record to record (a poll's records come from a handful of
 * processes and keep-alive connections): one int object per value seen lately, not one per field
 * of every record (an allocation and a free each, about 100 instructions, and memory the next
 * records' caches then lose). Direct-mapped; ints are immutable, so sharing one is safe. */
#define REPEAT_SLOTS 256
static PyObject *repeat_ints[REPEAT_SLOTS];
static uint32_t repeat_keys[REPEAT_SLOTS];

static PyObject *R(uint32_t v)
{
    if (v <= 256)
        return PyLong_FromUnsignedLong(v); /* CPython's own small-int singletons */
    const size_t i = (v ^ (v >> 8) ^ (v >> 16)) & (REPEAT_SLOTS - 1);
    if (repeat_ints[i] != NULL && repeat_keys[i] == v)
        return Py_NewRef(repeat_ints[i]);
    PyObject *o = PyLong_FromUnsignedLong(v);
    if (o == NULL)
        return NULL;
    Py_XSETREF(repeat_ints[i], Py_NewRef(o));
    repeat_keys[i] = v;
    return o;
}

/* ------------------------------------------------------------------------------------------ */

static PyObject *py_record_type(PyObject *Py_UNUSED(m), PyObject *data)
{
    input in;
    if (input_get(data, &in) < 0)
        return NULL;
    uint32_t t = 0;
    if (in.n >= 4)
        memcpy(&t, in.p, 4);
    input_release(&in);
    return PyLong_FromUnsignedLong(t);
}

static PyObject *exchange_from(const input *in, int legacy)
{
    Py_ssize_t n = in->n;
    if (legacy < 0)
        legacy = n < (Py_ssize_t)EXCHANGE_SIZE && n == (Py_ssize_t)LEGACY_SIZE;
    struct kspan_exchange h;
    size_t shift;
    if (legacy) {
        if (n < (Py_ssize_t)LEGACY_SIZE)
            return PyErr_Format(PyExc_ValueError, "exchange record is %zd bytes, expected %zu", n, LEGACY_SIZE);
        memcpy(&h, in->p, IDS_AT);
        memset((char *)&h + IDS_AT, 0, IDS_LEN);
        shift = IDS_LEN;
    } else {
        if (n < (Py_ssize_t)EXCHANGE_SIZE)
            return PyErr_Format(PyExc_ValueError, "exchange record is %zd bytes, expected %zu", n, EXCHANGE_SIZE);
        memcpy(&h, in->p, REQ_AT);
        shift = 0;
    }
    if (h.type != KSPAN_REC_EXCHANGE)
        return PyErr_Format(PyExc_ValueError, "record type %u is not an exchange", (unsigned)h.type);
    /* checked in this order, so the value named is the one the Python decoder named */
    const uint8_t order[4] = {h.parent_kind, h.role, h.end_reason, h.source};
    PyObject **const tables[4] = {parent_kinds, roles, ends, sources};
    for (int i = 0; i < 4; i++)
        if (tables[i][order[i]] == NULL)
            return PyErr_Format(PyExc_ValueError, "exchange record has an unknown enum value %u", (unsigned)order[i]);
    /* A record that claims kernel ids but carries a zero trace or span id is taken as one without. */
    int kernel_ids = !legacy && (h.flags & KSPAN_FLAG_IDS) && h.span_id != 0 && !all_zero(h.trace_id, 16);
    unsigned family = 0, local_port = 0, remote_port = 0;
    PyObject *local, *remote;
    if (h.flags & KSPAN_FLAG_TUPLE_KNOWN) {
        family = h.family, local_port = h.local_port, remote_port = h.remote_port;
        local = addr_text(h.family, h.local_addr);
        if (local == NULL)
            return NULL;
        remote = addr_text(h.family, h.remote_addr);
        if (remote == NULL) {
            Py_DECREF(local);
            return NULL;
        }
    } else {
        local = Py_NewRef(empty_str);
        remote = Py_NewRef(empty_str);
    }
    PyObject *parent;
    if (h.parent_kind) {
        PyObject *idv[2] = {U(h.parent_conn_id), U(h.parent_req_start_ns)};
        PyObject *hintv[3] = {
            Py_NewRef(parent_kinds[h.parent_kind]), R(h.parent_pid), build_slotted(&exchange_id_cls, idv),
        };
        parent = build_slotted(&parent_hint_cls, hintv);
    } else {
        parent = Py_NewRef(Py_None);
    }
    PyObject *v[N_EXCHANGE] = {
        R(h.pid), R(h.tid), Py_NewRef(roles[h.role]), Py_NewRef(ends[h.end_reason]), Py_NewRef(sources[h.source]),
        B(h.flags & KSPAN_FLAG_TLS), U(h.conn_id), U(family), local, R(local_port), remote, R(remote_port),
        U(h.req_start_ns), U(h.req_end_ns), U(h.resp_start_ns), U(h.resp_end_ns), U(h.req_bytes), U(h.resp_bytes),
        U(h.status), parent,
        /* the heads are raw buffers with a length, not NUL-terminated strings */
        head_bytes(in, REQ_AT - shift, h.req_head_len, KSPAN_REQ_HEAD),
        head_bytes(in, RESP_AT - shift, h.resp_head_len, KSPAN_RESP_HEAD),
        head_bytes(in, TAIL_AT - shift, h.resp_tail_len, KSPAN_TAIL),
        B(h.flags & KSPAN_FLAG_REQ_HEAD_FULL), B(h.flags & KSPAN_FLAG_RESP_HEAD_FULL), B(h.flags & KSPAN_FLAG_INTERIM),
        B(h.flags & KSPAN_FLAG_AMBIGUOUS),
        kernel_ids ? PyBytes_FromStringAndSize((const char *)h.trace_id, 16) : Py_NewRef(empty_bytes),
        kernel_ids ? id_bytes(h.span_id) : Py_NewRef(empty_bytes),
        kernel_ids ? id_bytes(h.parent_span_id) : Py_NewRef(empty_bytes),
        /* without kernel ids the kernel made no decision: the correlator mirrors the sampler */
        B(kernel_ids ? (h.flags & KSPAN_FLAG_SAMPLED) : 1), B(kernel_ids), B(h.flags & KSPAN_FLAG_REMOTE_PARENT),
    };
    return build_slotted(&exchange_cls, v);
}

static PyObject *py_decode_exchange(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *legacy_arg = nargs == 2 ? args[1] : Py_None;
    if (nargs < 1 || nargs + nkw > 2 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "legacy") != 0)) {
        PyErr_SetString(PyExc_TypeError, "decode_exchange(data, legacy=None)");
        return NULL;
    }
    if (nkw == 1)
        legacy_arg = args[1];
    int legacy = -1;
    if (legacy_arg != Py_None && (legacy = PyObject_IsTrue(legacy_arg)) < 0)
        return NULL;
    return decode(args[0], exchange_from, legacy);
}

static PyObject *metric_from(const input *in, int Py_UNUSED(legacy))
{
    if (in->n < (Py_ssize_t)REQ_AT)
        return PyErr_Format(PyExc_ValueError, "metric record is %zd bytes, expected at least %zu", in->n, REQ_AT);
    struct kspan_exchange h;
    memcpy(&h, in->p, REQ_AT);
    if (h.type != KSPAN_REC_METRIC)
        return PyErr_Format(PyExc_ValueError, "record type %u is not a metric record", (unsigned)h.type);
    if (roles[h.role] == NULL)
        return PyErr_Format(PyExc_ValueError, "metric record has an unknown role %u", (unsigned)h.role);
    int known = h.flags & KSPAN_FLAG_TUPLE_KNOWN, ids = h.flags & KSPAN_FLAG_IDS;
    uint64_t end = h.resp_end_ns;
    if (h.resp_start_ns > end)
        end = h.resp_start_ns;
    if (h.req_end_ns > end)
        end = h.req_end_ns;
    if (h.req_start_ns > end)
        end = h.req_start_ns;
    PyObject *t = PyTuple_New(N_METRIC);
    if (t == NULL)
        return NULL;
    PyObject *v[N_METRIC] = {
        R(h.pid), U(h.role), U(h.end_reason), B(h.flags & KSPAN_FLAG_TLS), U(h.status), B(h.resp_start_ns != 0),
        U(h.req_start_ns), U(end), U(known ? h.family : 0),
        /* raw until a metric needs the text */
        PyBytes_FromStringAndSize((const char *)h.local_addr, 16), R(known ? h.local_port : 0),
        PyBytes_FromStringAndSize((const char *)h.remote_addr, 16), R(known ? h.remote_port : 0),
        U(h.parent_kind), R(h.parent_pid),
        /* without kernel ids unknown: the service graph then pairs nothing */
        ids ? id_bytes(h.span_id) : Py_NewRef(empty_bytes), ids ? id_bytes(h.parent_span_id) : Py_NewRef(empty_bytes),
        head_bytes(in, REQ_AT, h.req_head_len, KSPAN_METRIC_HEAD),
    };
    int failed = 0;
    for (Py_ssize_t i = 0; i < N_METRIC; i++) {
        failed |= v[i] == NULL;
        PyTuple_SET_ITEM(t, i, v[i]);
    }
    if (failed) {
        Py_DECREF(t);
        return NULL;
    }
    /* tuple.__new__(MetricExchange, t): a NamedTuple's own __new__ takes the fields one by one */
    PyObject *args = PyTuple_Pack(1, t);
    Py_DECREF(t);
    if (args == NULL)
        return NULL;
    PyObject *r = PyTuple_Type.tp_new(metric_cls, args, NULL);
    Py_DECREF(args);
    return r;
}

static PyObject *py_decode_metric(PyObject *Py_UNUSED(m), PyObject *data)
{
    return decode(data, metric_from, -1);
}

/* ------------------------------------------------------------------------------------------ */
/* Segments. */

static PyObject *segment_obj(const struct kspan_segment *h, uint64_t length, PyObject *data, uint32_t pos)
{
    PyObject *v[N_SEGMENT] = {
        U(h->conn_id), U(h->pid), U(h->tid), B(h->dir == 1), U(h->start_ns), U(h->end_ns), U(length), data, U(pos),
    };
    return build_slotted(&segment_cls, v);
}

typedef struct {
    uint32_t off;
    size_t at, copied; /* the entry's bytes in the body, cut at the body's end */
    uint64_t length;   /* of the transfer, up to the next entry */
} h2_entry;

/* An HTTP/2 transfer the kernel walked frame by frame (bpf/http_exchange.h, kspan_h2_frames): its
 * entries as frame-aligned sub-transfers, each covering the transfer up to the next entry, so a
 * decoder steps over the DATA payloads the kernel did not copy as it steps over any gap. Bytes
 * before the first entry (the rest of a DATA frame) are a piece with no data, unless they are not
 * HTTP/2 at all (SEG_H2_TAIL: the head of the 101 that switched the connection). Sets *whole to
 * seg.data's meaning, the transfer's first bytes: the pieces copied whole from its start (none
 * when the first piece starts past a 101's head). */
static PyObject *h2_pieces(const struct kspan_segment *h, const uint8_t *body, size_t blen, uint32_t pos,
                           PyObject **whole)
{
    *whole = NULL;
    /* e[0] is kept for the piece before the first entry; every entry takes H2_ENTRY bytes at least */
    h2_entry *e = PyMem_Malloc((blen / H2_ENTRY + 2) * sizeof *e);
    if (e == NULL)
        return PyErr_NoMemory();
    size_t i = 0, k = 1;
    while (i + H2_ENTRY <= blen) {
        uint32_t off;
        uint16_t copied;
        memcpy(&off, body + i, 4);
        memcpy(&copied, body + i + 4, 2);
        i += H2_ENTRY;
        if (off > h->len || (k > 1 && off < e[k - 1].off))
            break; /* malformed: the rest is a gap the decoder counts */
        e[k].off = off;
        e[k].at = i;
        e[k].copied = copied < blen - i ? copied : blen - i;
        i += copied;
        k++;
    }
    size_t first = 1;
    if ((k == 1 || e[1].off > 0) && !(h->seg_flags & KSPAN_SEG_H2_TAIL)) {
        e[0].off = 0, e[0].at = 0, e[0].copied = 0; /* the rest of a frame the previous transfer began */
        first = 0;
    }
    Py_ssize_t kept = 0;
    for (size_t j = first; j < k; j++) {
        e[j].length = (j + 1 < k ? e[j + 1].off : h->len) - e[j].off;
        if (e[j].copied > e[j].length)
            e[j].copied = (size_t)e[j].length;
        kept += e[j].length != 0;
    }
    PyObject *pieces = PyTuple_New(kept);
    if (pieces == NULL) {
        PyMem_Free(e);
        return NULL;
    }
    size_t whole_len = 0, whole_from = 0, whole_to = 0;
    int whole_open = 0;
    Py_ssize_t p = 0;
    for (size_t j = first; j < k; j++) {
        if (e[j].length == 0)
            continue;
        uint32_t piece_pos = pos + e[j].off; /* modulo 2**32, as TCP sequence numbers are */
        if (p == 0 && piece_pos == pos) {
            whole_open = 1;
            whole_from = j;
        }
        if (whole_open) {
            whole_len += e[j].copied;
            whole_to = j + 1;
            whole_open = e[j].copied == e[j].length;
        }
        PyObject *data = PyBytes_FromStringAndSize((const char *)body + e[j].at, (Py_ssize_t)e[j].copied);
        PyObject *piece = segment_obj(h, e[j].length, data, piece_pos);
        if (piece == NULL) {
            Py_DECREF(pieces);
            PyMem_Free(e);
            return NULL;
        }
        PyTuple_SET_ITEM(pieces, p++, piece);
    }
    *whole = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)whole_len);
    if (*whole != NULL) {
        char *w = PyBytes_AS_STRING(*whole);
        for (size_t j = whole_from; j < whole_to; j++) {
            if (e[j].length == 0)
                continue;
            memcpy(w, body + e[j].at, e[j].copied);
            w += e[j].copied;
        }
    }
    PyMem_Free(e);
    if (*whole == NULL) {
        Py_DECREF(pieces);
        return NULL;
    }
    return pieces;
}

static PyObject *segment_from(const input *in, int Py_UNUSED(legacy))
{
    Py_ssize_t n = in->n;
    if (n < (Py_ssize_t)SEGMENT_HEADER_V1)
        return PyErr_Format(PyExc_ValueError, "segment record is %zd bytes, expected at least %zu", n,
                            SEGMENT_HEADER);
    struct kspan_segment h;
    uint16_t data_len;
    memcpy(&data_len, in->p + offsetof(struct kspan_segment, data_len), 2);
    size_t head;
    /* a ring record is exactly its header plus data_len bytes: that tells the older header apart */
    if (n == (Py_ssize_t)SEGMENT_HEADER_V1 + data_len) {
        head = SEGMENT_HEADER_V1;
        memcpy(&h, in->p, head);
        memset((char *)&h + head, 0, SEGMENT_HEADER - head);
    } else {
        head = SEGMENT_HEADER;
        if (n < (Py_ssize_t)head)
            return PyErr_Format(PyExc_ValueError, "segment record is %zd bytes, expected at least %zu", n,
                                SEGMENT_HEADER);
        memcpy(&h, in->p, head);
    }
    if (h.type != KSPAN_REC_SEGMENT)
        return PyErr_Format(PyExc_ValueError, "record type %u is not a segment", (unsigned)h.type);
    const uint8_t *body = in->p + head;
    size_t blen = (size_t)n - head;
    if (h.data_len < blen)
        blen = h.data_len;
    int known = h.flags & KSPAN_FLAG_TUPLE_KNOWN;
    uint16_t family = known ? h.family : 0;
    int has_trace = !all_zero(h.trace_id, 16);
    int client_write = h.role == KSPAN_ROLE_CLIENT && h.dir == 1;
    int peer = (h.seg_flags & KSPAN_SEG_PEER) && h.role == KSPAN_ROLE_SERVER && has_trace;
    int seq_known = h.seg_flags & KSPAN_SEG_SEQ;
    uint32_t pos = seq_known ? h.tcp_seq : 0;
    PyObject *local = addr_text(family, h.local_addr);
    if (local == NULL)
        return NULL;
    PyObject *remote = addr_text(family, h.remote_addr);
    if (remote == NULL) {
        Py_DECREF(local);
        return NULL;
    }
    PyObject *data, *pieces;
    if (h.seg_flags & KSPAN_SEG_H2_FRAMES) {
        pieces = h2_pieces(&h, body, blen, pos, &data);
    } else {
        pieces = Py_NewRef(empty_tuple);
        data = PyBytes_FromStringAndSize((const char *)body, (Py_ssize_t)blen);
    }
    PyObject *v[N_SEGMENT_RECORD] = {
        segment_obj(&h, h.len, data, pos), U(h.proto), B(h.role == KSPAN_ROLE_CLIENT),
        B(h.seg_flags & KSPAN_SEG_CLOSED), U(h.seq), B(h.seg_flags & KSPAN_SEG_START), B(h.flags & KSPAN_FLAG_TLS),
        U(family), local, R(known ? h.local_port : 0), remote, R(known ? h.remote_port : 0),
        U(client_write ? h.parent_kind : 0),
        (client_write || peer) && has_trace ? PyBytes_FromStringAndSize((const char *)h.trace_id, 16)
                                            : Py_NewRef(empty_bytes),
        client_write ? id_bytes(h.parent_span_id) : Py_NewRef(empty_bytes),
        B(client_write || peer ? (h.flags & KSPAN_FLAG_SAMPLED) : 1), B(h.flags & KSPAN_FLAG_AMBIGUOUS),
        B(seq_known && known), B(peer && known), U(peer ? h.ctx_seq : 0), U(peer ? h.ctx_end : 0), pieces,
    };
    return build_slotted(&segment_record_cls, v);
}

static PyObject *py_decode_segment(PyObject *Py_UNUSED(m), PyObject *data)
{
    return decode(data, segment_from, -1);
}

/* ------------------------------------------------------------------------------------------ */
/* A poll's records, decoded where they lie: straight from the ring buffer's mapping (drain) or
 * from bytes (decode_batch: the agent's timeout sweep, recordings). Either way the output is what
 * tracer/agent.py's RecordDispatch feeds, in stream order: a list per run of consecutive exchange
 * records (one Correlator.feed_batch call) and one per run of consecutive metric records (one
 * Correlator.metric_batch call: a call per unsampled record cost more than the record's own
 * path), a SegmentRecord per record (metric and segment records share state with the span path,
 * so every run and record keeps its place), and the raw bytes of proc and tcp records (the
 * agent's exec/exit hooks; the network metrics). A record that does not decode (short, foreign,
 * an unknown type) is counted, never appended. */

typedef struct {
    PyObject *out;  /* list */
    PyObject *run;  /* borrowed: the open run (out's last item), of exchanges or metric records */
    uint32_t run_type; /* KSPAN_REC_EXCHANGE or KSPAN_REC_METRIC: what run holds */
    Py_ssize_t undecodable;
} sink;

/* ValueError (the decoders' verdict on a bad record): counted. Anything else propagates. */
static int sink_bad(sink *s)
{
    if (!PyErr_ExceptionMatches(PyExc_ValueError))
        return -1;
    PyErr_Clear();
    s->undecodable++;
    return 0;
}

/* One record of n bytes at p; raw: the same bytes as an object when the caller has one. */
static int sink_record(sink *s, const uint8_t *p, Py_ssize_t n, PyObject *raw)
{
    uint32_t t = 0;
    if (n >= 4)
        memcpy(&t, p, 4);
    const input in = {.p = p, .n = n, .viewed = 0};
    PyObject *o;
    switch (t) {
    case KSPAN_REC_EXCHANGE:
    case KSPAN_REC_METRIC:
        o = t == KSPAN_REC_EXCHANGE ? exchange_from(&in, -1) : metric_from(&in, -1);
        if (o == NULL)
            return sink_bad(s);
        if (s->run == NULL || s->run_type != t) {
            PyObject *run = PyList_New(0);
            if (run == NULL || PyList_Append(s->out, run) < 0) {
                Py_XDECREF(run);
                Py_DECREF(o);
                return -1;
            }
            Py_DECREF(run); /* out holds it */
            s->run = run;
            s->run_type = t;
        }
        int r = PyList_Append(s->run, o);
        Py_DECREF(o);
        return r;
    case KSPAN_REC_SEGMENT:
        o = segment_from(&in, -1);
        break;
    case KSPAN_REC_PROC:
    case KSPAN_REC_TCP:
        o = raw != NULL ? Py_NewRef(raw) : PyBytes_FromStringAndSize((const char *)p, n);
        if (o == NULL)
            return -1;
        break;
    default:
        s->undecodable++; /* another version's record, or shorter than its type */
        return 0;
    }
    if (o == NULL)
        return sink_bad(s);
    s->run = NULL;
    int r = PyList_Append(s->out, o);
    Py_DECREF(o);
    return r;
}

static PyObject *py_decode_batch(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "decode_batch(records, out: list)");
        return NULL;
    }
    if (check_ready() < 0)
        return NULL;
    PyObject *it = PyObject_GetIter(args[0]);
    if (it == NULL)
        return NULL;
    sink s = {.out = args[1], .run = NULL, .run_type = 0, .undecodable = 0};
    PyObject *rec;
    while ((rec = PyIter_Next(it)) != NULL) {
        input in;
        int r = input_get(rec, &in);
        if (r == 0) {
            r = sink_record(&s, in.p, in.n, PyBytes_CheckExact(rec) ? rec : NULL);
            input_release(&in);
        }
        Py_DECREF(rec);
        if (r < 0)
            break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(s.undecodable);
}

/* The ring (kernel/bpf/ringbuf.c, stable since 5.8; tracer/ringbuf.py maps it): the consumer
 * position is ours, the producer position and each record's header the kernel's. Each record
 * starts with a u32 length carrying BUSY (reserved, not yet committed: stop there, the records
 * behind it are not ours yet, even if committed) and DISCARD (skip it), and a u32 page offset;
 * records are 8-byte aligned. The data area is mapped twice in a row, so a record that wraps
 * around the end reads as one run of bytes. The kernel publishes the producer position and a
 * committed length with release stores: read them with acquire loads, so the record's bytes read
 * after them are the committed ones. Writing the consumer position (a release store, as libbpf's
 * ring_buffer__consume) hands the space back. */
#define RB_BUSY (1U << 31)
#define RB_DISCARD (1U << 30)
#define RB_HEADER 8
/* Records consumed between write-backs of the consumer position while draining: the kernel gets
 * its space back during a long drain, not only at the end. */
#define RB_GIVE_BACK 256

/* The ring's two mappings as buffers (the consumer page writable: drain() gives space back),
 * checked against the ring they should hold (size: a power of two, after a page of at least 8
 * bytes): 0, or -1 with an exception and nothing held. */
static int ring_views(PyObject *const *args, Py_ssize_t page, Py_ssize_t size, Py_buffer *cv, Py_buffer *pv)
{
    if (size < RB_HEADER || (size & (size - 1)) != 0 || page < 8 || page % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "ring buffer of %zd bytes after a %zd-byte page: not a power of two", size,
                     page);
        return -1;
    }
    if (PyObject_GetBuffer(args[0], cv, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(args[1], pv, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(cv);
        return -1;
    }
    if (cv->len < 8 || pv->len < page + 2 * size || ((uintptr_t)cv->buf | (uintptr_t)pv->buf) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "drain: the mappings are smaller than the ring they should hold");
        PyBuffer_Release(pv);
        PyBuffer_Release(cv);
        return -1;
    }
    return 0;
}

/* The committed record at pos: its header word (BUSY: not yet committed, stop) and the step to
 * the next one; 0 when its length cannot be (larger than the ring or past the producer). */
static inline uint64_t ring_step(const uint8_t *data, uint64_t mask, uint64_t size, uint64_t pos, uint64_t prod,
                                 uint32_t *len)
{
    *len = __atomic_load_n((const uint32_t *)(data + (pos & mask)), __ATOMIC_ACQUIRE);
    if (*len & RB_BUSY)
        return 0;
    const uint32_t rlen = *len & ~(RB_BUSY | RB_DISCARD);
    const uint64_t step = ((uint64_t)rlen + RB_HEADER + 7) & ~(uint64_t)7;
    return step > size || step > prod - pos ? 0 : step;
}

static PyObject *py_drain(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t page, size, limit;
    int decode;
    if (nargs != 7 || !PyList_Check(args[5]) || (page = PyLong_AsSsize_t(args[2])) < 0 ||
        (size = PyLong_AsSsize_t(args[3])) < 0 || (limit = PyLong_AsSsize_t(args[4])) < 0 ||
        (decode = PyObject_IsTrue(args[6])) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "drain(consumer, producer, page, size, limit, out: list, decode)");
        return NULL;
    }
    if (decode && check_ready() < 0)
        return NULL;
    Py_buffer cv, pv;
    if (ring_views(args, page, size, &cv, &pv) < 0)
        return NULL;
    PyObject *result = NULL;
    uint64_t *consumer = cv.buf;
    const uint64_t *producer = pv.buf;
    const uint8_t *data = (const uint8_t *)pv.buf + page;
    const uint64_t mask = (uint64_t)size - 1;
    uint64_t cons = __atomic_load_n(consumer, __ATOMIC_RELAXED); /* only we write it */
    const uint64_t prod = __atomic_load_n(producer, __ATOMIC_ACQUIRE);
    sink s = {.out = args[5], .run = NULL, .run_type = 0, .undecodable = 0};
    Py_ssize_t n = 0, consumed = 0;
    int failed = 0;
    while (cons < prod && n < limit) {
        const uint64_t off = cons & mask;
        uint32_t len;
        const uint64_t step = ring_step(data, mask, (uint64_t)size, cons, prod, &len);
        const uint32_t rlen = len & ~(RB_BUSY | RB_DISCARD);
        if (len & RB_BUSY)
            break;
        if (step == 0) {
            /* the kernel never commits a record larger than its ring or past its own position */
            PyErr_Format(PyExc_ValueError, "ring buffer record at %llu claims %u bytes: the ring is corrupt",
                         (unsigned long long)cons, (unsigned)rlen);
            failed = 1;
            break;
        }
        if (!(len & RB_DISCARD)) {
            const uint8_t *p = data + off + RB_HEADER;
            if (decode) {
                failed = sink_record(&s, p, rlen, NULL) < 0;
            } else {
                PyObject *b = PyBytes_FromStringAndSize((const char *)p, rlen);
                failed = b == NULL || PyList_Append(s.out, b) < 0;
                Py_XDECREF(b);
            }
            if (failed)
                break; /* the record stays in the ring: the next drain reads it again */
            n++;
        }
        cons += step;
        if (++consumed % RB_GIVE_BACK == 0)
            __atomic_store_n(consumer, cons, __ATOMIC_RELEASE);
    }
    __atomic_store_n(consumer, cons, __ATOMIC_RELEASE);
    if (!failed)
        result = Py_BuildValue("(nn)", n, s.undecodable);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&cv);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* The module. LAYOUT and CONSTANTS are bpf/kspan.h as this module was compiled against it:
 * tracer/records.py checks its ctypes mirrors against them at import. */

#define FIELD(S, f) {#f, offsetof(struct S, f), sizeof(((struct S *)0)->f)}
typedef struct {
    const char *name;
    size_t offset, size;
} field;

#define EX(f) FIELD(kspan_exchange, f)
#define SEG(f) FIELD(kspan_segment, f)
static const field EXCHANGE_LAYOUT[] = {
    EX(type), EX(pid), EX(tid), EX(role), EX(end_reason), EX(source), EX(parent_kind), EX(flags), EX(family),
    EX(local_port), EX(remote_port), EX(status), EX(local_addr), EX(remote_addr), EX(_pad0), EX(conn_id),
    EX(req_start_ns), EX(req_end_ns), EX(resp_start_ns), EX(resp_end_ns), EX(req_bytes), EX(resp_bytes),
    EX(parent_conn_id), EX(parent_req_start_ns), EX(parent_pid), EX(req_head_len), EX(resp_head_len),
    EX(resp_tail_len), EX(_pad), EX(trace_id), EX(span_id), EX(parent_span_id), EX(req_head), EX(resp_head),
    EX(resp_tail), {NULL, 0, 0},
};
static const field SEGMENT_LAYOUT[] = {
    SEG(type), SEG(pid), SEG(tid), SEG(dir), SEG(proto), SEG(role), SEG(parent_kind), SEG(flags), SEG(family),
    SEG(local_port), SEG(remote_port), SEG(data_len), SEG(local_addr), SEG(remote_addr), SEG(seg_flags),
    SEG(tcp_seq), SEG(conn_id), SEG(start_ns), SEG(end_ns), SEG(len), SEG(seq), SEG(trace_id),
    SEG(parent_span_id), SEG(ctx_seq), SEG(ctx_end), SEG(data), {NULL, 0, 0},
};

static const struct {
    const char *name;
    long value;
} CONSTANTS[] = {
    {"REQ_HEAD", KSPAN_REQ_HEAD},
    {"RESP_HEAD", KSPAN_RESP_HEAD},
    {"TAIL", KSPAN_TAIL},
    {"METRIC_HEAD", KSPAN_METRIC_HEAD},
    {"REC_EXCHANGE", KSPAN_REC_EXCHANGE},
    {"REC_PROC", KSPAN_REC_PROC},
    {"REC_TCP", KSPAN_REC_TCP},
    {"REC_METRIC", KSPAN_REC_METRIC},
    {"REC_SEGMENT", KSPAN_REC_SEGMENT},
    {"FLAG_TLS", KSPAN_FLAG_TLS},
    {"FLAG_REQ_HEAD_FULL", KSPAN_FLAG_REQ_HEAD_FULL},
    {"FLAG_RESP_HEAD_FULL", KSPAN_FLAG_RESP_HEAD_FULL},
    {"FLAG_TUPLE_KNOWN", KSPAN_FLAG_TUPLE_KNOWN},
    {"FLAG_INTERIM", KSPAN_FLAG_INTERIM},
    {"FLAG_AMBIGUOUS", KSPAN_FLAG_AMBIGUOUS},
    {"FLAG_SAMPLED", KSPAN_FLAG_SAMPLED},
    {"FLAG_IDS", KSPAN_FLAG_IDS},
    {"FLAG_REMOTE_PARENT", KSPAN_FLAG_REMOTE_PARENT},
    {"SEG_CLOSED", KSPAN_SEG_CLOSED},
    {"SEG_START", KSPAN_SEG_START},
    {"SEG_SEQ", KSPAN_SEG_SEQ},
    {"SEG_PEER", KSPAN_SEG_PEER},
    {"SEG_H2_FRAMES", KSPAN_SEG_H2_FRAMES},
    {"SEG_H2_TAIL", KSPAN_SEG_H2_TAIL},
    {NULL, 0},
};

static PyObject *layout_dict(const field *f, size_t size)
{
    PyObject *fields = PyDict_New();
    if (fields == NULL)
        return NULL;
    for (; f->name != NULL; f++) {
        PyObject *v = Py_BuildValue("(nn)", (Py_ssize_t)f->offset, (Py_ssize_t)f->size);
        if (v == NULL || PyDict_SetItemString(fields, f->name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(nN)", (Py_ssize_t)size, fields);
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))py_setup, METH_VARARGS | METH_KEYWORDS,
     "setup(*, exchange, parent_hint, exchange_id, metric, segment, segment_record, roles, ends, sources, "
     "parent_kinds, format_addr): the correlator's classes, enums and address formatting, once."},
    {"record_type", py_record_type, METH_O, "record_type(data) -> the record's type (its first u32), 0 if shorter."},
    {"decode_exchange", (PyCFunction)(void (*)(void))py_decode_exchange, METH_FASTCALL | METH_KEYWORDS,
     "decode_exchange(data, legacy=None) -> Exchange: one struct kspan_exchange. legacy: the layout before "
     "identity fields (recording version 1); None decides by the record's length. Raises ValueError on a "
     "short or foreign record."},
    {"decode_metric", py_decode_metric, METH_O,
     "decode_metric(data) -> MetricExchange: one KSPAN_REC_METRIC record (an unsampled exchange: the fixed "
     "part, the identity and the first METRIC_HEAD bytes of the request head). Raises ValueError on a short "
     "or foreign one."},
    {"decode_segment", py_decode_segment, METH_O,
     "decode_segment(data) -> SegmentRecord: one struct kspan_segment (its header, then data_len bytes). "
     "Raises ValueError on a short or foreign record."},
    {"decode_batch", (PyCFunction)(void (*)(void))py_decode_batch, METH_FASTCALL,
     "decode_batch(records, out) -> undecodable: the records decoded into out in stream order (a list per run "
     "of exchanges and one per run of metric records, a SegmentRecord per record, proc and tcp records as "
     "bytes); returns how "
     "many did not decode (counted, skipped)."},
    {"drain", (PyCFunction)(void (*)(void))py_drain, METH_FASTCALL,
     "drain(consumer, producer, page, size, limit, out, decode) -> (records, undecodable): up to limit "
     "committed records read from a BPF ring buffer's mappings (consumer: its writable first page; producer: "
     "the producer page, then the size-byte data area twice), appended to out decoded as decode_batch does "
     "(decode true) or as bytes; the consumer position is written back."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_records", "The decoding of kspan's kernel records (bpf/kspan.h).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__records(void)
{
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    empty_str = PyUnicode_FromStringAndSize(NULL, 0);
    empty_tuple = PyTuple_New(0);
    PyObject *consts = PyDict_New();
    PyObject *layout = Py_BuildValue("{sNsN}", "kspan_exchange", layout_dict(EXCHANGE_LAYOUT, EXCHANGE_SIZE),
                                     "kspan_segment", layout_dict(SEGMENT_LAYOUT, sizeof(struct kspan_segment)));
    if (empty_bytes == NULL || empty_str == NULL || empty_tuple == NULL || consts == NULL || layout == NULL)
        goto fail;
    for (int i = 0; CONSTANTS[i].name != NULL; i++) {
        PyObject *v = PyLong_FromLong(CONSTANTS[i].value);
        if (v == NULL || PyDict_SetItemString(consts, CONSTANTS[i].name, v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, "CONSTANTS", consts) < 0)
        goto fail;
    consts = NULL;
    if (PyModule_AddObject(m, "LAYOUT", layout) < 0)
        goto fail;
    return m;
fail:
    Py_XDECREF(consts);
    Py_XDECREF(layout);
    Py_DECREF(m);
    return NULL;
}
