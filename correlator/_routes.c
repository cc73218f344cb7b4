/* correlator/_routes.c: the route heuristic and the per-service route cap (correlator/routes.py
 * documents the rules; this is their one implementation).
 *
 * Every server request without a --route template comes through route_template, from the span
 * path (correlator/_spans.c) and the metric-record path (correlator/_red.c) alike. What it costs
 * per request: one pass over the path, a probe of the segment memo per segment that is neither
 * empty nor a decimal number (a table looked up by the segment's characters: no object is made
 * for it), and one new str when a segment changed (else the path itself is the route). For an
 * ASCII path, the common case, that str is copied together from the path and the templates;
 * any other path's is joined from str pieces. The classification below runs once per distinct
 * segment, on any str: the patterns are ASCII, except that a digit (str.isdigit) is any Unicode
 * digit, as in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define RANDOM_MIN_LEN 16
#define LONGEST_LITERAL 40 /* longer is text (a long slug, a search term, a head the capture cut) */
#define MAX_SEGMENTS 64    /* deeper paths keep their first segments and end in /{id}...: still bounded */
#define SEGMENT_MEMO 8192  /* distinct segments remembered; cleared when full */
#define DEFAULT_MAX_ROUTES 100
#define DEFAULT_MAX_SERVICES 1024 /* listening addresses remembered (~10 MB at most); least recently used go first */

static PyObject *s_id, *s_overflow, *s_slash, *s_dot, *s_id_dot, *s_empty;

/* ---- one segment ------------------------------------------------------------------------- */

/* A part of a str: characters [off, off + n) of data. */
typedef struct {
    int kind;
    const void *data;
    Py_ssize_t off, n;
} Part;

