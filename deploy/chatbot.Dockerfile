# The chatbot API server; in production it runs the `openai` engine against vLLM + LMCache.
# Build from the repository root (docker-compose.yml does this):
#   docker build -f deploy/chatbot.Dockerfile -t lmcache-chatbot:0.1.0 .

FROM python:3.11-slim AS build
# llama-cpp-python is a dependency of the package whatever the engine, and pip compiles
# llama.cpp while installing it (about 8 minutes on 2 cores); the compilers stay in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY backend/ /src/backend/
RUN pip install --no-cache-dir /src/backend

FROM python:3.11-slim
# llama.cpp's shared libraries link the C++ and OpenMP runtimes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libstdc++6 \
    && rm -rf /var/lib/apt/lists/*
# Same base image and path as the build stage, so the venv's interpreter links stay valid.
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 chatbot
USER chatbot
# CHATBOT_HOST=0.0.0.0 makes the server refuse to start without CHATBOT_API_KEYS.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=8000
EXPOSE 8000
CMD ["chatbot", "serve"]
