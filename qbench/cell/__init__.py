"""One cell, inside its own worker process: the pipeline (build or fetch the artifact, load,
measure, record), the quantized-artifact cache, the baseline's reference, and the
lm-evaluation-harness engine. Imports the layers below (metrics, data, sdk, core)."""
