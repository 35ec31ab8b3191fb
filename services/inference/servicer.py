"""gRPC servicer of parley.inference.v1.InferenceService: proto <-> domain, nothing else."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator

from google.protobuf import json_format, struct_pb2

from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc
from parley.runtime import validation as v
from services.inference.core import InferenceCore
from services.inference.domain import (
    FinishReason,
    GenerateRequest,
    Message,
    ModelInfo,
    Response,
    Role,
    Sampling,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolDef,
)

ROLES = {pb.ROLE_SYSTEM: Role.SYSTEM, pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT,
         pb.ROLE_TOOL: Role.TOOL}
CHOICES = {pb.TOOL_CHOICE_UNSPECIFIED: None, pb.TOOL_CHOICE_AUTO: ToolChoice.AUTO,
           pb.TOOL_CHOICE_NONE: ToolChoice.NONE, pb.TOOL_CHOICE_REQUIRED: ToolChoice.REQUIRED}
FINISH = {FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED, FinishReason.STOP: pb.FINISH_REASON_STOP,
          FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
          FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER}


def _integral(value):
    """A Struct stores every number as a double: give JSON schemas back their integers (maxLength: 40)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


@functools.lru_cache(maxsize=512)
def _struct_json(serialized: bytes) -> str:
    """A Struct (its deterministic serialization) as JSON. The same tool schemas come with every request of an
    agent: converting one with `MessageToDict` takes ~40 us in Python, parsing this JSON again ~5 us."""
    struct = struct_pb2.Struct()
    struct.ParseFromString(serialized)
    return json.dumps(_integral(json_format.MessageToDict(struct)))


def _dict(message, field: str) -> dict | None:
    """The Struct `field` of `message` as a new dict (the caller may change it), or None when unset."""
    if not message.HasField(field):
        return None
    return json.loads(_struct_json(getattr(message, field).SerializeToString(deterministic=True)))


def messages_of(items) -> list[Message]:
    return [
        Message(ROLES.get(m.role), m.content,
                tuple(ToolCall(c.id, c.name, c.arguments_json) for c in m.tool_calls), m.tool_call_id, m.name)
        for m in items
    ]


def request_of(r: pb.GenerateRequest | pb.StreamGenerateRequest) -> GenerateRequest:
    if r.tool_choice not in CHOICES:
        raise v.invalid("tool_choice", f"unknown value {r.tool_choice}")
    s = r.sampling
    return GenerateRequest(
        model=r.model,
        messages=messages_of(r.messages),
        tools=[ToolDef(t.name, t.description, _dict(t, "parameters") or {"type": "object", "properties": {}})
               for t in r.tools],
        tool_choice=CHOICES[r.tool_choice],
        forced_tool=r.forced_tool,
        sampling=Sampling(
            max_tokens=s.max_tokens,
            temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None,
            stop=tuple(s.stop),
            seed=s.seed if s.HasField("seed") else None,
        ),
        response_schema=_dict(r, "response_schema"),
    )


def response_pb(r: Response) -> pb.GenerateResponse:
    u, t = r.usage, r.timing
    return pb.GenerateResponse(
        model=r.model,
        provider=r.provider,
        message=pb.Message(role=pb.ROLE_ASSISTANT, content=r.text,
                           tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
                                       for c in r.tool_calls]),
        finish_reason=FINISH[r.finish_reason],
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       total_tokens=u.total_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                       estimated=u.estimated, cost=pb.Cost(priced=u.cost.priced, cost_usd=u.cost.usd)),
        timing=pb.Timing(time_to_first_token_ms=t.time_to_first_token_ms, total_ms=t.total_ms,
                         decode_tokens_per_second=t.decode_tokens_per_second),
        fallbacks_tried=r.fallbacks_tried,
    )


def model_pb(m: ModelInfo) -> pb.Model:
    p = m.pricing
    return pb.Model(
        name=m.name, provider=m.provider, provider_model=m.provider_model, context_window=m.context_window,
        reachable=m.reachable, native_tool_calling=m.native_tool_calling, is_default=m.is_default,
        fallbacks=m.fallbacks,
        pricing=pb.Pricing(input_per_mtok=p.input_per_mtok, output_per_mtok=p.output_per_mtok,
                           cached_input_per_mtok=p.cached_input_per_mtok) if p else None,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return response_pb(await self.core.generate(request_of(request)))

    async def StreamGenerate(self, request: pb.StreamGenerateRequest,
                             context) -> AsyncIterator[pb.StreamGenerateResponse]:
        async for event in self.core.stream(request_of(request)):
            if isinstance(event, TextDelta):
                yield pb.StreamGenerateResponse(delta=pb.TextDelta(text=event.text))
            elif isinstance(event, Response):
                yield pb.StreamGenerateResponse(final=pb.StreamFinal(response=response_pb(event)))
            else:
                c = event.call
                yield pb.StreamGenerateResponse(tool_call=pb.ToolCall(id=c.id, name=c.name,
                                                                      arguments_json=c.arguments_json))

    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        counted = await self.core.count_tokens(request.model, messages_of(request.messages))
        return pb.CountTokensResponse(prompt_tokens=counted.prompt_tokens, context_window=counted.context_window,
                                      estimated=counted.estimated)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        size = v.page_size(request.page_size)
        scope = {"rpc": "ListModels"}  # AIP-158: page_size may change between pages
        start = (v.decode_page_token(request.page_token, scope) or [0])[0]
        if not isinstance(start, int) or start < 0:
            raise v.invalid("page_token", "is not a token this server issued")
        models = await self.core.list_models()
        page = models[start:start + size]
        token = v.encode_page_token([start + size], scope) if start + size < len(models) else ""
        return pb.ListModelsResponse(models=[model_pb(m) for m in page], next_page_token=token)
