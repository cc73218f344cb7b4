/* Socket capture on stable tracepoints, for kernels without kprobes (this machine's backend).
 *
 * sock:sock_send_length / sock:sock_recv_length fire inside the read/write-family syscall, after
 * the transfer, with the struct sock address and the byte count; the syscall's arguments give the
 * user buffer. Together they give the socket, the bytes and their count without reading any
 * kernel struct.
 *
 * Where the syscall arguments come from:
 * - x86_64 (-DKSPAN_X86_64): from the thread's saved user registers at the sock event, so no
 *   hook runs on the host's other (file, pipe) reads and writes, and nothing is left behind by a
 *   call that began before the probes attached. Only the write family is hooked at entry, to
 *   know when a write began (the sock event fires when it ends).
 * - elsewhere: sys_enter_* saves the arguments per thread and sys_exit_* drops them.
 */


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
    __u8 kind;
    __u8 dir;          /* KSPAN_DIR_*: the syscall says which way the bytes go */
    __u16 _pad;
    __u32 consumed;    /* bytes already reported by an earlier sock event of the same call */
};

#ifdef KSPAN_X86_64
/* When each write-family call began: the only thing the registers cannot tell. Updated in place
 * (a lookup, not an insert, on the hot path); never deleted (LRU). */
struct kspan_write_start {
    __u64 start_ns;
    __u64 ptr;         /* the call's second argument, to recognise the same call at the sock event */
};
BPF_TABLE("lru_hash", __u64, struct kspan_write_start, write_start, 65536);

static __always_inline int kspan_note_write(__u64 ptr)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (kspan_pid_skipped(pid))
        return 0;
    __u64 now = bpf_ktime_get_ns();
    struct kspan_write_start *w = write_start.lookup(&id);
    if (w) {
        w->start_ns = now;
        w->ptr = ptr;
    } else {
        struct kspan_write_start nw = {};
        nw.start_ns = now;
        nw.ptr = ptr;
        write_start.update(&id, &nw);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return kspan_note_write((__u64)args->buf); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return kspan_note_write((__u64)args->buff); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return kspan_note_write((__u64)args->vec); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return kspan_note_write((__u64)args->msg); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return kspan_note_write((__u64)args->in_fd); }
#else
BPF_HASH(sys_args, __u64, struct kspan_sys_args, 65536); /* pid_tgid -> call in progress */

static __always_inline int kspan_save_args(__u64 fd, __u64 ptr, __u64 vlen, __u8 kind, __u8 dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (kspan_pid_skipped(pid))
        return 0;
    struct kspan_sys_args sa = {};
    sa.start_ns = bpf_ktime_get_ns();
    sa.ptr = ptr;
    sa.fd = fd;
    sa.vlen = vlen;
    sa.kind = kind;
    sa.dir = dir;
    sys_args.update(&id, &sa);
    return 0;
}

