"""The bench's results as one markdown report (two tables: prediction, training step)."""
from __future__ import annotations


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(results: dict) -> str:
    """Markdown for the dict `bench.run` writes to bench.json."""
    opts = results["options"]
    lines = [
        "# AHIQ bench: the release's way (a) vs this kit's way (b)", "",
        f"Device: {results['device']}, {results['threads']} torch threads, torch {results['torch']}. "
        f"Way (b): precision {opts['precision']}, channels_last {opts['channels_last']}, "
        f"compile {opts['compile'] or 'off'}. Random weights, synthetic images.", "",
        "## Prediction", "",
        "(a) runs both full backbones on dis and ref of every pair for every member, torchvision deform; "
        "timed on the first `(a) pairs` pairs, reported per pair. (b) computes each backbone once per image "
        "and view (shared by the members) and the reference's part once per (reference, view). "
        "`max |a-b|`: largest score difference over the pairs both ways scored; `range (b)`: max - min of "
        "(b)'s scores (smallest over the members), to read it against: random heads score in a narrow range. "
        "b/a (CPU s): the same ratio in CPU seconds of the process, which other jobs on a shared machine "
        "do not stretch (on a GPU it counts the host's work only). Peak: memory added during the run; (b) "
        "runs its backbone groups one after the other.", "",
    ]
    flops = any("a_tflops" in r for r in results["predict"])
    head = "| config | members | pairs x views | (a) pairs | (a) pairs/s | (b) pairs/s | b/a | b/a (CPU s) | max abs(a-b) | range (b) | peak MiB (a) | peak MiB (b) |"
    head += " TFLOP/s (a) | TFLOP/s (b) |" if flops else ""
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["predict"]:
        cells = [r["config"], str(r["members"]), f"{r['pairs']} x {r['views']}", str(r["release_pairs"]),
                 f"{r['a_pairs_per_s']:.4g}", f"{r['b_pairs_per_s']:.4g}", f"{r['ratio']:.2f}x", _ratio(r.get("cpu_ratio")),
                 f"{r['max_abs_diff']:.2e}", f"{r['score_range']:.2e}", _num(r["a_peak_mib"], ".0f"), _num(r["b_peak_mib"], ".0f")]
        if flops:
            cells += [_num(r.get("a_tflops"), ".3g"), _num(r.get("b_tflops"), ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    if results["train"]:
        lines += ["", "## Training step", "",
                  "(a) the release: full backbones with an autograd graph (backward goes through them), dis and "
                  "ref in separate calls. (b) this kit (`members.train`): truncated backbones under no_grad, dis and "
                  "ref in one call per backbone; heads and Adam step identical.", "",
                  "| config | batch | (a) s/step | (b) s/step | speed-up | peak MiB (a) | peak MiB (b) | memory b/a |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            lines.append(f"| {r['config']} | {r['batch']} | {r['a_step_s']:.3f} | {r['b_step_s']:.3f} | "
                         f"{r['speedup']:.2f}x | {_num(r['a_peak_mib'], '.0f')} | {_num(r['b_peak_mib'], '.0f')} | "
                         f"{_num(r['memory_ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"
