/* OpenSSL (libssl 1.1 and 3): plaintext of SSL_read/SSL_write and their _ex forms.
 *
 * The shared maps come from http_exchange.h; the loader makes this object reuse the socket
 * family's maps, so ssl_active/tls_conns/fd_sk/conns are the same tables the socket path uses.
 * While a call is in progress its thread has an ssl_active entry: the socket path then leaves the
 * ciphertext alone, records the struct sock it went through in .sk and marks that socket in
 * tls_conns. At the return, the plaintext goes to the state machine keyed by that sock, so an
 * HTTPS exchange has the same connection identity (and 4-tuple, and peer linking) as a plaintext
 * one. The state machine runs in bpf/uprobe_exchange.bpf.c, reached by a tail call
 * (kspan_on_data_tail): inlined, each program here would cost the verifier its own walk of it.
 *
 * The programs have no attach target in SEC(): tracer/ssl_libs.py attaches them by symbol to every
 * libssl copy (and statically linked executable) it finds. uretprobes are safe here: C stacks do
 * not move (unlike Go's).
 */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"
#include "http_exchange.h"

char LICENSE[] SEC("license") = "GPL";

struct kspan_ssl_key {
    __u32 tgid;
    __u32 _pad;
    __u64 ssl;
};

/* SSL* -> sock of its last call that reached the socket: a read served from OpenSSL's buffer makes
 * no syscall, so the sock comes from an earlier call on the same SSL*. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct kspan_ssl_key);
    __type(value, __u64);
} ssl_sk SEC(".maps");
/* SSL* -> fd from SSL_set_fd: the sock of a first call that made no syscall of its own. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct kspan_ssl_key);
    __type(value, __u32);
} ssl_fd SEC(".maps");
/* pid_tgid -> what the return probe needs besides ssl_active's entry. */
struct kspan_ssl_extra {
    __u64 outp;           /* size_t *written / *readbytes of an _ex call; 0 for the plain forms */
    __u64 num;            /* bytes asked to write */
    __u8 fed;             /* the write's bytes were reported at entry */
    __u8 _pad[7];
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, struct kspan_ssl_extra);
} ssl_extra SEC(".maps");
/* SSL* -> the write still owed after a failed (WANT_WRITE) or partial SSL_write whose bytes were
 * already reported at entry: OpenSSL requires the retry with the same buffer, so that entry must
 * not report them again. */
struct kspan_ssl_owed {
    __u64 buf;
    __u64 num;
};
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, struct kspan_ssl_key);
    __type(value, struct kspan_ssl_owed);
} ssl_owed SEC(".maps");

/* The sock of an SSL* known before this call touches the socket, or 0. */
static __always_inline __u64 kspan_ssl_known_sk(struct kspan_ssl_key *key, __u64 id)
{
    __u64 *known = bpf_map_lookup_elem(&ssl_sk, key);
    if (known)
        return *known;
    __u32 *fd = bpf_map_lookup_elem(&ssl_fd, key);
    if (!fd)
        return 0;
    __u64 fdkey = (id & 0xffffffff00000000ULL) | *fd;
    __u64 *fsk = bpf_map_lookup_elem(&fd_sk, &fdkey);
    if (!fsk)
        return 0;
    __u64 sk = *fsk;
    bpf_map_update_elem(&ssl_sk, key, &sk, BPF_ANY);
    kspan_tls_mark(sk);
    return sk;
}

static __always_inline void kspan_ssl_feed(struct pt_regs *ctx, __u64 id, __u64 sk, __u8 dir, const char *buf,
                                           __u64 len, __u64 start, __u64 end)
{
    struct kspan_data_args a = {};
    a.conn_id = sk;
    a.pid = id >> 32;
    a.tid = (__u32)id;
    a.dir = dir;
    a.source = KSPAN_SRC_OPENSSL;
    a.flags = KSPAN_FLAG_TLS;
    a.buf = buf;
    a.len = len > 0x7fffffffULL ? 0x7fffffff : (__u32)len;
    a.start_ns = start;
    a.end_ns = end;
    /* a tail call into the state machine (bpf/uprobe_exchange.bpf.c): it does not return */
    kspan_on_data_tail(ctx, &a);
}

static __always_inline int kspan_ssl_enter(struct pt_regs *ctx, __u64 outp, __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (kspan_pid_skipped(pid))
        return 0;
    struct kspan_ssl_call c = {};
    c.ssl = PT_REGS_PARM1(ctx);
    c.buf = (const char *)PT_REGS_PARM2(ctx);
    c.start_ns = bpf_ktime_get_ns();
    /* kspan_gate.ssl_calls counts ssl_active's entries, so the socket path looks this map up only
     * while some thread is inside an SSL call */
    struct kspan_gate *g = kspan_gate();
    if (bpf_map_update_elem(&ssl_active, &id, &c, BPF_NOEXIST) == 0) {
        if (g)
            __sync_fetch_and_add(&g->ssl_calls, 1);
    } else {
        bpf_map_update_elem(&ssl_active, &id, &c, BPF_ANY);
    }
    struct kspan_ssl_extra x = {};
    x.outp = outp;
    __u64 sk = 0;
    int feed = 0;
    if (dir == KSPAN_DIR_EGRESS) {
        /* A write's bytes are known at entry. Reporting them before they reach the wire orders a
         * request before the peer's read of it (the peer's PEER link needs the client exchange
         * first; a return probe can run after the peer has already read the bytes). */
        x.num = PT_REGS_PARM3(ctx);
        if (!outp)
            x.num = (__u32)x.num;  /* SSL_write's num is an int */
        struct kspan_ssl_key key = {};
        key.tgid = pid;
        key.ssl = c.ssl;
        sk = kspan_ssl_known_sk(&key, id);
        if (sk && x.num > 0 && x.num < 0x80000000ULL) {
            struct kspan_ssl_owed *owed = bpf_map_lookup_elem(&ssl_owed, &key);
            feed = !(owed && owed->buf == (__u64)c.buf && owed->num == x.num);
            x.fed = 1;
        }
    }
    if (outp || x.fed)
        bpf_map_update_elem(&ssl_extra, &id, &x, BPF_ANY);
    /* last: the feed tail-calls the state machine and does not return (the state machine reads
     * neither ssl_extra nor ssl_owed, so saving the entry first changes nothing else) */
    if (feed)
        kspan_ssl_feed(ctx, id, sk, KSPAN_DIR_EGRESS, c.buf, x.num, c.start_ns, c.start_ns);
    return 0;
}

