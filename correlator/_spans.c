/* correlator/_spans.c: the HTTP/1 spans of exchange records, the correlator's per-record hot path
 * (Correlator.feed and feed_batch are a Feeder's, below).
 *
 * A record whose ids and sampling the kernel fixed goes through here whole (Feeder): the repeat
 * check against the linker's held spans and its Memory of released identities, the head memo (by
 * exact head, and by head shape: the head without its target), span assembly, the traceparent
 * counters and trace_state, the peer pid table, the counters (Counters), and the Memory entry
 * that lets a later record without kernel ids link to it. Records without kernel ids go to
 * correlator.py's Python linking (correlator/linker.py), which shares the Memory and Counters.
 *
 * What a span takes from its request target (derive: url.path, url.query, http.route, url.full,
 * server.address/port from an absolute-form target), and what it takes from the record
 * (assembly: the route cap, addresses, status and error.type, body sizes, the Span itself).
 * This is the one implementation of those rules; the rare branches call back into Python
 * (http1.framing_complete, http1.parse_responses, semconv.redact_query, route templates).
 *
 * CPython costs this avoids: Python attribute reads on Exchange/RequestHead/ResponseHead (the
 * slot offsets are resolved once, at setup, and read in place), and the Span dataclass's Python
 * __init__ (the Span is allocated and its slots filled directly). setup() checks every slot it
 * uses, so a renamed or added field fails at import instead of building a wrong span.
 *
 * Attribute insertion order is part of the output: exporters write attributes in dict order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

/* ---- slots read or written in place ----------------------------------------------------- */

typedef struct {
    const char *name;
    Py_ssize_t off;
} Slot;

enum {
    X_PID, X_ROLE, X_END, X_TLS, X_CONN_ID, X_FAMILY, X_LOCAL_ADDR, X_LOCAL_PORT, X_REMOTE_ADDR,
    X_REMOTE_PORT, X_REQ_START_NS, X_REQ_END_NS, X_RESP_START_NS, X_RESP_END_NS, X_REQ_BYTES, X_RESP_BYTES,
    X_STATUS, X_PARENT, X_REQ_HEAD, X_RESP_HEAD, X_RESP_TAIL, X_RESP_HEAD_TRUNCATED, X_PARENT_AMBIGUOUS,
    X_TRACE_ID, X_SPAN_ID, X_PARENT_SPAN_ID, X_SAMPLED, X_KERNEL_IDS, X_N
};
static Slot ex_slots[X_N] = {
    {"pid"}, {"role"}, {"end"}, {"tls"}, {"conn_id"}, {"family"}, {"local_addr"}, {"local_port"},
    {"remote_addr"}, {"remote_port"}, {"req_start_ns"}, {"req_end_ns"}, {"resp_start_ns"}, {"resp_end_ns"},
    {"req_bytes"}, {"resp_bytes"}, {"status"}, {"parent"}, {"req_head"}, {"resp_head"}, {"resp_tail"},
    {"resp_head_truncated"}, {"parent_ambiguous"}, {"trace_id"}, {"span_id"}, {"parent_span_id"}, {"sampled"},
    {"kernel_ids"},
};

/* correlator.records.ParentHint and ExchangeId, read by the feed path */
enum { H_KIND, H_PID, H_EXCHANGE, H_N };
static Slot hint_slots[H_N] = {{"kind"}, {"pid"}, {"exchange"}};
enum { I_CONN_ID, I_REQ_START_NS, I_N };
static Slot exid_slots[I_N] = {{"conn_id"}, {"req_start_ns"}};

enum { Q_METHOD, Q_TARGET, Q_VERSION, Q_CHUNKED, Q_HEAD_LEN, Q_COMPLETE, Q_N };
static Slot req_slots[Q_N] = {{"method"}, {"target"}, {"version"}, {"chunked"}, {"head_len"}, {"complete"}};

enum { R_STATUS, R_VERSION, R_CONTENT_LENGTH, R_HEAD_END, R_COMPLETE, R_N };
static Slot resp_slots[R_N] = {{"status"}, {"version"}, {"content_length"}, {"head_end"}, {"complete"}};

enum { P_REQS, P_MEMO, P_HEADS, P_TP, P_TP_RAW, P_TRACE_STATE, P_N };
static Slot parsed_slots[P_N] = {{"reqs"}, {"memo"}, {"heads"}, {"tp"}, {"tp_raw"}, {"trace_state"}};

/* Every field of correlator.spans.Span, in declaration order: setup() checks this list against
 * dataclasses.fields(Span), so each span built here has every field set. */
enum {
    S_TRACE_ID, S_SPAN_ID, S_PARENT_SPAN_ID, S_NAME, S_KIND, S_START_NS, S_END_NS, S_PID,
    S_ATTRIBUTES, S_STATUS, S_STATUS_MESSAGE, S_TRACE_STATE, S_PEER_PID, S_SAMPLED, S_N
};
static Slot span_slots[S_N] = {
    {"trace_id"}, {"span_id"}, {"parent_span_id"}, {"name"}, {"kind"}, {"start_ns"}, {"end_ns"},
    {"pid"}, {"attributes"}, {"status"}, {"status_message"}, {"trace_state"}, {"peer_pid"},
    {"sampled"},
};

static int resolve(PyTypeObject *t, Slot *slots, int n) {
    for (int i = 0; i < n; i++) {
        PyObject *d = PyObject_GetAttrString((PyObject *)t, slots[i].name);
        if (d == NULL)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type);
        if (ok) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            ok = m->type == Py_T_OBJECT_EX && !(m->flags & READONLY);
            slots[i].off = m->offset;
        }
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", t->tp_name, slots[i].name);
            return -1;
        }
    }
    return 0;
}

/* Every slot of RequestHead and of correlator._Parsed, copied by retarget(). */
#define MAX_SLOTS 32
static Slot req_all[MAX_SLOTS], parsed_all[MAX_SLOTS];
static int req_all_n, parsed_all_n;
static PyObject *all_names; /* keeps the names req_all and parsed_all point into */

/* names: the class's __slots__, which must be all of its instance layout (no __dict__, no base
 * class slots), so that a copy of each is a copy of the object. */
static int resolve_all(PyTypeObject *t, PyObject *names, Slot *slots, int *n) {
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) > MAX_SLOTS) {
        PyErr_Format(PyExc_TypeError, "%s.__slots__ must be a tuple of at most %d names", t->tp_name, MAX_SLOTS);
        return -1;
    }
    Py_ssize_t k = PyTuple_GET_SIZE(names);
    if (t->tp_dictoffset != 0 || t->tp_basicsize != (Py_ssize_t)(sizeof(PyObject) + k * sizeof(PyObject *))) {
        PyErr_Format(PyExc_TypeError, "%s has state beyond its __slots__", t->tp_name);
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        if ((slots[i].name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, i))) == NULL)
            return -1;
    }
    *n = (int)k;
    return resolve(t, slots, (int)k);
}

#define SLOT_PTR(o, slots, i) ((PyObject **)((char *)(o) + (slots)[i].off))

/* A slot's value (borrowed); NULL with AttributeError when it was never set. */
static PyObject *get_slot(PyObject *o, const Slot *slots, int i) {
    PyObject *v = *(PyObject **)((char *)o + slots[i].off);
    if (v == NULL)
        PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute '%s'", Py_TYPE(o)->tp_name, slots[i].name);
    return v;
}

/* A slot's truth value: 1, 0, or -1 with an error set. */
static int truth_slot(PyObject *o, const Slot *slots, int i) {
    PyObject *v = get_slot(o, slots, i);
    return v == NULL ? -1 : PyObject_IsTrue(v);
}

#define GET(var, o, slots, i)                  \
    do {                                        \
        if (((var) = get_slot((o), (slots), (i))) == NULL) \
            goto fail;                          \
    } while (0)

/* ---- module state (set once by setup) ---------------------------------------------------- */

typedef int (*origin_line_fn)(const char *h, Py_ssize_t n, Py_ssize_t *sp1, Py_ssize_t *sp2);

static struct {
    int ready;
    PyTypeObject *span_t, *ex_t, *req_t, *resp_t, *parsed_t, *hint_t, *exid_t;
    PyObject *kind_server, *kind_client, *unset, *error, *role_server, *role_client, *peer_kind, *closed, *timeout,
        *evicted;
    origin_line_fn origin_line; /* correlator/_red.c's, through its capsule */
    PyObject *aborted_err, *err_incomplete, *status_messages, *overflow_route, *other_method;
    PyObject *source_attr;
    PyObject *framing_complete, *parse_final_response, *parse_responses, *route_template, *redact_query;
} M;

/* Interned once: attribute keys, stats counters, constants. */
static PyObject *k_method, *k_method_original, *k_scheme, *k_path, *k_route, *k_query, *k_server_address,
    *k_server_port, *k_url_full, *k_client_address, *k_peer_address, *k_peer_port, *k_protocol_version,
    *k_status_code, *k_error_type, *k_req_body, *k_resp_body;
static PyObject *c_timeouts, *c_evicted, *c_pipelined_splits, *c_truncated_heads, *c_unparsed_responses,
    *c_responses_incomplete, *c_closed_no_response, *c_no_response;
static PyObject *a_kernel_ids, *s_none;
static PyObject *s_empty, *s_https, *s_http_name, *s_mapped_prefix, *b_empty, *b_head, *b_connect, *i_zero,
    *i_minus_one, *i_80, *i_443, *s_scheme_sep, *s_lbracket, *s_rbracket, *s_colon, *s_qmark, *s_space;

static struct {
    PyObject **p;
    const char *s;
} interned[] = {
    {&k_method, "http.request.method"}, {&k_method_original, "http.request.method_original"},
    {&k_scheme, "url.scheme"}, {&k_path, "url.path"}, {&k_route, "http.route"}, {&k_query, "url.query"},
    {&k_server_address, "server.address"}, {&k_server_port, "server.port"}, {&k_url_full, "url.full"},
    {&k_client_address, "client.address"}, {&k_peer_address, "network.peer.address"},
    {&k_peer_port, "network.peer.port"}, {&k_protocol_version, "network.protocol.version"},
    {&k_status_code, "http.response.status_code"}, {&k_error_type, "error.type"},
    {&k_req_body, "http.request.body.size"}, {&k_resp_body, "http.response.body.size"},
    {&c_timeouts, "timeouts"}, {&c_evicted, "evicted"}, {&c_pipelined_splits, "pipelined_splits"},
    {&c_truncated_heads, "truncated_heads"}, {&c_unparsed_responses, "unparsed_responses"},
    {&c_responses_incomplete, "responses_incomplete"}, {&c_closed_no_response, "closed_no_response"},
    {&c_no_response, "no_response"},
    {&s_empty, ""}, {&s_none, "none"}, {&a_kernel_ids, "kernel_ids"}, {&s_https, "https"}, {&s_http_name, "HTTP"},
    {&s_mapped_prefix, "::ffff:"},
    {&s_scheme_sep, "://"}, {&s_lbracket, "["}, {&s_rbracket, "]"}, {&s_colon, ":"}, {&s_qmark, "?"}, {&s_space, " "},
};

/* ---- small helpers ----------------------------------------------------------------------- */

/* A plain int of one digit (status codes, ports, sizes, small counts): its value read in place,
 * without a call. 1 when o is one (*v set), else 0. */
static inline int compact_long(PyObject *o, long *v) {
    if (!PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o))
        return 0;
    *v = (long)PyUnstable_Long_CompactValue((PyLongObject *)o);
#else
    Py_ssize_t n = Py_SIZE(o);
    if (n < -1 || n > 1)
        return 0;
    *v = (long)n * (long)((PyLongObject *)o)->ob_digit[0];
#endif
    return 1;
}

/* Whether a comparison whose sign is s (-1, 0, 1) satisfies Python's rich comparison op. */
static inline int sign_holds(int s, int op) {
    switch (op) {
    case Py_LT: return s < 0;
    case Py_LE: return s <= 0;
    case Py_EQ: return s == 0;
    case Py_NE: return s != 0;
    case Py_GT: return s > 0;
    default: return s >= 0;
    }
}

/* o <op> c for an int o (any object: the comparison is Python's when o is not a plain int).
 * Inline: op is a constant at every call, and most values are one-digit ints. */
static inline int cmp_long(PyObject *o, long c, int op) {
    long cv;
    if (compact_long(o, &cv)) {
        int s = (cv > c) - (cv < c);
        return sign_holds(s, op);
    }
    if (PyLong_CheckExact(o)) {
        int ov;
        long v = PyLong_AsLongAndOverflow(o, &ov);
        if (v == -1 && PyErr_Occurred())
            return -1;
        int s = ov ? ov : (v > c) - (v < c);
        return sign_holds(s, op);
    }
    PyObject *k = PyLong_FromLong(c);
    if (k == NULL)
        return -1;
    int r = PyObject_RichCompareBool(o, k, op);
    Py_DECREF(k);
    return r;
}

static int eq(PyObject *a, PyObject *b) { return PyObject_RichCompareBool(a, b, Py_EQ); }

/* a == b where b is a member of an IntEnum (Role, EndReason, ParentKind): the decoder hands over
 * members, and two members of one enum are equal only when they are the same one (equal values
 * make an alias, the same object), so no rich comparison is needed then. Anything else compares
 * as Python compares it. */
static inline int eq_member(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (Py_IS_TYPE(a, Py_TYPE(b)))
        return 0;
    return eq(a, b);
}

