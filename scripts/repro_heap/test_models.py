"""Model-level parity: torch BN vs bnlab convert() vs bnlab convert(example=) (fused),
3 SGD+momentum steps, float64 / float32 (+ bfloat16 subset), NCHW and channels_last.
usage: python test_models.py [part]   part in {2d, 1d3d, bf16, all}"""
import copy
import sys
import time
import traceback

import torch

from common import (Net2d, MLP1d, Conv1dNet, Conv3dNet, train_run, compare_runs, to_bnlab,
                    count_kinds)

torch.set_num_threads(2)
STEPS = 3
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
problems = []


def run_case(tag, make_model, in_shape, ncls=10, memfmt=None, dtypes=(torch.float64, torch.float32),
             fused=True, bf16=False):
    torch.manual_seed(hash(tag) % 2**31)
    base = make_model()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(in_shape, generator=g) for _ in range(STEPS + 1)]
    targets = [torch.randint(0, ncls, (in_shape[0],), generator=g) for _ in range(STEPS)]
    results = {}
    ref64 = None
    line = [tag]
    for dt in dtypes:
        tm = copy.deepcopy(base).to(dt)
        if memfmt is not None:
            tm = tm.to(memory_format=memfmt)
        ins = [x.to(dt) for x in inputs]
        arms = {"torch": tm, "bnlab": to_bnlab(tm)}
        if fused:
            ex = ins[0] if memfmt is None else ins[0].contiguous(memory_format=memfmt)
            try:
                arms["fused"] = to_bnlab(tm, fused=True, example=ex)
            except Exception as e:
                problems.append(f"{tag} {dt}: fused convert failed: {e!r}")
        runs = {}
        for name, m in arms.items():
            try:
                runs[name] = train_run(m, ins, targets, STEPS, memfmt=memfmt)
            except Exception as e:
                runs[name] = e
        if dt == torch.float64:
            ref64 = runs.get("torch")
        # error parity
        errs = {k: v for k, v in runs.items() if isinstance(v, Exception)}
        if errs:
            kinds = {k: type(v).__name__ for k, v in errs.items()}
            if len(errs) != len(runs):
                problems.append(f"{tag} {dt}: some arms raised: {kinds} {[str(v)[:200] for v in errs.values()]}")
            line.append(f"{str(dt)[6:]}: all raise {set(kinds.values())}")
            continue
        if "fused" in arms:
            k = count_kinds(arms["fused"])
            if not any("Act" in n for n in k):
                problems.append(f"{tag} {dt}: fused model has no BatchNormAct: {k}")
        for name in [n for n in runs if n != "torch"]:
            c = compare_runs(runs[name], runs["torch"])
            if "error" in c:
                problems.append(f"{tag} {dt} {name}: {c['error']}")
                continue
            if dt in TOL:
                tol = TOL[dt]
                bad = []
                if c["loss"] > tol: bad.append(f"loss {c['loss']:.2e}")
                if c["grad"][0] > tol: bad.append(f"grad {c['grad'][0]:.2e} ({c['grad'][1]})")
                if c["buf"][0] > tol: bad.append(f"buf {c['buf'][0]:.2e} ({c['buf'][1]})")
                if c["eval"] > tol: bad.append(f"eval {c['eval']:.2e}")
                if c["eval_grad"] > tol: bad.append(f"eval_grad {c['eval_grad']:.2e}")
                if "nbt" in c: bad.append(f"num_batches_tracked {c['nbt']}")
                if bad and dt == torch.float32 and ref64 is not None and not isinstance(ref64, Exception):
                    # compare both against the float64 torch run
                    cb = compare_runs(runs[name], ref64)
                    ct = compare_runs(runs["torch"], ref64)
                    bad.append(f"vs f64: {name} grad {cb['grad'][0]:.2e} buf {cb['buf'][0]:.2e} eval {cb['eval']:.2e} | "
                               f"torch grad {ct['grad'][0]:.2e} buf {ct['buf'][0]:.2e} eval {ct['eval']:.2e}")
                    if cb["grad"][0] <= 3 * ct["grad"][0] + 1e-6 and cb["eval"] <= 3 * ct["eval"] + 1e-6 \
                            and cb["buf"][0] <= 3 * ct["buf"][0] + 1e-6 and "nbt" not in c:
                        bad.append("(within 3x torch's own f32 error: rounding amplification, OK)")
                if bad:
                    msg = f"{tag} {str(dt)[6:]} {name}: " + "; ".join(bad)
                    if "OK)" not in msg:
                        problems.append(msg)
                    line.append("[!] " + msg)
                line.append(f"{str(dt)[6:]}/{name}: g{c['grad'][0]:.1e} b{c['buf'][0]:.1e} e{c['eval']:.1e}")
    print("  ".join(line), flush=True)


