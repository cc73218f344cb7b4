/* Go crypto/tls: plaintext of (*Conn).Write and (*Conn).Read, from Go programs (amd64, Go >= 1.17).
 *
 * Go ABI: arguments in RAX, RBX, RCX, RDI, RSI, R8..R11; results in RAX, RBX, ...; the current
 * goroutine (g) in R14. Go copies goroutine stacks to grow them, so a uretprobe (which rewrites the
 * return address on the stack) can crash the program: tracer/uprobes.py attaches the *_ret programs
 * to every RET instruction of the function instead. A goroutine may move to another thread while
 * blocked in the call, so the in-call state is keyed by goroutine id, never by thread.
 *
 * The connection comes from the Conn itself: tls.Conn.conn (a net.Conn holding a *net.TCPConn)
 * -> netFD -> poll.FD.Sysfd, then fd_sk (filled by the socket path on the handshake's syscalls)
 * gives the struct sock: the same conn_id the socket path uses, so 4-tuple and peer linking hold.
 * Field offsets differ between Go versions and come per process from user space (go_procs).
 * Compiled after http_exchange.h (tracer/loader.py concatenates the sources).
 */

#include <uapi/linux/ptrace.h>

/* Offsets of the fields the Go probes read, from the binary's DWARF (tracer/go_binary.py). */
struct kspan_go_offsets {
    __u16 g_goid;            /* runtime.g.goid */
    __u16 tls_conn_conn;     /* crypto/tls.Conn.conn (interface: itab, data) */
    __u16 tcpconn_fd;        /* net.TCPConn.conn + net.conn.fd (*netFD) */
    __u16 netfd_sysfd;       /* net.netFD.pfd + internal/poll.FD.Sysfd */
    __u16 response_conn;     /* net/http.response.conn (*conn) */
    __u16 conn_rwc;          /* net/http.conn.rwc (interface) */
    __u16 conn_tls_state;    /* net/http.conn.tlsState (*tls.ConnectionState; nil: plaintext) */
    __u16 pc_conn;           /* net/http.persistConn.conn (interface) */
    __u16 pc_tls_state;      /* net/http.persistConn.tlsState */
    __u16 flags;             /* KSPAN_GO_* */
};
#define KSPAN_GO_TLS 0x1     /* crypto/tls probes usable */
#define KSPAN_GO_HTTP 0x2    /* net/http + runtime probes usable (goroutine parentage) */

struct kspan_go_key {
    __u32 tgid;
    __u32 _pad;
    __u64 goid;
};

struct kspan_go_tls_call {
    const char *buf;
    __u64 start_ns;
    __u64 sk;
};

BPF_TABLE("lru_hash", __u32, struct kspan_go_offsets, go_procs, 16384);         /* tgid -> offsets */
/* probed instruction address -> offsets, for non-PIE binaries (fixed addresses): a process that
 * starts and makes its first call before user space has handled its exec is still understood. */
BPF_HASH(go_probe_offsets, __u64, struct kspan_go_offsets, 8192);
BPF_TABLE("lru_hash", struct kspan_go_key, struct kspan_go_tls_call, go_tls_calls, 16384);

/* net/http's server reads ONE byte in a background goroutine while a handler runs (to notice a
 * client that went away); when the next request arrives then, its first byte comes alone and the
 * rest comes later, read into the bufio buffer right after that byte. A 1-byte read between
 * exchanges is held here and joined to the next read on the connection when the byte before that
 * read's buffer is the held one. */
struct kspan_go_held {
    __u64 ts;
    __u8 byte;
    __u8 _pad[7];
};
BPF_TABLE("lru_hash", __u64, struct kspan_go_held, go_held_byte, 16384); /* sk -> held byte */

static __always_inline struct kspan_go_offsets *kspan_go_offsets_of(struct pt_regs *ctx, __u32 tgid)
{
    struct kspan_go_offsets *o = go_procs.lookup(&tgid);
    if (o)
        return o;
    __u64 ip = PT_REGS_IP(ctx);
    o = go_probe_offsets.lookup(&ip);
    if (!o) {
        ip -= 1;  /* the int3 trap may leave IP one past the probed instruction */
        o = go_probe_offsets.lookup(&ip);
    }
    if (!o)
        return 0;
    struct kspan_go_offsets copy = *o;
    go_procs.update(&tgid, &copy);
    return go_procs.lookup(&tgid);
}

static __always_inline __u64 kspan_go_goid(struct pt_regs *ctx, struct kspan_go_offsets *o)
{
    __u64 goid = 0;
    bpf_probe_read_user(&goid, sizeof(goid), (const void *)(ctx->r14 + o->g_goid));
    return goid;
}

/* struct sock behind a *net.TCPConn, or 0. */
static __always_inline __u64 kspan_go_tcpconn_sk(__u32 tgid, __u64 tcpconn, struct kspan_go_offsets *o)
{
    __u64 netfd = 0;
    __s64 sysfd = -1;
    if (!tcpconn || bpf_probe_read_user(&netfd, sizeof(netfd), (const void *)(tcpconn + o->tcpconn_fd)))
        return 0;
    if (!netfd || bpf_probe_read_user(&sysfd, sizeof(sysfd), (const void *)(netfd + o->netfd_sysfd)))
        return 0;
    if (sysfd < 0 || sysfd > 0x7fffffff)
        return 0;
    __u64 key = ((__u64)tgid << 32) | (__u32)sysfd;
    __u64 *sk = fd_sk.lookup(&key);
    return sk ? *sk : 0;
}

