"""The estimate as numbers (:class:`MemoryEstimate`) and as the table ``qwen-tune estimate`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class MemoryEstimate:
    """Bytes per device. `total` is the peak over the phases of a step (module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # stored activations + (with gradient checkpointing) one recomputed layer
    logits: int
    overhead: int
    total: int
    activations_stored: int = 0
    activations_recompute: int = 0
    step_transient: int = 0
    grad_transient: int = 0  # end of backward: freshly computed vocab-matrix gradients before accumulation
    peak_phase: str = "forward/backward"
    forward_backward: int = 0  # peak of each phase, overhead included; total = the largest
    backward_end: int = 0
    optimizer_step: int = 0
    cpu_offload: int = 0  # host RAM per device process for offloaded states
    params_total: int = 0
    params_trainable: int = 0
    lora_params: int = 0
    tokens_per_step: int = 0
    gpus: int = 1
    zero_stage: Optional[int] = None
    precision: str = "bf16"
    weight_dtype: str = "bf16"
    method: str = "lora"
    activation_parts: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def state_peak(self) -> int:
        """The peak without CUDA/framework overhead or DeepSpeed buffers: the largest of weights + gradients +
        optimizer states + (stored activations + max(logits, recomputed layer) | embedding-grad temporaries |
        step temporaries). This is what a CPU run can measure."""
        common = self.weights + self.gradients + self.optimizer
        return common + max(self.activations_stored + max(self.logits, self.activations_recompute),
                            self.grad_transient, self.step_transient)

    @property
    def training_state(self) -> int:
        """weights + gradients + optimizer states + activations + logits (no overhead)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def table(self, unit: str = "GB") -> str:
        div = {"GB": 1e9, "GiB": 2**30}[unit]

        def fmt(x: float) -> str:
            return f"{x / div:9.2f} {unit}"

        engine = "no DeepSpeed" if self.zero_stage is None else f"DeepSpeed ZeRO-{self.zero_stage}"
        lines = [
            f"per-device memory estimate: {self.method}; {self.precision} compute, {self.weight_dtype} weights; "
            f"{engine}; {self.gpus} device(s)",
            f"parameters: {self.params_total / 1e9:.3f} B, trainable {self.params_trainable / 1e6:,.1f} M"
            + (f" (LoRA {self.lora_params / 1e6:,.1f} M)" if self.lora_params else ""),
            f"tokens per micro-step: {self.tokens_per_step:,} = batch_size x max_len (worst case; packing keeps "
            "it; all tokens supervised)",
            "",
        ]
        for name, val, key in (("weights", self.weights, "weights"), ("gradients", self.gradients, "gradients"),
                               ("optimizer states", self.optimizer, "optimizer"),
                               ("activations", self.activations, "activations"), ("logits", self.logits, "logits"),
                               ("embedding-grad temporaries", self.grad_transient, "grad_tmp"),
                               ("optimizer-step temporaries", self.step_transient, "step"),
                               ("CUDA/framework overhead", self.overhead, "overhead")):
            lines.append(f"  {name:27s}{fmt(val)}   {self.details.get(key, '')}".rstrip())
        lines.append("  " + "-" * 40)
        lines.append(f"  {'total (peak)':27s}{fmt(self.total)}   at the {self.peak_phase} phase "
                     f"(forward/backward {self.forward_backward / div:.2f}, end of backward "
                     f"{self.backward_end / div:.2f}, optimizer step {self.optimizer_step / div:.2f} {unit})")
        if self.gpus > 1:
            lines.append(f"  {'all devices':27s}{fmt(self.total * self.gpus)}")
        if self.cpu_offload:
            lines.append(f"  {'host RAM for offload':27s}{fmt(self.cpu_offload)}   per device process")
        lines.append("")
        lines.append("peak = weights + gradients + optimizer states + overhead + the largest of: stored activations "
                     "+ max(logits, recomputed layer); embedding-grad temporaries; optimizer-step temporaries")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