def grid2d():
    planes = [1, 2, 3, 4, 5, 7, 8, 11, 12, 14, 16, 23, 28, 56]
    chans = [1, 3, 7, 8, 9, 64, 85, 256, 512, 1000]
    Ns = [1, 2, 3, 8, 32]
    cases = []
    for i, P in enumerate(planes):
        for j, C in enumerate(chans):
            if (i + j) % 2:  # half the (plane, channel) pairs, alternating
                continue
            k = (i + j // 2) % 5
            N = Ns[k]
            while k > 0 and N * C * P * P > 1_600_000:
                k -= 1
                N = Ns[k]
            cl = (i * 10 + j) % 3 == 0
            cases.append((N, C, P, cl))
    # boundary cases near 2 MiB / 8 groups rule and the large tensors
    cases += [(32, 64, 56, False), (32, 64, 28, False), (32, 9, 28, False), (32, 7, 28, False),
              (8, 85, 7, False), (32, 64, 7, False), (32, 256, 4, False), (16, 33, 23, False),
              (32, 64, 56, True), (8, 512, 14, False), (32, 32, 45, False), (4, 1000, 7, False)]
    return cases


def main(part):
    t0 = time.time()
    if part in ("2d", "all"):
        cases = grid2d()
        for n, (N, C, P, cl) in enumerate(cases):
            tag = f"2d N{N} C{C} {P}x{P}" + (" CL" if cl else "")
            bott = (n % 4 == 1) and C <= 256
            try:
                run_case(tag + (" +bottleneck" if bott else ""), lambda: Net2d(3, C, bottleneck=bott), (N, 3, P, P),
                         memfmt=torch.channels_last if cl else None)
            except Exception:
                problems.append(f"{tag}: harness error {traceback.format_exc()[-500:]}")
    if part in ("1d3d", "all"):
        for N, C in [(2, 1), (3, 7), (8, 9), (32, 64), (32, 85), (8, 1000), (32, 512), (256, 1024), (2, 8192)]:
            run_case(f"1d N{N} C{C}", lambda: MLP1d(16, C), (N, 16))
        for N, C, L in [(2, 3, 5), (3, 8, 49), (8, 9, 64), (32, 64, 100), (8, 85, 16), (4, 256, 300),
                        (2, 1000, 7), (32, 7, 500), (1, 64, 1), (8, 11, 1024)]:
            run_case(f"1d N{N} C{C} L{L}", lambda: Conv1dNet(4, C), (N, 4, L))
        for N, C, D in [(2, 3, 4), (3, 8, 5), (8, 16, 6), (2, 64, 8), (4, 9, 12), (1, 85, 3), (2, 7, 2)]:
            for cl in (False, True):
                run_case(f"3d N{N} C{C} {D}^3" + (" CL" if cl else ""), lambda: Conv3dNet(2, C), (N, 2, D, D, D),
                         memfmt=torch.channels_last_3d if cl else None)
    if part in ("bf16", "all"):
        bf16_cases(grid2d()[::7])
    print(f"\n{len(problems)} problems in {time.time() - t0:.0f}s")
    for p in problems:
        print(" *", p)


def bf16_cases(cases):
    """bfloat16 model (params bf16 too): both against torch float64 of the same model."""
    from common import compare_runs, train_run
    for N, C, P, cl in cases:
        if N * P * P < 2 or N * ((P + 1) // 2) ** 2 < 2:
            continue
        tag = f"bf16 2d N{N} C{C} {P}x{P}" + (" CL" if cl else "")
        torch.manual_seed(7)
        base = Net2d(3, C)
        g = torch.Generator().manual_seed(1)
        inputs = [torch.randn((N, 3, P, P), generator=g) for _ in range(STEPS + 1)]
        targets = [torch.randint(0, 10, (N,), generator=g) for _ in range(STEPS)]
        mf = torch.channels_last if cl else None
        out = {}
        for name in ("torch", "bnlab", "fused"):
            m = copy.deepcopy(base).to(torch.bfloat16)
            ins = [x.to(torch.bfloat16) for x in inputs]
            if name == "bnlab":
                m = to_bnlab(m)
            elif name == "fused":
                m = to_bnlab(m, fused=True, example=ins[0])
            try:
                r = train_run(m, ins, targets, 1, memfmt=mf)  # one step: later steps diverge by rounding
                r1 = train_run(copy.deepcopy(base).double(), [x.double() for x in inputs], targets, 1, memfmt=mf)
                c = compare_runs(r, r1)
                out[name] = c
            except Exception as e:
                out[name] = repr(e)[:200]
        line = tag + "  " + "  ".join(
            f"{k}: g{v['grad'][0]:.1e} b{v['buf'][0]:.1e} e{v['eval']:.1e}" if isinstance(v, dict) else f"{k}: {v}"
            for k, v in out.items())
        print(line, flush=True)
        if all(isinstance(v, dict) for v in out.values()):
            t = out["torch"]
            for k in ("bnlab", "fused"):
                v = out[k]
                if v["grad"][0] > 3 * t["grad"][0] + 1e-2 or v["eval"] > 3 * t["eval"] + 1e-2 or \
                        v["buf"][0] > 3 * t["buf"][0] + 1e-2:
                    problems.append(f"{line}: {k} error well above torch's bf16 error")
        elif any(isinstance(v, str) for v in out.values()):
            problems.append(f"{line}: exceptions")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
