/* correlator/_red.c: a metric record (an exchange head sampling dropped) into the RedFacts that
 * the RED and service-graph metrics take from it, the correlator's per-record path for most
 * records under a ratio sampler (Correlator.metric calls it; correlator/red.py documents what the
 * facts are). The one implementation of that path: what it cannot memoise per record, the
 * request head's part, comes from correlator.py's _metric_head (the span path's derivation).
 *
 * What one record costs: a scan of its request line, a memo lookup by the head without its
 * target (ids in paths make heads unique, their shape repeats), the target's route
 * (RouteTable.match and/or correlator/_routes.c's route_template), the route cap, one lookup of
 * the attribute set by head and outcome, and the RedFacts tuple itself. Every memo is a dict
 * cleared when full (memo_size entries), as the correlator's others.
 *
 * Memo entries are Heads, compared by identity: a head's RED part (method, route, scheme and
 * version, the client's server.address/port) with, for a route the heuristic made, that route
 * (to pass the cap) and the same head with OVERFLOW_ROUTE (what the cap's refusal makes of it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <sys/socket.h>

/* correlator.records.MetricExchange's fields, in order (setup checks them) */
enum {
    MX_PID, MX_ROLE, MX_END, MX_TLS, MX_STATUS, MX_RESPONDED, MX_START_NS, MX_END_NS, MX_FAMILY, MX_LOCAL_ADDR,
    MX_LOCAL_PORT, MX_REMOTE_ADDR, MX_REMOTE_PORT, MX_PARENT_KIND, MX_PARENT_PID, MX_SPAN_ID, MX_PARENT_SPAN_ID,
    MX_REQ_HEAD, MX_N
};
static const char *mx_fields[MX_N] = {
    "pid", "role", "end", "tls", "status", "responded", "start_ns", "end_ns", "family", "local_addr",
    "local_port", "remote_addr", "remote_port", "parent_kind", "parent_pid", "span_id", "parent_span_id",
    "req_head",
};
/* correlator.red.RedFacts's */
enum { F_PID, F_SERVER, F_ATTRS, F_SECONDS, F_FAILED, F_SPAN_ID, F_PARENT_SPAN_ID, F_PEER_PID, F_LOCAL_PEER, F_PEER,
       F_LOCAL_PORT, F_N };
static const char *facts_fields[F_N] = {
    "pid", "server", "attrs", "seconds", "failed", "span_id", "parent_span_id", "peer_pid", "local_peer", "peer",
    "local_port",
};
/* correlator.red.HeadPart's */
enum { H_METHOD, H_ROUTE, H_TAIL, H_HOSTPORT, H_N };
static const char *head_fields[H_N] = {"method", "route", "tail", "hostport"};

/* ---- module state (set once by setup) ---------------------------------------------------- */

static struct {
    int ready;
    PyTypeObject *facts_t;
    PyObject *format_addr, *aborted_err, *err_incomplete, *overflow_route;
    long closed, server, peer;
} M;

static PyObject *k_route, *k_status_code, *k_error_type, *k_server_address, *k_server_port;
static PyObject *s_empty, *s_unknown_service, *s_loopback4, *empty_tuple, *overflow_attrs, *zero;

