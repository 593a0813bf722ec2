"""Batch-1 greedy decode: qbench's session loop against transformers' own
``generate`` with a static cache, on the same model, side by side, plus a
PyTorch profile of where qbench's loop spends its time.

    python benchmarks/decode_loop.py --device cuda            # 1.07B Llama shape, random weights, bf16
    python benchmarks/decode_loop.py --device cpu --small     # a quick check anywhere

Random weights: speed and memory are real, quality means nothing. Prints
ms/token for each loop and the profiler's top operators by host time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_goals import time_hf_generate, time_session  # this folder: run as a script


def build_model(device: str, small: bool, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    else:  # SmolLM2-1.7B-like width at 16 layers: 1.07B parameters
        config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             tie_word_embeddings=True)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LoopVariant:
    """A candidate decode loop with the session's contract (greedy, exactly
    N tokens, ``on_token`` after each step is finished on the device)."""

    def __init__(self, model, device: str, mask: bool, static: bool, sync_each: bool = True):
        self.model, self.device, self.mask, self.static, self.sync_each = model, device, mask, static, sync_each

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, on_token):
        from transformers import DynamicCache, StaticCache

        ids = input_ids.to(self.device)
        batch, length = ids.shape
        cache = (StaticCache(config=self.model.config, max_cache_len=length + max_new_tokens) if self.static
                 else DynamicCache(config=self.model.config))
        position = torch.arange(length, device=self.device)
        mask = torch.ones_like(ids) if self.mask else None
        kwargs = dict(past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = self.model(input_ids=ids, attention_mask=mask, cache_position=position, **kwargs)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        produced = [step]
        sync(self.device)
        on_token()
        position = position[-1:] + 1
        for _ in range(max_new_tokens - 1):
            if self.mask:
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            out = self.model(input_ids=step, attention_mask=mask, cache_position=position, **kwargs)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            produced.append(step)
            position = position + 1
            if self.sync_each:
                sync(self.device)
            on_token()
        return torch.cat(produced, dim=1).cpu()


def profile_session(session, prompt, new_tokens: int, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    from qbench.sdk.backend import ignore_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    session.generate(prompt, new_tokens, ignore_step)
    with profile(activities=activities) as prof:
        session.generate(prompt, new_tokens, ignore_step)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    from qbench.sdk.hf import HFSession

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 4-layer toy model (CPU checks)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", action="store_true", help="print the profiler's top operators")
    parser.add_argument("--variants", action="store_true", help="also time candidate loops (cache, mask)")
    parser.add_argument("--compiled", action="store_true", help="also time compiled decoding (CUDA graphs)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.device, args.small, dtype)
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=args.device)
    print(f"{params / 1e9:.2f}B parameters, {args.dtype}, {args.device}, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, {args.reps} repetitions")
    session = HFSession(model, args.device)
    time_session(session, prompt.cpu(), args.new_tokens, 1)  # warm-up
    ours = time_session(session, prompt.cpu(), args.new_tokens, args.reps)
    theirs = time_hf_generate(model, prompt, args.new_tokens, args.reps)
    results = [("qbench HFSession.generate", ours), ("transformers generate, static cache, eager", theirs)]
    if args.compiled:
        results.append(("transformers generate, static cache, its auto-compile",
                        time_hf_generate(model, prompt, args.new_tokens, args.reps, compile=True)))
        loop = HFSession(model, args.device)
        assert loop.use_runtime("compiled") is None
        started = time.perf_counter()
        time_session(loop, prompt.cpu(), args.new_tokens, 1)
        print(f"qbench runtime=compiled: first generate (compiling) {time.perf_counter() - started:.1f} s")
        results.append(("qbench runtime=compiled (static cache, CUDA graph)",
                        time_session(loop, prompt.cpu(), args.new_tokens, args.reps)))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for label, values in results:
        med = statistics.median(values)
        print(f"{label}: {med:.3f} ms/token (reps {', '.join(f'{v:.3f}' for v in values)}); "
              f"weights read {weights / med / 1e6:.0f} GB/s")
    print(f"ratio qbench / transformers: {statistics.median(ours) / statistics.median(theirs):.2f}")
    if args.variants:
        for label, variant in (("dynamic cache, mask", LoopVariant(model, args.device, True, False)),
                               ("dynamic cache, no mask", LoopVariant(model, args.device, False, False)),
                               ("static cache, mask", LoopVariant(model, args.device, True, True)),
                               ("static cache, no mask", LoopVariant(model, args.device, False, True)),
                               ("static cache, no mask, no per-token sync",
                                LoopVariant(model, args.device, False, True, sync_each=False))):
            time_session(variant, prompt.cpu(), args.new_tokens, 1)
            values = time_session(variant, prompt.cpu(), args.new_tokens, args.reps)
            print(f"variant {label}: {statistics.median(values):.3f} ms/token "
                  f"(reps {', '.join(f'{v:.3f}' for v in values)})")
            if args.profile:
                print(profile_session(variant, prompt.cpu(), min(args.new_tokens, 32), args.device))
    if args.profile:
        print(profile_session(session, prompt.cpu(), min(args.new_tokens, 32), args.device))


if __name__ == "__main__":
    main()
