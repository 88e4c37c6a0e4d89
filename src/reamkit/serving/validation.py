"""What the layer refuses (400) before llama-server sees a request: anything the client got wrong that
llama-server would answer with a 500, accept silently, or act on wrongly.

* the body: empty, not JSON, a lone UTF-16 surrogate (``"\\ud800"``), nested deeper than :data:`MAX_DEPTH`,
  not an object;
* messages: not a non-empty list, an unknown role or Anthropic content-block type, an earlier tool call
  without a function name or with arguments that are not a JSON object, a tool result whose call id no
  earlier assistant turn made;
* token limits: not an integer (``3.5``, ``true``), below -1, above the context, missing or below 1 on
  ``/v1/messages`` (the Messages API requires one), or unlimited together with ``ignore_eos`` (which fills
  the context);
* tools: not a list of objects, a function tool without ``function``/``name``, a parameter schema that is not
  a valid JSON schema; a ``tool_choice`` naming a tool the request does not offer.
"""

from __future__ import annotations

import json
import re

import jsonschema

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_DEPTH = 64            # agents' requests (JSON schemas of tools included) stay far below
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")
OPENAI_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
ANTHROPIC_ROLES = {"user", "assistant", "system"}   # Claude Code sends system turns inside messages too
# Block types of the Messages API that a client may send back; llama-server silently drops any other.
ANTHROPIC_BLOCKS = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                    "search_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
                    "tool_reference"}
CHAT = {"/v1/chat/completions", "/chat/completions", "/v1/chat/completions/input_tokens",
        "/chat/completions/input_tokens"}
ANTHROPIC = {"/v1/messages", "/v1/messages/count_tokens"}


class Invalid(ValueError):
    """A one-line reason to answer 400, and the field it is about."""

    def __init__(self, reason: str, param: str | None = None):
        super().__init__(reason)
        self.param = param


def parse(raw: bytes) -> object:
    """The JSON body, or :class:`Invalid`."""
    if not raw.strip():
        raise Invalid("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise Invalid(f"the JSON body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"malformed JSON body: {e}") from None
    if SURROGATE_ESCAPE.search(raw):                # only then can a lone surrogate be there
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Invalid("the JSON body has a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair)") \
                from None
    if _depth(body) > MAX_DEPTH:
        raise Invalid(f"the JSON body is nested deeper than {MAX_DEPTH} levels")
    return body


def _depth(doc: object) -> int:
    deepest, level = 0, [doc]
    while level and deepest <= MAX_DEPTH:
        deepest += 1
        level = [v for d in level if isinstance(d, (dict, list))
                 for v in (d.values() if isinstance(d, dict) else d) if isinstance(v, (dict, list))]
    return deepest


def check(path: str, body: object, n_ctx: int) -> None:
    """Raise :class:`Invalid` for a request llama-server should not get."""
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    api = "anthropic" if path in ANTHROPIC else "openai" if path in CHAT else None
    if api:
        _check_messages(body, api)
        _check_tools(body, api)
    if path == "/v1/messages" and not (isinstance(body.get("max_tokens"), int) and body["max_tokens"] >= 1):
        raise Invalid("max_tokens is required on /v1/messages, a whole number of at least 1 (the Messages API has "
                      "no default)", "max_tokens")
    _check_limits(body, n_ctx)


def _check_limits(body: dict, n_ctx: int) -> None:
    limits = []
    for field in TOKEN_FIELDS:
        if field not in body or body[field] is None:
            continue
        value = body[field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"{field} must be an integer, not {json.dumps(value)[:40]}", field)
        if value < -1 or value == 0 and field != "n_predict":
            raise Invalid(f"{field} = {value} must be at least 1 (or -1: until the context is full)", field)
        if value > n_ctx:
            raise Invalid(f"{field} = {value} is larger than the context of {n_ctx} tokens; ask for at most "
                          f"{n_ctx} (prompt and answer share the context)", field)
        limits.append(value)
    if body.get("ignore_eos") is True and not any(v > 0 for v in limits):
        raise Invalid(f"ignore_eos needs a token limit (max_tokens between 1 and {n_ctx}); without one the "
                      f"answer fills the whole context", "ignore_eos")


