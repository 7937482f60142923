# Placeholder image until the deployment issue: s3cachefs with fuse3, nothing more.
# Run with: --device /dev/fuse --cap-add SYS_ADMIN and a bind mount with rshared propagation.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . && apt-get purge -y gcc libfuse3-dev pkg-config && apt-get autoremove -y
ENTRYPOINT ["s3cachefs"]
