# One image for every service; the compose file picks the service with its command.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY libs ./libs
COPY services ./services
# paymentsctl's code: the entry point alone would fail on `import tools`.
COPY tools ./tools
# Pinned by constraints.txt, so the image holds exactly what CI tested.
RUN python -m venv /venv \
    && /venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim-bookworm
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=build /venv /venv
# Migrations run from the same image (`alembic upgrade head`, the compose `migrate` job).
COPY alembic.ini ./
COPY migrations ./migrations
USER 10001
# No EXPOSE: one image serves five services, each on its own PORT; the compose file
# declares each service's port with `expose:`.
# Every service answers /health on its PORT; no curl in a slim image, so Python asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3000') + '/health', timeout=2)"]
CMD ["python", "-m", "services.gateway"]