def _check_messages(body: dict, api: str) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise Invalid("'messages' must be a list", "messages")
    if not messages:
        raise Invalid("'messages' is empty; send at least one message", "messages")
    roles = ANTHROPIC_ROLES if api == "anthropic" else OPENAI_ROLES
    calls: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Invalid(f"messages[{i}] must be an object", "messages")
        role = _text(msg.get("role"))
        if role not in roles:
            raise Invalid(f"messages[{i}].role {role!r} is not one of {', '.join(sorted(roles))}", "messages")
        content = msg.get("content")
        if api == "openai":
            made = msg.get("tool_calls") if role == "assistant" else None
            calls.update(_check_call(i, call) for call in (made if isinstance(made, list) else []))
            if role == "tool" and _text(msg.get("tool_call_id")) not in calls:
                raise Invalid(f"messages[{i}] answers tool call {msg.get('tool_call_id')!r}, which no earlier "
                              f"assistant message made", "messages")
            continue
        for block in content if isinstance(content, list) else []:
            kind = _text(block.get("type")) if isinstance(block, dict) else None
            if kind not in ANTHROPIC_BLOCKS:
                raise Invalid(f"messages[{i}] has a content block of unknown type {kind!r}", "messages")
            if kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("input"), (dict, type(None))):
                    raise Invalid(f"messages[{i}]: the input of tool_use {block.get('id')!r} must be an object",
                                  "messages")
                calls.add(_text(block.get("id")))
            elif kind == "tool_result" and _text(block.get("tool_use_id")) not in calls:
                raise Invalid(f"messages[{i}]: tool_result for {block.get('tool_use_id')!r}, which no earlier "
                              f"assistant tool_use block has", "messages")


def _check_call(i: int, call: object) -> str | None:
    """An earlier assistant tool call as llama-server's chat template needs it; returns its id."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or call.get("type", "function") != "function" or not isinstance(fn.get("name"), str):
        raise Invalid(f"messages[{i}].tool_calls: each call needs \"type\": \"function\" and a \"function\" "
                      f"with a string \"name\"", "messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = ""
    if not isinstance(args, (dict, type(None))):
        raise Invalid(f"messages[{i}].tool_calls: the arguments of {fn['name']!r} must be a JSON object (or a "
                      f"string holding one)", "messages")
    return _text(call.get("id"))


def _text(value, other=None):
    """``value`` if it is a string, else ``other`` (ids and names are compared as strings only)."""
    return value if isinstance(value, str) else other


def _check_tools(body: dict, api: str) -> None:
    tools = body.get("tools")
    names = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise Invalid("'tools' must be a list", "tools")
        for i, tool in enumerate(tools):
            names.add(_check_tool(i, tool, api))
    choice = body.get("tool_choice")
    if api == "openai":
        named = _text(choice["function"].get("name"), "") if isinstance(choice, dict) and \
            isinstance(choice.get("function"), dict) else None
        wants_tools = choice == "required" or isinstance(choice, dict)
    else:
        kind = choice.get("type") if isinstance(choice, dict) else None
        named = _text(choice.get("name"), "") if kind == "tool" else None
        wants_tools = kind in ("any", "tool")
    if wants_tools and not names:
        raise Invalid("tool_choice asks for a tool call, but the request has no tools", "tool_choice")
    if named is not None and named not in names:
        raise Invalid(f"tool_choice names the tool {named!r}, which is not among the request's tools "
                      f"({', '.join(sorted(n for n in names if n)) or 'none'})", "tool_choice")


def _check_tool(i: int, tool: object, api: str) -> str | None:
    if not isinstance(tool, dict):
        raise Invalid(f"tools[{i}] must be an object", "tools")
    if api == "openai":
        if tool.get("type", "function") != "function":
            raise Invalid(f"tools[{i}].type {tool.get('type')!r} is not supported; use \"function\"", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise Invalid(f"tools[{i}] has no 'function' object", "tools")
        name, schema, where = fn.get("name"), fn.get("parameters"), f"tools[{i}].function.parameters"
    else:
        name, schema, where = tool.get("name"), tool.get("input_schema"), f"tools[{i}].input_schema"
        if "type" in tool and tool["type"] not in ("custom", None) or "input_schema" not in tool:
            return name if isinstance(name, str) else None       # a server tool (web_search, ...)
    if not isinstance(name, str) or not name:
        raise Invalid(f"tools[{i}] needs a non-empty string 'name'", "tools")
    if schema is not None:
        if not isinstance(schema, dict):
            raise Invalid(f"{where} must be a JSON schema object", "tools")
        if not isinstance(schema.get("$schema", ""), str):
            raise Invalid(f"{where}.$schema must be a string (the URI of a JSON schema draft)", "tools")
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise Invalid(f"{where} is not a valid JSON schema: {e.message}"[:300], "tools") from None
    return name
