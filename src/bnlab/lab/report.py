"""The HTML report, rebuilt from saved metrics without retraining.

Per experiment: the claim with its source, a setup paragraph, the data used, one row per
sub-claim (result with intervals, verdict, the rule that produced it, its sensitivity to the
threshold) and the captioned figures. The page says, at the top and beside each quick run's
verdict, that quick mode leaves a 'sensitive' sub-claim undecided, and which sub-claims rest
on measured times (not reproducible bit for bit, unlike every seeded number). A quick-vs-full table compares the newest run of each
mode of every experiment shown. Verdicts are recomputed with the experiment's current logic.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path

from bnlab.files import atomic_write_text
from bnlab.lab.plots import captions, render_plots
from bnlab.lab.runs import get_experiment, load_run

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.supported { color: #176f2c; font-weight: bold; }
.not-supported { color: #a31515; font-weight: bold; }
.inconclusive, .inconclusive-in-quick-mode { color: #8a6d00; font-weight: bold; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text))


def _verdict_of(config: dict, saved: dict):
    return get_experiment(config["experiment"]).verdict(saved["metrics"])


def _label(text: str) -> str:
    return f"<span class='{text.replace(' ', '-')}'>{_esc(text)}</span>"


def _findings_rows(verdict, mode: str) -> list[tuple[str, str, str, str, str]]:
    """(sub-claim, verdict label, result, rule, sensitivity) rows; one row if no findings."""
    if not verdict.findings:
        return [("the claim", verdict.label_in(mode), verdict.summary, "", "")]
    verdict = verdict.in_mode(mode)
    quick = mode == "quick"
    return [
        (f.claim, _finding_label(f, quick), f.result, f.rule, f.sensitivity)
        for f in verdict.findings
    ]


def _finding_label(finding, quick: bool) -> str:
    if finding.context:
        return "context (does not decide)"
    if quick and finding.supported is None:
        return "inconclusive in quick mode"
    return verdict_label(finding.supported)


QUICK_RULE = (
    "In quick mode a sub-claim is decided only where the decision is robust: one whose "
    "sensitivity line says 'sensitive' (a neighbouring threshold would flip it) is shown as "
    "'inconclusive in quick mode', whatever its rule gives at the stated threshold."
)
TIMING_RULE = (
    "Every number is seeded and a rerun reproduces it, except measured times (the runtimes, "
    "and the timings of the experiments marked timing-based), so a timing-based sub-claim "
    "near a threshold can be decided differently by two runs."
)


def _verdict_notes(experiment, mode: str) -> str:
    """The sentences beside a run's verdict: the quick-mode rule, the timing caveat."""
    notes = [QUICK_RULE] if mode == "quick" else []
    if experiment.timed:
        notes.append(
            "Timing-based: decided from measured CPU times, which vary between runs; "
            "a sub-claim near a threshold can come out differently in a rerun."
        )
    return "".join(f" <small>{_esc(note)}</small>" for note in notes)


def _held_back(verdict, mode: str) -> dict[int, str]:
    """{row: note} for the sub-claims that quick mode leaves undecided although their rule
    decides them at the stated threshold (their sensitivity line says 'sensitive')."""
    if mode != "quick" or not verdict.findings:
        return {}
    shown = verdict.in_mode(mode).findings
    return {
        i: f"<br><small>(the rule gives {_esc(verdict_label(raw.supported))} at the stated "
        "threshold; sensitive, so undecided in quick mode)</small>"
        for i, (raw, quick) in enumerate(zip(verdict.findings, shown, strict=True))
        if quick.supported is None and raw.supported is not None and not raw.context
    }


def verdict_label(supported: bool | None) -> str:
    return {True: "supported", False: "not supported", None: "inconclusive"}[supported]


