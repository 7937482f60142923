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
#
# FUSE passthrough (`--passthrough`): the build stage compiles libfuse 3.17 into a prefix and
# the patched pyfuse3 wheel against it (packaging/build-passthrough.sh); the runtime stage
# copies the prefix to /usr/local/libfuse, where the module's relative rpath looks, and
# installs the wheel, without the compilers. The cache directory must be a volume or a bind
# mount (as below): the kernel refuses backing files on overlayfs, the container's root.
#
# Build stage: libfuse, the patched pyfuse3, then every wheel.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config meson ninja-build \
       curl patch ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The passthrough build in its own layer: rebuilt (about a minute) only when packaging/
# changes. /passthrough keeps the build cache's layout (tests/test_container.py reuses it).
COPY packaging packaging
RUN S3CACHEFS_PASSTHROUGH_CACHE=/passthrough packaging/build-passthrough.sh --cache-only \
    && mkdir -p /patched && cp -a /passthrough/*/libfuse /libfuse \
    && cp /passthrough/*/wheel/*.whl /patched/
# Dependencies next, in their own layer: rebuilt only when pyproject.toml or the pins change,
# not on every source or README edit. pyfuse3 comes from /patched (the pin is its version;
# without libfuse3-dev here a stock build could not even start).
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip wheel --no-cache-dir --find-links /patched -c packaging/constraints.txt \
       --wheel-dir /wheels/deps -r /tmp/requirements.txt
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
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

# Runtime stage: fuse3 (fusermount3), libfuse 3.17 and the wheels, nothing else. The
# dependencies' layer stays cached across source edits; only the project's wheel changes.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /libfuse /usr/local/libfuse
COPY --from=build /wheels/deps /wheels/deps
RUN pip install --no-cache-dir /wheels/deps/*.whl && rm -rf /wheels \
    && python3 -c "import pyfuse3; pyfuse3.passthrough_open"
COPY --from=build /wheels/app /wheels/app
RUN pip install --no-cache-dir --no-deps /wheels/app/*.whl && rm -rf /wheels
ENV S3CACHEFS_CONFIG=/etc/s3cachefs/s3cachefs.toml
# Healthy while the daemon answers on its control socket.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["s3cachefs", "status"]
ENTRYPOINT ["s3cachefs"]
CMD ["mount", "--foreground"]
