"""The CTCD reproduction experiment: same data, steps, batch and seeds for every variant.

1. pre-train, once per pre-training seed: standalone pair (no edges), one-way KD (the standalone teacher of
   the same seed, frozen -> a fresh student), CTCD (teacher <-> student), Community KD (the standalone
   teacher -> two students, which co-distil);
2. fine-tune every resulting model on the task (default: bundled SST-2) with several seeds;
3. write results.md / results.json / results.png: the table, and each claim's paired difference per metric
   (held-out MLM loss and masked-token accuracy on the whole held-out split, the task score) with its 95%
   interval over the pre-training seeds and a verdict from it.

Modules: ``variants`` (the variants as data, built into typed run configs), ``runner`` (runs them and
collects the results), ``report`` (table, verdicts, plot; imports nothing from the runner).
"""
