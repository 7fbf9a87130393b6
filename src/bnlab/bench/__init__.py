"""Side-by-side benchmarks of bnlab's BatchNorm against torch's (``bnlab bench``).

One module per idea: :mod:`~bnlab.bench.timing` (alternating timed runs, medians, bootstrap
intervals), :mod:`~bnlab.bench.kernels` (BN layers alone, with the bandwidth floor),
:mod:`~bnlab.bench.models` (training steps and eval of ResNet-shaped networks, torch BN vs
bnlab's vs BN as identity), :mod:`~bnlab.bench.resnets` (the networks) and
:mod:`~bnlab.bench.report` (tables, JSON, chart).
"""
