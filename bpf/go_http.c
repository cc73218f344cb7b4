/* Go goroutine parentage: which server exchange a client call belongs to (needs go_tls.c first).
 *
 * Threads say nothing in Go: a handler runs on whatever thread its goroutine is scheduled on, and
 * an outgoing request's bytes are written by the transport's writeLoop goroutine, not the caller.
 * So:
 * - net/http.serverHandler.ServeHTTP entry: the goroutine now serves the connection behind its
 *   *response (go_serving[goid] = server sock); its RETs end that.
 * - runtime.newproc1: a goroutine created by a serving goroutine (or its descendant) inherits it.
 * - net/http.(*persistConn).roundTrip entry, on the calling goroutine: if it serves a connection,
 *   the client connection this call will use gets a parent: the server connection's exchange in
 *   progress (go_client_parent[client sock]), which kspan_begin_request() in http_exchange.h takes
 *   as a GOROUTINE hint when the request starts on that connection.
 */

struct kspan_go_serving {
    __u64 server_sk;
};

BPF_TABLE("lru_hash", struct kspan_go_key, struct kspan_go_serving, go_serving, 65536);
/* client sock -> the server exchange that issued the call on it; read by kspan_begin_request().
 * http_exchange.h declares it (and defines KSPAN_HAVE_GO_CLIENT_PARENT) once it reads it. */
#ifndef KSPAN_HAVE_GO_CLIENT_PARENT
BPF_TABLE("lru_hash", __u64, struct kspan_exchange_ref, go_client_parent, 16384);
#endif
BPF_HASH(go_newproc, __u64, __u64, 16384); /* pid_tgid -> callergp of a runtime.newproc1 in progress */

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
    go_serving.update(&key, &s);
    return 0;
}

int kspan_go_serve_ret(struct pt_regs *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o)
        return 0;
    struct kspan_go_key key = {};
    key.tgid = tgid;
    key.goid = kspan_go_goid(ctx, o);
    go_serving.delete(&key);
    return 0;
}

/* runtime.newproc1(fn *funcval, callergp *g, callerpc uintptr, ...) *g runs on the system stack
 * and never blocks, so the thread id pairs its entry with its return. */
int kspan_go_newproc_enter(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !(o->flags & KSPAN_GO_HTTP))
        return 0;
    __u64 callergp = ctx->bx;
    go_newproc.update(&id, &callergp);
    return 0;
}

int kspan_go_newproc_ret(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u64 *gp = go_newproc.lookup(&id);
    if (!gp)
        return 0;
    __u64 callergp = *gp;
    go_newproc.delete(&id);
    __u32 tgid = id >> 32;
    struct kspan_go_offsets *o = kspan_go_offsets_of(ctx, tgid);
    if (!o || !callergp)
        return 0;
    struct kspan_go_key parent = {};
    parent.tgid = tgid;
    if (bpf_probe_read_user(&parent.goid, sizeof(parent.goid), (const void *)(callergp + o->g_goid)))
        return 0;
    struct kspan_go_serving *s = go_serving.lookup(&parent);
    if (!s)
        return 0;
    struct kspan_go_serving copy = *s;
    struct kspan_go_key child = {};
    child.tgid = tgid;
    __u64 newg = ctx->ax;
    if (!newg || bpf_probe_read_user(&child.goid, sizeof(child.goid), (const void *)(newg + o->g_goid)))
        return 0;
    go_serving.update(&child, &copy);
    return 0;
}

/* net/http.(*persistConn).roundTrip(pc *persistConn, req *transportRequest): pc in RAX. */
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
    struct kspan_go_serving *s = go_serving.lookup(&key);
    struct kspan_conn *srv = 0;
    __u64 server_sk = 0;
    if (s) {
        server_sk = s->server_sk;
        srv = conns.lookup(&server_sk);
    }
    if (!srv || srv->phase == KSPAN_PH_IDLE || srv->ex.role != KSPAN_ROLE_SERVER) {
        /* not serving (or the server exchange already ended: a late goroutine has no parent to
         * name); a hint left by an earlier call whose request never went out must not apply */
        go_client_parent.delete(&client_sk);
        return 0;
    }
    struct kspan_exchange_ref ref = {};
    ref.conn_id = server_sk;
    ref.req_start_ns = srv->ex.req_start_ns;
    ref.pid = tgid;
    go_client_parent.update(&client_sk, &ref);
    return 0;
}
