# paygate appliance image. Build: docker build -t paygate .
# Multi-stage: the TSS headers and compilers needed to build tpm2-pytss stay in the builder.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libtss2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY paygate ./paygate
COPY enclave ./enclave
RUN python -m venv /opt/paygate/venv \
 && /opt/paygate/venv/bin/pip install --no-cache-dir ".[hardware]"

FROM python:3.11-slim-bookworm
# Runtime libraries only: the TSS for TPM keys (device or swtpm TCTI); PKCS#11 modules are
# mounted in by the operator from their HSM vendor.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtss2-esys-3.0.2-0 libtss2-tctildr0 \
      libtss2-tcti-device0 libtss2-tcti-swtpm0 libtss2-mu0 libtss2-rc0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10402 --home-dir /var/lib/paygate --create-home paygate
COPY --from=build /opt/paygate/venv /opt/paygate/venv
ENV PATH=/opt/paygate/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAYGATE_LISTEN=0.0.0.0:8402 \
    PAYGATE_KEY_FILE=/var/lib/paygate/key.pem \
    PAYGATE_TPM_KEY_DIR=/var/lib/paygate/tpm-key
USER paygate
WORKDIR /var/lib/paygate
VOLUME ["/var/lib/paygate"]
EXPOSE 8402
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8402/health/live', timeout=2)" || exit 1
ENTRYPOINT ["paygate"]
CMD ["serve"]
