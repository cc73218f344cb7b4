/* kspan records: the only contract between the kernel programs and user space.
 * tracer/_records.c is compiled against this header (the decoding of exchange, metric and segment
 * records); tracer/records.py mirrors every struct here with ctypes and checks its mirrors against
 * that module at import: change the header and the mirrors together.
 * Fixed-size arrays keep each record one bpf_ringbuf_output() copy from a map value (the BPF
 * stack is 512 bytes, an exchange is larger). */
#ifndef KSPAN_H
#define KSPAN_H

#define KSPAN_REQ_HEAD 512   /* request line + headers: enough for method, path, Host, traceparent */
#define KSPAN_RESP_HEAD 256  /* status line + the framing headers (Content-Length, Transfer-Encoding) */
#define KSPAN_TAIL 8         /* last bytes of the response: a chunked body ends "0\r\n\r\n" */

enum kspan_record_type {
    KSPAN_REC_EXCHANGE = 1,  /* struct kspan_exchange */
    KSPAN_REC_PROC = 2,      /* struct kspan_proc: exec or exit of a process */
    KSPAN_REC_TCP = 3,       /* struct kspan_tcp: retransmit, reset, failed connect, rtt */
    KSPAN_REC_SEGMENT = 5,   /* struct kspan_segment: one transfer on a connection of another protocol */
    KSPAN_REC_METRIC = 4,    /* an unsampled exchange: struct kspan_exchange cut after
                              * KSPAN_METRIC_HEAD bytes of req_head (metrics only, no span) */
};

/* Bytes of each transfer a segment record carries (protocols beyond HTTP/1). */
#define KSPAN_SEG_DATA 512

/* Bytes of the request head an unsampled exchange carries: the request line's method and target
 * (for http.route) and usually Host; metrics need nothing else. */
#define KSPAN_METRIC_HEAD 128

/* Which end of the exchange this process is: it wrote the request (client) or read it (server). */
enum kspan_role { KSPAN_ROLE_CLIENT = 1, KSPAN_ROLE_SERVER = 2 };

/* Why the kernel emitted the exchange. */
enum kspan_end {
    KSPAN_END_COMPLETE = 1,      /* response framing (Content-Length, chunked end, no-body status) satisfied */
    KSPAN_END_NEXT_REQUEST = 2,  /* next request on the same connection began (keep-alive, unknown framing) */
    KSPAN_END_CLOSED = 3,        /* connection closed; if resp_start_ns == 0 no response was seen */
    KSPAN_END_TIMEOUT = 4,       /* user-space sweep: no progress within the response timeout */
    KSPAN_END_EVICTED = 5,       /* state pushed out (LRU) or process exited */
};

/* Where the bytes came from. */
enum kspan_source { KSPAN_SRC_SOCKET = 0, KSPAN_SRC_OPENSSL = 1, KSPAN_SRC_GO = 2 };

/* How the parent hint was found (see correlator/linker.py). */
enum kspan_parent_kind {
    KSPAN_PARENT_NONE = 0,
    KSPAN_PARENT_THREAD = 1,   /* client request started on a thread serving exactly one request */
    KSPAN_PARENT_PROCESS = 2,  /* client request from a non-serving thread while exactly one request was in flight in the process */
    KSPAN_PARENT_PEER = 3,     /* server request whose peer socket is a traced local client connection */
    KSPAN_PARENT_GOROUTINE = 4,/* Go: client call from a goroutine descended from the serving goroutine */
    KSPAN_PARENT_TRACEPARENT = 5, /* a W3C traceparent header in the request: a remote parent */
    KSPAN_PARENT_TCP_OPTION = 6,  /* the peer's kspan sent the context in a TCP option: a remote parent */
    KSPAN_PARENT_EVIDENCE = 7,    /* event loop: the request carries what names one served request */
};

