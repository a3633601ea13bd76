"""qwen-tune: fine-tune Qwen chat models (full, LoRA, Q-LoRA) with a ChatML data pipeline.

``import qwen_tune`` is enough for ``transformers.AutoConfig / AutoTokenizer / AutoModelForCausalLM
.from_pretrained(<Qwen-1 dir>)`` to build the bundled Qwen-1 classes. Importing transformers (and torch) here
would cost every command, even ``qwen-tune --version``, seconds; so the registration runs when transformers'
Auto modules load: now if they already are, else from a small import hook that removes itself once all three
have fired. The registering code lives in ``qwen_tune.models.qwen1.auto_register`` and is imported by name at that
moment: this package is the bottom layer and must not import the models layer itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

__version__ = "0.1.0"

_REGISTER_MODULE = "qwen_tune.models.qwen1.auto_register"
# The Auto module each registration needs (qwen_tune.models.qwen1.auto_register.TRIGGERS maps them to functions).
_TRIGGERS = ("transformers.models.auto.configuration_auto", "transformers.models.auto.tokenization_auto",
             "transformers.models.auto.modeling_auto")


def _register(trigger: str) -> None:
    try:
        importlib.import_module(_REGISTER_MODULE).TRIGGERS[trigger]()
    except Exception as e:  # noqa: BLE001 - never break the user's transformers import; say why instead
        warnings.warn(f"qwen_tune: could not register Qwen-1 with transformers' Auto classes ({trigger}): "
                      f"{type(e).__name__}: {e}", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the registration for that module."""

    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner, self.name = inner, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register(self.name)

    def __getattr__(self, item: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self.inner, item)


class _AutoHook(importlib.abc.MetaPathFinder):
    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def _install() -> None:
    pending = set()
    for trigger in _TRIGGERS:
        if trigger in sys.modules:
            _register(trigger)
        else:
            pending.add(trigger)
    if pending and not any(isinstance(f, _AutoHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoHook(pending))


_install()
