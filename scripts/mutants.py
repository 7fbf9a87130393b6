"""``make mutants``: seeded bugs in the core math, each of which the test suite must catch.

Each mutant replaces one exact piece of source text by a wrong one (a sign flip, a dropped
term, an off-by-one, a wrong momentum or bias correction) in a *copy* of ``src/`` and
``tests/`` (from a snapshot taken at the start) in a temporary directory; the working tree
is never touched. The tests
named for the mutant then run there (``pytest -x -q``, with ``PYTHONPATH`` pointing at
the copy). The copy always has the same path and the kernels their own cache
(``BNLAB_CACHE_DIR``) in that directory, so they are compiled once per run, never into the
user's cache; a C++ mutant is compiled incrementally from that build (its one file, then a
link) and the pristine build is restored after it. A mutant is *caught* when those tests fail (pytest exit 1);
it *survived* when they pass. A mutant whose target text is not found exactly once is
*stale* (the code moved on): the script says so and stops before running anything, so
a stale mutant is never counted as caught. The unmutated copy must pass every chosen test
first. Exit status: 0 when every mutant is caught, 1 otherwise, 2 for stale mutants.

    python scripts/mutants.py            # all of them (about an hour on 2 busy cores)
    python scripts/mutants.py --list     # names, files and tests
    python scripts/mutants.py ref-dx-sign nn-momentum   # a few, by name
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = ("tests/reference", "tests/test_check.py")
NN = ("tests/nn/test_batchnorm.py", "tests/test_dispatch.py")
SYNC = ("tests/nn/test_sync.py",)
SHARED = ("tests/nn/test_variants.py", "tests/nn/test_sync.py")  # functional helpers they use
INFERENCE = ("tests/inference", "tests/test_inference.py")
KERNELS = ("tests/kernels", "tests/test_dispatch.py", "tests/test_functional.py", "tests/nn/test_batchnorm.py")  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (exactly one occurrence) by ``new`` in ``path``; run ``tests``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def cpp(self) -> bool:
        return self.path.endswith((".cpp", ".h"))


REF = "src/bnlab/reference/batchnorm.py"
NN_BN = "src/bnlab/nn/batchnorm.py"
SYNC_PY = "src/bnlab/nn/sync.py"
FUNC = "src/bnlab/functional.py"
COMPOSITE = "src/bnlab/kernels/composite.py"
FORWARD_CPP = "src/bnlab/kernels/cpu/forward.cpp"
BACKWARD_CPP = "src/bnlab/kernels/cpu/backward.cpp"
FOLD = "src/bnlab/inference/fold.py"
RECALIBRATE = "src/bnlab/inference/recalibrate.py"

# fmt: off
MUTANTS: list[Mutant] = [
    # level 1, the NumPy reference (the oracle itself must be pinned by tests)
    Mutant("ref-unbiased-normalization", REF, "var = sq.mean(axis=0)", "var = sq.sum(axis=0) / (x.shape[0] - 1)", REFERENCE),
    Mutant("ref-dropped-eps-train", REF, "sqrtvar = np.sqrt(var + eps)", "sqrtvar = np.sqrt(var)", REFERENCE),
    Mutant("ref-dropped-eps-test", REF, "ivar = 1.0 / np.sqrt(running_var + eps)", "ivar = 1.0 / np.sqrt(running_var)", REFERENCE),
    Mutant("ref-momentum-swapped", REF, "running_mean += (1.0 - momentum) * mu", "running_mean += momentum * mu", REFERENCE),
    Mutant("ref-running-var-of-mean", REF, "running_var += (1.0 - momentum) * var", "running_var += (1.0 - momentum) * mu", REFERENCE),
    Mutant("ref-staged-dx-sign", REF, "dx = dxmu + dmu / n", "dx = dxmu - dmu / n", REFERENCE),
    Mutant("ref-staged-dropped-factor-2", REF, "dxmu = dxmu + 2.0 * xmu * dsq", "dxmu = dxmu + xmu * dsq", REFERENCE),
    Mutant("ref-compact-dropped-mean-dy", REF, "(dout - dbeta / n - x_hat * dgamma / n)", "(dout - x_hat * dgamma / n)", REFERENCE),
    Mutant("ref-compact-off-by-one", REF, "(dout - dbeta / n - x_hat * dgamma / n)", "(dout - dbeta / n - x_hat * dgamma / (n - 1))", REFERENCE),
    Mutant("ref-dgamma-is-dbeta", REF, "    dgamma = (dout * x_hat).sum(axis=0)\n    if mode == \"test\":\n        return dout * gamma", "    dgamma = dout.sum(axis=0)\n    if mode == \"test\":\n        return dout * gamma", REFERENCE),
    Mutant("ref-population-bias-correction", REF, "m / (m - 1) * batch_vars", "(m - 1) / m * batch_vars", REFERENCE),
    Mutant("ref-fold-shift-sign", REF, "np.asarray(beta) - scale * np.asarray(running_mean)", "np.asarray(beta) + scale * np.asarray(running_mean)", REFERENCE),
    # level 3, nn: momentum, cumulative average, num_batches_tracked
    Mutant("nn-momentum-inverted", NN_BN, "            return 1.0 / (float(self.num_batches_tracked) + 1.0)\n        return self.momentum", "            return 1.0 / (float(self.num_batches_tracked) + 1.0)\n        return 1.0 - self.momentum", NN),
    Mutant("nn-cumulative-off-by-one", NN_BN, "return 1.0 / (float(self.num_batches_tracked) + 1.0)", "return 1.0 / (float(self.num_batches_tracked) + 2.0)", NN),
    Mutant("nn-batches-not-counted", NN_BN, "self.num_batches_tracked.add_(1)", "self.num_batches_tracked.add_(0)", NN),
    Mutant("nn-eval-untracked-uses-running", NN_BN, "use_batch_stats = self.training or self.running_mean is None", "use_batch_stats = self.training", NN),
    # SyncBatchNorm: Chan's merge, the backward all-reduce
    Mutant("sync-chan-dropped-between-term", SYNC_PY, "var = (m2s + counts * (means - mean) ** 2).sum(0) / total", "var = m2s.sum(0) / total", SYNC),
    Mutant("sync-unweighted-mean", SYNC_PY, "mean = (counts * means).sum(0) / total", "mean = means.mean(0)", SYNC),
    Mutant("sync-no-bias-correction", SYNC_PY, "mean, var, total, momentum, nonfinite)", "mean, var, total, momentum, nonfinite, correction=False)", SYNC),
    Mutant("sync-backward-not-reduced", SYNC_PY, "dist.all_reduce(sums, group=ctx.group)", "sums = sums.clone()", SYNC),
    Mutant("sync-backward-off-by-one", SYNC_PY, "sum_g / count, sum_gx / count", "sum_g / (count - 1), sum_gx / count", SYNC),
    Mutant("sync-triton-sums-not-rescaled", "src/bnlab/kernels/cuda/ops.py", "scale = plan.M / count", "scale = 1.0", ("tests/kernels/cuda/test_sync_passes.py",)),
    Mutant("sync-grad-weight-is-sum-dy", SYNC_PY, "grad_weight = local_dy_xhat.to(weight.dtype)", "grad_weight = local_dy.to(weight.dtype)", SYNC),
    Mutant("sync-global-batch-of-one", SYNC_PY, "if total <= 1:", "if total < 1:", SYNC),
    # inference: fold and recalibrate
    Mutant("fold-dropped-eps", FOLD, "scale = torch.rsqrt(var + bn.eps)", "scale = torch.rsqrt(var)", INFERENCE),
    Mutant("fold-dropped-bn-bias", FOLD, "        shift = shift + bn.bias.double()", "        shift = shift + 0.0 * bn.bias.double()", INFERENCE),
    Mutant("fold-layer-bias-unscaled", FOLD, "layer.bias.double() * scale + shift", "layer.bias.double() + shift", INFERENCE),
    Mutant("recalibrate-biased-variance", RECALIBRATE, "torch.var_mean(x, dim=1, correction=1)", "torch.var_mean(x, dim=1, correction=0)", INFERENCE),
    Mutant("recalibrate-mean-off-by-one", RECALIBRATE, "copy_(entry.means / entry.batches)", "copy_(entry.means / (entry.batches + 1))", INFERENCE),
    # level 2: functional's helpers (SyncBatchNorm, Batch Renorm) and the composite torch-op
    # implementation (fallback without the extension, and the graph of double backward)
    Mutant("functional-no-bias-correction", FUNC, "unbiased = var * (count / (count - 1)) if correction else var", "unbiased = var if correction else var", SHARED),
    Mutant("composite-grad-input-sign", COMPOSITE, "- x_hat * per_channel(mean_dy_xhat, dy)", "+ x_hat * per_channel(mean_dy_xhat, dy)", KERNELS),
    Mutant("composite-grad-weight-is-sum-dy", COMPOSITE, "sum_g_xhat if output_mask[1] else none", "sum_g if output_mask[1] else none", KERNELS),
    Mutant("composite-running-var-biased", COMPOSITE, "unbiased = var.detach() * (count / max(count - 1, 1))", "unbiased = var.detach() * (count / max(count, 1))", KERNELS),
    Mutant("composite-eval-dropped-eps", COMPOSITE, "invstd = torch.rsqrt(running_var.to(acc) + eps)", "invstd = torch.rsqrt(running_var.to(acc))", KERNELS),
    Mutant("composite-momentum-inverted", COMPOSITE, "new = running * (1.0 - momentum) + batch.to(running.dtype) * momentum", "new = running * momentum + batch.to(running.dtype) * (1.0 - momentum)", KERNELS),
    # the C++ kernels (each costs a rebuild)
    Mutant("cpp-grad-weight-is-sum-dy", BACKWARD_CPP, "need_weight ? sum_g_xhat_t : none", "need_weight ? sum_g_t : none", KERNELS),
    Mutant("cpp-sum-g-xhat-dropped-term", BACKWARD_CPP, "invstd[c] * (s2 - mean_d[c] * s1)", "invstd[c] * s2", KERNELS),
    Mutant("cpp-grad-input-sign", BACKWARD_CPP, "slope * mean_d[c] - gain * s1 / n", "slope * mean_d[c] + gain * s1 / n", KERNELS),
    Mutant("cpp-running-var-biased", FORWARD_CPP, "return var[c] * n / std::max(1.0, n - 1.0);", "return var[c];", KERNELS),
    Mutant("cpp-momentum-inverted", FORWARD_CPP, "old * (1.0 - momentum) + batch(c) * momentum", "old * momentum + batch(c) * (1.0 - momentum)", KERNELS),
    Mutant("cpp-variance-off-by-one", FORWARD_CPP, "var = s2 / n - mean_d * mean_d;", "var = s2 / (n - 1.0) - mean_d * mean_d;", KERNELS),
    Mutant("cpp-eager-eval-ignores-autograd", "src/bnlab/kernels/cpu/ops.cpp", "if (!training && !record) {", "if (!training) {", ("tests/test_operator.py",)),
    Mutant("cpp-eager-never-reports", "src/bnlab/kernels/cpu/ops.cpp", "[](bool b) { return b; })) return {out, bad};", "[](bool b) { return b; })) return {out, c10::nullopt};", ("tests/nn/test_batchnorm.py",)),
    Mutant("cpp-dropped-eps", FORWARD_CPP, "const double invstd = 1.0 / std::sqrt(var + eps);", "const double invstd = 1.0 / std::sqrt(var);", KERNELS),
    Mutant("cpp-planar-sums-skip-flush", "src/bnlab/kernels/cpu/passes.h", "if (pending >= kBlock || (last && l1 == L)) {", "if (last && l1 == L) {", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-by-channel-sums-flushed-after-first-plane", "src/bnlab/kernels/cpu/passes.h", "p.shift[c], L, n + 1 == g.N);", "p.shift[c], L, n == 0);", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-by-channel-last-plane-unwritten", "src/bnlab/kernels/cpu/passes.h", "      for (int64_t n = 0; n < g.N; ++n) {\n        for (int64_t c = c0; c < c1; ++c) {\n          const acc_t a", "      for (int64_t n = 0; n + 1 < g.N; ++n) {\n        for (int64_t c = c0; c < c1; ++c) {\n          const acc_t a", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-by-channel-group-misses-a-channel", "src/bnlab/kernels/cpu/passes.h", "c1 = std::min(C, c0 + G);", "c1 = std::min(C, c0 + G - 1);", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-chunks-follow-threads", "src/bnlab/kernels/cpu/passes.h", "std::min({kMaxChunks, work, by_size, by_values})", "std::min({static_cast<int64_t>(at::get_num_threads()), work, by_size})", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-results-in-suggested-format", FORWARD_CPP, "  if (dense) {\n    format = input.is_contiguous()", "  if (false) {\n    format = input.is_contiguous()", ("tests/test_dispatch.py", "tests/kernels/test_kernels.py")),
    Mutant("layout-gradient-ignores-its-format", "src/bnlab/kernels/layout.py", "grad_out is None or (_dense_in_a_format(grad_out) and _suggested(grad_out) == suggested)", "grad_out is None or _dense_in_a_format(grad_out)", ("tests/test_dispatch.py", "tests/kernels/test_kernels.py", "tests/kernels/cuda")),
    Mutant("cpp-column-block-drops-a-channel", "src/bnlab/kernels/cpu/passes.h", "const int64_t width = c_end - c_begin;", "const int64_t width = c_end - c_begin - (columns > 1);", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-inference-dropped-eps", FORWARD_CPP, "out[c] = weight[c] / std::sqrt(var[c] + eps);", "out[c] = weight[c] / std::sqrt(var[c]);", KERNELS),
    Mutant("cpp-inference-ignores-strides", "src/bnlab/kernels/cpu/kernels.h", "t->scalar_type() == c10::CppTypeToScalarType<T>::value && t->stride(0) == 1;", "t->scalar_type() == c10::CppTypeToScalarType<T>::value;", ("tests/kernels/test_kernels.py",)),
    Mutant("cpp-module-counts-refused-batch", "src/bnlab/kernels/cpu/ops.cpp", "if (counter && !(bad.has_value() && nonfinite == bnlab::kRaise)) {", "if (counter) {", ("tests/nn/test_batchnorm.py",)),
    Mutant("cpp-module-cumulative-off-by-one", "src/bnlab/kernels/cpu/ops.cpp", "(counter ? 1.0 / double(*counter + 1) : 0.0)", "(counter ? 1.0 / double(*counter + 2) : 0.0)", ("tests/nn/test_batchnorm.py",)),
    Mutant("composite-jvp-frozen-statistics", "src/bnlab/kernels/composite.py", "dx = dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True)", "dx = dx - dx.mean(dims, keepdim=True)", ("tests/test_operator.py",)),
    Mutant("functional-forward-ad-unrouted", "src/bnlab/functional.py", "return _forward_ad._current_level >= 0", "return _forward_ad._current_level > 0", ("tests/test_operator.py",)),
    Mutant("renorm-schedule-one-step-late", "src/bnlab/nn/variants.py", "self._limits(self.num_batches_tracked + 1)", "self._limits(self.num_batches_tracked)", ("tests/nn/test_variants.py",)),
    Mutant("ghost-counts-before-checks", "src/bnlab/nn/variants.py", "        self._check_settings()\n        momentum = self._averaging_factor()\n        n, size", "        self._check_settings()\n        self._count_batch()\n        momentum = self._averaging_factor()\n        n, size", ("tests/nn/test_variants.py",)),
    Mutant("composite-strides-never-torchs", "src/bnlab/kernels/layout.py", "    if torch._C._are_functorch_transforms_active():\n        return None\n    return result_strides(input, grad_out)", "    return None", ("tests/test_dispatch.py",)),
    Mutant("composite-jvp-statistics-constant", "src/bnlab/kernels/composite.py", "x_hat, invstd = _normalized(xa, shift, mean_d, invstd, eps if training else None)\n    tangent", "x_hat, invstd = _normalized(xa, shift, mean_d, invstd, None)\n    tangent", ("tests/test_operator.py",)),
    Mutant("cpp-module-eval-batch-stats", "src/bnlab/kernels/cpu/ops.cpp", "const bool batch_stats = training || !running_mean.has_value();", "const bool batch_stats = training || running_mean.has_value();", ("tests/nn/test_batchnorm.py",)),
]
# fmt: on


def _copy_tree(source: Path, into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".hypothesis")
    for name in ("src", "tests"):
        shutil.copytree(source / name, into / name, ignore=ignore)
    shutil.copy2(source / "pyproject.toml", into / "pyproject.toml")


def _environment(tree: Path, cache: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1",
                BNLAB_CACHE_DIR=str(cache))  # fmt: skip


# A C++ mutant's build has its key pinned (_mutate_build), so this test of the key fails for
# every C++ mutant whatever the mutation: it must not count as catching one.
PINNED_KEY_TEST = "tests/kernels/test_kernels.py::test_build_cache_key_follows_the_sources"


def _pytest(tree: Path, tests: tuple[str, ...], env: dict[str, str], timeout: float, deselect: tuple[str, ...] = ()) -> tuple[int, str]:  # fmt: skip
    """pytest's exit code and the first failing test's summary line."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    command += [f"--deselect={test}" for test in deselect]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    if done.returncode not in (0, 1):  # collection error, usage error, nothing collected
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return done.returncode, (failed[0][len("FAILED ") :][:150] if failed else "")