static int bump(PyObject *stats, PyObject *name, Py_ssize_t by) {
    PyObject *v = PyObject_GetAttr(stats, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromSsize_t(by);
    PyObject *s = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (s == NULL)
        return -1;
    int r = PyObject_SetAttr(stats, name, s);
    Py_DECREF(s);
    return r;
}

static int set_item(PyObject *a, PyObject *k, PyObject *v) { return PyDict_SetItem(a, k, v); }

/* Steals v (which may be NULL after a failed call). */
static int set_new(PyObject *a, PyObject *k, PyObject *v) {
    if (v == NULL)
        return -1;
    int r = PyDict_SetItem(a, k, v);
    Py_DECREF(v);
    return r;
}

static PyObject *need_str(PyObject *o, const char *what) {
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(o)->tp_name);
        return NULL;
    }
    return o;
}

/* The kernel reports an IPv4 peer of a dual-stack socket as ::ffff:a.b.c.d; the semantic
 * conventions want the IPv4 address. New reference. */
static PyObject *unmapped(PyObject *addr) {
    if (need_str(addr, "address") == NULL)
        return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(addr);
    /* An ASCII address (every one the decoder writes) is its bytes: compared in place. */
    int mapped = n >= 7 && (PyUnicode_IS_COMPACT_ASCII(addr) ? memcmp(PyUnicode_DATA(addr), "::ffff:", 7) == 0
                                                           : PyUnicode_Tailmatch(addr, s_mapped_prefix, 0, 7, -1) == 1);
    if (mapped) {
        Py_ssize_t dot = PyUnicode_FindChar(addr, '.', 0, n, 1);
        if (dot == -2)
            return NULL;
        if (dot >= 0)
            return PyUnicode_Substring(addr, 7, n);
    }
    return Py_NewRef(addr);
}

/* The scheme's default port (RFC 9110 4.2). Borrowed. */
static PyObject *default_port(PyObject *scheme) {
    int https = eq(scheme, s_https);
    if (https < 0)
        return NULL;
    return https ? i_443 : i_80;
}

/* The concatenation of n str objects, in one allocation (PyUnicode_FromFormat parses its format
 * at every call: about 3x the cost for the few pieces of a span name or url.full). New ref. */
static PyObject *join_str(PyObject *const *parts, int n) {
    Py_ssize_t len = 0;
    Py_UCS4 maxchar = 127;
    for (int i = 0; i < n; i++) {
        len += PyUnicode_GET_LENGTH(parts[i]);
        Py_UCS4 m = PyUnicode_MAX_CHAR_VALUE(parts[i]);
        if (m > maxchar)
            maxchar = m;
    }
    PyObject *out = PyUnicode_New(len, maxchar);
    if (out == NULL)
        return NULL;
    Py_ssize_t at = 0;
    if (maxchar < 256) { /* every part is one byte a character, as the result: plain copies */
        Py_UCS1 *dst = PyUnicode_1BYTE_DATA(out);
        for (int i = 0; i < n; i++) {
            Py_ssize_t k = PyUnicode_GET_LENGTH(parts[i]);
            memcpy(dst + at, PyUnicode_1BYTE_DATA(parts[i]), (size_t)k);
            at += k;
        }
        return out;
    }
    for (int i = 0; i < n; i++) {
        Py_ssize_t k = PyUnicode_GET_LENGTH(parts[i]);
        if (PyUnicode_CopyCharacters(out, at, parts[i], 0, k) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        at += k;
    }
    return out;
}

/* url.full: scheme://host[:port]path[?query], the port only when it is not the scheme's default,
 * an IPv6 host in brackets (RFC 3986 3.2.2). New reference. */
static PyObject *url_full(PyObject *scheme, PyObject *host, PyObject *port, PyObject *path, PyObject *query) {
    if (need_str(scheme, "scheme") == NULL || need_str(host, "host") == NULL || need_str(path, "path") == NULL)
        return NULL;
    if (query != Py_None && need_str(query, "query") == NULL)
        return NULL;
    Py_ssize_t colon = PyUnicode_FindChar(host, ':', 0, PyUnicode_GET_LENGTH(host), 1);
    if (colon == -2)
        return NULL;
    PyObject *dp = default_port(scheme);
    if (dp == NULL)
        return NULL;
    int other = PyObject_RichCompareBool(port, dp, Py_NE);
    if (other < 0)
        return NULL;
    PyObject *port_s = NULL, *parts[10];
    int n = 0;
    parts[n++] = scheme;
    parts[n++] = s_scheme_sep;
    if (colon >= 0)
        parts[n++] = s_lbracket;
    parts[n++] = host;
    if (colon >= 0)
        parts[n++] = s_rbracket;
    if (other) {
        /* str() of a plain int goes through CPython's general base conversion: a port's digits
         * written here are the same string. */
        long pv;
        if (compact_long(port, &pv) && pv >= 0) {
            char digits[24];
            int at = (int)sizeof digits;
            do {
                digits[--at] = (char)('0' + pv % 10);
                pv /= 10;
            } while (pv);
            port_s = PyUnicode_DecodeASCII(digits + at, (Py_ssize_t)sizeof digits - at, NULL);
        } else
            port_s = PyObject_Str(port);
        if (port_s == NULL)
            return NULL;
        parts[n++] = s_colon;
        parts[n++] = port_s;
    }
    parts[n++] = path;
    if (query != Py_None) {
        parts[n++] = s_qmark;
        parts[n++] = query;
    }
    PyObject *full = join_str(parts, n);
    Py_XDECREF(port_s);
    return full;
}

/* RFC 9112 6.3: responses that end at their head whatever their headers say. */
static int no_body(PyObject *method, PyObject *status) {
    int r;
    if ((r = eq(method, b_head)) != 0)
        return r;
    if ((r = cmp_long(status, 204, Py_EQ)) != 0 || (r = cmp_long(status, 304, Py_EQ)) != 0)
        return r;
    if ((r = cmp_long(status, 100, Py_GE)) < 0)
        return r;
    if (r && (r = cmp_long(status, 200, Py_LT)) != 0)
        return r;
    if ((r = eq(method, b_connect)) <= 0)
        return r;
    if ((r = cmp_long(status, 200, Py_GE)) <= 0)
        return r;
    return cmp_long(status, 300, Py_LT);
}

static PyObject *has_no_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "has_no_body(method, status)");
        return NULL;
    }
    int r = no_body(args[0], args[1]);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* server.address and server.port from a (host, port or None) pair: borrowed host, and *port the
 * port or the scheme's default. NULL on error. */
static PyObject *host_port(PyObject *hostport, PyObject *scheme, PyObject **port) {
    if (!PyTuple_Check(hostport) || PyTuple_GET_SIZE(hostport) != 2) {
        PyErr_SetString(PyExc_TypeError, "hostport must be a (host, port) tuple");
        return NULL;
    }
    *port = PyTuple_GET_ITEM(hostport, 1);
    if (*port == Py_None && (*port = default_port(scheme)) == NULL)
        return NULL;
    return PyTuple_GET_ITEM(hostport, 0);
}

/* *err: the error.type of an exchange the kernel ended this way before its response was complete
 * (borrowed), NULL for an end that is no transport failure. -1 on error. */
static int aborted_err(PyObject *end, PyObject **err) {
    *err = PyDict_GetItemWithError(M.aborted_err, end);
    return *err == NULL && PyErr_Occurred() ? -1 : 0;
}

/* The transport failure of an exchange whose response started: a closed connection is one only
 * when the response is known to be incomplete; a timeout or eviction, unless it is known to be
 * complete (cut is then 0). */
static int cut_short(PyObject *stats, PyObject *end, int incomplete, int cut, PyObject **err) {
    int closed = eq_member(end, M.closed);
    if (closed < 0)
        return -1;
    if (closed) {
        if (!incomplete)
            return 0;
        *err = M.err_incomplete;
        return bump(stats, c_responses_incomplete, 1);
    }
    return cut ? aborted_err(end, err) : 0;
}

/* ---- counters: the correlator's, bumped in place ------------------------------------------ */

/* Every counter of correlator.CorrelatorStats that the record path bumps (the gauges and the
 * counters other objects own are read at stats time). One object per correlator, shared by this
 * module's feed path, correlator.py and correlator/linker.py, so a bump on the per-record path is
 * one add instead of a Python attribute read and write. */
#define COUNTERS(X)                                                                                              \
    X(exchanges) X(spans) X(unparsed_exchanges) X(unparsed_bytes) X(unparsed_responses) X(orphaned_spans)      \
    X(held_dropped) X(truncated_heads) X(pipelined_splits) X(timeouts) X(closed_no_response)                    \
    X(responses_incomplete) X(evicted) X(no_response) X(traceparents) X(traceparents_invalid) X(late_links)      \
    X(duplicate_ids) X(duplicate_exchanges) X(ambiguous_parents) X(self_hints) X(internal_errors)               \
    X(kernel_identified) X(sampled_exchanges) X(unsampled_exchanges)
#define CT_FIELD(f) long long f;
#define CT_MEMBER(f) {#f, T_LONGLONG, offsetof(Counters, f), 0, NULL},
#define CT_NAME(f) #f,

typedef struct {
    PyObject_HEAD
    COUNTERS(CT_FIELD)
} Counters;

static PyMemberDef counters_members[] = {COUNTERS(CT_MEMBER){NULL}};
static const char *counter_names[] = {COUNTERS(CT_NAME) NULL};

static PyTypeObject CountersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "correlator._spans.Counters",
    .tp_basicsize = sizeof(Counters),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counters(): a correlator's record counters (correlator.CorrelatorStats names them), all 0.",
    .tp_members = counters_members,
    .tp_new = PyType_GenericNew,
};

/* ---- identities: (conn_id, req_start_ns) as two u64 --------------------------------------- */

/* An identity as the kernel's two u64 (the id hash masks them the same way, so two identities
 * equal here also have the same span id). -1 with TypeError for a non-int. */
static int key_of(PyObject *conn, PyObject *start, uint64_t *a, uint64_t *b) {
    if (!PyLong_Check(conn) || !PyLong_Check(start)) {
        PyErr_SetString(PyExc_TypeError, "an exchange identity is two ints");
        return -1;
    }
    *a = PyLong_AsUnsignedLongLongMask(conn);
    *b = PyLong_AsUnsignedLongLongMask(start);
    return PyErr_Occurred() ? -1 : 0;
}

static int key_of_tuple(PyObject *key, uint64_t *a, uint64_t *b) {
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "an exchange identity is a (conn_id, req_start_ns) tuple");
        return -1;
    }
    return key_of(PyTuple_GET_ITEM(key, 0), PyTuple_GET_ITEM(key, 1), a, b);
}

static inline uint64_t key_hash(uint64_t a, uint64_t b) {
    /* splitmix64's finaliser over both words: kernel socket addresses share their high bits and
     * request starts their low ones, so neither word alone spreads. */
    uint64_t x = a * 0x9E3779B97F4A7C15ull ^ b;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* An open-addressing table from identity to a 64-bit value: linear probing, at most half full,
 * deletion by backward shift (no tombstones, so a table that turns over forever never degrades). */
typedef struct {
    uint64_t a, b;
    long long v;
    int used;
} TSlot;

typedef struct {
    TSlot *s;
    size_t mask; /* slots - 1; 0 with s NULL before the first insert */
    Py_ssize_t n;
} Table;

static Py_ssize_t t_find(const Table *t, uint64_t a, uint64_t b) {
    if (t->s == NULL)
        return -1;
    for (size_t i = key_hash(a, b) & t->mask;; i = (i + 1) & t->mask) {
        const TSlot *e = &t->s[i];
        if (!e->used)
            return -1;
        if (e->a == a && e->b == b)
            return (Py_ssize_t)i;
    }
}

static int t_grow(Table *t, size_t slots) {
    TSlot *old = t->s, *s = PyMem_Calloc(slots, sizeof(TSlot));
    size_t old_n = old ? t->mask + 1 : 0;
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->s = s;
    t->mask = slots - 1;
    for (size_t j = 0; j < old_n; j++) {
        if (!old[j].used)
            continue;
        size_t i = key_hash(old[j].a, old[j].b) & t->mask;
        while (s[i].used)
            i = (i + 1) & t->mask;
        s[i] = old[j];
    }
    PyMem_Free(old);
    return 0;
}

/* Insert or replace. -1 with MemoryError. */
static int t_set(Table *t, uint64_t a, uint64_t b, long long v) {
    Py_ssize_t at = t_find(t, a, b);
    if (at >= 0) {
        t->s[at].v = v;
        return 0;
    }
    if (t->s == NULL || (size_t)(t->n + 1) * 2 > t->mask + 1) {
        if (t_grow(t, t->s == NULL ? 64 : (t->mask + 1) * 2) < 0)
            return -1;
    }
    size_t i = key_hash(a, b) & t->mask;
    while (t->s[i].used)
        i = (i + 1) & t->mask;
    t->s[i] = (TSlot){a, b, v, 1};
    t->n++;
    return 0;
}

/* Remove; 1 and *v when it was there, 0 when not. */
static int t_pop(Table *t, uint64_t a, uint64_t b, long long *v) {
    Py_ssize_t found = t_find(t, a, b);
    if (found < 0)
        return 0;
    if (v)
        *v = t->s[found].v;
    size_t i = (size_t)found, j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->s[j].used)
            break;
        size_t k = key_hash(t->s[j].a, t->s[j].b) & t->mask;
        /* the entry at j stays unless its home k lies cyclically outside (i, j] */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        t->s[i] = t->s[j];
        i = j;
    }
    t->s[i].used = 0;
    t->n--;
    return 1;
}

static void t_clear(Table *t) {
    if (t->s != NULL)
        memset(t->s, 0, (t->mask + 1) * sizeof(TSlot));
    t->n = 0;
}

static void t_free(Table *t) {
    PyMem_Free(t->s);
    t->s = NULL;
    t->mask = 0;
    t->n = 0;
}