static inline Py_UCS4 at(const Part *s, Py_ssize_t i) { return PyUnicode_READ(s->kind, s->data, s->off + i); }
static inline int is_ascii_digit(Py_UCS4 c) { return c >= '0' && c <= '9'; }
static inline int is_hex(Py_UCS4 c) { return is_ascii_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
static inline int is_ascii_alpha(Py_UCS4 c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

static Part sub(const Part *s, Py_ssize_t off, Py_ssize_t n) { return (Part){s->kind, s->data, s->off + off, n}; }

static int has(const Part *s, Py_UCS4 c) {
    for (Py_ssize_t i = 0; i < s->n; i++)
        if (at(s, i) == c)
            return 1;
    return 0;
}

/* sum(c.isdigit() for c in s) */
static Py_ssize_t digits(const Part *s) {
    Py_ssize_t d = 0;
    for (Py_ssize_t i = 0; i < s->n; i++)
        d += Py_UNICODE_ISDIGIT(at(s, i)) != 0;
    return d;
}

/* [0-9][0-9._:,+-]*\Z: a number, or digits with separators (2024-01-15, 1.2.3, 10:30) */
static int numeric(const Part *s) {
    if (s->n == 0 || !is_ascii_digit(at(s, 0)))
        return 0;
    for (Py_ssize_t i = 1; i < s->n; i++) {
        Py_UCS4 c = at(s, i);
        if (!is_ascii_digit(c) && c != '.' && c != '_' && c != ':' && c != ',' && c != '+' && c != '-')
            return 0;
    }
    return 1;
}

/* [0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z */
static int uuid(const Part *s) {
    static const int groups[] = {8, 4, 4, 4, 12};
    Py_ssize_t i = 0;
    for (int g = 0; g < 5; g++) {
        if (g && i < s->n && at(s, i) == '-')
            i++;
        for (int k = 0; k < groups[g]; k++, i++)
            if (i >= s->n || !is_hex(at(s, i)))
                return 0;
    }
    return i == s->n;
}

/* (?:0[xX])?[0-9a-fA-F]{8,}\Z with a 0x prefix or a digit in it: content hashes, ObjectIds, SHAs */
static int hex_id(const Part *s) {
    int prefixed = s->n >= 2 && at(s, 0) == '0' && (at(s, 1) == 'x' || at(s, 1) == 'X');
    Py_ssize_t from = prefixed ? 2 : 0, d = 0;
    if (s->n - from < 8)
        return 0;
    for (Py_ssize_t i = from; i < s->n; i++) {
        Py_UCS4 c = at(s, i);
        if (!is_hex(c))
            return 0;
        d += is_ascii_digit(c);
    }
    return prefixed || d > 0;
}

/* 16+ characters of [A-Za-z0-9_-] with two or more digits, or upper and lower case mixed beyond
 * camelCase: camelCase words have one capital per word (~15% of letters), random mixed case
 * about half. */
static int random_looking(const Part *s) {
    if (s->n < RANDOM_MIN_LEN)
        return 0;
    Py_ssize_t d = 0, letters = 0, upper = 0;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        Py_UCS4 c = at(s, i);
        if (is_ascii_digit(c))
            d++;
        else if (is_ascii_alpha(c)) {
            letters++;
            upper += c <= 'Z';
        } else if (c != '_' && c != '-')
            return 0;
    }
    if (d >= 2)
        return 1;
    return 0 < upper && upper < letters && 4 * upper >= letters; /* upper / letters >= 0.25 */
}

/* [A-Za-z][A-Za-z0-9]{0,4}\Z: a file name's extension */
static int extension(const Part *s) {
    if (s->n < 1 || s->n > 5 || !is_ascii_alpha(at(s, 0)))
        return 0;
    for (Py_ssize_t i = 1; i < s->n; i++)
        if (!is_ascii_alpha(at(s, i)) && !is_ascii_digit(at(s, i)))
            return 0;
    return 1;
}

/* Whether one path segment names one thing among many (an id), not a route's literal. */
static int identifier(const Part *s) {
    if (s->n == 0)
        return 0;
    if (numeric(s) || uuid(s) || hex_id(s))
        return 1;
    if (has(s, '@') || has(s, '%') || s->n > LONGEST_LITERAL)
        return 1;
    return digits(s) >= 4 || random_looking(s);
}

/* A dotted file-name part that is a hash or token (app.3f9a8b7c.js), not a version number. */
static int fingerprint(const Part *s) { return uuid(s) || hex_id(s) || random_looking(s); }

static Part whole(PyObject *str) {
    return (Part){PyUnicode_KIND(str), PyUnicode_DATA(str), 0, PyUnicode_GET_LENGTH(str)};
}

/* A file name whose stem has dotted parts, some of them fingerprints: each of those becomes {id}
 * ("app.{id}.js"). New reference. */
static PyObject *fingerprinted(PyObject *seg, Py_ssize_t dot) {
    PyObject *stem = PyUnicode_Substring(seg, 0, dot), *parts = NULL, *joined = NULL, *out = NULL;
    if (stem == NULL || (parts = PyUnicode_Split(stem, s_dot, -1)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
        Part p = whole(PyList_GET_ITEM(parts, i));
        if (fingerprint(&p))
            PyList_SetItem(parts, i, Py_NewRef(s_id));
    }
    if ((joined = PyUnicode_Join(s_dot, parts)) != NULL) {
        PyObject *ext = PyUnicode_Substring(seg, dot, PyUnicode_GET_LENGTH(seg)); /* ".ext" */
        if (ext != NULL) {
            out = PyUnicode_Concat(joined, ext);
            Py_DECREF(ext);
        }
    }
done:
    Py_XDECREF(stem);
    Py_XDECREF(parts);
    Py_XDECREF(joined);
    return out;
}

/* One segment's template: seg itself (a new reference to it) when it stays. */
static PyObject *template_of(PyObject *seg) {
    Part s = whole(seg);
    if (s.n == 0)
        return Py_NewRef(seg);
    if (numeric(&s) || uuid(&s) || has(&s, '@') || has(&s, '%'))
        return Py_NewRef(s_id);
    Py_ssize_t dot = s.n - 1;
    while (dot >= 0 && at(&s, dot) != '.')
        dot--;
    Part ext = sub(&s, dot + 1, s.n - dot - 1);
    if (dot > 0 && extension(&ext)) {
        /* A file name: keep the extension (it says what kind of thing is served), judge the stem. */
        Part stem = sub(&s, 0, dot);
        if (has(&stem, '.')) {
            for (Py_ssize_t from = 0, i = 0; i <= dot; i++) {
                if (i == dot || at(&s, i) == '.') {
                    Part p = sub(&s, from, i - from);
                    if (fingerprint(&p))
                        return fingerprinted(seg, dot);
                    from = i + 1;
                }
            }
        }
        if (!identifier(&stem))
            return Py_NewRef(seg);
        PyObject *e = PyUnicode_Substring(seg, dot + 1, s.n), *out;
        if (e == NULL)
            return NULL;
        out = PyUnicode_Concat(s_id_dot, e);
        Py_DECREF(e);
        return out;
    }
    return Py_NewRef(identifier(&s) ? s_id : seg);
}

/* ---- the memo ---------------------------------------------------------------------------- */

/* A segment's template, remembered by content for SEGMENT_MEMO distinct segments at most (then
 * all forgotten at once). Open addressing: the table is looked up by a segment's characters in
 * the path, so a hit creates no object (a str key would need the substring, and its siphash). */
#define MEMO_BITS 14
#define MEMO_SLOTS (1 << MEMO_BITS)
_Static_assert(MEMO_SLOTS >= 2 * SEGMENT_MEMO, "the table stays at most half full: probe runs stay short");

typedef struct {
    uint64_t hash;
    PyObject *seg;  /* the segment (canonical str); NULL: an empty slot */
    PyObject *tmpl; /* its template; NULL: the segment stays */
} Slot;

static Slot memo[MEMO_SLOTS];
static Py_ssize_t memo_used;

/* FNV-1a over code points, so that a segment hashes the same whatever the kind of the path it is
 * read from (the one memo serves ASCII and other paths). */
#define FNV_BASIS 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

/* FNV's low bits mix poorly: the slot comes from the high bits of a multiplied hash. */
static inline size_t slot_of(uint64_t h) { return (size_t)(((h ^ (h >> 29)) * 0x9e3779b97f4a7c15ULL) >> (64 - MEMO_BITS)); }

/* seg holds the same characters as [a, a + n) of data. Keys are canonical, so a key of another
 * kind than the path's can still be equal (a Latin-1 segment of a UCS-2 path). */
static inline int same(PyObject *seg, int kind, const void *data, Py_ssize_t a, Py_ssize_t n) {
    if (PyUnicode_GET_LENGTH(seg) != n)
        return 0;
    int k = PyUnicode_KIND(seg);
    const void *d = PyUnicode_DATA(seg);
    if (k == kind) {
        const char *x = d, *y = (const char *)data + a * kind;
        size_t len = (size_t)(n * kind);
        if (len > 16) /* segments are mostly short words: a call to memcmp costs more than they do */
            return memcmp(x, y, len) == 0;
        for (size_t i = 0; i < len; i++)
            if (x[i] != y[i])
                return 0;
        return 1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyUnicode_READ(k, d, i) != PyUnicode_READ(kind, data, a + i))
            return 0;
    return 1;
}

/* The slot holding [a, a + n) of data, or the empty one where it belongs (there always is one:
 * the table is never more than half full). */
static inline Slot *probe(uint64_t h, int kind, const void *data, Py_ssize_t a, Py_ssize_t n) {
    for (size_t i = slot_of(h);; i = (i + 1) & (MEMO_SLOTS - 1)) {
        Slot *s = &memo[i];
        if (s->seg == NULL || (s->hash == h && same(s->seg, kind, data, a, n)))
            return s;
    }
}

static void forget_all(void) {
    for (size_t i = 0; i < MEMO_SLOTS; i++) {
        Py_CLEAR(memo[i].seg);
        Py_CLEAR(memo[i].tmpl);
    }
    memo_used = 0;
}

/* Fills s, the empty slot probe found for characters [a, b) of path (h their hash): the slot
 * then holding them, NULL on error. Valid until the next miss (which can forget all): callers
 * take their references at once. Out of line: a hit, the common case, is only the probe. */
static Slot *memo_miss(PyObject *path, Slot *s, Py_ssize_t a, Py_ssize_t b, uint64_t h) {
    PyObject *seg = PyUnicode_Substring(path, a, b), *t;
    if (seg == NULL)
        return NULL;
    if ((t = template_of(seg)) == NULL) {
        Py_DECREF(seg);
        return NULL;
    }
    if (memo_used >= SEGMENT_MEMO) {
        forget_all();
        s = &memo[slot_of(h)];
    }
    if (t == seg) {
        Py_DECREF(t);
        t = NULL;
    }
    *s = (Slot){h, seg, t}; /* the slot takes both references */
    memo_used++;
    return s;
}

/* ---- a path ------------------------------------------------------------------------------ */

/* An ASCII path (the common case): its route is ASCII too (a segment's template is made of its
 * own characters and "{id}"), copied once from the path's bytes and the templates, with no object
 * per segment. */
static PyObject *ascii_route(PyObject *path) {
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(path);
    Py_ssize_t n = PyUnicode_GET_LENGTH(path), total = n;
    struct {
        Py_ssize_t a, b;
        PyObject *t; /* a reference to the template replacing characters [a, b) of the path */
    } rep[MAX_SEGMENTS + 2];
    PyObject *out = NULL;
    int nr = 0;
    for (Py_ssize_t a = 0, np = 0;; np++) {
        if (np == MAX_SEGMENTS + 1) {
            /* deeper: the first segments and one {id} for the rest */
            rep[nr].a = a;
            rep[nr].b = n;
            rep[nr++].t = Py_NewRef(s_id);
            total += PyUnicode_GET_LENGTH(s_id) - (n - a);
            break;
        }
        Py_ssize_t b = a;
        PyObject *t = NULL;
        if (b < n && is_ascii_digit(p[b])) {
            do
                b++;
            while (b < n && is_ascii_digit(p[b]));
            if (b == n || p[b] == '/')
                t = Py_NewRef(s_id);
            else
                b = a; /* not a decimal number after all: hashed from its start */
        }
        if (t == NULL) {
            uint64_t h = FNV_BASIS;
            for (; b < n && p[b] != '/'; b++)
                h = (h ^ p[b]) * FNV_PRIME;
            if (b > a) { /* an empty segment stays */
                Slot *s = probe(h, PyUnicode_1BYTE_KIND, p, a, b - a);
                if (s->seg == NULL && (s = memo_miss(path, s, a, b, h)) == NULL)
                    goto done;
                t = Py_XNewRef(s->tmpl);
            }
        }
        if (t != NULL) {
            assert(PyUnicode_IS_ASCII(t));
            rep[nr].a = a;
            rep[nr].b = b;
            rep[nr++].t = t;
            total += PyUnicode_GET_LENGTH(t) - (b - a);
        }
        if (b == n)
            break;
        a = b + 1;
    }
    if (nr == 0) {
        out = Py_NewRef(path);
        goto done;
    }
    if ((out = PyUnicode_New(total, 127)) == NULL)
        goto done;
    Py_UCS1 *o = PyUnicode_1BYTE_DATA(out);
    Py_ssize_t from = 0;
    for (int i = 0; i < nr; i++) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(rep[i].t);
        memcpy(o, p + from, (size_t)(rep[i].a - from));
        o += rep[i].a - from;
        memcpy(o, PyUnicode_1BYTE_DATA(rep[i].t), (size_t)len);
        o += len;
        from = rep[i].b;
    }
    memcpy(o, p + from, (size_t)(n - from));
done:
    for (int i = 0; i < nr; i++)
        Py_DECREF(rep[i].t);
    return out;
}

/* Any other path: joined from str pieces, which gives the canonical (narrowest) kind for the
 * route, narrower than the path's when its widest characters were in segments that became {id}. */
static PyObject *general_route(PyObject *path) {
    int kind = PyUnicode_KIND(path);
    const void *data = PyUnicode_DATA(path);
    Py_ssize_t n = PyUnicode_GET_LENGTH(path);
    PyObject *pieces[MAX_SEGMENTS + 2], *out = NULL;
    int np = 0, changed = 0;
    for (Py_ssize_t a = 0;;) {
        if (np == MAX_SEGMENTS + 1) {
            pieces[np++] = Py_NewRef(s_id);
            changed = 1;
            break;
        }
        uint64_t h = FNV_BASIS;
        unsigned decimal = 1;
        Py_ssize_t b = a;
        for (Py_UCS4 c; b < n && (c = PyUnicode_READ(kind, data, b)) != '/'; b++) {
            decimal &= c - '0' < 10;
            h = (h ^ c) * FNV_PRIME;
        }
        PyObject *piece;
        if (b == a)
            piece = Py_NewRef(s_empty);
        else if (decimal) {
            piece = Py_NewRef(s_id);
            changed = 1;
        } else {
            Slot *s = probe(h, kind, data, a, b - a);
            if (s->seg == NULL && (s = memo_miss(path, s, a, b, h)) == NULL)
                goto done;
            piece = Py_NewRef(s->tmpl ? s->tmpl : s->seg); /* the key: the segment's characters */
            changed |= s->tmpl != NULL;
        }
        pieces[np++] = piece;
        if (b == n)
            break;
        a = b + 1;
    }
    if (!changed) {
        out = Py_NewRef(path);
        goto done;
    }
    PyObject *seq = PyTuple_New(np);
    if (seq == NULL)
        goto done;
    for (int i = 0; i < np; i++)
        PyTuple_SET_ITEM(seq, i, pieces[i]); /* the tuple takes the references */
    np = 0;
    out = PyUnicode_Join(s_slash, seq);
    Py_DECREF(seq);
done:
    for (int i = 0; i < np; i++)
        Py_DECREF(pieces[i]);
    return out;
}

static PyObject *route_template(PyObject *mod, PyObject *path) {
    if (!PyUnicode_Check(path)) {
        PyErr_Format(PyExc_TypeError, "route_template() takes a str, not %.100s", Py_TYPE(path)->tp_name);
        return NULL;
    }
    if (PyUnicode_READY(path) < 0)
        return NULL;
    return PyUnicode_IS_ASCII(path) ? ascii_route(path) : general_route(path);
}

static PyObject *segment_template(PyObject *mod, PyObject *seg) {
    if (!PyUnicode_Check(seg)) {
        PyErr_Format(PyExc_TypeError, "segment_template() takes a str, not %.100s", Py_TYPE(seg)->tp_name);
        return NULL;
    }
    return template_of(seg);
}

static PyObject *is_identifier(PyObject *mod, PyObject *seg) {
    if (!PyUnicode_Check(seg)) {
        PyErr_Format(PyExc_TypeError, "is_identifier() takes a str, not %.100s", Py_TYPE(seg)->tp_name);
        return NULL;
    }
    Part s = whole(seg);
    return PyBool_FromLong(identifier(&s));
}

/* ---- RouteCap ---------------------------------------------------------------------------- */

/* One service's admitted routes, in the cap's list of services from least to most recently
 * used. The cap's dict owns the entries; the list links are borrowed. */
typedef struct Entry {
    PyObject_HEAD
    PyObject *service;
    PyObject *routes; /* set of str */
    struct Entry *prev, *next;
} Entry;

static int entry_traverse(Entry *self, visitproc visit, void *arg) {
    Py_VISIT(self->service);
    Py_VISIT(self->routes);
    return 0;
}

static int entry_clear(Entry *self) {
    Py_CLEAR(self->service);
    Py_CLEAR(self->routes);
    return 0;
}

static void entry_dealloc(Entry *self) {
    PyObject_GC_UnTrack(self);
    entry_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Entry_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "correlator._routes._Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)entry_traverse,
    .tp_clear = (inquiry)entry_clear,
    .tp_dealloc = (destructor)entry_dealloc,
};

typedef struct {
    PyObject_HEAD
    PyObject *by_service; /* service -> Entry */
    Entry *oldest, *newest;
    Py_ssize_t max_routes, max_services;
    Py_ssize_t overflowed;         /* requests named OVERFLOW_ROUTE */
    Py_ssize_t services_forgotten; /* services evicted beyond max_services (their routes start over) */
} RouteCap;

static void unlink_entry(RouteCap *self, Entry *e) {
    if (e->prev)
        e->prev->next = e->next;
    else
        self->oldest = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        self->newest = e->prev;
    e->prev = e->next = NULL;
}

static void append_entry(RouteCap *self, Entry *e) {
    e->prev = self->newest;
    e->next = NULL;
    if (self->newest)
        self->newest->next = e;
    else
        self->oldest = e;
    self->newest = e;
}

static int cap_traverse(RouteCap *self, visitproc visit, void *arg) {
    Py_VISIT(self->by_service);
    return 0;
}

static int cap_clear(RouteCap *self) {
    self->oldest = self->newest = NULL;
    Py_CLEAR(self->by_service);
    return 0;
}

static void cap_dealloc(RouteCap *self) {
    PyObject_GC_UnTrack(self);
    cap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int cap_init(RouteCap *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"max_routes", "max_services", NULL};
    Py_ssize_t max_routes = DEFAULT_MAX_ROUTES, max_services = DEFAULT_MAX_SERVICES;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|nn", kwlist, &max_routes, &max_services))
        return -1;
    if (max_routes < 1 || max_services < 1) {
        PyErr_SetString(PyExc_ValueError, "max_routes and max_services must be >= 1");
        return -1;
    }
    PyObject *d = PyDict_New();
    if (d == NULL)
        return -1;
    cap_clear(self);
    self->by_service = d;
    self->max_routes = max_routes;
    self->max_services = max_services;
    self->overflowed = self->services_forgotten = 0;
    return 0;
}

/* admit(service, route) -> route itself when the service has room for it (or admitted it
 * before), else OVERFLOW_ROUTE. */
static PyObject *cap_admit(RouteCap *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "admit(service, route)");
        return NULL;
    }
    PyObject *service = args[0], *route = args[1];
    if (self->by_service == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RouteCap was not initialised");
        return NULL;
    }
    Entry *e = (Entry *)PyDict_GetItemWithError(self->by_service, service);
    if (e == NULL) {
        if (PyErr_Occurred())
            return NULL;
        if ((e = PyObject_GC_New(Entry, &Entry_Type)) == NULL)
            return NULL;
        e->service = Py_NewRef(service);
        e->prev = e->next = NULL;
        if ((e->routes = PySet_New(NULL)) == NULL) {
            Py_DECREF(e);
            return NULL;
        }
        PyObject_GC_Track(e);
        int r = PyDict_SetItem(self->by_service, service, (PyObject *)e);
        Py_DECREF(e); /* the dict holds it */
        if (r < 0)
            return NULL;
        append_entry(self, e);
        if (PyDict_GET_SIZE(self->by_service) > self->max_services) {
            Entry *old = self->oldest;
            unlink_entry(self, old);
            self->services_forgotten++;
            Py_INCREF(old);
            r = PyDict_DelItem(self->by_service, old->service);
            Py_DECREF(old);
            if (r < 0)
                return NULL;
        }
    } else if (e != self->newest) {
        unlink_entry(self, e);
        append_entry(self, e);
    }
    int in = PySet_Contains(e->routes, route);
    if (in < 0)
        return NULL;
    if (in)
        return Py_NewRef(route);
    if (PySet_GET_SIZE(e->routes) < self->max_routes) {
        if (PySet_Add(e->routes, route) < 0)
            return NULL;
        return Py_NewRef(route);
    }
    self->overflowed++;
    return Py_NewRef(s_overflow);
}

