"""The terminal client behind `parley ask` and `parley chat`: streams answers as they come."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

import grpc
from google.protobuf import json_format

from parley.chat.v1 import chat_pb2 as pb
from parley.chat.v1 import chat_pb2_grpc
from parley.runtime.clients import make_channel

HELP = "commands: /new (new session), /session (show id), /quit"


class TerminalChat:
    def __init__(self, address: str, user_id: str, json_output: bool = False, api_key: str | None = None,
                 options: pb.ChatOptions | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.options = options or pb.ChatOptions()
        self.address, self.user_id, self.json_output = address, user_id, json_output
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.out, self.err = out, err

    async def _turn(self, stub, message: str, session_id: str) -> pb.ChatResponse:
        final = None
        request = pb.StreamChatRequest(user_id=self.user_id, message=message, session_id=session_id,
                                       options=self.options)
        async for event in stub.StreamChat(request, timeout=600, metadata=self.metadata):
            kind = event.WhichOneof("event")
            if kind == "delta" and not self.json_output:
                self.out.write(event.delta.text)
                self.out.flush()
            elif kind == "tool_call":
                self.err.write(f"\n[tool] {event.tool_call.name}({event.tool_call.arguments_json})\n")
            elif kind == "tool_result":
                r = event.tool_result.record
                self.err.write(f"[tool] {r.name} -> {(r.error or r.result_json)[:300]}\n")
            elif kind == "final":
                final = event.final
        if final is None:
            raise RuntimeError("the stream ended without a final event")
        return final

    def _footer(self, r: pb.ChatResponse) -> None:
        if self.json_output:
            self.out.write(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2) + "\n")
            return
        self.out.write("\n")
        self.out.flush()
        cost = f"${r.usage.cost_usd:.6f}" if r.usage.priced else "unpriced"
        self.err.write(
            f"-- session {r.session_id} | model {r.model} | tokens {r.tokens_used} "
            f"(prompt {r.usage.prompt_tokens}, completion {r.usage.completion_tokens}) | context {r.context_size} "
            f"| {cost} | {r.latency_ms:.0f} ms{' | cached' if r.cache_hit else ''}\n"
        )
        for p in r.pending_approvals:
            self.err.write(f"-- approval needed: {p.tool_name}({p.arguments_json}) id={p.approval_id}\n")

    def _error(self, err: grpc.aio.AioRpcError) -> int:
        self.err.write(f"error: {err.code().name}: {err.details()}\n")
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            self.err.write(f"is `parley up` running at {self.address}?\n")
        return 1

    async def ask(self, message: str, session_id: str = "") -> int:
        channel = make_channel(self.address)
        try:
            final = await self._turn(chat_pb2_grpc.ChatServiceStub(channel), message, session_id)
            self._footer(final)
            return 0
        except grpc.aio.AioRpcError as err:
            return self._error(err)
        finally:
            await channel.close()

    async def repl(self, session_id: str = "") -> int:
        channel = make_channel(self.address)
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.err.write(f"parley chat as {self.user_id} at {self.address}. {HELP}\n")
        try:
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return 0
                line = line.strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    return 0
                if line == "/new":
                    session_id = ""
                    self.err.write("-- a new session starts with your next message\n")
                    continue
                if line == "/session":
                    self.err.write(f"-- session {session_id or '(new)'}\n")
                    continue
                if line.startswith("/"):
                    self.err.write(f"unknown command; {HELP}\n")
                    continue
                self.out.write("parley> ")
                try:
                    final = await self._turn(stub, line, session_id)
                except grpc.aio.AioRpcError as err:
                    self._error(err)
                    continue
                session_id = final.session_id
                self._footer(final)
        finally:
            await channel.close()
