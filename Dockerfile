# s3cachefs daemon image. Run it privileged enough for FUSE, with the mount
# directory shared back to the host (rshared) so that worker containers can
# bind-mount the FUSE path read-only:
#
#   docker run -d --name s3cachefs --device /dev/fuse --cap-add SYS_ADMIN \
#     --security-opt apparmor:unconfined \
#     -v /mnt/datasets:/mnt/datasets:rshared -v /var/cache/s3cachefs:/var/cache/s3cachefs \
#     -v /etc/s3cachefs/datasets.toml:/etc/s3cachefs/s3cachefs.toml:ro \
#     s3cachefs
#
# Build stage: pyfuse3 compiles against libfuse3.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY package package
COPY daemon daemon
COPY fs fs
COPY cli cli
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: fuse3 (fusermount3, libfuse3) and the wheels, nothing else.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV S3CACHEFS_CONFIG=/etc/s3cachefs/s3cachefs.toml
# Healthy while the daemon answers on its control socket.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["s3cachefs", "status"]
ENTRYPOINT ["s3cachefs"]
CMD ["mount", "--foreground"]