static PyObject *cap_routes_of(RouteCap *self, PyObject *service) {
    if (self->by_service == NULL)
        return PyFrozenSet_New(NULL);
    Entry *e = (Entry *)PyDict_GetItemWithError(self->by_service, service);
    if (e == NULL && PyErr_Occurred())
        return NULL;
    return PyFrozenSet_New(e ? e->routes : NULL);
}

static PyMethodDef cap_methods[] = {
    {"admit", (PyCFunction)(void (*)(void))cap_admit, METH_FASTCALL,
     "admit(service, route) -> route, or OVERFLOW_ROUTE once the service has max_routes others"},
    {"routes_of", (PyCFunction)cap_routes_of, METH_O, "routes_of(service) -> frozenset of its admitted routes"},
    {NULL},
};

static PyMemberDef cap_members[] = {
    {"max_routes", T_PYSSIZET, offsetof(RouteCap, max_routes), READONLY, NULL},
    {"max_services", T_PYSSIZET, offsetof(RouteCap, max_services), READONLY, NULL},
    {"overflowed", T_PYSSIZET, offsetof(RouteCap, overflowed), READONLY, "requests named OVERFLOW_ROUTE"},
    {"services_forgotten", T_PYSSIZET, offsetof(RouteCap, services_forgotten), READONLY,
     "services evicted beyond max_services (their routes start over)"},
    {NULL},
};

