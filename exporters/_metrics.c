/* exporters/_metrics.c: the metrics aggregator's per-record fold (exporters/metrics.py calls it
   once per batch of spans and once per batch of RedFacts).

   What a span or an unsampled exchange adds, when everything it touches already exists: its
   duration into its RED histogram (found through the aggregator's series memo), the far end's
   name it teaches (span endpoints), and its half of a service-graph edge (paired with the other
   half waiting in the pending tables, or waiting there itself, or a virtual node's edge). This is
   the one implementation of those rules; whatever creates state (a memo entry, a stream, an edge,
   a pid's service) or ages it (expiry, the caches' bounds, the cardinality limit) is the Python
   side's (MetricsAggregator's _span_series_miss, _fact_series_miss, _series_of, _observe, _edge,
   _batch_service, _service_name, _expire), called back here in the order the rules need them.

   The streams themselves are this module's types: Hist folds each observation as it comes (a
   binary search over the bounds, the running sum in arrival order, min and max), Counter is a
   64-bit count; Series and Edge are the memo's and the service graph's entries. None of them can
   reference a container, so none is tracked by the garbage collector.

   Nothing here needs OpenTelemetry: the Python side turns the streams into the SDK's data model.
   CPython costs this avoids: the bytecode of the loop, Python attribute reads of Span (slots) and
   RedFacts (a NamedTuple) fields, resolved per batch to slot offsets or tuple indexes, and the
   list appends and per-batch sort the Python fold needed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

/* ---- interned names ------------------------------------------------------------------- */

#define NAMES(X)                                                                        \
    X(k_method, "http.request.method")                                                  \
    X(k_status_code, "http.response.status_code")                                       \
    X(k_error_type, "error.type")                                                       \
    X(k_route, "http.route")                                                            \
    X(k_server_address, "server.address")                                               \
    X(k_server_port, "server.port")                                                     \
    X(k_scheme, "url.scheme")                                                           \
    X(k_version, "network.protocol.version")                                            \
    X(k_peer_address, "network.peer.address")                                           \
    X(k_peer_port, "network.peer.port")                                                 \
    X(k_client_address, "client.address")                                               \
    X(k_db_system, "db.system.name")                                                    \
    X(k_rpc_system, "rpc.system")                                                       \
    X(m_batch_service, "_batch_service")                                                \
    X(m_service_name, "_service_name")                                                  \
    X(m_span_series_miss, "_span_series_miss")                                          \
    X(m_fact_series_miss, "_fact_series_miss")                                          \
    X(m_series_of, "_series_of")                                                        \
    X(m_observe, "_observe")                                                            \
    X(m_edge, "_edge")                                                                  \
    X(m_expire, "_expire")                                                              \
    X(m_add, "add")                                                                     \
    X(a_batch_services, "_batch_services")                                              \
    X(a_span_series, "_span_series")                                                    \
    X(a_fact_series, "_fact_series")                                                    \
    X(a_endpoint_service, "_endpoint_service")                                          \
    X(a_listen_ports, "_listen_ports")                                                  \
    X(a_pending_clients, "_pending_clients")                                            \
    X(a_pending_servers, "_pending_servers")                                            \
    X(a_edges, "_edges")                                                                \
    X(a_now, "_now")                                                                    \
    X(a_now_ns, "_now_ns")                                                              \
    X(a_max_pending, "_max_pending")                                                    \
    X(a_fields, "_fields")                                                              \
    X(c_virtual_node, "virtual_node")                                                   \
    X(c_database, "database")                                                           \
    X(c_empty, "")                                                                      \
    X(c_user, "user")

#define X_DECL(var, text) static PyObject *var;
NAMES(X_DECL)
#undef X_DECL
static PyObject *empty_bytes;
static PyObject *float_inf;

/* The learned-endpoint table's bound (exporters/metrics.py's record_spans had it inline). */
#define MAX_ENDPOINTS 4096
/* A service's listening ports worth remembering (as _series_of's bound). */
#define MAX_LISTEN_PORTS 64

/* ---- Hist ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *bounds; /* the tuple it was made with */
    Py_ssize_t nb;
    double *b;          /* nb upper bounds */
    long long *counts;  /* nb + 1 */
    double total, lo, hi;
    long long n, start_ns;
} Hist;

static PyTypeObject HistType;

/* OTLP explicit buckets are upper-inclusive: bucket i holds (bounds[i-1], bounds[i]], so the
   bucket is bisect_left(bounds, v), computed here the way bisect computes it. */
static inline void hist_add(Hist *h, double v) {
    Py_ssize_t lo = 0, hi = h->nb;
    const double *b = h->b;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (b[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    h->counts[lo]++;
    h->total += v; /* in arrival order, one addition at a time, as `total += v` */
    h->n++;
    if (v < h->lo) h->lo = v;
    if (v > h->hi) h->hi = v;
}

static PyObject *Hist_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"bounds", "start_ns", NULL};
    PyObject *bounds;
    long long start_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!L:Hist", kwlist, &PyTuple_Type, &bounds, &start_ns)) return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    Hist *h = (Hist *)type->tp_alloc(type, 0);
    if (h == NULL) return NULL;
    h->bounds = Py_NewRef(bounds);
    h->nb = nb;
    h->b = PyMem_Malloc(sizeof(double) * (nb ? nb : 1));
    h->counts = PyMem_Calloc(nb + 1, sizeof(long long));
    if (h->b == NULL || h->counts == NULL) {
        Py_DECREF(h);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        double x = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (x == -1.0 && PyErr_Occurred()) {
            Py_DECREF(h);
            return NULL;
        }
        if (i && !(h->b[i - 1] < x)) {
            Py_DECREF(h);
            PyErr_SetString(PyExc_ValueError, "Hist: bounds must be increasing");
            return NULL;
        }
        h->b[i] = x;
    }
    h->total = 0.0;
    h->lo = Py_HUGE_VAL;
    h->hi = -Py_HUGE_VAL;
    h->n = 0;
    h->start_ns = start_ns;
    return (PyObject *)h;
}

