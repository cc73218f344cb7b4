"""The agent process: kernel capability probing, the libbpf loader (the only code touching libbpf),
attaching, reading records, process discovery, Kubernetes metadata and the CLI."""