static __always_inline int kspan_ssl_exit(struct pt_regs *ctx, __u8 dir, int ex)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_ssl_call *c = bpf_map_lookup_elem(&ssl_active, &id);
    if (!c)
        return 0;
    struct kspan_ssl_call call = *c;
    struct kspan_gate *g = kspan_gate();
    if (bpf_map_delete_elem(&ssl_active, &id) == 0 && g)
        __sync_fetch_and_add(&g->ssl_calls, -1);
    struct kspan_ssl_extra x = {};
    struct kspan_ssl_extra *xp = bpf_map_lookup_elem(&ssl_extra, &id);
    if (xp) {
        x = *xp;
        bpf_map_delete_elem(&ssl_extra, &id);
    }

    long ret = PT_REGS_RC(ctx);
    __u64 len = 0;
    if (ex) {
        /* _ex: 1 on success with the count in *out; 0 on failure */
        if ((int)ret != 1 || !x.outp || bpf_probe_read_user(&len, sizeof(len), (const void *)x.outp) != 0)
            len = 0;
    } else if ((int)ret > 0) {
        len = (int)ret;
    }

    struct kspan_ssl_key key = {};
    key.tgid = id >> 32;
    key.ssl = call.ssl;
    if (x.fed) {
        /* reported at entry: only remember what is still owed */
        if (len >= x.num) {
            bpf_map_delete_elem(&ssl_owed, &key);
        } else {
            struct kspan_ssl_owed o = {};
            o.buf = (__u64)call.buf + len;
            o.num = x.num - len;
            bpf_map_update_elem(&ssl_owed, &key, &o, BPF_ANY);
        }
        if (call.sk) {
            __u64 *known = bpf_map_lookup_elem(&ssl_sk, &key);
            if (!known || *known != call.sk)
                bpf_map_update_elem(&ssl_sk, &key, &call.sk, BPF_ANY);
        }
        return 0;
    }
    if (len == 0)
        return 0;

    __u64 sk = call.sk;
    if (sk) {
        __u64 *known = bpf_map_lookup_elem(&ssl_sk, &key);
        if (!known || *known != sk)
            bpf_map_update_elem(&ssl_sk, &key, &sk, BPF_ANY);
    } else {
        sk = kspan_ssl_known_sk(&key, id);
    }
    if (!sk) {
        /* no socket known for this SSL* (a memory BIO, or a socket never seen by the socket path) */
        kspan_count(KSPAN_CNT_UNPARSED_BYTES, len);
        return 0;
    }
    __u64 now = bpf_ktime_get_ns();
    /* a read's bytes arrived at its return: a blocking SSL_read's entry says nothing about them.
     * Last: the feed tail-calls the state machine and does not return. */
    kspan_ssl_feed(ctx, id, sk, dir, call.buf, len, dir == KSPAN_DIR_EGRESS ? call.start_ns : now, now);
    return 0;
}

SEC("uprobe")
int kspan_ssl_write_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, 0, KSPAN_DIR_EGRESS); }
SEC("uprobe")
int kspan_ssl_read_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, 0, KSPAN_DIR_INGRESS); }
SEC("uprobe")
int kspan_ssl_write_ex_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, PT_REGS_PARM4(ctx), KSPAN_DIR_EGRESS); }
SEC("uprobe")
int kspan_ssl_read_ex_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, PT_REGS_PARM4(ctx), KSPAN_DIR_INGRESS); }
SEC("uretprobe")
int kspan_ssl_write_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_EGRESS, 0); }
SEC("uretprobe")
int kspan_ssl_read_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_INGRESS, 0); }
SEC("uretprobe")
int kspan_ssl_write_ex_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_EGRESS, 1); }
SEC("uretprobe")
int kspan_ssl_read_ex_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_INGRESS, 1); }

/* SSL_set_fd(ssl, fd): nginx and CPython bind the SSL* to its socket this way. */
SEC("uprobe")
int kspan_ssl_set_fd(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_ssl_key key = {};
    key.tgid = id >> 32;
    key.ssl = PT_REGS_PARM1(ctx);
    __u32 fd = (__u32)PT_REGS_PARM2(ctx);
    bpf_map_update_elem(&ssl_fd, &key, &fd, BPF_ANY);
    bpf_map_delete_elem(&ssl_sk, &key);  /* a reused SSL* on a new socket */
    return 0;
}
