"""The KV cache storages sessions offer (``kv_cache=NAME``), described once.
Light on purpose: backends name them in class attributes, at registration."""

from __future__ import annotations

#: The KV caches an HFSession can use: transformers' ``QuantizedCache``
#: (KIVI-style: the newest ``residual_length`` positions stay in full
#: precision, older ones are quantized per channel in groups of 64; fp8: one
#: scale per layer, frozen at the first update). name -> (library, bits).
HF_QUANTIZED_KV: dict[str, tuple[str, int | None]] = {
    "fp8": ("fp8", None),
    "hqq-int8": ("hqq", 8),
    "hqq-int4": ("hqq", 4),
    "hqq-int2": ("hqq", 2),
    "quanto-int4": ("quanto", 4),
    "quanto-int2": ("quanto", 2),
}
#: Values per scale and zero point in transformers' group-wise quantized caches (its default).
KV_GROUP = 64
#: What a backend whose sessions are HFSessions offers as ``kv_cache``.
HF_KV_CACHES = {
    "full": "keys and values in the dtype the model computes in",
    "fp8": "float8 e4m3, one scale per layer for keys and one for values, fixed at the first update "
    "(transformers' QuantizedCache, fp8)",
    **{
        name: f"{bits}-bit, per channel in groups of 64, the newest 128 positions in full precision "
        f"(transformers' QuantizedCache, {library})"
        for name, (library, bits) in HF_QUANTIZED_KV.items()
        if bits is not None
    },
}
