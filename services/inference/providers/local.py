"""The embedded local model: llama.cpp over a GGUF file (SmolLM2-135M-Instruct by default).

Counts are exact: the prompt is rendered with the GGUF's own chat template and tokenized with its
tokenizer; completion tokens are counted as they are sampled. Tool calls are produced under a
JSON-schema grammar (`toolcalls.call_schema`), so their arguments always parse and match the schema:
- REQUIRED (optionally one `forced_tool`): the answer is a constrained `{"name", "arguments"}` object;
- AUTO: the model answers freely; if it opens a `<tool_call>`, the call is then written under the grammar;
- `response_schema`: the whole answer is constrained to the schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from parley.runtime.errors import FailedPrecondition, InvalidArgument
from services.inference.domain import (
    Event,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    ProviderUsage,
    Role,
    TextDelta,
    TokenCount,
    ToolCallEvent,
    ToolChoice,
    ToolDef,
)
from services.inference.providers.base import Provider
from services.inference.providers.llama_engine import LlamaEngine, Outcome, Params, grammar_for
from services.inference.providers.toolcalls import (
    CALL_OPEN,
    as_plain_messages,
    call_schema,
    closed,
    parse_call,
    with_tools_prompt,
)

TOOL_CALL_MIN_TOKENS = 256  # budget for a tool call's arguments, so they are never cut off mid-JSON
_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "cancelled": FinishReason.STOP}


class LocalProvider(Provider):
    kind = "local"
    native_tools = False

    def __init__(self, engine: LlamaEngine, *, system_prompt: str, default_max_tokens: int,
                 temperature: float = 0.0) -> None:
        self.engine = engine
        self._system_prompt = system_prompt
        self._default_max_tokens = default_max_tokens
        self._temperature = temperature

    # -- prompt ------------------------------------------------------------------------------------
    def _chat(self, messages: list[Message], tools: list[ToolDef], choice: ToolChoice, forced: str) -> list[dict]:
        if not messages or messages[0].role is not Role.SYSTEM:
            # Without a system message SmolLM2's template injects its own persona.
            messages = [Message(Role.SYSTEM, self._system_prompt), *messages]
        if tools and choice is not ToolChoice.NONE:
            messages = with_tools_prompt(messages, tools, forced)
        return as_plain_messages(messages)

    def _tokens(self, chat: list[dict]) -> list[int]:
        try:
            return self.engine.tokenizer.tokenize(self.engine.tokenizer.render(chat))
        except ValueError:
            # Some templates accept only user/assistant turns: send tool results as user turns.
            remapped = [{**m, "role": "user"} if m["role"] == "tool" else m for m in chat]
            try:
                return self.engine.tokenizer.tokenize(self.engine.tokenizer.render(remapped))
            except ValueError as exc:
                raise InvalidArgument(
                    message=f"messages: the local model's chat template rejected them: {exc}",
                    violations={"messages": str(exc)},
                ) from None

    def _budget(self, request: GenerateRequest, prompt_tokens: int) -> int:
        n_ctx = self.engine.n_ctx
        asked = request.sampling.max_tokens
        if prompt_tokens >= n_ctx:
            raise InvalidArgument(
                message=f"messages: the prompt is {prompt_tokens} tokens; the context window of "
                f"{request.model} is {n_ctx} tokens",
                violations={"messages": f"{prompt_tokens} prompt tokens exceed the context window of {n_ctx}"},
            )
        if asked and prompt_tokens + asked > n_ctx:
            raise InvalidArgument(
                message=f"sampling.max_tokens: the prompt is {prompt_tokens} tokens and max_tokens is {asked}: "
                f"{prompt_tokens + asked} exceeds the context window of {request.model} ({n_ctx} tokens); "
                f"ask for at most {n_ctx - prompt_tokens}",
                violations={"sampling.max_tokens": f"at most {n_ctx - prompt_tokens} with this prompt"},
            )
        return asked or min(self._default_max_tokens, n_ctx - prompt_tokens)

    # -- generation --------------------------------------------------------------------------------
    async def stream(self, request: GenerateRequest) -> AsyncIterator[Event]:
        choice = request.effective_tool_choice
        if request.response_schema is not None:
            choice = ToolChoice.NONE
        chat = self._chat(request.messages, request.tools, choice, request.forced_tool)
        tokens = self._tokens(chat)
        max_tokens = self._budget(request, len(tokens))
        s = request.sampling
        params = Params(max_tokens=max_tokens, stop=s.stop, seed=s.seed,
                        temperature=self._temperature if s.temperature is None else s.temperature,
                        top_p=0.95 if s.top_p is None else s.top_p)
        usage = ProviderUsage(prompt_tokens=len(tokens))

        if choice is ToolChoice.REQUIRED:
            async for event in self._tool_call(request, tokens, params, usage):
                yield event
            return

        if request.response_schema is not None:
            params.grammar = grammar_for(closed(request.response_schema), "response_schema")
            params.stop = ()
        outcome = Outcome()
        pieces = self.engine.generate(tokens, params, outcome)
        if choice is ToolChoice.AUTO:
            # Hold text back until it is clearly not the start of a tool call.
            held = ""
            async for piece in pieces:
                held += piece
                head = held.lstrip()
                if head.startswith(CALL_OPEN):
                    await pieces.aclose()
                    usage.completion_tokens += outcome.completion_tokens
                    async for event in self._tool_call(request, tokens, params, usage, outcome.first_token_at):
                        yield event
                    return
                if head and not CALL_OPEN.startswith(head):
                    yield TextDelta(held)
                    break
            else:
                if held:
                    yield TextDelta(held)
        async for piece in pieces:
            yield TextDelta(piece)
        usage.completion_tokens += outcome.completion_tokens
        usage.cached_prompt_tokens = outcome.cached_prompt_tokens
        yield Finish(_REASONS[outcome.reason], usage)

    async def _tool_call(self, request: GenerateRequest, tokens: list[int], params: Params, usage: ProviderUsage,
                         first_token_at: float | None = None) -> AsyncIterator[Event]:
        prefix = self.engine.tokenizer.tokenize(CALL_OPEN)
        prompt = tokens + prefix
        room = self.engine.n_ctx - len(prompt)
        budget = min(max(params.max_tokens, TOOL_CALL_MIN_TOKENS), room)
        grammar = grammar_for(call_schema(request.tools, request.forced_tool), "tools")
        constrained = Params(max_tokens=budget, temperature=params.temperature, top_p=params.top_p,
                             seed=params.seed, grammar=grammar)
        outcome = Outcome()
        text = "".join([piece async for piece in self.engine.generate(prompt, constrained, outcome)])
        first_token_at = first_token_at or outcome.first_token_at
        usage.prompt_tokens = len(prompt)
        usage.completion_tokens += outcome.completion_tokens
        usage.cached_prompt_tokens = outcome.cached_prompt_tokens
        try:
            call = parse_call(text)
        except ValueError:
            raise FailedPrecondition(
                message=f"the local model did not finish the tool call within {budget} tokens "
                f"(context room {room}); raise max_tokens or shorten the prompt",
                reason="TOOL_CALL_INCOMPLETE",
            ) from None
        yield ToolCallEvent(call)
        yield Finish(FinishReason.TOOL_CALLS, usage, first_token_at=first_token_at)

    async def count_tokens(self, messages: list[Message], tools: list[ToolDef]) -> TokenCount:
        choice = ToolChoice.AUTO if tools else ToolChoice.NONE
        tokens = self._tokens(self._chat(messages, tools, choice, ""))
        return TokenCount(len(tokens), self.engine.n_ctx, estimated=False)

    async def check(self) -> bool:
        return True

