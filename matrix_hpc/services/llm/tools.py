"""Tool calling for backends whose engine produces plain text (vllm, scripted).

Tools are shown to the model through the chat template when it knows tools, else through a
system message in the common ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` style;
calls are parsed back from that form. ``tool_choice`` "required" or a tool name forces a call with
guided decoding on a JSON schema, so even a tiny model produces a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from matrix_hpc.services.llm.results import ToolCall

_TAG = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    lines = [
        "You can call functions. To call one, answer with",
        '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>',
        "Available functions:",
    ]
    for t in tools:
        lines.append(
            json.dumps(
                {
                    "name": t["name"],
                    "description": t.get("description", ""),
                    "parameters": t.get("parameters") or {"type": "object"},
                }
            )
        )
    return "\n".join(lines)


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t.get("description", ""),
                "parameters": t.get("parameters") or {"type": "object"},
            },
        }
        for t in tools
    ]


def forced_call_schema(tools: list[dict[str, Any]], tool_choice: str) -> dict[str, Any]:
    """JSON schema of one call: ``{"name": ..., "arguments": {...}}`` for the allowed tools."""
    allowed = [t for t in tools if tool_choice in ("required", t["name"])]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["name"]]},
                "arguments": t.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in allowed
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:16]


def parse_forced_call(text: str) -> list[ToolCall]:
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    if not isinstance(obj, dict) or "name" not in obj:
        return []
    return [ToolCall(new_call_id(), str(obj["name"]), json.dumps(obj.get("arguments", {})))]


def parse_tagged_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """Tool calls written as ``<tool_call>{...}</tool_call>``; returns (text without them, calls)."""
    calls: list[ToolCall] = []
    for m in _TAG.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            calls.append(ToolCall(new_call_id(), obj["name"], json.dumps(obj.get("arguments", {}))))
    if not calls:
        return text, []
    return _TAG.sub("", text).strip(), calls


def render_messages_for_text_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], template_knows_tools: bool
) -> list[dict[str, Any]]:
    """Messages a plain chat template can render: tool calls written out as tagged text."""
    if template_knows_tools:
        return messages
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            text = "".join(
                "<tool_call>"
                + json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": json.loads(c["function"]["arguments"] or "{}"),
                    }
                )
                + "</tool_call>"
                for c in calls
            )
            m["content"] = ((m.get("content") or "") + text).strip()
        m.pop("tool_call_id", None)
        m.pop("name", None)
        out.append(m)
    if tools:
        system = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out