#define KSPAN_FLAG_TLS 0x1            /* plaintext came from a TLS library, not the socket */
#define KSPAN_FLAG_REQ_HEAD_FULL 0x2  /* req_head is truncated at KSPAN_REQ_HEAD */
#define KSPAN_FLAG_RESP_HEAD_FULL 0x4 /* resp_head is truncated at KSPAN_RESP_HEAD */
#define KSPAN_FLAG_TUPLE_KNOWN 0x8    /* the addresses and ports below are valid */
#define KSPAN_FLAG_INTERIM 0x10       /* a 1xx interim response preceded the final one */
#define KSPAN_FLAG_AMBIGUOUS 0x20     /* client request on a thread serving several: no parent, by rule */
#define KSPAN_FLAG_SAMPLED 0x40       /* head sampling kept this exchange's trace */
#define KSPAN_FLAG_IDS 0x80           /* trace_id/span_id/parent_span_id were fixed in the kernel */
#define KSPAN_FLAG_REMOTE_PARENT 0x100 /* parent_span_id names a span outside this host's kspan */

/* An exchange is identified by (conn_id, req_start_ns): conn_id is the kernel's struct sock
 * address (unique among live sockets, host-wide), so a PEER hint from another process names it. */
struct kspan_exchange {
    __u32 type;              /* KSPAN_REC_EXCHANGE */
    __u32 pid;               /* tgid */
    __u32 tid;
    __u8  role;              /* enum kspan_role */
    __u8  end_reason;        /* enum kspan_end */
    __u8  source;            /* enum kspan_source */
    __u8  parent_kind;       /* enum kspan_parent_kind */
    __u32 flags;             /* KSPAN_FLAG_* */
    __u16 family;            /* AF_INET (2) or AF_INET6 (10); 0 if unknown */
    __u16 local_port;        /* host byte order */
    __u16 remote_port;       /* host byte order */
    __u16 status;            /* final response status parsed in the kernel, 0 if none */
    __u8  local_addr[16];    /* IPv4: first 4 bytes; IPv6: all 16 */
    __u8  remote_addr[16];
    __u32 _pad0;
    __u64 conn_id;
    __u64 req_start_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 req_end_ns;
    __u64 resp_start_ns;     /* 0 if no response seen */
    __u64 resp_end_ns;
    __u64 req_bytes;
    __u64 resp_bytes;
    __u64 parent_conn_id;    /* identity of the parent exchange (parent_kind != NONE) */
    __u64 parent_req_start_ns;
    __u32 parent_pid;
    __u16 req_head_len;      /* valid bytes in req_head */
    __u16 resp_head_len;
    __u8  resp_tail_len;
    __u8  _pad[7];
    /* Identity, fixed in the kernel (KSPAN_FLAG_IDS): a root mints its trace id, a child takes
     * its parent's, so user space never waits for a parent to name a span. */
    __u8  trace_id[16];
    __u64 span_id;
    __u64 parent_span_id;    /* 0: a root */
    char  req_head[KSPAN_REQ_HEAD];
    char  resp_head[KSPAN_RESP_HEAD];
    char  resp_tail[KSPAN_TAIL];
};

/* The W3C trace context of one request, as the kernel fixed it. Shared between the exchange
 * machine (http_exchange.h) and the TCP-option programs (cross-host propagation): the sender's
 * client request writes one into ctx_out, the receiver's option parser into ctx_in. */
struct kspan_trace_ctx {
    __u8  trace_id[16];
    __u64 span_id;           /* the client span's id: the remote parent of the server span */
    __u32 seq;               /* sender's TCP sequence number of the request's first byte; 0 unknown */
    __u8  flags;             /* W3C trace-flags: bit 0 is "sampled" */
    __u8  state;             /* ctx_out: 0 not yet written on a segment, 1 written; ctx_in: unused */
    __u8  _pad[2];
    __u64 ts_ns;             /* when it was stored (bpf_ktime_get_ns) */
};

/* Protocols beyond HTTP/1, recognised on a connection's first bytes (the server port is a hint
 * for a connection picked up mid-stream). Their transfers reach user space as bounded segments,
 * decoded there per connection (correlator/protocols/). */
