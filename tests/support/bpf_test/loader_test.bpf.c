// A small object for tests/unit/test_loader.py: one of each feature tracer/loader.py wraps.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "loader_test.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u32 target_pid = 0;
const volatile __u32 test_value = 0;
const volatile __s32 neg_value = 0;
const volatile __u64 big_value = 0;
const volatile __u16 small_value = 0;
const volatile __u8 tiny_value = 0;
const volatile bool flag_on = false;

/* 0: getpid calls, 1: uprobe hits, 2: uretprobe hits, 3: last uprobe argument, 4: last return value */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 5);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} pcpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 4096);
} records SEC(".maps");

/* Carries struct loader_test_layout into the object's BTF (unused by the programs). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct loader_test_layout);
} layouts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 128);
	__type(key, __u32);
	__type(value, __u64);
} shared SEC(".maps");

static __always_inline void bump(__u32 slot, __u64 by)
{
	__u64 *c = bpf_map_lookup_elem(&counter, &slot);

	if (c)
		__sync_fetch_and_add(c, by);
}

static __always_inline void store(__u32 slot, __u64 v)
{
	bpf_map_update_elem(&counter, &slot, &v, BPF_ANY);
}

SEC("tp/syscalls/sys_enter_getpid")
int loader_getpid(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 zero = 0;
	struct loader_test_rec rec = {};
	__u64 *c, *p;

	if (tgid != target_pid)
		return 0;
	c = bpf_map_lookup_elem(&counter, &zero);
	if (!c)
		return 0;
	__sync_fetch_and_add(c, 1);
	p = bpf_map_lookup_elem(&pcpu, &zero);
	if (p)
		*p += 1;
	rec.magic = LOADER_TEST_MAGIC;
	rec.test_value = test_value;
	rec.pid = tgid;
	rec.neg_value = neg_value;
	rec.count = *c;
	rec.big_value = big_value;
	rec.small_value = small_value;
	rec.tiny_value = tiny_value;
	rec.flag_on = flag_on;
	/* as kspan's programs submit: without a wakeup, but for one record (here the 8th) that must
	 * wake the reader (kspan's exec records) */
	bpf_ringbuf_output(&records, &rec, sizeof(rec), rec.count == 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	return 0;
}

SEC("uprobe")
int loader_uprobe(struct pt_regs *ctx)
{
	bump(1, 1);
	store(3, PT_REGS_PARM1(ctx));
	return 0;
}

SEC("uretprobe")
int loader_uretprobe(struct pt_regs *ctx)
{
	bump(2, 1);
	store(4, PT_REGS_RC(ctx));
	return 0;
}
