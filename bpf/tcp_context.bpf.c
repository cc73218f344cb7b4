/* Cross-host trace context in a TCP header option (kind 25), written and read by one sock_ops
 * program attached to the cgroup v2 root through a bpf_link (tracer/capture.py).
 *
 * Sender: the exchange machine stores a client request's context in ctx_out (keyed by the client
 * socket's local/remote addresses) before the request's bytes are queued. This program writes it
 * into the option of the segment that carries the request's first byte, and again on that
 * segment's retransmits until the byte is acknowledged. A keep-alive connection's next request
 * replaces the entry, so each request carries its own.
 *
 * Receiver: an option read at ingress goes into ctx_in, keyed by the receiving socket's
 * local/remote, with the TCP sequence number of the segment that carried it (both ends see the
 * same numbers): the server side makes it the parent of the request those bytes start.
 *
 * Wire format (27 bytes; the kernel pads to 28 with a NOP): kind 25, length 27, W3C trace-flags,
 * trace id (16 bytes), the client span's id (8 bytes, big-endian). On a data segment of an
 * established connection only timestamps (12 bytes with padding) precede it: 12 + 28 = 40, the
 * whole option space. Segments that also carry SACK blocks, MD5 or TCP-AO have no room: counted
 * (context_options_no_room) and sent without.
 *
 * A peer without kspan never asked to parse: its stack skips an unknown option by its length.
 *
 * Program (attached to a cgroup, not by SEC()): kspan_tcp_context  sockops
 */
#include "http_exchange.h"
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define KSPAN_CTX_OPT_KIND 25
#define KSPAN_CTX_OPT_LEN 27
#define KSPAN_TCPHDR_SYN 0x02

/* struct kspan_trace_ctx.state in ctx_out. */
#define KSPAN_CTX_PENDING 0  /* not yet on a segment */
#define KSPAN_CTX_SENT 1     /* written on the segment with the request's first byte (seq) */
#define KSPAN_CTX_NO_ROOM 2  /* that segment had no option space: the request goes without */

#define KSPAN_ENOSPC 28
#define KSPAN_ENOMSG 42

/* The only settable callback flags this program asks for. */
#define KSPAN_CB_WRITE BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
#define KSPAN_CB_PARSE BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG

struct kspan_ctx_opt {
    __u8 kind;
    __u8 len;
    __u8 flags;
    __u8 trace_id[16];
    __u8 span_id[8];
} __attribute__((packed));

_Static_assert(sizeof(struct kspan_ctx_opt) == KSPAN_CTX_OPT_LEN, "option layout");

/* Serial-number arithmetic (RFC 1982): a is at or after b. */
static __always_inline int kspan_seq_ge(__u32 a, __u32 b)
{
    return (__s32)(a - b) >= 0;
}

/* The connection as this socket sees it, in the form the exchange machine keys it by. */
static __always_inline int kspan_skops_key(struct bpf_sock_ops *skops, struct kspan_conn_key *k)
{
    __u32 family = skops->family;
    if (family == KSPAN_AF_INET) {
        __u32 l = skops->local_ip4, r = skops->remote_ip4; /* network order: address bytes */
        k->local_addr[10] = 0xff;
        k->local_addr[11] = 0xff;
        k->remote_addr[10] = 0xff;
        k->remote_addr[11] = 0xff;
        __builtin_memcpy(&k->local_addr[12], &l, 4);
        __builtin_memcpy(&k->remote_addr[12], &r, 4);
    } else if (family == KSPAN_AF_INET6) {
        /* One read per word, at a constant offset: the verifier refuses a ctx pointer that a
         * loop advanced. */
        __u32 l[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3]};
        __u32 r[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3]};
        __builtin_memcpy(k->local_addr, l, 16);
        __builtin_memcpy(k->remote_addr, r, 16);
    } else {
        return -1;
    }
    k->local_port = (__u16)skops->local_port;              /* host order */
    k->remote_port = (__u16)bpf_ntohl(skops->remote_port); /* the network-order port, shifted up */
    return 0;
}

static __always_inline int kspan_ports_allowed(struct kspan_conn_key *k)
{
    if (!kspan_filter_ports)
        return 1;
    return bpf_map_lookup_elem(&allowed_ports, &k->local_port) ||
           bpf_map_lookup_elem(&allowed_ports, &k->remote_port);
}

/* Whether a segment may have to carry this context: the request's first byte is not yet sent,
 * or sent and not yet acknowledged (a retransmit of its segment carries the option again). */
