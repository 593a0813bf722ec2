import json, sys
def load(path):
    recs = {}
    for line in open(path):
        r = json.loads(line)
        recs[r["cell"]] = r  # the latest record of a cell wins
    return recs
a, b = load(sys.argv[1]), load(sys.argv[2])
QUALITY = ["perplexity", "nll", "ln_ppl_ratio", "kld", "same_top_p", "acc", "acc_norm", "gen_exact_match",
           "word_perplexity", "byte_perplexity", "bits_per_byte", "weight_bytes"]
same = differ = 0
for cell in sorted(set(a) | set(b)):
    ra, rb = a.get(cell), b.get(cell)
    if ra is None or rb is None:
        print("missing", cell); differ += 1; continue
    for name in QUALITY:
        ma, mb = ra["metrics"].get(name), rb["metrics"].get(name)
        if ma is None and mb is None: continue
        va = (ma or {}).get("value"), (ma or {}).get("stderr")
        vb = (mb or {}).get("value"), (mb or {}).get("stderr")
        if va == vb: same += 1
        else: differ += 1; print("DIFF", cell, name, va, vb)
    for task in sorted(set(ra.get("tasks", {})) | set(rb.get("tasks", {}))):
        for name in sorted(set(ra["tasks"].get(task, {})) | set(rb["tasks"].get(task, {}))):
            va = (ra["tasks"].get(task, {}).get(name) or {}).get("value")
            vb = (rb["tasks"].get(task, {}).get(name) or {}).get("value")
            if va == vb: same += 1
            else: differ += 1; print("DIFF", cell, task, name, va, vb)
print(f"{same} quality figures bit-identical, {differ} differ, over {len(set(a) | set(b))} cells")