/* ---- the memory of released identities (correlator/linker.py's, and the feed path's) -------- */

/* Each identity released (by the linker, or sent at once with kernel ids) is remembered with its
 * trace id and the span id its children link to, for max_hold of stream time and at most
 * max_entries of them, oldest out first: a child that arrives after its parent still links to it,
 * and a repeat of an identity is recognised. A ring of entries in release order, and an index from
 * identity to ring position (linear probing, at most half full, backward-shift deletion): about 80
 * bytes an identity, no Python object each. */
typedef struct {
    uint64_t a, b, at;
    unsigned char trace[16], link[8];
    unsigned char tlen, llen; /* llen 0: no link (None) */
} MEntry;

/* An index slot: ring position + 1 (0: empty) and the identity's hash, whose low bits are its home
 * slot and which spares reading the ring entry of every other identity on the probe path. */
typedef struct {
    uint32_t pos1, h;
} ISlot;

typedef struct {
    PyObject_HEAD
    MEntry *ring;
    Py_ssize_t cap, head, n, max;
    ISlot *idx;
    size_t imask;
    unsigned long long now; /* stream time: the latest time seen in a record or advance() */
} Memory;

static void mem_dealloc(Memory *self) {
    PyMem_Free(self->ring);
    PyMem_Free(self->idx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int mem_init(Memory *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"max_entries", NULL};
    Py_ssize_t max;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n", kwlist, &max))
        return -1;
    if (max < 1 || max > (Py_ssize_t)1 << 30) {
        PyErr_SetString(PyExc_ValueError, "max_entries must be >= 1 and < 2**30");
        return -1;
    }
    PyMem_Free(self->ring);
    PyMem_Free(self->idx);
    self->ring = NULL;
    self->idx = NULL;
    self->imask = 0;
    self->cap = self->head = self->n = 0;
    self->max = max;
    self->now = 0;
    return 0;
}

static inline MEntry *mem_at(const Memory *m, Py_ssize_t pos) { return &m->ring[pos]; }

/* The index slot of an identity, or -1. */
static Py_ssize_t idx_slot(const Memory *m, uint64_t a, uint64_t b) {
    if (m->idx == NULL)
        return -1;
    uint32_t h = (uint32_t)key_hash(a, b);
    for (size_t i = h & m->imask;; i = (i + 1) & m->imask) {
        const ISlot *s = &m->idx[i];
        if (s->pos1 == 0)
            return -1;
        if (s->h == h) {
            const MEntry *e = mem_at(m, s->pos1 - 1);
            if (e->a == a && e->b == b)
                return (Py_ssize_t)i;
        }
    }
}

static Py_ssize_t mem_find(const Memory *m, uint64_t a, uint64_t b) {
    Py_ssize_t i = idx_slot(m, a, b);
    return i < 0 ? -1 : (Py_ssize_t)m->idx[i].pos1 - 1;
}

static void idx_insert(Memory *m, uint32_t h, Py_ssize_t pos) {
    size_t i = h & m->imask;
    while (m->idx[i].pos1)
        i = (i + 1) & m->imask;
    m->idx[i] = (ISlot){(uint32_t)(pos + 1), h};
}

static void mem_pop_front(Memory *m) {
    MEntry *e = mem_at(m, m->head);
    Py_ssize_t found = idx_slot(m, e->a, e->b);
    if (found >= 0) {
        size_t i = (size_t)found, j = i;
        for (;;) {
            j = (j + 1) & m->imask;
            if (!m->idx[j].pos1)
                break;
            size_t k = m->idx[j].h & m->imask;
            /* the slot at j stays unless its home k lies cyclically outside (i, j] */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
                continue;
            m->idx[i] = m->idx[j];
            i = j;
        }
        m->idx[i].pos1 = 0;
    }
    m->head = (m->head + 1) % m->cap;
    m->n--;
}

/* A bigger ring, the entries moved to its start in order, and the index rebuilt for it. */
static int mem_grow(Memory *m) {
    Py_ssize_t cap = m->cap ? m->cap * 2 : 256;
    if (cap > m->max)
        cap = m->max;
    size_t slots = 64;
    while (slots < (size_t)cap * 2)
        slots *= 2;
    MEntry *ring = PyMem_Malloc((size_t)cap * sizeof(MEntry));
    ISlot *idx = PyMem_Calloc(slots, sizeof(ISlot));
    if (ring == NULL || idx == NULL) {
        PyMem_Free(ring);
        PyMem_Free(idx);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < m->n; j++)
        ring[j] = m->ring[(m->head + j) % m->cap];
    PyMem_Free(m->ring);
    PyMem_Free(m->idx);
    m->ring = ring;
    m->idx = idx;
    m->imask = slots - 1;
    m->cap = cap;
    m->head = 0;
    for (Py_ssize_t j = 0; j < m->n; j++)
        idx_insert(m, (uint32_t)key_hash(ring[j].a, ring[j].b), j);
    return 0;
}

/* Stream time moves to at when it is later (a negative time never is). */
static int mem_touch(Memory *m, PyObject *at) {
    if (!PyLong_Check(at)) {
        PyErr_SetString(PyExc_TypeError, "a time must be an int");
        return -1;
    }
    /* The signed conversion is CPython's fast one (the unsigned one goes through a byte array):
     * only times from 2**63 take the unsigned one. */
    int ov;
    long long s = PyLong_AsLongLongAndOverflow(at, &ov);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (ov < 0 || (!ov && s < 0))
        return 0;
    unsigned long long t = (unsigned long long)s;
    if (ov && (t = PyLong_AsUnsignedLongLong(at)) == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (t > m->now)
        m->now = t;
    return 0;
}

static int copy_id(PyObject *o, unsigned char *dst, unsigned char *len, Py_ssize_t max, const char *what) {
    if (o == Py_None) {
        *len = 0;
        return 0;
    }
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) > max) {
        PyErr_Format(PyExc_ValueError, "%s must be bytes of at most %zd", what, max);
        return -1;
    }
    *len = (unsigned char)PyBytes_GET_SIZE(o);
    memcpy(dst, PyBytes_AS_STRING(o), *len);
    return 0;
}

/* identity -> (trace, link or None), resolved now; an identity already there keeps its place
 * (an insertion-ordered dict's assignment), a new one goes last and the oldest beyond
 * max_entries go. */
static int mem_put(Memory *m, uint64_t a, uint64_t b, PyObject *trace, PyObject *link) {
    MEntry e = {a, b, m->now, {0}, {0}, 0, 0};
    if (copy_id(trace, e.trace, &e.tlen, 16, "a trace id") < 0 ||
        copy_id(link == Py_None || (PyBytes_Check(link) && PyBytes_GET_SIZE(link) == 0) ? Py_None : link, e.link,
                &e.llen, 8, "a span id") < 0)
        return -1;
    Py_ssize_t pos = mem_find(m, a, b);
    if (pos >= 0) {
        *mem_at(m, pos) = e;
        return 0;
    }
    if (m->n == m->max)
        mem_pop_front(m);
    if (m->n == m->cap && mem_grow(m) < 0)
        return -1;
    pos = (m->head + m->n) % m->cap;
    *mem_at(m, pos) = e;
    idx_insert(m, (uint32_t)key_hash(a, b), pos);
    m->n++;
    return 0;
}

static Py_ssize_t mem_len(Memory *self) { return self->n; }

static int mem_contains(Memory *self, PyObject *key) {
    uint64_t a, b;
    if (key_of_tuple(key, &a, &b) < 0)
        return -1;
    return mem_find(self, a, b) >= 0;
}

/* get(key) -> (trace, link or None) | None */
static PyObject *mem_get(Memory *self, PyObject *key) {
    uint64_t a, b;
    if (key_of_tuple(key, &a, &b) < 0)
        return NULL;
    Py_ssize_t pos = mem_find(self, a, b);
    if (pos < 0)
        Py_RETURN_NONE;
    MEntry *e = mem_at(self, pos);
    if (e->llen == 0)
        return Py_BuildValue("(y#O)", (const char *)e->trace, (Py_ssize_t)e->tlen, Py_None);
    return Py_BuildValue("(y#y#)", (const char *)e->trace, (Py_ssize_t)e->tlen, (const char *)e->link,
                         (Py_ssize_t)e->llen);
}

