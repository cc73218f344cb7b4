/* The exchange state machine, once, for every uprobe family (OpenSSL, Go crypto/tls).
 *
 * The verifier walks the state machine (~250k instructions) once for every program that inlines
 * it, and openssl.bpf.c and go_tls.bpf.c had nine such programs: seconds of start-up. Their
 * programs instead copy their struct kspan_data_args into the per-CPU kspan_args map and
 * tail-call kspan_exchange_kp below (kspan_on_data_tail in http_exchange.h), which runs the state
 * machine on that copy: one walk at load for all of them.
 *
 * A tail call keeps the caller's ctx and only reaches a program of the caller's own type: the
 * uprobes are BPF_PROG_TYPE_KPROBE programs, so this one is SEC("kprobe") (no target: it is never
 * attached, only tail-called). The socket backends' programs (a tracepoint program among them)
 * keep the state machine inlined (kspan_on_data).
 *
 * tracer/capture.py loads this object before the uprobe families and writes the program's fd into
 * kspan_exchange_progs[0]; with that entry missing the callers count
 * KSPAN_CNT_TAIL_CALL_MISSED instead of losing transfers silently.
 */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kspan.h"
#include "http_exchange.h"

char LICENSE[] SEC("license") = "GPL";

SEC("kprobe")
int kspan_exchange_kp(struct pt_regs *ctx)
{
    int zero = 0;
    struct kspan_data_args *a = bpf_map_lookup_elem(&kspan_args, &zero);
    if (a)
        kspan_exchange_body(ctx, a);
    return 0;
}