static PyTypeObject RouteCap_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "correlator._routes.RouteCap",
    .tp_doc = "RouteCap(max_routes=100, max_services=1024): at most max_routes distinct routes per service "
              "(first come, first kept), the rest OVERFLOW_ROUTE; the least recently seen services are "
              "forgotten beyond max_services.",
    .tp_basicsize = sizeof(RouteCap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)cap_init,
    .tp_traverse = (traverseproc)cap_traverse,
    .tp_clear = (inquiry)cap_clear,
    .tp_dealloc = (destructor)cap_dealloc,
    .tp_methods = cap_methods,
    .tp_members = cap_members,
};

/* ---- module ------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"route_template", route_template, METH_O, "route_template(path) -> route: /users/42/orders -> /users/{id}/orders"},
    {"segment_template", segment_template, METH_O, "segment_template(segment) -> the segment, {id}, or {id}.ext"},
    {"is_identifier", is_identifier, METH_O,
     "is_identifier(segment) -> whether it names one thing among many (an id), not a route's literal"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "correlator._routes", "The route heuristic and cap (correlator/routes.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__routes(void) {
    if (PyType_Ready(&Entry_Type) < 0 || PyType_Ready(&RouteCap_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if ((s_id = PyUnicode_InternFromString("{id}")) == NULL ||
        (s_overflow = PyUnicode_InternFromString("/{overflow}")) == NULL ||
        (s_slash = PyUnicode_InternFromString("/")) == NULL || (s_dot = PyUnicode_InternFromString(".")) == NULL ||
        (s_id_dot = PyUnicode_InternFromString("{id}.")) == NULL || (s_empty = PyUnicode_InternFromString("")) == NULL ||
        PyModule_AddObjectRef(m, "ID", s_id) < 0 || PyModule_AddObjectRef(m, "OVERFLOW_ROUTE", s_overflow) < 0 ||
        PyModule_AddIntConstant(m, "DEFAULT_MAX_ROUTES", DEFAULT_MAX_ROUTES) < 0 ||
        PyModule_AddIntConstant(m, "DEFAULT_MAX_SERVICES", DEFAULT_MAX_SERVICES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SEGMENTS", MAX_SEGMENTS) < 0 ||
        PyModule_AddIntConstant(m, "SEGMENT_MEMO", SEGMENT_MEMO) < 0 ||
        PyModule_AddObjectRef(m, "RouteCap", (PyObject *)&RouteCap_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
