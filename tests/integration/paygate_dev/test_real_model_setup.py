"""scripts/setup_llama.sh: cached, idempotent, and clear about what is missing."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from paygate_dev.llama import SETUP_SCRIPT, LlamaBuild, llama_build
from paygate_dev.stack import ComponentMissing


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_warm_cache_is_a_no_op_with_the_same_paths(llama: LlamaBuild) -> None:
    began = time.monotonic()
    result = _run()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 5  # nothing rebuilt
    assert f"PAYGATE_LLAMA_SERVER={llama.server}" in result.stdout.splitlines()
    assert f"PAYGATE_LLAMA_SMOLLM2={llama.smollm2}" in result.stdout.splitlines()
    assert f"PAYGATE_LLAMA_TINY={llama.tiny}" in result.stdout.splitlines()
    assert os.access(llama.server, os.X_OK)
    assert llama.smollm2.read_bytes()[:4] == llama.tiny.read_bytes()[:4] == b"GGUF"


def test_check_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run("--check", env={"PAYGATE_LLAMA_CACHE": str(tmp_path)})
    assert result.returncode == 1
    for missing in ("llama-server", "SmolLM2 model", "tiny model", "run scripts/setup.sh"):
        assert missing in result.stderr
    assert not any(tmp_path.iterdir())  # --check builds nothing
    monkeypatch.setenv("PAYGATE_LLAMA_CACHE", str(tmp_path))
    with pytest.raises(ComponentMissing, match="not built yet: llama-server"):
        llama_build()


def test_a_missing_compiler_is_named_with_what_to_install(tmp_path: Path) -> None:
    # A PATH with everything but cmake and the C++ compilers.
    tools = tmp_path / "bin"
    tools.mkdir()
    hidden = {"cmake", "g++", "c++", "x86_64-linux-gnu-g++", "x86_64-linux-gnu-g++-12", "g++-12"}
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(directory).iterdir():
            target = tools / entry.name
            if entry.name not in hidden and not target.exists():
                target.symlink_to(entry)
    result = _run(env={"PAYGATE_LLAMA_CACHE": str(tmp_path / "cache"), "PATH": str(tools)})
    assert result.returncode == 1
    assert "FAILED: cmake not found: apt-get install cmake g++ ninja-build" in result.stderr
