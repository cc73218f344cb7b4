// Rejected by the verifier on purpose: a map value is used without the NULL check.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Same name as loader_test.bpf.c's `shared`, another key size: reuse_maps() must refuse it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 128);
	__type(key, __u64);
	__type(value, __u64);
} shared SEC(".maps");

SEC("tp/syscalls/sys_enter_getpid")
int loader_bad(void *ctx)
{
	__u64 k = 0;
	__u64 *v = bpf_map_lookup_elem(&shared, &k);

	return *v;
}