static void Hist_dealloc(Hist *h) {
    Py_XDECREF(h->bounds);
    PyMem_Free(h->b);
    PyMem_Free(h->counts);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *Hist_add(Hist *h, PyObject *v) {
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return NULL;
    hist_add(h, x);
    Py_RETURN_NONE;
}

static PyObject *Hist_counts(Hist *h, void *closure) {
    PyObject *out = PyList_New(h->nb + 1);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i <= h->nb; i++) {
        PyObject *c = PyLong_FromLongLong(h->counts[i]);
        if (c == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, c);
    }
    return out;
}

static PyMethodDef Hist_methods[] = {
    {"add", (PyCFunction)Hist_add, METH_O, "add(value): one observation."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Hist_members[] = {
    {"bounds", T_OBJECT_EX, offsetof(Hist, bounds), READONLY, "the explicit bucket bounds"},
    {"total", T_DOUBLE, offsetof(Hist, total), READONLY, "the sum of the observations"},
    {"n", T_LONGLONG, offsetof(Hist, n), READONLY, "the number of observations"},
    {"lo", T_DOUBLE, offsetof(Hist, lo), READONLY, "the least observation (inf before the first)"},
    {"hi", T_DOUBLE, offsetof(Hist, hi), READONLY, "the greatest observation (-inf before the first)"},
    {"start_ns", T_LONGLONG, offsetof(Hist, start_ns), READONLY, "when the stream began"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Hist_getset[] = {
    {"counts", (getter)Hist_counts, NULL, "the bucket counts (a new list, len(bounds) + 1)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HistType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporters._metrics.Hist",
    .tp_basicsize = sizeof(Hist),
    .tp_dealloc = (destructor)Hist_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Hist(bounds, start_ns): one cumulative histogram stream with explicit, upper-inclusive buckets.",
    .tp_methods = Hist_methods,
    .tp_members = Hist_members,
    .tp_getset = Hist_getset,
    .tp_new = Hist_new,
};

/* ---- Counter ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long value, start_ns;
} Counter;

static PyObject *Counter_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"start_ns", NULL};
    long long start_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L:Counter", kwlist, &start_ns)) return NULL;
    Counter *c = (Counter *)type->tp_alloc(type, 0);
    if (c == NULL) return NULL;
    c->value = 0;
    c->start_ns = start_ns;
    return (PyObject *)c;
}

static PyMemberDef Counter_members[] = {
    {"value", T_LONGLONG, offsetof(Counter, value), 0, "the count"},
    {"start_ns", T_LONGLONG, offsetof(Counter, start_ns), READONLY, "when the stream began"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporters._metrics.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counter(start_ns): one cumulative monotonic sum stream.",
    .tp_members = Counter_members,
    .tp_new = Counter_new,
};

/* ---- Series ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *metric;   /* None: no duration metric (a database's own server-side span) */
    PyObject *attrs;
    PyObject *hist;     /* None until the stream exists, and for good once it overflowed */
    PyObject *endpoint; /* client: (address, port) where its traced server listens, or None */
    PyObject *peer;     /* client: the far end's name for a virtual node */
    PyObject *database; /* the db.system.name node of a database span, or None */
    char local;         /* client: the far end is on this host */
    long long port;     /* server (RedFacts): the listening port last learned through this entry */
} Series;

static PyTypeObject SeriesType;

static PyObject *Series_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"metric", "attrs", "hist", NULL};
    PyObject *metric, *attrs, *hist;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:Series", kwlist, &metric, &attrs, &hist)) return NULL;
    Series *e = (Series *)type->tp_alloc(type, 0);
    if (e == NULL) return NULL;
    e->metric = Py_NewRef(metric);
    e->attrs = Py_NewRef(attrs);
    e->hist = Py_NewRef(hist);
    e->endpoint = Py_NewRef(Py_None);
    e->peer = PyUnicode_FromString("unknown_service");
    e->database = Py_NewRef(Py_None);
    e->local = 0;
    e->port = 0;
    if (e->peer == NULL) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static void Series_dealloc(Series *e) {
    Py_XDECREF(e->metric);
    Py_XDECREF(e->attrs);
    Py_XDECREF(e->hist);
    Py_XDECREF(e->endpoint);
    Py_XDECREF(e->peer);
    Py_XDECREF(e->database);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* T_OBJECT reads a deleted member as None; the code below does the same with NULL. */
static PyMemberDef Series_members[] = {
    {"metric", T_OBJECT, offsetof(Series, metric), 0, "the duration metric (a MetricDef), or None"},
    {"attrs", T_OBJECT, offsetof(Series, attrs), 0, "the stream's attribute tuple"},
    {"hist", T_OBJECT, offsetof(Series, hist), 0, "the duration stream, None until it exists or once overflowed"},
    {"endpoint", T_OBJECT, offsetof(Series, endpoint), 0, "client: (address, port) of its traced server"},
    {"peer", T_OBJECT, offsetof(Series, peer), 0, "client: the far end's name for a virtual node"},
    {"database", T_OBJECT, offsetof(Series, database), 0, "the database node's name, or None"},
    {"local", T_BOOL, offsetof(Series, local), 0, "client: the far end is on this host"},
    {"port", T_LONGLONG, offsetof(Series, port), 0, "server: the listening port last learned through it"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SeriesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporters._metrics.Series",
    .tp_basicsize = sizeof(Series),
    .tp_dealloc = (destructor)Series_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Series(metric, attrs, hist): what one attribute set of one resource resolves to.",
    .tp_members = Series_members,
    .tp_new = Series_new,
};

/* ---- Edge ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *total, *failed; /* Counter */
    PyObject *server, *client; /* Hist or None */
} Edge;

static PyTypeObject EdgeType;

static PyObject *Edge_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"total", "failed", "server", "client", NULL};
    PyObject *total, *failed, *server, *client;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OO:Edge", kwlist, &CounterType, &total, &CounterType, &failed,
                                     &server, &client))
        return NULL;
    if ((server != Py_None && !Py_IS_TYPE(server, &HistType)) || (client != Py_None && !Py_IS_TYPE(client, &HistType))) {
        PyErr_SetString(PyExc_TypeError, "Edge: server and client must be Hist or None");
        return NULL;
    }
    Edge *e = (Edge *)type->tp_alloc(type, 0);
    if (e == NULL) return NULL;
    e->total = Py_NewRef(total);
    e->failed = Py_NewRef(failed);
    e->server = Py_NewRef(server);
    e->client = Py_NewRef(client);
    return (PyObject *)e;
}

