/* Connection addresses and lifecycle, and TCP-level events for network metrics.
 *
 * sock:inet_sock_set_state carries the socket address and its 4-tuple on every TCP state change:
 * it feeds the tuple map (no kernel struct reads), ends exchanges on close and reports failed
 * connects. With kspan_network_events, retransmits and resets become struct kspan_tcp records
 * (RTT samples come from the state machine: kspan_rtt_sample in http_exchange.h).
 *
 * Programs (all attached by their SEC()):
 *   kspan_inet_sock_set_state  tp/sock/inet_sock_set_state  (always needed)
 *   kspan_tcp_destroy_sock     tp/tcp/tcp_destroy_sock      (always needed: see kspan_conn_done)
 *   kspan_tcp_retransmit       tp/tcp/tcp_retransmit_skb    \
 *   kspan_tcp_receive_reset    tp/tcp/tcp_receive_reset      | network events only: they return at
 *   kspan_tcp_send_reset       tp/tcp/tcp_send_reset        /  once without kspan_network_events,
 *                                                              the loader may leave them unloaded
 * (No tcp:tcp_probe: it ran on every segment every TCP connection received, for RTT samples the
 * state machine now takes when the traced process transfers, kspan_rtt_sample.)
 *
 * Tracepoint records are kernel structs too: every field is relocated against the running
 * kernel's BTF (struct trace_event_raw_<class>), and records that changed shape are told apart
 * with bpf_core_type_exists / bpf_core_field_exists.
 */
#include "http_exchange.h"

char LICENSE[] SEC("license") = "GPL";

#define KSPAN_TCP_ESTABLISHED 1
#define KSPAN_TCP_SYN_SENT 2
#define KSPAN_TCP_SYN_RECV 3
#define KSPAN_TCP_CLOSE 7
#define KSPAN_TCP_LISTEN 10

/* The record of tcp_retransmit_skb and (before it got its own record) tcp_send_reset, shared as
 * the event class tcp_event_sk_skb; current kernels dropped the class (vmlinux.h here has no such
 * struct, so this is its definition). `family` exists from 5.13. */
struct trace_event_raw_tcp_event_sk_skb {
    struct trace_entry ent;
    const void *skbaddr;
    const void *skaddr;
    int state;
    __u16 sport;
    __u16 dport;
    __u16 family;
    __u8 saddr[4];
    __u8 daddr[4];
    __u8 saddr_v6[16];
    __u8 daddr_v6[16];
} __attribute__((preserve_access_index));

/* Workload selection for events that fire in softirq context, where the current task is whoever
 * the interrupt landed on: the socket's own cgroup (its creator's; an accepted socket inherits
 * the listener's) decides. A kernel without sock_cgroup_data.cgroup (before 5.15) or a socket
 * without it falls to the default verdict. */
static __always_inline int kspan_sk_cgroup_skipped(__u64 sk)
{
    if (!kspan_filter_cgroups)
        return 0;
    __u64 id = 0;
    if (bpf_core_field_exists(((struct sock *)0)->sk_cgrp_data.cgroup)) {
        struct cgroup *cg = BPF_CORE_READ((struct sock *)sk, sk_cgrp_data.cgroup);
        if (cg)
            id = BPF_CORE_READ(cg, kn, id);
    }
    if (!id)
        return !kspan_cgroup_default_trace;
    return kspan_cgroup_id_skipped(id);
}

/* The process that owns a socket, for events that fire in softirq context; 0 if unknown.
 * Returns -1 when filters say the event must not be reported. */
static __always_inline int kspan_tcp_owner(__u64 sk, __u16 lport, __u16 rport)
{
    __u32 pid = 0;
    struct kspan_tuple *t = bpf_map_lookup_elem(&tuples, &sk);
    if (t)
        pid = t->pid;
    if (pid && pid == kspan_self_pid)
        return -1;
    if (kspan_filter_pids && (!pid || !bpf_map_lookup_elem(&allowed_pids, &pid)))
        return -1;
    if (kspan_filter_ports && !bpf_map_lookup_elem(&allowed_ports, &lport) &&
        !bpf_map_lookup_elem(&allowed_ports, &rport))
        return -1;
    if (kspan_sk_cgroup_skipped(sk)) {
        kspan_count(KSPAN_CNT_CGROUP_SKIPPED, 1);
        return -1;
    }
    return pid;
}

