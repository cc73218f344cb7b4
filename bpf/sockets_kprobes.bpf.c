/* Socket capture on kprobes of the kernel's TCP functions, for kernels that have kprobes but where
 * fentry cannot attach. struct msghdr and struct iov_iter are read through CO-RE (bpf/tcp_msg.h).
 *
 * Programs:
 *   kspan_tcp_sendmsg   SEC("kprobe/tcp_sendmsg")   attached by its SEC()
 *   kspan_tcp_recvmsg   SEC("kprobe/tcp_recvmsg")   attached by its SEC()
 *   kspan_tcp_close     SEC("kprobe/tcp_close")     attached by its SEC()
 *   kspan_tcp_xfer_ret  SEC("kretprobe")            no target: the loader attaches it as the return
 *                                                   probe of BOTH tcp_sendmsg and tcp_recvmsg
 */
#include "http_exchange.h"
#include "tcp_msg.h"

char LICENSE[] SEC("license") = "GPL";

/* Attached as the kretprobe of both tcp_sendmsg and tcp_recvmsg: a single inlined copy of the
 * state machine. */
SEC("kretprobe")
int BPF_KRETPROBE(kspan_tcp_xfer_ret, int ret)
{
    kspan_tcp_call_done(ctx, ret);
    return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(kspan_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size)
{
    kspan_tcp_call_save(sk, msg, KSPAN_DIR_EGRESS);
    return 0;
}

/* flags is the 4th argument since 5.19 and the 5th before (see kspan_recvmsg_has_nonblock). Both
 * registers are read before one is picked: left to itself the compiler picks the register's
 * address instead, and the verifier refuses a load through a computed context pointer. */
SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(kspan_tcp_recvmsg, struct sock *sk, struct msghdr *msg, size_t len, long arg3, long arg4)
{
    asm volatile("" : "+r"(arg3), "+r"(arg4));
    int flags = kspan_recvmsg_has_nonblock() ? (int)arg4 : (int)arg3;
    if (flags & KSPAN_MSG_PEEK)
        return 0;
    kspan_tcp_call_save(sk, msg, KSPAN_DIR_INGRESS);
    return 0;
}

SEC("kprobe/tcp_close")
int BPF_KPROBE(kspan_tcp_close, struct sock *sk)
{
    kspan_on_close(ctx, (__u64)sk);
    return 0;
}
