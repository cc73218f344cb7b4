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

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct kspan_kp_call);
} kp_calls SEC(".maps"); /* pid_tgid -> tcp_sendmsg/recvmsg in progress */

static __always_inline int kspan_kp_save(struct sock *sk, struct msghdr *msg, __u8 dir)
{
    struct kspan_kp_call c = {};
    if (!kspan_tcp_call_begin(&c, sk, msg, dir))
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    bpf_map_update_elem(&kp_calls, &id, &c, BPF_ANY);
    return 0;
}

/* Attached as the kretprobe of both tcp_sendmsg and tcp_recvmsg: a single inlined copy of the
 * state machine. */
SEC("kretprobe")
int BPF_KRETPROBE(kspan_tcp_xfer_ret, int ret)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_kp_call *c = bpf_map_lookup_elem(&kp_calls, &id);
    if (!c)
        return 0;
    struct kspan_kp_call call = *c;
    bpf_map_delete_elem(&kp_calls, &id);
    kspan_tcp_call_end(ctx, id, &call, ret);
    return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(kspan_tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size)
{
    return kspan_kp_save(sk, msg, KSPAN_DIR_EGRESS);
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
    return kspan_kp_save(sk, msg, KSPAN_DIR_INGRESS);
}

SEC("kprobe/tcp_close")
int BPF_KPROBE(kspan_tcp_close, struct sock *sk)
{
    kspan_on_close(ctx, (__u64)sk);
    return 0;
}