static int check_fields(PyObject *given, const char **want, Py_ssize_t n, const char *what) {
    if (!PyTuple_Check(given) || PyTuple_GET_SIZE(given) != n) {
        PyErr_Format(PyExc_TypeError, "%s must have %zd fields (correlator/_red.c reads them by position)", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyTuple_GET_ITEM(given, i);
        if (!PyUnicode_Check(f) || PyUnicode_CompareWithASCIIString(f, want[i]) != 0) {
            PyErr_Format(PyExc_TypeError, "%s field %zd is not %s, as correlator/_red.c reads it", what, i, want[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *setup(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"red_facts", "facts_fields", "metric_fields", "head_fields", "format_addr", "aborted_err",
                             "err_incomplete", "overflow_route", "closed", "server", "peer", NULL};
    PyObject *facts_t, *ff, *mf, *hf, *format_addr, *aborted, *incomplete, *overflow;
    long closed, server, peer;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$O!OOOOO!UUlll", kwlist, &PyType_Type, &facts_t, &ff, &mf, &hf,
                                     &format_addr, &PyDict_Type, &aborted, &incomplete, &overflow, &closed, &server,
                                     &peer))
        return NULL;
    PyTypeObject *t = (PyTypeObject *)facts_t;
    /* RedFacts is filled in place: a tuple subclass with no state of its own */
    if (!PyType_IsSubtype(t, &PyTuple_Type) || t->tp_basicsize != PyTuple_Type.tp_basicsize || t->tp_dictoffset) {
        PyErr_SetString(PyExc_TypeError, "red_facts must be a NamedTuple");
        return NULL;
    }
    if (check_fields(ff, facts_fields, F_N, "RedFacts") < 0 || check_fields(mf, mx_fields, MX_N, "MetricExchange") < 0 ||
        check_fields(hf, head_fields, H_N, "HeadPart") < 0)
        return NULL;
    PyObject *pair = PyTuple_Pack(2, k_route, overflow);
    if (pair == NULL)
        return NULL;
    Py_XSETREF(overflow_attrs, PyTuple_Pack(1, pair));
    Py_DECREF(pair);
    if (overflow_attrs == NULL)
        return NULL;
    Py_XSETREF(M.facts_t, (PyTypeObject *)Py_NewRef(facts_t));
    Py_XSETREF(M.format_addr, Py_NewRef(format_addr));
    Py_XSETREF(M.aborted_err, Py_NewRef(aborted));
    Py_XSETREF(M.err_incomplete, Py_NewRef(incomplete));
    Py_XSETREF(M.overflow_route, Py_NewRef(overflow));
    M.closed = closed;
    M.server = server;
    M.peer = peer;
    M.ready = 1;
    Py_RETURN_NONE;
}

/* ---- heads ------------------------------------------------------------------------------- */

typedef struct Head {
    PyObject_HEAD
    PyObject *method;     /* ("http.request.method", method) */
    PyObject *route;      /* server: (("http.route", route),) or () */
    PyObject *tail;       /* url.scheme (server), network.protocol.version */
    PyObject *hostport;   /* client: server.address/port from Host or the target's authority; else NULL */
    PyObject *peer;       /* client with hostport: the server.address text (a virtual node's name) */
    PyObject *auto_route; /* the heuristic's route, which must pass the cap; else NULL */
    struct Head *overflow; /* this head with OVERFLOW_ROUTE, once needed */
    int base;             /* a server's head shape: its route comes from each target */
} Head;

static void head_dealloc(Head *self) {
    Py_XDECREF(self->method);
    Py_XDECREF(self->route);
    Py_XDECREF(self->tail);
    Py_XDECREF(self->hostport);
    Py_XDECREF(self->peer);
    Py_XDECREF(self->auto_route);
    Py_XDECREF(self->overflow);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Not GC-tracked: what a Head holds (attribute tuples of str and int, other Heads) makes no cycle. */
static PyTypeObject Head_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "correlator._red._Head",
    .tp_basicsize = sizeof(Head),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)head_dealloc,
};

static Head *head_new(PyObject *method, PyObject *route, PyObject *tail, PyObject *hostport, PyObject *auto_route,
                      int base) {
    if (!PyTuple_Check(route) || !PyTuple_Check(tail) || (hostport != NULL && !PyTuple_Check(hostport))) {
        PyErr_SetString(PyExc_TypeError, "a head part's route, tail and hostport must be tuples");
        return NULL;
    }
    Head *h = PyObject_New(Head, &Head_Type);
    if (h == NULL)
        return NULL;
    h->method = Py_NewRef(method);
    h->route = Py_NewRef(route);
    h->tail = Py_NewRef(tail);
    h->hostport = Py_XNewRef(hostport);
    h->peer = NULL;
    h->auto_route = Py_XNewRef(auto_route);
    h->overflow = NULL;
    h->base = base;
    if (hostport != NULL) {
        /* str(hostport[0][1]) */
        PyObject *first = PyTuple_GET_SIZE(hostport) ? PyTuple_GET_ITEM(hostport, 0) : NULL;
        if (first == NULL || !PyTuple_Check(first) || PyTuple_GET_SIZE(first) != 2) {
            PyErr_SetString(PyExc_TypeError, "a head part's hostport must start with (\"server.address\", host)");
            Py_DECREF(h);
            return NULL;
        }
        if ((h->peer = PyObject_Str(PyTuple_GET_ITEM(first, 1))) == NULL) {
            Py_DECREF(h);
            return NULL;
        }
    }
    return h;
}

/* The same head with OVERFLOW_ROUTE as its route (borrowed; made once). */
static Head *overflow_of(Head *h) {
    if (h->overflow == NULL)
        h->overflow = head_new(h->method, overflow_attrs, h->tail, h->hostport, NULL, 0);
    return h->overflow;
}

/* ---- the path ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *derive;         /* Correlator._metric_head: head, server, tls -> (HeadPart, auto route) or None */
    PyObject *admit;          /* RouteCap.admit, shared with the span path */
    PyObject *route_template; /* correlator/_routes.c's */
    PyObject *match;          /* RouteTable.match, or None without templates */
    PyObject *heads;          /* (head, server, tls) -> Head, or None: not HTTP/1.x */
    PyObject *shapes;         /* server and tls flags + the head without its target -> Head (a base for servers) or None */
    PyObject *routes;         /* (base, route, from the heuristic) -> Head */
    PyObject *facts;          /* (Head, status, end, responded[, peer address, port]) -> (attrs, failed) */
    PyObject *addrs4, *addrs6; /* raw address -> text */
    PyObject *last_error;      /* str, or NULL before metric_batch skipped a record */
    Py_ssize_t memo_size;
    int auto_routes;
    Py_ssize_t records;  /* metric records fed */
    Py_ssize_t unparsed; /* of them, request head not HTTP/1.x: no facts */
} Path;

#define PATH_OBJECTS(X) X(derive) X(admit) X(route_template) X(match) X(heads) X(shapes) X(routes) X(facts) \
    X(addrs4) X(addrs6) X(last_error)
#define P_VISIT(f) Py_VISIT(self->f);
#define P_CLEAR(f) Py_CLEAR(self->f);

static int path_traverse(Path *self, visitproc visit, void *arg) {
    PATH_OBJECTS(P_VISIT)
    return 0;
}

static int path_clear(Path *self) {
    PATH_OBJECTS(P_CLEAR)
    return 0;
}

static void path_dealloc(Path *self) {
    PyObject_GC_UnTrack(self);
    path_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int path_init(Path *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"derive", "admit", "route_template", "match", "auto_routes", "memo_size", NULL};
    PyObject *derive, *admit, *route_template, *match;
    int auto_routes;
    Py_ssize_t memo_size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOpn", kwlist, &derive, &admit, &route_template, &match,
                                     &auto_routes, &memo_size))
        return -1;
    if (!M.ready) {
        PyErr_SetString(PyExc_RuntimeError, "correlator._red.setup() was not called");
        return -1;
    }
    if (memo_size < 1) {
        PyErr_SetString(PyExc_ValueError, "memo_size must be >= 1");
        return -1;
    }
    path_clear(self);
    self->derive = Py_NewRef(derive);
    self->admit = Py_NewRef(admit);
    self->route_template = Py_NewRef(route_template);
    self->match = Py_NewRef(match);
    self->auto_routes = auto_routes;
    self->memo_size = memo_size;
    self->records = self->unparsed = 0;
    if ((self->heads = PyDict_New()) == NULL || (self->shapes = PyDict_New()) == NULL ||
        (self->routes = PyDict_New()) == NULL || (self->facts = PyDict_New()) == NULL ||
        (self->addrs4 = PyDict_New()) == NULL || (self->addrs6 = PyDict_New()) == NULL)
        return -1;
    return 0;
}

