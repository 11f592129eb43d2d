"""Engine profiles: routes, model lists, weights digests and container launches (pure data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from paygate_dev.fake_model import install_model, manifest_document

from paygate.config import ConfigError, load_settings
from paygate.server.routes import engine_routes
from paygate.upstream.engines import PROFILES, profile_for
from paygate.upstream.engines.base import LaunchTarget, ModelDigest, ProfileError
from paygate.upstream.engines.ollama import manifest_digests
from paygate.upstream.errors import ModelDigestMismatch
from paygate.upstream.service import check_digests
from paygate.upstream.spec import container_spec, serving_kwargs


def _target(**overrides: object) -> LaunchTarget:
    values: dict[str, object] = {
        "listen": "127.0.0.1",
        "port": 8080,
        "models_dir": "/models",
        "model_path": Path("/srv/m.gguf"),
        "alias": "m",
        "threads": 2,
    }
    values.update(overrides)
    return LaunchTarget(**values)  # type: ignore[arg-type]


def test_every_kind_has_a_profile_with_openai_routes() -> None:
    assert set(PROFILES) == {"ollama", "llama-server", "vllm", "openai"}
    for kind, profile in PROFILES.items():
        assert profile.kind == kind
        table = engine_routes(profile.routes())
        assert table.match("POST", "/v1/chat/completions") is not None
        assert table.match("GET", "/health/ready") is not None
        ollama_native = table.match("POST", "/api/chat") is not None
        assert ollama_native == (kind == "ollama")


def test_health_and_model_lists() -> None:
    assert profile_for("ollama").health_path == "/api/version"
    assert profile_for("llama-server").health_path == "/health"
    assert profile_for("vllm").health_path == "/health"
    assert profile_for("openai").health_path == "/v1/models"
    listing = {"models": [{"name": "x"}], "object": "list", "data": [{"id": "y"}, {"no": 1}]}
    assert profile_for("llama-server").model_names(listing) == ["y"]
    assert profile_for("ollama").model_names(listing) == ["x"]
    assert profile_for("openai").model_names("junk") == []


def test_gguf_digest_is_the_files_sha256(tmp_path: Path) -> None:
    model = tmp_path / "w.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    expected = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    served = profile_for("llama-server").digests(model, "name")
    assert [(d.name, d.digest) for d in served] == [("name", expected)]
    assert profile_for("openai").digests(model, None)[0].name == "w.gguf"
    assert profile_for("llama-server").digests(None, None) == []
    with pytest.raises(ProfileError, match="cannot read the model file"):
        profile_for("llama-server").digests(tmp_path / "missing.gguf", None)


def test_vllm_digest_of_a_directory_covers_every_shard(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"one")
    (tmp_path / "b.safetensors").write_bytes(b"two")
    (tmp_path / "config.json").write_text("{}")
    first = profile_for("vllm").digests(tmp_path, "m")[0].digest
    (tmp_path / "b.safetensors").write_bytes(b"TWO")
    assert profile_for("vllm").digests(tmp_path, "m")[0].digest != first
    single = profile_for("vllm").digests(tmp_path / "a.safetensors", None)[0]
    assert single.digest == "sha256:" + hashlib.sha256(b"one").hexdigest()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="no weight files"):
        profile_for("vllm").digests(tmp_path / "empty", None)


def test_ollama_digest_is_the_model_layer_not_the_manifest(tmp_path: Path) -> None:
    library = tmp_path / "manifests" / "registry.ollama.ai" / "library"
    install_model(tmp_path, "llama3:8b")
    manifest = manifest_document("llama3:8b")
    assert json.loads((library / "llama3" / "8b").read_text()) == manifest
    other = tmp_path / "manifests" / "example.org" / "team" / "tool"
    other.mkdir(parents=True)
    (other / "latest").write_text(json.dumps({"layers": [{"mediaType": "x", "digest": "y"}]}))
    layer = "sha256:" + hashlib.sha256(b"llama3:8b").hexdigest()
    assert [(d.name, d.digest) for d in manifest_digests(tmp_path / "manifests")] == [
        ("llama3:8b", layer)
    ]
    ollama = profile_for("ollama")
    assert ollama.digests(tmp_path, "llama3:8b")[0].digest == layer
    with pytest.raises(ProfileError, match="no manifest for llama3:latest"):
        ollama.digests(tmp_path, "llama3")
    (library / "llama3" / "bad").write_text("{")
    with pytest.raises(ProfileError, match="unreadable Ollama manifest"):
        ollama.digests(tmp_path, None)


def test_ollama_weights_are_the_blob_served_not_the_manifest_text(tmp_path: Path) -> None:
    """The model blob Ollama loads is hashed at start and must be what its manifest names: a
    swapped blob, a missing one or a manifest pointing outside blobs/ refuses to start."""
    install_model(tmp_path, "llama3:8b")
    ollama = profile_for("ollama")
    layer = "sha256:" + hashlib.sha256(b"llama3:8b").hexdigest()
    blob = tmp_path / "blobs" / layer.replace(":", "-")
    assert ollama.digests(tmp_path, "llama3:8b")[0].digest == layer
    blob.write_bytes(b"other weights, same manifest")
    with pytest.raises(ProfileError, match="do not match their manifest"):
        ollama.digests(tmp_path, "llama3:8b")
    with pytest.raises(ProfileError, match="do not match their manifest"):
        ollama.digests(tmp_path, None)  # every pulled model is checked, not just one
    blob.unlink()
    with pytest.raises(ProfileError, match="weights of llama3:8b are missing"):
        ollama.digests(tmp_path, "llama3:8b")
    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "llama3" / "8b"
    document = json.loads(manifest.read_text())
    document["layers"][0]["digest"] = "sha256:../../etc/passwd"
    manifest.write_text(json.dumps(document))
    with pytest.raises(ProfileError, match="digest is bad"):
        ollama.digests(tmp_path, "llama3:8b")


def test_container_launches() -> None:
    llama = profile_for("llama-server").launch(_target())
    assert llama.command == (
        "-m", "/models/m.gguf", "--host", "127.0.0.1", "--port", "8080", "--alias", "m", "-t", "2"
    )  # fmt: skip
    assert llama.model_file == Path("/srv/m.gguf")
    assert llama.model_target == "/models/m.gguf"
    assert "-t" not in profile_for("llama-server").launch(_target(threads=None)).command
    with pytest.raises(ProfileError, match="needs upstream_model_path"):
        profile_for("llama-server").launch(_target(model_path=None))
    ollama = profile_for("ollama").launch(_target(port=11434, models_dir="/root/.ollama"))
    assert ollama.command == ()
    assert ollama.model_file is None
    assert ollama.environment == {
        "OLLAMA_HOST": "127.0.0.1:11434",
        "OLLAMA_MODELS": "/root/.ollama/models",
    }
    vllm = profile_for("vllm").launch(_target())
    assert vllm.environment == {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    assert vllm.command == (
        "--model", "/models/m.gguf", "--served-model-name", "m",
        "--host", "127.0.0.1", "--port", "8080",
    )  # fmt: skip
    assert (vllm.model_file, vllm.model_target) == (Path("/srv/m.gguf"), "/models/m.gguf")
    with pytest.raises(ProfileError, match="vllm in container mode needs upstream_model_path"):
        profile_for("vllm").launch(_target(model_path=None))
    # Each launch has its own environment: changing one never reaches the profile's.
    vllm.environment["HF_HUB_OFFLINE"] = "0"  # type: ignore[index]
    assert profile_for("vllm").launch(_target()).environment["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ProfileError, match="no container recipe"):
        profile_for("openai").launch(_target())
    assert profile_for("openai").container is None
    assert profile_for("llama-server").pull_path is None
    assert profile_for("ollama").pull_path == "/api/pull"


def test_expected_digests_are_checked_exactly() -> None:
    good = "sha256:" + "a" * 64
    served = [ModelDigest("m", good)]
    check_digests({}, served)
    check_digests({"m": good}, served)
    with pytest.raises(ModelDigestMismatch, match=r"m: expected sha256:b+, served sha256:a+"):
        check_digests({"m": "sha256:" + "b" * 64}, served)
    with pytest.raises(ModelDigestMismatch, match=r"other: expected .*, served nothing") as err:
        check_digests({"other": good}, served)
    assert err.value.code == "model_digest_mismatch"


def test_expected_digest_settings_are_validated() -> None:
    settings = load_settings(None, expected_model_digests={"m": " SHA256:" + "A" * 64})
    assert settings.expected_model_digests == {"m": "sha256:" + "a" * 64}
    with pytest.raises(ConfigError, match="expected_model_digests"):
        load_settings(None, expected_model_digests={"m": "md5:abc"})


def test_container_defaults_follow_the_kind(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    settings = load_settings(
        None, upstream_kind="llama-server", upstream_model_path=model, upstream_cpus=1
    )
    spec = container_spec(settings.upstream())
    assert (spec.name, spec.image, spec.port) == (
        "paygate-llama-server", "ghcr.io/ggml-org/llama.cpp:server", 8080
    )  # fmt: skip
    assert spec.alias == "tiny.gguf"
    kwargs = serving_kwargs(spec)
    assert kwargs["command"][:2] == ["-m", "/models/tiny.gguf"]
    (mount,) = kwargs["mounts"]
    assert (mount["Target"], mount["Source"], mount["ReadOnly"]) == (
        "/models/tiny.gguf", str(model), True
    )  # fmt: skip
    assert kwargs["network_mode"] == "none"
    ollama = container_spec(load_settings(None).upstream())
    assert (ollama.name, ollama.image, ollama.port, ollama.volume) == (
        "paygate-ollama", "ollama/ollama", 11434, "paygate-ollama-models"
    )  # fmt: skip
