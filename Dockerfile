# musicgen-bot on a CUDA host: docker run --gpus all -v musicgen-cache:/cache -v ./data:/data ...
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

# ffmpeg encodes the MP3s (pydub); certificates for the model hub and Discord.
# Unpinned on purpose: the base image's release pins them, and security fixes should land.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv

WORKDIR /app
# Dependencies first, from the lock, so code changes do not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv python install 3.11 \
    && uv sync --locked --no-dev --no-install-project
COPY bot ./bot
COPY generation ./generation
RUN uv sync --locked --no-dev

RUN useradd --create-home --uid 10001 musicgen \
    && mkdir -p /cache /data \
    && chown musicgen:musicgen /cache /data
USER 10001:10001

# Model weights (Hugging Face, torch hub for demucs) and the database live in volumes.
ENV PATH="/app/.venv/bin:${PATH}" \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch
VOLUME ["/cache", "/data"]

ENTRYPOINT ["musicgen-bot"]
CMD ["run", "--config", "/data/config.toml"]
