/* Socket capture on stable tracepoints, for kernels without kprobes (this machine's backend).
 *
 * sock:sock_send_length / sock:sock_recv_length fire inside the read/write-family syscall, after
 * the transfer, with the struct sock address and the byte count; the syscall's arguments give the
 * user buffer. Together they give the socket, the bytes and their count without reading any
 * kernel struct.
 *
 * Where the syscall arguments come from (kspan_args_from_regs, set by the loader):
 * - true (x86_64 only): from the thread's saved user registers at the sock event, so no hook runs
 *   on the host's other (file, pipe) reads and writes, and nothing is left behind by a call that
 *   began before the probes attached. Only the write family is hooked at entry, to know when a
 *   write began (the sock event fires when it ends).
 * - false (the portable path, forced on other architectures): sys_enter_* saves the arguments per
 *   thread and sys_exit_* drops them.
 *
 * Programs, and the path they belong to (the loader turns off autoload of the other path's
 * programs; loaded anyway, a program of the other path returns at once):
 *   both paths:     kspan_sock_length  SEC("tracepoint"): attach to sock/sock_send_length AND
 *                                      sock/sock_recv_length (no target: attached explicitly)
 *                   kspan_fd_close     tp/syscalls/sys_enter_close
 *   registers path: kspan_ws_enter     SEC("tracepoint"): attach to syscalls/sys_enter_{write,sendto,
 *                                      writev,sendmsg,sendfile64} (map write_start)
 *   portable path:  kspan_sys_enter_*  tp/syscalls/sys_enter_{read,write,recvfrom,sendto,readv,
 *                                      writev,recvmsg,sendmsg,sendfile64}
 *                   kspan_sys_exit_*   tp/syscalls/sys_exit_{same nine}
 *                   (map sys_args)
 * The unused path's map can be shrunk to one entry by the loader (both are preallocated).
 */
#include "http_exchange.h"

char LICENSE[] SEC("license") = "GPL";

/* struct pt_regs is the user-register frame only on x86_64 (di, si, dx = first three syscall
 * arguments, orig_ax = syscall number); other architectures always take the portable path. */
#if defined(__TARGET_ARCH_x86)
#define kspan_regs_path() (kspan_args_from_regs)
#else
#define kspan_regs_path() 0
#endif

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

/* ---- registers path: when each write-family call began ---- */

/* The call's arguments read from the registers at the sock event, per CPU rather than on the
 * stack (see kspan_sock_xfer: the frames of a call chain share 512 bytes). */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct kspan_sys_args);
} regs_args SEC(".maps");

/* The only thing the registers cannot tell. Updated in place (a lookup, not an insert, on the hot
 * path); never deleted (LRU). */
struct kspan_write_start {
    __u64 start_ns;
    __u64 ptr;         /* the call's second argument, to recognise the same call at the sock event */
};
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct kspan_write_start);
} write_start SEC(".maps");

/* The socket behind descriptor fd of the current task, or 0: the first write on a new connection
 * comes before any transfer could fill fd_sk. struct socket's back pointer to its file tells a
 * socket's private_data from another file's. */
static __always_inline __u64 kspan_fd_sock(__u64 id, __u32 fd)
{
    __u64 fdkey = (id & 0xffffffff00000000ULL) | fd;
    __u64 *known = bpf_map_lookup_elem(&fd_sk, &fdkey);
    if (known)
        return *known;
    struct task_struct *task = bpf_get_current_task_btf();
    struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
    if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
        return 0;
    struct file **fds = BPF_CORE_READ(fdt, fd);
    struct file *f = 0;
    if (bpf_core_read(&f, sizeof(f), &fds[fd]) != 0 || !f)
        return 0;
    struct socket *sock = (struct socket *)BPF_CORE_READ(f, private_data);
    if (!sock || BPF_CORE_READ(sock, file) != f || BPF_CORE_READ(sock, type) != 1 /* SOCK_STREAM */)
        return 0;
    return (__u64)BPF_CORE_READ(sock, sk);
}

/* A write-family call's entry: where its first bytes are, and a request's identity if they
 * start one (kspan_pre_request_at), before its segments leave. Returns 1 when the bytes start a
 * response: the write's start time is then not needed (user space reads a response's start only
 * as "a response was seen"; its end is the sock event's). */
