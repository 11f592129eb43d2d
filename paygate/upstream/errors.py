"""The upstream layer's errors: one family, stable machine codes, messages safe to show.

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
