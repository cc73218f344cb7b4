/* correlator/_spans.c: the HTTP/1 spans of one exchange record, the correlator's per-record
 * hot path (correlator/correlator.py calls it for every exchange).
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
    X_REMOTE_PORT, X_REQ_START_NS, X_RESP_START_NS, X_REQ_BYTES, X_RESP_BYTES, X_STATUS, X_PARENT,
    X_RESP_HEAD, X_RESP_TAIL, X_RESP_HEAD_TRUNCATED, X_N
};
static Slot ex_slots[X_N] = {
    {"pid"}, {"role"}, {"end"}, {"tls"}, {"conn_id"}, {"family"}, {"local_addr"}, {"local_port"},
    {"remote_addr"}, {"remote_port"}, {"req_start_ns"}, {"resp_start_ns"}, {"req_bytes"},
    {"resp_bytes"}, {"status"}, {"parent"}, {"resp_head"}, {"resp_tail"}, {"resp_head_truncated"},
};

enum { Q_METHOD, Q_TARGET, Q_VERSION, Q_CHUNKED, Q_HEAD_LEN, Q_COMPLETE, Q_N };
static Slot req_slots[Q_N] = {{"method"}, {"target"}, {"version"}, {"chunked"}, {"head_len"}, {"complete"}};

enum { R_STATUS, R_VERSION, R_CONTENT_LENGTH, R_HEAD_END, R_COMPLETE, R_N };
static Slot resp_slots[R_N] = {{"status"}, {"version"}, {"content_length"}, {"head_end"}, {"complete"}};

enum { P_REQS, P_MEMO, P_HEADS, P_N };
static Slot parsed_slots[P_N] = {{"reqs"}, {"memo"}, {"heads"}};

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

static struct {
    int ready;
    PyTypeObject *span_t, *ex_t, *req_t, *resp_t, *parsed_t;
    PyObject *kind_server, *kind_client, *unset, *error, *role_server, *peer_kind, *closed, *timeout, *evicted;
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
static PyObject *a_kind, *a_pid;
static PyObject *s_empty, *s_https, *s_http_name, *s_mapped_prefix, *b_empty, *b_head, *b_connect, *i_zero,
    *i_minus_one, *i_80, *i_443;

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
    {&c_no_response, "no_response"}, {&a_kind, "kind"}, {&a_pid, "pid"},
    {&s_empty, ""}, {&s_https, "https"}, {&s_http_name, "HTTP"}, {&s_mapped_prefix, "::ffff:"},
};

/* ---- small helpers ----------------------------------------------------------------------- */

/* o <op> c for an int o (any object: the comparison is Python's when o is not a plain int). */
static int cmp_long(PyObject *o, long c, int op) {
    if (PyLong_CheckExact(o)) {
        int ov;
        long v = PyLong_AsLongAndOverflow(o, &ov);
        if (v == -1 && PyErr_Occurred())
            return -1;
        int s = ov ? ov : (v > c) - (v < c);
        switch (op) {
        case Py_LT: return s < 0;
        case Py_LE: return s <= 0;
        case Py_EQ: return s == 0;
        case Py_NE: return s != 0;
        case Py_GT: return s > 0;
        default: return s >= 0;
        }
    }
    PyObject *k = PyLong_FromLong(c);
    if (k == NULL)
        return -1;
    int r = PyObject_RichCompareBool(o, k, op);
    Py_DECREF(k);
    return r;
}

