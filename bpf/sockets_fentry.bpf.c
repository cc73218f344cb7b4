/* Socket capture on fentry/fexit of the kernel's TCP functions: the cheapest backend (a BPF
 * trampoline instead of a kprobe's breakpoint, arguments typed by BTF), where the kernel lets
 * these programs load and attach. Same capture as sockets_kprobes.bpf.c (bpf/tcp_msg.h); the
 * return value comes from fexit directly, the iterator still has to be saved at entry (the kernel
 * advances it while copying).
 *
 * Programs (all attached by their SEC(); each fexit program is bound to its one function at load,
 * so sendmsg and recvmsg each have their own copy of the state machine):
 *   kspan_fentry_tcp_sendmsg  SEC("fentry/tcp_sendmsg")
 *   kspan_fexit_tcp_sendmsg   SEC("fexit/tcp_sendmsg")
 *   kspan_fentry_tcp_recvmsg  SEC("fentry/tcp_recvmsg")
 *   kspan_fexit_tcp_recvmsg   SEC("fexit/tcp_recvmsg")
 *   kspan_fentry_tcp_close    SEC("fentry/tcp_close")
 *
 * The verifier types a tracing program's context by the kernel function's BTF prototype:
 * tcp_sendmsg(sk, msg, size) and tcp_close(sk, timeout) have not changed. tcp_recvmsg is
 * written against the 5.19+ prototype (sk, msg, len, flags, addr_len); on older kernels (extra
 * `nonblock` before flags) the flags and return value are taken one slot further, picked by
 * kspan_recvmsg_has_nonblock() in bpf/tcp_msg.h.
 */
#include "http_exchange.h"
#include "tcp_msg.h"

char LICENSE[] SEC("license") = "GPL";

SEC("fentry/tcp_sendmsg")
int BPF_PROG(kspan_fentry_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size)
{
    kspan_tcp_call_save(sk, msg, KSPAN_DIR_EGRESS);
    return 0;
}

SEC("fexit/tcp_sendmsg")
int BPF_PROG(kspan_fexit_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
    kspan_tcp_call_done(ctx, ret);
    return 0;
}

/* Context slots are read by hand for tcp_recvmsg: which slot holds flags (and, at fexit, the
 * return value) depends on the prototype. Slots 3 and 4 exist in both prototypes, so both are
 * read before one is picked (left to itself the compiler picks the slot's address instead, and
 * the verifier refuses a load through a computed context pointer). */
SEC("fentry/tcp_recvmsg")
int BPF_PROG(kspan_fentry_tcp_recvmsg, struct sock *sk, struct msghdr *msg, size_t len)
{
    __u64 a3 = ctx[3], a4 = ctx[4];
    asm volatile("" : "+r"(a3), "+r"(a4));
    int flags = kspan_recvmsg_has_nonblock() ? (int)a4 : (int)a3;
    if (flags & KSPAN_MSG_PEEK)
        return 0;
    kspan_tcp_call_save(sk, msg, KSPAN_DIR_INGRESS);
    return 0;
}

/* The return value follows the last argument: slot 5 since 5.19, slot 6 before. Slot 6 does not
 * exist on current kernels, so it is loaded only on the branch the CO-RE check keeps; the loads
 * are written as assembly so the compiler cannot merge them into one load from a computed
 * address (the verifier only accepts context loads at a constant offset). */
SEC("fexit/tcp_recvmsg")
int BPF_PROG(kspan_fexit_tcp_recvmsg)
{
    __u64 r;
    if (kspan_recvmsg_has_nonblock())
        asm volatile("%0 = *(u64 *)(%1 + 48)" : "=r"(r) : "r"(ctx));
    else
        asm volatile("%0 = *(u64 *)(%1 + 40)" : "=r"(r) : "r"(ctx));
    kspan_tcp_call_done(ctx, (int)r);
    return 0;
}

SEC("fentry/tcp_close")
int BPF_PROG(kspan_fentry_tcp_close, struct sock *sk)
{
    kspan_on_close(ctx, (__u64)sk);
    return 0;
}
