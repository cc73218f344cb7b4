/* HTTP/1.x exchange tracking shared by every probe family (sockets, OpenSSL, Go).
 *
 * A probe hands each transfer of bytes to kspan_on_data() (uprobes: kspan_on_data_tail()); this
 * file keeps one state per connection (conn_id = struct sock address), recognises a request and
 * its response, parses the response framing in the kernel and emits ONE struct kspan_exchange per
 * finished exchange, so the ring buffer carries one record per request instead of one per syscall.
 *
 * Every family's object includes this header, so each declares the shared maps below; the
 * loader (tracer/capture.py) makes every later object reuse the first object's maps, so all
 * families share one connection table and one ring buffer. A shared map's definition must
 * therefore be the same in every object. Settings are `const volatile` globals the loader sets
 * before load (the verifier then prunes the branches they turn off), and map sizes are set there
 * too: nothing is recompiled per configuration.
 */
#ifndef KSPAN_HTTP_EXCHANGE_H
#define KSPAN_HTTP_EXCHANGE_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"

/* Compile-time defaults; the loader resizes these maps (--max-connections, --ringbuf-pages). */
#define KSPAN_MAX_CONNS 16384
#define KSPAN_RINGBUF_BYTES (4096 * 4096)

const volatile __u32 kspan_self_pid = 0;          /* the agent's own tgid: never traced */
const volatile bool kspan_filter_pids = false;    /* --pid/--exe: only allowed_pids are traced */
const volatile bool kspan_filter_exe = false;     /* --exe: an exec whose comm is allowed adds its pid */
const volatile bool kspan_filter_ports = false;   /* --port: only connections with an allowed port */
const volatile bool kspan_network_events = true;  /* retransmit, reset, RTT and failed-connect records */
const volatile bool kspan_args_from_regs = true;  /* x86_64: syscall arguments from the saved user registers */
/* Head sampling (OTEL_TRACES_SAMPLER): decided where a trace starts, inherited by its children. */
const volatile __u32 kspan_sampler = 0;           /* enum kspan_sampler */
const volatile __u64 kspan_sample_threshold = 1ULL << 63; /* traceidratio: ratio * 2^63 */

enum kspan_sampler {
    KSPAN_SAMPLER_ALWAYS_ON = 0,
    KSPAN_SAMPLER_ALWAYS_OFF = 1,
    KSPAN_SAMPLER_RATIO = 2,
    KSPAN_SAMPLER_PB_ALWAYS_ON = 3,
    KSPAN_SAMPLER_PB_ALWAYS_OFF = 4,
    KSPAN_SAMPLER_PB_RATIO = 5,
};
/* Kubernetes workload selection: a process's cgroup v2 id decides (map cgroup_verdict), so the
 * transfers of an excluded pod stop at the first check of every probe. */
const volatile bool kspan_filter_cgroups = false;
const volatile bool kspan_cgroup_default_trace = true; /* a cgroup with no verdict (host processes, new pods) */

#define KSPAN_AF_INET 2
#define KSPAN_AF_INET6 10
#define KSPAN_IPPROTO_TCP 6

#define KSPAN_DIR_EGRESS 1  /* the process wrote these bytes */
#define KSPAN_DIR_INGRESS 2 /* the process read these bytes */

/* Bytes of one transfer scanned for response headers; headers beyond it in a single transfer
 * leave the framing unknown (the exchange then ends on the next request, close or timeout). */
#define KSPAN_SCAN 512

/* One transfer of bytes, as a probe saw it. */
struct kspan_data_args {
    __u64 conn_id;
    __u32 pid;
    __u32 tid;
    __u8 dir;             /* KSPAN_DIR_* */
    __u8 source;          /* enum kspan_source */
    /* Set by the state machine: the transfer's first pre_n bytes are in the per-CPU scan buffer
     * (kspan_scan), read once there for every copy that needs them. Callers leave it 0. */
    __u16 pre_n;
    __u32 flags;          /* KSPAN_FLAG_* to set on the exchange (e.g. KSPAN_FLAG_TLS) */
    const char *buf;      /* user memory; NULL: bytes are counted, not read (sendfile) */
    __u32 len;            /* bytes actually transferred */
    __u64 start_ns;       /* write: call entry; read: when the data arrived */
    __u64 end_ns;         /* write: return; read: when the data arrived */
    /* Optional, for scattered buffers (writev, sendmsg); zero means "buf holds all len bytes". */
    __u32 buf_len;        /* contiguous readable bytes at buf */
    __u32 tail_n;         /* > 0: tail holds the last tail_n (<= 8) bytes, newest in the low byte */
    __u64 tail;
    /* Scattered buffers: the user iovec array, its length and the bytes of its first segment
     * already consumed, for the segment copy of other protocols (kspan_proto_copy). */
    __u64 iov;
    __u32 vlen;
    __u32 iov_skip;
};

/* An OpenSSL call in progress on a thread (filled by the TLS uprobes). */
struct kspan_ssl_call {
    __u64 ssl;
    __u64 sk;             /* set by the socket path when the call reaches the socket */
    const char *buf;
    __u64 start_ns;
};

/* A socket's addresses, from sock:inet_sock_set_state or struct sock_common. */
struct kspan_tuple {
    __u16 family;
    __u16 local_port;     /* host byte order */
    __u16 remote_port;
    __u16 _pad;
    __u32 pid;            /* process last seen on the socket; 0 if unknown */
    __u32 _pad2;
    __u8 local_addr[16];
    __u8 remote_addr[16];
};

/* Addresses in IPv6 form (IPv4 as ::ffff:a.b.c.d), so that a dual-stack socket's end matches an
 * IPv4 socket's end of the same connection. */
struct kspan_endpoint {
    __u8 addr[16];
    __u16 port;
    __u16 _pad;
};

struct kspan_conn_key {
    __u8 local_addr[16];
    __u8 remote_addr[16];
    __u16 local_port;
    __u16 remote_port;
};

/* An exchange named by another (a parent hint), and for thread_ctx the thread's server load.
 * `inflight` counts the server exchanges started on the thread and not yet ended; `ambiguous` is
 * set once it has exceeded one and stays set until the thread is idle: after 2 -> 1 the remaining
 * exchange need not be the one this ref names, so only a thread that never served two at once
 * names its request. */
struct kspan_exchange_ref {
    __u64 conn_id;
    __u64 req_start_ns;
    __u32 pid;
    __u32 inflight;
    __u32 ambiguous;
    __u32 flags;          /* client_conns: the client's KSPAN_FLAG_SAMPLED */
    /* client_conns only: the client exchange's identity (fixed when it began), so its server
     * peer takes it even after the client's state is gone, and when the connection closed */
    __u8 trace_id[16];
    __u64 span_id;
    __u64 closed_ns;
};

struct kspan_inflight {
    __s64 count;          /* server exchanges in flight in the process */
    __u64 conn_id;        /* the last one started */
    __u64 req_start_ns;
    __u32 ambiguous;      /* more than one was in flight since the process was last idle */
    __u32 _pad;
};

enum kspan_phase {
    KSPAN_PH_IDLE = 0,       /* between exchanges (keep-alive) */
    KSPAN_PH_REQ = 1,        /* request seen, no response yet */
    KSPAN_PH_RESP = 2,       /* response in progress */
    KSPAN_PH_WAIT_FINAL = 3, /* a 1xx interim response ended; the final one is still to come */
    KSPAN_PH_PREFIX = 4,     /* no exchange: pending bytes may start a request (kspan_conn.pend) */
    KSPAN_PH_PROTO = 5,      /* another protocol (kspan_conn.method: enum kspan_proto): segments */
};

enum kspan_hdr_state {
    KSPAN_HS_STATUS = 0, KSPAN_HS_LINE = 1, KSPAN_HS_NAME = 2, KSPAN_HS_CL = 3, KSPAN_HS_TE = 4,
    KSPAN_HS_SKIP = 5, KSPAN_HS_CR = 6, KSPAN_HS_DONE = 7, KSPAN_HS_GAVE_UP = 8,
};

enum kspan_framing {
    KSPAN_FR_UNKNOWN = 0, KSPAN_FR_LENGTH = 1, KSPAN_FR_CHUNKED = 2, KSPAN_FR_NONE = 3,
    KSPAN_FR_CLOSE = 4,
};

/* "\r\n0\r\n\r\n": the last-chunk marker as the newest 7 bytes of the tail register. */
#define KSPAN_CHUNKED_END 0x0d0a300d0a0d0aULL
#define KSPAN_CHUNKED_END_MASK 0x00ffffffffffffffULL

#define KSPAN_METHOD_HEAD 4

/* The map value embeds the whole record so bpf_ringbuf_output copies it straight from the map
 * (the stack is 512 bytes). `spare` is the room that lets the verifier accept variable-offset
 * copies into req_head/resp_head. */
struct kspan_conn {
    struct kspan_exchange ex;
    __u64 last_ns;          /* last progress, for the user-space timeout sweep */
    __u64 resp_head_end;    /* response bytes up to the end of the headers (valid when HS_DONE) */
    __u64 content_length;
    __u64 tail;             /* newest response bytes, newest in the low byte */
    __u32 cl_pos;           /* scan results kept in the map value, not in registers: a register */
    __u32 te_pos;           /* later used as an index would make the verifier tell loop states apart */
    __u32 scan_n;           /* bytes read into the scan buffer by the last scan */
    __u32 scan_end;
    __u32 te_end;
    __u32 _pad_scan;
    __u8 phase;
    __u8 req_dir;
    __u8 method;
    __u8 hdr_state;
    __u8 framing;
    __u8 tail_n;
    __u8 has_length;
    __u8 chunked;
    /* Bytes that may begin a request line or a status line, held until the next transfer in
     * their direction decides (HTTP lets a sender split a message at any byte: a client writing
     * "GE" then "T / ...", or Go's one-byte background read). pend holds the first pend_n (<= 7)
     * bytes, first byte in the low byte, zero above; pend_start_ns is the first fragment's start. */
    __u64 pend;
    __u64 pend_start_ns;
    __u8 pend_n;
    __u8 pend_dir;          /* KSPAN_DIR_* of the pending bytes */
    __u8 tls;               /* a TLS probe owns the connection: the socket path skips it (its
                             * bytes are ciphertext) without a tls_conns lookup */
    __u8 serving;           /* the server exchange holds a thread_serving slot (kspan_serving_add) */
    __u8 nonhttp;           /* the last transfer that could have begun a request did not: the
                             * next one is not read ahead (kspan_read_ahead) */
    __u8 _pad_pend[3];
    /* Identity (see kspan_fix_server): the client request a PEER link last used (a keep-alive
     * connection's next request must not take it again), and the claim on fixing the ids. */
    __u64 peer_used_ns;
    __u64 id_claim;         /* 64-bit: BPF's cmpxchg before -mcpu=v3 has no 32-bit form */
    __u16 tcp_in;           /* 0x100 | W3C flags: the peer's TCP option gave trace_id/parent_span_id */
    __u16 _pad_id[3];
    __u64 fd_key;           /* tgid<<32|fd whose fd_sk entry the socket path last checked */
    __u64 rtt_ns;           /* when the connection's RTT was last sampled (kspan_rtt_sample) */
    /* Room for the verifier: an append into req_head is seen as offset <= 511 plus up to 1023
     * bytes (the mask it can follow), which must stay inside the map value; 128 is the size of
     * the fields above between resp_tail and spare. */
    char spare[KSPAN_REQ_HEAD + KSPAN_REQ_HEAD - KSPAN_RESP_HEAD - KSPAN_TAIL - 128];
};

/* The response-header scan reads the transfer here (per CPU: a program runs to its end on one
 * CPU), not in the connection state: every connection state would carry the buffer otherwise,
 * and the kernel allocates max_connections of them up front. */
struct kspan_scan_buf {
    char b[1024 + 64];      /* 1023 (masked offset) + 32 zeroed bytes fit */
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_scan_buf);
} kspan_scan SEC(".maps");

/* Per-CPU copy of the transfer's arguments: see kspan_args_copy. */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_data_args);
} kspan_args SEC(".maps");

/* Counters, readable from user space by name (tracer/capture.py COUNTER_NAMES, same order). */
enum kspan_counter {
    KSPAN_CNT_RECORDS = 0,          /* exchange records emitted */
    KSPAN_CNT_LOST = 1,             /* ring buffer full: records lost */
    KSPAN_CNT_REQUESTS = 2,         /* requests recognised */
    KSPAN_CNT_NON_HTTP_SEGMENTS = 3,/* transfers on untracked connections that do not start a request */
    KSPAN_CNT_UNPARSED_BYTES = 4,   /* their bytes, and bytes seen out of protocol order */
    KSPAN_CNT_STATE_FULL = 5,       /* connection state could not be created */
    KSPAN_CNT_NEXT_REQUEST = 6,     /* exchanges ended by the next request (framing unknown) */
    KSPAN_CNT_HEAD_GAVE_UP = 7,     /* response headers longer than the scan window */
    KSPAN_CNT_NO_SYSCALL_ARGS = 8,  /* socket transfer outside a traced syscall (io_uring, ...) */
    KSPAN_CNT_TLS_SKIPPED = 9,      /* encrypted transfers left to the TLS probes */
    KSPAN_CNT_FILTERED = 10,        /* requests dropped by --port or the agent's own endpoints */
    KSPAN_CNT_PROC_RECORDS = 11,
    KSPAN_CNT_TCP_RECORDS = 12,
    KSPAN_CNT_SELF_SKIPPED = 13,    /* transfers by the agent itself */
    KSPAN_CNT_TUPLE_UNKNOWN = 14,   /* requests on sockets whose addresses are unknown */
    KSPAN_CNT_ORPHAN_RESPONSE = 15, /* responses with no request seen (connection older than the agent) */
    KSPAN_CNT_CLOSED = 16,          /* exchanges ended by close */
    KSPAN_CNT_TAIL_CALL_MISSED = 17,/* uprobe transfers lost: kspan_exchange_progs had no program */
    KSPAN_CNT_AMBIGUOUS = 18,       /* client requests left unlinked: their thread served several at once */
    KSPAN_CNT_UNSAMPLED = 19,       /* exchanges head sampling dropped: a metrics-only record each */
    KSPAN_CNT_PARENT_LOST = 20,     /* client requests whose named parent was gone (evicted): no link */
    KSPAN_CNT_CGROUP_SKIPPED = 21,  /* TCP transfers and events of pods excluded by workload selection */
    KSPAN_CNT_CTX_WRITTEN = 22,     /* segments that carried a trace-context TCP option (bpf/tcp_context.bpf.c) */
    KSPAN_CNT_CTX_NO_ROOM = 23,     /* requests whose context found no room in the TCP option space */
    KSPAN_CNT_CTX_PARSED = 24,      /* contexts read from a peer's TCP option into ctx_in */
    KSPAN_CNT_CTX_MALFORMED = 25,   /* kind-25 options that are not kspan's (wrong length, zero ids) */
    KSPAN_CNT_SEGMENTS = 26,        /* segment records of other protocols (Redis, PostgreSQL, MySQL, HTTP/2) */
    KSPAN_CNT_H2_UNSYNCED = 27,     /* HTTP/2 directions whose frame walk lost the frame boundaries */
    KSPAN_CNT_MAX = 28,
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, KSPAN_RINGBUF_BYTES);
} events SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, KSPAN_CNT_MAX);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, __u64);
    __type(value, struct kspan_conn);
} conns SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_conn);
} kspan_zero SEC(".maps"); /* never written: the initial value */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, __u64);
    __type(value, struct kspan_tuple);
} tuples SEC(".maps");
/* A tuple being built, per CPU rather than on the stack: the frames of a call chain share 512
 * bytes when the kernel gives a program no private stack (kspan_sock_length's frame). */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_tuple);
} tuple_scratch SEC(".maps");

/* Shared with the TLS/Go uprobes (names are a contract). */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, __u64);
    __type(value, __u64);
} fd_sk SEC(".maps"); /* tgid<<32|fd -> sk */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, __u64);
    __type(value, __u8);
} tls_conns SEC(".maps"); /* sk -> 1: plaintext comes from a TLS probe */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, struct kspan_ssl_call);
} ssl_active SEC(".maps"); /* pid_tgid -> SSL call in progress */

/* What every socket transfer would otherwise look up to learn it has nothing to do. One ARRAY
 * entry: its lookup is inlined, a hash lookup is not. */
struct kspan_gate {
    __s64 ssl_calls;        /* ssl_active's entries (bpf/openssl.bpf.c counts its inserts and
                             * deletes): 0 means no thread is inside an SSL call */
    __u32 ctx_in_seen;      /* a peer's context option was parsed once (bpf/tcp_context.bpf.c):
                             * before that, ctx_in is empty */
    __u32 client_seen;      /* a client request was written to client_conns once: before that, a
                             * server has no local client to look up (kspan_fix_server) */
    __u32 go_seen;          /* bpf/go_http.bpf.c wrote go_client_parent once (kspan_client_decide) */
    __u32 ctx_out_seen;     /* a context was written to ctx_out once (kspan_ctx_out_seen): before
                             * that, the sock_ops program has nothing to send on any segment */
};
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_gate);
} kspan_gates SEC(".maps");

static __always_inline struct kspan_gate *kspan_gate(void)
{
    __u32 z = 0;
    return bpf_map_lookup_elem(&kspan_gates, &z);
}

/* Before a write to client_conns (a flag set once: no cache line shared by CPUs is written after). */
static __always_inline void kspan_client_seen(void)
{
    struct kspan_gate *g = kspan_gate();
    if (g && !g->client_seen)
        g->client_seen = 1;
}

/* Before a write to ctx_out (set once, like client_seen). */
static __always_inline void kspan_ctx_out_seen(void)
{
    struct kspan_gate *g = kspan_gate();
    if (g && !g->ctx_out_seen)
        g->ctx_out_seen = 1;
}

/* Whether this thread may be inside an SSL call (ssl_active worth a lookup). */
static __always_inline int kspan_ssl_calls_maybe(void)
{
    struct kspan_gate *g = kspan_gate();
    return !g || g->ssl_calls > 0;
}

/* Parent hints. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, struct kspan_exchange_ref);
} thread_ctx SEC(".maps"); /* pid_tgid -> serving exchange */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u32);
    __type(value, struct kspan_inflight);
} proc_inflight SEC(".maps"); /* tgid -> server exchanges in flight */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, struct kspan_conn_key);
    __type(value, struct kspan_exchange_ref);
} client_conns SEC(".maps");
/* Go: client sock -> the server exchange whose goroutine (or a descendant) issued the call, filled
 * by bpf/go_http.bpf.c at net/http.(*persistConn).roundTrip; threads say nothing in Go. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, struct kspan_exchange_ref);
} go_client_parent SEC(".maps");
#define KSPAN_HAVE_GO_CLIENT_PARENT 1

/* Cross-host trace context carried in a TCP option (see struct kspan_trace_ctx), keyed by the
 * connection as each end sees it (local, remote), addresses in IPv6 form. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, struct kspan_conn_key);
    __type(value, struct kspan_trace_ctx);
} ctx_out SEC(".maps"); /* client request starting on this connection: its context, to be sent */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, struct kspan_conn_key);
    __type(value, struct kspan_trace_ctx);
} ctx_in SEC(".maps");  /* context parsed from the peer's TCP option: the server span's parent */

/* Filters. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u32);
    __type(value, __u8);
} allowed_pids SEC(".maps");

/* allowed_pids' generations: [0] moved by the kernel's writers (bpf/process.bpf.c), [1] by user
 * space's (tracer/capture.py), each after its change, each by one side only (user space writes
 * its element whole). A cached verdict is good while both are what they were when it was read. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} pid_gen SEC(".maps");

/* Per CPU, the verdicts of the last processes seen (by tgid, direct-mapped): every socket
 * transfer and write of a filtered run asks, and a hash lookup in allowed_pids cost ~100 ns
 * where these two ARRAY lookups are inlined. */
#define KSPAN_PID_SLOTS 16
struct kspan_pid_slot {
    __u32 pid;
    __u32 traced;
    __u64 kgen;
    __u64 ugen;
};
struct kspan_pid_cache {
    struct kspan_pid_slot slot[KSPAN_PID_SLOTS];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_pid_cache);
} pid_cache SEC(".maps");

/* After a kernel-side change to allowed_pids. */
static __always_inline void kspan_pid_gen_bump(void)
{
    __u32 k = 0;
    __u64 *g = bpf_map_lookup_elem(&pid_gen, &k);
    if (g)
        __sync_fetch_and_add(g, 1);
}