static __always_inline int kspan_write_entry(__u64 id, __u64 fd, __u64 ptr, __u8 kind)
{
    __u64 buf = ptr;
    if (kind == KSPAN_IO_NOBUF)
        return 0;
    if (kind == KSPAN_IO_MSG) {
        struct user_msghdr *um = (struct user_msghdr *)ptr;
        if (bpf_core_read_user(&ptr, sizeof(ptr), &um->msg_iov) != 0)
            return 0;
        kind = KSPAN_IO_IOV;
    }
    if (kind == KSPAN_IO_IOV && bpf_probe_read_user(&buf, sizeof(buf), (const void *)ptr) != 0)
        return 0;  /* the first iovec's base */
    __u64 w = 0;
    if (buf && bpf_probe_read_user(&w, 8, (const void *)buf) == 0) {
        if (kspan_method(w, 8)) {
            kspan_pre_request_at(id, kspan_fd_sock(id, fd), buf);  /* its first bytes were read just above */
            return 0;
        }
        /* a status line: no identity to publish, and neither TLS ciphertext nor another
         * protocol's request (the checks below) starts so */
        if (kspan_is_response(w, 8))
            return 1;
    }
    /* not plaintext HTTP: maybe a TLS record of a request (an OpenSSL call in progress on this
     * thread, or a connection the TLS probes already know) */
    __u64 fdkey = (id & 0xffffffff00000000ULL) | (__u32)fd;
    __u64 *known = bpf_map_lookup_elem(&fd_sk, &fdkey);
    __u64 sk = known ? *known : 0;
    struct kspan_ssl_call *sc = kspan_ssl_calls_maybe() ? bpf_map_lookup_elem(&ssl_active, &id) : 0;
    __u64 plain = 0;
    if (sc) {
        plain = (__u64)sc->buf;
    } else if (!sk) {
        /* a new connection's first write (no transfer filled fd_sk yet): a client protocol's
         * opening bytes publish its context now, as kspan_seg_pre does for the later ones */
        if (kspan_opens_client_proto(w))
            kspan_seg_first(kspan_fd_sock(id, fd), id);
        return 0;
    } else if (kspan_seg_pre(sk, id))
        return 0;  /* a client's write on a protocol connection (Redis, PostgreSQL, ...) */
    if (!sk)
        sk = kspan_fd_sock(id, fd);
    if (!sk || (!plain && !bpf_map_lookup_elem(&tls_conns, &sk)))
        return 0;
    kspan_tls_pre(sk, id, plain);
    return 0;
}

static __always_inline int kspan_note_write(__u64 fd, __u64 ptr, __u8 kind)
{
    if (!kspan_regs_path())
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (kspan_pid_skipped(pid))
        return 0;
    if (kspan_write_entry(id, fd, ptr, kind))
        return 0;
    __u64 now = bpf_ktime_get_ns();
    struct kspan_write_start *w = bpf_map_lookup_elem(&write_start, &id);
    if (w) {
        w->start_ns = now;
        w->ptr = ptr;
    } else {
        struct kspan_write_start nw = {};
        nw.start_ns = now;
        nw.ptr = ptr;
        bpf_map_update_elem(&write_start, &id, &nw, BPF_ANY);
    }
    return 0;
}

/* One program for the five write-family entries (sys_enter_{write,sendto,writev,sendmsg,
 * sendfile64}, attached to each by the loader): the request-identity path it reaches is verified
 * once, not five times. Every sys_enter record has the syscall number, which says where the
 * bytes are; only args[0] and args[1] are read, which every one of the five has (the attach
 * checks the program's highest context offset against the event's record size). */
SEC("tracepoint")
int kspan_ws_enter(struct trace_event_raw_sys_enter *ctx)
{
    __u8 kind;
    switch (ctx->id) {
    case 1:  /* write */
    case 44: /* sendto */
        kind = KSPAN_IO_BUF;
        break;
    case 20: /* writev */
        kind = KSPAN_IO_IOV;
        break;
    case 46: /* sendmsg */
        kind = KSPAN_IO_MSG;
        break;
    default: /* sendfile64(out_fd, in_fd, ...): in_fd identifies the call */
        kind = KSPAN_IO_NOBUF;
    }
    return kspan_note_write(ctx->args[0], ctx->args[1], kind);
}

/* ---- portable path: arguments saved at entry ---- */

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct kspan_sys_args);
} sys_args SEC(".maps"); /* pid_tgid -> call in progress */

static __always_inline int kspan_save_args(__u64 fd, __u64 ptr, __u64 vlen, __u8 kind, __u8 dir)
{
    if (kspan_regs_path())
        return 0;
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
    bpf_map_update_elem(&sys_args, &id, &sa, BPF_ANY);
    if (dir == KSPAN_DIR_EGRESS)
        kspan_write_entry(id, fd, ptr, kind);
    return 0;
}