static __always_inline void kspan_tcp_emit(__u32 event, int pid, __u64 sk, __u16 family, __u16 lport,
                                           __u16 rport, const __u8 *laddr, const __u8 *raddr, __u32 value)
{
    struct kspan_tcp r = {};
    r.type = KSPAN_REC_TCP;
    r.pid = pid;
    r.event = event;
    r.value = value;
    r.ts_ns = bpf_ktime_get_ns();
    r.conn_id = sk;
    r.family = family;
    r.local_port = lport;
    r.remote_port = rport;
    if (family == KSPAN_AF_INET) {
        bpf_probe_read_kernel(r.local_addr, 4, laddr);
        bpf_probe_read_kernel(r.remote_addr, 4, raddr);
    } else {
        bpf_probe_read_kernel(r.local_addr, 16, laddr);
        bpf_probe_read_kernel(r.remote_addr, 16, raddr);
    }
    if (bpf_ringbuf_output(&events, &r, sizeof(r), BPF_RB_NO_WAKEUP) == 0)
        kspan_count(KSPAN_CNT_TCP_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
}

/* An event with the tcp_event_sk / tcp_event_sk_skb address fields. Without `family` (before
 * 5.13) the IPv6 fields are used: the tracepoints store an IPv4 socket's addresses there
 * v4-mapped. */
#define KSPAN_TCP_EMIT_SK(event, ctx)                                                             \
    do {                                                                                          \
        __u64 sk_ = (__u64)(ctx)->skaddr;                                                         \
        __u16 sport_ = (ctx)->sport, dport_ = (ctx)->dport;                                       \
        int pid_ = kspan_tcp_owner(sk_, sport_, dport_);                                          \
        if (pid_ < 0)                                                                             \
            break;                                                                                \
        __u16 family_ = bpf_core_field_exists((ctx)->family) ? (ctx)->family : KSPAN_AF_INET6;    \
        if (family_ == KSPAN_AF_INET)                                                             \
            kspan_tcp_emit(event, pid_, sk_, family_, sport_, dport_, (ctx)->saddr, (ctx)->daddr, 0); \
        else                                                                                      \
            kspan_tcp_emit(event, pid_, sk_, family_, sport_, dport_, (ctx)->saddr_v6,            \
                           (ctx)->daddr_v6, 0);                                                   \
    } while (0)

/* The connection's end: what is open on it is emitted, and its tuple and TLS mark go. */
static __always_inline void kspan_conn_done(void *ctx, __u64 sk)
{
    kspan_on_close(ctx, sk);
    bpf_map_delete_elem(&tuples, &sk);
    bpf_map_delete_elem(&tls_conns, &sk);
}

SEC("tp/tcp/tcp_destroy_sock")
int kspan_tcp_destroy_sock(struct trace_event_raw_tcp_event_sk *ctx)
{
    kspan_conn_done(ctx, (__u64)ctx->skaddr);
    return 0;
}

SEC("tp/sock/inet_sock_set_state")
int kspan_inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
    if (ctx->protocol != KSPAN_IPPROTO_TCP)
        return 0;
    __u64 sk = (__u64)ctx->skaddr;
    int ns = ctx->newstate;
    __u16 family = ctx->family;
    if (ns == KSPAN_TCP_CLOSE) {
        if (kspan_network_events) {
            if (ctx->oldstate == KSPAN_TCP_SYN_SENT) {
                int pid = kspan_tcp_owner(sk, ctx->sport, ctx->dport);
                if (pid >= 0) {
                    if (family == KSPAN_AF_INET)
                        kspan_tcp_emit(KSPAN_TCP_CONNECT_FAILED, pid, sk, family, ctx->sport, ctx->dport,
                                       ctx->saddr, ctx->daddr, 0);
                    else
                        kspan_tcp_emit(KSPAN_TCP_CONNECT_FAILED, pid, sk, family, ctx->sport, ctx->dport,
                                       ctx->saddr_v6, ctx->daddr_v6, 0);
                }
            }
        }
        /* TCP_CLOSE also comes while the process still holds the socket: an RST, or the peer's
         * FIN after the process's own shutdown(SHUT_WR). Data queued before it is still read
         * then, so the connection ends only once the socket is orphaned (closed by the process);
         * otherwise when it is destroyed. */
        if (!BPF_CORE_READ((struct sock *)sk, sk_socket))
            kspan_conn_done(ctx, sk);
        return 0;
    }
    if (ns != KSPAN_TCP_ESTABLISHED && ns != KSPAN_TCP_SYN_SENT && ns != KSPAN_TCP_SYN_RECV)
        return 0;
    struct kspan_tuple t = {};
    struct kspan_tuple *old = bpf_map_lookup_elem(&tuples, &sk);
    if (old)
        t.pid = old->pid;
    if (ns == KSPAN_TCP_SYN_SENT)
        t.pid = bpf_get_current_pid_tgid() >> 32;  /* connect() runs in the owner's context */
    t.family = family;
    t.local_port = ctx->sport;   /* the tracepoint already converted to host order */
    t.remote_port = ctx->dport;
    if (family == KSPAN_AF_INET) {
        bpf_probe_read_kernel(t.local_addr, 4, ctx->saddr);
        bpf_probe_read_kernel(t.remote_addr, 4, ctx->daddr);
    } else {
        bpf_probe_read_kernel(t.local_addr, 16, ctx->saddr_v6);
        bpf_probe_read_kernel(t.remote_addr, 16, ctx->daddr_v6);
    }
    bpf_map_update_elem(&tuples, &sk, &t, BPF_ANY);
    return 0;
}

