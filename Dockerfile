# GreyFox in a container: docker run -p 8080:8080 -v ./data:/app/database -e OPENAI_API_KEY=... greyfox
FROM python:3.11-slim

# EXTRAS="[postgres]" adds the PostgreSQL driver (docs/scale-out/compose.yaml).
ARG EXTRAS=""
WORKDIR /app
COPY setup.py README.md ./
COPY greyfox ./greyfox
COPY twisted ./twisted
COPY web ./web
RUN pip install --no-cache-dir ".${EXTRAS}" \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && useradd --system --home /app greyfox \
 && mkdir -p /app/database /app/data \
 && chown greyfox /app/database /app/data

USER greyfox
VOLUME ["/app/database"]
EXPOSE 8080
# Inside the container the port must be reachable from the host: listen on all
# interfaces. Set GREYFOX_CLIENT_TOKEN if anything but you can reach the port.
ENV GREYFOX_LISTEN=tcp:8080 \
    GREYFOX_DB=/app/database/greyfox.db \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# exec form: twistd is PID 1 and receives SIGTERM, so the ledger is flushed on stop.
CMD ["twistd", "-n", "--pidfile=", "greyfox"]
