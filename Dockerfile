# One image for the whole project: the detector is its entrypoint; the simulator and
# the topic set-up run from the same image with the entrypoint overridden
# (see docker-compose.yml), so the three always share one version of the code.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build reads: tests, scripts and deploy files stay out of the
# image, and editing them does not invalidate the install layer.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY producer_sim ./producer_sim
# A regular (non-editable) install: the code lives in site-packages, so /src can go.
RUN pip install '.[fast]' \
    && cd / \
    && rm -rf /src

# Nothing here needs root; a fixed uid makes file ownership on mounts predictable.
RUN useradd --system --uid 10001 --create-home --home-dir /home/app app
USER app
WORKDIR /home/app

# /metrics, /healthz, /readyz (--metrics-port)
EXPOSE 8000
ENTRYPOINT ["anomaly-detector"]
