# The cellbox service image: `cellbox serve` with the default sandbox template built in.
#
# Privileges: sandbox isolation (bubblewrap + cgroups + loop-mounted homes) needs the service
# to run as root in a container that may create cgroups, loop devices and user namespaces:
#   docker run --privileged --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
#              -e CELLBOX_API_KEYS='["change-me"]' -p 8080:8080 cellbox
# That is why this image does not drop to a non-root user (the style guide's default): the
# sandboxes themselves each run as their own unprivileged uid. Without those privileges, run
# trusted code only with `-e CELLBOX_ISOLATION=none` (logged loudly, shown in /healthz).
# Docker images are not built in this project's CI (no engine there); CI runs the same steps
# through scripts/install.sh.

# Pin the base by digest in your own registry mirror.
FROM debian:12-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update && apt-get install -y --no-install-recommends \
        # the service's and the templates' Python
        python3 python3-venv python3-pip \
        # sandbox isolation: namespaces, loop-mounted ext4 homes, mount/losetup
        bubblewrap e2fsprogs util-linux \
        # libseccomp: the syscall filter is compiled with it at start
        libseccomp2 \
        # reaps zombies (the sandboxes' own inits exit when they are killed) and forwards signals
        tini \
        # ps/kill inside sandboxes; the HEALTHCHECK
        procps curl \
        # fonts for matplotlib text in plots
        fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cellbox
# Dependencies first (cache), the code last.
COPY pyproject.toml README.md ./
COPY cellbox/ cellbox/
RUN python3 -m venv /opt/cellbox/venv \
    && /opt/cellbox/venv/bin/pip install --no-cache-dir '.[server]' \
    && /opt/cellbox/venv/bin/cellbox template build --name default --data-dir /var/lib/cellbox

ENV CELLBOX_HOST=0.0.0.0 CELLBOX_PORT=8080 CELLBOX_DATA_DIR=/var/lib/cellbox
EXPOSE 8080
VOLUME /var/lib/cellbox
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tini", "-g", "--"]
CMD ["/opt/cellbox/venv/bin/cellbox", "serve"]