static void Edge_dealloc(Edge *e) {
    Py_XDECREF(e->total);
    Py_XDECREF(e->failed);
    Py_XDECREF(e->server);
    Py_XDECREF(e->client);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMemberDef Edge_members[] = {
    {"total", T_OBJECT, offsetof(Edge, total), READONLY, "the requests Counter"},
    {"failed", T_OBJECT, offsetof(Edge, failed), READONLY, "the failed requests Counter"},
    {"server", T_OBJECT, offsetof(Edge, server), READONLY, "the server-side duration Hist, or None"},
    {"client", T_OBJECT, offsetof(Edge, client), READONLY, "the client-side duration Hist, or None"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EdgeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporters._metrics.Edge",
    .tp_basicsize = sizeof(Edge),
    .tp_dealloc = (destructor)Edge_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Edge(total, failed, server, client): the service-graph streams of one edge.",
    .tp_members = Edge_members,
    .tp_new = Edge_new,
};

/* ---- record fields ---------------------------------------------------------------------- */

/* How the records of one batch keep their fields, resolved for the batch's first record's type
   and used while that type keeps its version tag (any change to the class gets a new one): a
   slots class (correlator.spans.Span) by its member descriptors' offsets, a NamedTuple
   (correlator.red.RedFacts) by its fields' tuple indexes; anything else takes getattr. */
enum { L_GETATTR, L_SLOTS, L_TUPLE };
#define MAX_FIELDS 12

typedef struct {
    PyTypeObject *type; /* strong while the batch runs: its address must stay its own */
    unsigned int version;
    int mode, n;
    PyObject **names;
    Py_ssize_t where[MAX_FIELDS];
} Layout;

static int tuple_fields(Layout *l, PyTypeObject *t) {
    if (!PyType_IsSubtype(t, &PyTuple_Type)) return 0;
    PyObject *fields = PyObject_GetAttr((PyObject *)t, a_fields);
    if (fields == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = PyTuple_Check(fields);
    for (int i = 0; ok && i < l->n; i++) {
        /* The class attribute must be namedtuple's own item getter, not a property over it. */
        PyObject *d = _PyType_Lookup(t, l->names[i]);
        if (d == NULL || strcmp(Py_TYPE(d)->tp_name, "_collections._tuplegetter") != 0) ok = 0;
        Py_ssize_t j = 0, nf = ok ? PyTuple_GET_SIZE(fields) : 0;
        for (; j < nf; j++) {
            int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(fields, j), l->names[i], Py_EQ);
            if (eq < 0) {
                PyErr_Clear();
                ok = 0;
            }
            if (eq > 0) break;
        }
        if (j == nf) ok = 0;
        l->where[i] = j;
    }
    Py_DECREF(fields);
    return ok;
}

static int slot_fields(Layout *l, PyTypeObject *t) {
    if (t->tp_getattro != PyObject_GenericGetAttr) return 0;
    for (int i = 0; i < l->n; i++) {
        PyObject *d = _PyType_Lookup(t, l->names[i]); /* borrowed; sets no error */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) return 0;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != Py_T_OBJECT_EX || (m->flags & READONLY)) return 0;
        l->where[i] = m->offset;
    }
    return 1;
}

static void layout_resolve(Layout *l, PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    Py_CLEAR(l->type);
    l->mode = L_GETATTR;
    if (slot_fields(l, t))
        l->mode = L_SLOTS;
    else if (tuple_fields(l, t))
        l->mode = L_TUPLE;
    else
        return;
    /* The lookups gave the type a version tag unless it cannot have one: then no caching. */
    if (!PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG)) {
        l->mode = L_GETATTR;
        return;
    }
    l->version = t->tp_version_tag;
    l->type = (PyTypeObject *)Py_NewRef((PyObject *)t);
}

/* The record's fields, new references in out[0..n-1]; -1 with an exception (out all NULL). */
static int layout_read(Layout *l, PyObject *obj, PyObject **out) {
    PyTypeObject *t = Py_TYPE(obj);
    if (l->type != t || !PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG) || t->tp_version_tag != l->version) {
        layout_resolve(l, obj);
    }
    int i = 0;
    if (l->mode == L_SLOTS) {
        for (; i < l->n; i++) {
            PyObject *v = *(PyObject **)((char *)obj + l->where[i]);
            if (v == NULL) {
                PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'", t->tp_name, l->names[i]);
                goto fail;
            }
            out[i] = Py_NewRef(v);
        }
        return 0;
    }
    if (l->mode == L_TUPLE) {
        for (; i < l->n; i++) {
            if (l->where[i] >= PyTuple_GET_SIZE(obj)) {
                PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'", t->tp_name, l->names[i]);
                goto fail;
            }
            out[i] = Py_NewRef(PyTuple_GET_ITEM(obj, l->where[i]));
        }
        return 0;
    }
    for (; i < l->n; i++)
        if ((out[i] = PyObject_GetAttr(obj, l->names[i])) == NULL) goto fail;
    return 0;
fail:
    while (i--) Py_CLEAR(out[i]);
    return -1;
}

static void fields_clear(PyObject **f, int n) {
    for (int i = 0; i < n; i++) Py_CLEAR(f[i]);
}

/* ---- a batch's context ------------------------------------------------------------------ */