static __always_inline int kspan_drop_args(void)
{
    if (kspan_regs_path())
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    bpf_map_delete_elem(&sys_args, &id);
    return 0;
}

#define KSPAN_SYS_ENTER(name, fd, ptr, vlen, kind, dir)                            \
    SEC("tp/syscalls/sys_enter_" #name)                                            \
    int kspan_sys_enter_##name(struct trace_event_raw_sys_enter *ctx)              \
    {                                                                              \
        return kspan_save_args(fd, ptr, vlen, kind, dir);                          \
    }
#define KSPAN_SYS_EXIT(name)                                                       \
    SEC("tp/syscalls/sys_exit_" #name)                                             \
    int kspan_sys_exit_##name(void *ctx)                                           \
    {                                                                              \
        return kspan_drop_args();                                                  \
    }

KSPAN_SYS_ENTER(read, ctx->args[0], ctx->args[1], 0, KSPAN_IO_BUF, KSPAN_DIR_INGRESS)
KSPAN_SYS_ENTER(write, ctx->args[0], ctx->args[1], 0, KSPAN_IO_BUF, KSPAN_DIR_EGRESS)
KSPAN_SYS_ENTER(recvfrom, ctx->args[0], ctx->args[1], 0, KSPAN_IO_BUF, KSPAN_DIR_INGRESS)
KSPAN_SYS_ENTER(sendto, ctx->args[0], ctx->args[1], 0, KSPAN_IO_BUF, KSPAN_DIR_EGRESS)
KSPAN_SYS_ENTER(readv, ctx->args[0], ctx->args[1], ctx->args[2], KSPAN_IO_IOV, KSPAN_DIR_INGRESS)
KSPAN_SYS_ENTER(writev, ctx->args[0], ctx->args[1], ctx->args[2], KSPAN_IO_IOV, KSPAN_DIR_EGRESS)
KSPAN_SYS_ENTER(recvmsg, ctx->args[0], ctx->args[1], 0, KSPAN_IO_MSG, KSPAN_DIR_INGRESS)
KSPAN_SYS_ENTER(sendmsg, ctx->args[0], ctx->args[1], 0, KSPAN_IO_MSG, KSPAN_DIR_EGRESS)
KSPAN_SYS_ENTER(sendfile64, ctx->args[0], 0, 0, KSPAN_IO_NOBUF, KSPAN_DIR_EGRESS)

KSPAN_SYS_EXIT(read)
KSPAN_SYS_EXIT(write)
KSPAN_SYS_EXIT(recvfrom)
KSPAN_SYS_EXIT(sendto)
KSPAN_SYS_EXIT(readv)
KSPAN_SYS_EXIT(writev)
KSPAN_SYS_EXIT(recvmsg)
KSPAN_SYS_EXIT(sendmsg)
KSPAN_SYS_EXIT(sendfile64)

/* ---- both paths ---- */

/* A closed descriptor number is reused: forget its socket so the TLS probes never map an fd to a
 * stale socket, and make the socket's state check fd_sk again on its next transfer (the
 * descriptor it remembers, kspan_conn.fd_key, may come back to it: dup, close, dup). */
SEC("tp/syscalls/sys_enter_close")
int kspan_fd_close(struct trace_event_raw_sys_enter *ctx)
{
    __u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)ctx->args[0];
    __u64 *sk = bpf_map_lookup_elem(&fd_sk, &key);
    if (!sk)
        return 0;
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, sk);
    if (st && st->fd_key == key)
        st->fd_key = 0;
    bpf_map_delete_elem(&fd_sk, &key);
    return 0;
}

#if defined(__TARGET_ARCH_x86)
/* The syscall's arguments from the thread's user registers. x86_64 only: struct pt_regs is the
 * user ABI there (di, si, dx = first three arguments, orig_ax = syscall number), and syscall
 * numbers never change. This also covers a call already in progress when the probes attached (a
 * server blocked in read() on a keep-alive connection). */
