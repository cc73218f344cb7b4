"""Pure, deterministic: kernel exchange records in, spans out. No bcc, no I/O, no OpenTelemetry."""
