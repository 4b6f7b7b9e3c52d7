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
RUN pip install --no-cache-dir . && mkdir -p /app/local_docs/audit
EXPOSE 8443
ENTRYPOINT ["fedgate"]
CMD ["--help"]
