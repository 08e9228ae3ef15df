# The coldchain service image (docker-compose.yml builds it).

# The dashboard's front-end libraries come from the npm registry (dashboards/package-lock.json);
# `npm ci` copies what the page loads into dashboards/web/vendor.
FROM node:20-slim AS dashboard
WORKDIR /build
COPY dashboards ./dashboards
RUN npm ci --prefix dashboards

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY coldchain ./coldchain
COPY sensors ./sensors
COPY routing ./routing
# setup.py compiles the route search with mypyc: a C compiler for the install, removed after it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home coldchain
# A non-editable install cannot find dashboards/ beside its source: name it.
COPY --from=dashboard /build/dashboards/web /app/dashboards/web
ENV COLDCHAIN_DASHBOARD_DIR=/app/dashboards/web
# The PDF reports set their text in DejaVu Sans (any Latin, Greek or Cyrillic a person types),
# and Chinese, Japanese and Korean in WenQuanYi Micro Hei.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*
USER coldchain
ENV COLDCHAIN_HTTP_HOST=0.0.0.0
EXPOSE 8080
CMD ["coldchain", "serve"]
