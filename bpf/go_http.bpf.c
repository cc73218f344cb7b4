/* Go goroutine parentage: which server exchange a client call belongs to.
 *
 * Threads say nothing in Go: a handler runs on whatever thread its goroutine is scheduled on, and
 * an outgoing request's bytes are written by the transport's writeLoop goroutine, not the caller.
 * So:
 * - net/http.serverHandler.ServeHTTP entry: the goroutine now serves the connection behind its
 *   *response (go_serving[goid] = server sock); its RETs end that.
 * - runtime.newproc1: a goroutine created by a serving goroutine (or its descendant) inherits it.
 * - net/http.(*persistConn).roundTrip entry, on the calling goroutine: if it serves a connection,
 *   the client connection this call will use gets a parent: the server connection's exchange in
 *   progress (go_client_parent[client sock], declared in http_exchange.h), which
 *   kspan_begin_request() takes as a GOROUTINE hint when the request starts on that connection.
 *
 * Registers are Go's ABI, read from struct pt_regs directly (see go_common.h). The *_ret programs
 * go on every RET instruction as plain uprobes (Go moves stacks: no uretprobes), and all programs
 * are attached by file offset by tracer/uprobes.py, so SEC() names no target. go_procs and
 * go_probe_offsets are shared with go_tls.bpf.c (go_common.h).
 */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"
#include "http_exchange.h"
#include "go_common.h"

char LICENSE[] SEC("license") = "GPL";

struct kspan_go_serving {
    __u64 server_sk;
};

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct kspan_go_key);
    __type(value, struct kspan_go_serving);
} go_serving SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u64);
    __type(value, __u64);
} go_newproc SEC(".maps"); /* pid_tgid -> callergp of a runtime.newproc1 in progress */

SEC("uprobe")
int kspan_go_serve_enter(struct pt_regs *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !(o->flags & KSPAN_GO_HTTP))
        return 0;
    /* serverHandler{srv} in RAX; rw ResponseWriter in RBX (itab) / RCX (data: *response); req in RDI */
    __u64 conn = 0;
    if (bpf_probe_read_user(&conn, sizeof(conn), (const void *)(ctx->cx + o->response_conn)) || !conn)
        return 0;
    __u64 rwc = kspan_go_iface_data(conn + o->conn_rwc);
    __u64 tls_state = 0;
    bpf_probe_read_user(&tls_state, sizeof(tls_state), (const void *)(conn + o->conn_tls_state));
    __u64 sk = tls_state ? kspan_go_tls_sk(tgid, rwc, o) : kspan_go_tcpconn_sk(tgid, rwc, o);
    if (!sk)
        return 0;
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    struct kspan_go_serving s = {};
    s.server_sk = sk;
    bpf_map_update_elem(&go_serving, &key, &s, BPF_ANY);
    return 0;
}

SEC("uprobe") /* on each RET */
int kspan_go_serve_ret(struct pt_regs *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o)
        return 0;
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    bpf_map_delete_elem(&go_serving, &key);
    return 0;
}

/* runtime.newproc1(fn *funcval, callergp *g, callerpc uintptr, ...) *g runs on the system stack
 * and never blocks, so the thread id pairs its entry with its return. */
SEC("uprobe")
int kspan_go_newproc_enter(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !(o->flags & KSPAN_GO_HTTP))
        return 0;
    __u64 callergp = ctx->bx;
    bpf_map_update_elem(&go_newproc, &id, &callergp, BPF_ANY);
    return 0;
}

SEC("uprobe") /* on each RET */
int kspan_go_newproc_ret(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u64 *gp = bpf_map_lookup_elem(&go_newproc, &id);
    if (!gp)
        return 0;
    __u64 callergp = *gp;
    bpf_map_delete_elem(&go_newproc, &id);
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !callergp)
        return 0;
    struct kspan_go_key parent = {};
    parent.tgid = tgid;
    if (bpf_probe_read_user(&parent.goid, sizeof(parent.goid), (const void *)(callergp + o->g_goid)))
        return 0;
    struct kspan_go_serving *s = bpf_map_lookup_elem(&go_serving, &parent);
    if (!s)
        return 0;
    struct kspan_go_serving copy = *s;
    struct kspan_go_key child = {};
    child.tgid = tgid;
    __u64 newg = ctx->ax;
    if (!newg || bpf_probe_read_user(&child.goid, sizeof(child.goid), (const void *)(newg + o->g_goid)))
        return 0;
    bpf_map_update_elem(&go_serving, &child, &copy, BPF_ANY);
    return 0;
}

/* net/http.(*persistConn).roundTrip(pc *persistConn, req *transportRequest): pc in RAX. */
SEC("uprobe")
int kspan_go_roundtrip_enter(struct pt_regs *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !(o->flags & KSPAN_GO_HTTP))
        return 0;
    __u64 pc = ctx->ax;
    __u64 conn = kspan_go_iface_data(pc + o->pc_conn);
    __u64 tls_state = 0;
    bpf_probe_read_user(&tls_state, sizeof(tls_state), (const void *)(pc + o->pc_tls_state));
    __u64 client_sk = tls_state ? kspan_go_tls_sk(tgid, conn, o) : kspan_go_tcpconn_sk(tgid, conn, o);
    if (!client_sk)
        return 0;  /* a new plaintext connection: the socket path has not seen its fd yet */
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    struct kspan_go_serving *s = bpf_map_lookup_elem(&go_serving, &key);
    struct kspan_conn *srv = 0;
    __u64 server_sk = 0;
    if (s) {
        server_sk = s->server_sk;
        srv = bpf_map_lookup_elem(&conns, &server_sk);
    }
    if (!srv || srv->phase == KSPAN_PH_IDLE || srv->phase == KSPAN_PH_PREFIX || srv->ex.role != KSPAN_ROLE_SERVER) {
        /* not serving (or the server exchange already ended: a late goroutine has no parent to
         * name); a hint left by an earlier call whose request never went out must not apply */
        bpf_map_delete_elem(&go_client_parent, &client_sk);
        return 0;
    }
    struct kspan_exchange_ref ref = {};
    ref.conn_id = server_sk;
    ref.req_start_ns = srv->ex.req_start_ns;
    ref.pid = tgid;
    bpf_map_update_elem(&go_client_parent, &client_sk, &ref, BPF_ANY);
    struct kspan_gate *g = kspan_gate();
    if (g && !g->go_seen)
        g->go_seen = 1;  /* from now on kspan_client_decide looks go_client_parent up */
    return 0;
}
