# The GPU runner: CUDA torch, diffusers, peft. Built by docker-compose.yml (`docker compose build`).
#   docker build -f docker/runner.Dockerfile -t atelier-runner .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# PyPI's Linux x86_64 torch wheels carry their own CUDA libraries; the host's NVIDIA driver
# comes in through the NVIDIA Container Toolkit. For another CUDA version pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# and to pin a version --build-arg TORCH_SPEC=torch==2.5.1.
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRANSFORMERS_VERBOSITY=error \
    HF_HOME=/models/huggingface \
    HF_HUB_OFFLINE=1 \
    ATELIER_DATA_DIR=/data

# Torch first, in its own layer (several GB): code changes do not reinstall it. The
# constraint keeps the runner extra from swapping it for another build (as install.sh does).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \
    > /etc/atelier-torch-constraint.txt

# The same uid as the bot's image, so both can write the shared data volume.
RUN useradd --create-home --uid 1000 atelier \
 && mkdir -p /data /models/huggingface \
 && chown -R atelier:atelier /data /models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY gpu_runner ./gpu_runner
COPY bot ./bot
RUN pip install -c /etc/atelier-torch-constraint.txt ".[runner]"

USER atelier
VOLUME ["/data", "/models"]
CMD ["atelier", "runner"]
