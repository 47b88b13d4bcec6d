"""`pipeline bench ...` and the benchmark scripts: speed/memory benchmarks and ablation/quality runs, with
targets that can fail (cli.py lists which is which)."""