static __always_inline int kspan_ctx_pending(struct kspan_trace_ctx *c, __u32 snd_una)
{
    if (c->state == KSPAN_CTX_PENDING)
        return 1;
    return c->state == KSPAN_CTX_SENT && kspan_seq_ge(c->seq, snd_una);
}

static __always_inline void kspan_hdr_opt_len(struct bpf_sock_ops *skops)
{
    int sizing = skops->args[0] == BPF_WRITE_HDR_TCP_CURRENT_MSS;
    if (!sizing && (skops->skb_len == 0 || (skops->skb_tcp_flags & KSPAN_TCPHDR_SYN)))
        return;  /* pure ACK, FIN, SYN: the context goes with the request's bytes (no lookup) */
    /* Until a context is first stored, none can be pending: an untraced client (every client
     * connection has the write callbacks) costs no ctx_out lookup, twice per send, until then. */
    struct kspan_gate *g = kspan_gate();
    if (g && !g->ctx_out_seen)
        return;
    struct kspan_conn_key k = {};
    if (kspan_skops_key(skops, &k))
        return;
    struct kspan_trace_ctx *c = bpf_map_lookup_elem(&ctx_out, &k);
    if (!c || !kspan_ctx_pending(c, skops->snd_una))
        return;
    if (sizing) {
        /* The kernel sizes segments (no skb): leave room while a request is pending, or its
         * segments would be MSS-sized and the option would push them past the path MTU. */
        bpf_reserve_hdr_opt(skops, KSPAN_CTX_OPT_LEN, 0);
        return;
    }
    __u32 len = skops->skb_len; /* payload: the header is not written yet */
    if (c->state == KSPAN_CTX_PENDING && c->seq != 0 && kspan_seq_ge(c->seq, skops->snd_nxt + len))
        return;  /* new data that ends before the request starts (snd_nxt is its first byte) */
    long rc = bpf_reserve_hdr_opt(skops, KSPAN_CTX_OPT_LEN, 0);
    if (rc == -KSPAN_ENOSPC && c->state == KSPAN_CTX_PENDING) {
        c->state = KSPAN_CTX_NO_ROOM;
        kspan_count(KSPAN_CNT_CTX_NO_ROOM, 1);
    }
}

static __always_inline void kspan_write_hdr_opt(struct bpf_sock_ops *skops)
{
    struct kspan_conn_key k = {};
    if (kspan_skops_key(skops, &k))
        return;
    struct kspan_trace_ctx *c = bpf_map_lookup_elem(&ctx_out, &k);
    if (!c)
        return;  /* the space was another program's */
    struct tcphdr *th = (struct tcphdr *)(long)skops->skb_data;
    if ((void *)(th + 1) > (void *)(long)skops->skb_data_end)
        return;
    __u32 seg_seq = bpf_ntohl(th->seq);
    __u32 payload = skops->skb_len - th->doff * 4;
    int write;
    if (c->state == KSPAN_CTX_PENDING)
        /* the first segment that reaches the request's first byte (or any, if it is unknown) */
        write = c->seq == 0 || !kspan_seq_ge(c->seq, seg_seq + payload);
    else if (c->state == KSPAN_CTX_SENT)
        /* a retransmit of the segment that carried it */
        write = kspan_seq_ge(c->seq, seg_seq) && !kspan_seq_ge(c->seq, seg_seq + payload);
    else
        write = 0;
    if (!write)
        return;
    struct kspan_ctx_opt opt = {};
    opt.kind = KSPAN_CTX_OPT_KIND;
    opt.len = KSPAN_CTX_OPT_LEN;
    opt.flags = c->flags;
    __builtin_memcpy(opt.trace_id, c->trace_id, 16);
    __u64 span_be = bpf_cpu_to_be64(c->span_id);
    __builtin_memcpy(opt.span_id, &span_be, 8);
    long rc = bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0);
    if (rc == 0) {
        kspan_count(KSPAN_CNT_CTX_WRITTEN, 1);
        if (c->state == KSPAN_CTX_PENDING) {
            if (c->seq == 0)
                c->seq = seg_seq;
            c->state = KSPAN_CTX_SENT;
        }
    } else if (rc == -KSPAN_ENOSPC && c->state == KSPAN_CTX_PENDING) {
        c->state = KSPAN_CTX_NO_ROOM;
        kspan_count(KSPAN_CNT_CTX_NO_ROOM, 1);
    }
    /* -EEXIST: another kspan on this host wrote the same kind first; nothing to add. */
}

