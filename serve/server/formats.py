"""What an answer must look like: the output format a request asks for (OpenAI's ``response_format``, vLLM's
``guided_*`` fields) and its tool calls (``tools`` with ``tool_choice``), both held by structured outputs
(serve/engine/structured.py); and the tool calls read back from a finished answer."""

from __future__ import annotations

import dataclasses
import json
import uuid

from serve.engine.plan import StructuredOutput
from serve.server.protocol import ChatCompletionRequest, GenerationRequest, bad_request


@dataclasses.dataclass(frozen=True)
class ToolCalls:
    """How a chat answer calls tools: the one named function (its arguments are the answer), or one or more of
    the tools ("required": the answer is a JSON list of {"name", "parameters"})."""

    names: tuple[str, ...]
    named: bool
    """tool_choice named one function; else "required"."""
    schema: dict

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "stop" when the request named the function, "tool_calls" when the model chose."""
        return "stop" if self.named else "tool_calls"

    def calls(self, text: str) -> list[dict] | None:
        """The answer as OpenAI's ``tool_calls`` (fresh ids); None when it is no complete call (cut short)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.named:
            pairs = [(self.names[0], text)]
        else:
            pairs = [(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in value]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}} for name, arguments in pairs]


def _hoisted_defs(schemas: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """The tools' shared definitions (``$defs``, ``definitions``: pydantic's enums and nested models) taken out of
    each parameters schema to the root of the schema that nests them all, where their ``#/$defs/...`` references
    point (as vLLM does); a name two tools define differently is a 400."""
    root: dict[str, dict] = {}
    out = {}
    for name, schema in schemas.items():
        schema = dict(schema)
        for key in ("$defs", "definitions"):
            found = schema.pop(key, None)
            if not isinstance(found, dict):
                continue
            for def_name, definition in found.items():
                if root.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise bad_request(f"tools define {key} {def_name!r} differently; with tool_choice \"required\" "
                                      "their definitions share one namespace: rename one", "tools")
        out[name] = schema
    return root, out


def tool_calls(request: GenerationRequest) -> ToolCalls | None:
    """The request's tool calling (None: an ordinary answer, also for tool_choice "none"); a 400 naming the field
    for malformed tools, an unknown named function, or "auto"."""
    if not isinstance(request, ChatCompletionRequest):
        return None  # a completion's `tools` is an unknown field, ignored like any other (pydantic keeps extras)
    tools, choice = request.tools, request.tool_choice
    if tools is None or tools == []:  # an empty list is no tools, as vLLM reads it
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    schemas: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                              f"tools.{i}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema", f"tools.{i}.function.parameters")
        schemas[name] = parameters
    if choice == "none":
        return None
    if choice in (None, "auto"):
        raise bad_request('tool_choice "auto" (the default with tools) needs a parser of the model\'s own tool-call '
                          'format, which this server has none of; send tool_choice "required" or {"type": "function", '
                          '"function": {"name": ...}}, or "none"', "tool_choice")
    if choice == "required":
        root, schemas = _hoisted_defs(schemas)
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in schemas.items()]
        array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **root}
        if not request.parallel_tool_calls:
            array["maxItems"] = 1
        return ToolCalls(tuple(schemas), named=False, schema=array)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in schemas:
        raise bad_request(f"tool_choice must be \"none\", \"required\" or a function of tools by name, got {choice!r}",
                          "tool_choice")
    return ToolCalls((name,), named=True, schema=schemas[name])


def structured_output(request: GenerationRequest) -> tuple[str, StructuredOutput] | None:
    """(the field, the format) the request asks its answer to follow (None: free text), from OpenAI's
    ``response_format`` or one of vLLM's ``guided_*`` fields; a 400 naming the field when it is malformed or more
    than one is given. Whether the format compiles is checked against the tokenizer later
    (`ServerState.structured`)."""
    found = []
    response_format = request.response_format
    if response_format is not None and response_format != {"type": "text"}:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            found.append(("response_format", StructuredOutput("json_object")))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                                  "{...}}}", "response_format.json_schema.schema")
            found.append(("response_format", StructuredOutput("json", json.dumps(schema))))
        else:
            raise bad_request("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                              "{\"type\": \"json_schema\", \"json_schema\": {...}}", "response_format")
    if request.guided_json is not None:
        schema = request.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise bad_request(f"guided_json is not valid JSON: {exc}", "guided_json") from None
        if not isinstance(schema, dict):
            raise bad_request("guided_json must be a JSON schema (an object)", "guided_json")
        found.append(("guided_json", StructuredOutput("json", json.dumps(schema))))
    if request.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput("regex", request.guided_regex)))
    if request.guided_choice is not None:
        if not request.guided_choice or not all(request.guided_choice):
            raise bad_request("guided_choice must be a list of non-empty strings", "guided_choice")
        found.append(("guided_choice", StructuredOutput("choice", json.dumps(request.guided_choice))))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput("grammar", request.guided_grammar)))
    tools = tool_calls(request)
    if tools is not None:
        found.append(("tool_choice", StructuredOutput("json", json.dumps(tools.schema))))
    if len(found) > 1:
        raise bad_request(f"give one output format, not {' and '.join(name for name, _ in found)}", found[1][0])
    if found and request.min_tokens:  # the format may allow nothing but its end before min_tokens
        raise bad_request(f"min_tokens cannot be combined with an output format ({found[0][0]})", "min_tokens")
    return found[0] if found else None
