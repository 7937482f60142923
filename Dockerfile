# s3cachefs daemon image. It binds a host directory that is a shared mount
# (`mount --bind D D && mount --make-shared D` once per boot) with rshared and
# mounts *below* it, so the FUSE mount propagates to the host and to worker
# containers that bind the same directory with rslave (they then also see the
# new mount after a daemon restart). README "In containers" has the commands,
# run as written by tests/test_container.py:
#
#   docker run -d --name s3cachefs --restart unless-stopped --network host \
#     --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#     -v /mnt/s3cachefs:/mnt/host:rshared -v /var/cache/s3cachefs:/var/cache/s3cachefs \
#     -v /run/s3cachefs:/run/s3cachefs \
#     -v /etc/s3cachefs/datasets.toml:/etc/s3cachefs/s3cachefs.toml:ro \
#     --env-file /etc/s3cachefs/datasets.env -e S3CACHEFS_MOUNTPOINT=/mnt/host/datasets s3cachefs
#   docker run --rm -v /mnt/s3cachefs:/mnt/host:ro,rslave worker-image   # reads /mnt/host/datasets
#
# With podman, build with `--format docker`: the OCI format drops HEALTHCHECK.
# Build stage: pyfuse3 compiles against libfuse3.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt (pyfuse3 compiles, about
# a minute) only when pyproject.toml changes, not on every source or README edit.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels -r /tmp/requirements.txt
COPY README.md ./
COPY package package
COPY cli cli
COPY api api
COPY daemon daemon
COPY fs fs
COPY datasets datasets
COPY staging staging
COPY cache cache
COPY store store
COPY base base
COPY testing testing
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

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
