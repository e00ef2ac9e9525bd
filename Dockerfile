# flowsvc: the gRPC flow service. Build: docker build -t flowsvc .
# Run: docker run --init -p 50051:50051 -v flowsvc-data:/app/data flowsvc
# The 8 s grace period (FLOWSVC_GRACE_SECONDS) ends before docker stop's default 10 s.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLOWSVC_LISTEN=[::]:50051 \
    FLOWSVC_GRACE_SECONDS=8

WORKDIR /app
# Only what the package needs (see .dockerignore): the code, the generated stubs, the metadata,
# the pins and the license (pyproject names it: the build fails without it).
COPY pyproject.toml README.md constraints.txt LICENSE ./
COPY flowsvc/ flowsvc/
COPY generated/ generated/
# At the versions the tests ran with (constraints.txt), not the newest releases.
RUN pip install --no-cache-dir -c constraints.txt . \
    && groupadd --system --gid 10001 flowsvc \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin flowsvc \
    && mkdir -p /app/data && chown flowsvc /app/data

USER 10001:10001
WORKDIR /app/data
# The execution store (flowsvc.db, relative to here): keep it on a volume, or executions
# and request_id de-duplication are lost with the container.
VOLUME ["/app/data"]
EXPOSE 50051
# grpc_health_probe cannot be fetched here; the package carries its own health client. It
# probes the port of FLOWSVC_LISTEN: change the address with that variable, not with
# `serve --listen`, which the check does not see.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["flowsvc", "probe", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowsvc"]
CMD ["serve"]
