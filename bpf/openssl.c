/* OpenSSL (libssl 1.1 and 3): plaintext of SSL_read/SSL_write and their _ex forms.
 *
 * Compiled after http_exchange.h (tracer/loader.py concatenates the sources), so it shares its
 * maps. While a call is in progress its thread has an ssl_active entry: the socket path then
 * leaves the ciphertext alone, records the struct sock it went through in .sk and marks that
 * socket in tls_conns. At the return, the plaintext goes to kspan_on_data() keyed by that sock,
 * so an HTTPS exchange has the same connection identity (and 4-tuple, and peer linking) as a
 * plaintext one.
 *
 * uretprobes are safe here: C stacks do not move (unlike Go's).
 */

#include <uapi/linux/ptrace.h>

struct kspan_ssl_key {
    __u32 tgid;
    __u32 _pad;
    __u64 ssl;
};

/* SSL* -> sock of its last call that reached the socket: a read served from OpenSSL's buffer makes
 * no syscall, so the sock comes from an earlier call on the same SSL*. */
BPF_TABLE("lru_hash", struct kspan_ssl_key, __u64, ssl_sk, 65536);
/* SSL* -> fd from SSL_set_fd: the sock of a first call that made no syscall of its own. */
BPF_TABLE("lru_hash", struct kspan_ssl_key, __u32, ssl_fd, 65536);
/* pid_tgid -> size_t *written / *readbytes of an SSL_*_ex call in progress. */
BPF_HASH(ssl_ex_out, __u64, __u64, 16384);

static __always_inline int kspan_ssl_enter(struct pt_regs *ctx, __u64 outp)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    if (pid == KSPAN_SELF_PID)
        return 0;
#ifdef KSPAN_FILTER_PIDS
    if (!allowed_pids.lookup(&pid))
        return 0;
#endif
    struct kspan_ssl_call c = {};
    c.ssl = PT_REGS_PARM1(ctx);
    c.buf = (const char *)PT_REGS_PARM2(ctx);
    c.start_ns = bpf_ktime_get_ns();
    ssl_active.update(&id, &c);
    if (outp)
        ssl_ex_out.update(&id, &outp);
    return 0;
}

static __always_inline int kspan_ssl_exit(struct pt_regs *ctx, __u8 dir, int ex)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_ssl_call *c = ssl_active.lookup(&id);
    if (!c)
        return 0;
    struct kspan_ssl_call call = *c;
    ssl_active.delete(&id);

    long ret = PT_REGS_RC(ctx);
    __u64 len = 0;
    if (ex) {
        __u64 *outp = ssl_ex_out.lookup(&id);
        __u64 out = outp ? *outp : 0;
        ssl_ex_out.delete(&id);
        /* _ex: 1 on success with the count in *out; 0 on failure */
        if ((int)ret != 1 || !out || bpf_probe_read_user(&len, sizeof(len), (const void *)out) != 0)
            return 0;
    } else {
        if ((int)ret <= 0)
            return 0;
        len = (int)ret;
    }
    if (len == 0)
        return 0;

    struct kspan_ssl_key key = {};
    key.tgid = id >> 32;
    key.ssl = call.ssl;
    __u64 sk = call.sk;
    if (sk) {
        __u64 *known = ssl_sk.lookup(&key);
        if (!known || *known != sk)
            ssl_sk.update(&key, &sk);
    } else {
        __u64 *known = ssl_sk.lookup(&key);
        if (known) {
            sk = *known;
        } else {
            __u32 *fd = ssl_fd.lookup(&key);
            if (fd) {
                __u64 fdkey = (id & 0xffffffff00000000ULL) | *fd;
                __u64 *fsk = fd_sk.lookup(&fdkey);
                if (fsk) {
                    sk = *fsk;
                    ssl_sk.update(&key, &sk);
                    __u8 one = 1;
                    tls_conns.update(&sk, &one);
                }
            }
        }
    }
    if (!sk) {
        /* no socket known for this SSL* (a memory BIO, or a socket never seen by the socket path) */
        kspan_count(KSPAN_CNT_UNPARSED_BYTES, len);
        return 0;
    }

    struct kspan_data_args a = {};
    __u64 now = bpf_ktime_get_ns();
    a.conn_id = sk;
    a.pid = id >> 32;
    a.tid = (__u32)id;
    a.dir = dir;
    a.source = KSPAN_SRC_OPENSSL;
    a.flags = KSPAN_FLAG_TLS;
    a.buf = call.buf;
    a.len = len > 0xffffffffULL ? 0xffffffff : (__u32)len;
    /* a read's bytes arrived at its return: a blocking SSL_read's entry says nothing about them */
    a.start_ns = dir == KSPAN_DIR_EGRESS ? call.start_ns : now;
    a.end_ns = now;
    kspan_on_data(ctx, &a);
    return 0;
}

int kspan_ssl_write_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, 0); }
int kspan_ssl_read_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, 0); }
int kspan_ssl_write_ex_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, PT_REGS_PARM4(ctx)); }
int kspan_ssl_read_ex_enter(struct pt_regs *ctx) { return kspan_ssl_enter(ctx, PT_REGS_PARM4(ctx)); }
int kspan_ssl_write_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_EGRESS, 0); }
int kspan_ssl_read_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_INGRESS, 0); }
int kspan_ssl_write_ex_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_EGRESS, 1); }
int kspan_ssl_read_ex_return(struct pt_regs *ctx) { return kspan_ssl_exit(ctx, KSPAN_DIR_INGRESS, 1); }

/* SSL_set_fd(ssl, fd): nginx and CPython bind the SSL* to its socket this way. */
int kspan_ssl_set_fd(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct kspan_ssl_key key = {};
    key.tgid = id >> 32;
    key.ssl = PT_REGS_PARM1(ctx);
    __u32 fd = (__u32)PT_REGS_PARM2(ctx);
    ssl_fd.update(&key, &fd);
    ssl_sk.delete(&key);  /* a reused SSL* on a new socket */
    return 0;
}