/* Whether --pid/--exe let the process (tgid) through. */
static __always_inline int kspan_pid_allowed(__u32 pid)
{
    __u32 k0 = 0, k1 = 1;
    __u64 *kg = bpf_map_lookup_elem(&pid_gen, &k0);
    __u64 *ug = bpf_map_lookup_elem(&pid_gen, &k1);
    struct kspan_pid_cache *c = bpf_map_lookup_elem(&pid_cache, &k0);
    if (!kg || !ug || !c)
        return bpf_map_lookup_elem(&allowed_pids, &pid) != 0;
    /* the generations before the lookup: a change after it moves them past what is cached */
    __u64 kgen = *kg, ugen = *ug;
    struct kspan_pid_slot *s = &c->slot[pid & (KSPAN_PID_SLOTS - 1)];
    if (s->pid == pid && s->kgen == kgen && s->ugen == ugen)
        return s->traced;
    int traced = bpf_map_lookup_elem(&allowed_pids, &pid) != 0;
    s->pid = pid;
    s->traced = traced;
    s->kgen = kgen;
    s->ugen = ugen;
    return traced;
}

/* cgroup v2 id -> 1 trace, 0 skip; written by tracer/kubernetes.py as pods come and go. The id
 * is the inode number of the cgroup's directory; every cgroup of a pod (the pod's own and each
 * container's) has an entry. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, __u8);
} cgroup_verdict SEC(".maps");

static __always_inline int kspan_cgroup_id_skipped(__u64 id)
{
    __u8 *v = bpf_map_lookup_elem(&cgroup_verdict, &id);
    if (v)
        return !*v;
    return !kspan_cgroup_default_trace;
}

/* Process context only: the current task's cgroup is the one doing the transfer. */
static __always_inline int kspan_cgroup_skipped(void)
{
    if (!kspan_filter_cgroups)
        return 0;
    return kspan_cgroup_id_skipped(bpf_get_current_cgroup_id());
}

/* Whether the probes skip this process: the agent itself, with --pid/--exe whatever is not
 * allowed, and the pods workload selection excludes. One place, shared by every probe family. */
static __always_inline int kspan_pid_skipped(__u32 pid)
{
    if (pid == kspan_self_pid)
        return 1;
    if (kspan_filter_pids && !kspan_pid_allowed(pid))
        return 1;
    if (kspan_cgroup_skipped())
        return 1;
    return 0;
}
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u16);
    __type(value, __u8);
} allowed_ports SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 4096);
    __type(key, struct kspan_endpoint);
    __type(value, __u8);
} self_endpoints SEC(".maps"); /* where the agent sends from */

static __always_inline void kspan_count(__u32 idx, __u64 n)
{
    __u64 *v = bpf_map_lookup_elem(&counters, &idx);
    if (v)
        *v += n;
}

static __always_inline void kspan_norm_addr(__u8 *dst, __u16 family, const __u8 *src)
{
    if (family == KSPAN_AF_INET) {
#pragma unroll
        for (int i = 0; i < 10; i++)
            dst[i] = 0;
        dst[10] = 0xff;
        dst[11] = 0xff;
#pragma unroll
        for (int i = 0; i < 4; i++)
            dst[12 + i] = src[i];
    } else {
#pragma unroll
        for (int i = 0; i < 16; i++)
            dst[i] = src[i];
    }
}

/* A socket older than the agent has no inet_sock_set_state event: read its addresses from
 * struct sock_common, relocated by CO-RE against the running kernel's BTF. */
static __always_inline struct kspan_tuple *kspan_tuple_of(__u64 sk)
{
    struct kspan_tuple *t = bpf_map_lookup_elem(&tuples, &sk);
    if (t)
        return t;
    __u32 zero = 0;
    struct kspan_tuple *nt = bpf_map_lookup_elem(&tuple_scratch, &zero);
    if (!nt)
        return 0;
    __builtin_memset(nt, 0, sizeof(*nt));
    const struct sock_common *s = (const struct sock_common *)sk;
    /* read into the scratch entry, not into stack temporaries (the same 512 bytes) */
    bpf_core_read(&nt->family, sizeof(nt->family), &s->skc_family);
    bpf_core_read(&nt->remote_port, sizeof(nt->remote_port), &s->skc_dport);
    bpf_core_read(&nt->local_port, sizeof(nt->local_port), &s->skc_num);  /* host order */
    __u16 family = nt->family;
    if (family == KSPAN_AF_INET) {
        bpf_core_read(nt->local_addr, 4, &s->skc_rcv_saddr);
        bpf_core_read(nt->remote_addr, 4, &s->skc_daddr);
    } else if (family == KSPAN_AF_INET6) {
        bpf_core_read(nt->local_addr, 16, &s->skc_v6_rcv_saddr);
        bpf_core_read(nt->remote_addr, 16, &s->skc_v6_daddr);
    } else {
        return 0;
    }
    __u16 dport = nt->remote_port;
    nt->remote_port = (dport >> 8) | (dport << 8);  /* skc_dport is network order */
    bpf_map_update_elem(&tuples, &sk, nt, BPF_ANY);
    return bpf_map_lookup_elem(&tuples, &sk);
}

static __always_inline void kspan_conn_key_from(struct kspan_conn_key *k, __u16 family, const __u8 *laddr,
                                                 const __u8 *raddr, __u16 lport, __u16 rport, int reversed)
{
    if (!reversed) {
        kspan_norm_addr(k->local_addr, family, laddr);
        kspan_norm_addr(k->remote_addr, family, raddr);
        k->local_port = lport;
        k->remote_port = rport;
    } else {
        kspan_norm_addr(k->local_addr, family, raddr);
        kspan_norm_addr(k->remote_addr, family, laddr);
        k->local_port = rport;
        k->remote_port = lport;
    }
}

static __always_inline void kspan_conn_key_of(struct kspan_conn_key *k, struct kspan_tuple *t, int reversed)
{
    kspan_conn_key_from(k, t->family, t->local_addr, t->remote_addr, t->local_port, t->remote_port, reversed);
}

/* The same key from an exchange's own tuple (reversed = 1: the key its peer registered under),
 * read from the map value in place: a copy on the stack would count against the 512 bytes every
 * call chain of a kprobe program shares (see kspan_pre_scratch). */
static __always_inline void kspan_conn_key_of_ex(struct kspan_conn_key *k, struct kspan_conn *st, int reversed)
{
    kspan_conn_key_from(k, st->ex.family, st->ex.local_addr, st->ex.remote_addr, st->ex.local_port,
                        st->ex.remote_port, reversed);
}

/* Whether a key's remote end is a loopback address (127.0.0.0/8 or ::1; the key holds IPv4 as
 * ::ffff:a.b.c.d). Both ends of such a connection are on this host, where the server's request
 * finds its client in client_conns: a TCP option would tell the receiver nothing it does not
 * know, and would cost a hash-map update per request and an option on its segments. */
static __always_inline int kspan_key_loopback(const struct kspan_conn_key *k)
{
    __u64 hi, lo;
    __builtin_memcpy(&hi, k->remote_addr, 8);
    __builtin_memcpy(&lo, k->remote_addr + 8, 8);
    if (hi)
        return 0;
    /* little-endian words: bytes 10-11 0xff and byte 12 127 (::ffff:127.x.y.z), or byte 15 1 */
    return (lo & 0xffffffffffULL) == 0x7fffff0000ULL || lo == 1ULL << 56;
}

/* The agent's own sends: remember the local end, so the receiving end (a collector on this host)
 * is not traced either: that would be spans about receiving spans. */
static __always_inline void kspan_note_self(__u64 sk)
{
    kspan_count(KSPAN_CNT_SELF_SKIPPED, 1);
    struct kspan_tuple *t = bpf_map_lookup_elem(&tuples, &sk);
    if (!t)
        return;
    struct kspan_endpoint ep = {};
    kspan_norm_addr(ep.addr, t->family, t->local_addr);
    ep.port = t->local_port;
    if (!bpf_map_lookup_elem(&self_endpoints, &ep)) {
        __u8 one = 1;
        bpf_map_update_elem(&self_endpoints, &ep, &one, BPF_ANY);
    }
}

/* The first bytes of a transfer as one little-endian word (first byte in the low byte): a method
 * token or a status-line start is then one masked compare, not a branch per byte. */
#define KSPAN_LE(a, b, c, d, e, f, g, h)                                                          \
    ((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 | (__u64)(e) << 32 |     \
     (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)
#define KSPAN_LOW(n) ((n) >= 8 ? ~0ULL : ((1ULL << (8 * (n))) - 1)) /* the first n bytes */

/* Each method token with its space; the id is enum-like (kspan_conn.method), 4 is HEAD. */
#define KSPAN_METHODS(X)                                                  \
    X(KSPAN_LE('G', 'E', 'T', ' ', 0, 0, 0, 0), 4, 1)                     \
    X(KSPAN_LE('P', 'U', 'T', ' ', 0, 0, 0, 0), 4, 3)                     \
    X(KSPAN_LE('P', 'O', 'S', 'T', ' ', 0, 0, 0), 5, 2)                   \
    X(KSPAN_LE('H', 'E', 'A', 'D', ' ', 0, 0, 0), 5, KSPAN_METHOD_HEAD)   \
    X(KSPAN_LE('P', 'A', 'T', 'C', 'H', ' ', 0, 0), 6, 5)                 \
    X(KSPAN_LE('T', 'R', 'A', 'C', 'E', ' ', 0, 0), 6, 6)                 \
    X(KSPAN_LE('D', 'E', 'L', 'E', 'T', 'E', ' ', 0), 7, 7)               \
    X(KSPAN_LE('O', 'P', 'T', 'I', 'O', 'N', 'S', ' '), 8, 8)             \
    X(KSPAN_LE('C', 'O', 'N', 'N', 'E', 'C', 'T', ' '), 8, 9)
#define KSPAN_STATUS_START KSPAN_LE('H', 'T', 'T', 'P', '/', '1', '.', 0) /* 7 bytes */

/* Method token followed by a space at the start of w (n bytes valid); a method id or 0. */
static __always_inline __u8 kspan_method(__u64 w, __u32 n)
{
#define KSPAN_IS_METHOD(tok, len, id) \
    if (n >= (len) && (w & KSPAN_LOW(len)) == (tok)) \
        return (id);
    KSPAN_METHODS(KSPAN_IS_METHOD)
#undef KSPAN_IS_METHOD
    return 0;
}

/* w's n bytes (1..7) are a proper prefix of a method token and its space ("G", "GE", "GET",
 * "OPTIONS"): the next bytes may complete a request line. */
static __always_inline int kspan_method_prefix(__u64 w, __u32 n)
{
    if (n == 0 || n > 7)
        return 0;
    __u64 low = (1ULL << (8 * n)) - 1;
#define KSPAN_IS_PREFIX(tok, len, id) \
    if (n < (len) && ((w ^ (tok)) & low) == 0) \
        return 1;
    KSPAN_METHODS(KSPAN_IS_PREFIX)
#undef KSPAN_IS_PREFIX
    return 0;
}

static __always_inline int kspan_is_response(__u64 w, __u32 n)
{
    return n >= 7 && (w & KSPAN_LOW(7)) == KSPAN_STATUS_START;
}

/* w's n bytes (1..6) are a proper prefix of "HTTP/1.": the next bytes may complete it. */
static __always_inline int kspan_response_prefix(__u64 w, __u32 n)
{
    if (n == 0 || n > 6)
        return 0;
    __u64 low = (1ULL << (8 * n)) - 1;
    return ((w ^ KSPAN_STATUS_START) & low) == 0;
}

/* Bytes readable at a->buf. */
static __always_inline __u32 kspan_readable(struct kspan_data_args *a)
{
    if (!a->buf)
        return 0;
    if (a->buf_len && a->buf_len < a->len)
        return a->buf_len;
    return a->len;
}

/* Append up to `room` bytes of user data to a head buffer at a variable offset. The asm barrier
 * stops clang from folding the mask away (it knows the value is already smaller), so the
 * verifier sees a bound; `spare` gives the room past the last head buffer. */
#define KSPAN_APPEND_FROM(field, cap, lenfield, read, src, avail, flag)            \
    do {                                                                          \
        __u32 _off = st->ex.lenfield;                                             \
        if (_off < (cap)) {                                                       \
            __u32 _n = (avail);                                                   \
            __u32 _room = (cap) - _off;                                           \
            if (_n > _room)                                                       \
                _n = _room;                                                       \
            asm volatile("" : "+r"(_n));                                          \
            _n &= (2 * (cap) - 1);                                                \
            _off &= ((cap) - 1);                                                  \
            if (_n > 0 && read(&st->ex.field[_off], _n, (src)) == 0)              \
                st->ex.lenfield = _off + _n;                                      \
            if (st->ex.lenfield >= (cap))                                         \
                st->ex.flags |= (flag);                                           \
        }                                                                         \
    } while (0)
#define KSPAN_APPEND(field, cap, lenfield, src, avail, flag) \
    KSPAN_APPEND_FROM(field, cap, lenfield, bpf_probe_read_user, src, avail, flag)

/* Global functions defined below (each verified once on its own). */
__attribute__((noinline)) int kspan_serving_end(__u64 conn_id);

static __always_inline void kspan_release_hints(struct kspan_conn *st)
{
    if (st->ex.role == KSPAN_ROLE_SERVER)
        kspan_serving_end(st->ex.conn_id);
    /* A client's client_conns entry outlives its exchange: on loopback the server's own end can
     * fix its identity after the client has read the whole response (kspan_fix_server). The next
     * request replaces it; a close marks it (kspan_on_close). */
}


/* ---- identity: trace id, span id and the sampling decision, fixed in the kernel ----
 * A client request takes its identity when it starts: its parent (a request its thread or
 * goroutine serves) is known then. A server request fixes its own lazily, on first need (a child
 * starting, its response starting, or its end): by then a local client on the other end has
 * registered its request (on loopback the server can read the request before the client's send
 * has returned) and the request's headers, with any traceparent, have arrived. */

static __always_inline __u64 kspan_rand64(void)
{
    __u64 v = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
    return v ? v : 1;  /* W3C: an all-zero id is invalid */
}

/* traceidratio as the OpenTelemetry SDKs decide it (the Go SDK's rule): the trace id's last 8
 * bytes, big-endian, shifted right by one, below ratio * 2^63. A function of the trace id alone,
 * so every agent that sees the same trace decides the same. */
static __always_inline __u32 kspan_ratio_keeps(const __u8 *tid)
{
    __u64 x = 0;
#pragma unroll
    for (int i = 8; i < 16; i++)
        x = (x << 8) | tid[i];
    return (x >> 1) < kspan_sample_threshold ? KSPAN_FLAG_SAMPLED : 0;
}

static __always_inline __u32 kspan_root_sampled(const __u8 *tid)
{
    __u32 s = kspan_sampler;
    if (s == KSPAN_SAMPLER_ALWAYS_ON || s == KSPAN_SAMPLER_PB_ALWAYS_ON)
        return KSPAN_FLAG_SAMPLED;
    if (s == KSPAN_SAMPLER_ALWAYS_OFF || s == KSPAN_SAMPLER_PB_ALWAYS_OFF)
        return 0;
    return kspan_ratio_keeps(tid);
}

/* A remote parent (traceparent, TCP option): parentbased_* samplers follow its sampled flag. */
static __always_inline __u32 kspan_remote_sampled(const __u8 *tid, __u32 w3c_flags)
{
    __u32 s = kspan_sampler;
    if (s == KSPAN_SAMPLER_ALWAYS_ON)
        return KSPAN_FLAG_SAMPLED;
    if (s == KSPAN_SAMPLER_ALWAYS_OFF)
        return 0;
    if (s == KSPAN_SAMPLER_RATIO)
        return kspan_ratio_keeps(tid);
    return (w3c_flags & 1) ? KSPAN_FLAG_SAMPLED : 0;
}

#define KSPAN_W_TRACEPAR 0x7261706563617274ULL /* "tracepar" */
#define KSPAN_W_ENT_ 0x3a746e65U               /* "ent:" */
#define KSPAN_TP_LEN 55                        /* "00-" 32 hex "-" 16 hex "-" 2 hex */

struct kspan_hdr_scan {
    const char *b;          /* map memory: a request head, KSPAN_REQ_HEAD bytes and room after */
    __u32 limit;            /* positions of '\n' worth looking at: [0, limit) */
    __u32 at;               /* just after the name's ':'; 0: not found */
    __u64 w1;               /* the name's first 8 bytes, lower case */
    __u64 w2;               /* its next bytes up to and with ':', lower case */
    __u64 m2;               /* the bytes of w2 that count */
    __u32 name_len;         /* bytes of the name and ':' (9 to 16) */
    __u32 _pad;
};

/* Eight positions of a header scan per call (a bpf_loop callback: the verifier checks it once,
 * not per position). A word with no '\n' is skipped whole, the common case. Header names are
 * case-insensitive; OR-ing 0x20 lower-cases letters and keeps '-' and ':'. */
static long kspan_hdr_step(__u32 i, void *c)
{
    struct kspan_hdr_scan *s = c;
    __u32 base = i * 8;
    if (base >= s->limit)
        return 1;
    const char *b = s->b;
    __u32 j = base & (KSPAN_REQ_HEAD - 1);
    __u64 w = 0;
    __builtin_memcpy(&w, &b[j], 8);
    __u64 v = w ^ 0x0a0a0a0a0a0a0a0aULL;
    if (!((v - 0x0101010101010101ULL) & ~v & 0x8080808080808080ULL))
        return 0;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (((w >> (8 * k)) & 0xff) != '\n')
            continue;
        __u32 p = (j + k) & (KSPAN_REQ_HEAD - 1);
        if (p >= s->limit)
            return 1;
        __u64 x = 0, x2 = 0;
        __builtin_memcpy(&x, &b[p + 1], 8);
        __builtin_memcpy(&x2, &b[p + 9], 8);
        if ((x | 0x2020202020202020ULL) == s->w1 && ((x2 | 0x2020202020202020ULL) & s->m2) == s->w2) {
            s->at = p + 1 + s->name_len;
            return 1;
        }
    }
    return 0;
}

/* Where the value of a header starts in the head at b (len bytes, `room` of them needed after
 * the name), past optional whitespace; 0: the header is not there. */
static __always_inline __u32 kspan_find_header(const char *b, __u32 len, __u64 w1, __u64 w2, __u64 m2,
                                               __u32 name_len, __u32 room)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;  /* before 5.17: user space reads headers from the head */
    if (len > KSPAN_REQ_HEAD)
        len = KSPAN_REQ_HEAD;
    if (len < 1 + name_len + room)
        return 0;
    struct kspan_hdr_scan scan = {.b = b, .limit = len - name_len - room, .w1 = w1, .w2 = w2, .m2 = m2,
                                  .name_len = name_len};
    bpf_loop(KSPAN_REQ_HEAD / 8, kspan_hdr_step, &scan, 0);
    __u32 p = scan.at;
    if (!p)
        return 0;
#pragma unroll
    for (int k = 0; k < 2; k++) {
        __u8 ch = b[p & (KSPAN_REQ_HEAD - 1)];
        if (ch == ' ' || ch == '\t')
            p++;
    }
    return p;
}

#define KSPAN_W_X_REQUES 0x7365757165722d78ULL /* "x-reques" */
#define KSPAN_W_T_ID_ 0x3a64692d74ULL          /* "t-id:" */

static __always_inline int kspan_hex(__u8 c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')  /* W3C: lower case only */
        return c - 'a' + 10;
    return -1;
}

/* A valid W3C traceparent in the request head: its trace id, parent span id and flags. */
static __always_inline int kspan_traceparent(struct kspan_conn *st, __u8 *tid, __u64 *sid, __u32 *fl)
{
    __u32 len = st->ex.req_head_len;
    if (len > KSPAN_REQ_HEAD)
        len = KSPAN_REQ_HEAD;
    __u32 p = kspan_find_header(st->ex.req_head, len, KSPAN_W_TRACEPAR, KSPAN_W_ENT_, 0xffffffffULL, 12,
                                KSPAN_TP_LEN);
    if (!p)
        return 0;
    if (p + KSPAN_TP_LEN > len)
        return 0;
    const char *h = st->ex.req_head;
#define KSPAN_TP_AT(k) ((__u8)h[(p + (k)) & (KSPAN_REQ_HEAD - 1)])
    if (KSPAN_TP_AT(2) != '-' || KSPAN_TP_AT(35) != '-' || KSPAN_TP_AT(52) != '-')
        return 0;
    int v0 = kspan_hex(KSPAN_TP_AT(0)), v1 = kspan_hex(KSPAN_TP_AT(1));
    if (v0 < 0 || v1 < 0 || (v0 == 15 && v1 == 15))
        return 0;  /* version ff is invalid */
    __u8 any = 0;
    for (int k = 0; k < 16; k++) {
        int hi = kspan_hex(KSPAN_TP_AT(3 + 2 * k)), lo = kspan_hex(KSPAN_TP_AT(4 + 2 * k));
        if (hi < 0 || lo < 0)
            return 0;
        tid[k] = (hi << 4) | lo;
        any |= tid[k];
    }
    __u64 span = 0;
    for (int k = 0; k < 16; k++) {
        int d = kspan_hex(KSPAN_TP_AT(36 + k));
        if (d < 0)
            return 0;
        span = (span << 4) | d;
    }
    int f0 = kspan_hex(KSPAN_TP_AT(53)), f1 = kspan_hex(KSPAN_TP_AT(54));
#undef KSPAN_TP_AT
    if (!any || !span || f0 < 0 || f1 < 0)
        return 0;
    *sid = span;
    *fl = (f0 << 4) | f1;
    return 1;
}

