"""Tool calling in chat completions: what a request's `tools` and `tool_choice` ask for.

`plan_tools` checks the request (400s naming the parameter) and returns a `ToolPlan`:

- `none`: the tools are shown to the model (the chat template renders them), its output is
  plain content.
- `auto` (the default when tools are given): the model decides; its output is read by the
  parser the router was started with (`--tool-call-parser`, router/tool_parsers.py). A router
  without one refuses `auto` (docs/decisions.md, "Tool calling").
- `required`: guided decoding forces a JSON array of one or more calls, each naming one of
  the functions with arguments valid against its parameter schema (one call at most when
  `parallel_tool_calls` is false).
- a named function: guided decoding forces that function's arguments object.

The forced formats need no parser, so `required` and named choices work on any model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from baton.router.errors import bad_request
from baton.router.protocol import ChatCompletionRequest
from baton.router.tool_parsers import PARSERS, NamedCallParser, RequiredCallsParser, ToolParser
from baton.sampling_params import GuidedDecodingParams

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools: `choice` is none, auto, required or named (`function`)."""

    tools: list[dict]  # as given, checked: what the chat template renders
    choice: str
    function: str | None
    parallel: bool
    guided: GuidedDecodingParams | None  # the constraint required and named choices run under
    parser_name: str | None  # auto's parser

    def parser(self) -> ToolParser | None:
        """A fresh parser for one choice's output; None when the output is plain content."""
        if self.choice == "named":
            return NamedCallParser(self.function, self.parallel)
        if self.choice == "required":
            return RequiredCallsParser(self.parallel)
        if self.choice == "auto":
            return PARSERS[self.parser_name](self.parallel)
        return None


def _check_tool(i: int, tool: Any) -> tuple[str, dict]:
    """One entry of `tools` -> (name, parameters schema); 400 naming the bad part."""
    from jsonschema import Draft202012Validator, SchemaError

    where = f"tools.{i}"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"{where}: each tool must be {{\"type\": \"function\", \"function\": {{...}}}} "
                          "(function tools are the only kind)", f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"{where}.function must be an object with a name", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-' "
                          f"(got {name!r})", f"{where}.function.name")
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{where}.function.description must be a string", f"{where}.function.description")
    if not isinstance(function.get("strict", False), bool):
        raise bad_request(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
    parameters = function.get("parameters")
    if parameters is None:
        return name, NO_PARAMETERS
    param = f"{where}.function.parameters"
    if not isinstance(parameters, dict):
        raise bad_request(f"{param} must be a JSON Schema object", param)
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{param} must describe an object (\"type\": \"object\"), got type "
                          f"{parameters.get('type')!r}", param)
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        raise bad_request(f"{param} is not a valid JSON Schema: {exc.message}"
                          + (f" (at {at})" if at else ""), param) from None
    return name, parameters


def _named(tool_choice: dict) -> str:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    return name


def plan_tools(req: ChatCompletionRequest, parser_name: str | None,
               auto_enabled: bool) -> ToolPlan | None:
    """The request's tool plan, or None when it has no tools. Raises APIError(400)."""
    for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(req, legacy) is not None:
            raise bad_request(f"{legacy} (OpenAI's deprecated function calling) is not supported: "
                              f"use {current}", legacy)
    if req.tools is None:
        if req.tool_choice is not None:
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    if not req.tools:
        raise bad_request("tools is an empty list: give at least one tool, or leave it out", "tools")
    schemas: dict[str, dict] = {}
    for i, tool in enumerate(req.tools):
        name, parameters = _check_tool(i, tool)
        if name in schemas:
            raise bad_request(f"tools: the function name {name!r} is given twice", f"tools.{i}.function.name")
        schemas[name] = parameters
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    function = None
    if isinstance(choice, dict):
        function = _named(choice)
        if function not in schemas:
            raise bad_request(f"tool_choice names the function {function!r}, which is not among the tools "
                              f"({', '.join(schemas)})", "tool_choice")
        choice = "named"
    elif choice not in CHOICES:
        raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                          "tool_choice")
    if choice == "auto" and not (auto_enabled and parser_name):
        raise bad_request("tool_choice 'auto' (the default when tools are given) needs a tool-call parser, and "
                          "this server has none: start it with --enable-auto-tool-choice --tool-call-parser "
                          f"({' or '.join(PARSERS)}); 'required', a named function and 'none' work without one",
                          "tool_choice")
    parallel = req.parallel_tool_calls if req.parallel_tool_calls is not None else True
    guided = None
    if choice == "named":
        guided = GuidedDecodingParams(json=schemas[function])
    elif choice == "required":
        guided = GuidedDecodingParams(json=required_schema(schemas, parallel))
    return ToolPlan(list(req.tools), choice, function, parallel, guided, parser_name)


def required_schema(schemas: dict[str, dict], parallel: bool) -> dict:
    """The JSON Schema of `tool_choice: "required"`'s output: an array of calls, each
    `{"name": <one of the functions>, "parameters": <valid against that function's schema>}`."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, parameters in schemas.items()]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def template_message(index: int, message: dict) -> dict:
    """A message as the chat template reads it: an assistant's `tool_calls` are checked and
    their `arguments` (a JSON string in the API) parsed, since templates write them as JSON
    (`tool_call.arguments | tojson`). Raises APIError(400) naming the message."""
    calls = message.get("tool_calls")
    if calls is None:
        return message
    where = f"messages.{index}.tool_calls"
    if message.get("role") != "assistant" or not isinstance(calls, list):
        raise bad_request(f"{where}: only assistant messages carry tool_calls, as a list", where)
    parsed = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}.{j}: a tool call is {{\"id\", \"type\": \"function\", "
                              "\"function\": {\"name\", \"arguments\"}}", f"{where}.{j}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise bad_request(f"{where}.{j}.function.arguments is not valid JSON",
                                  f"{where}.{j}.function.arguments") from None
        parsed.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": parsed}