def check_targets(mutants: list[Mutant], root: Path = ROOT) -> list[str]:
    """Problems with the mutants' target texts: each must occur exactly once."""
    problems = []
    for mutant in mutants:
        path = root / mutant.path
        if not path.exists():
            problems.append(f"{mutant.name}: file {mutant.path} does not exist")
            continue
        count = path.read_text().count(mutant.old)
        if count != 1:
            problems.append(f"{mutant.name}: target text found {count} times in {mutant.path} (expected once): {mutant.old!r}")  # fmt: skip
    return problems


def run_one(mutant: Mutant, workdir: Path, timeout: float) -> tuple[str, float, str]:
    """Apply ``mutant`` in a fresh copy and run its tests: 'caught', 'SURVIVED' or 'ERROR'."""
    started = time.perf_counter()
    tree = _fresh_tree(workdir)
    target = tree / mutant.path
    target.write_text(target.read_text().replace(mutant.old, mutant.new, 1))
    cache = workdir / "cache"
    if mutant.cpp:
        built = _baseline_build(workdir)
        if built is None:  # no baseline build to start from: a full build of its own
            cache = workdir / f"cache-{mutant.name}"
        else:
            _mutate_build(tree, built, mutant)
    try:
        deselect = (PINNED_KEY_TEST,) if mutant.cpp else ()
        code, failed = _pytest(tree, mutant.tests, _environment(tree, cache), timeout, deselect)
    finally:
        if mutant.cpp and cache == workdir / "cache":
            shutil.rmtree(cache)
            shutil.copytree(workdir / "cache-baseline", cache, symlinks=True)
    verdict = {0: "SURVIVED", 1: "caught"}.get(code, "ERROR")
    return verdict, time.perf_counter() - started, failed