/* Fix a server exchange's identity, once. Returns 1 when conns[conn_id] still holds the exchange
 * that started at req_start_ns and its ids are fixed. Its parent, in order: a traced local client
 * on the other end of the connection (PEER: kspan's own client span, the true parent), a W3C
 * traceparent in the request, the peer host's kspan context from a TCP option; otherwise it is
 * a root and mints the trace id and decides sampling.
 * A global (non-static) function: the verifier checks it once on its own, not inline at every
 * caller inside the state machine. */
__attribute__((noinline)) int kspan_fix_server(__u64 conn_id, __u64 req_start_ns)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st || st->ex.req_start_ns != req_start_ns || st->ex.type != KSPAN_REC_EXCHANGE ||
        st->ex.role != KSPAN_ROLE_SERVER)
        return 0;
    if (st->ex.flags & KSPAN_FLAG_IDS)
        return 1;
    /* two CPUs may both need it (children on two threads): one fixes it, the other links nothing */
    if (__sync_val_compare_and_swap(&st->id_claim, 0, 1) != 0)
        return (st->ex.flags & KSPAN_FLAG_IDS) ? 1 : 0;
    __u32 sampled = 0;
    struct kspan_gate *g = kspan_gate();
    if ((!g || g->client_seen) && (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN)) {
        struct kspan_conn_key k = {};
        kspan_conn_key_of_ex(&k, st, 1);
        struct kspan_exchange_ref *peer = bpf_map_lookup_elem(&client_conns, &k);
        /* the client's request started before this one was read, is not the one the previous
         * request on this connection took, and its connection was still open then */
        if (peer && peer->span_id && peer->req_start_ns <= st->ex.req_start_ns &&
            peer->req_start_ns > st->peer_used_ns &&
            (!peer->closed_ns || peer->closed_ns > st->ex.req_start_ns)) {
            st->ex.parent_kind = KSPAN_PARENT_PEER;
            st->ex.parent_conn_id = peer->conn_id;
            st->ex.parent_req_start_ns = peer->req_start_ns;
            st->ex.parent_pid = peer->pid;
            __builtin_memcpy(st->ex.trace_id, peer->trace_id, 16);
            st->ex.parent_span_id = peer->span_id;
            st->peer_used_ns = peer->req_start_ns;
            st->ex.flags |= (peer->flags & KSPAN_FLAG_SAMPLED) | KSPAN_FLAG_IDS;
            return 1;
        }
    }
    __u8 tid[16] = {};
    __u64 sid = 0;
    __u32 fl = 0;
    if (kspan_traceparent(st, tid, &sid, &fl)) {
        st->ex.parent_kind = KSPAN_PARENT_TRACEPARENT;
        __builtin_memcpy(st->ex.trace_id, tid, 16);
        st->ex.parent_span_id = sid;
        sampled = kspan_remote_sampled(tid, fl);
        st->ex.flags |= KSPAN_FLAG_REMOTE_PARENT;
    } else if (st->tcp_in) {
        /* trace_id and parent_span_id were taken from ctx_in when the request began */
        st->ex.parent_kind = KSPAN_PARENT_TCP_OPTION;
        sampled = kspan_remote_sampled(st->ex.trace_id, st->tcp_in);
        st->ex.flags |= KSPAN_FLAG_REMOTE_PARENT;
    } else {
        __u64 a = kspan_rand64(), b = kspan_rand64();
        __builtin_memcpy(st->ex.trace_id, &a, 8);
        __builtin_memcpy(st->ex.trace_id + 8, &b, 8);
        st->ex.parent_span_id = 0;
        sampled = kspan_root_sampled(st->ex.trace_id);
    }
    st->ex.flags |= sampled | KSPAN_FLAG_IDS;
    return 1;
}


/* ---- evidence for event loops ----
 * A thread serving several requests at once cannot say which one a call it makes belongs to.
 * Its call is linked only on evidence naming one of them: a proxy forwarding the request line
 * ("GET /orders?id=42") of exactly one request the thread is serving. */
#define KSPAN_SERVING_SLOTS 64  /* requests in flight per thread that can be named (a power of 2) */
#define KSPAN_LINE_MAX 128

struct kspan_serving_slot {
    __u64 conn_id;          /* 0: free */
    __u64 req_start_ns;
    __u64 line;             /* FNV-1a of the request's method and target */
    __u64 rid;              /* FNV-1a of its X-Request-ID; 0: none */
};
struct kspan_serving {
    struct kspan_serving_slot slot[KSPAN_SERVING_SLOTS];
};
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 2048);
    __type(key, __u64);
    __type(value, struct kspan_serving);
} thread_serving SEC(".maps"); /* pid_tgid -> the server requests in flight on the thread */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_serving);
} kspan_serving_zero SEC(".maps"); /* never written: a new thread's empty slots (too big for the stack) */

struct kspan_line_buf {
    char b[KSPAN_LINE_MAX + 8];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_line_buf);
} kspan_line SEC(".maps");

/* FNV-1a of "METHOD SP target" (up to the second space or the line's end): the version is left
 * out, a proxy may speak another one upstream. 0 when the line does not end within the window:
 * no evidence from a cut line. */
struct kspan_hash_scan {
    const char *b;          /* map memory: a head or the per-CPU head buffer */
    __u32 n;
    __u32 spaces;
    __u64 h;
    __u64 out;
    __u32 value;            /* a header value: hash to the line's end, spaces included */
    __u32 _pad;
};

/* One byte of the hash (a bpf_loop callback, verified once rather than per byte). */
static long kspan_hash_step(__u32 i, void *c)
{
    struct kspan_hash_scan *x = c;
    if (i >= x->n)
        return 1;
    __u8 ch = x->b[i & (KSPAN_LINE_MAX - 1)];
    if (ch == '\r' || ch == '\n') {
        x->out = x->spaces || x->value ? x->h : 0;
        return 1;
    }
    if (!x->value && ch == ' ' && ++x->spaces == 2) {
        x->out = x->h;
        return 1;
    }
    x->h = (x->h ^ ch) * 0x100000001b3ULL;
    return 0;
}

static __always_inline __u64 kspan_line_hash(const char *b, __u32 n)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;  /* before 5.17: no evidence, calls from event loops stay unlinked */
    struct kspan_hash_scan x = {.b = b, .n = n, .spaces = 0, .h = 0xcbf29ce484222325ULL, .out = 0};
    bpf_loop(KSPAN_LINE_MAX, kspan_hash_step, &x, 0);
    return x.out;
}

/* FNV-1a of the X-Request-ID header's value in the head at b (len bytes); 0: none. An id a proxy
 * or framework forwards on the calls it makes for a request names that request. */
static __always_inline __u64 kspan_rid_hash(const char *b, __u32 len)
{
    __u32 p = kspan_find_header(b, len, KSPAN_W_X_REQUES, KSPAN_W_T_ID_, 0xffffffffffULL, 13, 4);
    if (!p)
        return 0;
    p &= KSPAN_REQ_HEAD - 1;
    __u32 n = len > p ? len - p : 0;
    if (n > KSPAN_LINE_MAX)
        n = KSPAN_LINE_MAX;
    struct kspan_hash_scan x = {.b = b + p, .n = n, .h = 0xcbf29ce484222325ULL, .value = 1};
    bpf_loop(KSPAN_LINE_MAX, kspan_hash_step, &x, 0);
    return x.out;
}

/* Walks over a thread's slots, as bpf_loop callbacks: a loop's body is verified once, where an
 * open-coded loop over 16 slots multiplied the states of every program calling it. */
struct kspan_slot_scan {
    struct kspan_serving *sv;
    __u64 conn_id;
    __u64 line;
    __u64 rid;
    __s32 found;            /* slot index; -1 none */
    __u32 matches;
    __s32 rfound;           /* by X-Request-ID */
    __u32 rmatches;
};

static long kspan_slot_free_step(__u32 i, void *c)
{
    struct kspan_slot_scan *x = c;
    struct kspan_serving_slot *sl = &x->sv->slot[i & (KSPAN_SERVING_SLOTS - 1)];
    if (sl->conn_id == 0 || sl->conn_id == x->conn_id) {
        x->found = i & (KSPAN_SERVING_SLOTS - 1);
        return 1;
    }
    return 0;
}

static long kspan_slot_line_step(__u32 i, void *c)
{
    struct kspan_slot_scan *x = c;
    struct kspan_serving_slot *sl = &x->sv->slot[i & (KSPAN_SERVING_SLOTS - 1)];
    if (sl->conn_id && x->line && sl->line == x->line) {
        x->found = i & (KSPAN_SERVING_SLOTS - 1);
        x->matches++;
    }
    if (sl->conn_id && x->rid && sl->rid == x->rid) {
        x->rfound = i & (KSPAN_SERVING_SLOTS - 1);
        x->rmatches++;
    }
    return 0;
}

static long kspan_slot_conn_step(__u32 i, void *c)
{
    struct kspan_slot_scan *x = c;
    struct kspan_serving_slot *sl = &x->sv->slot[i & (KSPAN_SERVING_SLOTS - 1)];
    if (sl->conn_id == x->conn_id) {
        sl->conn_id = 0;
        return 1;
    }
    return 0;
}

/* The server request that began at req_start_ns on conn_id, served by thread pid_tgid: a slot
 * with its request line, for evidence. */
__attribute__((noinline)) int kspan_serving_add(__u64 conn_id, __u64 req_start_ns, __u64 pid_tgid)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st || st->ex.req_start_ns != req_start_ns || st->ex.role != KSPAN_ROLE_SERVER ||
        st->ex.type != KSPAN_REC_EXCHANGE)
        return 0;
    __u32 n = st->ex.req_head_len;
    if (n > KSPAN_LINE_MAX)
        n = KSPAN_LINE_MAX;
    __u64 line = kspan_line_hash(st->ex.req_head, n);
    struct kspan_serving *sv = bpf_map_lookup_elem(&thread_serving, &pid_tgid);
    if (!sv) {
        int z = 0;
        struct kspan_serving *empty = bpf_map_lookup_elem(&kspan_serving_zero, &z);
        if (!empty)
            return 0;
        bpf_map_update_elem(&thread_serving, &pid_tgid, empty, BPF_NOEXIST);
        sv = bpf_map_lookup_elem(&thread_serving, &pid_tgid);
        if (!sv)
            return 0;
    }
    struct kspan_slot_scan x = {.sv = sv, .conn_id = conn_id, .found = -1};
    bpf_loop(KSPAN_SERVING_SLOTS, kspan_slot_free_step, &x, 0);
    if (x.found < 0)
        return 0;  /* more in flight than slots: the others give no evidence */
    struct kspan_serving_slot *sl = &sv->slot[x.found & (KSPAN_SERVING_SLOTS - 1)];
    sl->conn_id = conn_id;
    sl->req_start_ns = st->ex.req_start_ns;
    sl->line = line;
    sl->rid = kspan_rid_hash(st->ex.req_head, st->ex.req_head_len);
    st->serving = 1;
    return 1;
}

/* A server request begins on thread pid_tgid: the thread's and the process's load, which the
 * parent rules read (kspan_client_decide). The thread's entry is updated in place and kept at
 * inflight 0 when the thread goes idle: a delete and a new LRU insert per request cost more than
 * the lookup. Serving slots (the evidence an event loop's calls are linked by) are taken only
 * once the thread has two requests in flight, the first of them then too: until then the thread
 * rule names its one request and no slot is read. */
__attribute__((noinline)) int kspan_serving_begin(__u64 conn_id, __u64 pid_tgid)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return 0;
    __u64 start = st->ex.req_start_ns;
    __u32 pid = pid_tgid >> 32;
    __u64 first = 0, first_start = 0;
    int several = 0;
    struct kspan_exchange_ref *cur = bpf_map_lookup_elem(&thread_ctx, &pid_tgid);
    if (cur) {
        /* (a 32-bit atomic's old value needs -mcpu=v3: read, then add) */
        __u32 before = cur->inflight;
        __sync_fetch_and_add(&cur->inflight, 1);
        if (before > 0) {
            /* a second request in flight on this thread: an event loop */
            several = 1;
            if (!cur->ambiguous) {
                first = cur->conn_id;
                first_start = cur->req_start_ns;
            }
            cur->ambiguous = 1;
        }
        cur->conn_id = conn_id;
        cur->req_start_ns = start;
        cur->pid = pid;
    } else {
        struct kspan_exchange_ref me = {};
        me.conn_id = conn_id;
        me.req_start_ns = start;
        me.pid = pid;
        me.inflight = 1;
        bpf_map_update_elem(&thread_ctx, &pid_tgid, &me, BPF_ANY);
    }
    struct kspan_inflight *f = bpf_map_lookup_elem(&proc_inflight, &pid);
    if (f) {
        if (__sync_fetch_and_add(&f->count, 1) > 0)
            f->ambiguous = 1;
        f->conn_id = conn_id;
        f->req_start_ns = start;
    } else {
        struct kspan_inflight nf = {};
        nf.count = 1;
        nf.conn_id = conn_id;
        nf.req_start_ns = start;
        bpf_map_update_elem(&proc_inflight, &pid, &nf, BPF_ANY);
    }
    if (several) {
        if (first)
            kspan_serving_add(first, first_start, pid_tgid);
        kspan_serving_add(conn_id, start, pid_tgid);
    }
    return 1;
}

__attribute__((noinline)) int kspan_serving_del(__u64 conn_id, __u64 pid_tgid);

/* The server exchange on conn_id ends (emitted): undo kspan_serving_begin. */
__attribute__((noinline)) int kspan_serving_end(__u64 conn_id)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return 0;
    __u64 key = ((__u64)st->ex.pid << 32) | st->ex.tid;
    struct kspan_exchange_ref *t = bpf_map_lookup_elem(&thread_ctx, &key);
    if (t) {
        if (t->inflight <= 1) {
            /* the thread's last one: idle, and known for sure again */
            t->inflight = 0;
            t->ambiguous = 0;
        } else {
            __sync_fetch_and_add(&t->inflight, -1);
        }
    }
    if (st->serving) {
        st->serving = 0;
        kspan_serving_del(conn_id, key);
    }
    __u32 pid = st->ex.pid;
    struct kspan_inflight *f = bpf_map_lookup_elem(&proc_inflight, &pid);
    if (f && f->count > 0 && __sync_fetch_and_add(&f->count, -1) == 1)
        f->ambiguous = 0;  /* idle again: the next one in flight is known for sure */
    return 1;
}

/* A server request ended: its thread no longer serves it. */
__attribute__((noinline)) int kspan_serving_del(__u64 conn_id, __u64 pid_tgid)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;
    struct kspan_serving *sv = bpf_map_lookup_elem(&thread_serving, &pid_tgid);
    if (!sv)
        return 0;
    struct kspan_slot_scan x = {.sv = sv, .conn_id = conn_id, .found = -1};
    bpf_loop(KSPAN_SERVING_SLOTS, kspan_slot_conn_step, &x, 0);
    return 1;
}

/* The one request thread pid_tgid serves that the client request's evidence names: the same
 * X-Request-ID (rid), else the same request line; 0 when none or several. */
static __always_inline struct kspan_serving_slot *kspan_evidence(__u64 pid_tgid, __u64 line, __u64 rid)
{
    if ((!line && !rid) || !bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;
    struct kspan_serving *sv = bpf_map_lookup_elem(&thread_serving, &pid_tgid);
    if (!sv)
        return 0;
    struct kspan_slot_scan x = {.sv = sv, .line = line, .rid = rid, .found = -1, .rfound = -1};
    bpf_loop(KSPAN_SERVING_SLOTS, kspan_slot_line_step, &x, 0);
    if (x.rmatches == 1 && x.rfound >= 0)
        return &sv->slot[x.rfound & (KSPAN_SERVING_SLOTS - 1)];
    if (x.matches == 1 && x.found >= 0)
        return &sv->slot[x.found & (KSPAN_SERVING_SLOTS - 1)];
    return 0;
}

struct kspan_head_buf {
    char b[KSPAN_REQ_HEAD + KSPAN_LINE_MAX + 32]; /* a head, and the room the scans read past it */
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_head_buf);
} kspan_headbuf SEC(".maps");

/* Where kspan_client_keys leaves its two hashes, when it returns 1 (a hash of 0: none). */
struct kspan_keys {
    __u64 line;
    __u64 rid;
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_keys);
} kspan_keys_out SEC(".maps");

/* A client request's evidence (request line and X-Request-ID hashes) into kspan_keys_out: from
 * its user buffer at the write's entry, else from the head the state machine holds.
 * Global, so that the scans' bpf_loop contexts (which must be on the stack) are in this frame
 * alone: inlined, they sat in the frames of kspan_proto_data and the socket program, and the
 * verifier sums a call chain's frames against 512 bytes when the kernel gives a program no
 * private stack. */
__attribute__((noinline)) int kspan_client_keys(__u64 sk, __u64 buf)
{
    __u32 z = 0;
    struct kspan_keys *out = bpf_map_lookup_elem(&kspan_keys_out, &z);
    if (!out)
        return 0;
    const char *b = 0;
    __u32 n = 0;
    if (buf) {
        struct kspan_head_buf *hb = bpf_map_lookup_elem(&kspan_headbuf, &z);
        if (!hb)
            return 0;
        /* a short write near the end of its mapping may not have KSPAN_REQ_HEAD readable bytes */
        if (bpf_probe_read_user(hb->b, KSPAN_REQ_HEAD, (const void *)buf) == 0)
            n = KSPAN_REQ_HEAD;
        else if (bpf_probe_read_user(hb->b, KSPAN_LINE_MAX, (const void *)buf) == 0)
            n = KSPAN_LINE_MAX;
        b = hb->b;
    } else {
        struct kspan_conn *st = bpf_map_lookup_elem(&conns, &sk);
        if (!st)
            return 0;
        n = st->ex.req_head_len;
        b = st->ex.req_head;
    }
    if (!n || !b)
        return 0;
    out->line = kspan_line_hash(b, n > KSPAN_LINE_MAX ? KSPAN_LINE_MAX : n);
    out->rid = kspan_rid_hash(b, n);
    return 1;
}

/* A client request's identity, decided when it starts: at the write's entry where a probe sees
 * it (so that the TCP-option program can carry it on the request's first segment), else when the
 * state machine begins the request. Keyed by socket; taken (deleted) by kspan_fix_client. */
struct kspan_client_id {
    __u8 trace_id[16];
    __u64 span_id;
    __u64 parent_span_id;
    __u64 parent_conn_id;
    __u64 parent_req_start_ns;
    __u64 pid_tgid;          /* the thread that wrote it: only its own write takes it */
    __u32 parent_pid;
    __u32 flags;             /* KSPAN_FLAG_SAMPLED, KSPAN_FLAG_AMBIGUOUS */
    __u8 parent_kind;
    __u8 _pad[3];
    __u32 seq;               /* a protocol segment's write: tcp_sock.write_seq at its entry */
};
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, __u64);
    __type(value, struct kspan_client_id);
} client_pre SEC(".maps");

/* Decide the identity of a client request that thread pid_tgid starts on socket sk: its parent
 * by the kernel's rules (the goroutine that made the call, a thread serving exactly one request,
 * a process with exactly one in flight; an event loop serving several: none, counted), the
 * parent's trace (fixing the parent's identity first), or a new trace and the root's sampling
 * decision. A parent that cannot be read any more gives no link, counted: never a guess.
 * Global: verified once, shared by the write-entry probes and the state machine. */