typedef struct {
    PyObject *agg;
    PyObject *services;        /* pid -> (resource, service) for this batch */
    PyObject *memo;            /* the span or fact series memo */
    PyObject *endpoints;       /* (address, port) -> service */
    PyObject *listen_ports;    /* service -> set of ports */
    PyObject *pending_clients; /* span id -> pending half */
    PyObject *pending_servers; /* parent span id -> pending half */
    PyObject *edges;           /* (client, server, connection_type) -> Edge */
    PyObject *now;             /* monotonic seconds (float), as the pending halves keep it */
    PyObject *now_ns;          /* wall clock (int), for new streams */
    Py_ssize_t max_pending;
} Ctx;

static void ctx_clear(Ctx *c) {
    Py_CLEAR(c->services);
    Py_CLEAR(c->memo);
    Py_CLEAR(c->endpoints);
    Py_CLEAR(c->listen_ports);
    Py_CLEAR(c->pending_clients);
    Py_CLEAR(c->pending_servers);
    Py_CLEAR(c->edges);
    Py_CLEAR(c->now);
    Py_CLEAR(c->now_ns);
}

static int get_dict(PyObject *agg, PyObject *name, PyObject **out) {
    *out = PyObject_GetAttr(agg, name);
    if (*out == NULL) return -1;
    if (!PyDict_CheckExact(*out)) {
        PyErr_Format(PyExc_TypeError, "aggregator.%U must be a dict", name);
        return -1;
    }
    return 0;
}

static int ctx_init(Ctx *c, PyObject *agg, PyObject *memo_name) {
    memset(c, 0, sizeof(*c));
    c->agg = agg;
    if (get_dict(agg, a_batch_services, &c->services) < 0 || get_dict(agg, memo_name, &c->memo) < 0
        || get_dict(agg, a_endpoint_service, &c->endpoints) < 0 || get_dict(agg, a_listen_ports, &c->listen_ports) < 0
        || get_dict(agg, a_pending_clients, &c->pending_clients) < 0
        || get_dict(agg, a_pending_servers, &c->pending_servers) < 0 || get_dict(agg, a_edges, &c->edges) < 0)
        goto fail;
    if ((c->now = PyObject_GetAttr(agg, a_now)) == NULL || (c->now_ns = PyObject_GetAttr(agg, a_now_ns)) == NULL)
        goto fail;
    PyObject *mp = PyObject_GetAttr(agg, a_max_pending);
    if (mp == NULL) goto fail;
    c->max_pending = PyLong_AsSsize_t(mp);
    Py_DECREF(mp);
    if (c->max_pending == -1 && PyErr_Occurred()) goto fail;
    return 0;
fail:
    ctx_clear(c);
    return -1;
}

/* A pid's (resource, service) for this batch, a new reference to a 2-tuple. */
static PyObject *batch_service(Ctx *c, PyObject *pid) {
    PyObject *svc = PyDict_GetItemWithError(c->services, pid);
    if (svc != NULL)
        Py_INCREF(svc);
    else if (PyErr_Occurred() || (svc = PyObject_CallMethodOneArg(c->agg, m_batch_service, pid)) == NULL)
        return NULL;
    if (!PyTuple_CheckExact(svc) || PyTuple_GET_SIZE(svc) != 2) {
        Py_DECREF(svc);
        PyErr_SetString(PyExc_TypeError, "a pid's service must be a (resource, name) tuple");
        return NULL;
    }
    return svc;
}

/* The service of the process at the other end (a new reference): this batch's, else
   _service_name's (which knows pids without process info). */
static PyObject *peer_service(Ctx *c, PyObject *pid) {
    PyObject *svc = PyDict_GetItemWithError(c->services, pid);
    if (svc != NULL) {
        if (!PyTuple_CheckExact(svc) || PyTuple_GET_SIZE(svc) != 2) {
            PyErr_SetString(PyExc_TypeError, "a pid's service must be a (resource, name) tuple");
            return NULL;
        }
        return Py_NewRef(PyTuple_GET_ITEM(svc, 1));
    }
    if (PyErr_Occurred()) return NULL;
    return PyObject_CallMethodOneArg(c->agg, m_service_name, pid);
}

/* dict.pop(key, None): a new reference, or NULL (with an exception set only on error). */
static PyObject *dict_pop(PyObject *d, PyObject *key) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *r = NULL;
    if (PyDict_Pop(d, key, &r) < 0) return NULL;
    return r;
#else
    if (PyDict_GET_SIZE(d) == 0) return NULL;
    PyObject *r = _PyDict_Pop(d, key, Py_None);
    if (r == Py_None) {
        Py_DECREF(r);
        return NULL;
    }
    return r;
#endif
}

static int truth(PyObject *o) {
    if (o == Py_True) return 1;
    if (o == Py_False || o == Py_None) return 0;
    return PyObject_IsTrue(o);
}

