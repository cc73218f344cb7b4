/* Shared by the Go probe families (go_tls.bpf.c, go_http.bpf.c): the per-process field offsets
 * and the pointer walks from a Go value to its struct sock.
 *
 * Both objects declare go_procs and go_probe_offsets from this one definition: the loader makes
 * the later object reuse the earlier one's maps by name, which needs identical definitions.
 *
 * Go ABI (amd64, Go >= 1.17): arguments in RAX, RBX, RCX, RDI, RSI, R8..R11; results in RAX, RBX,
 * ...; the current goroutine (g) in R14. The probes read these straight from struct pt_regs
 * (ctx->ax, ctx->bx, ctx->r14, ...) instead of PT_REGS_PARMn, which follow the C calling
 * convention: at a uprobe, pt_regs holds the user registers as they were at the probed instruction.
 */
#ifndef KSPAN_GO_COMMON_H
#define KSPAN_GO_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"
#include "http_exchange.h"

/* Offsets of the fields the Go probes read, from the binary's DWARF (tracer/go_binary.py).
 * tracer/uprobes.py packs it by the field names and offsets of this struct's BTF. */
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

/* A goroutine may move to another thread while blocked, so in-call state is keyed by goroutine. */
struct kspan_go_key {
    __u32 tgid;
    __u32 _pad;
    __u64 goid;
};

/* tgid -> offsets: one object serves binaries of different Go versions. */
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, __u32);
    __type(value, struct kspan_go_offsets);
} go_procs SEC(".maps");
/* probed instruction address -> offsets, for non-PIE binaries (fixed addresses): a process that
 * starts and makes its first call before user space has handled its exec is still understood. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8192);
    __type(key, __u64);
    __type(value, struct kspan_go_offsets);
} go_probe_offsets SEC(".maps");

static __always_inline struct kspan_go_offsets *kspan_go_offsets_of(struct pt_regs *ctx, __u32 tgid)
{
    struct kspan_go_offsets *o = bpf_map_lookup_elem(&go_procs, &tgid);
    if (o)
        return o;
    __u64 ip = PT_REGS_IP(ctx);
    o = bpf_map_lookup_elem(&go_probe_offsets, &ip);
    if (!o) {
        ip -= 1;  /* the int3 trap may leave IP one past the probed instruction */
        o = bpf_map_lookup_elem(&go_probe_offsets, &ip);
    }
    if (!o)
        return 0;
    struct kspan_go_offsets copy = *o;
    bpf_map_update_elem(&go_procs, &tgid, &copy, BPF_ANY);
    return bpf_map_lookup_elem(&go_procs, &tgid);
}

static __always_inline __u64 kspan_go_goid(struct pt_regs *ctx, struct kspan_go_offsets *o)
{
    __u64 goid = 0;
    bpf_probe_read_user(&goid, sizeof(goid), (const void *)(ctx->r14 + o->g_goid));  /* g in R14 */
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
    __u64 *sk = bpf_map_lookup_elem(&fd_sk, &key);
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

#endif
