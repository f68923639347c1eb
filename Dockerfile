# agentjobs server image: `docker build -t agentjobs .` then
#   docker run -d --name agentjobs -p 8005:8005 -v agentjobs-data:/data \
#     -e AGENTJOBS_API_KEYS=team-a:<a key of 16+ characters> agentjobs
# See docs/deployment.md (auth, reverse proxy, graceful stop).

# -- build: wheels for the project and its dependencies --------------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agentjobs ./agentjobs
RUN pip wheel --wheel-dir /wheels .

# -- run ----------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AGENTJOBS_HOST=0.0.0.0 \
    AGENTJOBS_PORT=8005 \
    AGENTJOBS_DATA_DIR=/data
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels agentjobs \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 agentjobs \
 && useradd --system --uid 10001 --gid agentjobs --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin agentjobs \
 && mkdir -p /data && chown agentjobs:agentjobs /data
USER agentjobs:agentjobs
WORKDIR /data
# The journal (every run, its events and result) lives here: keep it on a volume.
VOLUME ["/data"]
EXPOSE 8005
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AGENTJOBS_PORT', '8005'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]
# SIGTERM: stop admitting, give running runs --grace-period (default 10 s), requeue the
# rest durably, exit 0. Give `docker stop` more than that: `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["agentjobs"]
# Binding 0.0.0.0 is what a container needs; the server then refuses to start without
# API keys (AGENTJOBS_API_KEYS or AGENTJOBS_API_KEYS_FILE): see docs/security.md.
CMD ["serve", "--host", "0.0.0.0"]