/* memo[key] = value, the memo cleared first when it holds max entries. */
static int memo_put(PyObject *memo, PyObject *key, PyObject *value, Py_ssize_t max) {
    if (PyDict_GET_SIZE(memo) >= max)
        PyDict_Clear(memo);
    return PyDict_SetItem(memo, key, value);
}

/* An address's text (new reference), memoised per family. */
static PyObject *addr(Path *self, long family, PyObject *raw) {
    PyObject *memo = family == AF_INET ? self->addrs4 : family == AF_INET6 ? self->addrs6 : NULL;
    PyObject *a;
    if (memo != NULL) {
        if ((a = PyDict_GetItemWithError(memo, raw)) != NULL)
            return Py_NewRef(a);
        if (PyErr_Occurred())
            return NULL;
    }
    PyObject *fam = PyLong_FromLong(family);
    if (fam == NULL)
        return NULL;
    PyObject *fargs[2] = {fam, raw};
    a = PyObject_Vectorcall(M.format_addr, fargs, 2, NULL);
    Py_DECREF(fam);
    if (a != NULL && !PyUnicode_Check(a)) {
        PyErr_SetString(PyExc_TypeError, "format_addr must return a str");
        Py_CLEAR(a);
    }
    if (a != NULL && memo != NULL && memo_put(memo, raw, a, self->memo_size * 4) < 0)
        Py_CLEAR(a);
    return a;
}

