/* Socket capture on kprobes of the kernel's TCP functions, for kernels that have kprobes and
 * matching headers (the loader only chooses this backend then: struct msghdr and struct iov_iter
 * are read by header layout here).
 *
 * tcp_sendmsg/tcp_recvmsg see every TCP transfer whatever the syscall (write, sendmsg, sendfile,
 * io_uring), so unlike the tracepoints backend nothing escapes through an unhooked syscall.
 */
#include <linux/socket.h>
#include <linux/uio.h>
#include <linux/version.h>
#include <net/sock.h>

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

BPF_HASH(kp_calls, __u64, struct kspan_kp_call, 65536); /* pid_tgid -> tcp_sendmsg/recvmsg in progress */

/* Where the user's bytes are: the iov_iter layout changed in 5.14 (iter_type) and 6.0 (ITER_UBUF). */
static __always_inline int kspan_kp_save(struct sock *sk, struct msghdr *msg, __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (kspan_pid_skipped(pid))
        return 0;
    struct kspan_kp_call c = {};
    c.sk = (__u64)sk;
    c.start_ns = bpf_ktime_get_ns();
    c.kind = KSPAN_KP_NOBUF;
    c.dir = dir;
    struct iov_iter it = {};
    bpf_probe_read_kernel(&it, sizeof(it), &msg->msg_iter);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 0, 0)
    if (it.iter_type == ITER_UBUF) {
        c.kind = KSPAN_KP_UBUF;
        c.ptr = (__u64)it.ubuf + it.iov_offset;
    } else if (it.iter_type == ITER_IOVEC) {
        c.kind = KSPAN_KP_IOV;
        c.ptr = (__u64)it.iov;
        c.skip = it.iov_offset;
        c.nr_segs = it.nr_segs;
    }
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(5, 14, 0)
    if (it.iter_type == ITER_IOVEC) {
        c.kind = KSPAN_KP_IOV;
        c.ptr = (__u64)it.iov;
        c.skip = it.iov_offset;
        c.nr_segs = it.nr_segs;
    }
#else
    if ((it.type & ~(READ | WRITE)) == ITER_IOVEC) {
        c.kind = KSPAN_KP_IOV;
        c.ptr = (__u64)it.iov;
        c.skip = it.iov_offset;
        c.nr_segs = it.nr_segs;
    }
#endif
    kp_calls.update(&id, &c);
    return 0;
}

/* Attached as the kretprobe of both tcp_sendmsg and tcp_recvmsg: a single inlined copy of the
 * state machine. */
int kspan_tcp_xfer_ret(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_kp_call *c = kp_calls.lookup(&id);
    if (!c)
        return 0;
    struct kspan_kp_call call = *c;
    kp_calls.delete(&id);
    __u8 dir = call.dir;
    int ret = PT_REGS_RC(ctx);
    if (ret <= 0)
        return 0;
    if (kspan_tls_socket(id, call.sk))
        return 0;
    struct kspan_data_args a = {};
    __u64 now = bpf_ktime_get_ns();
    a.conn_id = call.sk;
    a.pid = id >> 32;
    a.tid = (__u32)id;
    a.dir = dir;
    a.source = KSPAN_SRC_SOCKET;
    a.len = ret;
    a.start_ns = dir == KSPAN_DIR_EGRESS ? call.start_ns : now;
    a.end_ns = now;
    if (call.kind == KSPAN_KP_UBUF)
        a.buf = (const char *)call.ptr;
    else if (call.kind == KSPAN_KP_IOV)
        kspan_iov_args(&a, call.ptr, call.nr_segs, call.skip, ret);
    kspan_on_data(ctx, &a);
    return 0;
}

int kspan_tcp_sendmsg(struct pt_regs *ctx, struct sock *sk, struct msghdr *msg, size_t size)
{
    return kspan_kp_save(sk, msg, KSPAN_DIR_EGRESS);
}

int kspan_tcp_recvmsg(struct pt_regs *ctx, struct sock *sk, struct msghdr *msg, size_t len, int flags)
{
    if (flags & KSPAN_MSG_PEEK)
        return 0;
    return kspan_kp_save(sk, msg, KSPAN_DIR_INGRESS);
}

int kspan_tcp_close(struct pt_regs *ctx, struct sock *sk)
{
    kspan_on_close(ctx, (__u64)sk);
    return 0;
}
