# fedgate image: gateway, emitter and the e2e smoke (dev PKI comes from the init service).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedgate fedgate
COPY gateway gateway
COPY common common
COPY emitter emitter
COPY keyring keyring
COPY schemas schemas
COPY audit audit
COPY tests/e2e tests/e2e
COPY examples examples
COPY tools tools
# SoftHSM2 for a PKCS#11 feedback key (docs/KEYS.md; set SOFTHSM2_CONF in the service).
RUN apt-get update && apt-get install -y --no-install-recommends softhsm2 \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir . && mkdir -p /app/local_docs/audit
# The image's SBOM: the installed dependency set, CycloneDX JSON (the generator's own venv
# is removed afterwards: it is not part of what runs).
RUN python tools/sbom.py generate /usr/share/doc/fedgate/sbom.cdx.json \
      --python /usr/local/bin/python --tools-venv /tmp/sbom-venv && rm -rf /tmp/sbom-venv
EXPOSE 8443
ENTRYPOINT ["fedgate"]
CMD ["--help"]
