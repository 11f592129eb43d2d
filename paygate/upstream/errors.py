"""The upstream layer's errors, stable machine codes, messages safe to show: the model
server's failures (:class:`UpstreamError`) and the shaping stage's refusals of a request.

No message carries an API key, a prompt or a body; docker's own error text is reduced to its
explanation, which names containers, images and networks only.
"""

from __future__ import annotations

from paygate.errors import PaygateError


class UpstreamError(PaygateError):
    """Something about the model server (container, attach target, discovery) failed."""

    message = "the model server failed (container, attach target or discovery)"

    code = "upstream_error"


class DockerUnavailable(UpstreamError):
    """The docker engine cannot be reached (DOCKER_HOST / ``docker_host``)."""

    message = "the docker engine cannot be reached (DOCKER_HOST / docker_host)"

    code = "docker_unavailable"


class ContainerFailed(UpstreamError):
    """A container could not be created, started or inspected."""

    message = "a container could not be created, started or inspected"

    code = "container_failed"


class UpstreamNotReady(UpstreamError):
    """The model server did not become ready before its deadline."""

    message = "the model server did not become ready before its deadline"

    code = "upstream_not_ready"


class InvalidName(UpstreamError):
    """A container or deployment name is unusable."""

    message = "a container or deployment name is unusable"

    code = "invalid_name"


class PullFailed(UpstreamError):
    """``paygate upstream pull`` did not complete."""

    message = "paygate upstream pull did not complete"

    code = "pull_failed"


class ModelDigestMismatch(UpstreamError):
    """The served weights are not the ones ``expected_model_digests`` names."""

    message = "the served weights are not the ones expected_model_digests names"

    code = "model_digest_mismatch"


# The shaping stage's refusals (:mod:`paygate.upstream.shaping`): the caller asked for what the
# gateway does not price; the model server is not at fault.


class OptionRefused(PaygateError):
    """A load-time engine option the operator did not allow."""

    message = "a load-time engine option the operator did not allow"

    code = "engine_option_refused"


class LengthKeyRefused(PaygateError):
    """A generation-length key the engine's rules do not cover."""

    message = "a generation-length key the engine's rules do not cover"

    code = "unsupported_limit_key"


class ApiNotServed(PaygateError):
    """The model's engine does not serve this generation API (no limit keys for it)."""

    message = "the model's engine does not serve this generation API"

    code = "model_not_found"
