"""Tokenizers: a GGUF model's own (chat template + vocabulary) and the usage estimator.

A provider that reports no usage (some OpenAI-compatible servers on streams) gets its usage counted
here, with the route's `tokenizer_gguf` when configured, else the local model's tokenizer, else
UTF-8 bytes / 4; such usage is always marked `estimated`.
"""

from __future__ import annotations

import json
from typing import Any

from services.inference.domain import Message, ProviderUsage, ToolCall, ToolDef
from services.inference.providers.toolcalls import as_plain_messages, tools_prompt

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PER_MESSAGE_OVERHEAD = 4  # role and separators, when no chat template is known


class GgufTokenizer:
    """A GGUF model's chat template and tokenizer (the vocabulary is read-only: thread-safe)."""

    def __init__(self, llama: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama = llama

        def piece(token: int) -> str:
            return llama._model.token_get_text(token) if token >= 0 else ""

        template = llama.metadata.get("tokenizer.chat_template") or CHATML
        self._formatter = Jinja2ChatFormatter(template, piece(llama.token_eos()), piece(llama.token_bos()))

    @classmethod
    def load(cls, path: str) -> GgufTokenizer:
        """The tokenizer of a GGUF file, without its weights."""
        from llama_cpp import Llama

        return cls(Llama(model_path=path, vocab_only=True, verbose=False))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of `messages` under the chat template (raises ValueError)."""
        try:
            return self._formatter(messages=messages).prompt
        except Exception as exc:  # jinja errors, raise_exception() in templates
            raise ValueError(str(exc)) from None

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)


class UsageEstimator:
    """Token counts for providers that give none. Everything it returns is `estimated`."""

    def __init__(self, tokenizer: GgufTokenizer | None) -> None:
        self._tokenizer = tokenizer

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        if self._tokenizer is not None:
            return len(self._tokenizer.tokenize(text, special=False))
        return (len(text.encode("utf-8")) + 3) // 4

    def prompt_tokens(self, messages: list[Message], tools: list[ToolDef]) -> int:
        tools_text = tools_prompt(tools) if tools else ""
        if self._tokenizer is not None:
            chat = as_plain_messages(messages)
            try:
                return len(self._tokenizer.tokenize(self._tokenizer.render(chat))) + self.count_text(tools_text)
            except ValueError:
                pass  # the template rejects these messages: count them one by one
        total = sum(self.count_text(m["content"]) + PER_MESSAGE_OVERHEAD for m in as_plain_messages(messages))
        return total + self.count_text(tools_text) + 3

    def completion_tokens(self, text: str, calls: list[ToolCall]) -> int:
        extra = "".join(json.dumps({"name": c.name, "arguments": c.arguments_json}) for c in calls)
        return self.count_text(text) + self.count_text(extra)

    def usage(self, messages: list[Message], tools: list[ToolDef], text: str, calls: list[ToolCall],
              reported: ProviderUsage | None = None) -> ProviderUsage:
        """Fill in what the provider did not report (a partial report keeps its numbers)."""
        prompt = reported.prompt_tokens if reported and reported.prompt_tokens else self.prompt_tokens(messages, tools)
        completion = (reported.completion_tokens if reported and reported.completion_tokens
                      else self.completion_tokens(text, calls))
        return ProviderUsage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)
