# The coldchain service image (docker-compose.yml builds it).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coldchain ./coldchain
COPY sensors ./sensors
COPY routing ./routing
COPY dashboards ./dashboards
RUN pip install --no-cache-dir . && useradd --system --no-create-home coldchain
USER coldchain
ENV COLDCHAIN_HTTP_HOST=0.0.0.0
EXPOSE 8080
CMD ["coldchain", "serve"]
