"""The CTCD reproduction experiment: same data, steps, batch and seeds for every variant.

1. pre-train: standalone pair (no edges), one-way KD (the standalone teacher, frozen -> a fresh
   student), CTCD (teacher <-> student), Community KD (the standalone teacher -> two students, which
   co-distil);
2. fine-tune every resulting model on the task (default: bundled SST-2) with several seeds;
3. write results.md / results.json / results.png with the table and the two claims, each with a verdict
   computed from the spread over seeds.

Modules: ``variants`` (the variants as data, built into typed run configs), ``runner`` (runs them and
collects the results), ``report`` (table, verdicts, plot; imports nothing from the runner).
"""