static __always_inline void kspan_parse_hdr_opt(struct bpf_sock_ops *skops)
{
    __u8 buf[40] = {KSPAN_CTX_OPT_KIND};
    long rc = bpf_load_hdr_opt(skops, buf, sizeof(buf), 0);
    if (rc == -KSPAN_ENOMSG)
        return;  /* some other unknown option */
    if (rc != KSPAN_CTX_OPT_LEN || buf[1] != KSPAN_CTX_OPT_LEN) {
        kspan_count(KSPAN_CNT_CTX_MALFORMED, 1);
        return;
    }
    struct kspan_ctx_opt *opt = (struct kspan_ctx_opt *)buf;
    __u64 span_be;
    __builtin_memcpy(&span_be, opt->span_id, 8);
    __u64 span = bpf_be64_to_cpu(span_be);
    __u64 t0, t1;
    __builtin_memcpy(&t0, opt->trace_id, 8);
    __builtin_memcpy(&t1, opt->trace_id + 8, 8);
    if (span == 0 || (t0 | t1) == 0) {
        kspan_count(KSPAN_CNT_CTX_MALFORMED, 1);  /* W3C: all-zero ids are invalid */
        return;
    }
    struct kspan_conn_key k = {};
    if (kspan_skops_key(skops, &k) || !kspan_ports_allowed(&k))
        return;
    __u32 seg_seq = 0;
    struct tcphdr *th = (struct tcphdr *)(long)skops->skb_data;
    if ((void *)(th + 1) <= (void *)(long)skops->skb_data_end)
        seg_seq = bpf_ntohl(th->seq);
    struct kspan_trace_ctx *have = bpf_map_lookup_elem(&ctx_in, &k);
    if (have && have->span_id == span) {
        __u64 h0, h1;
        __builtin_memcpy(&h0, have->trace_id, 8);
        __builtin_memcpy(&h1, have->trace_id + 8, 8);
        if (h0 == t0 && h1 == t1)
            return;  /* the same request again (a retransmit, or each segment of a GSO burst): keep the first seq */
    }
    struct kspan_trace_ctx v = {};
    __builtin_memcpy(v.trace_id, opt->trace_id, 16);
    v.span_id = span;
    v.flags = opt->flags;
    v.seq = seg_seq;
    v.ts_ns = bpf_ktime_get_ns();
    bpf_map_update_elem(&ctx_in, &k, &v, BPF_ANY);
    kspan_count(KSPAN_CNT_CTX_PARSED, 1);
    /* from now on a server request looks for its context in ctx_in (kspan_begin_request) */
    struct kspan_gate *g = kspan_gate();
    if (g && !g->ctx_in_seen)
        g->ctx_in_seen = 1;
}

/* The agent's own client sockets (its exports) never carry a context: they get no option
 * callbacks, which would otherwise run twice for every request they send (the sizing of each send
 * and of each data segment) to find nothing in ctx_out. Their process is tuples' pid from
 * SYN_SENT: connect() runs in the connecting process (bpf/tcp_events.bpf.c). Processes the
 * filters leave out keep the callbacks: a ctx_out entry is what decides (user space may allow a
 * pid after its connections exist, and tests write ctx_out themselves). */
static __always_inline int kspan_client_is_self(struct bpf_sock_ops *skops)
{
    struct bpf_sock *bsk = skops->sk;
    if (!bsk)
        return 0;
    __u64 sk = (__u64)bsk;  /* the struct sock address: the tuples key */
    struct kspan_tuple *t = bpf_map_lookup_elem(&tuples, &sk);
    return t && t->pid && t->pid == kspan_self_pid;
}

SEC("sockops")
int kspan_tcp_context(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        /* Client sockets write; only callbacks for connections made after the agent started. */
        if (!kspan_client_is_self(skops))
            bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | KSPAN_CB_WRITE);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | KSPAN_CB_PARSE);
        /* A data segment that completed the handshake (the pure ACK was lost) is seen here,
         * not in PARSE_HDR_OPT_CB. */
        kspan_parse_hdr_opt(skops);
        break;
    case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
        kspan_hdr_opt_len(skops);
        break;
    case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
        kspan_write_hdr_opt(skops);
        break;
    case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
        kspan_parse_hdr_opt(skops);
        break;
    }
    return 1;
}