enum kspan_proto {
    KSPAN_PROTO_REDIS = 1,
    KSPAN_PROTO_POSTGRES = 2,
    KSPAN_PROTO_MYSQL = 3,
    KSPAN_PROTO_HTTP2 = 4,
};

#define KSPAN_SEG_CLOSED 0x1  /* the connection closed: no data (the decoder ends what is open) */
#define KSPAN_SEG_START 0x2   /* the connection's first bytes opened the protocol: seen from its start */
#define KSPAN_SEG_SEQ 0x4     /* tcp_seq is the TCP sequence number of the transfer's first byte */
#define KSPAN_SEG_H2_TAIL 0x20  /* H2_FRAMES: the bytes before the first entry are not HTTP/2 (a 101's head) */
#define KSPAN_SEG_H2_FRAMES 0x10 /* data is HTTP/2 frame entries (struct kspan_h2_entry runs), not the transfer's start */
#define KSPAN_SEG_PEER 0x8    /* a server's read: trace_id is the local client's, from its write at ctx_seq */

struct kspan_segment {
    __u32 type;              /* KSPAN_REC_SEGMENT */
    __u32 pid;
    __u32 tid;
    __u8  dir;               /* 1: this process wrote the bytes, 2: it read them */
    __u8  proto;             /* enum kspan_proto */
    __u8  role;              /* enum kspan_role: the traced process's end of the connection */
    __u8  parent_kind;       /* a client's write: the parent rule that applied (enum kspan_parent_kind) */
    __u32 flags;             /* KSPAN_FLAG_TLS, TUPLE_KNOWN, SAMPLED, AMBIGUOUS */
    __u16 family;
    __u16 local_port;
    __u16 remote_port;
    __u16 data_len;          /* valid bytes in data (<= KSPAN_SEG_DATA) */
    __u8  local_addr[16];
    __u8  remote_addr[16];
    __u32 seg_flags;         /* KSPAN_SEG_* */
    __u32 tcp_seq;           /* KSPAN_SEG_SEQ: the sequence number of the first byte (both ends agree) */
    __u64 conn_id;
    __u64 start_ns;          /* a write's start; a read's data arrival */
    __u64 end_ns;
    __u64 len;               /* bytes transferred (more than data_len: the rest was not copied) */
    __u64 seq;               /* segments of this connection emitted before this one */
    /* a client's write: the trace the request joins, by the kernel's parent rules and sampling;
     * a server's transfer (KSPAN_SEG_PEER): the trace of the local client's write that began at
     * ctx_seq, the latest before ctx_end (the server's read position: a read's end, or for its
     * reply what it had read), so the requests in [ctx_seq, ctx_end) are that client's */
    __u8  trace_id[16];
    __u64 parent_span_id;    /* 0: a root */
    __u32 ctx_seq;
    __u32 ctx_end;
    char  data[KSPAN_SEG_DATA];
};

enum kspan_proc_event { KSPAN_PROC_EXEC = 1, KSPAN_PROC_EXIT = 2 };

struct kspan_proc {
    __u32 type;              /* KSPAN_REC_PROC */
    __u32 pid;
    __u32 event;             /* enum kspan_proc_event */
    __u32 _pad;
    __u64 ts_ns;
    char  comm[16];
};

enum kspan_tcp_event {
    KSPAN_TCP_RETRANSMIT = 1,
    KSPAN_TCP_RESET_SENT = 2,
    KSPAN_TCP_RESET_RECEIVED = 3,
    KSPAN_TCP_CONNECT_FAILED = 4,
    KSPAN_TCP_RTT = 5,
};

struct kspan_tcp {
    __u32 type;              /* KSPAN_REC_TCP */
    __u32 pid;               /* 0 when the event fired outside process context */
    __u32 event;             /* enum kspan_tcp_event */
    __u32 value;             /* RTT in microseconds for KSPAN_TCP_RTT */
    __u64 ts_ns;
    __u64 conn_id;
    __u16 family;
    __u16 local_port;
    __u16 remote_port;
    __u16 _pad;
    __u8  local_addr[16];
    __u8  remote_addr[16];
};

#endif
