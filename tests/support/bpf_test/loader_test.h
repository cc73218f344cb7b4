/* Layouts shared by loader_test.bpf.c and the host-side check in tests/unit/test_loader.py.
 * The includer provides __u8.. __u64 (vmlinux.h on the BPF side, <linux/types.h> on the host). */
#ifndef LOADER_TEST_H
#define LOADER_TEST_H

#define LOADER_TEST_MAGIC 0x4b53504eu

struct loader_test_rec {
	__u32 magic;
	__u32 test_value;
	__u32 pid;
	__s32 neg_value;
	__u64 count;
	__u64 big_value;
	__u16 small_value;
	__u8 tiny_value;
	__u8 flag_on;
	__u32 pad;
};

struct loader_test_layout {
	__u64 a;
	__u32 b;
	__u16 c;
	__u8 d[6];
	struct {
		__u32 x;
		__u16 y;
	} inner;
	union {
		__u64 u;
		__u32 v;
	};
	__u8 tail;
};

#endif