def _baseline_build(workdir: Path) -> Path | None:
    """The kernel build the baseline left in the run's cache (kept aside once, pristine)."""
    builds = [p.parent for p in (workdir / "cache" / "kernels").glob("*/src")]
    if len(builds) != 1:
        return None
    if not (workdir / "cache-baseline").exists():
        shutil.copytree(workdir / "cache", workdir / "cache-baseline", symlinks=True)
    return builds[0]


def _mutate_build(tree: Path, built: Path, mutant: Mutant) -> None:
    """An incremental build of a C++ mutant: its file is mutated in the baseline build's own
    copy of the sources and the copy's build key pinned to that build, so ninja recompiles the
    one file and relinks (a rebuild of every file is several minutes on a loaded machine).
    The caller restores the pristine build afterwards."""
    source = built / "src" / Path(mutant.path).name
    text = source.read_text()
    if text.count(mutant.old) != 1:
        raise RuntimeError(f"{mutant.name}: target not found in the build's copy {source}")
    source.write_text(text.replace(mutant.old, mutant.new, 1))
    build_py = tree / "src" / "bnlab" / "kernels" / "build.py"
    pin = "return digest.hexdigest()[:16]"
    code = build_py.read_text()
    if code.count(pin) != 1:
        raise RuntimeError(f"{build_py}: cannot pin the build key ({pin!r} not found once)")
    build_py.write_text(code.replace(pin, f"return {built.name!r}"))