/* put(key, trace, link) */
static PyObject *mem_put_py(Memory *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t a, b;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "put(key, trace, link)");
        return NULL;
    }
    if (key_of_tuple(args[0], &a, &b) < 0 || mem_put(self, a, b, args[1], args[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* expire(deadline): forget the identities resolved at or before deadline (stream time). */
static PyObject *mem_expire(Memory *self, PyObject *deadline) {
    if (!PyLong_Check(deadline)) {
        PyErr_SetString(PyExc_TypeError, "expire(deadline: int)");
        return NULL;
    }
    if (_PyLong_Sign(deadline) < 0)
        Py_RETURN_NONE;
    unsigned long long d = PyLong_AsUnsignedLongLong(deadline);
    if (d == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear(); /* beyond every u64 time: all go */
        d = (unsigned long long)-1;
    }
    while (self->n && mem_at(self, self->head)->at <= d)
        mem_pop_front(self);
    Py_RETURN_NONE;
}

static PyMethodDef mem_methods[] = {
    {"get", (PyCFunction)mem_get, METH_O, "get(key) -> (trace, link or None), or None when not remembered"},
    {"put", (PyCFunction)(void (*)(void))mem_put_py, METH_FASTCALL,
     "put(key, trace, link): remember key resolved now, with its trace and the span id its children link to"},
    {"expire", (PyCFunction)mem_expire, METH_O, "expire(deadline): forget the identities resolved at or before it"},
    {NULL},
};

static PyMemberDef mem_members[] = {
    {"now", T_ULONGLONG, offsetof(Memory, now), 0, "stream time (ns): the latest seen in a record or advance()"},
    {"max_entries", T_PYSSIZET, offsetof(Memory, max), READONLY, "the bound on remembered identities"},
    {NULL},
};

static PySequenceMethods mem_as_sequence = {
    .sq_length = (lenfunc)mem_len,
    .sq_contains = (objobjproc)mem_contains,
};

static PyTypeObject MemoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "correlator._spans.Memory",
    .tp_basicsize = sizeof(Memory),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory(max_entries): released identities, (conn_id, req_start_ns) -> (trace id, child link), "
              "oldest out first.",
    .tp_dealloc = (destructor)mem_dealloc,
    .tp_init = (initproc)mem_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = mem_methods,
    .tp_members = mem_members,
    .tp_as_sequence = &mem_as_sequence,
};

/* ---- the assembler: one per Correlator ---------------------------------------------------- */

enum { QUERY_KEEP, QUERY_REDACT, QUERY_DROP };

/* The assembler's objects, which are also its constructor's keywords (in this order):
 * stats       the correlator's Counters: the rare counters are bumped here
 * offset      monotonic -> wall clock, ns
 * admit       RouteCap.admit
 * span_id     Linker.span_id, for pipelined requests after the first
 * head_part   Correlator._head_part
 * hostport    Correlator._hostport
 * match       RouteTable.match, or None without templates
 * resps       Correlator._resps: response head bytes -> ResponseHead or None */
#define ASM_OBJECTS(X) X(stats) X(offset) X(admit) X(span_id) X(head_part) X(hostport) X(match) X(resps)
#define AS_FIELD(f) PyObject *f;
#define AS_VISIT(f) Py_VISIT(self->f);
#define AS_CLEAR(f) Py_CLEAR(self->f);

typedef struct {
    PyObject_HEAD
    ASM_OBJECTS(AS_FIELD)
    Py_ssize_t memo_size;
    int auto_routes;
    int query;
} Asm;

static int asm_traverse(Asm *self, visitproc visit, void *arg) {
    ASM_OBJECTS(AS_VISIT)
    return 0;
}

static int asm_clear(Asm *self) {
    ASM_OBJECTS(AS_CLEAR)
    return 0;
}

static void asm_dealloc(Asm *self) {
    PyObject_GC_UnTrack(self);
    asm_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define AS_NAME(f) #f,
#define AS_LOCAL(f) PyObject *f;
#define AS_ADDR(f) , &f
#define AS_SET(f) self->f = Py_NewRef(f);

static int asm_init(Asm *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {ASM_OBJECTS(AS_NAME) "auto_routes", "query", "memo_size", NULL};
    ASM_OBJECTS(AS_LOCAL)
    int auto_routes;
    const char *query;
    Py_ssize_t memo_size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOOOOOpsn", kwlist ASM_OBJECTS(AS_ADDR), &auto_routes, &query,
                                     &memo_size))
        return -1;
    if (!PyDict_Check(resps)) {
        PyErr_SetString(PyExc_TypeError, "resps must be a dict");
        return -1;
    }
    if (!M.ready) {
        PyErr_SetString(PyExc_RuntimeError, "correlator._spans.setup() was not called");
        return -1;
    }
    if (strcmp(query, "keep") == 0)
        self->query = QUERY_KEEP;
    else if (strcmp(query, "redact") == 0)
        self->query = QUERY_REDACT;
    else if (strcmp(query, "drop") == 0)
        self->query = QUERY_DROP;
    else {
        PyErr_Format(PyExc_ValueError, "query mode %s", query);
        return -1;
    }
    if (memo_size < 1) {
        PyErr_SetString(PyExc_ValueError, "memo_size must be >= 1");
        return -1;
    }
    asm_clear(self);
    ASM_OBJECTS(AS_SET)
    self->auto_routes = auto_routes;
    self->memo_size = memo_size;
    return 0;
}

/* "path?query" into its path and query (*q NULL when there is no "?"). */
static void split_query(const char *t, Py_ssize_t n, const char **p, Py_ssize_t *pn, const char **q, Py_ssize_t *qn) {
    const char *m = memchr(t, '?', n);
    *p = t;
    *pn = m ? m - t : n;
    if (m) {
        *q = m + 1;
        *qn = n - *pn - 1;
    }
}

/* What a span takes from its request head alone (the head part from Correlator._head_part):
 * (name, request attributes, scheme, path for url.full, query, whether a Host/authority named
 * the server, the heuristic's route or None). New reference. */
static PyObject *derive(Asm *self, PyObject *req, int server, PyObject *head) {
    if (!PyTuple_CheckExact(head) || PyTuple_GET_SIZE(head) != 5) {
        PyErr_SetString(PyExc_TypeError, "head part must be a 5-tuple");
        return NULL;
    }
    PyObject *method = PyTuple_GET_ITEM(head, 0), *original = PyTuple_GET_ITEM(head, 1);
    PyObject *scheme = PyTuple_GET_ITEM(head, 2), *hostport = PyTuple_GET_ITEM(head, 3);
    PyObject *tail = PyTuple_GET_ITEM(head, 4);
    PyObject *target, *rmethod;
    PyObject *authority = NULL, *hp_new = NULL, *path = NULL, *query = NULL, *a = NULL, *route = NULL;
    PyObject *name = NULL, *out = NULL;
    int autor = 0;
    GET(target, req, req_slots, Q_TARGET);
    if (!PyBytes_Check(target)) {
        PyErr_SetString(PyExc_TypeError, "request target must be bytes");
        goto fail;
    }
    const char *t = PyBytes_AS_STRING(target);
    Py_ssize_t tn = PyBytes_GET_SIZE(target);
    if (tn == 0) {
        PyErr_SetString(PyExc_IndexError, "empty request target");
        goto fail;
    }
    /* Request target (RFC 9112 3.2): origin-form "/p?q", absolute-form "http://h/p?q" (proxies),
     * authority-form (CONNECT), asterisk-form (OPTIONS *). */
    const char *pb, *qb = NULL; /* path, query (NULL: none) */
    Py_ssize_t pn, qn = 0;
    if (t[0] == '/') {
        split_query(t, tn, &pb, &pn, &qb, &qn);
    } else {
        GET(rmethod, req, req_slots, Q_METHOD);
        int connect = eq(rmethod, b_connect);
        if (connect < 0)
            goto fail;
        if (connect) {
            authority = Py_NewRef(target);
            pb = "";
            pn = 0;
        } else if (tn == 1 && t[0] == '*') {
            pb = "*";
            pn = 1;
        } else {
            Py_ssize_t at3 = -1;
            for (Py_ssize_t i = 0; i + 3 <= tn; i++)
                if (t[i] == ':' && t[i + 1] == '/' && t[i + 2] == '/') {
                    at3 = i;
                    break;
                }
            Py_ssize_t from = at3 + 3 < tn ? at3 + 3 : tn;
            const char *rest = t + from;
            Py_ssize_t rn = tn - from, s = rn;
            const char *j = memchr(rest, '/', rn);
            if (j && j - rest < s)
                s = j - rest;
            j = memchr(rest, '?', rn);
            if (j && j - rest < s)
                s = j - rest;
            Py_ssize_t au = 0;
            for (Py_ssize_t i = s - 1; i >= 0; i--)
                if (rest[i] == '@') {
                    au = i + 1; /* userinfo is a credential: never exported */
                    break;
                }
            authority = PyBytes_FromStringAndSize(rest + au, s - au);
            if (authority == NULL)
                goto fail;
            split_query(rest + s, rn - s, &pb, &pn, &qb, &qn);
            if (pn == 0) {
                pb = "/";
                pn = 1;
            }
        }
    }
    if (authority != NULL) {
        /* An absolute or authority form names the server; Host does not count then. */
        if (PyBytes_GET_SIZE(authority)) {
            hp_new = PyObject_CallOneArg(self->hostport, authority);
            if (hp_new == NULL)
                goto fail;
        } else
            hp_new = Py_NewRef(Py_None);
        hostport = hp_new;
    }
    if ((path = PyUnicode_DecodeUTF8(pb, pn, "replace")) == NULL)
        goto fail;
    if (qb != NULL && self->query != QUERY_DROP) {
        if ((query = PyUnicode_DecodeUTF8(qb, qn, "replace")) == NULL)
            goto fail;
        if (self->query == QUERY_REDACT) {
            PyObject *r = PyObject_CallOneArg(M.redact_query, query);
            if (r == NULL)
                goto fail;
            Py_SETREF(query, r);
        }
    }
    /* A URL path for url.full: "" for CONNECT (authority only), "*" is not a path either. */
    PyObject *url_path = pn && !(pn == 1 && pb[0] == '*') ? path : s_empty;

    if ((a = PyDict_New()) == NULL || set_item(a, k_method, method) < 0)
        goto fail;
    if (original != Py_None && set_item(a, k_method_original, original) < 0)
        goto fail;
    if (server) {
        if (set_item(a, k_scheme, scheme) < 0)
            goto fail;
        if (pn) {
            if (set_item(a, k_path, path) < 0)
                goto fail;
            if (pb[0] == '/') {
                if (self->match != Py_None) {
                    if ((route = PyObject_CallOneArg(self->match, path)) == NULL)
                        goto fail;
                    if (route == Py_None)
                        Py_CLEAR(route);
                }
                if (route == NULL && self->auto_routes) {
                    if ((route = PyObject_CallOneArg(M.route_template, path)) == NULL)
                        goto fail;
                    if (route == Py_None)
                        Py_CLEAR(route);
                    autor = 1;
                }
                if (route != NULL && set_item(a, k_route, route) < 0)
                    goto fail;
            }
        }
        if (query != NULL && set_item(a, k_query, query) < 0)
            goto fail;
        if (hostport != Py_None) {
            PyObject *port, *host = host_port(hostport, scheme, &port);
            if (host == NULL || set_item(a, k_server_address, host) < 0 || set_item(a, k_server_port, port) < 0)
                goto fail;
        }
    } else if (hostport != Py_None) {
        PyObject *port, *host = host_port(hostport, scheme, &port);
        if (host == NULL || set_item(a, k_server_address, host) < 0 || set_item(a, k_server_port, port) < 0 ||
            set_new(a, k_url_full, url_full(scheme, host, port, url_path, query ? query : Py_None)) < 0)
            goto fail;
    }
    int has_tail = PyObject_IsTrue(tail);
    if (has_tail < 0 || (has_tail && PyDict_Update(a, tail) < 0))
        goto fail;
    int other = eq(method, M.other_method);
    if (other < 0)
        goto fail;
    if ((route != NULL && need_str(route, "route") == NULL) || need_str(method, "method") == NULL)
        goto fail;
    if (route != NULL) {
        PyObject *parts[3] = {other ? s_http_name : method, s_space, route};
        name = join_str(parts, 3);
    } else
        name = Py_NewRef(other ? s_http_name : method);
    if (name == NULL)
        goto fail;
    out = PyTuple_Pack(7, name, a, scheme, url_path, query ? query : Py_None, hostport != Py_None ? Py_True : Py_False,
                       autor && route ? route : Py_None);
fail:
    Py_XDECREF(authority);
    Py_XDECREF(hp_new);
    Py_XDECREF(path);
    Py_XDECREF(query);
    Py_XDECREF(a);
    Py_XDECREF(route);
    Py_XDECREF(name);
    return out;
}

static PyObject *asm_derive(Asm *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "derive(req, server, head)");
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], M.req_t)) {
        PyErr_SetString(PyExc_TypeError, "derive: req must be an http1.RequestHead");
        return NULL;
    }
    int server = PyObject_IsTrue(args[1]);
    if (server < 0)
        return NULL;
    return derive(self, args[0], server, args[2]);
}

/* The final response of a one-request exchange, memoised by its head bytes (keep-alive servers
 * repeat the same head). Borrowed: ResponseHead or None. */
static PyObject *response(Asm *self, PyObject *head) {
    PyObject *r = PyDict_GetItemWithError(self->resps, head);
    if (r != NULL || PyErr_Occurred())
        return r;
    r = PyObject_CallOneArg(M.parse_final_response, head);
    if (r == NULL)
        return NULL;
    if (PyDict_GET_SIZE(self->resps) >= self->memo_size)
        PyDict_Clear(self->resps); /* not LRU: cheap and bounded */
    int bad = PyDict_SetItem(self->resps, head, r);
    Py_DECREF(r); /* the memo holds it */
    return bad ? NULL : r;
}

/* Per exchange, the same for each of its spans. */
typedef struct {
    PyObject *ex, *parsed, *end, *end_ns, *tls;
    Py_ssize_t n, n_resps;
    int server;
} Ctx;

static PyObject *field(PyObject *o, PyTypeObject *t, const Slot *slots, int i);

/* start + offset and end + offset in C when all three are plain ints and the sums fit: 1, or 0
 * when Python's arithmetic must do it (-1: error). The decoder's ints would otherwise cost two
 * PyNumber_Add and a rich comparison per span. */
static int wall_times(PyObject *start, PyObject *end, PyObject *offset, long long *s, long long *e) {
    if (!PyLong_CheckExact(start) || !PyLong_CheckExact(end) || !PyLong_CheckExact(offset))
        return 0;
    int o1, o2, o3;
    long long a = PyLong_AsLongLongAndOverflow(start, &o1), b = PyLong_AsLongLongAndOverflow(end, &o2),
              off = PyLong_AsLongLongAndOverflow(offset, &o3);
    if (PyErr_Occurred())
        return -1;
    return !o1 && !o2 && !o3 && !__builtin_add_overflow(a, off, s) && !__builtin_add_overflow(b, off, e);
}

