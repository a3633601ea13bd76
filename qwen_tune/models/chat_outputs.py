"""A base checkpoint fine-tuned on conversations leaves as a chat model of its own ecosystem: what its generation
config and tokenizer_config.json must say then (training output and merged model alike).

* Qwen-1: its remote code's ``model.chat()`` reads ``chat_format`` and ``max_window_size`` from the generation
  config: chatml and the values Qwen-7B-Chat ships;
* Qwen1.5+: transformers/vLLM stop on the generation config's eos ids (``<|im_end|>`` added) and render prompts
  with tokenizer_config.json's ``chat_template`` (the template the run trained with, when the base had none).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..checkpoint import generation_config_is_chat, read_json_object, write_json
from ..constants import ENDOFTEXT_ID, IM_END_ID
from .qwen1.tokenization_qwen import CHATML_TEMPLATE

log = logging.getLogger(__name__)

# Qwen-7B-Chat's generation_config.json beyond chat_format and the token ids.
QWEN1_CHAT_GENERATION = {"max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8,
                         "repetition_penalty": 1.1}


def chat_generation_config(gen: dict[str, Any]) -> list[str]:
    """Make a base model's generation config a chat model's, in place; returns what changed (nothing for a chat
    model's)."""
    if generation_config_is_chat(gen):
        return []
    changed = []
    eos = gen.get("eos_token_id")
    eos_list = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if IM_END_ID not in eos_list:
        gen["eos_token_id"] = [IM_END_ID, *(eos_list or [ENDOFTEXT_ID])]
        changed.append("eos_token_id += <|im_end|>")
    if "chat_format" in gen:
        gen["chat_format"] = "chatml"
        for key, value in QWEN1_CHAT_GENERATION.items():
            gen.setdefault(key, value)
        changed.append("chat_format -> chatml, max_window_size as Qwen-7B-Chat")
    return changed


def add_chat_template(base: Path, dest: Path, template_setting: str = "auto") -> str | None:
    """Put the template the run trained with into ``dest``'s tokenizer_config.json when the base ships none (a
    recipe's .jinja file, else ChatML); returns its origin, None when nothing was added. Qwen-1 is left alone (its
    ecosystem reads chat_format)."""
    cfg_file = dest / "tokenizer_config.json"
    if (read_json_object(base / "config.json", str(base / "config.json")).get("model_type") == "qwen"
            or not cfg_file.is_file() or (base / "chat_template.jinja").is_file()
            or (dest / "chat_template.jinja").is_file()):
        return None
    data = read_json_object(cfg_file, str(cfg_file))
    if data.get("chat_template"):
        return None
    path = Path(template_setting).expanduser()
    text, origin = ((path.read_text(encoding="utf-8"), str(path)) if template_setting.endswith(".jinja")
                    and path.is_file() else (CHATML_TEMPLATE, "ChatML"))
    data["chat_template"] = text
    write_json(cfg_file, data)
    return origin


def finish_chat_outputs(base: str | Path, out: str | Path, template_setting: str = "auto") -> list[str]:
    """For a training output of a *base* checkpoint: chat generation config and template in ``out``."""
    base, out = Path(base), Path(out)
    base_gen = base / "generation_config.json"
    if not base_gen.is_file() or generation_config_is_chat(read_json_object(base_gen, str(base_gen))):
        return []  # a chat checkpoint (no generation config: assumed chat, as training does)
    gen_file = out / "generation_config.json"
    notes = []
    if gen_file.is_file():
        gen = read_json_object(gen_file, str(gen_file))
        changed = chat_generation_config(gen)
        if changed:
            write_json(gen_file, gen)
            notes.append(f"generation_config.json: a chat model now ({'; '.join(changed)})")
    if origin := add_chat_template(base, out, template_setting):
        notes.append(f"tokenizer_config.json: added the {origin} chat template the run trained with")
    for n in notes:
        log.info("%s: %s", out, n)
    return notes