/* The head part of one exact head (new reference: a Head, or None when it is not HTTP/1.x). */
static PyObject *exact(Path *self, PyObject *head, int server, int tls) {
    PyObject *key = PyTuple_Pack(3, head, server ? Py_True : Py_False, tls ? Py_True : Py_False), *v;
    if (key == NULL)
        return NULL;
    if ((v = PyDict_GetItemWithError(self->heads, key)) != NULL) {
        Py_DECREF(key);
        return Py_NewRef(v);
    }
    if (PyErr_Occurred())
        goto fail;
    PyObject *dargs[3] = {head, server ? Py_True : Py_False, tls ? Py_True : Py_False};
    PyObject *r = PyObject_Vectorcall(self->derive, dargs, 3, NULL);
    if (r == NULL)
        goto fail;
    if (r == Py_None)
        v = r;
    else {
        PyObject *part = PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 2 ? PyTuple_GET_ITEM(r, 0) : NULL;
        PyObject *auto_route = part ? PyTuple_GET_ITEM(r, 1) : NULL;
        if (part == NULL || !PyTuple_Check(part) || PyTuple_GET_SIZE(part) != H_N) {
            PyErr_SetString(PyExc_TypeError, "derive must return (HeadPart, auto route or None) or None");
            Py_DECREF(r);
            goto fail;
        }
        PyObject *hp = PyTuple_GET_ITEM(part, H_HOSTPORT);
        v = (PyObject *)head_new(PyTuple_GET_ITEM(part, H_METHOD), PyTuple_GET_ITEM(part, H_ROUTE),
                                 PyTuple_GET_ITEM(part, H_TAIL), hp == Py_None ? NULL : hp,
                                 auto_route == Py_None ? NULL : auto_route, 0);
        Py_DECREF(r);
        if (v == NULL)
            goto fail;
    }
    if (memo_put(self->heads, key, v, self->memo_size) < 0) {
        Py_DECREF(v);
        goto fail;
    }
    Py_DECREF(key);
    return v;
fail:
    Py_DECREF(key);
    return NULL;
}

/* The two spaces of a request line whose target is an origin-form path (head[sp1 + 1:sp2], no
 * control bytes or spaces): the one rule both the metric path and the span path (correlator/_spans.c's
 * head memo, through the ORIGIN_LINE_CAPSULE) use to memoise heads without their target. */
static int origin_line(const char *h, Py_ssize_t n, Py_ssize_t *sp1, Py_ssize_t *sp2) {
    if (n < 2)
        return 0;
    const char *s = memchr(h, ' ', n), *end = h + n, *p = h;
    Py_ssize_t le = -1;
    while (p < end - 1 && (p = memchr(p, '\r', end - 1 - p)) != NULL) {
        if (p[1] == '\n') {
            le = p - h;
            break;
        }
        p++;
    }
    if (s == NULL || !(0 < s - h && s - h < le) || s[1] != '/')
        return 0;
    Py_ssize_t a = s - h, b = le - 1;
    while (b > a && h[b] != ' ')
        b--;
    if (b <= a)
        return 0;
    for (Py_ssize_t i = a + 1; i < b; i++) {
        unsigned char c = (unsigned char)h[i];
        if (c <= 0x20 || c == 0x7f)
            return 0;
    }
    *sp1 = a;
    *sp2 = b;
    return 1;
}

/* The route of a target under a server's head shape (new reference to a Head). */
static PyObject *routed(Path *self, Head *base, const char *target, Py_ssize_t tn) {
    const char *q = memchr(target, '?', tn);
    PyObject *path = PyUnicode_DecodeUTF8(target, q ? q - target : tn, "replace"), *route = NULL, *key = NULL;
    PyObject *h = NULL;
    int from_heuristic = 0;
    if (path == NULL)
        return NULL;
    if (self->match != Py_None) {
        if ((route = PyObject_CallOneArg(self->match, path)) == NULL)
            goto done;
        if (route == Py_None)
            Py_CLEAR(route);
    }
    if (route == NULL && self->auto_routes) {
        if ((route = PyObject_CallOneArg(self->route_template, path)) == NULL)
            goto done;
        if (route == Py_None)
            Py_CLEAR(route);
        from_heuristic = 1;
    }
    if (route == NULL) {
        h = Py_NewRef(base);
        goto done;
    }
    if ((key = PyTuple_Pack(3, base, route, from_heuristic ? Py_True : Py_False)) == NULL)
        goto done;
    if ((h = PyDict_GetItemWithError(self->routes, key)) != NULL) {
        Py_INCREF(h);
        goto done;
    }
    if (PyErr_Occurred())
        goto done;
    PyObject *pair = PyTuple_Pack(2, k_route, route), *attrs = pair ? PyTuple_Pack(1, pair) : NULL;
    Py_XDECREF(pair);
    if (attrs == NULL)
        goto done;
    Head *r = head_new(base->method, attrs, base->tail, base->hostport, from_heuristic ? route : NULL, 0);
    Py_DECREF(attrs);
    if (r == NULL)
        goto done;
    if (from_heuristic) {
        /* one overflow head per shape, whatever the route the cap refused */
        Head *o = overflow_of(base);
        if (o == NULL) {
            Py_DECREF(r);
            goto done;
        }
        r->overflow = (Head *)Py_NewRef(o);
    }
    h = (PyObject *)r;
    if (memo_put(self->routes, key, h, self->memo_size) < 0)
        Py_CLEAR(h);
done:
    Py_DECREF(path);
    Py_XDECREF(route);
    Py_XDECREF(key);
    return h;
}