/* One request's span (index in the exchange's requests, resp its response or None). New ref. */
static PyObject *one_span(Asm *self, const Ctx *c, PyObject *req, Py_ssize_t index, PyObject *resp) {
    PyObject *ex = c->ex, *end = c->end;
    int server = c->server, tls, r;
    PyObject *mk = NULL, *h_new = NULL, *d_new = NULL, *a = NULL, *name = NULL, *service = NULL, *adm = NULL;
    PyObject *peer_addr = NULL, *peer_port = NULL, *local = NULL, *start = NULL, *end_w = NULL, *span = NULL;
    PyObject *memo, *heads, *d, *family, *v, *w;
    PyObject *code = NULL, *terr = NULL; /* borrowed */
    PyObject *status, *etype = NULL;

    if ((tls = PyObject_IsTrue(c->tls)) < 0)
        goto fail;
    if ((mk = PyLong_FromSsize_t(index * 4 + (server ? 2 : 0) + (tls ? 1 : 0))) == NULL)
        goto fail;
    GET(memo, c->parsed, parsed_slots, P_MEMO);
    GET(heads, c->parsed, parsed_slots, P_HEADS);
    if (!PyDict_Check(memo) || !PyDict_Check(heads)) {
        PyErr_SetString(PyExc_TypeError, "parse memos must be dicts");
        goto fail;
    }
    d = PyDict_GetItemWithError(memo, mk);
    if (d == NULL && PyErr_Occurred())
        goto fail;
    if (d == NULL || d == Py_None) {
        PyObject *h = PyDict_GetItemWithError(heads, mk);
        if (h == NULL && PyErr_Occurred())
            goto fail;
        if (h == NULL || h == Py_None) {
            PyObject *args[2] = {req, c->tls};
            if ((h = h_new = PyObject_Vectorcall(self->head_part, args, 2, NULL)) == NULL ||
                PyDict_SetItem(heads, mk, h) < 0)
                goto fail;
        }
        if ((d = d_new = derive(self, req, server, h)) == NULL || PyDict_SetItem(memo, mk, d) < 0)
            goto fail;
    }
    if (!PyTuple_CheckExact(d) || PyTuple_GET_SIZE(d) != 7 || !PyDict_Check(PyTuple_GET_ITEM(d, 1))) {
        PyErr_SetString(PyExc_TypeError, "derived request part must be a 7-tuple");
        goto fail;
    }
    PyObject *scheme = PyTuple_GET_ITEM(d, 2), *url_path = PyTuple_GET_ITEM(d, 3), *query = PyTuple_GET_ITEM(d, 4);
    PyObject *auto_route = PyTuple_GET_ITEM(d, 6);
    int has_host = PyObject_IsTrue(PyTuple_GET_ITEM(d, 5));
    if (has_host < 0 || (a = PyDict_Copy(PyTuple_GET_ITEM(d, 1))) == NULL)
        goto fail;
    name = Py_NewRef(PyTuple_GET_ITEM(d, 0));
    GET(family, ex, ex_slots, X_FAMILY);
    int fam = PyObject_IsTrue(family);
    if (fam < 0)
        goto fail;
    if (auto_route != Py_None) {
        /* The cap depends on what the service served before: applied per span, after the memo. */
        if (fam) {
            GET(v, ex, ex_slots, X_LOCAL_ADDR);
            GET(w, ex, ex_slots, X_LOCAL_PORT);
            service = PyTuple_Pack(2, v, w);
        } else {
            GET(v, ex, ex_slots, X_PID);
            service = Py_NewRef(v);
        }
        if (service == NULL)
            goto fail;
        PyObject *args[2] = {service, auto_route};
        if ((adm = PyObject_Vectorcall(self->admit, args, 2, NULL)) == NULL)
            goto fail;
        if ((r = PyObject_RichCompareBool(adm, auto_route, Py_NE)) < 0)
            goto fail;
        if (r) {
            if (set_item(a, k_route, M.overflow_route) < 0)
                goto fail;
            Py_ssize_t keep = PyObject_Length(name) - PyObject_Length(auto_route);
            if (PyErr_Occurred())
                goto fail;
            PyObject *stem = PySequence_GetSlice(name, 0, keep);
            if (stem == NULL)
                goto fail;
            Py_SETREF(name, PyNumber_Add(stem, M.overflow_route));
            Py_DECREF(stem);
            if (name == NULL)
                goto fail;
        }
    }

    if (fam) {
        GET(v, ex, ex_slots, X_REMOTE_ADDR);
        if ((peer_addr = unmapped(v)) == NULL)
            goto fail;
        GET(v, ex, ex_slots, X_REMOTE_PORT);
        peer_port = Py_NewRef(v);
    } else {
        peer_addr = Py_NewRef(s_empty);
        peer_port = Py_NewRef(i_zero);
    }

    /* Outcome: status code, and a transport failure when the response never came or was cut. */
    PyObject *resp_start;
    GET(resp_start, ex, ex_slots, X_RESP_START_NS);
    if (resp != Py_None) {
        GET(code, resp, resp_slots, R_STATUS);
        if ((r = PyDict_Contains(M.aborted_err, end)) < 0)
            goto fail;
        if (r && index == c->n - 1 && index == c->n_resps - 1) {
            PyObject *rmethod, *rb, *rt;
            GET(rmethod, req, req_slots, Q_METHOD);
            GET(rb, ex, ex_slots, X_RESP_BYTES);
            GET(rt, ex, ex_slots, X_RESP_TAIL);
            PyObject *args[4] = {rmethod, resp, rb, rt};
            PyObject *fc = PyObject_Vectorcall(M.framing_complete, args, 4, NULL);
            if (fc == NULL)
                goto fail;
            Py_DECREF(fc); /* compared by identity only: True, False or None */
            if (cut_short(self->stats, end, fc == Py_False, fc != Py_True, &terr) < 0)
                goto fail;
        }
    } else {
        int started = -1;
        if (index != 0 && (started = PyObject_IsTrue(resp_start)) < 0)
            goto fail;
        if (index == 0 || !started) {
            if ((started = PyObject_IsTrue(resp_start)) < 0)
                goto fail;
            if (!started) {
                if (aborted_err(end, &terr) < 0 || (r = eq_member(end, M.closed)) < 0)
                    goto fail;
                if (r) {
                    if (bump(self->stats, c_closed_no_response, 1) < 0)
                        goto fail;
                } else if (terr == NULL && index == 0 && bump(self->stats, c_no_response, 1) < 0)
                    goto fail;
            } else {
                /* Response bytes came but no status line parsed: fall back to the kernel's status. */
                PyObject *ks;
                GET(ks, ex, ex_slots, X_STATUS);
                if ((r = cmp_long(ks, 100, Py_GE)) < 0)
                    goto fail;
                if (r) {
                    if ((r = cmp_long(ks, 599, Py_LE)) < 0)
                        goto fail;
                    if (r)
                        code = ks;
                }
                if (cut_short(self->stats, end, code == NULL, 1, &terr) < 0)
                    goto fail;
            }
        }
    }

    int has_peer = PyUnicode_Check(peer_addr) ? PyUnicode_GET_LENGTH(peer_addr) > 0 : PyObject_IsTrue(peer_addr);
    if (has_peer < 0)
        goto fail;
    if (server) {
        if (!has_host && fam) {
            GET(v, ex, ex_slots, X_LOCAL_ADDR);
            if ((r = PyObject_IsTrue(v)) < 0)
                goto fail;
            if (r) {
                GET(w, ex, ex_slots, X_LOCAL_PORT);
                if ((local = unmapped(v)) == NULL || set_item(a, k_server_address, local) < 0 ||
                    set_item(a, k_server_port, w) < 0)
                    goto fail;
            }
        }
        if (has_peer && set_item(a, k_client_address, peer_addr) < 0)
            goto fail;
    } else if (!has_host && has_peer) {
        if (set_item(a, k_server_address, peer_addr) < 0 || set_item(a, k_server_port, peer_port) < 0 ||
            set_new(a, k_url_full, url_full(scheme, peer_addr, peer_port, url_path, query)) < 0)
            goto fail;
    }
    if (has_peer && (set_item(a, k_peer_address, peer_addr) < 0 || set_item(a, k_peer_port, peer_port) < 0))
        goto fail;
    if ((r = truth_slot(req, req_slots, Q_VERSION)) < 0)
        goto fail;
    if (!r && resp != Py_None) {
        GET(w, resp, resp_slots, R_VERSION);
        if (set_item(a, k_protocol_version, w) < 0)
            goto fail;
    }
    if (code != NULL) {
        if (set_item(a, k_status_code, code) < 0)
            goto fail;
        /* 5xx is an error on both kinds, 4xx only on client spans (the server answered as asked). */
        int err = cmp_long(code, 500, Py_GE);
        if (err == 0 && (err = cmp_long(code, 400, Py_GE)) > 0)
            err = !server;
        if (err < 0 || (err && (etype = PyObject_Str(code)) == NULL))
            goto fail;
    }
    /* error.type: the status code when it is an error, else the transport failure */
    if (etype == NULL && terr != NULL)
        etype = Py_NewRef(terr);
    status = etype != NULL ? M.error : M.unset;
    if (etype != NULL && set_new(a, k_error_type, etype) < 0)
        goto fail;

    /* Body sizes: from Content-Length, else from the byte counts when one exchange is one request
     * and its head was fully captured (chunked sizes include the chunk framing). */
    if ((r = truth_slot(req, req_slots, Q_CHUNKED)) < 0 || (r && (r = truth_slot(req, req_slots, Q_COMPLETE)) < 0))
        goto fail;
    if (r && c->n == 1) {
        PyObject *rb, *hl;
        GET(rb, ex, ex_slots, X_REQ_BYTES);
        GET(hl, req, req_slots, Q_HEAD_LEN);
        if ((r = PyObject_RichCompareBool(rb, hl, Py_GT)) < 0)
            goto fail;
        if (r && set_new(a, k_req_body, PyNumber_Subtract(rb, hl)) < 0)
            goto fail;
    }
    if (resp != Py_None) {
        PyObject *rmethod, *rstatus;
        GET(rmethod, req, req_slots, Q_METHOD);
        GET(rstatus, resp, resp_slots, R_STATUS);
        if ((r = no_body(rmethod, rstatus)) < 0)
            goto fail;
        if (!r) {
            PyObject *he, *cl, *got;
            GET(he, resp, resp_slots, R_HEAD_END);
            GET(cl, resp, resp_slots, R_CONTENT_LENGTH);
            if ((r = cmp_long(he, 0, Py_GE)) < 0)
                goto fail;
            if (r && c->n == 1) {
                PyObject *rb;
                long rbv, hev;
                GET(rb, ex, ex_slots, X_RESP_BYTES);
                got = compact_long(rb, &rbv) && compact_long(he, &hev) ? PyLong_FromLong(rbv - hev)
                                                                       : PyNumber_Subtract(rb, he);
            } else
                got = Py_NewRef(i_minus_one);
            if (got == NULL)
                goto fail;
            int have = cmp_long(got, 0, Py_GE);
            if (have >= 0 && cl != Py_None) {
                PyObject *size = cl;
                long gv, clv;
                if (have && compact_long(got, &gv) && compact_long(cl, &clv))
                    have = gv < clv;
                else if (have)
                    have = PyObject_RichCompareBool(got, cl, Py_LT);
                if (have > 0)
                    size = got; /* min(content_length, got): the first of equals */
                if (have >= 0)
                    have = set_item(a, k_resp_body, size) < 0 ? -1 : 0;
            } else if (have > 0)
                have = set_item(a, k_resp_body, got) < 0 ? -1 : 0;
            Py_DECREF(got);
            if (have < 0)
                goto fail;
        }
    }

    PyObject *rs, *pid;
    GET(rs, ex, ex_slots, X_REQ_START_NS);
    GET(pid, ex, ex_slots, X_PID);
    int ends_later;
    long long start_c, end_c;
    r = wall_times(rs, c->end_ns, self->offset, &start_c, &end_c);
    if (r < 0)
        goto fail;
    if (r) {
        if ((start = PyLong_FromLongLong(start_c)) == NULL)
            goto fail;
        if ((ends_later = end_c > start_c) && (end_w = PyLong_FromLongLong(end_c)) == NULL)
            goto fail;
    } else {
        if ((start = PyNumber_Add(rs, self->offset)) == NULL ||
            (end_w = PyNumber_Add(c->end_ns, self->offset)) == NULL)
            goto fail;
        if ((ends_later = PyObject_RichCompareBool(end_w, start, Py_GT)) < 0)
            goto fail;
    }
    PyObject *msg = s_empty;
    if (terr != NULL && status == M.error) {
        if ((msg = PyDict_GetItemWithError(M.status_messages, terr)) == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, terr);
            goto fail;
        }
    }
    PyObject *peer_pid = i_zero;
    PyObject *pkind = NULL, *ppid = NULL;
    if (server) {
        PyObject *parent;
        GET(parent, ex, ex_slots, X_PARENT);
        if (parent != Py_None) {
            if ((pkind = field(parent, M.hint_t, hint_slots, H_KIND)) == NULL)
                goto fail;
            r = eq_member(pkind, M.peer_kind);
            Py_DECREF(pkind);
            if (r < 0)
                goto fail;
            if (r) {
                if ((ppid = field(parent, M.hint_t, hint_slots, H_PID)) == NULL)
                    goto fail;
                peer_pid = ppid;
            }
        }
    }

    if ((span = M.span_t->tp_alloc(M.span_t, 0)) == NULL) {
        Py_XDECREF(ppid);
        goto fail;
    }
    /* tp_alloc zeroed every slot; each is set once here with a new reference. */
    *SLOT_PTR(span, span_slots, S_TRACE_ID) = Py_NewRef(b_empty);
    *SLOT_PTR(span, span_slots, S_SPAN_ID) = Py_NewRef(b_empty);
    *SLOT_PTR(span, span_slots, S_PARENT_SPAN_ID) = Py_NewRef(Py_None);
    *SLOT_PTR(span, span_slots, S_NAME) = name;
    name = NULL;
    *SLOT_PTR(span, span_slots, S_KIND) = Py_NewRef(server ? M.kind_server : M.kind_client);
    *SLOT_PTR(span, span_slots, S_START_NS) = Py_NewRef(start);
    *SLOT_PTR(span, span_slots, S_END_NS) = Py_NewRef(ends_later ? end_w : start);
    *SLOT_PTR(span, span_slots, S_PID) = Py_NewRef(pid);
    *SLOT_PTR(span, span_slots, S_ATTRIBUTES) = a;
    a = NULL;
    *SLOT_PTR(span, span_slots, S_STATUS) = Py_NewRef(status);
    *SLOT_PTR(span, span_slots, S_STATUS_MESSAGE) = Py_NewRef(msg);
    *SLOT_PTR(span, span_slots, S_TRACE_STATE) = Py_NewRef(s_empty);
    *SLOT_PTR(span, span_slots, S_PEER_PID) = ppid ? ppid : Py_NewRef(peer_pid);
    *SLOT_PTR(span, span_slots, S_SAMPLED) = Py_NewRef(Py_True);

fail:
    Py_XDECREF(mk);
    Py_XDECREF(h_new);
    Py_XDECREF(d_new);
    Py_XDECREF(a);
    Py_XDECREF(name);
    Py_XDECREF(service);
    Py_XDECREF(adm);
    Py_XDECREF(peer_addr);
    Py_XDECREF(peer_port);
    Py_XDECREF(local);
    Py_XDECREF(start);
    Py_XDECREF(end_w);
    return span;
}

static void set_span_slot(PyObject *span, int i, PyObject *v) {
    Py_SETREF(*SLOT_PTR(span, span_slots, i), Py_NewRef(v));
}

/* spans(ex, parsed, end_ns, sid, trace, parent, source, sampled) -> list[Span]
 *
 * The spans of one exchange (several when requests were pipelined): the first takes span id
 * sid, the later ones ids hashed from its identity and index. trace, parent and sampled go on
 * every span, and source as the last attribute (kspan.parent.source) unless it is None: the
 * kernel fixed them (the Feeder below), or the linker sets them later. */
