"""The suites shipped with qbench (YAML files and their data), installed as
the package ``qbench_suites`` so that they are found without a checkout."""
