# The chatbot API server; in production it runs the `openai` engine against vLLM + LMCache.
# Build from the repository root (docker-compose.yml does this):
#   docker build -f deploy/chatbot.Dockerfile -t lmcache-chatbot:0.1.0 .
#
# No compiler and no llama.cpp: the embedded engine is the optional extra `embedded`, left out
# here. Every dependency comes from deploy/chatbot.requirements.lock, pinned, with --no-deps,
# so two builds install the same versions.

FROM python:3.11-slim AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/chatbot.requirements.lock /src/chatbot.requirements.lock
RUN pip install --no-cache-dir --no-deps -r /src/chatbot.requirements.lock
COPY backend/ /src/backend/
RUN pip install --no-cache-dir --no-deps /src/backend

FROM python:3.11-slim
# Same base image and path as the build stage, so the venv's interpreter links stay valid.
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 chatbot
USER chatbot
# CHATBOT_HOST=0.0.0.0 makes the server refuse to start without CHATBOT_API_KEYS.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHATBOT_ENGINE=openai \
    CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=8000
EXPOSE 8000
CMD ["chatbot", "serve"]