def _fresh_tree(workdir: Path) -> Path:
    """A copy of the snapshot taken at the start (edits to the working tree meanwhile are
    not picked up), always at the same path."""
    tree = workdir / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    _copy_tree(workdir / "snapshot", tree)
    return tree


def baseline(mutants: list[Mutant], workdir: Path, timeout: float) -> bool:
    """The unmutated copy: bnlab must be imported from it, and every chosen test must pass."""
    tests = tuple(sorted({t for m in mutants for t in m.tests}))
    tree = _fresh_tree(workdir)
    env = _environment(tree, workdir / "cache")
    probe = [sys.executable, "-c", "import bnlab; print(bnlab.__file__)"]
    where = subprocess.run(probe, cwd=tree, env=env, capture_output=True, text=True).stdout
    if not where.startswith(str(tree)):
        print(f"error: bnlab is imported from {where.strip()!r}, not the copy", file=sys.stderr)
        return False
    print(f"baseline: {len(tests)} test paths on the unmutated copy ...", flush=True)
    code, failed = _pytest(tree, tests, env, timeout)
    if code != 0:
        print(f"failed: {failed}", file=sys.stderr)
        print(f"error: the unmutated tests fail (pytest exit {code}); fix them first", file=sys.stderr)  # fmt: skip
    return code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"names: unknown mutant(s) {unknown}; see --list")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:34} {' '.join(m.tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bnlab-mutants-") as folder:
        workdir = Path(folder)
        _copy_tree(ROOT, workdir / "snapshot")
        problems = check_targets(chosen, workdir / "snapshot")
        if problems:
            print("stale mutants (the code changed; update them):", *problems, sep="\n  ", file=sys.stderr)  # fmt: skip
            return 2
        if not args.no_baseline and not baseline(chosen, workdir, args.timeout):
            return 1
        for i, mutant in enumerate(chosen, 1):
            verdict, seconds, failed = run_one(mutant, workdir, args.timeout)
            results.append((mutant, verdict))
            print(f"[{i:2}/{len(chosen)}] {verdict:8} {mutant.name:34} {seconds:6.1f} s  by {failed}", flush=True)  # fmt: skip
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught}/{len(results)} mutants caught")
    for mutant, verdict in results:
        if verdict != "caught":
            print(f"  {verdict}: {mutant.name}: {mutant.path}: {mutant.old!r} -> {mutant.new!r}; tests {' '.join(mutant.tests)}")  # fmt: skip
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