static __always_inline int kspan_drop_args(void)
{
    __u64 id = bpf_get_current_pid_tgid();
    sys_args.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return kspan_save_args(args->fd, (__u64)args->buf, 0, KSPAN_IO_BUF, KSPAN_DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return kspan_save_args(args->fd, (__u64)args->buf, 0, KSPAN_IO_BUF, KSPAN_DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return kspan_save_args(args->fd, (__u64)args->ubuf, 0, KSPAN_IO_BUF, KSPAN_DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return kspan_save_args(args->fd, (__u64)args->buff, 0, KSPAN_IO_BUF, KSPAN_DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return kspan_save_args(args->fd, (__u64)args->vec, args->vlen, KSPAN_IO_IOV, KSPAN_DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return kspan_save_args(args->fd, (__u64)args->vec, args->vlen, KSPAN_IO_IOV, KSPAN_DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return kspan_save_args(args->fd, (__u64)args->msg, 0, KSPAN_IO_MSG, KSPAN_DIR_INGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return kspan_save_args(args->fd, (__u64)args->msg, 0, KSPAN_IO_MSG, KSPAN_DIR_EGRESS); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return kspan_save_args(args->out_fd, 0, 0, KSPAN_IO_NOBUF, KSPAN_DIR_EGRESS); }

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return kspan_drop_args(); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return kspan_drop_args(); }

#endif

/* A closed descriptor number is reused: forget its socket so the TLS probes never map an fd to a
 * stale socket. */
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    __u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)args->fd;
    fd_sk.delete(&key);
    return 0;
}

#ifdef KSPAN_X86_64
/* The syscall's arguments from the thread's user registers. x86_64 only: struct pt_regs is the
 * user ABI there (di, si, dx = first three arguments, orig_ax = syscall number), and syscall
 * numbers never change. This also covers a call already in progress when the probes attached (a
 * server blocked in read() on a keep-alive connection). */
#define KSPAN_PT_REGS_DX 96
#define KSPAN_PT_REGS_SI 104      /* kept for reference: read together with DX */
#define KSPAN_PT_REGS_DI 112
#define KSPAN_PT_REGS_ORIG_AX 120

static __always_inline int kspan_args_from_regs(struct kspan_sys_args *sa)
{
    const char *regs = (const char *)bpf_task_pt_regs((void *)bpf_get_current_task_btf());
    __u64 r[4] = {};  /* dx, si, di, orig_ax: adjacent in struct pt_regs, one read */
    if (!regs || bpf_probe_read_kernel(r, sizeof(r), regs + KSPAN_PT_REGS_DX) != 0)
        return 0;
    __u64 dx = r[0], si = r[1], di = r[2], nr = r[3];
    sa->start_ns = bpf_ktime_get_ns();
    sa->fd = di;
    sa->ptr = si;
    switch (nr) {
    case 0:  /* read */
    case 45: /* recvfrom */
        sa->kind = KSPAN_IO_BUF;
        sa->dir = KSPAN_DIR_INGRESS;
        return 1;
    case 1:  /* write */
    case 44: /* sendto */
        sa->kind = KSPAN_IO_BUF;
        sa->dir = KSPAN_DIR_EGRESS;
        return 1;
    case 19: /* readv */
    case 20: /* writev */
        sa->kind = KSPAN_IO_IOV;
        sa->vlen = dx;
        sa->dir = nr == 19 ? KSPAN_DIR_INGRESS : KSPAN_DIR_EGRESS;
        return 1;
    case 47: /* recvmsg */
    case 46: /* sendmsg */
        sa->kind = KSPAN_IO_MSG;
        sa->dir = nr == 47 ? KSPAN_DIR_INGRESS : KSPAN_DIR_EGRESS;
        return 1;
    case 40: /* sendfile: no user buffer; ptr = in_fd identifies the call */
        sa->kind = KSPAN_IO_NOBUF;
        sa->dir = KSPAN_DIR_EGRESS;
        return 1;
    }
    return 0;
}
#endif

static __always_inline int kspan_sock_xfer(void *ctx, __u64 sk, __u16 family, __u16 protocol, int ret,
                                           int flags)
{
    if (ret <= 0 || protocol != KSPAN_IPPROTO_TCP)
        return 0;
    if (family != KSPAN_AF_INET && family != KSPAN_AF_INET6)
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (pid == KSPAN_SELF_PID) {
        kspan_note_self(sk);  /* harmless for its reads: the endpoint is the same */
        return 0;
    }
#ifdef KSPAN_FILTER_PIDS
    if (!allowed_pids.lookup(&pid))
        return 0;
#endif
#ifdef KSPAN_X86_64
    struct kspan_sys_args regs_args = {};
    if (!kspan_args_from_regs(&regs_args)) {
        kspan_count(KSPAN_CNT_NO_SYSCALL_ARGS, 1);
        return 0;
    }
    struct kspan_sys_args *sa = &regs_args;
    if (sa->dir == KSPAN_DIR_EGRESS) {
        struct kspan_write_start *w = write_start.lookup(&id);
        if (w && w->ptr == sa->ptr)
            sa->start_ns = w->start_ns;
    }
#else
    struct kspan_sys_args *sa = sys_args.lookup(&id);
    if (!sa) {
        kspan_count(KSPAN_CNT_NO_SYSCALL_ARGS, 1);
        return 0;
    }
#endif
    __u8 dir = sa->dir;
    if (dir == KSPAN_DIR_INGRESS && (flags & KSPAN_MSG_PEEK))
        return 0;
    __u64 fdkey = (id & 0xffffffff00000000ULL) | sa->fd;
    __u64 *known = fd_sk.lookup(&fdkey);
    if (!known || *known != sk)
        fd_sk.update(&fdkey, &sk);

    if (kspan_tls_socket(id, sk))
        return 0;

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
        kspan_iov_args(&a, sa->ptr, sa->vlen, 0, ret);
    } else if (kind == KSPAN_IO_MSG) {
        struct kspan_iovec m = {};  /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 */
        if (bpf_probe_read_user(&m, sizeof(m), (const void *)(sa->ptr + 16)) == 0)
            kspan_iov_args(&a, m.base, m.len, 0, ret);
    }
    kspan_on_data(ctx, &a);
    return 0;
}

/* One program for both events (they share a record layout), so the exchange state machine is
 * inlined once. The tracepoint cannot say which event fired (a tracepoint program may not read the
 * common fields), but the syscall can: the saved arguments carry the direction. The loader checks
 * the layout against tracefs and attaches this to sock:sock_send_length and sock:sock_recv_length. */
struct kspan_sock_msg_length {
    __u64 _common;
    __u64 sk;
    __u16 family;
    __u16 protocol;
    __s32 ret;
    __s32 flags;
};

int kspan_sock_length(struct kspan_sock_msg_length *args)
{
    return kspan_sock_xfer(args, args->sk, args->family, args->protocol, args->ret, args->flags);
}
