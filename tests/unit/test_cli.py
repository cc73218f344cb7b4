import pytest

from tracer.cli import build_parser, main


def _exit_code_and_err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


def test_unknown_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code_and_err(capsys, ["run", "--no-such-flag"])
    assert code == 2
    assert "unrecognized arguments: --no-such-flag" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--port", "70000"], "outside 1-65535"),
        (["run", "--port", "http"], "is not a number"),
        (["run", "--pid", "-3"], "must be positive"),
        (["run", "--duration", "0"], "greater than 0"),
        (["run", "--otlp-protocol", "thrift"], "invalid choice"),
        (["run", "--query", "maybe"], "invalid choice"),
        (["run", "--context-propagation", "http"], "invalid choice"),
    ],
)
def test_invalid_values_get_clear_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, err = _exit_code_and_err(capsys, argv)
    assert code == 2
    assert message in err


def test_repeatable_filters_parse() -> None:
    args = build_parser().parse_args(["run", "--pid", "1", "--pid", "2", "--exe", "nginx", "--port", "80"])
    assert args.pid == [1, 2] and args.exe == ["nginx"] and args.port == [80]


def test_ringbuf_pages_must_be_a_power_of_two() -> None:
    from tracer.cli import _options

    args = build_parser().parse_args(["run", "--ringbuf-pages", "1000"])
    with pytest.raises(SystemExit, match="power of two"):
        _options(args)


def test_sampler_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from correlator import sampling
    from tracer.cli import _options

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    assert _options(build_parser().parse_args(["run"])).sampler.code == sampling.ALWAYS_OFF
    opts = _options(build_parser().parse_args(["run", "--sampler", "traceidratio", "--sampler-arg", "0.25"]))
    assert opts.sampler.code == sampling.TRACEIDRATIO and opts.sampler.threshold == 1 << 61
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "xray")
    assert _options(build_parser().parse_args(["record", "f"])).sampler.code == sampling.ALWAYS_ON
    assert "'xray' is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="outside 0-1"):
        _options(build_parser().parse_args(["run", "--sampler", "traceidratio", "--sampler-arg", "2"]))


def test_sampler_reaches_the_kernel_globals() -> None:
    from tracer.capture import CaptureConfig, _globals

    g = _globals(CaptureConfig(sampler=5, sample_threshold=1 << 60))
    assert g["kspan_sampler"] == 5 and g["kspan_sample_threshold"] == 1 << 60
    d = _globals(CaptureConfig())
    assert d["kspan_sampler"] == 0 and d["kspan_sample_threshold"] == 1 << 63


def test_context_propagation_defaults_to_tcp_and_reaches_the_capture_options() -> None:
    from tracer.cli import _options

    opts = _options(build_parser().parse_args(["run"]))
    assert opts.context_propagation == "tcp" and opts.context_cgroup is None
    opts = _options(build_parser().parse_args(["record", "f", "--context-propagation", "none",
                                               "--context-cgroup", "/sys/fs/cgroup/unified/app"]))
    assert opts.context_propagation == "none" and opts.context_cgroup == "/sys/fs/cgroup/unified/app"