/* A metric record's head part (new reference: a Head, or None when it is not HTTP/1.x).
 * Requests differ mostly by their target, and the metrics take only the route from it: heads
 * with an origin-form request line are memoised without their target, and the route comes from
 * the path alone. Any other head is memoised whole. */
static PyObject *head_of(Path *self, PyObject *head, int server, int tls) {
    const char *h = PyBytes_AS_STRING(head);
    Py_ssize_t n = PyBytes_GET_SIZE(head), sp1, sp2;
    if (!origin_line(h, n, &sp1, &sp2))
        return exact(self, head, server, tls);
    PyObject *key = PyBytes_FromStringAndSize(NULL, 1 + sp1 + 1 + n - sp2);
    if (key == NULL)
        return NULL;
    char *k = PyBytes_AS_STRING(key);
    k[0] = (char)(server << 1 | tls);
    memcpy(k + 1, h, sp1 + 1);
    memcpy(k + 1 + sp1 + 1, h + sp2, n - sp2);
    PyObject *v = PyDict_GetItemWithError(self->shapes, key);
    if (v == NULL) {
        if (PyErr_Occurred())
            goto fail;
        PyObject *full = exact(self, head, server, tls);
        if (full == NULL)
            goto fail;
        if (full == Py_None || !server)
            v = full; /* a client's head part does not depend on its target */
        else {
            Head *f = (Head *)full;
            v = (PyObject *)head_new(f->method, empty_tuple, f->tail, f->hostport, NULL, 1);
            Py_DECREF(full);
        }
        if (v == NULL || memo_put(self->shapes, key, v, self->memo_size) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v); /* the memo holds it */
    }
    Py_DECREF(key);
    if (v == Py_None || !((Head *)v)->base)
        return Py_NewRef(v);
    /* this record's too, so that one shape and route are one Head (and one attribute tuple); held
     * while routed() calls into Python (RouteTable.match) */
    Py_INCREF(v);
    PyObject *r = routed(self, (Head *)v, h + sp1 + 1, sp2 - sp1 - 1);
    Py_DECREF(v);
    return r;
fail:
    Py_DECREF(key);
    return NULL;
}

/* An int field's value; -1 with an error set when it is not an int (or too large). */
static long as_long(PyObject *v) {
    if (PyLong_Check(v))
        return PyLong_AsLong(v);
    PyErr_SetString(PyExc_TypeError, "an integer field is not an int");
    return -1;
}

/* (error.type or NULL, failed) as a span of the exchange would have them. Without the
 * response's tail, a response that has a status line is taken as complete unless the exchange
 * timed out or was evicted (spans check the framing; the difference is a closed, cut response).
 * *err is a new reference. */
static int outcome(PyObject *status, int code, PyObject *end_obj, long end, int responded, int server,
                   PyObject **err) {
    *err = NULL;
    if (code) {
        if (code >= 500 || (code >= 400 && !server))
            return (*err = PyObject_Str(status)) == NULL ? -1 : 1;
        if (end == M.closed)
            return 0;
    } else if (responded && end == M.closed) {
        *err = Py_NewRef(M.err_incomplete);
        return 1;
    }
    PyObject *e = PyDict_GetItemWithError(M.aborted_err, end_obj);
    if (e == NULL)
        return PyErr_Occurred() ? -1 : 0;
    *err = Py_NewRef(e);
    return 1;
}

/* (attrs, failed): the RED attribute set in exporters/metrics.py's order, and whether the
 * span would have status ERROR. New reference. */