static __always_inline void kspan_client_decide(struct kspan_client_id *id, __u64 sk, __u64 pid_tgid, __u64 buf,
                                                int count)
{
    id->pid_tgid = pid_tgid;
    id->span_id = kspan_rand64();
    __u32 pid = pid_tgid >> 32;
    struct kspan_gate *gate = kspan_gate();
    struct kspan_exchange_ref *g = !gate || gate->go_seen ? bpf_map_lookup_elem(&go_client_parent, &sk) : 0;
    struct kspan_exchange_ref *t = g ? 0 : bpf_map_lookup_elem(&thread_ctx, &pid_tgid);
    if (g) {
        id->parent_kind = KSPAN_PARENT_GOROUTINE;
        id->parent_conn_id = g->conn_id;
        id->parent_req_start_ns = g->req_start_ns;
        id->parent_pid = g->pid;
        bpf_map_delete_elem(&go_client_parent, &sk);
    } else if (t && t->inflight > 0) {
        /* A thread serving exactly one request (and never two at once since it was idle) names
         * it; an event loop serving several cannot: no parent, counted. */
        if (t->inflight == 1 && !t->ambiguous) {
            id->parent_kind = KSPAN_PARENT_THREAD;
            id->parent_conn_id = t->conn_id;
            id->parent_req_start_ns = t->req_start_ns;
            id->parent_pid = pid;
        } else {
            __u64 line = 0, rid = 0;
            __u32 z = 0;
            struct kspan_keys *keys = kspan_client_keys(sk, buf) ? bpf_map_lookup_elem(&kspan_keys_out, &z) : 0;
            if (keys) {
                line = keys->line;
                rid = keys->rid;
            }
            struct kspan_serving_slot *ev = kspan_evidence(pid_tgid, line, rid);
            if (ev) {
                id->parent_kind = KSPAN_PARENT_EVIDENCE;
                id->parent_conn_id = ev->conn_id;
                id->parent_req_start_ns = ev->req_start_ns;
                id->parent_pid = pid;
            } else {
                id->flags |= KSPAN_FLAG_AMBIGUOUS;
                if (count)
                    kspan_count(KSPAN_CNT_AMBIGUOUS, 1);
            }
        }
    } else {
        struct kspan_inflight *f = bpf_map_lookup_elem(&proc_inflight, &pid);
        if (f && f->count == 1 && !f->ambiguous) {
            id->parent_kind = KSPAN_PARENT_PROCESS;
            id->parent_conn_id = f->conn_id;
            id->parent_req_start_ns = f->req_start_ns;
            id->parent_pid = pid;
        } else if (f && f->count > 0) {
            id->flags |= KSPAN_FLAG_AMBIGUOUS;
            if (count)
                kspan_count(KSPAN_CNT_AMBIGUOUS, 1);
        }
    }
    int linked = 0;
    if (id->parent_kind != KSPAN_PARENT_NONE) {
        __u64 pc = id->parent_conn_id;
        struct kspan_conn *ps = 0;
        if (kspan_fix_server(pc, id->parent_req_start_ns))
            ps = bpf_map_lookup_elem(&conns, &pc);
        if (ps && (ps->ex.flags & KSPAN_FLAG_IDS)) {
            __builtin_memcpy(id->trace_id, ps->ex.trace_id, 16);
            id->parent_span_id = ps->ex.span_id;
            id->flags |= ps->ex.flags & KSPAN_FLAG_SAMPLED;
            linked = 1;
        } else {
            id->parent_kind = KSPAN_PARENT_NONE;
            id->parent_conn_id = 0;
            id->parent_req_start_ns = 0;
            id->parent_pid = 0;
            if (count)
            kspan_count(KSPAN_CNT_PARENT_LOST, 1);
        }
    }
    if (!linked) {
        __u64 a = kspan_rand64(), b = kspan_rand64();
        __builtin_memcpy(id->trace_id, &a, 8);
        __builtin_memcpy(id->trace_id + 8, &b, 8);
        id->flags |= kspan_root_sampled(id->trace_id);
    }
}

/* Per-CPU room for a client request's identity while it is decided and published. A kprobe
 * program (kspan_exchange_kp, which the uprobes tail-call) has no private stack: every call chain
 * it makes shares one 512-byte stack (fix_client -> client_pre -> fix_server -> a bpf_loop
 * callback is the deepest), so the structures are kept here. Each is used by one global function
 * at a time: none of kspan_client_pre, kspan_seg_pre and kspan_proto_data calls another. */
struct kspan_pre_scratch {
    struct kspan_client_id id;
    struct kspan_trace_ctx c;
    struct kspan_exchange_ref me;
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_pre_scratch);
} kspan_pre_buf SEC(".maps");

/* The scratch zeroed, or 0. */
static __always_inline struct kspan_pre_scratch *kspan_pre_scratch(void)
{
    __u32 z = 0;
    struct kspan_pre_scratch *x = bpf_map_lookup_elem(&kspan_pre_buf, &z);
    if (x)
        __builtin_memset(x, 0, sizeof(*x));
    return x;
}

/* Its `me` alone zeroed (the state machine's own client registration), or 0. */
static __always_inline struct kspan_exchange_ref *kspan_pre_ref(void)
{
    __u32 z = 0;
    struct kspan_pre_scratch *x = bpf_map_lookup_elem(&kspan_pre_buf, &z);
    if (!x)
        return 0;
    __builtin_memset(&x->me, 0, sizeof(x->me));
    return &x->me;
}

__attribute__((noinline)) int kspan_client_pre(__u64 sk, __u64 pid_tgid, __u64 buf)
{
    int before_wire = buf != 0;
    struct kspan_pre_scratch *x = kspan_pre_scratch();
    if (!x)
        return 0;
    struct kspan_client_id *id = &x->id;
    kspan_client_decide(id, sk, pid_tgid, buf, 1);
    /* a keep-alive connection's entry is rewritten in place (its writer and its reader,
     * kspan_fix_client, are the same thread, one after the other): no LRU update per request */
    struct kspan_client_id *old = bpf_map_lookup_elem(&client_pre, &sk);
    if (old)
        __builtin_memcpy(old, id, sizeof(*id));
    else
        bpf_map_update_elem(&client_pre, &sk, id, BPF_ANY);
    /* For the TCP-option program: this connection's next data segments carry the context. Only
     * before the request's bytes reach the wire: written later, it would ride on the NEXT
     * request's segments, a wrong parent on the other host. */
    if (!before_wire)
        return 1;
    struct kspan_tuple *tu = kspan_tuple_of(sk);
    if (tu) {
        struct kspan_conn_key k = {};
        kspan_conn_key_of(&k, tu, 0);
        struct kspan_trace_ctx *c = &x->c;
        int local = kspan_key_loopback(&k);
        __builtin_memcpy(c->trace_id, id->trace_id, 16);
        c->span_id = id->span_id;
        c->flags = (id->flags & KSPAN_FLAG_SAMPLED) ? 1 : 0;
        c->ts_ns = bpf_ktime_get_ns();
        /* the sequence number the request's first byte will take: the option rides exactly the
         * segment that starts the request, and its retransmits */
        if (!local) {
            c->seq = BPF_CORE_READ((struct tcp_sock *)sk, write_seq);
            kspan_ctx_out_seen();
            bpf_map_update_elem(&ctx_out, &k, c, BPF_ANY);
        }
        /* The local server on the other end may read the request (and fix its identity) before
         * this write returns, when the writer is preempted on its way out of the send: it finds
         * the client here already. The state machine rewrites the entry when the request begins. */
        struct kspan_exchange_ref *me = &x->me;
        me->conn_id = sk;
        me->req_start_ns = c->ts_ns;
        me->pid = pid_tgid >> 32;
        me->flags = id->flags & KSPAN_FLAG_SAMPLED;
        __builtin_memcpy(me->trace_id, id->trace_id, 16);
        me->span_id = id->span_id;
        kspan_client_seen();
        bpf_map_update_elem(&client_conns, &k, me, BPF_ANY);
    }
    return 1;
}

/* A write-family call is starting on socket sk with its first bytes at user address buf, already
 * known to start a request: decide its identity now, before its segments leave. */
static __always_inline void kspan_pre_request_at(__u64 pid_tgid, __u64 sk, __u64 buf)
{
    if (!sk || bpf_map_lookup_elem(&tls_conns, &sk))
        return;  /* ciphertext: the TLS probes see this connection's requests */
    kspan_client_pre(sk, pid_tgid, buf);
}

/* A socket write is starting on a TLS connection (ciphertext: its bytes say nothing). Publish the
 * context of the client request it carries before its segments leave: a TLS probe that began the
 * request at the TLS write's entry fixed its identity already; otherwise the plaintext buffer of
 * the OpenSSL call in progress (plain_buf) says whether a request starts. */
__attribute__((noinline)) int kspan_tls_pre(__u64 sk, __u64 pid_tgid, __u64 plain_buf)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &sk);
    if (st && st->ex.role == KSPAN_ROLE_CLIENT && st->phase == KSPAN_PH_REQ && (st->ex.flags & KSPAN_FLAG_IDS) &&
        st->ex.pid == (pid_tgid >> 32) && (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN)) {
        struct kspan_conn_key k = {};
        kspan_conn_key_of_ex(&k, st, 0);
        if (kspan_key_loopback(&k))
            return 0;  /* its server is on this host: it pairs through client_conns */
        struct kspan_trace_ctx *cur = bpf_map_lookup_elem(&ctx_out, &k);
        if (cur && cur->span_id == st->ex.span_id)
            return 0;  /* published by an earlier write of the same request */
        struct kspan_trace_ctx c = {};
        __builtin_memcpy(c.trace_id, st->ex.trace_id, 16);
        c.span_id = st->ex.span_id;
        c.flags = (st->ex.flags & KSPAN_FLAG_SAMPLED) ? 1 : 0;
        c.ts_ns = bpf_ktime_get_ns();
        c.seq = BPF_CORE_READ((struct tcp_sock *)sk, write_seq);
        kspan_ctx_out_seen();
        bpf_map_update_elem(&ctx_out, &k, &c, BPF_ANY);
        return 1;
    }
    __u64 w = 0;
    if (!plain_buf || bpf_probe_read_user(&w, 8, (const void *)plain_buf) != 0 || !kspan_method(w, 8))
        return 0;
    return kspan_client_pre(sk, pid_tgid, plain_buf);
}

/* The client exchange in conns[conn_id] takes the identity decided at its start (or decides it
 * now); as a root, an instrumented application's own outgoing traceparent names its trace. */
__attribute__((noinline)) int kspan_fix_client(__u64 conn_id, __u64 pid_tgid)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st || st->ex.role != KSPAN_ROLE_CLIENT)
        return 0;
    struct kspan_client_id *id = bpf_map_lookup_elem(&client_pre, &conn_id);
    int pre = id && id->pid_tgid == pid_tgid;
    if (!pre) {
        /* not seen at its entry: decided now, after its bytes left (no TCP option); decided in
         * place rather than through kspan_client_pre, one call frame less (see kspan_pre_scratch) */
        struct kspan_pre_scratch *x = kspan_pre_scratch();
        if (!x)
            return 0;
        id = &x->id;
        kspan_client_decide(id, conn_id, pid_tgid, 0, 1);
        st = bpf_map_lookup_elem(&conns, &conn_id);
        if (!st)
            return 0;
    }
    st->ex.parent_kind = id->parent_kind;
    st->ex.parent_conn_id = id->parent_conn_id;
    st->ex.parent_req_start_ns = id->parent_req_start_ns;
    st->ex.parent_pid = id->parent_pid;
    __builtin_memcpy(st->ex.trace_id, id->trace_id, 16);
    st->ex.span_id = id->span_id;
    st->ex.parent_span_id = id->parent_span_id;
    st->ex.flags |= id->flags | KSPAN_FLAG_IDS;
    if (pre)
        id->pid_tgid = 0;  /* taken: no later write takes it again (a store, not an LRU delete) */
    __u8 tid[16] = {};
    __u64 sid = 0;
    __u32 fl = 0;
    /* an event loop forwarding its request's traceparent names the trace even when it cannot
     * name the request */
    if (st->ex.parent_kind == KSPAN_PARENT_NONE && kspan_traceparent(st, tid, &sid, &fl)) {
        st->ex.parent_kind = KSPAN_PARENT_TRACEPARENT;
        __builtin_memcpy(st->ex.trace_id, tid, 16);
        st->ex.parent_span_id = sid;
        st->ex.flags = (st->ex.flags & ~KSPAN_FLAG_SAMPLED) | kspan_remote_sampled(tid, fl) |
                       KSPAN_FLAG_REMOTE_PARENT;
    }
    return 1;
}

static __always_inline void kspan_emit(struct kspan_conn *st, __u8 reason)
{
    st->ex.end_reason = reason;
    __u64 total = st->ex.resp_bytes;
    __u8 n = st->tail_n;
    if (total < n)
        n = total;
    st->ex.resp_tail_len = n;
    __u64 tail = st->tail;
    /* oldest byte first */
#pragma unroll
    for (int i = 0; i < KSPAN_TAIL; i++) {
        if (i < n)
            st->ex.resp_tail[i] = (tail >> (8 * (n - 1 - i))) & 0xff;
        else
            st->ex.resp_tail[i] = 0;
    }
    if (!(st->ex.flags & KSPAN_FLAG_IDS))
        kspan_fix_server(st->ex.conn_id, st->ex.req_start_ns);
    /* an unsampled exchange leaves as a metrics-only record: never the full one */
    __u32 size = sizeof(st->ex);
    if (!(st->ex.flags & KSPAN_FLAG_SAMPLED)) {
        st->ex.type = KSPAN_REC_METRIC;
        size = __builtin_offsetof(struct kspan_exchange, req_head) + KSPAN_METRIC_HEAD;
        kspan_count(KSPAN_CNT_UNSAMPLED, 1);
    }
    if (bpf_ringbuf_output(&events, &st->ex, size, BPF_RB_NO_WAKEUP) == 0)
        kspan_count(KSPAN_CNT_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
    st->ex.type = KSPAN_REC_EXCHANGE;
    if (reason == KSPAN_END_NEXT_REQUEST)
        kspan_count(KSPAN_CNT_NEXT_REQUEST, 1);
    if (reason == KSPAN_END_CLOSED)
        kspan_count(KSPAN_CNT_CLOSED, 1);
    kspan_release_hints(st);
    st->phase = KSPAN_PH_IDLE;
}

/* The first KSPAN_SCAN bytes of a transfer that begins a request or a response, in the per-CPU
 * scan buffer (zeroed past them), read once for the head copy, the header scan and the tail; the buffer, or 0 when they
 * could not be read (st->scan_n: how many were). */
static __always_inline struct kspan_scan_buf *kspan_scan_read(struct kspan_conn *st, struct kspan_data_args *a)
{
    int zero = 0;
    struct kspan_scan_buf *sb = bpf_map_lookup_elem(&kspan_scan, &zero);
    if (!sb)
        return 0;
    __u32 n = a->pre_n;  /* read ahead already (kspan_read_ahead) */
    if (!n) {
        n = kspan_readable(a);
        if (n > KSPAN_SCAN)
            n = KSPAN_SCAN;
        asm volatile("" : "+r"(n));
        n &= 1023;
        if (n == 0 || bpf_probe_read_user(sb->b, n, a->buf) != 0)
            return 0;
        __builtin_memset(&sb->b[n & 1023], 0, 32);
    }
    st->scan_n = n;
    return sb;
}

/* The request head's first bytes from this transfer (the per-CPU kspan_args), after any pending
 * ones. Global: verified once, not on every path into kspan_begin_request. */
__attribute__((noinline)) int kspan_req_head_copy(__u64 conn_id)
{
    int zero = 0;
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &zero);
    if (!st || !a)
        return 0;
    struct kspan_scan_buf *sb = kspan_scan_read(st, a);
    if (!sb)
        return 0;
    KSPAN_APPEND_FROM(req_head, KSPAN_REQ_HEAD, req_head_len, bpf_probe_read_kernel, sb->b, st->scan_n,
                      KSPAN_FLAG_REQ_HEAD_FULL);
    return 1;
}

/* Start a request on a connection state (new, idle, or replacing an unfinished exchange). */
/* Forget what the previous response's head said about its framing: a new request, or the final
 * response after a 1xx interim one, is framed afresh. */
static __always_inline void kspan_reset_framing(struct kspan_conn *st)
{
    st->hdr_state = KSPAN_HS_STATUS;
    st->framing = KSPAN_FR_UNKNOWN;
    st->has_length = 0;
    st->chunked = 0;
    st->content_length = 0;
    st->resp_head_end = 0;
    st->tail = 0;
    st->tail_n = 0;
}

/* A client exchange begins (ids fixed): its client_conns entry, which its server end on this
 * host links by (PEER). kspan_client_pre registered the request at its write's entry already,
 * unless the write was not seen then: only its start moves, one 8-byte store that a reader on
 * another CPU sees whole or not at all, where a new entry is an LRU update. */
static __always_inline void kspan_client_register(struct kspan_conn *st)
{
    struct kspan_conn_key k = {};
    kspan_conn_key_of_ex(&k, st, 0);
    struct kspan_exchange_ref *cur = bpf_map_lookup_elem(&client_conns, &k);
    if (cur && cur->conn_id == st->ex.conn_id && cur->span_id == st->ex.span_id && !cur->closed_ns &&
        cur->flags == (st->ex.flags & KSPAN_FLAG_SAMPLED)) {
        __u64 c0, c1, t0, t1;
        __builtin_memcpy(&c0, cur->trace_id, 8);
        __builtin_memcpy(&c1, cur->trace_id + 8, 8);
        __builtin_memcpy(&t0, st->ex.trace_id, 8);
        __builtin_memcpy(&t1, st->ex.trace_id + 8, 8);
        if (c0 == t0 && c1 == t1) {
            cur->req_start_ns = st->ex.req_start_ns;
            return;
        }
    }
    struct kspan_exchange_ref *me = kspan_pre_ref();
    if (!me)
        return;
    me->conn_id = st->ex.conn_id;
    me->req_start_ns = st->ex.req_start_ns;
    me->pid = st->ex.pid;
    me->flags = st->ex.flags & KSPAN_FLAG_SAMPLED;
    __builtin_memcpy(me->trace_id, st->ex.trace_id, 16);
    me->span_id = st->ex.span_id;
    kspan_client_seen();
    bpf_map_update_elem(&client_conns, &k, me, BPF_ANY);
}

static __always_inline void kspan_begin_request(struct kspan_conn *st, struct kspan_data_args *a, __u8 method)
{
    kspan_count(KSPAN_CNT_REQUESTS, 1);
    /* Pending bytes in this direction are the request's first bytes (the body joined them to
     * this transfer to recognise the method); in the other direction they are out of order. The
     * count is read from the map, not passed in a register: the verifier does not track map
     * values, so the paths with and without pending bytes merge again after this block. */
    __u32 k = 0;
    if (st->pend_n) {
        if (st->pend_dir == a->dir)
            k = st->pend_n & 7;
        else
            kspan_count(KSPAN_CNT_UNPARSED_BYTES, st->pend_n);
        st->pend_n = 0;
    }
    st->phase = KSPAN_PH_REQ;
    st->req_dir = a->dir;
    st->method = method;
    kspan_reset_framing(st);
    st->last_ns = a->end_ns;

    st->ex.type = KSPAN_REC_EXCHANGE;
    st->ex.pid = a->pid;
    st->ex.tid = a->tid;
    st->ex.role = a->dir == KSPAN_DIR_EGRESS ? KSPAN_ROLE_CLIENT : KSPAN_ROLE_SERVER;
    st->ex.end_reason = 0;
    st->ex.source = a->source;
    st->ex.parent_kind = KSPAN_PARENT_NONE;
    st->ex.flags = (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN) | a->flags;
    st->ex.status = 0;
    st->ex.req_start_ns = a->start_ns;
    st->ex.req_end_ns = a->end_ns;
    st->ex.resp_start_ns = 0;
    st->ex.resp_end_ns = 0;
    st->ex.req_bytes = a->len;
    st->ex.resp_bytes = 0;
    st->ex.parent_conn_id = 0;
    st->ex.parent_req_start_ns = 0;
    st->ex.parent_pid = 0;
    st->ex.req_head_len = 0;
    st->ex.resp_head_len = 0;
    st->ex.resp_tail_len = 0;
    st->ex.span_id = kspan_rand64();
    st->ex.parent_span_id = 0;
    __builtin_memset(st->ex.trace_id, 0, 16);
    st->id_claim = 0;
    st->tcp_in = 0;
    if (k) {
        /* the request began with the first fragment; all 8 bytes are stored (zero past k, and
         * overwritten by the append below): a fixed-size store is cheaper to verify */
        __u64 pend = st->pend;
        st->ex.req_start_ns = st->pend_start_ns;
        st->ex.req_bytes = a->len + k;
        __builtin_memcpy(st->ex.req_head, &pend, 8);
        st->ex.req_head_len = k;
    }
    st->nonhttp = 0;
    kspan_req_head_copy(st->ex.conn_id);

    __u64 pid_tgid = ((__u64)a->pid << 32) | a->tid;
    if (st->ex.role == KSPAN_ROLE_SERVER) {
        kspan_serving_begin(st->ex.conn_id, pid_tgid);
        /* the peer host's kspan context for this request, parsed from its TCP option before
         * these bytes could be read; taken now, before the next request's can replace it (none
         * is there before the first option ever parsed) */
        struct kspan_gate *g = kspan_gate();
        if ((!g || g->ctx_in_seen) && (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN)) {
            struct kspan_conn_key k = {};
            kspan_conn_key_of_ex(&k, st, 0);
            struct kspan_trace_ctx *in = bpf_map_lookup_elem(&ctx_in, &k);
            if (in) {
                __builtin_memcpy(st->ex.trace_id, in->trace_id, 16);
                st->ex.parent_span_id = in->span_id;
                st->tcp_in = 0x100 | in->flags;
                bpf_map_delete_elem(&ctx_in, &k);
            }
        }
    } else {
        kspan_fix_client(st->ex.conn_id, pid_tgid);
        if (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN)
            kspan_client_register(st);
    }
}

