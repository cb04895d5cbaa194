"""Pictures of bench/churn.py's results (``bench/churn.py --plot RESULTS...``).

Kept apart so that matplotlib (the ``bench`` extra in setup.cfg) is only imported
when drawing; the benchmark itself needs nothing beyond the agent's dependencies.

* docs/churn-latency.png: the distribution (CDF) of network programming latency,
  one panel per rate, one line per count of Pod namespaces;
* docs/churn-memory.png: the agent's resident memory over the soak (when a results
  file has one), with the changes waiting to be programmed;
* docs/churn-vm-latency.png: the same CDFs for results of ``--vm`` (real IPVS in the
  test VM), apart: another cluster size, and everything runs emulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def _kernel(res: dict[str, Any]) -> str:
    return str(res["args"].get("kernel", "memory"))


def _phases(results: Sequence[dict[str, Any]]) -> dict[float, dict[int, tuple[float, list[float]]]]:
    """rate asked -> Pod namespace count -> (rate reached, latencies); soak and fault
    runs left out; a later file's agent replaces an earlier one's."""
    out: dict[float, dict[int, tuple[float, list[float]]]] = {}
    for res in results:
        for run in res["runs"]:
            if not run["label"].startswith("ns"):
                continue
            for phase in run["phases"]:
                if phase["label"].startswith("soak"):
                    continue
                out.setdefault(phase["rate"], {})[run["namespaces"]] = (phase["achieved"], phase["latencies"])
    return out


def plot(paths: Sequence[str], outdir: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in paths]
    simulated = [r for r in results if _kernel(r) == "memory"]
    real = [r for r in results if _kernel(r) == "netlink"]
    _cdfs(plt, _phases(simulated), "10,000 Services, simulated kernel", outdir / "churn-latency.png")
    if real:
        services = real[0]["args"]["services"]
        _cdfs(plt, _phases(real), f"{services:,} Services, real IPVS in the emulated test VM",
              outdir / "churn-vm-latency.png")
    _memory(plt, simulated, outdir / "churn-memory.png")
    return 0


def _cdfs(plt: Any, phases: dict[float, dict[int, tuple[float, list[float]]]], what: str, path: Path) -> None:
    if phases:
        fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 4), sharey=True, squeeze=False)
        for ax, rate in zip(axes[0], sorted(phases)):
            reached = min(a for a, _ in phases[rate].values())
            for count, (_, lat) in sorted(phases[rate].items()):
                if not lat:
                    continue
                ys = [(i + 1) / len(lat) for i in range(len(lat))]
                ax.plot(sorted(lat), ys, label=f"{count} Pod namespaces" if count else "node only")
            ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
            ax.set_xscale("log")
            ax.set_title(f"{rate:g} changes/s" + (f" asked, {reached:.0f}/s reached" if reached < 0.9 * rate else ""))
            ax.set_xlabel("API server write -> table acknowledged (s)")
            ax.grid(True, which="both", linewidth=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("fraction of changes programmed")
        fig.suptitle(f"svcproxy network programming latency under churn ({what})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")


def _memory(plt: Any, results: Sequence[dict[str, Any]], path: Path) -> None:
    soaks = [run["soak"] for res in results for run in res["runs"] if run.get("soak")]
    if soaks:
        samples = soaks[0]["samples"]
        t0 = samples[0][0]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([(s[0] - t0) / 60 for s in samples], [s[1] for s in samples], label="resident memory (MB)")
        ax.set_xlabel("minutes of churn")
        ax.set_ylabel("MB")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot([(s[0] - t0) / 60 for s in samples], [s[3] for s in samples], color="tab:orange",
                 linewidth=0.7, label="changes waiting")
        ax2.set_ylabel("changes waiting to be programmed")
        ax2.set_ylim(bottom=0)
        warmup = soaks[0].get("warmup", results[0]["args"].get("soak_warmup", 300.0))
        if warmup:
            ax.axvspan(0, warmup / 60, color="grey", alpha=0.15, label="warm-up (left out of the growth)")
        fig.legend(loc="lower right", fontsize=8)
        ax.set_title(f"svcproxy agent under {results[0]['args'].get('soak_rate', 100):g} changes/s "
                     "(10,000 Services, simulated kernel)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")