static PyObject *attrs_of(PyObject *const *mx, Head *h, int server, PyObject *remote) {
    PyObject *status = mx[MX_STATUS], *err, *out = NULL, *code_pair = NULL, *err_pair = NULL, *hp = NULL;
    int overflow;
    long st = PyLong_Check(status) ? PyLong_AsLongAndOverflow(status, &overflow) : (overflow = 1, 0);
    if (st == -1 && PyErr_Occurred())
        return NULL;
    int code = !overflow && 100 <= st && st <= 599 ? (int)st : 0;
    long end = as_long(mx[MX_END]);
    int responded = PyObject_IsTrue(mx[MX_RESPONDED]);
    if ((end == -1 && PyErr_Occurred()) || responded < 0)
        return NULL;
    int failed = outcome(status, code, mx[MX_END], end, responded, server, &err);
    if (failed < 0)
        return NULL;
    if (code && (code_pair = PyTuple_Pack(2, k_status_code, status)) == NULL)
        goto done;
    if (err && (err_pair = PyTuple_Pack(2, k_error_type, err)) == NULL)
        goto done;
    PyObject *far = server ? h->route : h->hostport;
    if (!server && far == NULL && PyUnicode_GET_LENGTH(remote)) {
        PyObject *a = PyTuple_Pack(2, k_server_address, remote), *p = PyTuple_Pack(2, k_server_port, mx[MX_REMOTE_PORT]);
        if (a && p)
            hp = PyTuple_Pack(2, a, p);
        Py_XDECREF(a);
        Py_XDECREF(p);
        if (hp == NULL)
            goto done;
        far = hp;
    }
    Py_ssize_t nfar = far ? PyTuple_GET_SIZE(far) : 0, ntail = PyTuple_GET_SIZE(h->tail), i = 0;
    PyObject *attrs = PyTuple_New(1 + (code_pair != NULL) + (err_pair != NULL) + nfar + ntail);
    if (attrs == NULL)
        goto done;
    PyTuple_SET_ITEM(attrs, i++, Py_NewRef(h->method));
    if (code_pair)
        PyTuple_SET_ITEM(attrs, i++, Py_NewRef(code_pair));
    if (err_pair)
        PyTuple_SET_ITEM(attrs, i++, Py_NewRef(err_pair));
    for (Py_ssize_t j = 0; j < nfar; j++)
        PyTuple_SET_ITEM(attrs, i++, Py_NewRef(PyTuple_GET_ITEM(far, j)));
    for (Py_ssize_t j = 0; j < ntail; j++)
        PyTuple_SET_ITEM(attrs, i++, Py_NewRef(PyTuple_GET_ITEM(h->tail, j)));
    out = PyTuple_Pack(2, attrs, failed ? Py_True : Py_False);
    Py_DECREF(attrs);
done:
    Py_XDECREF(err);
    Py_XDECREF(code_pair);
    Py_XDECREF(err_pair);
    Py_XDECREF(hp);
    return out;
}

/* max(0, end_ns - start_ns) / 1e9 */
static PyObject *seconds(PyObject *start, PyObject *end) {
    int o1 = 0, o2 = 0;
    long long a = PyLong_Check(start) ? PyLong_AsLongLongAndOverflow(start, &o1) : (o1 = 1);
    long long b = PyLong_Check(end) ? PyLong_AsLongLongAndOverflow(end, &o2) : (o2 = 1);
    if ((a == -1 || b == -1) && PyErr_Occurred())
        return NULL;
    if (!o1 && !o2 && (a >= 0) == (b >= 0))
        return PyFloat_FromDouble(b > a ? (double)(b - a) / 1e9 : 0.0);
    /* beyond what long long subtracts without overflow: Python's arithmetic */
    PyObject *d = PyNumber_Subtract(end, start), *out = NULL;
    if (d == NULL)
        return NULL;
    int pos = PyObject_RichCompareBool(d, zero, Py_GT);
    if (pos >= 0) {
        PyObject *den = PyFloat_FromDouble(1e9);
        if (den != NULL)
            out = PyNumber_TrueDivide(pos ? d : zero, den);
        Py_XDECREF(den);
    }
    Py_DECREF(d);
    return out;
}