static int eq(PyObject *a, PyObject *b) { return PyObject_RichCompareBool(a, b, Py_EQ); }

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
    if (n >= 7 && PyUnicode_Tailmatch(addr, s_mapped_prefix, 0, 7, -1) == 1) {
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
    PyObject *hp;
    if (colon >= 0)
        hp = other ? PyUnicode_FromFormat("[%U]:%S", host, port) : PyUnicode_FromFormat("[%U]", host);
    else
        hp = other ? PyUnicode_FromFormat("%U:%S", host, port) : Py_NewRef(host);
    if (hp == NULL)
        return NULL;
    PyObject *full = query != Py_None ? PyUnicode_FromFormat("%U://%U%U?%U", scheme, hp, path, query)
                                      : PyUnicode_FromFormat("%U://%U%U", scheme, hp, path);
    Py_DECREF(hp);
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
    int closed = eq(end, M.closed);
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

/* ---- the assembler: one per Correlator ---------------------------------------------------- */

enum { QUERY_KEEP, QUERY_REDACT, QUERY_DROP };

/* The assembler's objects, which are also its constructor's keywords (in this order):
 * stats       CorrelatorStats: the rare counters are bumped here
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
    if (other)
        name = route ? PyUnicode_FromFormat("HTTP %S", route) : Py_NewRef(s_http_name);
    else
        name = route ? PyUnicode_FromFormat("%S %S", method, route) : Py_NewRef(method);
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
                if (aborted_err(end, &terr) < 0 || (r = eq(end, M.closed)) < 0)
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
                GET(rb, ex, ex_slots, X_RESP_BYTES);
                got = PyNumber_Subtract(rb, he);
            } else
                got = Py_NewRef(i_minus_one);
            if (got == NULL)
                goto fail;
            int have = cmp_long(got, 0, Py_GE);
            if (have >= 0 && cl != Py_None) {
                PyObject *size = cl;
                if (have && (have = PyObject_RichCompareBool(got, cl, Py_LT)) > 0)
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
    if ((start = PyNumber_Add(rs, self->offset)) == NULL || (end_w = PyNumber_Add(c->end_ns, self->offset)) == NULL)
        goto fail;
    int ends_later = PyObject_RichCompareBool(end_w, start, Py_GT);
    if (ends_later < 0)
        goto fail;
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
            if ((pkind = PyObject_GetAttr(parent, a_kind)) == NULL)
                goto fail;
            r = eq(pkind, M.peer_kind);
            Py_DECREF(pkind);
            if (r < 0)
                goto fail;
            if (r) {
                if ((ppid = PyObject_GetAttr(parent, a_pid)) == NULL)
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
 * kernel fixed them (Correlator._feed_identified), or the linker sets them later. */
static PyObject *asm_spans(Asm *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "spans(ex, parsed, end_ns, sid, trace, parent, source, sampled)");
        return NULL;
    }
    PyObject *ex = args[0], *parsed = args[1], *sid = args[3], *trace = args[4], *parent = args[5];
    PyObject *source = args[6], *sampled = args[7];
    if (!PyObject_TypeCheck(ex, M.ex_t) || !PyObject_TypeCheck(parsed, M.parsed_t)) {
        PyErr_SetString(PyExc_TypeError, "spans: an Exchange and a _Parsed");
        return NULL;
    }
    PyObject *reqs, *end, *resp_head, *v, *role;
    PyObject *resps = NULL, *resp = Py_None, *methods = NULL, *out = NULL, *idx = NULL;
    Ctx c = {ex, parsed, NULL, args[2], NULL, 0, 0, 0};
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
    if ((c.server = eq(role, M.role_server)) < 0)
        goto fail;
    GET(c.tls, ex, ex_slots, X_TLS);
    GET(end, ex, ex_slots, X_END);
    c.end = end;
    if ((r = eq(end, M.timeout)) < 0)
        goto fail;
    if (r) {
        if (bump(self->stats, c_timeouts, 1) < 0)
            goto fail;
    } else {
        if ((r = eq(end, M.evicted)) < 0 || (r && bump(self->stats, c_evicted, 1) < 0))
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

/* ---- setup --------------------------------------------------------------------------------- */

static PyObject *setup(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {
        "span", "span_fields", "exchange", "request", "response", "parsed", "request_slots", "parsed_slots",
        "kind_server", "kind_client",
        "unset", "error", "role_server", "peer_kind", "closed", "timeout", "evicted", "aborted_err",
        "err_incomplete", "status_messages", "overflow_route", "other_method", "source_attr",
        "framing_complete", "parse_final_response", "parse_responses", "route_template", "redact_query", NULL};
    PyTypeObject *span_t, *ex_t, *req_t, *resp_t, *parsed_t;
    PyObject *fields, *req_names, *parsed_names, *o[21];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$O!O!O!O!O!O!O!O!OOOOOOOOOO!OO!OOOOOOOO", kwlist, &PyType_Type, &span_t,
                                     &PyTuple_Type, &fields, &PyType_Type, &ex_t, &PyType_Type, &req_t, &PyType_Type,
                                     &resp_t, &PyType_Type, &parsed_t, &PyTuple_Type, &req_names, &PyTuple_Type,
                                     &parsed_names, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                                     &o[6], &o[7], &o[8], &PyDict_Type, &o[9], &o[10], &PyDict_Type, &o[11], &o[12],
                                     &o[13], &o[14], &o[15], &o[16], &o[17], &o[18], &o[19]))
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
        resolve_all(req_t, req_names, req_all, &req_all_n) < 0 ||
        resolve_all(parsed_t, parsed_names, parsed_all, &parsed_all_n) < 0)
        return NULL;
    Py_XSETREF(all_names, PyTuple_Pack(2, req_names, parsed_names));
    if (all_names == NULL)
        return NULL;
    PyObject **dst[] = {&M.kind_server, &M.kind_client, &M.unset, &M.error, &M.role_server, &M.peer_kind, &M.closed,
                        &M.timeout, &M.evicted, &M.aborted_err, &M.err_incomplete, &M.status_messages,
                        &M.overflow_route, &M.other_method, &M.source_attr, &M.framing_complete,
                        &M.parse_final_response, &M.parse_responses, &M.route_template, &M.redact_query};
    for (size_t i = 0; i < sizeof dst / sizeof dst[0]; i++)
        Py_XSETREF(*dst[i], Py_NewRef(o[i]));
    Py_XSETREF(M.span_t, (PyTypeObject *)Py_NewRef(span_t));
    Py_XSETREF(M.ex_t, (PyTypeObject *)Py_NewRef(ex_t));
    Py_XSETREF(M.req_t, (PyTypeObject *)Py_NewRef(req_t));
    Py_XSETREF(M.resp_t, (PyTypeObject *)Py_NewRef(resp_t));
    Py_XSETREF(M.parsed_t, (PyTypeObject *)Py_NewRef(parsed_t));
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
    if (PyType_Ready(&AsmType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Assembler", (PyObject *)&AsmType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
