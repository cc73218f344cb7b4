/* Go crypto/tls: plaintext of (*Conn).Write and (*Conn).Read, from Go programs (amd64, Go >= 1.17).
 *
 * Go ABI: arguments in RAX, RBX, RCX, RDI, RSI, R8..R11; results in RAX, RBX, ...; the current
 * goroutine (g) in R14 (read from struct pt_regs directly: see go_common.h). Go copies goroutine
 * stacks to grow them, so a uretprobe (which rewrites the return address on the stack) can crash
 * the program: tracer/uprobes.py attaches the *_ret programs as plain uprobes on every RET
 * instruction of the function instead (hence SEC("uprobe") for them too, and no target in SEC():
 * the attacher places every program by file offset). A goroutine may move to another thread while
 * blocked in the call, so the in-call state is keyed by goroutine id, never by thread.
 *
 * The connection comes from the Conn itself: tls.Conn.conn (a net.Conn holding a *net.TCPConn)
 * -> netFD -> poll.FD.Sysfd, then fd_sk (filled by the socket path on the handshake's syscalls)
 * gives the struct sock: the same conn_id the socket path uses, so 4-tuple and peer linking hold.
 * Field offsets differ between Go versions and come per process from user space (go_procs).
 */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"
#include "http_exchange.h"
#include "go_common.h"

char LICENSE[] SEC("license") = "GPL";

struct kspan_go_tls_call {
    const char *buf;
    __u64 start_ns;
    __u64 sk;
};

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, struct kspan_go_key);
    __type(value, struct kspan_go_tls_call);
} go_tls_calls SEC(".maps");

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
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, struct kspan_go_held);
} go_held_byte SEC(".maps"); /* sk -> held byte */

/* crypto/tls plaintext as one transfer for the state machine; Go's int length is clamped to the
 * u32 the state machine counts in. */
static __always_inline void kspan_go_data_args(struct kspan_data_args *a, __u64 id, __u64 sk, __u8 dir,
                                               const char *buf, __s64 len, __u64 start_ns, __u64 end_ns)
{
    a->conn_id = sk;
    a->pid = id >> 32;
    a->tid = (__u32)id;
    a->dir = dir;
    a->source = KSPAN_SRC_GO;
    a->flags = KSPAN_FLAG_TLS;
    a->buf = buf;
    a->len = len > 0x7fffffff ? 0x7fffffff : (__u32)len;
    a->start_ns = start_ns;
    a->end_ns = end_ns;
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
        if (!bpf_map_lookup_elem(&tls_conns, &c.sk))
            kspan_tls_mark(c.sk);
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
        kspan_go_data_args(&a, id, c.sk, KSPAN_DIR_EGRESS, c.buf, len, c.start_ns, c.start_ns);
        /* a tail call into the state machine (bpf/uprobe_exchange.bpf.c): it does not return */
        kspan_on_data_tail(ctx, &a);
        return 0;
    }
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    bpf_map_update_elem(&go_tls_calls, &key, &c, BPF_ANY);
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
    struct kspan_go_tls_call *cp = bpf_map_lookup_elem(&go_tls_calls, &key);
    if (!cp)
        return 0;
    struct kspan_go_tls_call c = *cp;
    bpf_map_delete_elem(&go_tls_calls, &key);
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
        struct kspan_go_held *h = bpf_map_lookup_elem(&go_held_byte, &c.sk);
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
            bpf_map_delete_elem(&go_held_byte, &c.sk);
        } else if (n == 1) {
            /* between exchanges, or while this server's response is still being written: the
             * background read can return before the handler's last Write has returned */
            struct kspan_conn *st = bpf_map_lookup_elem(&conns, &c.sk);
            if (!st || st->phase == KSPAN_PH_IDLE ||
                (st->phase == KSPAN_PH_RESP && st->req_dir == KSPAN_DIR_INGRESS)) {
                struct kspan_go_held nh = {};
                nh.ts = now;
                bpf_probe_read_user(&nh.byte, 1, c.buf);
                bpf_map_update_elem(&go_held_byte, &c.sk, &nh, BPF_ANY);
                return 0;
            }
        }
    }
    struct kspan_data_args a = {};
    kspan_go_data_args(&a, id, c.sk, dir, c.buf, n, start, now);
    /* one run of the state machine per call, and last (a tail call does not return): a held byte
     * is joined to this read above (buf - 1, n + 1), its map entry already deleted */
    kspan_on_data_tail(ctx, &a);
    return 0;
}

SEC("uprobe")
int kspan_go_tls_write_enter(struct pt_regs *ctx) { return kspan_go_tls_enter(ctx, KSPAN_DIR_EGRESS); }
SEC("uprobe")
int kspan_go_tls_read_enter(struct pt_regs *ctx) { return kspan_go_tls_enter(ctx, KSPAN_DIR_INGRESS); }
/* on each RET of (*Conn).Read: a plain uprobe, never a uretprobe */
SEC("uprobe")
int kspan_go_tls_read_ret(struct pt_regs *ctx) { return kspan_go_tls_ret(ctx, KSPAN_DIR_INGRESS); }
