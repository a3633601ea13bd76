"""`qwen-tune chat`: try a fine-tuned model with the same chat template it was trained on.

The prompt goes through the encoder training used (`make_encoder`): the checkpoint's chat_template with its
generation prompt and thinking switch, or Qwen-1's ChatML, so what chat shows is what the model learned.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# The data and model modules (transformers, torch) are imported inside the command: `qwen-tune --help` builds
# this parser and must not pay for them.


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="generate with a model (+ optional LoRA adapter), one-shot or interactive")
    p.add_argument("--model", required=True, help="checkpoint dir (a merged or full fine-tune, or the adapter's base)")
    p.add_argument("--adapter", default=None, help="LoRA adapter dir to apply on top of --model")
    p.add_argument("--prompt", "-p", default=None, help="one-shot prompt; omit for an interactive session")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own default)")
    p.add_argument("--template", default="auto", help="auto | chatml | checkpoint | FILE.jinja, as data.template")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                   help="thinking switch of templates that take it (Qwen3, Qwen3.5)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=cmd_chat)


def build_prompt_ids(tokenizer: Any, system: str | None, history: list[tuple[str, str]], template: str = "auto",
                     template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Ids of the conversation so far plus the template's generation prompt, as in training."""
    from ..data.chat_template import TemplateEncoder, make_encoder
    from ..data.formats import Conversation
    from ..data.template import DEFAULT_SYSTEM

    enc = make_encoder(tokenizer, 10**9, template=template, system_prompt=system, template_kwargs=template_kwargs)
    if isinstance(enc, TemplateEncoder):
        return enc.encode_prompt(Conversation("chat", list(history), system).messages())
    # ChatML: encode with a placeholder answer, then cut the answer and its closing tokens off.
    system = DEFAULT_SYSTEM if system is None else system
    sample = enc.encode([Conversation("chat", history + [("assistant", "")], system)])[0]
    return sample.input_ids[: -(1 + len(enc.nl))]


def load_for_chat(model_dir: str, adapter: str | None) -> tuple[Any, Any]:
    import torch

    from ..train.loading import load_model

    dtype = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    loaded = load_model(model_dir, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if adapter:
        from ..data.tokenizer import load_tokenizer
        from ..quant.training import load_adapter  # knows qwen-tune's GPTQ layers too

        model = load_adapter(model, adapter)
        tokenizer = load_tokenizer(adapter) if _has_tokenizer(adapter) else tokenizer
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer


def _has_tokenizer(path: str) -> bool:
    from pathlib import Path

    return any((Path(path) / f).exists() for f in ("tokenizer.json", "qwen.tiktoken", "tokenizer_config.json"))


EMPTY_REPLY = "(the model produced an empty reply)"


def generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, temperature: float,
             stream: Any = None) -> str:
    """The reply to ``ids``; ``stream(text)`` (if given) receives it piece by piece as it is generated."""
    import torch
    from transformers import TextStreamer

    from ..data.tokenizer import ENDOFTEXT, IM_END

    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    vocab = model.get_input_embeddings().weight.shape[0]
    # Embedding rows past the tokenizer's vocabulary are padding: never sample them.
    suppress = list(range(len(tokenizer), vocab)) or None
    if max_new_tokens <= 0:
        return ""
    streamer = None
    if stream is not None:
        class _Streamer(TextStreamer):  # transformers' decoding of whole words, to our callback (no newline)
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    stream(text)

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None, eos_token_id=stop, pad_token_id=stop[-1],
                             suppress_tokens=suppress, streamer=streamer)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _reply(model: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace, prefix: str = "") -> str:
    """Streams the reply to stdout after ``prefix``; an empty (or whitespace-only) reply is said plainly."""
    if prefix:
        _print_piece(prefix)
    answer = generate(model, tokenizer, ids, args.max_new_tokens, args.temperature, stream=_print_piece)
    if answer.strip():
        print()
    else:
        print(EMPTY_REPLY + ("" if not answer else f" ({len(answer)} whitespace characters)"))
    return answer


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_chat(args.model, args.adapter)
    kwargs = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}

    def prompt(history: list[tuple[str, str]]) -> list[int]:
        return build_prompt_ids(tokenizer, args.system, history, args.template, kwargs)

    history: list[tuple[str, str]] = []
    if args.prompt is not None:
        _reply(model, tokenizer, prompt([("user", args.prompt)]), args)
        return 0
    try:
        import readline  # noqa: F401 - line editing and up-arrow history for input(), where the platform has it
    except ImportError:
        pass
    print("interactive chat: empty line or Ctrl-D to quit, /reset to clear history", file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            print(f"(history cleared: a new conversation{'' if args.system is None else ', same system prompt'})")
            continue
        history.append(("user", line))
        answer = _reply(model, tokenizer, prompt(history), args, prefix="assistant> ")
        history.append(("assistant", answer))
    return 0