static PyObject *spans_impl(Asm *self, PyObject *ex, PyObject *parsed, PyObject *end_ns, PyObject *sid,
                            PyObject *trace, PyObject *parent, PyObject *source, PyObject *sampled) {
    if (!PyObject_TypeCheck(ex, M.ex_t) || !PyObject_TypeCheck(parsed, M.parsed_t)) {
        PyErr_SetString(PyExc_TypeError, "spans: an Exchange and a _Parsed");
        return NULL;
    }
    PyObject *reqs, *end, *resp_head, *v, *role;
    PyObject *resps = NULL, *resp = Py_None, *methods = NULL, *out = NULL, *idx = NULL;
    Ctx c = {ex, parsed, NULL, end_ns, NULL, 0, 0, 0};
    int r;
    GET(reqs, parsed, parsed_slots, P_REQS);
    if (!PyList_Check(reqs) || (c.n = PyList_GET_SIZE(reqs)) == 0) {
        PyErr_SetString(PyExc_ValueError, "spans: no parsed requests");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < c.n; i++)
        if (!PyObject_TypeCheck(PyList_GET_ITEM(reqs, i), M.req_t)) {
            PyErr_SetString(PyExc_TypeError, "spans: requests must be http1.RequestHead");
            goto fail;
        }
    GET(role, ex, ex_slots, X_ROLE);
    if ((c.server = eq_member(role, M.role_server)) < 0)
        goto fail;
    GET(c.tls, ex, ex_slots, X_TLS);
    GET(end, ex, ex_slots, X_END);
    c.end = end;
    if ((r = eq_member(end, M.timeout)) < 0)
        goto fail;
    if (r) {
        if (bump(self->stats, c_timeouts, 1) < 0)
            goto fail;
    } else {
        if ((r = eq_member(end, M.evicted)) < 0 || (r && bump(self->stats, c_evicted, 1) < 0))
            goto fail;
    }
    GET(resp_head, ex, ex_slots, X_RESP_HEAD);
    if (c.n == 1) {
        if ((r = PyObject_IsTrue(resp_head)) < 0)
            goto fail;
        if (r && (resp = response(self, resp_head)) == NULL)
            goto fail;
        c.n_resps = resp != Py_None;
    } else {
        if (bump(self->stats, c_pipelined_splits, c.n - 1) < 0 || (methods = PyList_New(c.n)) == NULL)
            goto fail;
        for (Py_ssize_t i = 0; i < c.n; i++) {
            GET(v, PyList_GET_ITEM(reqs, i), req_slots, Q_METHOD);
            PyList_SET_ITEM(methods, i, Py_NewRef(v));
        }
        PyObject *pa[2] = {resp_head, methods};
        if ((resps = PyObject_Vectorcall(M.parse_responses, pa, 2, NULL)) == NULL)
            goto fail;
        if (!PyList_Check(resps)) {
            PyErr_SetString(PyExc_TypeError, "parse_responses must return a list");
            goto fail;
        }
        c.n_resps = PyList_GET_SIZE(resps);
    }
    for (Py_ssize_t i = 0; i < c.n_resps; i++) {
        PyObject *ri = resps ? PyList_GET_ITEM(resps, i) : resp;
        if (!PyObject_TypeCheck(ri, M.resp_t)) {
            PyErr_SetString(PyExc_TypeError, "spans: responses must be http1.ResponseHead");
            goto fail;
        }
    }
    /* A head cut by the capture limits still makes a span: counted. */
    int whole = truth_slot(PyList_GET_ITEM(reqs, c.n - 1), req_slots, Q_COMPLETE);
    if (whole == 1 && c.n_resps)
        whole = truth_slot(resps ? PyList_GET_ITEM(resps, c.n_resps - 1) : resp, resp_slots, R_COMPLETE);
    else if (whole == 1) {
        int cut = truth_slot(ex, ex_slots, X_RESP_HEAD_TRUNCATED);
        whole = cut < 0 ? -1 : !cut;
    }
    if (whole < 0 || (!whole && bump(self->stats, c_truncated_heads, 1) < 0))
        goto fail;
    if (!c.n_resps) {
        if ((r = truth_slot(ex, ex_slots, X_RESP_START_NS)) < 0 || (r && (r = PyObject_IsTrue(resp_head)) < 0))
            goto fail;
        if (r && bump(self->stats, c_unparsed_responses, 1) < 0)
            goto fail;
    }

    if ((out = PyList_New(c.n)) == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < c.n; i++) {
        PyObject *ri = i < c.n_resps ? (resps ? PyList_GET_ITEM(resps, i) : resp) : Py_None;
        PyObject *span = one_span(self, &c, PyList_GET_ITEM(reqs, i), i, ri);
        if (span == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, span);
        if (i == 0)
            set_span_slot(span, S_SPAN_ID, sid);
        else {
            PyObject *conn, *rs;
            GET(conn, ex, ex_slots, X_CONN_ID);
            GET(rs, ex, ex_slots, X_REQ_START_NS);
            if ((idx = PyLong_FromSsize_t(i)) == NULL)
                goto fail;
            PyObject *ia[3] = {conn, rs, idx};
            PyObject *id = PyObject_Vectorcall(self->span_id, ia, 3, NULL);
            Py_CLEAR(idx);
            if (id == NULL)
                goto fail;
            Py_SETREF(*SLOT_PTR(span, span_slots, S_SPAN_ID), id);
        }
        set_span_slot(span, S_TRACE_ID, trace);
        set_span_slot(span, S_PARENT_SPAN_ID, parent);
        set_span_slot(span, S_SAMPLED, sampled);
        if (source != Py_None && PyDict_SetItem(*SLOT_PTR(span, span_slots, S_ATTRIBUTES), M.source_attr, source) < 0)
            goto fail;
    }
    Py_XDECREF(methods);
    Py_XDECREF(resps);
    return out;
fail:
    Py_XDECREF(methods);
    Py_XDECREF(resps);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *asm_spans(Asm *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "spans(ex, parsed, end_ns, sid, trace, parent, source, sampled)");
        return NULL;
    }
    return spans_impl(self, args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7]);
}

static PyMethodDef asm_methods[] = {
    {"spans", (PyCFunction)(void (*)(void))asm_spans, METH_FASTCALL,
     "spans(ex, parsed, end_ns, sid, trace, parent, source, sampled) -> list[Span]"},
    {"derive", (PyCFunction)(void (*)(void))asm_derive, METH_FASTCALL,
     "derive(req, server, head) -> (name, attributes, scheme, url_path, query, has_host, auto_route)"},
    {NULL},
};

static PyTypeObject AsmType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "correlator._spans.Assembler",
    .tp_basicsize = sizeof(Asm),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One correlator's span assembly: its route cap, linker, stats and response memo.",
    .tp_traverse = (traverseproc)asm_traverse,
    .tp_clear = (inquiry)asm_clear,
    .tp_dealloc = (destructor)asm_dealloc,
    .tp_methods = asm_methods,
    .tp_init = (initproc)asm_init,
    .tp_new = PyType_GenericNew,
};

/* retarget(parsed, target) -> _Parsed: a one-request parse with another origin-form target of
 * the same head shape (Correlator._shaped: ids in paths make most heads unique, their shape
 * repeats). The request head is copied with the new target and its head length moved by the
 * target's; the copy has its own derivation memo and shares the shape's head parts. */
static PyObject *retarget(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "retarget(parsed, target)");
        return NULL;
    }
    if (!M.ready) {
        PyErr_SetString(PyExc_RuntimeError, "correlator._spans.setup() was not called");
        return NULL;
    }
    PyObject *base = args[0], *target = args[1];
    if (!Py_IS_TYPE(base, M.parsed_t) || !PyBytes_Check(target)) {
        PyErr_SetString(PyExc_TypeError, "retarget: a _Parsed and bytes");
        return NULL;
    }
    PyObject *reqs, *r0, *v, *t0, *r = NULL, *p = NULL;
    GET(reqs, base, parsed_slots, P_REQS);
    if (!PyList_Check(reqs) || PyList_GET_SIZE(reqs) < 1 || !Py_IS_TYPE(PyList_GET_ITEM(reqs, 0), M.req_t)) {
        PyErr_SetString(PyExc_TypeError, "retarget: a parse of at least one request");
        return NULL;
    }
    r0 = PyList_GET_ITEM(reqs, 0);
    if ((r = M.req_t->tp_alloc(M.req_t, 0)) == NULL)
        goto fail;
    for (int i = 0; i < req_all_n; i++) {
        GET(v, r0, req_all, i);
        *SLOT_PTR(r, req_all, i) = Py_NewRef(v);
    }
    GET(t0, r0, req_slots, Q_TARGET);
    Py_SETREF(*SLOT_PTR(r, req_slots, Q_TARGET), Py_NewRef(target));
    GET(v, r0, req_slots, Q_HEAD_LEN);
    int ge = cmp_long(v, 0, Py_GE);
    if (ge < 0)
        goto fail;
    if (ge) {
        Py_ssize_t l0 = PyObject_Length(t0);
        if (l0 < 0)
            goto fail;
        PyObject *d = PyLong_FromSsize_t(PyBytes_GET_SIZE(target) - l0);
        PyObject *hl = d ? PyNumber_Add(v, d) : NULL;
        Py_XDECREF(d);
        if (hl == NULL)
            goto fail;
        Py_SETREF(*SLOT_PTR(r, req_slots, Q_HEAD_LEN), hl);
    }
    if ((p = M.parsed_t->tp_alloc(M.parsed_t, 0)) == NULL)
        goto fail;
    for (int i = 0; i < parsed_all_n; i++) {
        GET(v, base, parsed_all, i);
        *SLOT_PTR(p, parsed_all, i) = Py_NewRef(v);
    }
    PyObject *one = PyList_New(1), *memo = PyDict_New();
    if (one == NULL || memo == NULL) {
        Py_XDECREF(one);
        Py_XDECREF(memo);
        goto fail;
    }
    PyList_SET_ITEM(one, 0, r);
    r = NULL;
    Py_SETREF(*SLOT_PTR(p, parsed_slots, P_REQS), one);
    Py_SETREF(*SLOT_PTR(p, parsed_slots, P_MEMO), memo);
    return p;
fail:
    Py_XDECREF(r);
    Py_XDECREF(p);
    return NULL;
}

/* ---- the feed path: an exchange record in, its spans out ---------------------------------- */

/* A Feeder is one correlator's per-record entry (Correlator.feed and feed_batch). A record whose
 * ids and sampling the kernel fixed (kernel_ids, nearly every record) is handled here whole: the
 * repeat check, the head memo, span assembly, traceparent counters and trace_state, the peer pid
 * table, and the memory of its identity (which releases any span the linker held for it). Other
 * records (the agent's timeout sweep, old recordings) go to `slow`, correlator.py's Python
 * linking. Either way a record that raises is counted (internal_errors, last_error) and makes no
 * span: bad input never stops the agent.
 *
 * Its objects, which are also its constructor's keywords:
 * assembler   this correlator's Assembler
 * counters    its Counters
 * memory      its linker's Memory
 * held        Linker.held: identity -> node waiting for its parent (a repeat of one is dropped)
 * waiting     Linker.waiting: parent identity -> the held children waiting for it
 * release     Linker.release_children(key, trace, link) -> spans that waited for key
 * parse       head -> _Parsed (the full parse, on a memo miss)
 * slow        Correlator._feed_unidentified
 * sources     correlator.linker's parent kind -> kspan.parent.source table */
#define FEEDER_OBJECTS(X)                                                                                        \
    X(assembler) X(counters) X(memory) X(held) X(waiting) X(release) X(parse) X(slow) X(sources)
#define FD_FIELD(f) PyObject *f;
#define FD_VISIT(f) Py_VISIT(self->f);
#define FD_DROP(f) Py_CLEAR(self->f);

typedef struct {
    PyObject_HEAD
    FEEDER_OBJECTS(FD_FIELD)
    PyObject *heads;  /* request head -> _Parsed */
    PyObject *shapes; /* head without its target -> a _Parsed standing for its shape, or None */
    PyObject *last_error;
    Table peers; /* client exchange -> pid of its local server end */
    Py_ssize_t memo_size;
} Feeder;

static int fd_traverse(Feeder *self, visitproc visit, void *arg) {
    FEEDER_OBJECTS(FD_VISIT)
    Py_VISIT(self->heads);
    Py_VISIT(self->shapes);
    return 0;
}

static int fd_clear(Feeder *self) {
    FEEDER_OBJECTS(FD_DROP)
    Py_CLEAR(self->heads);
    Py_CLEAR(self->shapes);
    Py_CLEAR(self->last_error);
    return 0;
}

static void fd_dealloc(Feeder *self) {
    PyObject_GC_UnTrack(self);
    fd_clear(self);
    t_free(&self->peers);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define FD_KW(f) #f,
#define FD_LOCAL(f) PyObject *f;
#define FD_ADDR(f) , &f
#define FD_ASSIGN(f) self->f = Py_NewRef(f);

static int fd_init(Feeder *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {FEEDER_OBJECTS(FD_KW) "memo_size", NULL};
    FEEDER_OBJECTS(FD_LOCAL)
    Py_ssize_t memo_size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$O!O!O!O!O!OOOO!n", kwlist, &AsmType, &assembler, &CountersType,
                                     &counters, &MemoryType, &memory, &PyDict_Type, &held, &PyDict_Type, &waiting,
                                     &release, &parse, &slow, &PyDict_Type, &sources, &memo_size))
        return -1;
    if (!M.ready) {
        PyErr_SetString(PyExc_RuntimeError, "correlator._spans.setup() was not called");
        return -1;
    }
    if (memo_size < 1) {
        PyErr_SetString(PyExc_ValueError, "memo_size must be >= 1");
        return -1;
    }
    PyObject *heads = PyDict_New(), *shapes = PyDict_New();
    if (heads == NULL || shapes == NULL) {
        Py_XDECREF(heads);
        Py_XDECREF(shapes);
        return -1;
    }
    fd_clear(self);
    t_free(&self->peers);
    FEEDER_OBJECTS(FD_ASSIGN)
    self->heads = heads;
    self->shapes = shapes;
    self->last_error = Py_NewRef(s_empty);
    self->memo_size = memo_size;
    return 0;
}

#define CNT(self) ((Counters *)(self)->counters)
#define MEM(self) ((Memory *)(self)->memory)

/* A new _Parsed from `parse`, checked: span assembly reads its slots in place. */
static PyObject *full_parse(Feeder *self, PyObject *head) {
    PyObject *p = PyObject_CallOneArg(self->parse, head);
    if (p != NULL && !Py_IS_TYPE(p, M.parsed_t)) {
        PyErr_SetString(PyExc_TypeError, "parse must return a correlator._Parsed");
        Py_CLEAR(p);
    }
    return p;
}

static int memo_put(PyObject *memo, PyObject *k, PyObject *v, Py_ssize_t size) {
    if (PyDict_GET_SIZE(memo) >= size)
        PyDict_Clear(memo); /* not LRU: cheap and bounded */
    return PyDict_SetItem(memo, k, v);
}

