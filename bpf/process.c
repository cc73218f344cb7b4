/* Process lifecycle: exec and exit records (process metadata, --exe matching) and clean-up of the
 * per-process kernel state when a process goes away (a pid is reused). */

/* --exe NAME filtering in the kernel, so a matching process started later is traced from its
 * first request: comm (the first 15 bytes of the executable's name) -> 1. User space also checks
 * /proc/PID/exe for names comm cannot hold. */
struct kspan_comm {
    char name[16];
};
BPF_HASH(allowed_comms, struct kspan_comm, __u8, 256);

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct kspan_proc r = {};
    r.type = KSPAN_REC_PROC;
    r.pid = bpf_get_current_pid_tgid() >> 32;
    r.event = KSPAN_PROC_EXEC;
    r.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(r.comm, sizeof(r.comm));
#ifdef KSPAN_FILTER_EXE
    struct kspan_comm c = {};
    __builtin_memcpy(c.name, r.comm, sizeof(c.name));
    if (allowed_comms.lookup(&c)) {
        __u8 one = 1;
        __u32 pid = r.pid;
        allowed_pids.update(&pid, &one);
    }
#endif
    if (events.ringbuf_output(&r, sizeof(r), 0) == 0)
        kspan_count(KSPAN_CNT_PROC_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
    return 0;
}

#ifdef KSPAN_FILTER_PIDS
/* A traced process's children are traced too (servers that fork workers). */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    __u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!allowed_pids.lookup(&parent))
        return 0;
    __u32 child = args->child_pid;
    __u8 one = 1;
    allowed_pids.update(&child, &one);
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 pid = id >> 32;
    __u32 tid = (__u32)id;
    thread_ctx.delete(&id);
    if (pid != tid) {
        /* a thread: fork() above may have allowed its tid */
        allowed_pids.delete(&tid);
        return 0;
    }
    proc_inflight.delete(&pid);
    allowed_pids.delete(&pid);
    struct kspan_proc r = {};
    r.type = KSPAN_REC_PROC;
    r.pid = pid;
    r.event = KSPAN_PROC_EXIT;
    r.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(r.comm, sizeof(r.comm));
    if (events.ringbuf_output(&r, sizeof(r), 0) == 0)
        kspan_count(KSPAN_CNT_PROC_RECORDS, 1);
    else
        kspan_count(KSPAN_CNT_LOST, 1);
    return 0;
}
