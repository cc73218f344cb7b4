"""The agent process: kernel capability probing, bcc loading and attaching, reading records, the CLI.
The only package that imports bcc (and only lazily, so replay and doctor work without it)."""
