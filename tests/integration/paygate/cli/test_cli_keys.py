"""`paygate keys create|show` as an operator runs it: real processes, real SoftHSM2 and swtpm."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from paygate_dev.stack import SoftHsmToken, Swtpm

PAYGATE = str(Path(sys.executable).parent / "paygate")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PAYGATE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_software_key_create_then_show(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    created = run("keys", "create", "--backend", "software", "--key-file", str(key_file), "--json")
    assert created.returncode == 0, created.stderr
    facts = json.loads(created.stdout)
    assert facts["backend"] == "software"
    assert len(bytes.fromhex(facts["pubkey"])) == 65
    assert facts["algorithms"]["v1"] == "ECIES-P256-HKDF-SHA256-AES256GCM"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    shown = run("keys", "show", "--json", env={"PAYGATE_KEY_FILE": str(key_file)})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pubkey"] == facts["pubkey"]

    again = run("keys", "create", "--backend", "software", "--key-file", str(key_file))
    assert again.returncode == 2
    assert again.stderr.startswith("error [key_exists]")
    assert "Traceback" not in again.stderr


def test_insecure_and_missing_key_files_are_clear_errors(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    assert run("keys", "create", "--key-file", str(key_file)).returncode == 0
    key_file.chmod(0o644)
    insecure = run("keys", "show", "--key-file", str(key_file))
    assert (insecure.returncode, insecure.stderr.split("]")[0]) == (2, "error [key_file_insecure")
    missing = run("keys", "show", "--key-file", str(tmp_path / "absent.pem"))
    assert (missing.returncode, missing.stderr.split("]")[0]) == (2, "error [key_not_found")


def test_pkcs11_key_create_then_show(softhsm_token: SoftHsmToken) -> None:
    env = {
        "PAYGATE_KEY_BACKEND": "pkcs11",
        "PAYGATE_PKCS11_MODULE": softhsm_token.module_path,
        "PAYGATE_PKCS11_TOKEN_LABEL": softhsm_token.token_label,
        "PAYGATE_PKCS11_PIN": softhsm_token.pin,
        **softhsm_token.env(),
    }
    created = run("keys", "create", "--key-label", "envelope", "--json", env=env)
    assert created.returncode == 0, created.stderr
    shown = run("keys", "show", "--key-label", "envelope", "--json", env=env)
    assert json.loads(shown.stdout)["pubkey"] == json.loads(created.stdout)["pubkey"]
    assert json.loads(shown.stdout)["backend"] == "pkcs11"


def test_pkcs11_wrong_pin_never_echoes_the_pin(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("9999-not-the-pin\n")
    env = {
        "PAYGATE_KEY_BACKEND": "pkcs11",
        "PAYGATE_PKCS11_TOKEN_LABEL": softhsm_token.token_label,
        "PAYGATE_PKCS11_PIN_FILE": str(pin_file),
        **softhsm_token.env(),
    }
    result = run("keys", "create", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error [pkcs11_pin_incorrect]")
    assert "9999-not-the-pin" not in result.stderr + result.stdout


def test_pkcs11_without_pin_is_a_config_error(softhsm_token: SoftHsmToken) -> None:
    result = run("keys", "show", "--backend", "pkcs11", env=softhsm_token.env())
    assert result.returncode == 2
    assert result.stderr.startswith("error [config_error]")
    assert "PAYGATE_PKCS11_PIN" in result.stderr


def test_tpm_key_create_then_show(swtpm: Swtpm, tmp_path: Path) -> None:
    key_dir = tmp_path / "tpm-key"
    args = ["--backend", "tpm", "--tcti", swtpm.tcti, "--tpm-key-dir", str(key_dir), "--json"]
    created = run("keys", "create", *args)
    assert created.returncode == 0, created.stderr
    shown = run("keys", "show", *args)
    assert json.loads(shown.stdout)["pubkey"] == json.loads(created.stdout)["pubkey"]
    assert json.loads(shown.stdout)["persistent"] is True


def test_unreachable_tpm_is_a_clear_error(tmp_path: Path) -> None:
    from paygate_dev.stack import free_port

    result = run(
        "keys", "create", "--backend", "tpm", "--tcti", f"swtpm:host=127.0.0.1,port={free_port()}",
        "--tpm-key-dir", str(tmp_path / "tpm-key"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error [tpm_unreachable]")
    assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [PAYGATE, "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("opened in order") == 2
    assert result.stdout.count("refused: decryption failed") == 4
    # part 2: the real gateway in front of the fake, with the TPM key
    assert "(v2, sealed, stream) -> 200, carries text/event-stream" in result.stdout
    assert "stream complete and authenticated" in result.stdout
    assert "POST /api/pull -> 404 (not forwarded: the fake saw 0)" in result.stdout
    # part 3: paid with the OpenAI SDK on paygate's transport, settled on anvil, once each,
    # answered by llama.cpp with real weights (setup builds it: no fallback to the fake here)
    assert "model server: llama.cpp llama-server, SmolLM2-135M-Instruct" in result.stdout
    assert "-> 'The capital of France is Paris.'" in result.stdout
    # ... attested before its first prompt (every check passed or skipped by the policy)
    assert "attested before the first prompt (kind tpm)" in result.stdout
    for check in ("ek_chain", "activation", "quote", "certify_sealing_key", "pay_to"):
        assert f"pass {check}" in result.stdout
    assert "fail " not in result.stdout
    assert "signed receipt verified" in result.stdout
    assert result.stdout.count("paid 0.001 USDC, tx 0x") == 2
    assert "receipt in-band" in result.stdout
    assert "unsealed body on a paid route -> 415" in result.stdout
    assert "seller now 0.002 USDC, payer 4.998 USDC" in result.stdout