static __always_inline int kspan_regs_args(struct kspan_sys_args *sa, __u64 now)
{
    /* bpf_task_pt_regs gives a BTF-typed pointer: its fields are plain loads (the verifier makes
     * them fault-safe), not three bpf_probe_read_kernel calls */
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!regs)
        return 0;
    __u64 nr = regs->orig_ax;
    sa->start_ns = now;
    sa->fd = regs->di;
    sa->ptr = regs->si;
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
        sa->vlen = regs->dx;
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
    if (pid == kspan_self_pid) {
        kspan_note_self(sk);  /* harmless for its reads: the endpoint is the same */
        return 0;
    }
    if (kspan_filter_pids && !kspan_pid_allowed(pid))
        return 0;
    if (kspan_cgroup_skipped()) {
        kspan_count(KSPAN_CNT_CGROUP_SKIPPED, 1);
        return 0;
    }
    __u64 now = bpf_ktime_get_ns();
    struct kspan_sys_args *sa = 0;
    if (kspan_regs_path()) {
#if defined(__TARGET_ARCH_x86)
        int zero = 0;
        sa = bpf_map_lookup_elem(&regs_args, &zero);
        if (!sa)
            return 0;
        __builtin_memset(sa, 0, sizeof(*sa));
        if (!kspan_regs_args(sa, now)) {
            kspan_count(KSPAN_CNT_NO_SYSCALL_ARGS, 1);
            return 0;
        }
        if (sa->dir == KSPAN_DIR_EGRESS) {
            struct kspan_write_start *w = bpf_map_lookup_elem(&write_start, &id);
            if (w && w->ptr == sa->ptr)
                sa->start_ns = w->start_ns;
        }
#endif
    } else {
        sa = bpf_map_lookup_elem(&sys_args, &id);
    }
    if (!sa) {
        kspan_count(KSPAN_CNT_NO_SYSCALL_ARGS, 1);
        return 0;
    }
    __u8 dir = sa->dir;
    if (dir == KSPAN_DIR_INGRESS && (flags & KSPAN_MSG_PEEK))
        return 0;
    /* fd_sk (for the TLS probes and the write-entry hook) is checked once per descriptor of a
     * connection with a state, not per transfer: the state remembers the descriptor it checked */
    struct kspan_conn *st = bpf_map_lookup_elem(&conns, &sk);
    __u64 fdkey = (id & 0xffffffff00000000ULL) | sa->fd;
    if (!st || st->fd_key != fdkey) {
        __u64 *known = bpf_map_lookup_elem(&fd_sk, &fdkey);
        if (!known || *known != sk)
            bpf_map_update_elem(&fd_sk, &fdkey, &sk, BPF_ANY);
        if (st)
            st->fd_key = fdkey;
    }

    if (kspan_tls_socket(id, sk, st))
        return 0;

    /* The arguments are built in the per-CPU entry the state machine reads, not on the stack:
     * the verifier sums the frames of a call chain (this program, kspan_proto_data,
     * kspan_fix_server) against 512 bytes when the kernel gives the program no private stack,
     * and the two on-stack structs took this frame to 288 bytes (refused: 592). */
    int zero = 0;
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &zero);
    if (!a)
        return 0;
    __builtin_memset(a, 0, sizeof(*a));
    kspan_socket_args(a, id, sk, dir, ret, sa->start_ns, now);
    __u32 kind = sa->kind;
    if (kind == KSPAN_IO_BUF) {
        a->buf = (const char *)(sa->ptr + sa->consumed);
        sa->consumed += ret;
    } else if (kind == KSPAN_IO_IOV) {
        kspan_iov_args(a, sa->ptr, sa->vlen, 0, ret);
    } else if (kind == KSPAN_IO_MSG) {
        /* struct user_msghdr is user memory, laid out by the syscall ABI */
        struct user_msghdr *um = (struct user_msghdr *)sa->ptr;
        __u64 iov = 0, iovlen = 0;
        if (bpf_core_read_user(&iov, sizeof(iov), &um->msg_iov) == 0 &&
            bpf_core_read_user(&iovlen, sizeof(iovlen), &um->msg_iovlen) == 0)
            kspan_iov_args(a, iov, iovlen, 0, ret);
    }
    kspan_exchange_body_on(ctx, a, st);
    return 0;
}

/* One program for both events (they share a record layout), so the exchange state machine is
 * inlined once. The tracepoint cannot say which event fired (a tracepoint program may not read the
 * common fields), but the syscall can: the saved arguments carry the direction. The record's
 * fields are relocated against this kernel's BTF (struct trace_event_raw_sock_msg_length). */
SEC("tracepoint")
int kspan_sock_length(struct trace_event_raw_sock_msg_length *ctx)
{
    return kspan_sock_xfer(ctx, (__u64)ctx->sk, ctx->family, ctx->protocol, ctx->ret, ctx->flags);
}
