# paygate appliance image: the product only (paygate + enclave from their wheel, with the TPM and
# PKCS#11 bindings and the PostgreSQL ledger's driver), no compilers, no test or demo tooling,
# running as a non-root user.
#
# Build (scripts/build-image.sh does both steps):
#   python3 -m pip wheel --wheel-dir wheels '.[tpm,pkcs11,postgres]'  # every runtime dependency
#   docker build -t paygate .                 # BASE=... picks another Debian 12 base
#
# The wheels come from the build context, so the build needs no package index (and no
# compiler: tpm2-pytss and python-pkcs11 are built once, outside; psycopg's binary wheel carries
# libpq). BASE must be Debian 12 with python3 3.11 and its venv module; the default is the
# public Python image.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The TSS runtime libraries tpm2-pytss links (ESYS, SYS, MU, RC, TCTI loader, FAPI) and the
# TCTIs a deployment uses: the kernel's resource manager (device) and swtpm. Installed unless the
# base already has them. PKCS#11 modules come from the operator's HSM vendor (mounted in, with
# PAYGATE_PKCS11_MODULE naming the file).
ARG TSS_PACKAGES="libtss2-esys-3.0.2-0 libtss2-sys1 libtss2-mu0 libtss2-rc0 libtss2-tctildr0 \
libtss2-fapi1 libtss2-tcti-device0 libtss2-tcti-swtpm0"
RUN set -e; missing=""; \
    for p in $TSS_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --system --uid 10402 --user-group --home-dir /var/lib/paygate --create-home \
      --shell /usr/sbin/nologin paygate

COPY wheels /tmp/wheels
RUN python3 -m venv /opt/paygate/venv \
 && /opt/paygate/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels \
      'paygate[tpm,pkcs11,postgres]' \
 && rm -rf /tmp/wheels \
 && /opt/paygate/venv/bin/python -c "import paygate.cli.main, tpm2_pytss, pkcs11, psycopg, psycopg_pool"

ENV PATH=/opt/paygate/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAYGATE_LISTEN=0.0.0.0:8402 \
    PAYGATE_KEY_FILE=/var/lib/paygate/key.pem \
    PAYGATE_TPM_KEY_DIR=/var/lib/paygate/tpm-key \
    PAYGATE_LEDGER_PATH=/var/lib/paygate/payments.db \
    PAYGATE_DEPLOYMENTS_DIR=/var/lib/paygate/inference
USER paygate
WORKDIR /var/lib/paygate
VOLUME ["/var/lib/paygate"]
EXPOSE 8402
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('PAYGATE_LISTEN', '0.0.0.0:8402').rpartition(':')[2]; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["paygate"]
CMD ["serve"]