/* Shift the newest bytes of this transfer into the tail register. sb: the scan buffer when it
 * holds the whole transfer (read there by kspan_scan_read), else 0. */
static __always_inline void kspan_update_tail(struct kspan_conn *st, struct kspan_data_args *a, const char *sb)
{
    __u64 v = 0;
    __u32 k = 0;
    if (a->tail_n) {
        k = a->tail_n > 8 ? 8 : a->tail_n;
        v = a->tail;
    } else if (sb) {
        /* its last bytes are already in the scan buffer: no second read of user memory */
        __u32 len = a->len;
        k = len > 8 ? 8 : len;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (i < k)
                v = (v << 8) | (__u8)sb[(len - k + i) & 1023];
        }
    } else if (a->buf && (a->buf_len == 0 || a->buf_len >= a->len)) {
        __u8 b[16] = {};
        k = a->len > 8 ? 8 : a->len;
        asm volatile("" : "+r"(k));
        k &= 15;
        if (k == 0 || bpf_probe_read_user(b, k, a->buf + a->len - k) != 0) {
            st->tail = 0;
            st->tail_n = 0;
            return;
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (i < k)
                v = (v << 8) | b[i];
        }
    } else {
        st->tail = 0;
        st->tail_n = 0;
        return;
    }
    if (k >= 8) {
        st->tail = v;
        st->tail_n = 8;
    } else {
        st->tail = (st->tail << (8 * k)) | v;
        __u32 n = st->tail_n + k;
        st->tail_n = n > 8 ? 8 : n;
    }
}

/* Header names are matched 8 bytes at a time, lower-cased by OR-ing 0x20 (harmless on '-', ':'). */
#define KSPAN_W_CONTENT_ 0x2d746e65746e6f63ULL  /* "content-" */
#define KSPAN_W_LENGTH_ 0x003a6874676e656cULL   /* "length:" (7 bytes) */
#define KSPAN_W_TRANSFER 0x726566736e617274ULL  /* "transfer" */
#define KSPAN_W__ENCODIN 0x6e69646f636e652dULL  /* "-encodin" */
#define KSPAN_W_G_ 0x3a67ULL                    /* "g:" (2 bytes) */
#define KSPAN_W_CHUNKED 0x0064656b6e756863ULL   /* "chunked" (7 bytes) */
#define KSPAN_LOWER 0x2020202020202020ULL

static __always_inline __u64 kspan_word(const char *buf, __u32 pos)
{
    __u64 w = 0;
    __builtin_memcpy(&w, &buf[pos & 1023], 8);
    return w;
}

/* Look at the header line starting at spare[j]: end of headers, or a framing header. Returns the
 * end-of-headers offset (after the blank line) or 0. Bytes past the transfer are zero (see
 * kspan_scan_headers), so no comparison with the length is needed here: each such comparison
 * would refine the length's range differently per iteration and multiply the verifier's states. */
static __always_inline __u32 kspan_header_line(struct kspan_conn *st, const char *buf, __u32 j)
{
    __u8 c = buf[j & 1023];
    if (c == '\n')
        return j + 1;
    if (c == '\r')
        return j + 2;
    __u64 w = kspan_word(buf, j) | KSPAN_LOWER;
    if (w == KSPAN_W_CONTENT_) {
        __u64 w2 = (kspan_word(buf, j + 8) | KSPAN_LOWER) & 0x00ffffffffffffffULL;
        if (w2 == KSPAN_W_LENGTH_)
            st->cl_pos = j + 15;
    } else if (w == KSPAN_W_TRANSFER) {
        __u64 w2 = kspan_word(buf, j + 8) | KSPAN_LOWER;
        __u64 w3 = (kspan_word(buf, j + 16) | KSPAN_LOWER) & 0xffffULL;
        if (w2 == KSPAN_W__ENCODIN && w3 == KSPAN_W_G_)
            st->te_pos = j + 18;
    }
    return 0;
}

/* Eight bytes of the header scan per call (a bpf_loop callback, verified once): a word with no
 * '\n', most of them, is passed over with one test. end: the end of the headers once found. */
struct kspan_line_scan {
    struct kspan_conn *st;
    const char *buf;        /* the scan buffer (zeroed past n) */
    __u32 n;
    __u32 end;
};

static long kspan_line_step(__u32 i, void *c)
{
    struct kspan_line_scan *x = c;
    __u32 base = i * 8;
    if (base + 1 >= x->n)
        return 1;
    __u64 v = kspan_word(x->buf, base) ^ 0x0a0a0a0a0a0a0a0aULL;
    if (!((v - 0x0101010101010101ULL) & ~v & 0x8080808080808080ULL))
        return 0;
#pragma unroll
    for (__u32 k = 0; k < 8; k++) {
        __u32 j = base + k;
        if (j + 1 >= x->n)
            return 1;
        if (x->buf[j & 1023] != '\n')
            continue;
        __u32 e = kspan_header_line(x->st, x->buf, j + 1);
        if (e) {
            x->end = e;
            return 1;
        }
    }
    return 0;
}

/* Find the end of the response headers in this transfer, and Content-Length / chunked on the way.
 * Only line starts are examined (one branch per byte otherwise), and results go to the map value
 * rather than registers: the verifier walks every iteration, and registers whose values differ
 * between paths keep it from merging them. */
/* The header scan of a transfer read by kspan_scan_read (sb; 0 if the read failed). */
static __always_inline void kspan_scan_headers(struct kspan_conn *st, struct kspan_data_args *a,
                                               struct kspan_scan_buf *sb, __u64 before)
{
    if (!sb) {
        st->hdr_state = KSPAN_HS_GAVE_UP;
        kspan_count(KSPAN_CNT_HEAD_GAVE_UP, 1);
        return;
    }
    char *buf = sb->b;
    __u32 n = st->scan_n;
    asm volatile("" : "+r"(n));
    n &= 1023;
    st->cl_pos = 0;
    st->te_pos = 0;
    st->scan_end = 0;
    if (st->hdr_state == KSPAN_HS_LINE)
        st->scan_end = kspan_header_line(st, buf, 0);
    if (!st->scan_end && bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop)) {
        struct kspan_line_scan x = {.st = st, .buf = buf, .n = n};
        bpf_loop(KSPAN_SCAN / 8, kspan_line_step, &x, 0);
        st->scan_end = x.end;
    } else if (!st->scan_end) {
        /* before 5.17, a byte at a time */
#pragma clang loop unroll(disable)
        for (__u32 i = 0; i < KSPAN_SCAN; i++) {
            if (i + 1 >= n)
                break;
            if (buf[i] != '\n')
                continue;
            __u32 e = kspan_header_line(st, buf, i + 1);
            if (e) {
                st->scan_end = e;
                break;
            }
        }
    }
    /* reload from memory: the loop's exit paths must look alike to the verifier */
    asm volatile("" ::: "memory");
    __u32 clpos = st->cl_pos, tepos = st->te_pos;
    if (clpos) {
        __u64 cl = 0;
        __u8 digits = 0;
#pragma clang loop unroll(disable)
        for (__u32 k = 0; k < 24; k++) {
            __u8 c = buf[(clpos + k) & 1023];
            if (c >= '0' && c <= '9') {
                cl = cl * 10 + (c - '0');
                digits = 1;
            } else if (digits || (c != ' ' && c != '\t')) {
                break;
            }
        }
        if (digits) {
            st->content_length = cl;
            st->has_length = 1;
        }
    }
    if (tepos) {
        /* chunked must be the last coding: find the line end, skip trailing blanks, compare */
        st->te_end = 0;
#pragma clang loop unroll(disable)
        for (__u32 k = 0; k < 48; k++) {
            __u8 c = buf[(tepos + k) & 1023];
            if (c == '\r' || c == '\n' || c == 0) {
                st->te_end = tepos + k;
                break;
            }
        }
        asm volatile("" ::: "memory");
        __u32 e = st->te_end;
#pragma clang loop unroll(disable)
        for (int k = 0; k < 4; k++) {
            if (e > tepos && (buf[(e - 1) & 1023] == ' ' || buf[(e - 1) & 1023] == '\t'))
                e--;
        }
        if (e >= tepos + 7) {
            __u64 w = (kspan_word(buf, e - 7) | KSPAN_LOWER) & 0x00ffffffffffffffULL;
            if (w == KSPAN_W_CHUNKED)
                st->chunked = 1;
        }
    }
    asm volatile("" ::: "memory");
    __u32 end = st->scan_end;
    __u32 sn = st->scan_n;
    if (end) {
        st->hdr_state = KSPAN_HS_DONE;
        st->resp_head_end = before + end;
    } else if (sn < a->len) {
        /* header bytes beyond what we could read: framing unknown */
        st->hdr_state = KSPAN_HS_GAVE_UP;
        kspan_count(KSPAN_CNT_HEAD_GAVE_UP, 1);
    } else {
        st->hdr_state = buf[(sn - 1) & 1023] == '\n' ? KSPAN_HS_LINE : KSPAN_HS_STATUS;
    }
}

static __always_inline void kspan_parse_status(struct kspan_conn *st)
{
    if (st->ex.status || st->ex.resp_head_len < 12)
        return;
    __u8 d0 = st->ex.resp_head[9], d1 = st->ex.resp_head[10], d2 = st->ex.resp_head[11];
    if (d0 < '0' || d0 > '9' || d1 < '0' || d1 > '9' || d2 < '0' || d2 > '9')
        return;
    st->ex.status = (d0 - '0') * 100 + (d1 - '0') * 10 + (d2 - '0');
}

static __always_inline void kspan_begin_response(struct kspan_conn *st, struct kspan_data_args *a)
{
    if (st->ex.role == KSPAN_ROLE_SERVER && !(st->ex.flags & KSPAN_FLAG_IDS))
        kspan_fix_server(st->ex.conn_id, st->ex.req_start_ns);
    st->phase = KSPAN_PH_RESP;
    st->ex.resp_start_ns = a->start_ns;
    st->ex.resp_bytes = 0;
    st->ex.resp_head_len = 0;
    st->ex.status = 0;
    kspan_reset_framing(st);
    st->ex.flags &= ~KSPAN_FLAG_RESP_HEAD_FULL;
    if (st->pend_n && st->pend_dir == a->dir) {
        /* the status line's first bytes came in earlier transfers: they start the response's
         * head, bytes and tail (newest in the low byte), and its start time */
        __u64 pend = st->pend;
        __u32 k = st->pend_n & 7;
        st->ex.resp_start_ns = st->pend_start_ns;
        __builtin_memcpy(st->ex.resp_head, &pend, 8);
        st->ex.resp_head_len = k;
        st->ex.resp_bytes = k;
        st->tail = __builtin_bswap64(pend) >> (64 - 8 * k);
        st->tail_n = k;
        st->pend_n = 0;
    }
    /* reload from memory in kspan_response_data: with resp_bytes forwarded in a register (0 here,
     * k above) the verifier walked the header scan once per value (+39k instructions) */
    asm volatile("" ::: "memory");
}

/* An HTTP/2 frame walk's state for one direction (kspan_h2_frames), in fields a protocol state
 * does not use otherwise (struct kspan_conn: HTTP's scan fields). */
#define KSPAN_H2_HN_MASK 0xf     /* bytes of a frame header carried from the previous transfer */
#define KSPAN_H2_COPY 0x100      /* the rest of the current frame is copied (not DATA) */
#define KSPAN_H2_LOST 0x200      /* the frame boundaries are lost: copy transfers' starts as before */
#define KSPAN_H2_NOTH2 0x400     /* the bytes to skip are not HTTP/2 (the 101 response's head) */

__attribute__((noinline)) int kspan_proto_data(__u64 conn_id, int closed);

/* A connection state becomes another protocol's (st->ex.role already set): its segments count
 * from 0, and for HTTP/2 the frame walk starts afresh in fields that were HTTP's scan results.
 * Seen from its start, HTTP/2 opens with the client's 24-byte preface, which is not a frame:
 * copied whole, then frames begin. */
static __always_inline void kspan_proto_state(struct kspan_conn *st, __u8 proto, __u8 from_start)
{
    st->phase = KSPAN_PH_PROTO;
    st->method = proto;
    st->pend_n = 0;
    st->ex.type = 0;  /* no exchange: the sweeper and the close path leave it alone */
    st->ex.req_bytes = 0;
    st->ex.parent_kind = from_start;
    st->cl_pos = st->te_pos = st->scan_n = st->scan_end = 0;
    st->content_length = st->resp_head_end = 0;
    if (proto != KSPAN_PROTO_HTTP2 || !from_start)
        return;
    if (st->ex.role == KSPAN_ROLE_CLIENT) {
        st->cl_pos = 24;
        st->scan_n = KSPAN_H2_COPY;
    } else {
        st->te_pos = 24;
        st->scan_end = KSPAN_H2_COPY;
    }
}

/* Whether a 101 response switches the connection to HTTP/2: "h2c" in its head (Upgrade: h2c). */
__attribute__((noinline)) int kspan_h2c_offered(__u64 conn_id)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return 0;
    __u32 len = st->ex.resp_head_len;
    if (len > KSPAN_RESP_HEAD)
        len = KSPAN_RESP_HEAD;
    for (__u32 i = 0; i + 3 <= len && i < KSPAN_RESP_HEAD - 3; i++) {
        __u8 a = st->ex.resp_head[i] | 0x20, b = st->ex.resp_head[i + 1], c = st->ex.resp_head[i + 2] | 0x20;
        if (a == 'h' && b == '2' && c == 'c')
            return 1;
    }
    return 0;
}

/* After the 101's exchange was emitted: the connection becomes an HTTP/2 protocol state seen from
 * its start, so the server's first frames (stream 1's answer, sent before the client's preface
 * arrives) and the client's preface are walked as frames. 2: the rest of this transfer (len
 * bytes, past the 101's head of lead bytes) is HTTP/2 already, for the caller to walk. */
__attribute__((noinline)) int kspan_h2c_switch(__u64 conn_id, __u32 lead, __u32 len, int egress)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return 0;
    kspan_proto_state(st, KSPAN_PROTO_HTTP2, 1);
    if (!lead || lead >= len)
        return 1;
    if (egress) {
        st->cl_pos = lead;
        st->scan_n = KSPAN_H2_NOTH2;
    } else {
        st->te_pos = lead;
        st->scan_end = KSPAN_H2_NOTH2;
    }
    return 2;
}

/* Response bytes on a response in progress: count, keep the head and tail, check completion. */
static __always_inline void kspan_response_data(struct kspan_conn *st, struct kspan_data_args *a)
{
    __u64 before = st->ex.resp_bytes;
    st->ex.resp_bytes = before + a->len;
    st->ex.resp_end_ns = a->end_ns;
    struct kspan_scan_buf *sb = 0;
    if (st->hdr_state < KSPAN_HS_DONE)
        sb = kspan_scan_read(st, a);
    if (sb) {
        /* the head from the bytes the scan read: one copy out of user memory, not three */
        KSPAN_APPEND_FROM(resp_head, KSPAN_RESP_HEAD, resp_head_len, bpf_probe_read_kernel, sb->b, st->scan_n,
                          KSPAN_FLAG_RESP_HEAD_FULL);
    } else {
        KSPAN_APPEND(resp_head, KSPAN_RESP_HEAD, resp_head_len, a->buf, kspan_readable(a), KSPAN_FLAG_RESP_HEAD_FULL);
    }
    kspan_parse_status(st);
    kspan_update_tail(st, a, sb && a->len <= st->scan_n ? sb->b : 0);

    if (st->hdr_state < KSPAN_HS_DONE) {
        kspan_scan_headers(st, a, sb, before);
        if (st->hdr_state == KSPAN_HS_DONE) {
            kspan_parse_status(st);
            __u16 status = st->ex.status;
            if (status >= 100 && status < 200 && status != 101) {
                /* interim: the final response is still to come */
                st->ex.flags |= KSPAN_FLAG_INTERIM;
                st->phase = KSPAN_PH_WAIT_FINAL;
                return;
            }
            if (st->method == KSPAN_METHOD_HEAD || status == 204 || status == 304 || status == 101)
                st->framing = KSPAN_FR_NONE;
            else if (st->chunked)
                st->framing = KSPAN_FR_CHUNKED;
            else if (st->has_length)
                st->framing = KSPAN_FR_LENGTH;
            else
                st->framing = KSPAN_FR_CLOSE;
        }
    }
    if (st->hdr_state != KSPAN_HS_DONE)
        return;
    int done = 0;
    if (st->framing == KSPAN_FR_NONE)
        done = 1;
    else if (st->framing == KSPAN_FR_LENGTH)
        done = st->ex.resp_bytes >= st->resp_head_end + st->content_length;
    else if (st->framing == KSPAN_FR_CHUNKED)
        done = st->tail_n >= 7 && (st->tail & KSPAN_CHUNKED_END_MASK) == KSPAN_CHUNKED_END;
    if (done) {
        int h2c = st->ex.status == 101 && kspan_h2c_offered(a->conn_id);
        __u32 lead = h2c && st->resp_head_end > before ? st->resp_head_end - before : 0;
        kspan_emit(st, KSPAN_END_COMPLETE);
        if (h2c && kspan_h2c_switch(a->conn_id, lead, a->len, a->dir == KSPAN_DIR_EGRESS) == 2)
            kspan_proto_data(a->conn_id, 0);
    }
}

/* Hold a whole transfer (w: its bytes after any pending ones in its direction, n of them) as
 * pending: it is a proper prefix of what starts a request or a response. */
static __always_inline void kspan_hold(struct kspan_conn *st, struct kspan_data_args *a, __u64 w, __u32 n)
{
    if (!st->pend_n || st->pend_dir != a->dir) {
        if (st->pend_n)
            kspan_count(KSPAN_CNT_UNPARSED_BYTES, st->pend_n); /* the other direction's: superseded */
        st->pend_start_ns = a->start_ns;
    }
    st->pend = w;
    st->pend_n = n;
    st->pend_dir = a->dir;
}

/* Whether this transfer's bytes were judged joined to pending ones (re-read from the map: a flag
 * kept in a register would keep the verifier's paths with and without pending bytes apart). */
static __always_inline int kspan_joined(struct kspan_conn *st, struct kspan_data_args *a)
{
    return st->pend_n && st->pend_dir == a->dir;
}

/* The transfer's own first bytes as a word, re-read from the stack buffer (see kspan_joined). */
static __always_inline __u64 kspan_first_word(const __u8 *p)
{
    __u64 w = 0;
    asm volatile("" ::: "memory");
    __builtin_memcpy(&w, p, 8);
    return w;
}

/* Pending bytes in this transfer's direction that it did not complete into a request or status
 * line: out of protocol, counted like any such bytes, never silently dropped. */
static __always_inline void kspan_drop_pending(struct kspan_conn *st, struct kspan_data_args *a)
{
    if (st->pend_n && st->pend_dir == a->dir) {
        kspan_count(KSPAN_CNT_UNPARSED_BYTES, st->pend_n);
        st->pend_n = 0;
    }
}

/* A new connection state for a transfer that starts a request (or may: KSPAN_PH_PREFIX), after
 * the filters. */
static __always_inline struct kspan_conn *kspan_new_conn(struct kspan_data_args *a)
{
    struct kspan_tuple *t = kspan_tuple_of(a->conn_id);
    if (t) {
        if (a->pid && t->pid != a->pid)
            t->pid = a->pid;
        struct kspan_endpoint ep = {};
        kspan_norm_addr(ep.addr, t->family, t->remote_addr);
        ep.port = t->remote_port;
        if (bpf_map_lookup_elem(&self_endpoints, &ep)) {
            kspan_count(KSPAN_CNT_FILTERED, 1);
            return 0;
        }
    }
    if (kspan_filter_ports) {
        if (!t) {
            kspan_count(KSPAN_CNT_FILTERED, 1);
            return 0;
        }
        __u16 lp = t->local_port, rp = t->remote_port;
        if (!bpf_map_lookup_elem(&allowed_ports, &lp) && !bpf_map_lookup_elem(&allowed_ports, &rp)) {
            kspan_count(KSPAN_CNT_FILTERED, 1);
            return 0;
        }
    }
    int z = 0;
    struct kspan_conn *zero = bpf_map_lookup_elem(&kspan_zero, &z);
    if (!zero)
        return 0;
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &a->conn_id);
    if (!st) {
        bpf_map_update_elem(&conns, &a->conn_id, zero, BPF_NOEXIST);
        st = bpf_map_lookup_elem(&conns, &a->conn_id);
    }
    if (!st) {
        kspan_count(KSPAN_CNT_STATE_FULL, 1);
        return 0;
    }
    st->ex.conn_id = a->conn_id;
    if (a->flags & KSPAN_FLAG_TLS)
        st->tls = 1;
    if (t) {
        st->ex.family = t->family;
        st->ex.local_port = t->local_port;
        st->ex.remote_port = t->remote_port;
        __builtin_memcpy(st->ex.local_addr, t->local_addr, 16);
        __builtin_memcpy(st->ex.remote_addr, t->remote_addr, 16);
        st->ex.flags |= KSPAN_FLAG_TUPLE_KNOWN;
    } else {
        kspan_count(KSPAN_CNT_TUPLE_UNKNOWN, 1);
    }
    return st;
}