/* The parse of a one-request head with an origin-form target, from the memo of heads that differ
 * only in their target (ids in paths make most heads unique, their shape repeats): the template's
 * parse with this target, its head length moved by the target's (retarget). 0 for any other head,
 * which takes the full parse; 1 with *out (new reference); -1 on error. */
static int shaped(Feeder *self, PyObject *head, PyObject **out) {
    const char *h = PyBytes_AS_STRING(head);
    Py_ssize_t n = PyBytes_GET_SIZE(head), sp1, sp2;
    if (!M.origin_line(h, n, &sp1, &sp2))
        return 0;
    int r = -1;
    PyObject *target = PyBytes_FromStringAndSize(h + sp1 + 1, sp2 - sp1 - 1), *p = NULL, *base;
    PyObject *shape = PyBytes_FromStringAndSize(NULL, sp1 + 1 + n - sp2);
    if (target == NULL || shape == NULL)
        goto done;
    memcpy(PyBytes_AS_STRING(shape), h, sp1 + 1);
    memcpy(PyBytes_AS_STRING(shape) + sp1 + 1, h + sp2, n - sp2);
    if ((base = PyDict_GetItemWithError(self->shapes, shape)) == NULL) {
        if (PyErr_Occurred() || (p = full_parse(self, head)) == NULL)
            goto done;
        PyObject *reqs, *r0, *t0;
        base = Py_None;
        GET(reqs, p, parsed_slots, P_REQS);
        /* Only a lone request whose parse took exactly this target can stand for its shape: a
         * pipelined one's later offsets are not the first's. */
        if (PyList_Check(reqs) && PyList_GET_SIZE(reqs) == 1 &&
            PyObject_TypeCheck((r0 = PyList_GET_ITEM(reqs, 0)), M.req_t)) {
            GET(t0, r0, req_slots, Q_TARGET);
            int same = eq(t0, target);
            if (same < 0)
                goto done;
            if (same)
                base = p;
        }
        if (memo_put(self->shapes, shape, base, self->memo_size) < 0)
            goto done;
        *out = p;
        p = NULL;
        r = 1;
    } else if (base == Py_None) {
        r = 0;
    } else {
        PyObject *ra[2] = {base, target};
        if ((*out = retarget(NULL, ra, 2)) != NULL)
            r = 1;
    }
done:
fail:
    Py_XDECREF(target);
    Py_XDECREF(shape);
    Py_XDECREF(p);
    return r;
}

/* The parsed request head, memoised by its exact bytes: keep-alive clients, health checks and
 * pollers repeat the same head, and a hit skips parsing and attribute derivation. New ref. */
static PyObject *parsed_head(Feeder *self, PyObject *head) {
    if (!PyBytes_Check(head)) {
        PyErr_SetString(PyExc_TypeError, "a request head must be bytes");
        return NULL;
    }
    PyObject *p = PyDict_GetItemWithError(self->heads, head);
    if (p != NULL)
        return Py_NewRef(p);
    if (PyErr_Occurred())
        return NULL;
    int r = shaped(self, head, &p);
    if (r < 0 || (r == 0 && (p = full_parse(self, head)) == NULL))
        return NULL;
    if (memo_put(self->heads, head, p, self->memo_size) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    return p;
}

static PyObject *fd_parsed(Feeder *self, PyObject *head) { return parsed_head(self, head); }

/* Remember an identity the kernel identified as if the linker had released it, so a record the
 * kernel could not identify (the agent's timeout sweep) still links to it: the spans the linker
 * held for it, now released (new list). They join its trace, so they take the kernel's decision
 * for it (`sampled`): a trace is kept or dropped whole, and under parentbased_* a root decision
 * made here could contradict the incoming traceparent the kernel honoured. */
static PyObject *remember(Feeder *self, uint64_t a, uint64_t b, PyObject *conn, PyObject *start, PyObject *trace,
                          PyObject *link, PyObject *at, PyObject *sampled) {
    Memory *m = MEM(self);
    if (mem_touch(m, at) < 0 || mem_put(m, a, b, trace, link) < 0)
        return NULL;
    if (PyDict_GET_SIZE(self->waiting) == 0)
        return PyList_New(0);
    PyObject *key = PyTuple_Pack(2, conn, start);
    if (key == NULL)
        return NULL;
    int w = PyDict_Contains(self->waiting, key);
    PyObject *out = NULL;
    if (w > 0) {
        PyObject *ra[3] = {key, trace, link};
        out = PyObject_Vectorcall(self->release, ra, 3, NULL);
        if (out != NULL && !PyList_Check(out)) {
            PyErr_SetString(PyExc_TypeError, "release must return a list");
            Py_CLEAR(out);
        }
        int keep = out == NULL ? 0 : PyObject_IsTrue(sampled);
        if (keep < 0)
            Py_CLEAR(out);
        Counters *cnt = CNT(self);
        for (Py_ssize_t i = 0; out != NULL && i < PyList_GET_SIZE(out); i++) {
            PyObject *sp = PyList_GET_ITEM(out, i);
            if (!Py_IS_TYPE(sp, M.span_t)) {
                PyErr_SetString(PyExc_TypeError, "release must return spans");
                Py_CLEAR(out);
                break;
            }
            set_span_slot(sp, S_SAMPLED, keep ? Py_True : Py_False);
            if (keep)
                cnt->sampled_exchanges++;
            else
                cnt->unsampled_exchanges++;
        }
    } else if (w == 0)
        out = PyList_New(0);
    Py_DECREF(key);
    return out;
}

/* Python's max() of the four times: the latest the record saw. Borrowed. */
static PyObject *end_of(PyObject *ex) {
    static const int order[4] = {X_RESP_END_NS, X_RESP_START_NS, X_REQ_END_NS, X_REQ_START_NS};
    PyObject *vs[4], *best = NULL;
    long long ns[4];
    int exact = 1;
    for (int i = 0; i < 4; i++) {
        if ((vs[i] = get_slot(ex, ex_slots, order[i])) == NULL)
            return NULL;
        if (exact && PyLong_CheckExact(vs[i])) {
            int ov;
            if ((ns[i] = PyLong_AsLongLongAndOverflow(vs[i], &ov)) == -1 && PyErr_Occurred())
                return NULL;
            exact = !ov;
        } else
            exact = 0;
    }
    /* The decoder's times are plain ints that fit in C: compared in C, the first of equals kept
     * as max() keeps it; anything else as Python compares it. */
    if (exact) {
        int at = 0;
        for (int i = 1; i < 4; i++)
            if (ns[i] > ns[at])
                at = i;
        return vs[at];
    }
    for (int i = 0; i < 4; i++) {
        PyObject *v = vs[i];
        if (best == NULL)
            best = v;
        else {
            int gt = PyObject_RichCompareBool(v, best, Py_GT);
            if (gt < 0)
                return NULL;
            if (gt)
                best = v;
        }
    }
    return best;
}

/* A slot of an exact type, or the attribute of anything else (a hint built elsewhere). New ref. */
static PyObject *field(PyObject *o, PyTypeObject *t, const Slot *slots, int i) {
    if (Py_IS_TYPE(o, t)) {
        PyObject *v = get_slot(o, slots, i);
        return v ? Py_NewRef(v) : NULL;
    }
    return PyObject_GetAttrString(o, slots[i].name);
}

static int sum_into(long long *c, PyObject *v) {
    long long d = PyLong_AsLongLong(v);
    if (d == -1 && PyErr_Occurred())
        return -1;
    *c += d;
    return 0;
}

/* A record whose ids and sampling the kernel fixed: its spans leave at once, nothing waits for a
 * parent or a peer. New list. */
static PyObject *identified(Feeder *self, PyObject *ex) {
    Counters *cnt = CNT(self);
    PyObject *conn, *start, *head, *trace, *v, *parent, *hint, *sid, *sampled, *reqs, *role, *end_ns;
    PyObject *parsed = NULL, *spans = NULL, *kind = NULL, *late = NULL, *tmp = NULL;
    uint64_t a, b;
    int r;
    GET(conn, ex, ex_slots, X_CONN_ID);
    GET(start, ex, ex_slots, X_REQ_START_NS);
    if (key_of(conn, start, &a, &b) < 0)
        return NULL;
    r = mem_find(MEM(self), a, b) >= 0;
    if (!r && PyDict_GET_SIZE(self->held)) {
        PyObject *key = PyTuple_Pack(2, conn, start);
        if (key == NULL)
            return NULL;
        r = PyDict_Contains(self->held, key);
        Py_DECREF(key);
        if (r < 0)
            return NULL;
    }
    if (r) {
        /* A repeat (a recording replayed twice, or the sweep's TIMEOUT record for an exchange the
         * kernel emitted in the same poll): it would bring the same span id again. */
        cnt->duplicate_exchanges++;
        return PyList_New(0);
    }
    cnt->kernel_identified++;
    if ((r = truth_slot(ex, ex_slots, X_PARENT_AMBIGUOUS)) < 0)
        return NULL;
    if (r)
        cnt->ambiguous_parents++;
    if ((end_ns = end_of(ex)) == NULL)
        return NULL;
    GET(head, ex, ex_slots, X_REQ_HEAD);
    if ((parsed = parsed_head(self, head)) == NULL)
        return NULL;
    GET(reqs, parsed, parsed_slots, P_REQS);
    GET(trace, ex, ex_slots, X_TRACE_ID);
    GET(v, ex, ex_slots, X_PARENT_SPAN_ID);
    if ((r = PyObject_IsTrue(v)) < 0)
        goto fail;
    parent = r ? v : Py_None;
    if ((r = PyObject_IsTrue(reqs)) < 0)
        goto fail;
    if (!r) {
        PyObject *rq, *rs;
        cnt->unparsed_exchanges++;
        GET(rq, ex, ex_slots, X_REQ_BYTES);
        GET(rs, ex, ex_slots, X_RESP_BYTES);
        if ((tmp = PyNumber_Add(rq, rs)) == NULL || (r = PyObject_IsTrue(tmp)) < 0)
            goto fail;
        if (r ? sum_into(&cnt->unparsed_bytes, tmp) < 0 : (cnt->unparsed_bytes += PyBytes_GET_SIZE(head), 0))
            goto fail;
        /* no span of its own: its held children link to what it links to */
        GET(sampled, ex, ex_slots, X_SAMPLED);
        spans = remember(self, a, b, conn, start, trace, parent, end_ns, sampled);
        goto done;
    }
    GET(hint, ex, ex_slots, X_PARENT);
    PyObject *source = s_none;
    if (hint != Py_None) {
        if ((kind = field(hint, M.hint_t, hint_slots, H_KIND)) == NULL)
            goto fail;
        source = PyDict_GetItemWithError(self->sources, kind);
        if (source == NULL) {
            if (PyErr_Occurred())
                goto fail;
            source = s_none;
        }
    }
    GET(sid, ex, ex_slots, X_SPAN_ID);
    GET(sampled, ex, ex_slots, X_SAMPLED);
    spans = spans_impl((Asm *)self->assembler, ex, parsed, end_ns, sid, trace, parent, source, sampled);
    if (spans == NULL)
        goto fail;
    PyObject *tp_raw, *tp, *first = PyList_GET_ITEM(spans, 0);
    GET(tp_raw, parsed, parsed_slots, P_TP_RAW);
    if (tp_raw != Py_None) {
        GET(tp, parsed, parsed_slots, P_TP);
        if (tp == Py_None)
            cnt->traceparents_invalid++;
        else {
            cnt->traceparents++;
            if (!PyTuple_Check(tp) || PyTuple_GET_SIZE(tp) < 1) {
                PyErr_SetString(PyExc_TypeError, "a parsed traceparent is a tuple");
                goto fail;
            }
            if ((r = eq(PyTuple_GET_ITEM(tp, 0), trace)) < 0)
                goto fail;
            if (r) {
                GET(v, parsed, parsed_slots, P_TRACE_STATE);
                set_span_slot(first, S_TRACE_STATE, v);
            }
        }
    }
    if (kind != NULL && (r = eq_member(kind, M.peer_kind)) != 0) {
        /* The server end of a local connection usually ends first: its client span, when it
         * comes, learns which process answered it (metrics name the edge by it). */
        PyObject *pid, *pc, *ps;
        uint64_t pa, pb;
        long long p;
        if (r < 0 || (tmp = field(hint, M.hint_t, hint_slots, H_EXCHANGE)) == NULL)
            goto fail;
        if ((pc = field(tmp, M.exid_t, exid_slots, I_CONN_ID)) == NULL)
            goto fail;
        ps = field(tmp, M.exid_t, exid_slots, I_REQ_START_NS);
        r = ps == NULL ? -1 : key_of(pc, ps, &pa, &pb);
        Py_DECREF(pc);
        Py_XDECREF(ps);
        if (r < 0)
            goto fail;
        GET(pid, ex, ex_slots, X_PID);
        if ((p = PyLong_AsLongLong(pid)) == -1 && PyErr_Occurred())
            goto fail;
        if (self->peers.n >= self->memo_size * 4)
            t_clear(&self->peers);
        if (t_set(&self->peers, pa, pb, p) < 0)
            goto fail;
    } else if (self->peers.n) {
        GET(role, ex, ex_slots, X_ROLE);
        long long peer = 0;
        if ((r = eq_member(role, M.role_client)) < 0)
            goto fail;
        if (r && t_pop(&self->peers, a, b, &peer) && peer) {
            PyObject *pp = PyLong_FromLongLong(peer);
            if (pp == NULL)
                goto fail;
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++)
                set_span_slot(PyList_GET_ITEM(spans, i), S_PEER_PID, pp);
            Py_DECREF(pp);
        }
    }
    if ((r = PyObject_IsTrue(sampled)) < 0)
        goto fail;
    if (r)
        cnt->sampled_exchanges++;
    else
        cnt->unsampled_exchanges++;
    cnt->spans += PyList_GET_SIZE(spans);
    GET(v, first, span_slots, S_SPAN_ID);
    if ((late = remember(self, a, b, conn, start, trace, v, end_ns, sampled)) == NULL)
        goto fail;
    if (PyList_GET_SIZE(late) && PyList_SetSlice(spans, PyList_GET_SIZE(spans), PyList_GET_SIZE(spans), late) < 0)
        goto fail;
    goto done;
fail:
    Py_CLEAR(spans);
done:
    Py_XDECREF(parsed);
    Py_XDECREF(kind);
    Py_XDECREF(tmp);
    Py_XDECREF(late);
    return spans;
}