/* tcp_retransmit_skb has its own record (with `err`) on current kernels, the tcp_event_sk_skb
 * class's before; the fields read here are the same in both. */
SEC("tp/tcp/tcp_retransmit_skb")
int kspan_tcp_retransmit(void *raw)
{
    if (!kspan_network_events)
        return 0;
    if (bpf_core_type_exists(struct trace_event_raw_tcp_retransmit_skb)) {
        struct trace_event_raw_tcp_retransmit_skb *ctx = raw;
        KSPAN_TCP_EMIT_SK(KSPAN_TCP_RETRANSMIT, ctx);
    } else {
        struct trace_event_raw_tcp_event_sk_skb *ctx = raw;
        KSPAN_TCP_EMIT_SK(KSPAN_TCP_RETRANSMIT, ctx);
    }
    return 0;
}

SEC("tp/tcp/tcp_receive_reset")
int kspan_tcp_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
    if (!kspan_network_events)
        return 0;
    KSPAN_TCP_EMIT_SK(KSPAN_TCP_RESET_RECEIVED, ctx);
    return 0;
}

/* tcp_send_reset (own record) carries the addresses as struct sockaddr_in /
 * sockaddr_in6 in a byte array: the UAPI layout below, which never changes. */
struct kspan_sockaddr {
    __u16 family;
    __u16 port;           /* network order */
    __u32 v4_or_flowinfo;
    __u8 v6[16];
};

static __always_inline void kspan_tcp_emit_sa(__u32 event, __u64 sk, const void *src, const void *dst,
                                              __u32 value)
{
    struct kspan_sockaddr s = {}, d = {};
    bpf_probe_read_kernel(&s, sizeof(s), src);
    bpf_probe_read_kernel(&d, sizeof(d), dst);
    __u16 lport = (s.port >> 8) | (s.port << 8);
    __u16 rport = (d.port >> 8) | (d.port << 8);
    int pid = kspan_tcp_owner(sk, lport, rport);
    if (pid < 0)
        return;
    if (s.family == KSPAN_AF_INET)
        kspan_tcp_emit(event, pid, sk, s.family, lport, rport, (const __u8 *)src + 4, (const __u8 *)dst + 4,
                       value);
    else if (s.family == KSPAN_AF_INET6)
        kspan_tcp_emit(event, pid, sk, s.family, lport, rport, (const __u8 *)src + 8, (const __u8 *)dst + 8,
                       value);
}

/* tcp_send_reset's record changed: on current kernels (after 6.8) it is its own (struct trace_event_raw_tcp_send_reset:
 * addresses as sockaddr bytes, a `reason`, and sk may be NULL for a reset answering a segment no
 * socket owns); before, it was the tcp_event_sk_skb class's. */
SEC("tp/tcp/tcp_send_reset")
int kspan_tcp_send_reset(void *raw)
{
    if (!kspan_network_events)
        return 0;
    if (bpf_core_type_exists(struct trace_event_raw_tcp_send_reset)) {
        struct trace_event_raw_tcp_send_reset *ctx = raw;
        kspan_tcp_emit_sa(KSPAN_TCP_RESET_SENT, (__u64)ctx->skaddr, ctx->saddr, ctx->daddr, 0);
    } else {
        struct trace_event_raw_tcp_event_sk_skb *ctx = raw;
        KSPAN_TCP_EMIT_SK(KSPAN_TCP_RESET_SENT, ctx);
    }
    return 0;
}

