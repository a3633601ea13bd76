"""Recipe schema: YAML recipes validated by pydantic, with `key.sub=value` overrides.

Errors come back as one readable line per problem; an unknown key names the closest valid one.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constants import DEFAULT_LOSS_CHUNK_SIZE
from .recipe_paths import resolve_recipe_paths
from .recipe_io import ConfigError, apply_overrides, format_errors, parse_override, read_json_object, read_recipe_file  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when running from one
# Bundled recipes, DeepSpeed configs, model configs and example data are package data, so a wheel install has them.
# Paths, not Traversables: datasets, DeepSpeed and transformers open them by name (a zipped install is unsupported).
PACKAGE_DIR = Path(str(importlib.resources.files("qwen_tune")))
RECIPES_DIR = PACKAGE_DIR / "recipes"
DS_CONFIGS_DIR = PACKAGE_DIR / "ds_configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    path: Optional[str] = None  # checkpoint dir (HF layout); None with from_config
    from_config: Optional[str] = None  # config.json to build a random-weight model from (tiny demos, tests)
    tokenizer: Optional[str] = None  # defaults to the checkpoint's own tokenizer (bundled Qwen one for Qwen-1)
    family: str = "auto"  # auto = read model_type from config.json
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    is_chat: Optional[bool] = None  # None = decide from the checkpoint (are ChatML tokens trained?)
    seed: int = 0  # for from_config weights

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if not self.path and not self.from_config:
            raise ValueError("set model.path (a checkpoint directory) or model.from_config")
        return self


ColumnName = Literal["prompt", "query", "response", "history", "system", "messages", "tools", "chosen", "rejected"]


class DatasetSpec(_Section):
    path: str  # file, directory, HF hub name or a save_to_disk directory
    format: Literal["auto", "qwen", "sharegpt", "openai", "alpaca"] = "auto"
    weight: float = Field(1.0, gt=0)  # <1 subsamples, >1 repeats (deterministic with the seed)
    split: str = "train"  # for HF datasets
    name: Optional[str] = None  # HF dataset config name
    # LLaMA-Factory dataset_info.json `columns` (prompt, query, response, history, system, messages, tools, chosen,
    # rejected) -> this dataset's own key names; None = data.columns (or the standard names).
    columns: Optional[dict[ColumnName, str]] = None


class DataConfig(_Section):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    eval_datasets: list[DatasetSpec] = Field(default_factory=list)
    columns: dict[ColumnName, str] = Field(default_factory=dict)  # default column mapping of every dataset
    eval_split_ratio: float = Field(0.0, ge=0, lt=1)
    max_len: int = Field(512, gt=8)  # the reference's model_max_length
    # auto = the checkpoint's chat_template when it has one, else Qwen-1's reference ChatML; checkpoint insists
    # on the checkpoint's; chatml forces the reference layout; or a path to a .jinja template file.
    template: str = "auto"
    # auto = reference on the ChatML path, assistant_only with a chat template (reference is ChatML-only).
    mask: Literal["auto", "reference", "assistant_only"] = "auto"
    system_prompt: Optional[str] = None  # None = the template's default ("You are a helpful assistant." on ChatML)
    enable_thinking: Optional[bool] = None  # passed to templates that take it (Qwen3, Qwen3.5); None = their default
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other template variable
    truncation: Literal["cut", "drop"] = "cut"
    packing: bool = True
    pad_to_multiple_of: Optional[int] = Field(None, gt=0)
    strict: bool = False
    num_proc: int = Field(1, ge=1)
    cache_dir: Optional[str] = None
    streaming: bool = False

    @field_validator("template")
    @classmethod
    def _template_setting(cls, v: str) -> str:
        if v in ("auto", "chatml", "checkpoint") or v.endswith((".jinja", ".j2")):
            return v
        raise ValueError("must be auto, chatml, checkpoint or a path to a .jinja chat template file")

    @model_validator(mode="after")
    def _mask_fits_template(self) -> "DataConfig":
        if self.mask == "reference" and self.template not in ("auto", "chatml"):
            raise ValueError("data.mask: reference is Qwen-1's ChatML label layout; with a chat template use "
                             "assistant_only or auto")
        if "enable_thinking" in self.chat_template_kwargs and self.enable_thinking is not None:
            raise ValueError("set enable_thinking once: data.enable_thinking or data.chat_template_kwargs, not both")
        return self

    @model_validator(mode="after")
    def _default_columns(self) -> "DataConfig":
        for spec in self.datasets + self.eval_datasets:
            if spec.columns is None and self.columns:
                spec.columns = dict(self.columns)
        return self

    @property
    def template_kwargs(self) -> dict[str, Any]:
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return {**self.chat_template_kwargs, **extra}

    @model_validator(mode="before")
    @classmethod
    def _shortcuts(cls, v: Any) -> Any:
        # `data.path: x.json` and `data.eval_path: y.json` as short forms of one-element lists.
        if isinstance(v, dict):
            v = dict(v)
            # A datasets value that is not a list is left for the schema to refuse, in one line.
            if "path" in v:
                first = {"path": v.pop("path"), "format": v.pop("format", "auto")}
                if isinstance(v.get("datasets") or [], list):
                    v["datasets"] = [first, *(v.get("datasets") or [])]
            if "eval_path" in v:
                first = {"path": v.pop("eval_path")}
                if isinstance(v.get("eval_datasets") or [], list):
                    v["eval_datasets"] = [first, *(v.get("eval_datasets") or [])]
        return v


class LoraConfig(_Section):
    r: int = Field(64, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = "auto"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None  # explicit list wins over trainable_embeddings
    trainable_embeddings: Optional[bool] = None  # None = on for base models, off for chat models


class QuantConfig(_Section):
    method: Literal["none", "gptq", "nf4"] = "none"  # gptq: load an Int4 checkpoint; nf4: quantize on load
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"


class TrainingConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1 = run `epochs`
    batch_size: int = Field(1, ge=1)  # per device; with packing, samples flattened into one row
    grad_accum: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    scheduler: str = "cosine"
    # A share of the steps: transformers reads a warmup_steps below 1 as a ratio, so 1 or more would silently
    # become a step count.
    warmup_ratio: float = Field(0.01, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    # "auto": on only when the memory estimator says the step would not fit this device without it (decided by
    # `qwen-tune train`; run_training alone treats an unresolved auto as on); ~30% more compute when on
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    loss: Literal["chunked", "plain"] = "chunked"
    loss_chunk_size: int = Field(DEFAULT_LOSS_CHUNK_SIZE, ge=1)  # rows of logits alive at once: 256 x 151,936 x 4 B = 0.15 GB
    compile_loss: Optional[bool] = None  # compiled loss chunk: ~1.3-2x less softmax time, one 15-90 s compile; None: when it repays
    freeze: list[str] = Field(default_factory=list)  # full method: parameter name substrings kept frozen
    eval_steps: Optional[int] = Field(None, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    use_cpu: Optional[bool] = None  # None = CPU when no accelerator is visible


class PreferenceConfig(_Section):
    """Preference tuning (stage: dpo), on TRL's DPOTrainer.

    sigmoid / ipo / hinge score the policy against a frozen reference (the adapter-disabled base with LoRA, a copy of
    the initial weights with full training); simpo and cpo are reference-free (no reference forward, no copy).
    """

    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "cpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)  # DPO: KL strength (higher = closer to the reference); SimPO: reward scale
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO target margin (reward units)
    sft_weight: float = Field(0.0, ge=0)  # NLL on the chosen reply added to the loss (RPO / CPO's term)


class OutputConfig(_Section):
    dir: str = "outputs/run"
    save_steps: int = Field(100, ge=1)
    save_every_minutes: float = Field(30.0, ge=0)  # also save when this long passed since the last save; 0 = off
    save_total_limit: Optional[int] = Field(3, ge=1)
    save_final: bool = True
    logging_steps: int = Field(1, ge=1)
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    resume_from_checkpoint: Optional[str] = None  # "auto" = latest complete checkpoint in dir
    overwrite: bool = False


class Recipe(_Section):
    model: ModelConfig
    stage: Literal["sft", "dpo"] = "sft"  # sft = supervised (conversations); dpo = preference pairs
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantConfig = Field(default_factory=QuantConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    deepspeed: Optional[str] = None  # path to a ds_configs/*.json
    fsdp: Optional[str] = None  # e.g. "full_shard auto_wrap"; alternative to deepspeed

    @field_validator("deepspeed")
    @classmethod
    def _ds_exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not Path(v).exists() and (PACKAGE_DIR / v).exists():
            return str(PACKAGE_DIR / v)
        return v

    @model_validator(mode="after")
    def _lora_unused(self) -> "Recipe":
        # A warning, not an error: `--recipe lora method=full` keeps the lora section and must still run.
        if self.method == "full" and "lora" in self.model_fields_set and self.lora.model_fields_set:
            logging.getLogger(__name__).warning(
                "lora: %s ignored: method is full (every weight trains); remove the lora section or set method: lora",
                ", ".join(sorted(self.lora.model_fields_set)))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        keys.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe path as given, else a bundled recipe by name (`lora` or `lora.yaml`)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    bundled = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {str(name)!r} not found (bundled recipes: {bundled})")


def load_recipe(name: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """The recipe file with `key.sub=value` overrides, every local path made absolute by one rule:

    a path written in a recipe file is relative to that file's folder, a path given as an override relative to the
    cwd. Bundled recipes are the exception for output.dir, which is relative to the cwd (outputs never go into the
    installed package); their model and data paths are the package's own files. A file named like a bundled one
    (`data_examples/...`, `assets/...`, `ds_configs/...`) that is not found there falls back to the package's copy.
    """
    path = find_recipe(name)
    data = read_recipe_file(path)
    folder = Path(os.path.abspath(path.parent))
    bundled = folder == Path(os.path.abspath(RECIPES_DIR))
    resolve_recipe_paths(data, PACKAGE_DIR if bundled else folder, Path.cwd() if bundled else folder)
    overrides = overrides or []
    extra = resolve_recipe_paths(apply_overrides({}, overrides), Path.cwd(), Path.cwd())
    keys = {".".join(parse_override(o)[0]): o for o in overrides}
    return recipe_from_dict(_merge(data, extra), source=str(path), resolve=False, overrides=keys)


def _merge(data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            _merge(data[k], v)
        else:
            data[k] = v
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", resolve: bool = True,
                     overrides: dict[str, str] | None = None) -> Recipe:
    """A recipe from a mapping; with `resolve`, its relative paths are taken relative to the cwd. `overrides`
    (dotted key -> the CLI item) lets an error name the override that caused it, not the file."""
    if resolve:
        resolve_recipe_paths(data, Path.cwd(), Path.cwd())
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        valid = _all_keys(Recipe) + [f"data.{k}" for k in ("path", "eval_path")]
        raise ConfigError(format_errors(e, source, valid, overrides)) from None
    except RecursionError:  # a value nested thousands deep (an override or a generated recipe)
        raise ConfigError(f"{source}: a value is nested too deeply") from None


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of each bundled recipe."""
    out = []
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        out.append((f.stem, first))
    return out