/* A duration into a series' stream; the stream is made (or found overflowed) by _observe. */
static int series_observe(Ctx *c, Series *e, PyObject *res, PyObject *seconds_obj, double seconds) {
    PyObject *h = e->hist;
    if (h != NULL && h != Py_None) {
        if (Py_IS_TYPE(h, &HistType)) {
            hist_add((Hist *)h, seconds);
            return 0;
        }
        PyObject *r = PyObject_CallMethodOneArg(h, m_add, seconds_obj);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    if (e->metric == NULL || e->metric == Py_None) return 0;
    PyObject *r = PyObject_CallMethodObjArgs(c->agg, m_observe, res, e->metric, e->attrs ? e->attrs : Py_None,
                                             seconds_obj, c->now_ns, NULL);
    if (r == NULL) return -1;
    Py_XSETREF(e->hist, r);
    return 0;
}

/* One request on the service-graph edge (client, server, connection_type): both counters and the
   durations given (NULL objects: none), in place when the edge's streams exist, else _edge. */
static int edge(Ctx *c, PyObject *client, PyObject *server, PyObject *ctype, int failed, PyObject *server_s,
                PyObject *client_s) {
    PyObject *key = PyTuple_Pack(3, client, server, ctype);
    if (key == NULL) return -1;
    PyObject *e = PyDict_GetItemWithError(c->edges, key); /* borrowed */
    if (e == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    if (e != NULL && Py_IS_TYPE(e, &EdgeType)) {
        Edge *g = (Edge *)e;
        if ((server_s == NULL || g->server != Py_None) && (client_s == NULL || g->client != Py_None)) {
            Py_DECREF(key);
            double sv = 0.0, cv = 0.0;
            if (server_s != NULL && (sv = PyFloat_AsDouble(server_s)) == -1.0 && PyErr_Occurred()) return -1;
            if (client_s != NULL && (cv = PyFloat_AsDouble(client_s)) == -1.0 && PyErr_Occurred()) return -1;
            ((Counter *)g->total)->value++;
            if (failed) ((Counter *)g->failed)->value++;
            if (server_s != NULL) hist_add((Hist *)g->server, sv);
            if (client_s != NULL) hist_add((Hist *)g->client, cv);
            return 0;
        }
    }
    Py_DECREF(key);
    PyObject *r = PyObject_CallMethodObjArgs(c->agg, m_edge, client, server, ctype, failed ? Py_True : Py_False,
                                             server_s ? server_s : Py_None, client_s ? client_s : Py_None, c->now_ns,
                                             NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* More halves waiting than max_pending: every one of them counts now, from the side seen. */
static int bound_pending(Ctx *c) {
    if (PyDict_GET_SIZE(c->pending_clients) + PyDict_GET_SIZE(c->pending_servers) <= c->max_pending) return 0;
    PyObject *r = PyObject_CallMethodObjArgs(c->agg, m_expire, float_inf, c->now_ns, NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static int pending_half(PyObject *match, const char *which) {
    if (!PyTuple_CheckExact(match) || PyTuple_GET_SIZE(match) != 6) {
        PyErr_Format(PyExc_TypeError, "a pending %s half must be a 6-tuple", which);
        return -1;
    }
    return 0;
}

/* A client's half of a service-graph edge. Both ends traced on this host: the halves pair by span
   id (the server's parent is the client's span) and count once with both durations. peer: the far
   end's name (server.address) for when it is not traced. */
static int client_half(Ctx *c, PyObject *service, PyObject *seconds, int failed, PyObject *span_id,
                       PyObject *peer_pid, int local, PyObject *peer) {
    int has_peer = truth(peer_pid);
    if (has_peer < 0) return -1;
    int has_id = 0;
    if (!has_peer && local && (has_id = truth(span_id)) < 0) return -1;
    if (!has_peer && !(local && has_id))
        /* The far end is not traced: a virtual node named by the address the client called. */
        return edge(c, service, peer, c_virtual_node, failed, NULL, seconds);
    PyObject *match = dict_pop(c->pending_servers, span_id);
    if (match != NULL) {
        int rc = pending_half(match, "server");
        int mf = rc < 0 ? 0 : truth(PyTuple_GET_ITEM(match, 3));
        if (rc == 0 && mf >= 0)
            rc = edge(c, service, PyTuple_GET_ITEM(match, 1), c_empty, failed || mf, PyTuple_GET_ITEM(match, 2),
                      seconds);
        else
            rc = -1;
        Py_DECREF(match);
        return rc;
    }
    if (PyErr_Occurred()) return -1;
    /* Kernel-identified spans leave before their far end is known: a local client without a peer
       waits for a server span naming it, and counts as a virtual node if none comes. */
    PyObject *server = has_peer ? peer_service(c, peer_pid) : Py_NewRef(Py_None);
    if (server == NULL) return -1;
    PyObject *half = PyTuple_New(6);
    if (half == NULL) {
        Py_DECREF(server);
        return -1;
    }
    PyTuple_SET_ITEM(half, 0, Py_NewRef(service));
    PyTuple_SET_ITEM(half, 1, server);
    PyTuple_SET_ITEM(half, 2, Py_NewRef(seconds));
    PyTuple_SET_ITEM(half, 3, Py_NewRef(failed ? Py_True : Py_False));
    PyTuple_SET_ITEM(half, 4, Py_NewRef(c->now));
    PyTuple_SET_ITEM(half, 5, Py_NewRef(peer));
    int rc = PyDict_SetItem(c->pending_clients, span_id, half);
    Py_DECREF(half);
    return rc < 0 ? -1 : bound_pending(c);
}

/* A server's half of a service-graph edge (see client_half). peer: the caller's name
   (client.address) for when it is not traced, or NULL to read it from attrs (a span's). */
static int server_half(Ctx *c, PyObject *service, PyObject *seconds, int failed, PyObject *parent,
                       PyObject *peer_pid, PyObject *peer, PyObject *attrs, PyObject *unknown) {
    int has_peer = truth(peer_pid);
    if (has_peer < 0) return -1;
    if (!has_peer) {
        /* No traced caller: a root span was called by a user (the collector's servicegraph
           connector names it "user"); otherwise by an untraced process at client.address. */
        int has_parent = truth(parent);
        if (has_parent < 0) return -1;
        if (!has_parent) return edge(c, c_user, service, c_virtual_node, failed, seconds, NULL);
        if (peer != NULL) return edge(c, peer, service, c_virtual_node, failed, seconds, NULL);
        PyObject *addr = PyDict_GetItemWithError(attrs, k_client_address);
        if (addr == NULL && PyErr_Occurred()) return -1;
        int has_addr = addr == NULL ? 0 : truth(addr);
        if (has_addr < 0) return -1;
        PyObject *name = PyObject_Str(has_addr ? addr : unknown);
        if (name == NULL) return -1;
        int rc = edge(c, name, service, c_virtual_node, failed, seconds, NULL);
        Py_DECREF(name);
        return rc;
    }
    PyObject *match = dict_pop(c->pending_clients, parent);
    if (match != NULL) {
        int rc = pending_half(match, "client");
        int mf = rc < 0 ? 0 : truth(PyTuple_GET_ITEM(match, 3));
        if (rc == 0 && mf >= 0)
            rc = edge(c, PyTuple_GET_ITEM(match, 0), service, c_empty, failed || mf, seconds,
                      PyTuple_GET_ITEM(match, 2));
        else
            rc = -1;
        Py_DECREF(match);
        return rc;
    }
    if (PyErr_Occurred()) return -1;
    PyObject *client = peer_service(c, peer_pid);
    if (client == NULL) return -1;
    PyObject *half = PyTuple_New(6);
    if (half == NULL) {
        Py_DECREF(client);
        return -1;
    }
    PyTuple_SET_ITEM(half, 0, client);
    PyTuple_SET_ITEM(half, 1, Py_NewRef(service));
    PyTuple_SET_ITEM(half, 2, Py_NewRef(seconds));
    PyTuple_SET_ITEM(half, 3, Py_NewRef(failed ? Py_True : Py_False));
    PyTuple_SET_ITEM(half, 4, Py_NewRef(c->now));
    PyTuple_SET_ITEM(half, 5, Py_NewRef(c_empty));
    int rc = PyDict_SetItem(c->pending_servers, parent, half);
    Py_DECREF(half);
    return rc < 0 ? -1 : bound_pending(c);
}

/* a == b. member: b is an enum member (SpanKind, StatusCode), and another object of its type is
   another member, which never equals it (equal values make an alias, the same object): no rich
   comparison then. */
static int same(PyObject *a, PyObject *b, int member) {
    if (a == b) return 1;
    if (member && Py_IS_TYPE(a, Py_TYPE(b))) return 0;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

static PyObject *enum_type; /* enum.Enum */

/* 1 when SERVER, CLIENT and ERROR of record_spans' consts are enum members, 0 if not, -1 on error. */
static int enum_members(PyObject *consts) {
    for (Py_ssize_t i = 0; i < 3; i++) {
        int is = PyObject_IsInstance(PyTuple_GET_ITEM(consts, i), enum_type);
        if (is <= 0) return is;
    }
    return 1;
}

/* ---- spans ------------------------------------------------------------------------------ */

enum { F_PID, F_START_NS, F_END_NS, F_ATTRIBUTES, F_KIND, F_STATUS, F_PEER_PID, F_SPAN_ID, F_PARENT_SPAN_ID, F_SN };
static const char *const span_field_names[F_SN] = {
    "pid", "start_ns", "end_ns", "attributes", "kind", "status", "peer_pid", "span_id", "parent_span_id",
};
static PyObject *span_field_strs[F_SN];

/* A span's duration in seconds, as `ns / 1e9 if ns > 0 else 0.0` gives it. */
static PyObject *span_seconds(PyObject *start, PyObject *end) {
    if (PyLong_CheckExact(start) && PyLong_CheckExact(end)) {
        int o1, o2;
        long long s = PyLong_AsLongLongAndOverflow(start, &o1), e = PyLong_AsLongLongAndOverflow(end, &o2);
        if (!o1 && !o2 && !(s == -1 && PyErr_Occurred()) && !(e == -1 && PyErr_Occurred())) {
            long long ns;
            if (!__builtin_sub_overflow(e, s, &ns) && ns <= (1LL << 53) && ns >= -(1LL << 53))
                return PyFloat_FromDouble(ns > 0 ? (double)ns / 1e9 : 0.0);
        }
        if (PyErr_Occurred()) return NULL;
    }
    PyObject *ns = PyNumber_Subtract(end, start);
    if (ns == NULL) return NULL;
    PyObject *zero = PyLong_FromLong(0);
    int pos = zero == NULL ? -1 : PyObject_RichCompareBool(ns, zero, Py_GT);
    Py_XDECREF(zero);
    PyObject *r = NULL;
    if (pos > 0) {
        PyObject *g = PyFloat_FromDouble(1e9);
        if (g != NULL) r = PyNumber_TrueDivide(ns, g);
        Py_XDECREF(g);
    } else if (pos == 0) {
        r = PyFloat_FromDouble(0.0);
    }
    Py_DECREF(ns);
    return r;
}

/* attrs.get(key) for the memo key: a new reference (None when absent). */
static inline PyObject *attr(PyObject *attrs, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(attrs, key);
    if (v == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    return Py_NewRef(v);
}

/* The memo key of an HTTP span: every attribute _series_of reads of it, and no other. The server's
   is the request's (route, port), the client's its far end. The key compares values with ==, as
   stream keys do; status codes and ports are ints (the correlator's), so a 500 never meets a 500.0
   that isinstance would tell apart. */
static PyObject *span_key(PyObject *res, PyObject *kind, PyObject *status, PyObject *a, int server) {
    static PyObject **const server_keys[] = {&k_method, &k_status_code, &k_error_type, &k_route, &k_server_port,
                                             &k_scheme, &k_version};
    static PyObject **const client_keys[] = {&k_method, &k_status_code, &k_error_type, &k_server_address,
                                             &k_server_port, &k_scheme, &k_version, &k_peer_address, &k_peer_port};
    PyObject **const *keys = server ? server_keys : client_keys;
    Py_ssize_t nk = server ? 7 : 9;
    PyObject *key = PyTuple_New(3 + nk);
    if (key == NULL) return NULL;
    PyTuple_SET_ITEM(key, 0, Py_NewRef(res));
    PyTuple_SET_ITEM(key, 1, Py_NewRef(kind));
    PyTuple_SET_ITEM(key, 2, Py_NewRef(status));
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *v = attr(a, *keys[i]);
        if (v == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        PyTuple_SET_ITEM(key, 3 + i, v);
    }
    return key;
}

static int check_series(PyObject *e) {
    if (!Py_IS_TYPE(e, &SeriesType)) {
        PyErr_SetString(PyExc_TypeError, "a series memo entry must be an exporters._metrics.Series");
        return -1;
    }
    return 0;
}

/* One span; svc and e are the record's own references, released by the caller. */
static int one_span(Ctx *c, PyObject *span, PyObject **f, PyObject *consts, int members) {
    PyObject *k_server = PyTuple_GET_ITEM(consts, 0), *k_client = PyTuple_GET_ITEM(consts, 1);
    PyObject *k_error = PyTuple_GET_ITEM(consts, 2), *unknown = PyTuple_GET_ITEM(consts, 3);
    PyObject *a = f[F_ATTRIBUTES];
    if (!PyDict_Check(a)) {
        PyErr_SetString(PyExc_TypeError, "a span's attributes must be a dict");
        return -1;
    }
    PyObject *svc = batch_service(c, f[F_PID]);
    if (svc == NULL) return -1;
    PyObject *res = PyTuple_GET_ITEM(svc, 0), *service = PyTuple_GET_ITEM(svc, 1);
    PyObject *seconds = NULL, *e = NULL, *key = NULL;
    int rc = -1;
    if ((seconds = span_seconds(f[F_START_NS], f[F_END_NS])) == NULL) goto done;
    double secs = PyFloat_AS_DOUBLE(seconds);
    int is_server = same(f[F_KIND], k_server, members);
    if (is_server < 0) goto done;
    int other = PyDict_Contains(a, k_db_system);
    if (other == 0) other = PyDict_Contains(a, k_rpc_system);
    if (other < 0) goto done;
    if (other) {
        /* Database and RPC spans are not memoised. */
        if ((e = PyObject_CallMethodObjArgs(c->agg, m_series_of, span, res, service, NULL)) == NULL) goto done;
    } else {
        if ((key = span_key(res, f[F_KIND], f[F_STATUS], a, is_server)) == NULL) goto done;
        e = PyDict_GetItemWithError(c->memo, key);
        if (e != NULL)
            Py_INCREF(e);
        else if (PyErr_Occurred()
                 || (e = PyObject_CallMethodObjArgs(c->agg, m_span_series_miss, span, res, service, key, NULL)) == NULL)
            goto done;
    }
    if (check_series(e) < 0) goto done;
    Series *se = (Series *)e;
    if (series_observe(c, se, res, seconds, secs) < 0) goto done;
    PyObject *peer_pid = f[F_PEER_PID];
    PyObject *endpoint = se->endpoint;
    if (endpoint != NULL && endpoint != Py_None && PyDict_GET_SIZE(c->endpoints) < MAX_ENDPOINTS) {
        int has_peer = truth(peer_pid);
        if (has_peer < 0) goto done;
        if (has_peer) {
            Py_INCREF(endpoint);
            PyObject *name = peer_service(c, peer_pid);
            int r = name == NULL ? -1 : PyDict_SetItem(c->endpoints, endpoint, name);
            Py_XDECREF(name);
            Py_DECREF(endpoint);
            if (r < 0) goto done;
        }
    }
    int failed = same(f[F_STATUS], k_error, members);
    int client = same(f[F_KIND], k_client, members);
    if (failed < 0 || client < 0) goto done;
    if (se->database != NULL && se->database != Py_None) {
        rc = client ? edge(c, service, se->database, c_database, failed, NULL, seconds) : 0;
    } else if (client) {
        rc = client_half(c, service, seconds, failed, f[F_SPAN_ID], peer_pid, se->local,
                         se->peer ? se->peer : Py_None);
    } else {
        PyObject *parent = f[F_PARENT_SPAN_ID];
        int has_parent = truth(parent);
        if (has_parent < 0) goto done;
        rc = server_half(c, service, seconds, failed, has_parent ? parent : empty_bytes, peer_pid, NULL, a, unknown);
    }
done:
    Py_XDECREF(key);
    Py_XDECREF(e);
    Py_XDECREF(seconds);
    Py_DECREF(svc);
    return rc;
}

static PyObject *record_spans(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "record_spans(aggregator, spans, consts)");
        return NULL;
    }
    PyObject *agg = args[0], *consts = args[2];
    if (!PyTuple_CheckExact(consts) || PyTuple_GET_SIZE(consts) != 4) {
        PyErr_SetString(PyExc_TypeError, "record_spans: consts must be (SERVER, CLIENT, ERROR, UNKNOWN_SERVICE)");
        return NULL;
    }
    int members = enum_members(consts);
    if (members < 0) return NULL;
    PyObject *seq = PySequence_Fast(args[1], "record_spans: spans must be a sequence");
    if (seq == NULL) return NULL;
    Ctx c;
    if (ctx_init(&c, agg, a_span_series) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    Layout l = {.type = NULL, .n = F_SN, .names = span_field_strs};
    PyObject *f[F_SN] = {NULL};
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *span = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(span);
        rc = layout_read(&l, span, f);
        if (rc == 0) rc = one_span(&c, span, f, consts, members);
        fields_clear(f, F_SN);
        Py_DECREF(span);
    }
    Py_XDECREF(l.type);
    ctx_clear(&c);
    Py_DECREF(seq);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- RedFacts --------------------------------------------------------------------------- */

enum {
    R_PID, R_SERVER, R_ATTRS, R_SECONDS, R_FAILED, R_SPAN_ID, R_PARENT_SPAN_ID, R_PEER_PID, R_LOCAL_PEER, R_PEER,
    R_LOCAL_PORT, R_N
};
static const char *const fact_field_names[R_N] = {
    "pid", "server", "attrs", "seconds", "failed", "span_id", "parent_span_id", "peer_pid", "local_peer", "peer",
    "local_port",
};
static PyObject *fact_field_strs[R_N];

/* A server entry learns its listening port once (adding it again would change nothing: the set
   only grows, and once full takes no more). */
static int learn_port(Ctx *c, Series *e, PyObject *service, PyObject *port) {
    int has = truth(port);
    if (has <= 0) return has;
    int overflow;
    long long p = PyLong_Check(port) ? PyLong_AsLongLongAndOverflow(port, &overflow) : 0;
    if (PyErr_Occurred()) return -1;
    if (!PyLong_Check(port) || overflow) {
        PyErr_SetString(PyExc_TypeError, "a fact's local_port must be an int");
        return -1;
    }
    if (p == e->port) return 0;
    e->port = p;
    PyObject *ports = PyDict_GetItemWithError(c->listen_ports, service);
    if (ports == NULL) {
        if (PyErr_Occurred()) return -1;
        ports = PySet_New(NULL);
        if (ports == NULL) return -1;
        int r = PyDict_SetItem(c->listen_ports, service, ports);
        Py_DECREF(ports); /* the dict holds it */
        if (r < 0) return -1;
    }
    if (!PyAnySet_Check(ports)) {
        PyErr_SetString(PyExc_TypeError, "listening ports must be a set");
        return -1;
    }
    if (PySet_GET_SIZE(ports) < MAX_LISTEN_PORTS && PySet_Add(ports, port) < 0) return -1;
    return 0;
}

static int one_fact(Ctx *c, PyObject **f) {
    PyObject *svc = batch_service(c, f[R_PID]);
    if (svc == NULL) return -1;
    PyObject *res = PyTuple_GET_ITEM(svc, 0), *service = PyTuple_GET_ITEM(svc, 1);
    PyObject *e = NULL, *key = NULL, *id = NULL;
    int rc = -1;
    PyObject *server = f[R_SERVER], *attrs = f[R_ATTRS], *seconds = f[R_SECONDS];
    /* correlator/red.py memoises attribute tuples: an entry holds its tuple, so its id is not
       reused while the entry lives. */
    if ((id = PyLong_FromVoidPtr(attrs)) == NULL || (key = PyTuple_Pack(3, res, server, id)) == NULL) goto done;
    e = PyDict_GetItemWithError(c->memo, key);
    if (e != NULL)
        Py_INCREF(e);
    else if (PyErr_Occurred()
             || (e = PyObject_CallMethodObjArgs(c->agg, m_fact_series_miss, res, server, attrs, key, NULL)) == NULL)
        goto done;
    if (check_series(e) < 0) goto done;
    Series *se = (Series *)e;
    double secs = PyFloat_AsDouble(seconds);
    if (secs == -1.0 && PyErr_Occurred()) goto done;
    if (series_observe(c, se, res, seconds, secs) < 0) goto done;
    int failed = truth(f[R_FAILED]);
    int is_server = truth(server);
    if (failed < 0 || is_server < 0) goto done;
    if (is_server) {
        if (learn_port(c, se, service, f[R_LOCAL_PORT]) < 0) goto done;
        rc = server_half(c, service, seconds, failed, f[R_PARENT_SPAN_ID], f[R_PEER_PID], f[R_PEER], NULL, NULL);
    } else {
        int local = truth(f[R_LOCAL_PEER]);
        if (local < 0) goto done;
        rc = client_half(c, service, seconds, failed, f[R_SPAN_ID], f[R_PEER_PID], local, f[R_PEER]);
    }
done:
    Py_XDECREF(id);
    Py_XDECREF(key);
    Py_XDECREF(e);
    Py_DECREF(svc);
    return rc;
}

static PyObject *record_red(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "record_red(aggregator, facts)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "record_red: facts must be a sequence");
    if (seq == NULL) return NULL;
    Ctx c;
    if (ctx_init(&c, args[0], a_fact_series) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    Layout l = {.type = NULL, .n = R_N, .names = fact_field_strs};
    PyObject *f[R_N] = {NULL};
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *fact = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(fact);
        rc = layout_read(&l, fact, f);
        if (rc == 0) rc = one_fact(&c, f);
        fields_clear(f, R_N);
        Py_DECREF(fact);
    }
    Py_XDECREF(l.type);
    ctx_clear(&c);
    Py_DECREF(seq);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* ---- module ----------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"record_spans", (PyCFunction)(void (*)(void))record_spans, METH_FASTCALL,
     "record_spans(aggregator, spans, (SERVER, CLIENT, ERROR, UNKNOWN_SERVICE))\n\n"
     "Folds a batch of correlator spans into the aggregator's streams (its lock held, _begin done)."},
    {"record_red", (PyCFunction)(void (*)(void))record_red, METH_FASTCALL,
     "record_red(aggregator, facts)\n\n"
     "Folds a batch of RedFacts (unsampled exchanges) into the aggregator's streams (its lock held, _begin done)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_metrics", NULL, -1, methods, NULL, NULL, NULL, NULL};

static int intern_all(void) {
#define X_INTERN(var, text) \
    if (var == NULL && (var = PyUnicode_InternFromString(text)) == NULL) return -1;
    NAMES(X_INTERN)
#undef X_INTERN
    for (int i = 0; i < F_SN; i++)
        if (span_field_strs[i] == NULL && (span_field_strs[i] = PyUnicode_InternFromString(span_field_names[i])) == NULL)
            return -1;
    for (int i = 0; i < R_N; i++)
        if (fact_field_strs[i] == NULL && (fact_field_strs[i] = PyUnicode_InternFromString(fact_field_names[i])) == NULL)
            return -1;
    if (empty_bytes == NULL && (empty_bytes = PyBytes_FromStringAndSize("", 0)) == NULL) return -1;
    if (float_inf == NULL && (float_inf = PyFloat_FromDouble(Py_HUGE_VAL)) == NULL) return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__metrics(void) {
    if (intern_all() < 0) return NULL;
    if (enum_type == NULL) {
        PyObject *em = PyImport_ImportModule("enum");
        if (em == NULL) return NULL;
        enum_type = PyObject_GetAttrString(em, "Enum");
        Py_DECREF(em);
        if (enum_type == NULL) return NULL;
    }
    PyTypeObject *types[] = {&HistType, &CounterType, &SeriesType, &EdgeType};
    const char *names[] = {"Hist", "Counter", "Series", "Edge"};
    for (int i = 0; i < 4; i++)
        if (PyType_Ready(types[i]) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    for (int i = 0; i < 4; i++) {
        if (PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "MAX_ENDPOINTS", MAX_ENDPOINTS) < 0
        || PyModule_AddIntConstant(m, "MAX_LISTEN_PORTS", MAX_LISTEN_PORTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
