"""A Session over a transformers causal LM, shared by the transformers-based
backends (full precision, bitsandbytes, torchao, GPTQ). Not backend-specific:
it only runs forward passes."""

from __future__ import annotations

from typing import Any, Callable

import torch

from qbench.backend import Session


def unique_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, counting shared storage (tied
    embeddings) once. Quantized tensor subclasses report their packed size
    through ``untyped_storage`` of their inner tensors where they expose it."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        for t in _leaf_tensors(tensor):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _leaf_tensors(tensor: torch.Tensor):
    # Tensor subclasses (torchao, bitsandbytes Params4bit) keep packed data in
    # inner tensors; plain tensors are their own leaf.
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.nn.Parameter:
        names, _ = flatten()
        for name in names:
            yield from _leaf_tensors(getattr(tensor, name))
    else:
        yield tensor


class HFSession(Session):
    def __init__(self, model: torch.nn.Module, device: str, facts: dict[str, Any] | None = None):
        self.model = model.eval()
        self.device = device
        self.facts = facts or {}

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         use_cache=False)
        return out.logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None]) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids)
        # Our own greedy loop rather than model.generate(): EOS can never stop
        # it, and each step is timed the same way for every backend.
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        self._sync()
        on_token()
        produced = [step]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            out = self.model(input_ids=step, attention_mask=mask, past_key_values=past, use_cache=True,
                             logits_to_keep=1)
            past = out.past_key_values
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            on_token()
            produced.append(step)
        return torch.cat(produced, dim=1).cpu()

    def weight_bytes(self) -> int:
        return unique_tensor_bytes(self.model)

    def describe(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for module in self.model.modules():
            if not list(module.children()):
                name = type(module).__name__
                types[name] = types.get(name, 0) + 1
        dtypes: dict[str, int] = {}
        for p in self.model.parameters():
            dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
        return {"leaf_module_types": types, "parameter_dtypes": dtypes, **self.facts}
