/* Socket capture on stable tracepoints, for kernels without kprobes (this machine's backend).
 *
 * The syscall tracepoints give the user buffer of each read/write-family call; the
 * sock:sock_send_length / sock:sock_recv_length tracepoints fire inside that call, after the
 * transfer, with the struct sock address and the byte count. Together they give the socket, the
 * bytes and their count without reading any kernel struct.
 */

#define KSPAN_MSG_PEEK 2
#define KSPAN_MAX_IOV 8

enum kspan_io_kind {
    KSPAN_IO_BUF = 0,   /* ptr is the buffer */
    KSPAN_IO_IOV = 1,   /* ptr is a struct iovec array of vlen entries */
    KSPAN_IO_MSG = 2,   /* ptr is a struct user_msghdr */
    KSPAN_IO_NOBUF = 3, /* no user buffer (sendfile): count bytes only */
};

struct kspan_sys_args {
    __u64 start_ns;
    __u64 ptr;
    __u32 fd;
    __u32 vlen;
    __u32 kind;
    __u32 consumed;    /* bytes already reported by an earlier sock event of the same call */
};

struct kspan_iovec {
    __u64 base;
    __u64 len;
};

BPF_HASH(sys_args, __u64, struct kspan_sys_args, 65536); /* pid_tgid -> call in progress */

static __always_inline int kspan_save_args(__u64 fd, __u64 ptr, __u64 vlen, __u32 kind)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (pid == KSPAN_SELF_PID)
        return 0;
#ifdef KSPAN_FILTER_PIDS
    if (!allowed_pids.lookup(&pid))
        return 0;
#endif
    struct kspan_sys_args sa = {};
    sa.start_ns = bpf_ktime_get_ns();
    sa.ptr = ptr;
    sa.fd = fd;
    sa.vlen = vlen;
    sa.kind = kind;
    sys_args.update(&id, &sa);
    return 0;
}

static __always_inline int kspan_drop_args(void)
{
    __u64 id = bpf_get_current_pid_tgid();
    sys_args.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return kspan_save_args(args->fd, (__u64)args->buf, 0, KSPAN_IO_BUF); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return kspan_save_args(args->fd, (__u64)args->buf, 0, KSPAN_IO_BUF); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return kspan_save_args(args->fd, (__u64)args->ubuf, 0, KSPAN_IO_BUF); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return kspan_save_args(args->fd, (__u64)args->buff, 0, KSPAN_IO_BUF); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return kspan_save_args(args->fd, (__u64)args->vec, args->vlen, KSPAN_IO_IOV); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return kspan_save_args(args->fd, (__u64)args->vec, args->vlen, KSPAN_IO_IOV); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return kspan_save_args(args->fd, (__u64)args->msg, 0, KSPAN_IO_MSG); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return kspan_save_args(args->fd, (__u64)args->msg, 0, KSPAN_IO_MSG); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return kspan_save_args(args->out_fd, 0, 0, KSPAN_IO_NOBUF); }

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return kspan_drop_args(); }

/* A closed descriptor number is reused: forget its socket so the TLS probes never map an fd to a
 * stale socket. */
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    __u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)args->fd;
    fd_sk.delete(&key);
    return 0;
}

/* Read k (<= 8) bytes ending at `end` and shift them into v (newest in the low byte). */
static __always_inline __u64 kspan_shift_in(__u64 v, __u64 end, __u32 k)
{
    __u8 b[16] = {};
    asm volatile("" : "+r"(k));
    k &= 15;
    if (k == 0 || bpf_probe_read_user(b, k, (const void *)(end - k)) != 0)
        return v;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < k)
            v = (v << 8) | b[i];
    }
    return v;
}

/* Scattered buffers: the first non-empty segment is what the state machine reads; the tail
 * register gets the last bytes of the last two segments. */
