# The chat bot (Discord or Slack): no torch, no runner extra, a small image.
#   docker build -f docker/bot.Dockerfile -t atelier-bot .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ATELIER_DATA_DIR=/data

# The same uid as the runner's image, so both can write the shared data volume.
RUN useradd --create-home --uid 1000 atelier \
 && mkdir -p /data \
 && chown atelier:atelier /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY bot ./bot
# The package's own dependencies only: the bot and storage never import torch, and
# gpu_runner is left out of this image (`atelier doctor` here skips the runner's checks).
RUN pip install .

USER atelier
VOLUME ["/data"]
# Slack in HTTP mode listens here (/slack/events); Discord and Slack Socket Mode need no port.
EXPOSE 3000
CMD ["atelier", "bot", "discord"]