/* The RedFacts of one record whose head part is h (new reference). */
static PyObject *facts(Path *self, PyObject *const *mx, Head *h, int server, long family) {
    PyObject *remote = family ? addr(self, family, mx[MX_REMOTE_ADDR]) : Py_NewRef(s_empty), *key, *hit, *out = NULL;
    PyObject *local = NULL, *secs = NULL;
    if (remote == NULL)
        return NULL;
    int by_peer = !server && h->hostport == NULL;
    key = by_peer ? PyTuple_Pack(6, h, mx[MX_STATUS], mx[MX_END], mx[MX_RESPONDED], remote, mx[MX_REMOTE_PORT])
                  : PyTuple_Pack(4, h, mx[MX_STATUS], mx[MX_END], mx[MX_RESPONDED]);
    if (key == NULL)
        goto done;
    if ((hit = PyDict_GetItemWithError(self->facts, key)) != NULL)
        Py_INCREF(hit);
    else if (PyErr_Occurred() || (hit = attrs_of(mx, h, server, remote)) == NULL ||
             memo_put(self->facts, key, hit, self->memo_size) < 0) {
        Py_XDECREF(hit);
        Py_DECREF(key);
        goto done;
    }
    Py_DECREF(key);
    PyObject *peer, *peer_pid = zero;
    int local_peer = 0;
    if (server) {
        peer = remote;
        long kind = as_long(mx[MX_PARENT_KIND]);
        if (kind == -1 && PyErr_Occurred())
            goto done_hit;
        if (kind == M.peer)
            peer_pid = mx[MX_PARENT_PID];
    } else
        peer = h->peer ? h->peer : PyUnicode_GET_LENGTH(remote) ? remote : s_unknown_service;
    if (PyUnicode_GET_LENGTH(remote)) {
        if ((local_peer = PyUnicode_Tailmatch(remote, s_loopback4, 0, PY_SSIZE_T_MAX, -1)) < 0)
            goto done_hit;
        if (!local_peer)
            local_peer = PyUnicode_CompareWithASCIIString(remote, "::1") == 0;
        if (!local_peer) {
            if ((local = addr(self, family, mx[MX_LOCAL_ADDR])) == NULL)
                goto done_hit;
            if ((local_peer = PyUnicode_Compare(remote, local)) == -1 && PyErr_Occurred())
                goto done_hit;
            local_peer = local_peer == 0;
        }
    }
    if ((secs = seconds(mx[MX_START_NS], mx[MX_END_NS])) == NULL)
        goto done_hit;
    PyTypeObject *t = M.facts_t;
    if ((out = t->tp_alloc(t, F_N)) == NULL)
        goto done_hit;
    PyObject **f = ((PyTupleObject *)out)->ob_item;
    f[F_PID] = Py_NewRef(mx[MX_PID]);
    f[F_SERVER] = Py_NewRef(server ? Py_True : Py_False);
    f[F_ATTRS] = Py_NewRef(PyTuple_GET_ITEM(hit, 0));
    f[F_SECONDS] = Py_NewRef(secs);
    f[F_FAILED] = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
    f[F_SPAN_ID] = Py_NewRef(mx[MX_SPAN_ID]);
    f[F_PARENT_SPAN_ID] = Py_NewRef(mx[MX_PARENT_SPAN_ID]);
    f[F_PEER_PID] = Py_NewRef(peer_pid);
    f[F_LOCAL_PEER] = Py_NewRef(local_peer ? Py_True : Py_False);
    f[F_PEER] = Py_NewRef(peer);
    f[F_LOCAL_PORT] = Py_NewRef(mx[MX_LOCAL_PORT]);
done_hit:
    Py_DECREF(hit);
done:
    Py_DECREF(remote);
    Py_XDECREF(local);
    Py_XDECREF(secs);
    return out;
}

/* metric(mx) -> RedFacts, or None when the request head is not HTTP/1.x. */
static PyObject *path_metric(Path *self, PyObject *mxo) {
    self->records++; /* whatever it turns out to be */
    if (!PyTuple_Check(mxo) || PyTuple_GET_SIZE(mxo) != MX_N) {
        PyErr_SetString(PyExc_TypeError, "metric() takes a MetricExchange");
        return NULL;
    }
    if (self->heads == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "MetricPath was not initialised");
        return NULL;
    }
    PyObject *const *mx = ((PyTupleObject *)mxo)->ob_item, *head = mx[MX_REQ_HEAD];
    long role = as_long(mx[MX_ROLE]), family = as_long(mx[MX_FAMILY]);
    int tls = PyObject_IsTrue(mx[MX_TLS]);
    if ((role == -1 || family == -1) && PyErr_Occurred())
        return NULL;
    if (tls < 0)
        return NULL;
    if (!PyBytes_Check(head)) {
        PyErr_SetString(PyExc_TypeError, "req_head must be bytes");
        return NULL;
    }
    int server = role == M.server;
    PyObject *ho = head_of(self, head, server, tls), *out = NULL;
    if (ho == NULL)
        return NULL;
    if (ho == Py_None) {
        self->unparsed++;
        return ho;
    }
    Head *h = (Head *)ho;
    if (h->auto_route != NULL) {
        /* the span path's per-service cap, keyed the same way: listening address and port, or pid */
        PyObject *service;
        if (family) {
            PyObject *a = addr(self, family, mx[MX_LOCAL_ADDR]);
            service = a ? PyTuple_Pack(2, a, mx[MX_LOCAL_PORT]) : NULL;
            Py_XDECREF(a);
        } else
            service = Py_NewRef(mx[MX_PID]);
        if (service == NULL)
            goto done;
        PyObject *args[2] = {service, h->auto_route};
        PyObject *adm = PyObject_Vectorcall(self->admit, args, 2, NULL);
        Py_DECREF(service);
        if (adm == NULL)
            goto done;
        Py_DECREF(adm);
        if (adm != h->auto_route && (h = overflow_of(h)) == NULL)
            goto done;
    }
    out = facts(self, mx, h, server, family);
done:
    Py_DECREF(ho);
    return out;
}

/* metric_batch(mxs, out) -> errors: a run of records, each one's RedFacts appended to out. A record
 * that raises an Exception is counted and skipped, the rest go on (bad input never stops the
 * agent); errors and last_error say what the caller counts. One call per run: the Python call per
 * record cost about as much as the record's own path. */