def _section(run_dir: Path, config: dict, saved: dict) -> tuple[str, str]:
    """The summary-table rows and the detail section of one run."""
    experiment = get_experiment(config["experiment"])
    verdict = _verdict_of(config, saved)
    mode = config["mode"]
    name = _esc(experiment.name)
    rows = _findings_rows(verdict, mode)
    summary = "".join(
        f"<tr><td><a href='#{name}'>{name}</a></td><td>{_esc(claim)}</td><td>{_label(lab)}</td>"
        f"<td>{_esc(result)}</td></tr>"
        for claim, lab, result, _, _ in rows
    )
    held = _held_back(verdict, mode)
    detail_rows = "".join(
        f"<tr><td>{_esc(claim)}</td><td>{_label(lab)}{held.get(i, '')}</td><td>{_esc(result)}</td>"
        f"<td>{_esc(rule)}</td><td>{_esc(sens)}</td></tr>"
        for i, (claim, lab, result, rule, sens) in enumerate(rows)
    )
    figures = []
    texts = captions(run_dir)
    for png in sorted(run_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        caption = texts.get(png.stem, png.stem)
        figures.append(
            f"<figure><img alt='{_esc(png.stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    data_used = "; ".join(saved.get("data") or []) or "synthetic (generated in the experiment)"
    settings = ", ".join(f"{k}={v}" for k, v in config["config"].items())
    warm = saved.get("kernel_warm_up_seconds")
    runtime = f"{saved.get('runtime_seconds', 0):.0f} s" + (
        f" (kernel loading excluded: {warm:.1f} s)" if warm is not None else ""
    )
    section = (
        f"<h2 id='{name}'>{name}</h2>"
        f"<p><b>Claim.</b> {_esc(experiment.claim)}"
        + (f" <i>Source: {_esc(experiment.source)}</i>" if experiment.source else "")
        + "</p>"
        f"<p><b>Setup.</b> {_esc(experiment.describe_setup(config['config']))}</p>"
        f"<p><b>Data.</b> {_esc(data_used)}</p>"
        f"<p><b>Verdict:</b> {_label(verdict.label_in(mode))} ({mode} mode).{_verdict_notes(experiment, mode)}</p>"
        "<table><tr><th>sub-claim</th><th>verdict</th><th>result (95% intervals)</th>"
        f"<th>rule</th><th>sensitivity</th></tr>{detail_rows}</table>"
        f"<p><small>Run <code>{_esc(run_dir)}</code>, {runtime}. "
        f"Full mode: {_esc(experiment.full_runtime)}. Config: {_esc(settings)}</small></p>"
        + "".join(figures)
    )
    return summary, section


def _newest(experiment_dir: Path, mode: str) -> Path | None:
    for run_dir in sorted(experiment_dir.glob("*/metrics.json"), reverse=True):
        if load_run(run_dir.parent)[0].get("mode") == mode:
            return run_dir.parent
    return None


def consistency_rows(run_dirs: list[Path]) -> list[tuple[str, str, str, str, str]]:
    """(experiment, sub-claim, quick, full, agree) for experiments with runs in both modes,
    taking the newest quick and full run beside each given run."""
    rows = []
    for experiment_dir in sorted({Path(d).parent for d in run_dirs}):
        quick_dir, full_dir = _newest(experiment_dir, "quick"), _newest(experiment_dir, "full")
        if quick_dir is None or full_dir is None:
            continue
        labelled = {}
        for mode, run_dir in (("quick", quick_dir), ("full", full_dir)):
            config, saved = load_run(run_dir)
            labelled[mode] = {c: lab for c, lab, *_ in _findings_rows(_verdict_of(config, saved), mode)}  # fmt: skip
        for claim in labelled["full"]:
            quick, full = labelled["quick"].get(claim), labelled["full"][claim]
            if quick is None:
                quick, agree = "— (not in quick mode)", "—"
            elif quick == full:
                agree = "yes"
            else:
                agree = "quick undecided" if quick.startswith("inconclusive") else "NO"
            rows.append((experiment_dir.name, claim, quick, full, agree))
    return rows


def build_report(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Write one self-contained HTML page (figures inline) for the given run directories."""
    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory, got none")
    rows, sections, skipped, finished = [], [], [], []
    for run_dir in map(Path, run_dirs):
        config, saved = load_run(run_dir)
        if saved is None:
            skipped.append(str(run_dir))
            continue
        if not any(run_dir.glob("*.png")) or not (run_dir / "captions.json").is_file():
            render_plots(run_dir)
        row, section = _section(run_dir, config, saved)
        rows.append(row)
        sections.append(section)
        finished.append(run_dir)
    if not rows:
        raise ValueError(f"run_dirs: no finished run (with metrics.json) among {skipped}")
    note = f"<p>Unfinished runs left out: {_esc(', '.join(skipped))}</p>" if skipped else ""
    timed = sorted({name for name in (load_run(d)[0]["experiment"] for d in finished) if get_experiment(name).timed})  # fmt: skip
    consistency = consistency_rows(finished)
    consistency_table = (
        "<h2>Quick vs full mode</h2><table><tr><th>experiment</th><th>sub-claim</th>"
        "<th>quick</th><th>full</th><th>agree</th></tr>"
        + "".join(f"<tr>{''.join(f'<td>{_esc(c)}</td>' for c in row)}</tr>" for row in consistency)
        + "</table>"
        if consistency
        else "<p>No experiment here has both a quick and a full run to compare.</p>"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>bnlab report</title>"
        f"<style>{_STYLE}</style></head><body><h1>bnlab report</h1>"
        f"<p>Built {datetime.now():%Y-%m-%d %H:%M} from saved metrics. Each verdict is computed "
        "from the numbers of its run by the rule shown beside it; intervals are 95% percentile "
        f"bootstrap intervals over seeds (and test examples where stated). {_esc(QUICK_RULE)} "
        f"{_esc(TIMING_RULE)} Timing-based here: {_esc(', '.join(timed) or 'none')}.</p>"
        "<table><tr><th>experiment</th><th>sub-claim</th><th>verdict</th><th>result</th></tr>"
        + "".join(rows)
        + "</table>"
        + note
        + consistency_table
        + "".join(sections)
        + "</body></html>"
    )
    return atomic_write_text(out_path, page)


def markdown_table(root: str | Path) -> str:
    """A Markdown table of every sub-claim under ``root``: the newest quick and full verdicts
    side by side, with the full run's result (intervals) and runtime (for the README)."""
    lines = ["| experiment | sub-claim | quick | full | full-mode result (95% intervals) |", "|---|---|---|---|---|"]  # fmt: skip
    for experiment_dir in sorted(p for p in Path(root).glob("*/") if p.is_dir()):
        runs = {mode: _newest(experiment_dir, mode) for mode in ("quick", "full")}
        rows: dict[str, dict] = {}
        for mode, run_dir in runs.items():
            if run_dir is None:
                continue
            config, saved = load_run(run_dir)
            for claim, lab, result, *_ in _findings_rows(_verdict_of(config, saved), mode):
                rows.setdefault(claim, {})[mode] = (lab, result)
        for claim, by_mode in rows.items():
            quick = by_mode.get("quick", ("— (not in quick mode)", ""))[0]
            full, result = by_mode.get("full", ("not run", ""))
            lines.append(f"| `{experiment_dir.name}` | {claim} | {quick} | {full} | {result} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bnlab.lab.report RUNS_DIR: the README's verdict table
    import sys

    print(markdown_table(sys.argv[1] if len(sys.argv) > 1 else "runs"), end="")