/* ---- protocols beyond HTTP/1: bounded segments, decoded in user space ---- */

/* A local client's recent writes on a protocol connection, keyed by the connection as the client
 * sees it (local, remote): where each began in the TCP stream and the trace it joined. The server
 * end's reads take the trace of the latest write that began before their end, so its requests
 * become children of the client's (user space names a request by its stream position on both
 * ends). Four slots: a pipelining client may write several times before the server reads. */
#define KSPAN_SEG_CTX_SLOTS 4
struct kspan_seg_ctx {
    __u32 seq[KSPAN_SEG_CTX_SLOTS];
    __u32 flags[KSPAN_SEG_CTX_SLOTS];  /* 0: empty; 1 | KSPAN_FLAG_SAMPLED */
    __u8 trace_id[KSPAN_SEG_CTX_SLOTS][16];
    __u32 next;
    __u32 _pad;
};
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, KSPAN_MAX_CONNS);
    __type(key, struct kspan_conn_key);
    __type(value, struct kspan_seg_ctx);
} seg_ctx SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_seg_ctx);
} kspan_seg_ctx_zero SEC(".maps"); /* never written: a new connection's empty slots */

/* The client's write at sequence seq carries identity id: noted under the connection's key k (the
 * client's end first), where the server end's read looks (kspan_seg_peer). */
static __always_inline void kspan_seg_ctx_note_key(struct kspan_conn_key *k, __u32 seq, struct kspan_client_id *id)
{
    struct kspan_seg_ctx *c = bpf_map_lookup_elem(&seg_ctx, k);
    if (!c) {
        /* the empty value from a map, not the stack (see kspan_pre_scratch) */
        __u32 zk = 0;
        struct kspan_seg_ctx *z = bpf_map_lookup_elem(&kspan_seg_ctx_zero, &zk);
        if (!z)
            return;
        bpf_map_update_elem(&seg_ctx, k, z, BPF_NOEXIST);
        c = bpf_map_lookup_elem(&seg_ctx, k);
        if (!c)
            return;
    }
    /* a write that failed (EAGAIN) left its slot at the sequence the retry takes: replace it */
    __u32 i = c->next & (KSPAN_SEG_CTX_SLOTS - 1), same = 0;
#pragma unroll
    for (int j = 0; j < KSPAN_SEG_CTX_SLOTS; j++)
        if (!same && c->flags[j] && c->seq[j] == seq)
            same = j + 1;
    if (same)
        i = (same - 1) & (KSPAN_SEG_CTX_SLOTS - 1);
    else
        c->next = i + 1;
    c->seq[i] = seq;
    c->flags[i] = 1 | (id->flags & KSPAN_FLAG_SAMPLED);
    __builtin_memcpy(c->trace_id[i], id->trace_id, 16);
}

static __always_inline void kspan_seg_ctx_note(struct kspan_conn *st, __u32 seq, struct kspan_client_id *id)
{
    if (!(st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN) || (st->ex.flags & KSPAN_FLAG_TLS))
        return;
    struct kspan_conn_key k = {};
    kspan_conn_key_of_ex(&k, st, 0);
    kspan_seg_ctx_note_key(&k, seq, id);
}

/* A client's protocol write starting on socket sk: its trace decided now, with the sequence
 * number its first byte takes, and kept in client_pre for the write's sock event; or 0. */
static __always_inline struct kspan_client_id *kspan_seg_decide(__u64 sk, __u64 pid_tgid)
{
    struct kspan_pre_scratch *x = kspan_pre_scratch();
    if (!x)
        return 0;
    struct kspan_client_id *id = &x->id;
    kspan_client_decide(id, sk, pid_tgid, 0, 0);
    id->seq = BPF_CORE_READ((struct tcp_sock *)sk, write_seq);
    bpf_map_update_elem(&client_pre, &sk, id, BPF_ANY);
    return id;
}

/* A client's write on a protocol connection is starting: decide its trace now and publish it
 * with the sequence number its first byte takes, before a local server can read it (on loopback
 * the server may read the bytes before this write returns). Global: verified once. */
__attribute__((noinline)) int kspan_seg_pre(__u64 sk, __u64 pid_tgid)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &sk);
    if (!st || st->phase != KSPAN_PH_PROTO || st->ex.role != KSPAN_ROLE_CLIENT || (st->ex.flags & KSPAN_FLAG_TLS))
        return 0;
    struct kspan_client_id *id = kspan_seg_decide(sk, pid_tgid);
    if (!id)
        return 0;
    st = bpf_map_lookup_elem(&conns, &sk);
    if (st)
        kspan_seg_ctx_note(st, id->seq, id);
    return 1;
}

/* The same for the first write on a connection that no transfer has shown yet (no state), when
 * its bytes open a client protocol (a Redis command): on loopback the server end may read and
 * answer it before the write returns (the woken server preempts the writer), so waiting for the
 * write's sock event would leave that first call's server span without its parent. */
__attribute__((noinline)) int kspan_seg_first(__u64 sk, __u64 pid_tgid)
{
    if (!sk || bpf_map_lookup_elem(&conns, &sk) || bpf_map_lookup_elem(&tls_conns, &sk))
        return 0;
    struct kspan_tuple *tu = kspan_tuple_of(sk);
    if (!tu)
        return 0;
    struct kspan_conn_key k = {};
    kspan_conn_key_of(&k, tu, 0);
    struct kspan_client_id *id = kspan_seg_decide(sk, pid_tgid);
    if (!id)
        return 0;
    kspan_seg_ctx_note_key(&k, id->seq, id);
    return 1;
}

/* The latest write of the local client on the other end that began before end_seq (the server's
 * read position): its trace into seg, KSPAN_SEG_PEER set. Writes older than 1 GiB of stream are
 * not taken (sequence numbers wrap at 4 GiB). */
static __always_inline void kspan_seg_peer(struct kspan_segment *seg, struct kspan_conn *st, __u32 end_seq)
{
    struct kspan_conn_key k = {};
    kspan_conn_key_of_ex(&k, st, 1);
    struct kspan_seg_ctx *c = bpf_map_lookup_elem(&seg_ctx, &k);
    if (!c)
        return;
    __u32 best = 0, best_d = 1U << 30;
#pragma unroll
    for (int i = 0; i < KSPAN_SEG_CTX_SLOTS; i++) {
        __u32 d = end_seq - c->seq[i];
        if (c->flags[i] && d > 0 && d < best_d) {
            best_d = d;
            best = i + 1;
        }
    }
    if (!best)
        return;
    __u32 i = (best - 1) & (KSPAN_SEG_CTX_SLOTS - 1);
    seg->seg_flags |= KSPAN_SEG_PEER;
    seg->ctx_seq = c->seq[i];
    seg->ctx_end = end_seq;
    __builtin_memcpy(seg->trace_id, c->trace_id[i], 16);
    seg->flags |= c->flags[i] & KSPAN_FLAG_SAMPLED;
}

/* The segment being built, with room past its data for the verifier: a copy into data at a
 * variable offset is seen as offset <= KSPAN_SEG_DATA - 1 plus up to 2 * KSPAN_SEG_DATA - 1 bytes. */
struct kspan_segbuf_val {
    struct kspan_segment seg;
    char spare[7 * KSPAN_SEG_DATA];  /* and an HTTP/2 frame walk's KSPAN_H2_DATA (see kspan_h2_copy_step) */
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_segbuf_val);
} kspan_segbuf SEC(".maps");

struct kspan_iovec_u {
    __u64 base;
    __u64 len;
};

struct kspan_gather {
    struct kspan_segbuf_val *sb;
    __u64 iov;
    __u64 skip;
    __u32 vlen;
    __u32 len;
    __u32 off;
    __u32 _pad;
};

/* One iovec of the gather (a bpf_loop callback: gRPC's C core writes a frame as dozens of small
 * slices, more than an unrolled loop could walk). */
static long kspan_gather_step(__u32 j, void *c)
{
    struct kspan_gather *g = c;
    if (j >= g->vlen || g->off >= KSPAN_SEG_DATA || g->off >= g->len)
        return 1;
    struct kspan_iovec_u v = {};
    if (bpf_probe_read_user(&v, sizeof(v), (const void *)(g->iov + (__u64)j * sizeof(v))) != 0)
        return 1;
    if (j == 0 && g->skip < v.len) {
        v.base += g->skip;
        v.len -= g->skip;
    }
    __u64 want = KSPAN_SEG_DATA - g->off;
    if (v.len < want)
        want = v.len;
    if (g->len - g->off < want)
        want = g->len - g->off;
    __u32 w = want;
    __u32 o = g->off;
    asm volatile("" : "+r"(w), "+r"(o));
    w &= 2 * KSPAN_SEG_DATA - 1;
    o &= KSPAN_SEG_DATA - 1;
    if (w && bpf_probe_read_user(&g->sb->seg.data[o], w, (const void *)v.base) != 0)
        return 1;
    g->off += want;
    return 0;
}

/* The first KSPAN_SEG_DATA bytes of a scattered transfer, gathered from its iovecs (a gRPC or
 * database client writes a frame header and its payload as separate segments of one sendmsg). */
static __always_inline __u32 kspan_proto_gather(struct kspan_segbuf_val *sb, struct kspan_data_args *a)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;  /* before 5.17: the first segment only */
    struct kspan_gather g = {.sb = sb, .iov = a->iov, .skip = a->iov_skip, .vlen = a->vlen, .len = a->len};
    bpf_loop(64, kspan_gather_step, &g, 0);
    return g.off > KSPAN_SEG_DATA ? KSPAN_SEG_DATA : g.off;
}

#define KSPAN_W_H2_PREFACE KSPAN_LE('P', 'R', 'I', ' ', '*', ' ', 'H', 'T')

static __always_inline int kspan_digit(__u8 c)
{
    return c >= '0' && c <= '9';
}

static __always_inline __u32 kspan_be32(__u64 w, int at)
{
    __u32 v = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        v = (v << 8) | ((w >> (8 * (at + i))) & 0xff);
    return v;
}

/* The protocol a connection's first bytes (w: n of them, the first in the low byte) open, and
 * which end the traced process is (*role); 0: none recognised. */
static __always_inline __u8 kspan_proto_first(__u64 w, __u32 n, __u8 dir, __u8 *role)
{
    if (n < 8)
        return 0;
    __u8 b0 = w & 0xff, b1 = (w >> 8) & 0xff, b2 = (w >> 16) & 0xff, b3 = (w >> 24) & 0xff;
    __u8 b4 = (w >> 32) & 0xff, b5 = (w >> 40) & 0xff;
    __u8 sender = dir == KSPAN_DIR_EGRESS ? KSPAN_ROLE_CLIENT : KSPAN_ROLE_SERVER;
    if (w == KSPAN_W_H2_PREFACE) {  /* "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" */
        *role = sender;
        return KSPAN_PROTO_HTTP2;
    }
    /* Redis: a command is an array of bulk strings, "*3\r\n$3\r\n..." */
    if (b0 == '*' && kspan_digit(b1) &&
        ((b2 == '\r' && b3 == '\n' && b4 == '$') || (kspan_digit(b2) && b3 == '\r' && b4 == '\n' && b5 == '$'))) {
        *role = sender;
        return KSPAN_PROTO_REDIS;
    }
    /* PostgreSQL: the startup packet (length, protocol 3.0) or an SSL/GSS/cancel request */
    __u32 len = kspan_be32(w, 0), code = kspan_be32(w, 4);
    if (len >= 8 && len <= 10000 &&
        (code == 196608 || code == 80877103 || code == 80877104 || code == 80877102)) {
        *role = sender;
        return KSPAN_PROTO_POSTGRES;
    }
    /* MySQL: the server's greeting (3-byte length, sequence 0, protocol version 10) */
    __u32 mlen = b0 | (b1 << 8) | (b2 << 16);
    if (b3 == 0 && b4 == 10 && mlen >= 30 && mlen <= 1024) {
        *role = dir == KSPAN_DIR_EGRESS ? KSPAN_ROLE_SERVER : KSPAN_ROLE_CLIENT;
        return KSPAN_PROTO_MYSQL;
    }
    return 0;
}

/* Whether a write's first 8 bytes open a protocol its writer is the client of (a Redis command,
 * a PostgreSQL startup, the HTTP/2 preface): its trace is then published before the bytes leave
 * (kspan_seg_first), as for a protocol connection's later writes. */
static __always_inline int kspan_opens_client_proto(__u64 w)
{
    __u8 role = 0;
    return kspan_proto_first(w, 8, KSPAN_DIR_EGRESS, &role) && role == KSPAN_ROLE_CLIENT;
}

/* A connection picked up after its start: the well-known server port is a hint. */
static __always_inline __u8 kspan_proto_port(__u16 port)
{
    if (port == 6379)
        return KSPAN_PROTO_REDIS;
    if (port == 5432)
        return KSPAN_PROTO_POSTGRES;
    if (port == 3306)
        return KSPAN_PROTO_MYSQL;
    return 0;
}

/* ---- HTTP/2: bounded frames ----
 * An HTTP/2 transfer is walked frame by frame instead of copied from its start: every frame's
 * 9-byte header and the payload of every frame but DATA (HEADERS, CONTINUATION, SETTINGS,
 * RST_STREAM, GOAWAY...: what spans and HPACK need), never a DATA payload, so a gRPC response's
 * trailers after a large message are not lost past the copy's end. The segment's data is then a
 * run of entries (struct kspan_h2_entry + its bytes), each starting at a transfer offset; what
 * lies between two entries' bytes was not copied. A frame may straddle transfers: the direction's
 * walk state says how much of the current frame is still to come, whether it is copied, and the
 * bytes of a frame header cut by the transfer's end. */
struct kspan_h2_entry {
    __u32 off;     /* where the bytes start in the transfer */
    __u16 copied;  /* bytes that follow */
    __u16 flags;
};
#define KSPAN_H2_PIECES 64  /* iovecs a scattered transfer is walked across */
#define KSPAN_H2_FRAMES 128 /* frames a transfer is walked across */
/* Bytes of frame entries a walked transfer carries: more than a copy of the transfer's start, as
 * a busy connection's transfer holds many streams' small frames. A copy at a masked offset
 * (< 4 * KSPAN_SEG_DATA) of a masked size fits in kspan_segbuf_val's data and spare. */
#define KSPAN_H2_DATA (3 * KSPAN_SEG_DATA)
#define KSPAN_H2_MASK (4 * KSPAN_SEG_DATA - 1)


/* One walk, per CPU (too large for the stack). The helpers below are global functions that find
 * it and the segment buffer themselves: each is verified once, not inline at every call. */
struct kspan_h2_walk {
    __u64 base[KSPAN_H2_PIECES];
    __u32 end[KSPAN_H2_PIECES];   /* transfer offset where piece i ends */
    __u32 npieces;
    __u32 len;      /* the transfer's bytes */
    __u32 avail;    /* its readable bytes, from its start */
    __u32 off;      /* the next frame header's transfer offset */
    __u32 o;        /* bytes of seg.data used */
    __u32 skip;     /* out: bytes of the last frame past the transfer */
    __u32 state;    /* out: KSPAN_H2_* for the next transfer */
    __u32 full;     /* no room left in seg.data: the walk goes on, copying nothing */
    __u64 hdr;      /* out: header bytes cut by the transfer's end */
    __u8 h[16];     /* the frame header being read */
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_h2_walk);
} kspan_h2_walks SEC(".maps");

/* 16 bytes, kspan_h2_copy's whole frame (every byte of a kprobe program's call chain counts,
 * see kspan_pre_scratch): where the copy goes rides in left's top bit. */
#define KSPAN_H2_TO_DATA 0x80000000U
struct kspan_h2_copying {
    __u32 off;      /* transfer offset of the next byte */
    __u32 left;     /* bytes still to copy, | KSPAN_H2_TO_DATA to copy into seg.data */
    __u32 done;
    __u32 i;        /* the piece holding off (found by the first step) */
};

/* One piece's share of a copy (a bpf_loop callback: a frame's payload may span many iovecs,
 * gRPC's C core writes each header field as its own). */
static long kspan_h2_copy_step(__u32 k, void *c)
{
    struct kspan_h2_copying *cp = c;
    int z = 0;
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &z);
    struct kspan_segbuf_val *sb = bpf_map_lookup_elem(&kspan_segbuf, &z);
    if (!w || !sb)
        return 1;
    __u32 left = cp->left & ~KSPAN_H2_TO_DATA;
    if (!left || cp->i >= w->npieces || cp->i >= KSPAN_H2_PIECES)
        return 1;
    __u32 i = cp->i & (KSPAN_H2_PIECES - 1);
    __u32 start = i ? w->end[(i - 1) & (KSPAN_H2_PIECES - 1)] : 0;
    __u32 chunk = w->end[i] - cp->off;
    if (chunk > left)
        chunk = left;
    const void *src = (const void *)(w->base[i] + (cp->off - start));
    if (cp->left & KSPAN_H2_TO_DATA) {
        if (w->o >= KSPAN_H2_DATA)
            return 1;
        if (chunk > KSPAN_H2_DATA - w->o)
            chunk = KSPAN_H2_DATA - w->o;
        __u32 o = w->o;
        asm volatile("" : "+r"(chunk), "+r"(o));
        chunk &= KSPAN_H2_MASK;
        o &= KSPAN_H2_MASK;
        if (chunk && bpf_probe_read_user(&sb->seg.data[o], chunk, src) != 0)
            return 1;
        w->o += chunk;
    } else {
        __u32 o = cp->done;
        asm volatile("" : "+r"(chunk), "+r"(o));
        chunk &= 15;
        o &= 7;
        if (chunk > 9)
            chunk = 9;
        if (chunk && bpf_probe_read_user(&w->h[o], chunk, src) != 0)
            return 1;
    }
    cp->done += chunk;
    cp->left -= chunk;  /* chunk <= the count below the flag bit */
    cp->off += chunk;
    cp->i++;
    return 0;
}

/* Copy n (<= KSPAN_H2_DATA) bytes at transfer offset off into seg.data at the walk's o (to_data)
 * or into its header buffer (at most 9); the bytes copied. */
__attribute__((noinline)) int kspan_h2_copy(__u32 off, __u32 n, int to_data)
{
    if (!to_data && n > 9)
        n = 9;
    if (n > KSPAN_H2_DATA)
        n = KSPAN_H2_DATA;
    struct kspan_h2_copying cp = {.off = off, .left = n | (to_data ? KSPAN_H2_TO_DATA : 0)};
    /* cp.done, 0 here, is the lookup key: a key of its own would be one more stack slot */
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &cp.done);
    if (!w)
        return 0;
    __u32 i = 0;
    for (; i < KSPAN_H2_PIECES; i++) {
        if (i >= w->npieces || off < w->end[i])
            break;
    }
    cp.i = i;
    bpf_loop(KSPAN_H2_PIECES, kspan_h2_copy_step, &cp, 0);
    return cp.done;
}

/* An entry header at seg.data[o] for bytes at transfer offset off; 0 when out of room. */
__attribute__((noinline)) int kspan_h2_entry(__u32 off)
{
    int z = 0;
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &z);
    struct kspan_segbuf_val *sb = bpf_map_lookup_elem(&kspan_segbuf, &z);
    if (!w || !sb || w->full)
        return 0;
    if (w->o + sizeof(struct kspan_h2_entry) + 1 > KSPAN_H2_DATA) {
        w->full = 1;
        return 0;
    }
    __u32 o = w->o & KSPAN_H2_MASK;
    struct kspan_h2_entry e = {.off = off};
    __builtin_memcpy(&sb->seg.data[o], &e, sizeof(e));
    w->o += sizeof(e);
    return o + 1;
}

/* Add n to the copied count of the entry kspan_h2_entry returned (at o + 1). */
__attribute__((noinline)) int kspan_h2_grow(__u32 at, __u32 n)
{
    int z = 0;
    struct kspan_segbuf_val *sb = bpf_map_lookup_elem(&kspan_segbuf, &z);
    if (!sb || !at)
        return 0;
    __u32 o = (at - 1) & KSPAN_H2_MASK;
    if (o + sizeof(struct kspan_h2_entry) > KSPAN_H2_DATA)
        return 0;
    struct kspan_h2_entry *e = (struct kspan_h2_entry *)&sb->seg.data[o];
    e->copied += n;
    return 1;
}

/* The walk, and the transfer offset of its next frame, when there is one left to look at. */
static __always_inline struct kspan_h2_walk *kspan_h2_next(__u32 *off)
{
    int z = 0;
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &z);
    if (!w || w->off >= w->len)
        return 0;
    *off = w->off;
    return w;
}

