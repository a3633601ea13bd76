"""A chat template rendered exactly as ``transformers.render_jinja_template`` does, with the sandbox's checks memoized.

Profiled on the bench conversations, half of a Qwen3 template render is jinja's sandbox deciding, on every
``message.role`` or ``content.startswith``, whether the attribute is safe: ``is_safe_attribute`` walks a chain of
``isinstance`` checks (function, method, type, code, generator, the mutable ABCs), and a dict key read through
``.`` first raises and catches an ``AttributeError``. Those decisions depend only on the object's type and the
attribute's name, so they are cached per ``(type, name)``; a plain ``dict``'s keys that are not dict attributes
are read directly; a builtin method (``content.split``) is called without probing it for ``unsafe_callable``.
Same answers, same ``SecurityError`` for unsafe access (tests), roughly half the render time.

The environment is an ``overlay`` of the one transformers compiles for the template (its filters ``tojson``,
globals ``raise_exception`` / ``strftime_now`` / ``namespace`` / ``dict``, loop controls), so nothing of it is
copied; transformers' own cached environment is left untouched. The inputs are prepared by transformers'
own helpers. If a future transformers moves those private helpers, rendering falls back to the public
``render_jinja_template`` (exact, only slower).
"""

from __future__ import annotations

from types import BuiltinMethodType
from typing import Any, Callable

from transformers.utils import chat_template_utils as _ctu

_DICT_ATTRIBUTES = frozenset(dir(dict))


def _memoized_getattr(env: Any) -> Callable[[Any, str], Any]:
    """``SandboxedEnvironment.getattr`` with its safety verdict cached per (type, attribute)."""
    verdicts: dict[tuple[type, str], bool] = {}
    is_safe, wrap_str_format = env.is_safe_attribute, env.wrap_str_format

    def getattr_(obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            # getattr would raise AttributeError and jinja would fall back to the key: go straight there.
            try:
                return obj[attribute]
            except KeyError:
                return env.undefined(obj=obj, name=attribute)
        try:
            value = getattr(obj, attribute)
        except AttributeError:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return env.undefined(obj=obj, name=attribute)
        if attribute == "format" or attribute == "format_map":  # the only names wrap_str_format acts on
            fmt = wrap_str_format(value)
            if fmt is not None:
                return fmt
        key = (type(obj), attribute)
        ok = verdicts.get(key)
        if ok is None:
            ok = verdicts[key] = bool(is_safe(obj, attribute, value))
        return value if ok else env.unsafe_undefined(obj, attribute)

    return getattr_


def _checked_call(env: Any) -> Callable[..., Any]:
    """``SandboxedEnvironment.call`` without the attribute probes for builtin methods (``content.split(...)``):
    a builtin method has no ``__dict__``, so it can carry neither ``unsafe_callable`` nor ``alters_data``."""
    call = env.call

    def call_(context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # positional: kwargs are the call's
        if type(obj) is BuiltinMethodType:
            return context.call(obj, *args, **kwargs)
        return call(context, obj, *args, **kwargs)

    return call_


class TemplateRenderer:
    """Renders one chat template; ``render`` returns what ``render_jinja_template`` returns for one conversation.

    ``kwargs`` are the template variables every render gets (special tokens, ``enable_thinking``, ...).
    """

    def __init__(self, chat_template: str, **kwargs: Any) -> None:
        self.chat_template, self._kwargs = chat_template, kwargs
        try:
            base = _ctu._compile_jinja_template(chat_template)
            self._plain, self._alias = _ctu._plain_template_data, _ctu._alias_reasoning_fields
        except AttributeError:  # transformers reorganised its private helpers: the public path, exact but slower
            self._compiled = None
            return
        env = base.environment.overlay()
        # Instance attributes: the compiled template calls environment.getattr / environment.call.
        env.getattr, env.call = _memoized_getattr(env), _checked_call(env)
        self._compiled = env.from_string(chat_template)
        self._plain_kwargs = self._plain(kwargs)

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
               plain_inputs: bool = False) -> str:
        """``plain_inputs``: the caller built ``messages`` and ``tools`` as fresh containers of JSON types only
        (what transformers' defensive conversion would return), so that copy is skipped."""
        if self._compiled is None:
            rendered, _ = _ctu.render_jinja_template(conversations=[messages], tools=tools,
                                                     chat_template=self.chat_template,
                                                     add_generation_prompt=add_generation_prompt, **self._kwargs)
            return rendered[0]
        if not plain_inputs:
            messages, tools = self._plain(messages), self._plain(tools)
        for m in messages:
            if not isinstance(m, dict):
                raise TypeError(f"Chat messages should be dicts, but got {m!r}.")
        return self._compiled.render(messages=self._alias(messages), tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._plain_kwargs)