/* The data word of a Go interface value stored at `addr`. */
static __always_inline __u64 kspan_go_iface_data(__u64 addr)
{
    __u64 data = 0;
    bpf_probe_read_user(&data, sizeof(data), (const void *)(addr + 8));
    return data;
}

/* struct sock behind a *tls.Conn whose conn is a *net.TCPConn, or 0. */
static __always_inline __u64 kspan_go_tls_sk(__u32 tgid, __u64 tlsconn, struct kspan_go_offsets *o)
{
    if (!tlsconn)
        return 0;
    return kspan_go_tcpconn_sk(tgid, kspan_go_iface_data(tlsconn + o->tls_conn_conn), o);
}

static __always_inline int kspan_go_tls_enter(struct pt_regs *ctx, __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !(o->flags & KSPAN_GO_TLS))
        return 0;
    struct kspan_go_tls_call c = {};
    c.buf = (const char *)ctx->bx;  /* b []byte: ptr in RBX, len in RCX (receiver c in RAX) */
    c.start_ns = bpf_ktime_get_ns();
    c.sk = kspan_go_tls_sk(tgid, ctx->ax, o);
    if (c.sk) {
        /* before this call's own syscalls: the socket path must skip its ciphertext */
        __u8 one = 1;
        if (!tls_conns.lookup(&c.sk))
            tls_conns.update(&c.sk, &one);
    }
    if (dir == KSPAN_DIR_EGRESS) {
        /* (*Conn).Write writes all of b or fails, so the bytes are known here. Reporting them at
         * entry, before they reach the wire, orders a request before its receiver's read of it,
         * which the peer's PEER link needs (a RET probe can run after the peer read the bytes). */
        __s64 len = (__s64)ctx->cx;
        if (!c.sk || len <= 0) {
            if (len > 0)
                kspan_count(KSPAN_CNT_UNPARSED_BYTES, len);
            return 0;
        }
        struct kspan_data_args a = {};
        a.conn_id = c.sk;
        a.pid = tgid;
        a.tid = (__u32)id;
        a.dir = KSPAN_DIR_EGRESS;
        a.source = KSPAN_SRC_GO;
        a.flags = KSPAN_FLAG_TLS;
        a.buf = c.buf;
        a.len = len > 0x7fffffff ? 0x7fffffff : (__u32)len;
        a.start_ns = c.start_ns;
        a.end_ns = c.start_ns;
        kspan_on_data(ctx, &a);
        return 0;
    }
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    go_tls_calls.update(&key, &c);
    return 0;
}

static __always_inline int kspan_go_tls_ret(struct pt_regs *ctx, __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o)
        return 0;
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    struct kspan_go_tls_call *cp = go_tls_calls.lookup(&key);
    if (!cp)
        return 0;
    struct kspan_go_tls_call c = *cp;
    go_tls_calls.delete(&key);
    __s64 n = (__s64)ctx->ax;  /* n int in RAX, err in RBX/RCX */
    if (n <= 0)
        return 0;
    if (!c.sk) {
        /* not a *net.TCPConn underneath (a custom net.Conn), or a socket the socket path never saw */
        kspan_count(KSPAN_CNT_UNPARSED_BYTES, n);
        return 0;
    }
    __u64 now = bpf_ktime_get_ns();
    __u64 start = dir == KSPAN_DIR_EGRESS ? c.start_ns : now;
    if (dir == KSPAN_DIR_INGRESS) {
        struct kspan_go_held *h = go_held_byte.lookup(&c.sk);
        if (h) {
            __u8 prev = 0;
            bpf_probe_read_user(&prev, 1, c.buf - 1);
            if (prev == h->byte) {
                c.buf -= 1;
                n += 1;
                start = h->ts;
            } else {
                kspan_count(KSPAN_CNT_UNPARSED_BYTES, 1);
            }
            go_held_byte.delete(&c.sk);
        } else if (n == 1) {
            /* between exchanges, or while this server's response is still being written: the
             * background read can return before the handler's last Write has returned */
            struct kspan_conn *st = conns.lookup(&c.sk);
            if (!st || st->phase == KSPAN_PH_IDLE ||
                (st->phase == KSPAN_PH_RESP && st->req_dir == KSPAN_DIR_INGRESS)) {
                struct kspan_go_held nh = {};
                nh.ts = now;
                bpf_probe_read_user(&nh.byte, 1, c.buf);
                go_held_byte.update(&c.sk, &nh);
                return 0;
            }
        }
    }
    struct kspan_data_args a = {};
    a.conn_id = c.sk;
    a.pid = tgid;
    a.tid = (__u32)id;
    a.dir = dir;
    a.source = KSPAN_SRC_GO;
    a.flags = KSPAN_FLAG_TLS;
    a.buf = c.buf;
    a.len = n > 0x7fffffff ? 0x7fffffff : (__u32)n;
    a.start_ns = start;
    a.end_ns = now;
    kspan_on_data(ctx, &a);
    return 0;
}

int kspan_go_tls_write_enter(struct pt_regs *ctx) { return kspan_go_tls_enter(ctx, KSPAN_DIR_EGRESS); }
int kspan_go_tls_read_enter(struct pt_regs *ctx) { return kspan_go_tls_enter(ctx, KSPAN_DIR_INGRESS); }
int kspan_go_tls_read_ret(struct pt_regs *ctx) { return kspan_go_tls_ret(ctx, KSPAN_DIR_INGRESS); }
