"""The commands' shared argument builders: flags that set one setting, bounded whole numbers."""

from __future__ import annotations

import pytest

from paygate.cli.main import build_parser


def _args(*argv: str) -> object:
    return build_parser(argv[0]).parse_args(list(argv))


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        _args(*argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_key_flags_set_the_settings_they_name() -> None:
    from paygate.cli import keys

    args = _args("keys", "show", "--backend", "pkcs11", "--token-label", "t", "--key-label", "k")
    assert keys._KEY_FLAGS.given(args) == {
        "key_backend": "pkcs11",
        "pkcs11_token_label": "t",
        "pkcs11_key_label": "k",
    }
    # Flags not given leave the settings alone (they are not overridden with None).
    assert keys._KEY_FLAGS.given(_args("keys", "create")) == {}


def test_key_backend_flag_takes_only_the_cli_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'tee-memory'" in _refused(
        capsys, "keys", "create", "--backend", "tee-memory"
    )


def test_serve_flags_override_their_settings() -> None:
    from paygate.cli import serve

    args = _args("serve", "--listen", "127.0.0.1:9", "--workers", "4")
    assert serve._FLAGS.given(args) == {"listen": "127.0.0.1:9", "workers": 4}


def test_deploy_flags_keep_their_deployment_fields() -> None:
    from paygate.cli import deploy

    args = _args("deploy", "create", "d1", "--mode", "container", "--cpus", "1.5", "--force")
    assert deploy._given(args) == {"upstream_mode": "container", "container_cpus": 1.5}
    args = _args("deploy", "update", "d1", "--no-payment-gate")
    assert deploy._given(args) == {"no_payment_gate": True}
    assert deploy._given(_args("deploy", "update", "d1", "--payment-gate")) == {
        "no_payment_gate": False
    }


@pytest.mark.parametrize("port", ["0", "-1", "65536", "1e3", "0x50", " 80", "²", "٣", ""])
def test_a_port_is_an_ascii_whole_number_in_range(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    assert _refused(capsys, "discover", f"--port={port}").endswith(
        "argument --port: a port is 1..65535"
    )


def test_ports_at_the_ends_of_the_range_are_taken() -> None:
    assert _args("discover", "--port", "1", "--port", "65535").port == [1, 65535]  # type: ignore[attr-defined]


@pytest.mark.parametrize("workers", ["0", "65", "-1", "²"])
def test_workers_are_1_to_64(capsys: pytest.CaptureFixture[str], workers: str) -> None:
    assert _refused(capsys, "serve", f"--workers={workers}").endswith(
        "must be a whole number from 1 to 64"
    )
