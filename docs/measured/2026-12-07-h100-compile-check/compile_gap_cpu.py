"""The compiled runtime's compiled-vs-eager gap (what COMPILE_TOLERANCE bounds),
on the CPU, for random Llama models like the GPU tests', each row in bf16.

    .venv/bin/python docs/measured/2026-12-07-h100-compile-check/compile_gap_cpu.py [HIDDEN [MLP]]     # 256 512, then 2048 8192
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout
from tests.conftest import make_tiny_model  # noqa: E402
from transformers import StaticCache  # noqa: E402

import qbench.sdk.hf as hf  # noqa: E402
from qbench.cell.artifacts import obtain_artifact  # noqa: E402
from qbench.sdk.models import fingerprint  # noqa: E402
from qbench.sdk.registry import PluginSettings, load_plugins  # noqa: E402

hf.COMPILE_TOLERANCE = -1.0  # always report the gap


class Honest:
    def __init__(self, d):
        self.d = d

    def replay(self):
        self.d.token.copy_(self.d.step(self.d.token, self.d.position))
        self.d.position.add_(1)


backends = load_plugins(PluginSettings(allow=("builtin",))).backends
HIDDEN = int(sys.argv[1]) if len(sys.argv) > 1 else 256
MLP = int(sys.argv[2]) if len(sys.argv) > 2 else 2 * HIDDEN
folder = Path(f"/tmp/compile-gap-{HIDDEN}")
folder.mkdir(exist_ok=True)
models = {f"random Llama, hidden {HIDDEN}, MLP {MLP}, 2 layers": make_tiny_model(folder, hidden=HIDDEN, intermediate=MLP)}
rows = [("fp", "bf16"), ("torchao", "int8-wo:compute_dtype=bf16"), ("bnb", "nf4:compute_dtype=bf16"),
        ("torchao", "int4-wo-g32:compute_dtype=bf16")]
for mname, model in models.items():
    for backend, variant in rows:
        b = backends[backend]
        try:
            name, config = b.parse_variant(variant)
            artifact, _, _ = obtain_artifact(b, name, config, str(model), fingerprint(model), None, None)
            session = b.load(artifact, "cpu")
        except Exception as e:  # noqa: BLE001
            print(mname, backend, variant, "not loaded:", str(e)[:200], flush=True)
            continue
        torch._dynamo.reset()
        d = hf.CompiledDecoder(session.model, "cpu", mode="reduce-overhead")
        with torch.inference_mode():
            d.cache = StaticCache(config=session.model.config, max_cache_len=24)
            d.token = torch.zeros((1, 1), dtype=torch.long)
            d.position = torch.zeros(1, dtype=torch.long)
            d._decode(d.token, d.position)
            for _ in range(2):
                d.step(d.token, d.position)
            msg = d._capture_differs(Honest(d))
        gap = msg.split(" is ")[1].split(" away")[0] if msg else "?"
        print(f"{mname} | {backend}:{variant} | {session.describe().get('compute_dtype')} | compiled-vs-eager gap {gap}",
              flush=True)
