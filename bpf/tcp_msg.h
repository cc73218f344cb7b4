/* Shared by the socket backends that hook the kernel's TCP functions (sockets_kprobes.bpf.c,
 * sockets_fentry.bpf.c): where a struct msghdr's user bytes are, and the transfer at return.
 *
 * tcp_sendmsg/tcp_recvmsg see every TCP transfer whatever the syscall (write, sendmsg, sendfile,
 * io_uring), so unlike the tracepoints backend nothing escapes through an unhooked syscall. The
 * iterator is read at entry (the kernel advances it while copying) and the transfer is reported
 * at return, when its length is known.
 */
#ifndef KSPAN_TCP_MSG_H
#define KSPAN_TCP_MSG_H

#include "http_exchange.h"

enum kspan_kp_kind { KSPAN_KP_UBUF = 0, KSPAN_KP_IOV = 1, KSPAN_KP_NOBUF = 2 };

struct kspan_kp_call {
    __u64 sk;
    __u64 start_ns;
    __u64 ptr;          /* user buffer or struct iovec array */
    __u64 skip;         /* bytes of the first iovec already consumed */
    __u32 nr_segs;
    __u8 kind;
    __u8 dir;           /* KSPAN_DIR_*: one return probe serves both functions */
    __u16 _pad;
};

/* struct iov_iter as older kernels lay it out. CO-RE matches a ___flavor struct to the kernel's
 * struct iov_iter by the name before "___", field by field:
 * - before 5.14: `type` holds the iterator type and the direction bit (bit 0);
 *   5.14 split it into `u8 iter_type` and `bool data_source`;
 * - before 6.4: the iovec array is `iov` (renamed `__iov` in 6.4).
 * ITER_UBUF (a single user buffer, and the `ubuf` field) exists from 6.0. */
struct iov_iter___pre514 {
    unsigned int type;
} __attribute__((preserve_access_index));

struct iov_iter___pre64 {
    const struct iovec *iov;
} __attribute__((preserve_access_index));

/* enum iter_type before 5.14: flag values, ITER_IOVEC = 4 */
#define KSPAN_ITER_IOVEC_PRE514 4

/* Where the user's bytes are, from the msghdr's iterator at the call's entry. */
static __always_inline void kspan_msg_where(struct kspan_kp_call *c, struct msghdr *msg)
{
    struct iov_iter *it = &msg->msg_iter;
    struct iov_iter___pre514 *old = (struct iov_iter___pre514 *)it;
    int iovec = 0;
    c->kind = KSPAN_KP_NOBUF;
    if (bpf_core_field_exists(it->iter_type)) {
        __u8 type = BPF_CORE_READ(it, iter_type);
        if (bpf_core_enum_value_exists(enum iter_type, ITER_UBUF) && bpf_core_field_exists(it->ubuf) &&
            type == bpf_core_enum_value(enum iter_type, ITER_UBUF)) {
            c->kind = KSPAN_KP_UBUF;
            c->ptr = (__u64)BPF_CORE_READ(it, ubuf) + BPF_CORE_READ(it, iov_offset);
            return;
        }
        iovec = type == bpf_core_enum_value(enum iter_type, ITER_IOVEC);
    } else if (bpf_core_field_exists(old->type)) {
        unsigned int type = BPF_CORE_READ(old, type);
        unsigned int want = KSPAN_ITER_IOVEC_PRE514;
        if (bpf_core_enum_value_exists(enum iter_type, ITER_IOVEC))
            want = bpf_core_enum_value(enum iter_type, ITER_IOVEC);
        iovec = (type & ~1u) == want;  /* bit 0: direction (READ = 0, WRITE = 1) */
    }
    if (!iovec)
        return;  /* kernel buffers (kvec, bvec: sendfile, splice): counted, not read */
    c->kind = KSPAN_KP_IOV;
    if (bpf_core_field_exists(it->__iov)) {
        c->ptr = (__u64)BPF_CORE_READ(it, __iov);
    } else {
        struct iov_iter___pre64 *it63 = (struct iov_iter___pre64 *)it;
        c->ptr = (__u64)BPF_CORE_READ(it63, iov);
    }
    c->skip = BPF_CORE_READ(it, iov_offset);
    c->nr_segs = BPF_CORE_READ(it, nr_segs);
}

/* tcp_recvmsg lost its `nonblock` argument in 5.19 ("net: remove noblock parameter from
 * recvmsg() entities"): (sk, msg, len, nonblock, flags, addr_len) before, (sk, msg, len, flags,
 * addr_len) since. BTF cannot be asked for a function's parameter count with this compiler
 * (type-match relocations need clang 15), so this keys on struct msghdr's msg_inq, added in the
 * same release (5.19, for io_uring's IORING_CQE_F_SOCK_NONEMPTY) and set by tcp_recvmsg itself. */
