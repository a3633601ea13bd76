"""TemplateRenderer (memoized sandbox checks) renders exactly what transformers' render_jinja_template renders.

Same strings for every fixture family's real template, and the same outcome -- text, undefined, or
SecurityError -- for any attribute a template reaches for, safe or not.
"""

from __future__ import annotations

import re

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from conftest import FAMILY_VOCAB
from qwen_tune.data.jinja_render import TemplateRenderer
from test_chat_templates import CONVERSATIONS



def outcome(fn, *args, **kwargs) -> tuple[str, str]:
    try:  # a method rendered as text shows its object's address, which differs between two copies of the data
        return "ok", re.sub(r" at 0x[0-9a-f]+", "", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - the exception's type and message are what is compared
        return type(e).__name__, str(e)


def theirs(template: str, messages, tools=None, add_generation_prompt=False, **kw) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **kw)
    return rendered[0]


@pytest.mark.parametrize("family", sorted(FAMILY_VOCAB))
def test_every_family_renders_the_same_string(family, family_tok):
    tok = family_tok(family)
    template, specials = tok.chat_template, tok.special_tokens_map
    for kw in ({}, {"enable_thinking": False}):
        ours = TemplateRenderer(template, **specials, **kw)
        assert ours._compiled is not None, "the memoized path must be the one under test"
        for name, c in CONVERSATIONS.items():
            for gen in (False, True):
                args = (c.messages(), c.tools, gen)
                expected = outcome(theirs, template, *args, **specials, **kw)
                assert outcome(ours.render, *args) == expected, (family, name, gen, kw)
                # plain_inputs (what TemplateEncoder passes: fresh JSON-typed containers) renders the same.
                assert outcome(ours.render, *args, True) == expected, (family, name, gen, kw)


# Attribute names a template might reach for: dict/str/list methods, mutators, dunders, private names, keys that
# shadow a dict method ("items"), keys that exist and keys that do not.
NAMES = st.sampled_from(["role", "content", "items", "keys", "get", "clear", "update", "pop", "append", "copy",
                         "startswith", "split", "format", "format_map", "upper", "__class__", "__init__",
                         "__globals__", "_private", "mro", "missing", "index", "count"])
VALUES = st.sampled_from(["msg", "text", "list", "ns", "fn", "cls"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(VALUES, NAMES, st.booleans()), min_size=1, max_size=4))
def test_attribute_access_matches_the_sandbox(accesses):
    # Each access is rendered as a value, as `is defined`, and (when asked) called: a mutator or dunder must be
    # refused exactly as transformers' sandbox refuses it, on every repetition (the verdict is cached).
    exprs = {"msg": "messages[0]", "text": "messages[0]['content']", "list": "messages", "ns": "ns",
             "fn": "raise_exception", "cls": "messages[0].__class__"}
    parts = ["{% set ns = namespace(role='r', items=3) %}"]
    for value, name, called in accesses:
        e = f"{exprs[value]}.{name}"
        parts.append(f"[{{{{ ({e}) is defined }}}}:{{{{ {e}() if {e} is defined and {e} is callable else {e} }}}}]"
                     if called else f"[{{{{ {e} }}}}]")
    template = "".join(parts * 2)
    messages = [{"role": "user", "content": "hello", "items": "a key named like a dict method"}]
    assert outcome(TemplateRenderer(template).render, messages) == outcome(theirs, template, messages)


@pytest.mark.parametrize("template", [
    "{{ messages.append(1) }}",
    "{{ messages[0].clear() }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ raise_exception.__globals__.os }}",
    "{{ namespace.__init__.__globals__.sys }}",
])
def test_unsafe_access_is_still_refused(template):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        TemplateRenderer(template).render(messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_calls_with_keyword_arguments_named_like_the_call_machinery():
    # The sandbox's call takes the callee positionally, so a template's own keywords (obj, context) pass through.
    template = ("{% set ns = namespace(obj=1, context=2) %}{{ dict(obj=3, context=4) }}{{ ns.obj }}"
                "{{ messages[0]['content'].split(maxsplit=1) }}{{ 'a-b'.replace('-', '+') }}")
    messages = [{"role": "user", "content": "x y z"}]
    assert outcome(TemplateRenderer(template).render, messages) == outcome(theirs, template, messages)
    assert outcome(TemplateRenderer(template).render, messages)[0] == "ok"


def test_falls_back_to_render_jinja_template_without_transformers_private_helpers(monkeypatch, family_tok):
    # If a transformers release moves the private helpers, the public renderer is used: the same strings.
    from transformers.utils import chat_template_utils

    tok = family_tok("qwen3")
    template, specials = tok.chat_template, tok.special_tokens_map
    cases = [(c.messages(), c.tools, gen) for c in CONVERSATIONS.values() for gen in (False, True)]
    expected = [outcome(theirs, template, *args, **specials) for args in cases]
    assert all(status == "ok" for status, _ in expected)
    # A helper missing when TemplateRenderer is built sends it to the public path for good.
    monkeypatch.delattr(chat_template_utils, "_alias_reasoning_fields")
    fallback = TemplateRenderer(template, **specials)
    assert fallback._compiled is None
    monkeypatch.undo()  # render_jinja_template itself needs the helper back
    assert [outcome(fallback.render, *args, True) for args in cases] == expected
