# mlserve with the bundled demo models. Build: docker build -t mlserve .
# Run:    docker run -p 8080:8080 mlserve     (SIGTERM from `docker stop` drains in-flight requests)
# KServe: the same image serves the one model its storage initializer put in /mnt/models, given the args
#         --model /mnt/models --model-name NAME --host 0.0.0.0 --port 8080   (see deploy/kserve)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLSERVE_HOST=0.0.0.0 \
    MLSERVE_PORT=8080 \
    MLSERVE_MODELS_DIR=/app/models \
    MLSERVE_MLFLOW_CACHE_DIR=/app/mlflow-cache

WORKDIR /app

# Dependencies first, so code changes do not reinstall torch. torch comes from its CPU-only index
# (about 1 GB less than PyPI's CUDA build); for a GPU image: --build-arg TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1 \
    && mkdir mlserve && touch mlserve/__init__.py && pip install . && pip uninstall -y mlserve

COPY mlserve ./mlserve
RUN pip install --no-deps . && rm -rf build mlserve.egg-info

# The demo models are trained at build time from data inside scikit-learn: no downloads.
COPY models/README.md ./models/README.md
RUN mlserve models --models-dir /app/models

# A numeric user, so Kubernetes' runAsNonRoot can verify it; /app is its home and holds what it
# writes (the state file, MLflow downloads).
RUN groupadd --system --gid 10001 mlserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin mlserve \
    && chown -R 10001:10001 /app
USER 10001:10001

EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/ready', timeout=2)"]
ENTRYPOINT ["mlserve", "serve"]