/* One frame at the walk's off (a bpf_loop callback): an entry with its header and, unless DATA,
 * its payload's bytes in this transfer. */
static long kspan_h2_step(__u32 j, void *c)
{
    __u32 off = 0;
    struct kspan_h2_walk *w = kspan_h2_next(&off);
    if (!w)
        return 1;
    if (off >= w->avail) {
        w->state = KSPAN_H2_LOST;  /* not readable here: the boundaries are lost */
        return 1;
    }
    __u32 left = w->len - off;
    __u32 hn = left < 9 ? left : 9;
    if (kspan_h2_copy(off, hn, 0) != (int)hn) {
        w->state = KSPAN_H2_LOST;
        return 1;
    }
    int at = kspan_h2_entry(off);
    if (at)
        kspan_h2_grow(at, kspan_h2_copy(off, hn, 1));
    if (hn < 9) {
        /* the header is cut by the transfer's end: carry its bytes */
        __u64 v = 0;
        __builtin_memcpy(&v, w->h, 8);
        w->hdr = v;
        w->state = hn;
        w->off = w->len;
        return 1;
    }
    __u32 flen = ((__u32)w->h[0] << 16) | ((__u32)w->h[1] << 8) | w->h[2];
    int copy = w->h[3] != 0;  /* type 0: DATA */
    if (copy && at) {
        __u32 want = flen < left - 9 ? flen : left - 9;
        kspan_h2_grow(at, kspan_h2_copy(off + 9, want, 1));
    }
    __u32 next = off + 9 + flen;
    if (next > w->len) {
        w->skip = next - w->len;
        w->state = copy ? KSPAN_H2_COPY : 0;
    }
    w->off = next;
    return 0;
}

/* The walk's view of a transfer: its bytes as pieces (the iovecs of a scattered one, else its
 * one buffer), each with the transfer offset where it ends. */
static __always_inline void kspan_h2_pieces(struct kspan_h2_walk *w, struct kspan_data_args *a)
{
    w->len = a->len;
    w->o = 0;
    w->full = 0;
    w->npieces = 0;
    if (a->iov && a->vlen > 1) {
        __u32 nv = a->vlen < KSPAN_H2_PIECES ? a->vlen : KSPAN_H2_PIECES;
        __u32 acc = 0;
        for (__u32 i = 0; i < KSPAN_H2_PIECES; i++) {
            if (i >= nv || acc >= a->len)
                break;
            struct kspan_iovec_u v = {};
            if (bpf_probe_read_user(&v, sizeof(v), (const void *)(a->iov + (__u64)i * sizeof(v))) != 0)
                break;
            if (i == 0 && a->iov_skip < v.len) {
                v.base += a->iov_skip;
                v.len -= a->iov_skip;
            }
            if (v.len > a->len - acc)
                v.len = a->len - acc;
            acc += v.len;
            w->base[i] = v.base;
            w->end[i] = acc;
            w->npieces = i + 1;
        }
        w->avail = acc;
    } else {
        w->base[0] = (__u64)a->buf;
        w->avail = kspan_readable(a);
        w->end[0] = w->avail;
        w->npieces = a->buf ? 1 : 0;
    }
}

/* An untracked connection's transfer that is a whole chain of valid HTTP/2 frames, ending exactly
 * at the transfer's end, with a HEADERS, SETTINGS, PING, GOAWAY or WINDOW_UPDATE among them: an
 * HTTP/2 connection picked up after its preface (kspan started later). */
static long kspan_h2_chain_step(__u32 j, void *c)
{
    __u32 off = 0;
    struct kspan_h2_walk *w = kspan_h2_next(&off);
    if (!w)
        return 1;
    if (w->len - off < 9 || off >= w->avail || kspan_h2_copy(off, 9, 0) != 9) {
        w->full = 1;  /* not a frame chain */
        return 1;
    }
    __u32 flen = ((__u32)w->h[0] << 16) | ((__u32)w->h[1] << 8) | w->h[2];
    __u8 type = w->h[3];
    __u32 stream = ((__u32)(w->h[5] & 0x7f) << 24) | ((__u32)w->h[6] << 16) | ((__u32)w->h[7] << 8) | w->h[8];
    int ok = flen <= 16384 && type <= 9 && !(w->h[5] & 0x80);
    if (type == 4 || type == 6 || type == 7)  /* SETTINGS, PING, GOAWAY: the connection's */
        ok = ok && stream == 0;
    else if (type != 8)                        /* WINDOW_UPDATE may be either */
        ok = ok && stream != 0;
    if (type == 4)
        ok = ok && flen % 6 == 0 && (!(w->h[4] & 1) || flen == 0);
    if (type == 6)
        ok = ok && flen == 8;
    if (type == 8 || type == 3)
        ok = ok && flen == 4;
    if (type == 2)
        ok = ok && flen == 5;
    if (!ok) {
        w->full = 1;
        return 1;
    }
    if (type == 1 || type == 4 || type == 6 || type == 7 || type == 8)
        w->state++;
    if (type == 1 && !w->skip) {
        /* which end sent it: a header block opens with its pseudo-headers, a response's with
         * :status (static entries 8-14), a request's with :method, :scheme, :path or :authority
         * (1-7); encoders send these exact matches as static indexes */
        __u32 at = off + 9 + ((w->h[4] & 0x8) ? 1 : 0) + ((w->h[4] & 0x20) ? 5 : 0);
        if (at < off + 9 + flen && at < w->len && kspan_h2_copy(at, 1, 0) == 1) {
            __u8 b = w->h[0];
            __u8 idx = (b & 0x80) ? (b & 0x7f) : (b & 0xc0) == 0x40 ? (b & 0x3f) : (b & 0xe0) == 0 ? (b & 0x0f) : 0;
            if (idx >= 8 && idx <= 14)
                w->skip = 2;  /* a response: its sender is the server */
            else if (idx >= 1 && idx <= 7)
                w->skip = 1;  /* a request: its sender is the client */
        }
    }
    w->off = off + 9 + flen;
    return 0;
}

/* 0: not a chain of frames; 1: one with a request's header block, 2: with a response's, 3: with
 * neither (its sender's end is not told). */
__attribute__((noinline)) int kspan_h2_chain(void)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return 0;
    int z = 0;
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &z);
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &z);
    if (!w || !a)
        return 0;
    kspan_h2_pieces(w, a);
    w->off = 0;
    w->state = 0;
    w->full = 0;
    w->skip = 0;  /* here: 1 a request's header block was seen, 2 a response's */
    bpf_loop(16, kspan_h2_chain_step, 0, 0);
    if (w->full || w->off != w->len || !w->state)
        return 0;
    return w->skip ? (int)w->skip : 3;
}

/* The first word of a transfer (n of its len bytes, the first in the low byte) could start an
 * HTTP/2 frame: a length of at most 16 KiB, a known type, the stream id's reserved bit clear. */
static __always_inline int kspan_h2_frame_start(__u64 w, __u32 n, __u32 len)
{
    return n >= 6 && len >= 9 && (w & 0xff) == 0 && ((w >> 8) & 0xff) <= 0x40 && ((w >> 24) & 0xff) <= 9 && !((w >> 40) & 0x80);
}

/* Walk the HTTP/2 transfer in kspan_args on conn_id into seg.data as entries: the bytes of
 * seg.data used, or -1 when this direction's frame boundaries are lost (the caller then copies
 * the transfer's start, as for the other protocols). */
__attribute__((noinline)) int kspan_h2_frames(__u64 conn_id)
{
    if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
        return -1;
    int z = 0;
    struct kspan_h2_walk *w = bpf_map_lookup_elem(&kspan_h2_walks, &z);
    struct kspan_segbuf_val *sb = bpf_map_lookup_elem(&kspan_segbuf, &z);
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &z);
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!w || !sb || !a || !st)
        return -1;
    int egress = a->dir == KSPAN_DIR_EGRESS;
    __u32 state = egress ? st->scan_n : st->scan_end;
    __u32 skip = egress ? st->cl_pos : st->te_pos;
    __u64 hdr = egress ? st->content_length : st->resp_head_end;
    if (state & KSPAN_H2_LOST)
        return -1;
    kspan_h2_pieces(w, a);
    __u32 hn = state & KSPAN_H2_HN_MASK;
    __u32 off = 0;
    w->skip = 0;
    w->state = 0;
    w->hdr = 0;
    int lost = 0;
    if (hn) {
        /* complete the header the previous transfer cut (its first hn bytes are in hdr) */
        __u32 need = 9 - hn;
        int at = kspan_h2_entry(0);
        if (need > w->len || !at || kspan_h2_copy(0, need, 0) != (int)need) {
            lost = 1;
        } else {
            kspan_h2_grow(at, kspan_h2_copy(0, need, 1));
            /* the header's length and type: the carried bytes first, then this transfer's */
            __u8 h[4] = {};
#pragma unroll
            for (int i = 0; i < 4; i++)
                h[i] = i < (int)hn ? (hdr >> (8 * i)) & 0xff : w->h[(i - hn) & 7];
            __u32 flen = ((__u32)h[0] << 16) | ((__u32)h[1] << 8) | h[2];
            int copy = h[3] != 0;
            if (copy) {
                __u32 want = flen < w->len - need ? flen : w->len - need;
                kspan_h2_grow(at, kspan_h2_copy(need, want, 1));
            }
            off = need + flen;
            if (off > w->len) {
                w->skip = off - w->len;
                w->state = copy ? KSPAN_H2_COPY : 0;
            }
        }
    } else if (skip) {
        /* the rest of a frame the previous transfer began */
        __u32 rest = skip < w->len ? skip : w->len;
        if (state & KSPAN_H2_COPY) {
            int at = kspan_h2_entry(0);
            if (at)
                kspan_h2_grow(at, kspan_h2_copy(0, rest, 1));
        }
        off = rest;
        if (skip > w->len) {
            w->skip = skip - w->len;
            w->state = state & KSPAN_H2_COPY;
        }
    }
    if (!lost) {
        w->off = off;
        bpf_loop(KSPAN_H2_FRAMES, kspan_h2_step, 0, 0);
        if ((w->off < w->len) || (w->state & KSPAN_H2_LOST))
            lost = 1;  /* more frames than the walk takes, or bytes it could not read */
    }
    st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return -1;
    __u32 nstate = lost ? KSPAN_H2_LOST : w->state;
    if (lost)
        kspan_count(KSPAN_CNT_H2_UNSYNCED, 1);
    if (egress) {
        st->scan_n = nstate;
        st->cl_pos = w->skip;
        st->content_length = w->hdr;
    } else {
        st->scan_end = nstate;
        st->te_pos = w->skip;
        st->resp_head_end = w->hdr;
    }
    /* a walk that lost the boundaries keeps the entries it made: they are still right */
    if (!w->o && lost)
        return -1;
    return w->o > KSPAN_H2_DATA ? KSPAN_H2_DATA : w->o;
}

/* One transfer (the per-CPU kspan_args) on a connection of another protocol, or its close: a
 * segment record with the first KSPAN_SEG_DATA bytes. A client's write carries the trace its
 * request joins, by the same parent rules and sampling as an HTTP request. */
__attribute__((noinline)) int kspan_proto_data(__u64 conn_id, int closed)
{
    int z = 0;
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    struct kspan_segbuf_val *sb = bpf_map_lookup_elem(&kspan_segbuf, &z);
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &z);
    if (!st || !sb || !a)
        return 0;
    struct kspan_segment *seg = &sb->seg;
    seg->type = KSPAN_REC_SEGMENT;
    seg->proto = st->method;
    seg->role = st->ex.role;
    seg->parent_kind = KSPAN_PARENT_NONE;
    seg->flags = st->ex.flags & (KSPAN_FLAG_TLS | KSPAN_FLAG_TUPLE_KNOWN);
    seg->family = st->ex.family;
    seg->local_port = st->ex.local_port;
    seg->remote_port = st->ex.remote_port;
    __builtin_memcpy(seg->local_addr, st->ex.local_addr, 16);
    __builtin_memcpy(seg->remote_addr, st->ex.remote_addr, 16);
    seg->conn_id = conn_id;
    seg->seq = st->ex.req_bytes++;  /* in a protocol state, req_bytes counts the segments */
    __builtin_memset(seg->trace_id, 0, 16);
    seg->parent_span_id = 0;
    seg->tcp_seq = 0;
    seg->ctx_seq = 0;
    seg->ctx_end = 0;
    seg->data_len = 0;
    __u32 n = 0;
    __u32 cap = KSPAN_SEG_DATA;
    if (closed) {
        seg->pid = st->ex.pid;
        seg->tid = st->ex.tid;
        seg->dir = 0;
        seg->seg_flags = KSPAN_SEG_CLOSED;
        seg->start_ns = seg->end_ns = bpf_ktime_get_ns();
        seg->len = 0;
    } else {
        seg->pid = a->pid;
        seg->tid = a->tid;
        seg->dir = a->dir;
        /* in a protocol state, parent_kind says whether the first bytes opened the protocol */
        seg->seg_flags = (seg->seq == 0 && st->ex.parent_kind) ? KSPAN_SEG_START : 0;
        seg->flags |= a->flags;
        seg->start_ns = a->start_ns;
        seg->end_ns = a->end_ns;
        seg->len = a->len;
        st->last_ns = a->end_ns;
        /* where the transfer's first byte sits in the TCP stream: both ends of a local
         * connection name a request by it (the sock events fire after the sequence advanced) */
        int plain_tcp = (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN) && !(seg->flags & KSPAN_FLAG_TLS);
        __u32 end_seq = 0;
        if (plain_tcp) {
            end_seq = a->dir == KSPAN_DIR_EGRESS ? BPF_CORE_READ((struct tcp_sock *)conn_id, write_seq)
                                                 : BPF_CORE_READ((struct tcp_sock *)conn_id, copied_seq);
            seg->tcp_seq = end_seq - (__u32)a->len;
            seg->seg_flags |= KSPAN_SEG_SEQ;
        }
        struct kspan_pre_scratch *x = 0;
        if (a->dir == KSPAN_DIR_EGRESS && st->ex.role == KSPAN_ROLE_CLIENT && (x = kspan_pre_scratch())) {
            struct kspan_client_id *id = &x->id;
            __u64 pid_tgid = ((__u64)a->pid << 32) | a->tid;
            struct kspan_client_id *pre = bpf_map_lookup_elem(&client_pre, &conn_id);
            if (pre && pre->pid_tgid == pid_tgid && plain_tcp && pre->seq == seg->tcp_seq) {
                /* decided at the write's entry (kspan_seg_pre) and published then */
                __builtin_memcpy(id, pre, sizeof(*id));
                bpf_map_delete_elem(&client_pre, &conn_id);
            } else {
                kspan_client_decide(id, conn_id, pid_tgid, 0, 0);
                if (plain_tcp)
                    kspan_seg_ctx_note(st, seg->tcp_seq, id);
            }
            seg->parent_kind = id->parent_kind;
            __builtin_memcpy(seg->trace_id, id->trace_id, 16);
            seg->parent_span_id = id->parent_span_id;
            seg->flags |= id->flags & (KSPAN_FLAG_SAMPLED | KSPAN_FLAG_AMBIGUOUS);
        } else if (st->ex.role == KSPAN_ROLE_SERVER && plain_tcp) {
            /* a reply looks again, up to what the server has read: a client's write that was
             * not published at its entry (kspan_seg_pre, kspan_seg_first) is published at its
             * exit, which a server on another CPU may read before */
            if (a->dir == KSPAN_DIR_EGRESS)
                end_seq = BPF_CORE_READ((struct tcp_sock *)conn_id, copied_seq);
            kspan_seg_peer(seg, st, end_seq);
        }
        n = kspan_readable(a);
        __u32 gathered = 0;
        if (st->method == KSPAN_PROTO_HTTP2 &&
            ((a->dir == KSPAN_DIR_EGRESS ? st->scan_n : st->scan_end) & KSPAN_H2_NOTH2))
            seg->seg_flags |= KSPAN_SEG_H2_TAIL;
        int framed = st->method == KSPAN_PROTO_HTTP2 ? kspan_h2_frames(conn_id) : -1;
        if (framed < 0 && a->iov && a->vlen > 1 && n < a->len && n < KSPAN_SEG_DATA)
            gathered = kspan_proto_gather(sb, a);
        if (framed >= 0) {
            n = framed;
            seg->seg_flags |= KSPAN_SEG_H2_FRAMES;
        } else if (gathered) {
            n = gathered;
        } else {
            if (n > KSPAN_SEG_DATA)
                n = KSPAN_SEG_DATA;
            asm volatile("" : "+r"(n));
            n &= (2 * KSPAN_SEG_DATA - 1);
            if (n > KSPAN_SEG_DATA)
                n = KSPAN_SEG_DATA;
            if (n && bpf_probe_read_user(seg->data, n, a->buf) != 0)
                n = 0;
        }
        if (framed >= 0)
            cap = KSPAN_H2_DATA;
        if (n > cap)
            n = cap;
        seg->data_len = n;
    }
    /* bound the size where the verifier sees it (the compiler merged the clamps above) */
    asm volatile("" : "+r"(n));
    n &= KSPAN_H2_MASK;
    if (n > cap)
        n = cap;
    if (n > KSPAN_H2_DATA)
        n = KSPAN_H2_DATA;
    __u32 size = __builtin_offsetof(struct kspan_segment, data) + n;
    if (bpf_ringbuf_output(&events, seg, size, BPF_RB_NO_WAKEUP) == 0)
        kspan_count(KSPAN_CNT_SEGMENTS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
    return 1;
}

/* A connection state for a transfer that opens another protocol (same filters as a request). */
static __always_inline int kspan_proto_begin(struct kspan_data_args *a, __u8 proto, __u8 role, __u8 from_start)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &a->conn_id);
    if (!st)
        st = kspan_new_conn(a);
    if (!st)
        return 0;
    st->ex.role = role;
    st->ex.pid = a->pid;
    st->ex.tid = a->tid;
    st->ex.flags = (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN) | a->flags;
    /* an HTTP/2 preface opening the connection came from its client: role says which way */
    kspan_proto_state(st, proto, from_start);
    kspan_proto_data(a->conn_id, 0);
    return 1;
}

/* Whether a socket transfer carries its direction's first bytes on the connection: the TCP
 * counts of what the process sent (acked or in flight) or read so far are this transfer's alone.
 * First bytes that open a protocol prove nothing on their own: any Redis command does. */
static __always_inline int kspan_first_transfer(struct kspan_data_args *a)
{
    struct tcp_sock *tp = (struct tcp_sock *)a->conn_id;
    if (a->source != KSPAN_SRC_SOCKET || !bpf_core_field_exists(tp->bytes_acked) ||
        !bpf_core_field_exists(tp->bytes_received))
        return 1;
    if (a->dir == KSPAN_DIR_EGRESS) {
        /* an active opener's bytes_acked also counts its SYN's sequence number */
        __u32 unacked = BPF_CORE_READ(tp, write_seq) - BPF_CORE_READ(tp, snd_una);
        return BPF_CORE_READ(tp, bytes_acked) + unacked <= (__u64)a->len + 1;
    }
    __u32 unread = BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
    return BPF_CORE_READ(tp, bytes_received) - unread <= a->len;
}

/* An untracked connection's transfer that starts no request: another protocol's first bytes, or
 * a connection to or from a well-known server port (or of whole HTTP/2 frames) picked up mid-stream. */
static __always_inline int kspan_proto_try(struct kspan_data_args *a, __u64 w, __u32 n)
{
    __u8 role = 0;
    __u8 proto = kspan_proto_first(w, n, a->dir, &role);
    __u8 from_start = proto != 0 && kspan_first_transfer(a);
    if (!proto) {
        /* a connection older than the agent (the case for these hints) has no tuple yet */
        struct kspan_tuple *t = kspan_tuple_of(a->conn_id);
        if (!t)
            return 0;
        proto = kspan_proto_port(t->remote_port);
        role = KSPAN_ROLE_CLIENT;
        if (!proto) {
            proto = kspan_proto_port(t->local_port);
            role = KSPAN_ROLE_SERVER;
        }
        if (!proto && kspan_h2_frame_start(w, n, a->len)) {
            /* HTTP/2 picked up after its preface has no port to go by: a transfer of whole
             * frames says it. Its end: a request's or a response's header block says who sent
             * it; without one (the block opens with an entry of the lost dynamic table), the
             * socket whose port its process bound is the server (an accepted socket inherits its
             * listener's SOCK_BINDPORT_LOCK; connect() binds none: nor does a listener bound to
             * port 0, the one case taken the wrong way round) */
            int chain = kspan_h2_chain();
            int egress = a->dir == KSPAN_DIR_EGRESS;
            if (chain == 1 || chain == 2) {
                proto = KSPAN_PROTO_HTTP2;
                role = (chain == 1) == egress ? KSPAN_ROLE_CLIENT : KSPAN_ROLE_SERVER;
            } else if (chain == 3) {
                struct sock *sk = (struct sock *)a->conn_id;
                __u8 locks = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_userlocks);
                proto = KSPAN_PROTO_HTTP2;
                role = (locks & 8) ? KSPAN_ROLE_SERVER : KSPAN_ROLE_CLIENT;
            }
        }
        if (!proto)
            return 0;
    }
    return kspan_proto_begin(a, proto, role, from_start);
}


