/* Process lifecycle: exec and exit records (process metadata, --exe matching) and clean-up of the
 * per-process kernel state when a process goes away (a pid is reused).
 *
 * Programs (all attached by their SEC()):
 *   kspan_proc_exec  tp/sched/sched_process_exec
 *   kspan_proc_fork  tp/sched/sched_process_fork  (does nothing unless kspan_filter_pids: the
 *                                                  loader may leave it unloaded then)
 *   kspan_proc_exit  tp/sched/sched_process_exit
 */
#include "http_exchange.h"

char LICENSE[] SEC("license") = "GPL";

/* --exe NAME filtering in the kernel, so a matching process started later is traced from its
 * first request: comm (the first 15 bytes of the executable's name) -> 1. User space also checks
 * /proc/PID/exe for names comm cannot hold. */
struct kspan_comm {
    char name[16];
};
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, struct kspan_comm);
    __type(value, __u8);
} allowed_comms SEC(".maps");

/* flags: BPF_RB_NO_WAKEUP, or BPF_RB_FORCE_WAKEUP for the one record the reader must not leave
 * waiting for its next timed drain (an exec: the agent attaches to, or allows, the new process
 * before its first request). Every other record in the ring is submitted without a wakeup. */
static __always_inline void kspan_proc_emit(struct kspan_proc *r, __u64 flags)
{
    if (bpf_ringbuf_output(&events, r, sizeof(*r), flags) == 0)
        kspan_count(KSPAN_CNT_PROC_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
}

SEC("tp/sched/sched_process_exec")
int kspan_proc_exec(struct trace_event_raw_sched_process_exec *ctx)
{
    struct kspan_proc r = {};
    r.type = KSPAN_REC_PROC;
    r.pid = bpf_get_current_pid_tgid() >> 32;
    r.event = KSPAN_PROC_EXEC;
    r.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(r.comm, sizeof(r.comm));
    if (kspan_filter_exe) {
        struct kspan_comm c = {};
        __builtin_memcpy(c.name, r.comm, sizeof(c.name));
        if (bpf_map_lookup_elem(&allowed_comms, &c)) {
            __u8 one = 1;
            __u32 pid = r.pid;
            bpf_map_update_elem(&allowed_pids, &pid, &one, BPF_ANY);
            kspan_pid_gen_bump();
        }
    }
    kspan_proc_emit(&r, BPF_RB_FORCE_WAKEUP);
    return 0;
}

/* A traced process's children are traced too (servers that fork workers). */
SEC("tp/sched/sched_process_fork")
int kspan_proc_fork(struct trace_event_raw_sched_process_fork *ctx)
{
    if (!kspan_filter_pids)
        return 0;
    __u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!bpf_map_lookup_elem(&allowed_pids, &parent))
        return 0;
    __u32 child = ctx->child_pid;
    __u8 one = 1;
    bpf_map_update_elem(&allowed_pids, &child, &one, BPF_ANY);
    kspan_pid_gen_bump();
    return 0;
}

SEC("tp/sched/sched_process_exit")
int kspan_proc_exit(void *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    __u32 tid = (__u32)id;
    bpf_map_delete_elem(&thread_ctx, &id);
    if (pid != tid) {
        /* a thread: fork() above may have allowed its tid */
        if (bpf_map_delete_elem(&allowed_pids, &tid) == 0)
            kspan_pid_gen_bump();
        return 0;
    }
    bpf_map_delete_elem(&proc_inflight, &pid);
    if (bpf_map_delete_elem(&allowed_pids, &pid) == 0)
        kspan_pid_gen_bump();
    struct kspan_proc r = {};
    r.type = KSPAN_REC_PROC;
    r.pid = pid;
    r.event = KSPAN_PROC_EXIT;
    r.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(r.comm, sizeof(r.comm));
    kspan_proc_emit(&r, BPF_RB_NO_WAKEUP);
    return 0;
}
