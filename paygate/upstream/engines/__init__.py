"""Engine profiles: what paygate knows about each model server (see base.EngineProfile)."""

from __future__ import annotations

from paygate.upstream.engines.base import EngineKind, EngineProfile
from paygate.upstream.engines.llama_server import LlamaServerProfile
from paygate.upstream.engines.ollama import OllamaProfile
from paygate.upstream.engines.openai import OpenAIProfile
from paygate.upstream.engines.vllm import VllmProfile

PROFILES: dict[str, EngineProfile] = {
    profile.kind: profile
    for profile in (OllamaProfile(), LlamaServerProfile(), VllmProfile(), OpenAIProfile())
}


def profile_for(kind: EngineKind | str) -> EngineProfile:
    """The profile of ``kind`` (settings validate the name, so a KeyError is a bug)."""
    return PROFILES[kind]


__all__ = ["PROFILES", "EngineKind", "EngineProfile", "profile_for"]