/* The uprobe families' way into the state machine (see kspan_on_data_tail): one entry, key 0,
 * holding bpf/uprobe_exchange.bpf.c's kspan_exchange_kp, written by tracer/capture.py after that
 * object loads. Declared here like every shared map, so every object has the same definition. */
struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 1);
    __uint(key_size, sizeof(__u32));
    __uint(value_size, sizeof(__u32)); /* a program fd from user space; no BTF types for prog arrays */
} kspan_exchange_progs SEC(".maps");

/* Copy a probe's arguments into the per-CPU kspan_args entry; the copy, or 0.
 * Work on a copy in map memory, whose contents the verifier does not track: callers build
 * the arguments on different paths (plain buffer, iovec, sendfile ...), and as stack values
 * those paths would stay distinct through the whole state machine, multiplying the verifier's
 * work past its limit. The copy is also what carries the arguments across a tail call. */
static __always_inline struct kspan_data_args *kspan_args_copy(struct kspan_data_args *arg)
{
    int zero = 0;
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &zero);
    if (!a)
        return 0;
    __builtin_memcpy(a, arg, sizeof(*a));
    asm volatile("" ::: "memory");
    return a;
}

/* Network metrics (kspan_network_events): the connection's smoothed RTT as a KSPAN_TCP_RTT record,
 * taken when its process transfers on it, at most once a second (kspan_exchange_body). The state
 * machine has the connection in hand then; a hook of its own (tcp:tcp_probe) ran on every
 * segment every TCP connection on the host received, and looked its connection up each time.
 * Global: verified once. */
__attribute__((noinline)) int kspan_rtt_sample(__u64 conn_id, __u32 pid, __u64 now)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st || !(st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN))
        return 0;
    __u32 srtt = BPF_CORE_READ((struct tcp_sock *)conn_id, srtt_us) >> 3;  /* kept << 3 */
    if (!srtt)
        return 0;
    struct kspan_tcp r = {};
    r.type = KSPAN_REC_TCP;
    r.pid = pid;
    r.event = KSPAN_TCP_RTT;
    r.value = srtt;
    r.ts_ns = now;
    r.conn_id = conn_id;
    r.family = st->ex.family;
    r.local_port = st->ex.local_port;
    r.remote_port = st->ex.remote_port;
    __builtin_memcpy(r.local_addr, st->ex.local_addr, 16);
    __builtin_memcpy(r.remote_addr, st->ex.remote_addr, 16);
    if (bpf_ringbuf_output(&events, &r, sizeof(r), BPF_RB_NO_WAKEUP) == 0)
        kspan_count(KSPAN_CNT_TCP_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
    return 1;
}

/* A transfer that may begin a request (its connection is between exchanges) or a response (a
 * request is in flight and this goes the other way) is read ahead, up to KSPAN_SCAN bytes, into
 * the per-CPU scan buffer, and its head is copied from there (kspan_begin_request,
 * kspan_response_data): a read of user memory costs about as much whatever its size (0.2 us on
 * the development machine), the costliest step of a transfer. p gets its first 8 bytes. A
 * connection whose last such transfer began nothing (WebSocket frames after a 101, say) is not
 * read ahead until a request begins again. 0: not read ahead. */
static __always_inline int kspan_read_ahead(struct kspan_conn *st, struct kspan_data_args *a, __u8 *p)
{
    if (!st)
        return 0;
    __u8 ph = st->phase;
    if (!(((ph == KSPAN_PH_IDLE || ph == KSPAN_PH_PREFIX) && !st->nonhttp) ||
          ((ph == KSPAN_PH_REQ || ph == KSPAN_PH_WAIT_FINAL) && a->dir != st->req_dir)))
        return 0;
    __u32 n = kspan_readable(a);
    if (n > KSPAN_SCAN)
        n = KSPAN_SCAN;
    asm volatile("" : "+r"(n));
    n &= 1023;
    int zero = 0;
    struct kspan_scan_buf *sb = bpf_map_lookup_elem(&kspan_scan, &zero);
    if (!sb || n == 0 || bpf_probe_read_user(sb->b, n, a->buf) != 0)
        return 0;
    __builtin_memset(&sb->b[n & 1023], 0, 32);
    a->pre_n = n;
    __builtin_memcpy(p, sb->b, 8);
    return 1;
}

/* The exchange state machine on the map-resident arguments `a` (kspan_args_copy). Each program
 * that inlines it costs the verifier a walk of ~250k instructions at load, so only the socket
 * programs inline it (kspan_on_data); the uprobe programs tail-call into the one program of
 * bpf/uprobe_exchange.bpf.c that does (kspan_on_data_tail). */
static __always_inline void kspan_exchange_body_on(void *ctx, struct kspan_data_args *a, struct kspan_conn *st)
{
    if (a->pid == kspan_self_pid) {
        if (a->dir == KSPAN_DIR_EGRESS)
            kspan_note_self(a->conn_id);
        return;
    }
    /* The key is the map copy's field, not a stack variable: with the key on the stack the
     * verifier's walk of the state machine below doubled (263k -> 506k instructions with --pid). */
    if (kspan_filter_pids && a->source != KSPAN_SRC_SOCKET && !bpf_map_lookup_elem(&allowed_pids, &a->pid))
        return;  /* the socket paths checked before they got here */
    /* The uprobe families' (OpenSSL, Go) only cgroup check; the socket probes checked already. */
    if (kspan_cgroup_skipped())
        return;
    if (a->len == 0)
        return;
    if (st && (a->flags & KSPAN_FLAG_TLS))
        st->tls = 1;  /* plaintext from a TLS probe: the socket path leaves this connection alone */
    if (kspan_network_events && st && a->end_ns - st->rtt_ns >= 1000000000ULL) {
        st->rtt_ns = a->end_ns;
        kspan_rtt_sample(a->conn_id, a->pid, a->end_ns);
    }
    if (st && st->phase == KSPAN_PH_PROTO) {
        kspan_proto_data(a->conn_id, 0);
        return;
    }
    __u8 p[16] = {};
    __u32 pn = kspan_readable(a);
    if (pn > 8)
        pn = 8;
    asm volatile("" : "+r"(pn));
    pn &= 15;
    if (pn && !kspan_read_ahead(st, a, p) && bpf_probe_read_user(p, pn, a->buf) != 0)
        pn = 0;

    __u64 w = 0;
    __builtin_memcpy(&w, p, 8);
    __u32 n = pn;

    /* Every path that starts a request ends at the one kspan_begin_request() call below: each
     * inlined copy of it costs compile time and verifier work. */
    __u8 m = 0;
    if (st && st->pend_n && st->pend_dir == a->dir) {
        /* this transfer continues pending bytes: judge them together (a method token or
         * "HTTP/1." split at any byte across transfers) */
        __u32 k = st->pend_n;
        asm volatile("" : "+r"(k));
        k &= 7;
        w = st->pend | (w << (8 * k));
        n = k + pn > 8 ? 8 : k + pn;
    }
    /* Only a transfer read whole can be held as pending: with n <= 7 (the prefix checks) the
     * joined bytes are then exactly the pending ones and this transfer. */
    int whole = pn == a->len;
    if (!st) {
        m = kspan_method(w, n);
        if (!m) {
            if (whole && kspan_method_prefix(w, n)) {
                /* maybe a request's first bytes ("GE"): a state to hold them, same filters */
                st = kspan_new_conn(a);
                if (st) {
                    st->phase = KSPAN_PH_PREFIX;
                    kspan_hold(st, a, w, n);
                }
                return;
            }
            if (kspan_proto_try(a, w, n))
                return;
            kspan_count(kspan_is_response(w, n) ? KSPAN_CNT_ORPHAN_RESPONSE : KSPAN_CNT_NON_HTTP_SEGMENTS, 1);
            kspan_count(KSPAN_CNT_UNPARSED_BYTES, a->len);
            return;
        }
        st = kspan_new_conn(a);
        if (!st)
            return;
    } else if (st->phase == KSPAN_PH_IDLE || st->phase == KSPAN_PH_PREFIX) {
        m = kspan_method(w, n);
        if (!m && kspan_joined(st, a)) {
            m = kspan_method(kspan_first_word(p), pn);
            if (m)
                kspan_drop_pending(st, a);
        }
        if (!m) {
            if (whole && kspan_method_prefix(w, n)) {
                st->phase = KSPAN_PH_PREFIX;
                kspan_hold(st, a, w, n);
                return;
            }
            if (w == KSPAN_W_H2_PREFACE && kspan_proto_begin(a, KSPAN_PROTO_HTTP2,
                                                             a->dir == KSPAN_DIR_EGRESS ? KSPAN_ROLE_CLIENT
                                                                                        : KSPAN_ROLE_SERVER, 1))
                return;  /* HTTP/1.1 Upgrade: h2c, then the HTTP/2 preface */
            kspan_count(KSPAN_CNT_NON_HTTP_SEGMENTS, 1);
            kspan_count(KSPAN_CNT_UNPARSED_BYTES, a->len);
            kspan_drop_pending(st, a);
            st->nonhttp = 1;
            if (st->phase == KSPAN_PH_PREFIX && !st->pend_n) {
                /* not a request after all; a state made only to hold the bytes goes */
                if (st->ex.type != KSPAN_REC_EXCHANGE)
                    bpf_map_delete_elem(&conns, &a->conn_id);
                else
                    st->phase = KSPAN_PH_IDLE;
            }
            return;
        }
    } else if (a->dir == st->req_dir) {
        st->last_ns = a->end_ns;
        if (st->phase == KSPAN_PH_RESP) {
            m = kspan_method(w, n);
            if (!m && kspan_joined(st, a)) {
                m = kspan_method(kspan_first_word(p), pn);
                if (m) {
                    st->ex.req_bytes += st->pend_n;  /* held body bytes after all */
                    st->pend_n = 0;
                }
            }
            if (!m) {
                /* the next request's first bytes (keep-alive, or a Go server's background read
                 * while it still writes the response), or body sent while the response runs */
                if (whole && kspan_method_prefix(w, n)) {
                    kspan_hold(st, a, w, n);
                    return;
                }
                st->ex.req_bytes += a->len;  /* body: count only */
                if (st->pend_n && st->pend_dir == a->dir) {
                    st->ex.req_bytes += st->pend_n;  /* held body bytes after all */
                    st->pend_n = 0;
                }
                return;
            }
            kspan_emit(st, KSPAN_END_NEXT_REQUEST);
        } else {
            /* PH_REQ: more of the request (or pipelined requests); PH_WAIT_FINAL: body after
             * 100-continue, where bytes held during the interim response are counted, not copied */
            st->ex.req_bytes += a->len;
            st->ex.req_end_ns = a->end_ns;
            if (st->pend_n && st->pend_dir == a->dir) {
                st->ex.req_bytes += st->pend_n;
                st->pend_n = 0;
            }
            KSPAN_APPEND(req_head, KSPAN_REQ_HEAD, req_head_len, a->buf, kspan_readable(a), KSPAN_FLAG_REQ_HEAD_FULL);
            return;
        }
    } else {
        /* response direction */
        st->last_ns = a->end_ns;
        if (st->phase == KSPAN_PH_REQ || st->phase == KSPAN_PH_WAIT_FINAL) {
            /* no second look at the transfer alone, as for requests: before the status line
             * nothing may come, so pending bytes that did not start it were garbage either way */
            if (!kspan_is_response(w, n)) {
                if (whole && kspan_response_prefix(w, n)) {
                    kspan_hold(st, a, w, n);  /* "HT": the status line may follow */
                    return;
                }
                kspan_count(KSPAN_CNT_UNPARSED_BYTES, a->len);
                kspan_drop_pending(st, a);
                return;
            }
            kspan_begin_response(st, a);
        }
        kspan_response_data(st, a);
        return;
    }
    kspan_begin_request(st, a, m);
}

/* The state machine for a caller that has not looked the connection up. */
static __always_inline void kspan_exchange_body(void *ctx, struct kspan_data_args *a)
{
    kspan_exchange_body_on(ctx, a, bpf_map_lookup_elem(&conns, &a->conn_id));
}

/* The state machine inlined: the socket backends. kspan_sock_length is a tracepoint program, and a
 * tail call only reaches a program of the caller's own type, so it cannot use kspan_on_data_tail
 * (kspan_exchange_kp is a kprobe-type program, like the uprobes); the kprobes/fentry backends have
 * a single inlined copy each and gain nothing from a tail call.
 * The copy is kspan_args_copy() written out, on purpose: through the helper the lookup key's
 * lifetime ends at its return, clang gives its stack slot to the state machine's first-bytes
 * buffer, and the verifier's walk of kspan_sock_length doubled (263k -> 506k instructions).
 * st is the caller's own lookup of the connection (conns[arg->conn_id], or 0 when it has none):
 * the socket path looks it up before the state machine for its descriptor and TLS checks, and a
 * second lookup of the same key cost a hash walk on every transfer. */
static __always_inline void kspan_on_data(void *ctx, struct kspan_data_args *arg, struct kspan_conn *st)
{
    int zero = 0;
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &zero);
    if (!a)
        return;
    __builtin_memcpy(a, arg, sizeof(*a));
    asm volatile("" ::: "memory");
    kspan_exchange_body_on(ctx, a, st);
}

/* The uprobe families (OpenSSL, Go: BPF_PROG_TYPE_KPROBE programs): copy the arguments to the
 * per-CPU kspan_args entry and tail-call kspan_exchange_kp (bpf/uprobe_exchange.bpf.c), which runs
 * the state machine on that copy: the verifier walks the state machine once at load instead of
 * once per uprobe program (about 2.5 s of start-up with a copy in each). The tail call passes the
 * same ctx and continues the same program run on the same CPU, so the per-CPU copy is still this
 * transfer's. A tail call that succeeds never returns: a caller must do all its own work (map
 * updates, deletes) BEFORE calling this. It falls through only when the program array is empty
 * (the object not loaded or its fd not written): the transfer is then counted, not silently lost. */
static __always_inline void kspan_on_data_tail(void *ctx, struct kspan_data_args *arg)
{
    if (!kspan_args_copy(arg))
        return;
    bpf_tail_call(ctx, &kspan_exchange_progs, 0);
    kspan_count(KSPAN_CNT_TAIL_CALL_MISSED, 1);
}

static __always_inline void kspan_on_close(void *ctx, __u64 conn_id)
{
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &conn_id);
    if (!st)
        return;
    if (st->phase == KSPAN_PH_PROTO) {
        kspan_proto_data(conn_id, 1);
        bpf_map_delete_elem(&conns, &conn_id);
        return;
    }
    if (st->pend_n)
        kspan_count(KSPAN_CNT_UNPARSED_BYTES, st->pend_n);  /* held bytes nothing completed */
    if (st->phase != KSPAN_PH_IDLE && st->phase != KSPAN_PH_PREFIX) {
        /* a response delimited by the close is complete; anything else was cut short */
        if (st->phase == KSPAN_PH_RESP && st->hdr_state == KSPAN_HS_DONE && st->framing == KSPAN_FR_CLOSE)
            kspan_emit(st, KSPAN_END_COMPLETE);
        else
            kspan_emit(st, KSPAN_END_CLOSED);
    }
    if (st->ex.role == KSPAN_ROLE_CLIENT && (st->ex.flags & KSPAN_FLAG_TUPLE_KNOWN)) {
        struct kspan_conn_key k = {};
        kspan_conn_key_of_ex(&k, st, 0);
        struct kspan_exchange_ref *r = bpf_map_lookup_elem(&client_conns, &k);
        if (r && r->conn_id == conn_id)
            r->closed_ns = bpf_ktime_get_ns();
    }
    bpf_map_delete_elem(&conns, &conn_id);
}

/* ---- helpers for socket probe families ---- */

/* One socket transfer as the state machine takes it: a write runs from its start (syscall or
 * function entry) to now; a read is stamped when its data arrived, now. */
static __always_inline void kspan_socket_args(struct kspan_data_args *a, __u64 id, __u64 sk, __u8 dir, __u32 len,
                                              __u64 write_start_ns, __u64 now)
{
    a->conn_id = sk;
    a->pid = id >> 32;
    a->tid = (__u32)id;
    a->dir = dir;
    a->source = KSPAN_SRC_SOCKET;
    a->len = len;
    a->start_ns = dir == KSPAN_DIR_EGRESS ? write_start_ns : now;
    a->end_ns = now;
}

#define KSPAN_MSG_PEEK 2
#define KSPAN_MAX_IOV 8

struct kspan_iovec {
    __u64 base;
    __u64 len;
};

/* TLS sockets: inside SSL_read/SSL_write (ssl_active has the thread) the socket bytes are
 * ciphertext; the TLS probe reports the plaintext. Returns 1 when the socket path must skip.
 * st is the socket's connection state or 0: a state knows whether a TLS probe owns the
 * connection (kspan_conn.tls, set wherever tls_conns is), so only a socket without one needs
 * tls_conns. */
static __always_inline int kspan_tls_socket(__u64 pid_tgid, __u64 sk, struct kspan_conn *st)
{
    struct kspan_ssl_call *sc = kspan_ssl_calls_maybe() ? bpf_map_lookup_elem(&ssl_active, &pid_tgid) : 0;
    if (sc) {
        sc->sk = sk;
        if (st)
            st->tls = 1;
        __u8 one = 1;
        if (!bpf_map_lookup_elem(&tls_conns, &sk))
            bpf_map_update_elem(&tls_conns, &sk, &one, BPF_ANY);
        kspan_count(KSPAN_CNT_TLS_SKIPPED, 1);
        return 1;
    }
    if (st ? st->tls : bpf_map_lookup_elem(&tls_conns, &sk) != 0) {
        kspan_count(KSPAN_CNT_TLS_SKIPPED, 1);
        return 1;
    }
    return 0;
}

/* A TLS probe takes the connection: the socket path must skip its ciphertext from now on. */
static __always_inline void kspan_tls_mark(__u64 sk)
{
    __u8 one = 1;
    bpf_map_update_elem(&tls_conns, &sk, &one, BPF_ANY);
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &sk);
    if (st)
        st->tls = 1;
}

/* Read k (<= 8) bytes ending at `end` and shift them into v (newest in the low byte). */
static __always_inline __u64 kspan_shift_in(__u64 v, __u64 end, __u32 k)
{
    __u8 b[16] = {};
    asm volatile("" : "+r"(k));
    k &= 15;
    if (k == 0 || bpf_probe_read_user(b, k, (const void *)(end - k)) != 0)
        return v;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < k)
            v = (v << 8) | b[i];
    }
    return v;
}

/* Scattered buffers: the first non-empty segment is what the state machine reads; the tail
 * register gets the last bytes of the last two segments. */
static __always_inline void kspan_iov_args(struct kspan_data_args *a, __u64 iov, __u32 vlen, __u64 skip,
                                           __u32 ret)
{
    a->iov = iov;
    a->vlen = vlen;
    a->iov_skip = skip;
    __u64 remaining = ret;
    __u64 last_end = 0, last_used = 0, prev_end = 0, prev_used = 0;
#pragma unroll
    for (int j = 0; j < KSPAN_MAX_IOV; j++) {
        if (j >= vlen || remaining == 0)
            break;
        struct kspan_iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), (const void *)(iov + j * sizeof(v))) != 0)
            break;
        if (j == 0 && skip < v.len) {
            v.base += skip;  /* part of the first segment already consumed (kernel iov_offset) */
            v.len -= skip;
        }
        __u64 used = v.len < remaining ? v.len : remaining;
        if (used) {
            if (!a->buf) {
                a->buf = (const char *)v.base;
                a->buf_len = used;
            }
            prev_end = last_end;
            prev_used = last_used;
            last_end = v.base + used;
            last_used = used;
        }
        remaining -= used;
    }
    if (!a->buf) {
        a->buf_len = 0;
        return;
    }
    if (a->buf_len == 0)
        a->buf_len = 1;  /* 0 would mean "the whole transfer is readable at buf" */
    if (remaining)
        return;          /* more segments than we walk: tail unknown */
    __u32 k1 = last_used > 8 ? 8 : last_used;
    __u32 k2 = 0;
    if (k1 < 8 && prev_used)
        k2 = prev_used > (8 - k1) ? (8 - k1) : prev_used;
    __u64 v = 0;
    if (k2)
        v = kspan_shift_in(v, prev_end, k2);
    v = kspan_shift_in(v, last_end, k1);
    a->tail = v;
    a->tail_n = k1 + k2;
}


#endif
