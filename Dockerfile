# The outbox-relay command in a small image: `docker run outbox-relay schema apply`, and later
# `outbox-relay run`. Installs the package exactly as `pip install .` does for users.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY relay ./relay
COPY schema ./schema
RUN pip install . && rm -rf /src

USER nobody
ENTRYPOINT ["outbox-relay"]
CMD ["--help"]