#define kspan_recvmsg_has_nonblock() (!bpf_core_field_exists(((struct msghdr *)0)->msg_inq))

/* Fills the call at the entry of tcp_sendmsg/tcp_recvmsg; 0 when the process is not traced. */
static __always_inline int kspan_tcp_call_begin(struct kspan_kp_call *c, struct sock *sk, struct msghdr *msg,
                                                __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (kspan_pid_skipped(id >> 32))
        return 0;
    c->sk = (__u64)sk;
    c->start_ns = bpf_ktime_get_ns();
    c->dir = dir;
    kspan_msg_where(c, msg);
    return 1;
}

/* The transfer at the return of tcp_sendmsg/tcp_recvmsg, from what the entry saved (call), built
 * straight in the per-CPU kspan_args that the state machine reads: neither it nor a copy of call
 * sits on the stack, which a kprobe program shares with every function its state machine calls
 * (512 bytes in all, see kspan_pre_scratch). 0: nothing for the state machine. */
static __always_inline struct kspan_data_args *kspan_tcp_call_end(__u64 id, struct kspan_kp_call *call, int ret)
{
    int zero = 0;
    struct kspan_data_args *a = ret > 0 ? bpf_map_lookup_elem(&kspan_args, &zero) : 0;
    if (!a)
        return 0;
    __builtin_memset(a, 0, sizeof(*a));
    kspan_socket_args(a, id, call->sk, call->dir, ret, call->start_ns, bpf_ktime_get_ns());
    if (call->kind == KSPAN_KP_UBUF)
        a->buf = (const char *)call->ptr;
    else if (call->kind == KSPAN_KP_IOV)
        kspan_iov_args(a, call->ptr, call->nr_segs, call->skip, ret);
    return a;
}

/* The call in progress per thread, between entry (where the buffer is known) and return (where
 * the byte count is): one definition for the kprobes and fentry objects, never loaded together. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct kspan_kp_call);
} tcp_calls SEC(".maps"); /* pid_tgid -> tcp_sendmsg/recvmsg in progress */

static __always_inline void kspan_tcp_call_save(struct sock *sk, struct msghdr *msg, __u8 dir)
{
    struct kspan_kp_call c = {};
    if (!kspan_tcp_call_begin(&c, sk, msg, dir))
        return;
    __u64 id = bpf_get_current_pid_tgid();
    bpf_map_update_elem(&tcp_calls, &id, &c, BPF_ANY);
    if (dir == KSPAN_DIR_EGRESS) {
        /* a request's identity before its segments leave (see kspan_pre_request_at); the first
         * bytes, read once, also say whether a first write opens a client protocol */
        __u64 buf = c.ptr;
        if (c.kind == KSPAN_KP_IOV && bpf_probe_read_user(&buf, sizeof(buf), (const void *)c.ptr) != 0)
            buf = 0;
        if (c.kind == KSPAN_KP_IOV && buf)
            buf += c.skip;
        __u64 w = 0;
        int have_w = (c.kind == KSPAN_KP_UBUF || c.kind == KSPAN_KP_IOV) && buf &&
                     bpf_probe_read_user(&w, 8, (const void *)buf) == 0;
        if (have_w && kspan_method(w, 8))
            kspan_pre_request_at(id, c.sk, buf);
        struct kspan_ssl_call *sc = kspan_ssl_calls_maybe() ? bpf_map_lookup_elem(&ssl_active, &id) : 0;
        if (sc || bpf_map_lookup_elem(&tls_conns, &c.sk))
            kspan_tls_pre(c.sk, id, sc ? (__u64)sc->buf : 0);
        else if (!kspan_seg_pre(c.sk, id) && have_w && kspan_opens_client_proto(w))
            kspan_seg_first(c.sk, id);  /* its first write, before any transfer made a state */
    }
}

/* The return of a call saved by kspan_tcp_call_save: feed its bytes to the state machine. */
static __always_inline void kspan_tcp_call_done(void *ctx, int ret)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_kp_call *c = bpf_map_lookup_elem(&tcp_calls, &id);
    if (!c)
        return;
    struct kspan_data_args *a = kspan_tcp_call_end(id, c, ret);
    bpf_map_delete_elem(&tcp_calls, &id);  /* after the last read of c */
    if (!a || kspan_tls_socket(id, a->conn_id, bpf_map_lookup_elem(&conns, &a->conn_id)))
        return;
    /* the state machine must not see the values the paths above left in registers (see
     * kspan_on_data): it reads the map copy */
    asm volatile("" ::: "memory");
    kspan_exchange_body(ctx, a);
}

#endif