/* A record that raised: counted, and the reason kept for `kspan doctor`/logs. 0, or -1 when the
 * error is no Exception (KeyboardInterrupt, SystemExit: those propagate). */
static int count_error(Feeder *self) {
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    CNT(self)->internal_errors++;
    PyObject *name = v ? PyType_GetName(Py_TYPE(v)) : NULL;
    PyObject *msg = name ? PyUnicode_FromFormat("%U: %S", name, v) : NULL;
    if (msg == NULL) {
        PyErr_Clear(); /* str(e) itself raised: the type's name alone */
        msg = name ? Py_NewRef(name) : PyUnicode_FromString("internal error");
    }
    if (msg != NULL)
        Py_SETREF(self->last_error, msg);
    PyErr_Clear();
    Py_XDECREF(name);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return 0;
}

/* One record's spans (new list), or NULL only for an error that must propagate. */
static PyObject *feed_one(Feeder *self, PyObject *ex) {
    CNT(self)->exchanges++;
    PyObject *out;
    int ids;
    if (PyObject_TypeCheck(ex, M.ex_t))
        ids = truth_slot(ex, ex_slots, X_KERNEL_IDS);
    else {
        PyObject *v = PyObject_GetAttr(ex, a_kernel_ids);
        ids = v == NULL ? -1 : PyObject_IsTrue(v);
        Py_XDECREF(v);
        if (ids > 0) {
            PyErr_SetString(PyExc_TypeError, "a record with kernel ids must be a correlator.records.Exchange");
            ids = -1;
        }
    }
    if (ids < 0)
        out = NULL;
    else if (ids)
        out = identified(self, ex);
    else {
        out = PyObject_CallOneArg(self->slow, ex);
        if (out != NULL && !PyList_Check(out)) {
            PyErr_SetString(PyExc_TypeError, "slow must return a list");
            Py_CLEAR(out);
        }
    }
    if (out == NULL && count_error(self) == 0)
        out = PyList_New(0);
    return out;
}

static PyObject *fd_feed(Feeder *self, PyObject *ex) { return feed_one(self, ex); }

static PyObject *fd_feed_batch(Feeder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "feed_batch(exchanges, spans_out: list)");
        return NULL;
    }
    PyObject *out = args[1], *ex, *it = PyObject_GetIter(args[0]);
    if (it == NULL)
        return NULL;
    while ((ex = PyIter_Next(it)) != NULL) {
        PyObject *spans = feed_one(self, ex);
        Py_DECREF(ex);
        if (spans == NULL)
            break;
        Py_ssize_t n = PyList_GET_SIZE(out);
        int r = PyList_GET_SIZE(spans) ? PyList_SetSlice(out, n, n, spans) : 0;
        Py_DECREF(spans);
        if (r < 0)
            break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *fd_peer_pids(Feeder *self, void *closure) { return PyLong_FromSsize_t(self->peers.n); }

static PyObject *fd_get_last_error(Feeder *self, void *closure) { return Py_NewRef(self->last_error); }

static int fd_set_last_error(Feeder *self, PyObject *v, void *closure) {
    if (v == NULL || !PyUnicode_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "last_error must be a str");
        return -1;
    }
    Py_SETREF(self->last_error, Py_NewRef(v));
    return 0;
}

static PyGetSetDef fd_getset[] = {
    {"peer_pids", (getter)fd_peer_pids, NULL, "client exchanges whose local server end's pid is kept", NULL},
    {"last_error", (getter)fd_get_last_error, (setter)fd_set_last_error,
     "the last record error, 'Type: message' (\"\" before any)", NULL},
    {NULL},
};

static PyMemberDef fd_members[] = {
    {"heads", T_OBJECT_EX, offsetof(Feeder, heads), READONLY, "the head memo: request head -> _Parsed"},
    {"shapes", T_OBJECT_EX, offsetof(Feeder, shapes), READONLY,
     "the shape memo: head without its target -> _Parsed standing for the shape, or None"},
    {NULL},
};

static PyMethodDef fd_methods[] = {
    {"feed", (PyCFunction)fd_feed, METH_O, "feed(ex) -> list[Span]: one exchange record's spans"},
    {"feed_batch", (PyCFunction)(void (*)(void))fd_feed_batch, METH_FASTCALL,
     "feed_batch(exchanges, spans_out): feed() of each, in order, their spans appended to spans_out"},
    {"parsed", (PyCFunction)fd_parsed, METH_O, "parsed(head) -> _Parsed, from the head memo"},
    {NULL},
};

static PyTypeObject FeederType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "correlator._spans.Feeder",
    .tp_basicsize = sizeof(Feeder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One correlator's per-record path: exchange records in, spans out.",
    .tp_traverse = (traverseproc)fd_traverse,
    .tp_clear = (inquiry)fd_clear,
    .tp_dealloc = (destructor)fd_dealloc,
    .tp_methods = fd_methods,
    .tp_members = fd_members,
    .tp_getset = fd_getset,
    .tp_init = (initproc)fd_init,
    .tp_new = PyType_GenericNew,
};

/* ---- setup --------------------------------------------------------------------------------- */

static PyObject *setup(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {
        "span", "span_fields", "exchange", "request", "response", "parsed", "request_slots", "parsed_slots",
        "kind_server", "kind_client",
        "unset", "error", "role_server", "peer_kind", "closed", "timeout", "evicted", "aborted_err",
        "err_incomplete", "status_messages", "overflow_route", "other_method", "source_attr",
        "framing_complete", "parse_final_response", "parse_responses", "route_template", "redact_query",
        "role_client", "hint", "exchange_id", NULL};
    PyTypeObject *span_t, *ex_t, *req_t, *resp_t, *parsed_t, *hint_t, *exid_t;
    PyObject *fields, *req_names, *parsed_names, *o[21];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$O!O!O!O!O!O!O!O!OOOOOOOOOO!OO!OOOOOOOOOO!O!", kwlist, &PyType_Type,
                                     &span_t, &PyTuple_Type, &fields, &PyType_Type, &ex_t, &PyType_Type, &req_t,
                                     &PyType_Type, &resp_t, &PyType_Type, &parsed_t, &PyTuple_Type, &req_names,
                                     &PyTuple_Type, &parsed_names, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                                     &o[6], &o[7], &o[8], &PyDict_Type, &o[9], &o[10], &PyDict_Type, &o[11], &o[12],
                                     &o[13], &o[14], &o[15], &o[16], &o[17], &o[18], &o[19], &o[20], &PyType_Type,
                                     &hint_t, &PyType_Type, &exid_t))
        return NULL;
    origin_line_fn ol = (origin_line_fn)PyCapsule_Import("correlator._red._origin_line", 0);
    if (ol == NULL)
        return NULL;
    if (PyTuple_GET_SIZE(fields) != S_N) {
        PyErr_Format(PyExc_TypeError, "Span has %zd fields, correlator/_spans.c sets %d", PyTuple_GET_SIZE(fields), S_N);
        return NULL;
    }
    for (int i = 0; i < S_N; i++) {
        PyObject *f = PyTuple_GET_ITEM(fields, i);
        if (!PyUnicode_Check(f) || PyUnicode_CompareWithASCIIString(f, span_slots[i].name) != 0) {
            PyErr_Format(PyExc_TypeError, "Span field %d is %R, correlator/_spans.c expects %s", i, f, span_slots[i].name);
            return NULL;
        }
    }
    if (PyObject_HasAttrString((PyObject *)span_t, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "Span has a __post_init__ that correlator/_spans.c would skip");
        return NULL;
    }
    if (resolve(span_t, span_slots, S_N) < 0 || resolve(ex_t, ex_slots, X_N) < 0 || resolve(req_t, req_slots, Q_N) < 0 ||
        resolve(resp_t, resp_slots, R_N) < 0 || resolve(parsed_t, parsed_slots, P_N) < 0 ||
        resolve(hint_t, hint_slots, H_N) < 0 || resolve(exid_t, exid_slots, I_N) < 0 ||
        resolve_all(req_t, req_names, req_all, &req_all_n) < 0 ||
        resolve_all(parsed_t, parsed_names, parsed_all, &parsed_all_n) < 0)
        return NULL;
    Py_XSETREF(all_names, PyTuple_Pack(2, req_names, parsed_names));
    if (all_names == NULL)
        return NULL;
    /* eq_member's premise: these are members of an Enum (one object per value). */
    PyObject *enum_mod = PyImport_ImportModule("enum");
    PyObject *enum_t = enum_mod ? PyObject_GetAttrString(enum_mod, "Enum") : NULL;
    Py_XDECREF(enum_mod);
    if (enum_t == NULL)
        return NULL;
    PyObject *members[] = {o[4], o[5], o[6], o[7], o[8], o[20]}; /* roles, PEER, CLOSED, TIMEOUT, EVICTED */
    for (size_t i = 0; i < sizeof members / sizeof members[0]; i++) {
        int is = PyObject_IsInstance(members[i], enum_t);
        if (is <= 0) {
            Py_DECREF(enum_t);
            if (is == 0)
                PyErr_Format(PyExc_TypeError, "%R is not an enum member", members[i]);
            return NULL;
        }
    }
    Py_DECREF(enum_t);
    PyObject **dst[] = {&M.kind_server, &M.kind_client, &M.unset, &M.error, &M.role_server, &M.peer_kind, &M.closed,
                        &M.timeout, &M.evicted, &M.aborted_err, &M.err_incomplete, &M.status_messages,
                        &M.overflow_route, &M.other_method, &M.source_attr, &M.framing_complete,
                        &M.parse_final_response, &M.parse_responses, &M.route_template, &M.redact_query,
                        &M.role_client};
    for (size_t i = 0; i < sizeof dst / sizeof dst[0]; i++)
        Py_XSETREF(*dst[i], Py_NewRef(o[i]));
    Py_XSETREF(M.span_t, (PyTypeObject *)Py_NewRef(span_t));
    Py_XSETREF(M.ex_t, (PyTypeObject *)Py_NewRef(ex_t));
    Py_XSETREF(M.req_t, (PyTypeObject *)Py_NewRef(req_t));
    Py_XSETREF(M.resp_t, (PyTypeObject *)Py_NewRef(resp_t));
    Py_XSETREF(M.parsed_t, (PyTypeObject *)Py_NewRef(parsed_t));
    Py_XSETREF(M.hint_t, (PyTypeObject *)Py_NewRef(hint_t));
    Py_XSETREF(M.exid_t, (PyTypeObject *)Py_NewRef(exid_t));
    M.origin_line = ol;
    M.ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(**constants): the classes, enum members and callbacks span assembly uses; once, at import"},
    {"retarget", (PyCFunction)(void (*)(void))retarget, METH_FASTCALL,
     "retarget(parsed, target) -> _Parsed: a one-request parse with another origin-form target"},
    {"has_no_body", (PyCFunction)(void (*)(void))has_no_body, METH_FASTCALL,
     "has_no_body(method, status) -> bool: RFC 9112 6.3, responses that end at their head"},
    {NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_spans", NULL, -1, mod_methods};

PyMODINIT_FUNC PyInit__spans(void) {
    for (size_t i = 0; i < sizeof interned / sizeof interned[0]; i++)
        if ((*interned[i].p = PyUnicode_InternFromString(interned[i].s)) == NULL)
            return NULL;
    if ((b_empty = PyBytes_FromStringAndSize("", 0)) == NULL || (b_head = PyBytes_FromString("HEAD")) == NULL ||
        (b_connect = PyBytes_FromString("CONNECT")) == NULL || (i_zero = PyLong_FromLong(0)) == NULL ||
        (i_minus_one = PyLong_FromLong(-1)) == NULL || (i_80 = PyLong_FromLong(80)) == NULL ||
        (i_443 = PyLong_FromLong(443)) == NULL)
        return NULL;
    if (PyType_Ready(&AsmType) < 0 || PyType_Ready(&CountersType) < 0 || PyType_Ready(&MemoryType) < 0 ||
        PyType_Ready(&FeederType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    Py_ssize_t nc = sizeof counter_names / sizeof counter_names[0] - 1;
    PyObject *names = PyTuple_New(nc);
    for (Py_ssize_t i = 0; names != NULL && i < nc; i++) {
        PyObject *n = PyUnicode_InternFromString(counter_names[i]);
        if (n == NULL)
            Py_CLEAR(names);
        else
            PyTuple_SET_ITEM(names, i, n);
    }
    if (names == NULL || PyModule_AddObject(m, "COUNTER_FIELDS", names) < 0 ||
        PyModule_AddObjectRef(m, "Assembler", (PyObject *)&AsmType) < 0 ||
        PyModule_AddObjectRef(m, "Counters", (PyObject *)&CountersType) < 0 ||
        PyModule_AddObjectRef(m, "Memory", (PyObject *)&MemoryType) < 0 ||
        PyModule_AddObjectRef(m, "Feeder", (PyObject *)&FeederType) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