static PyObject *path_metric_batch(Path *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "metric_batch(mxs: list, out: list)");
        return NULL;
    }
    PyObject *mxs = args[0], *out = args[1];
    Py_ssize_t errors = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(mxs); i++) {
        PyObject *f = path_metric(self, PyList_GET_ITEM(mxs, i));
        if (f == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return NULL;
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            /* as correlator.py's f"{type(e).__name__}: {e}" */
            PyObject *name = PyType_GetName((PyTypeObject *)type);
            PyObject *msg = name ? PyUnicode_FromFormat("%U: %S", name, value ? value : Py_None) : NULL;
            Py_XDECREF(name);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (msg == NULL)
                return NULL;
            Py_XSETREF(self->last_error, msg);
            errors++;
            continue;
        }
        int r = f == Py_None ? 0 : PyList_Append(out, f);
        Py_DECREF(f);
        if (r < 0)
            return NULL;
    }
    return PyLong_FromSsize_t(errors);
}

static PyObject *path_last_error(Path *self, void *closure) {
    return Py_NewRef(self->last_error ? self->last_error : s_empty);
}

static PyGetSetDef path_getset[] = {
    {"last_error", (getter)path_last_error, NULL, "'Type: message' of the last record metric_batch skipped", NULL},
    {NULL},
};

static PyMethodDef path_methods[] = {
    {"metric", (PyCFunction)path_metric, METH_O, "metric(mx) -> RedFacts, or None when its head is not HTTP/1.x"},
    {"metric_batch", (PyCFunction)(void (*)(void))path_metric_batch, METH_FASTCALL,
     "metric_batch(mxs, out) -> errors: each record's RedFacts appended to out (none when its head is not "
     "HTTP/1.x); a record that raises is counted in the result and skipped (last_error says why)"},
    {NULL},
};

static PyMemberDef path_members[] = {
    {"records", T_PYSSIZET, offsetof(Path, records), READONLY, "metric records fed"},
    {"unparsed", T_PYSSIZET, offsetof(Path, unparsed), READONLY, "of them, request head not HTTP/1.x: no facts"},
    {NULL},
};

static PyTypeObject Path_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "correlator._red.MetricPath",
    .tp_doc = "MetricPath(*, derive, admit, route_template, match, auto_routes, memo_size): one correlator's "
              "metric records into RedFacts.",
    .tp_basicsize = sizeof(Path),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)path_init,
    .tp_traverse = (traverseproc)path_traverse,
    .tp_clear = (inquiry)path_clear,
    .tp_dealloc = (destructor)path_dealloc,
    .tp_methods = path_methods,
    .tp_members = path_members,
    .tp_getset = path_getset,
};

/* ---- module ------------------------------------------------------------------------------ */

static PyObject *py_origin_line(PyObject *mod, PyObject *head) {
    (void)mod;
    if (!PyBytes_Check(head)) {
        PyErr_SetString(PyExc_TypeError, "origin_line() takes bytes");
        return NULL;
    }
    Py_ssize_t sp1, sp2;
    if (!origin_line(PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head), &sp1, &sp2))
        Py_RETURN_NONE;
    return Py_BuildValue("(nn)", sp1, sp2);
}

static PyMethodDef methods[] = {
    {"origin_line", (PyCFunction)py_origin_line, METH_O,
     "origin_line(head) -> (sp1, sp2), the spaces around an origin-form target, or None"},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(*, red_facts, facts_fields, metric_fields, head_fields, format_addr, aborted_err, err_incomplete, "
     "overflow_route, closed, server, peer): correlator/red.py's types and constants, once"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "correlator._red", "Metric records into RedFacts (correlator/red.py).", -1, methods,
};

#define INTERN(var, text)                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        goto fail;

PyMODINIT_FUNC PyInit__red(void) {
    if (PyType_Ready(&Head_Type) < 0 || PyType_Ready(&Path_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    INTERN(k_route, "http.route")
    INTERN(k_status_code, "http.response.status_code")
    INTERN(k_error_type, "error.type")
    INTERN(k_server_address, "server.address")
    INTERN(k_server_port, "server.port")
    INTERN(s_empty, "")
    INTERN(s_unknown_service, "unknown_service")
    INTERN(s_loopback4, "127.")
    if ((empty_tuple = PyTuple_New(0)) == NULL || (zero = PyLong_FromLong(0)) == NULL ||
        PyModule_AddObjectRef(m, "MetricPath", (PyObject *)&Path_Type) < 0)
        goto fail;
    /* correlator/_spans.c takes origin_line through this capsule: one rule for both paths, without
     * a header shared between two extensions. */
    PyObject *cap = PyCapsule_New((void *)origin_line, "correlator._red._origin_line", NULL);
    if (cap == NULL || PyModule_AddObject(m, "_origin_line", cap) < 0) {
        Py_XDECREF(cap);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
