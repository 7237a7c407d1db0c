"""Stateless chat completions, as OpenAI's API has them: the client sends the whole
conversation each time, and the engine's prefix cache finds what it has already read.

This service decides what the engine is asked: the messages (``developer`` read as
``system``; the server's system prompt first when the client sent none, so that both APIs
share one cached preamble), how much of them is public, and the key that keeps a
conversation on one replica. The route only translates to and from OpenAI's wire format.
"""

from __future__ import annotations

from chatbot.agents.layout import Prompt
from chatbot.config import Settings
from chatbot.models.domain import ChatMessage, PromptFormatInfo
from chatbot.models.errors import InvalidRequest, NotFound
from chatbot.models.schemas import ChatCompletionRequest
from chatbot.services.generation import GenerationService, MeteredGeneration


class CompletionService:
    def __init__(self, generations: GenerationService, settings: Settings) -> None:
        self._generations = generations
        self._server_prompt = ChatMessage(role="system", content=settings.system_prompt)

    @property
    def model_id(self) -> str:
        return self._generations.model_id

    @property
    def context_tokens(self) -> int:
        return self._generations.context_tokens

    @property
    def prompt_format(self) -> PromptFormatInfo | None:
        return self._generations.engine.prompt_format()

    async def start(self, user_id: str, request: ChatCompletionRequest) -> MeteredGeneration:
        """Admit the completion or raise (400 unsupported parameter or limits, 404 unknown
        model, 429 stream limit, 503 engine full)."""
        if (parameter := request.unsupported_parameter()) is not None:
            raise InvalidRequest(
                f"{parameter!r} is not supported by this server; send the request without it",
                code="unsupported_parameter",
            )
        if request.model != self.model_id:
            raise NotFound(
                f"the model {request.model!r} does not exist; this server serves {self.model_id!r}",
                code="model_not_found",
            )
        prompt = self.prompt(request)
        stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        sampling = self._generations.sampling(
            max_tokens=request.max_completion_tokens or request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=stop,
            seed=request.seed,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
        )
        return await self._generations.start(
            prompt, sampling, user_id=user_id, session=self._session(user_id, prompt.messages)
        )

    def prompt(self, request: ChatCompletionRequest) -> Prompt:
        messages = [
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
            for m in request.messages
        ]
        if not any(m.role == "system" for m in messages):
            messages.insert(0, self._server_prompt)
        # A client's own system prompt is its own content, cached for it alone, unless it
        # is the server's, which everyone shares.
        return Prompt(messages, public_messages=1 if messages[0] == self._server_prompt else 0)

    @staticmethod
    def _session(user_id: str, messages: list[ChatMessage]) -> str:
        """A conversation is known by its user and its first message, which every later
        request of the conversation repeats."""
        first = next((m.content for m in messages if m.role != "system"), "")
        return f"{user_id}\n{first}"
