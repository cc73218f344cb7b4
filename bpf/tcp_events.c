/* Connection addresses and lifecycle, and TCP-level events for network metrics.
 *
 * sock:inet_sock_set_state carries the socket address and its 4-tuple on every TCP state change:
 * it feeds the tuple map (no kernel struct reads), ends exchanges on close and reports failed
 * connects. With -DKSPAN_NETWORK_EVENTS, retransmits, resets and sampled RTTs become
 * struct kspan_tcp records.
 */

#define KSPAN_TCP_ESTABLISHED 1
#define KSPAN_TCP_SYN_SENT 2
#define KSPAN_TCP_SYN_RECV 3
#define KSPAN_TCP_CLOSE 7
#define KSPAN_TCP_LISTEN 10

#ifdef KSPAN_NETWORK_EVENTS
BPF_TABLE("lru_hash", __u64, __u64, rtt_last, KSPAN_MAX_CONNS); /* sk -> last RTT sample time */

/* The process that owns a socket, for events that fire in softirq context; 0 if unknown.
 * Returns -1 when filters say the event must not be reported. */
static __always_inline int kspan_tcp_owner(__u64 sk, __u16 lport, __u16 rport)
{
    __u32 pid = 0;
    struct kspan_tuple *t = tuples.lookup(&sk);
    if (t)
        pid = t->pid;
    if (pid && pid == KSPAN_SELF_PID)
        return -1;
#ifdef KSPAN_FILTER_PIDS
    if (!pid || !allowed_pids.lookup(&pid))
        return -1;
#endif
#ifdef KSPAN_FILTER_PORTS
    if (!allowed_ports.lookup(&lport) && !allowed_ports.lookup(&rport))
        return -1;
#endif
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
    if (events.ringbuf_output(&r, sizeof(r), 0) == 0)
        kspan_count(KSPAN_CNT_TCP_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
}
#endif

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != KSPAN_IPPROTO_TCP)
        return 0;
    __u64 sk = (__u64)args->skaddr;
    int ns = args->newstate;
    if (ns == KSPAN_TCP_CLOSE) {
#ifdef KSPAN_NETWORK_EVENTS
        if (args->oldstate == KSPAN_TCP_SYN_SENT) {
            int pid = kspan_tcp_owner(sk, args->sport, args->dport);
            if (pid >= 0) {
                if (args->family == KSPAN_AF_INET)
                    kspan_tcp_emit(KSPAN_TCP_CONNECT_FAILED, pid, sk, args->family, args->sport, args->dport,
                                   args->saddr, args->daddr, 0);
                else
                    kspan_tcp_emit(KSPAN_TCP_CONNECT_FAILED, pid, sk, args->family, args->sport, args->dport,
                                   args->saddr_v6, args->daddr_v6, 0);
            }
        }
        rtt_last.delete(&sk);
#endif
        kspan_on_close(args, sk);
        tuples.delete(&sk);
        tls_conns.delete(&sk);
        return 0;
    }
    if (ns != KSPAN_TCP_ESTABLISHED && ns != KSPAN_TCP_SYN_SENT && ns != KSPAN_TCP_SYN_RECV)
        return 0;
    struct kspan_tuple t = {};
    struct kspan_tuple *old = tuples.lookup(&sk);
    if (old)
        t.pid = old->pid;
    if (ns == KSPAN_TCP_SYN_SENT)
        t.pid = bpf_get_current_pid_tgid() >> 32;  /* connect() runs in the owner's context */
    t.family = args->family;
    t.local_port = args->sport;   /* the tracepoint already converted to host order */
    t.remote_port = args->dport;
    if (args->family == KSPAN_AF_INET) {
        bpf_probe_read_kernel(t.local_addr, 4, args->saddr);
        bpf_probe_read_kernel(t.remote_addr, 4, args->daddr);
    } else {
        bpf_probe_read_kernel(t.local_addr, 16, args->saddr_v6);
        bpf_probe_read_kernel(t.remote_addr, 16, args->daddr_v6);
    }
    tuples.update(&sk, &t);
    return 0;
}

#ifdef KSPAN_NETWORK_EVENTS
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    __u64 sk = (__u64)args->skaddr;
    int pid = kspan_tcp_owner(sk, args->sport, args->dport);
    if (pid < 0)
        return 0;
    if (args->family == KSPAN_AF_INET)
        kspan_tcp_emit(KSPAN_TCP_RETRANSMIT, pid, sk, args->family, args->sport, args->dport, args->saddr,
                       args->daddr, 0);
    else
        kspan_tcp_emit(KSPAN_TCP_RETRANSMIT, pid, sk, args->family, args->sport, args->dport, args->saddr_v6,
                       args->daddr_v6, 0);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    __u64 sk = (__u64)args->skaddr;
    int pid = kspan_tcp_owner(sk, args->sport, args->dport);
    if (pid < 0)
        return 0;
    if (args->family == KSPAN_AF_INET)
        kspan_tcp_emit(KSPAN_TCP_RESET_RECEIVED, pid, sk, args->family, args->sport, args->dport, args->saddr,
                       args->daddr, 0);
    else
        kspan_tcp_emit(KSPAN_TCP_RESET_RECEIVED, pid, sk, args->family, args->sport, args->dport,
                       args->saddr_v6, args->daddr_v6, 0);
    return 0;
}

/* tcp_send_reset and tcp_probe carry the addresses as struct sockaddr_in / sockaddr_in6. */
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

/* Not TRACEPOINT_PROBE: bcc cannot generate this event's struct (its `enum sk_rst_reason` field
 * has no definition in older headers), so the loader passes the field offsets from tracefs and
 * attaches it by name. */
#ifdef KSPAN_TP_SEND_RESET_SKADDR
int kspan_tcp_send_reset(void *ctx)
{
    __u64 sk = 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), (const char *)ctx + KSPAN_TP_SEND_RESET_SKADDR);
    /* sk is NULL for a reset answering a segment no socket owns */
    kspan_tcp_emit_sa(KSPAN_TCP_RESET_SENT, sk, (const char *)ctx + KSPAN_TP_SEND_RESET_SADDR,
                      (const char *)ctx + KSPAN_TP_SEND_RESET_DADDR, 0);
    return 0;
}
#endif

/* tcp_probe fires on every ACK processed: sample the smoothed RTT at most once per second per
 * connection, and look at the clock before any other map. */
TRACEPOINT_PROBE(tcp, tcp_probe)
{
    __u64 sk = (__u64)args->skaddr;
    __u64 now = bpf_ktime_get_ns();
    __u64 *last = rtt_last.lookup(&sk);
    if (last && now - *last < 1000000000ULL)
        return 0;
    if (last)
        *last = now;
    else
        rtt_last.update(&sk, &now);
    kspan_tcp_emit_sa(KSPAN_TCP_RTT, sk, args->saddr, args->daddr, args->srtt);
    return 0;
}
#endif
