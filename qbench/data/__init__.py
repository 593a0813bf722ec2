"""What is measured, on which tokens: suites, corpora, evaluation windows, lm-eval task
files and the workload that turns them into token ids. Imports core and sdk."""
