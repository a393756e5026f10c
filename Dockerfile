# Presence: one image for the bot (signaling + calls) and the background-job workers.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng flite libgomp1 libopus0 git bubblewrap \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU torch first, from PyTorch's CPU index, so pip never pulls a CUDA build into this image.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY presence ./presence
COPY docs ./docs
# llama.cpp comes prebuilt (the xllamacpp wheel links libgomp1): nothing compiles here.
RUN pip install --no-cache-dir ".[llm]"
# The smart-turn end-of-turn model is a file inside the pipecat-ai wheel (pipecat is never imported).
RUN pip install --no-cache-dir --no-deps pipecat-ai==1.14.0

EXPOSE 8080
# Listen on all interfaces inside the container (the bot then refuses to start without
# PRESENCE_TOKEN_SECRET); ICE host candidates come from the settings.
ENV PRESENCE_HOST=0.0.0.0 PRESENCE_ICE_HOST_ADDRESSES=""
CMD ["presence", "serve"]