static __always_inline void kspan_iov_args(struct kspan_data_args *a, __u64 iov, __u32 vlen, __u32 ret)
{
    __u64 remaining = ret;
    __u64 last_end = 0, last_used = 0, prev_end = 0, prev_used = 0;
#pragma unroll
    for (int j = 0; j < KSPAN_MAX_IOV; j++) {
        if (j >= vlen || remaining == 0)
            break;
        struct kspan_iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), (const void *)(iov + j * sizeof(v))) != 0)
            break;
        __u64 used = v.len < remaining ? v.len : remaining;
        if (used) {
            if (!a->buf) {
                a->buf = (const char *)v.base;
                a->buf_len = used;
            }
            prev_end = last_end;
            prev_used = last_used;
            last_end = v.base + used;
            last_used = used;
        }
        remaining -= used;
    }
    if (!a->buf) {
        a->buf_len = 0;
        return;
    }
    if (a->buf_len == 0)
        a->buf_len = 1;  /* 0 would mean "the whole transfer is readable at buf" */
    if (remaining)
        return;          /* more segments than we walk: tail unknown */
    __u32 k1 = last_used > 8 ? 8 : last_used;
    __u32 k2 = 0;
    if (k1 < 8 && prev_used)
        k2 = prev_used > (8 - k1) ? (8 - k1) : prev_used;
    __u64 v = 0;
    if (k2)
        v = kspan_shift_in(v, prev_end, k2);
    v = kspan_shift_in(v, last_end, k1);
    a->tail = v;
    a->tail_n = k1 + k2;
}

static __always_inline int kspan_sock_xfer(void *ctx, __u64 sk, __u16 family, __u16 protocol, int ret,
                                           int flags, __u8 dir)
{
    if (ret <= 0 || protocol != KSPAN_IPPROTO_TCP)
        return 0;
    if (family != KSPAN_AF_INET && family != KSPAN_AF_INET6)
        return 0;
    if (dir == KSPAN_DIR_INGRESS && (flags & KSPAN_MSG_PEEK))
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (pid == KSPAN_SELF_PID) {
        if (dir == KSPAN_DIR_EGRESS)
            kspan_note_self(sk);
        return 0;
    }
#ifdef KSPAN_FILTER_PIDS
    if (!allowed_pids.lookup(&pid))
        return 0;
#endif
    struct kspan_sys_args *sa = sys_args.lookup(&id);
    if (!sa) {
        kspan_count(KSPAN_CNT_NO_SYSCALL_ARGS, 1);
        return 0;
    }
    __u64 fdkey = (id & 0xffffffff00000000ULL) | sa->fd;
    __u64 *known = fd_sk.lookup(&fdkey);
    if (!known || *known != sk)
        fd_sk.update(&fdkey, &sk);

    struct kspan_ssl_call *sc = ssl_active.lookup(&id);
    if (sc) {
        /* inside SSL_read/SSL_write: these are ciphertext; the TLS probe reports the plaintext */
        sc->sk = sk;
        __u8 one = 1;
        if (!tls_conns.lookup(&sk))
            tls_conns.update(&sk, &one);
        kspan_count(KSPAN_CNT_TLS_SKIPPED, 1);
        return 0;
    }
    if (tls_conns.lookup(&sk)) {
        kspan_count(KSPAN_CNT_TLS_SKIPPED, 1);
        return 0;
    }

    struct kspan_data_args a = {};
    __u64 now = bpf_ktime_get_ns();
    a.conn_id = sk;
    a.pid = pid;
    a.tid = (__u32)id;
    a.dir = dir;
    a.source = KSPAN_SRC_SOCKET;
    a.len = ret;
    a.start_ns = dir == KSPAN_DIR_EGRESS ? sa->start_ns : now;
    a.end_ns = now;
    __u32 kind = sa->kind;
    if (kind == KSPAN_IO_BUF) {
        a.buf = (const char *)(sa->ptr + sa->consumed);
        sa->consumed += ret;
    } else if (kind == KSPAN_IO_IOV) {
        kspan_iov_args(&a, sa->ptr, sa->vlen, ret);
    } else if (kind == KSPAN_IO_MSG) {
        struct kspan_iovec m = {};  /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 */
        if (bpf_probe_read_user(&m, sizeof(m), (const void *)(sa->ptr + 16)) == 0)
            kspan_iov_args(&a, m.base, m.len, ret);
    }
    kspan_on_data(ctx, &a);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    return kspan_sock_xfer(args, (__u64)args->sk, args->family, args->protocol, args->ret, args->flags,
                           KSPAN_DIR_EGRESS);
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    return kspan_sock_xfer(args, (__u64)args->sk, args->family, args->protocol, args->ret, args->flags,
                           KSPAN_DIR_INGRESS);
}
